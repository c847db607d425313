"""Per-channel power-of-2 bias scales (``bias_granularity='channel'``): known answers, the per-channel
alignment and overflow proof, and hypothesis over shapes (TVM == numpy is in
tests/backend/test_widths_rounding_fuzz.py, whose options now draw the bias granularity too)."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcal.config import QuantOptions
from qcal.errors import UsageProblem
from qcal.quant.fixed_point import bias_scale
from qcal.quant.realize import realize
from qcal.reference.int_interpreter import run_integer, run_simulated
from tests.fixtures import GraphMaker, calibrate_amax, images


def test_bias_scale_per_channel_known_answers():
    bias = np.array([3.0, -0.1, 0.0, 2.0 ** -20])
    assert bias_scale(bias, 8) == 4.0 / 128
    assert list(bias_scale(bias, 8, "channel")) == [4.0 / 128, 0.125 / 128, 1.0, 2.0 ** -20 / 128]


def test_options_label_and_refusal():
    assert QuantOptions(bias_bits=8, bias_granularity="channel").label.endswith("b8/channel")
    assert "channel" not in QuantOptions(bias_bits=8).label.split()[-1]
    # int32-acc is at the accumulator's scale: the granularity does not make another variant
    assert (QuantOptions(bias_mode="int32-acc", bias_granularity="channel")
            == QuantOptions(bias_mode="int32-acc"))
    with pytest.raises(UsageProblem, match="bias_granularity must be one of tensor, channel"):
        QuantOptions(bias_granularity="layer")


def _one_conv(bias, weight_scale=1.0, seed=0, cin=2, size=5):
    g = GraphMaker((cin, size, size), seed)
    conv = g.conv("data", len(bias), k=3)
    g.nodes[-1].params["bias"] = np.asarray(bias, np.float32)
    g.nodes[-1].params["weight"] *= np.float32(weight_scale)
    g.relu(conv)
    return g.graph(), conv


def _bias_as_added(qgraph, layer):
    node = qgraph.node(layer)
    channels = node.params["bias"].shape[0]
    scale = np.broadcast_to(np.asarray(node.scale, np.float64), (channels,))
    return node.params["bias"].astype(np.float64) * scale


def test_per_channel_scale_keeps_small_channel_biases_that_per_tensor_zeroes():
    """One large bias (27x the others, as Lite0's depthwise layers): at 8 bits under one scale the
    small ones round to 0; each under its own scale they are kept within half their own step."""
    bias = np.array([2.7, 0.1, -0.06, 0.004], np.float32)
    graph, conv = _one_conv(bias)
    x = images(3, (2, 5, 5), seed=1)
    amax = calibrate_amax(graph, x)
    tensor = realize(graph, amax, QuantOptions(bias_bits=8))
    channel = realize(graph, amax, QuantOptions(bias_bits=8, bias_granularity="channel"))
    got_t, got_c = _bias_as_added(tensor, conv), _bias_as_added(channel, conv)
    assert got_t[3] == 0  # 0.004 is an eighth of the shared step 4/128
    own_step = bias_scale(bias.astype(np.float64), 8, "channel")
    assert np.all(np.abs(got_c - bias) <= own_step / 2 + 1e-12)
    assert got_c[3] == pytest.approx(0.004, rel=1 / 128)


def test_per_channel_alignment_shifts_only_the_channels_that_need_it():
    """The finer scale wins per channel: a channel whose bias step is finer than the accumulator's
    shifts its accumulator left; one whose step is coarser keeps it (shift 0)."""
    bias = np.array([8.0, 2.0 ** -14], np.float32)
    graph, conv = _one_conv(bias, weight_scale=0.05)
    x = images(3, (2, 5, 5), seed=2)
    q = realize(graph, calibrate_amax(graph, x), QuantOptions(bias_bits=8, bias_granularity="channel"))
    align = q.node(f"{conv}:align")
    lshift = np.broadcast_to(align.params["lshift"], (2,))
    assert lshift[0] == 0 and lshift[1] > 0
    assert _bias_as_added(q, conv)[1] == pytest.approx(2.0 ** -14, rel=1 / 128)


def test_overflow_proof_holds_per_channel():
    """A channel with near-zero weights has a tiny accumulator scale at which its 16-bit bias would
    not fit int32: the realizer lowers that channel's shift (recorded) and leaves the other alone
    (its finer bias step still shifts its accumulator left); worst-case
    inputs stay within every proven bound."""
    g = GraphMaker((1, 3, 3), 0)
    conv = g.conv("data", 2, k=1, p=0)
    w = np.array([1.0, 1e-6], np.float32).reshape(2, 1, 1, 1)
    g.nodes[-1].params.update(weight=w, bias=np.array([0.5, 3.0], np.float32))
    graph = g.graph()
    options = QuantOptions(bias_bits=16, bias_granularity="channel", weight_granularity="channel")
    q = realize(graph, {"data": 1.0}, options)
    adjusted = [a for a in q.adjustments if a.layer == conv]
    assert adjusted and adjusted[0].channels == 1 and adjusted[0].applied.startswith(">>")
    assert np.broadcast_to(q.node(f"{conv}:align").params["lshift"], (2,))[0] == 2  # 2^-14 -> 2^-16
    worst = np.full((2, 1, 3, 3), 1.0, np.float32) * np.array([1, -1], np.float32).reshape(2, 1, 1, 1)
    run_integer(q, worst)  # raises if a value passes its proven bound


@given(seed=st.integers(0, 2 ** 16), cin=st.integers(1, 6), cout=st.integers(1, 19),
       size=st.integers(3, 9), k=st.sampled_from([1, 3]), groups_dw=st.booleans(),
       bits=st.sampled_from([4, 8, 9, 16]), spread=st.floats(0, 4),
       weights=st.sampled_from(["tensor", "channel"]), scale=st.sampled_from(["power2", "max"]))
def test_every_channel_within_half_its_own_step(seed, cin, cout, size, k, groups_dw, bits, spread,
                                                weights, scale):
    """Random conv(+depthwise)+dense graphs, biases spread over 10**spread: every bias as added
    is within half its own B-bit step (plus half a common-scale LSB), integer values stay within
    their proven bounds, and the simulated model (exact for power-of-2 scales) agrees."""
    g = GraphMaker((cin, size, size), seed)
    rng = np.random.RandomState(seed)
    layers = [g.conv("data", cout, k=k)]
    x = g.relu(layers[-1])
    if groups_dw:
        layers.append(g.conv(x, cout, k=3, groups=cout))
        x = g.relu(layers[-1])
    layers.append(g.dense(g.flatten(g.gap(x)), 5))
    for node in g.nodes:
        if "bias" in node.params:
            n = len(node.params["bias"])
            node.params["bias"] = (rng.choice([-1, 1], n) * 10.0 ** (-rng.rand(n) * spread)
                                   * rng.rand()).astype(np.float32)
    graph = g.graph()
    calib = images(3, (cin, size, size), seed=seed + 1)
    options = QuantOptions(bias_bits=bits, bias_granularity="channel", weight_granularity=weights,
                           weight_scale=scale, activation_method="power2")
    q = realize(graph, calibrate_amax(graph, calib), options)
    for layer in layers:
        bias = graph.node(layer).params["bias"].astype(np.float64)
        node = q.node(layer)
        common = np.broadcast_to(np.asarray(node.scale, np.float64), bias.shape)
        own = bias_scale(bias, bits, "channel")
        err = np.abs(_bias_as_added(q, layer) - bias)
        assert np.all(err <= own / 2 + common / 2 + 1e-12 * np.abs(bias)), layer
    x = images(2, (cin, size, size), seed=seed + 2, std=2.0)
    out = run_integer(q, x)  # checks every proven bound
    if scale == "power2":
        np.testing.assert_array_equal(out, run_simulated(q, x).astype(np.float32))
