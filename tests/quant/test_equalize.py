"""Cross-layer equalization (``equalize``): the float model is unchanged, per-channel weight ranges
are balanced, only pairs where the scaling commutes are taken, and the equalized integer model
(per-channel ReLU6 bounds included) is computed by TVM bit for bit as by numpy."""
from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qcal.config import QuantOptions
from qcal.eval.fidelity import sqnr_db
from qcal.quant.equalize import _input_channel_view, equalizable_pairs, equalize
from qcal.quant.realize import realize
from qcal.reference.float_interpreter import run_float
from qcal.reference.int_interpreter import run_integer
from tests.fixtures import GraphMaker, calibrate_amax, images, resnet_v1


def _unbalance(g, rng, spread):
    """Scale each conv's output channels by 10**U(-spread, spread) (as folded BatchNorms do)."""
    for node in g.nodes:
        if node.op == "conv2d":
            s = 10.0 ** rng.uniform(-spread, spread, node.params["weight"].shape[0])
            node.params["weight"] = (node.params["weight"] * s[:, None, None, None]).astype(np.float32)
            node.params["bias"] = (node.params["bias"] * s).astype(np.float32)


def mobile_block(seed, cin, size, expand, out, stride, act, spread, dense=True):
    """stem conv -> act -> [1x1 expand -> act -> 3x3 depthwise/s -> act -> 1x1 project] ->
    1x1 conv (identity pair with project) -> act -> gap -> dense::

        data -> conv -> f -> conv1x1 -> f -> dw3x3 -> f -> conv1x1 -> conv1x1 -> f -> head
    """
    g = GraphMaker((cin, size, size), seed, "mobile")
    f = g.relu if act == "relu" else g.clip
    x = f(g.conv("data", expand, k=3))
    x = f(g.conv(x, expand * 2, k=1, p=0))
    x = f(g.conv(x, expand * 2, k=3, s=stride, groups=expand * 2))
    x = g.conv(x, out, k=1, p=0)
    x = f(g.conv(x, out + 1, k=1, p=0))
    _unbalance(g, np.random.RandomState(seed), spread)
    if dense:
        g.dense(g.flatten(g.gap(x)), 4)
    return g.graph()


def _pair_ranges(graph, pair):
    w1 = graph.node(pair.first).params["weight"].astype(np.float64)
    second = graph.node(pair.second)
    w2 = second.params["weight"].astype(np.float64)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = np.abs(_input_channel_view(w2, int(second.attrs.get("groups", 1)))).max(axis=1)
    return r1, r2


@given(seed=st.integers(0, 2 ** 16), cin=st.integers(1, 4), size=st.integers(5, 13),
       expand=st.integers(1, 7), out=st.integers(1, 9), stride=st.integers(1, 2),
       act=st.sampled_from(["relu", "relu6"]), spread=st.floats(0, 2.5))
def test_float_model_unchanged_and_ranges_balanced(seed, cin, size, expand, out, stride, act, spread):
    graph = mobile_block(seed, cin, size, expand, out, stride, act, spread)
    eq, pairs, sweeps = equalize(graph)
    assert [(p.first, p.second) for p in pairs] == [("conv2d1", "conv2d3"), ("conv2d3", "conv2d5"),
                                                    ("conv2d5", "conv2d7"), ("conv2d7", "conv2d8")]
    x = images(3, (cin, size, size), seed=seed + 1, std=2.0)
    want, got = run_float(graph, x, keep="all"), run_float(eq, x, keep="all")
    for name in (graph.output.name, "conv2d8"):
        scale = np.abs(want[name]).max() + 1e-30
        np.testing.assert_allclose(got[name], want[name], rtol=0, atol=2e-5 * scale)
    for pair in pairs:
        r1, r2 = _pair_ranges(eq, pair)
        live = (r1 > 0) & (r2 > 0)
        np.testing.assert_allclose(r1[live], r2[live], rtol=2e-3)
    # ReLU6's bounds follow each channel's scale: per-channel clip bounds, still 6 in float terms
    if act == "relu6" and spread > 0.1:
        assert isinstance(eq.node("clip2").attrs["a_max"], tuple)


def test_only_commuting_pairs_are_taken():
    """A conv whose output is also a residual operand, or read by two layers, is no pair; the
    float graph given is not modified."""
    graph = resnet_v1(seed=0)
    before = {n.name: {k: v.copy() for k, v in n.params.items()} for n in graph.nodes}
    pairs = equalizable_pairs(graph)
    adds = {i for n in graph.nodes if n.op == "add" for i in n.inputs}
    # conv2 may feed the add (its output does not change); conv1 and its activation may not
    assert [(p.first, p.activation, p.second) for p in pairs] == [
        ("conv2d4", "relu5", "conv2d6"), ("conv2d9", "relu10", "conv2d11")]
    assert all(p.first not in adds and p.activation not in adds for p in pairs)
    readers = {n.name: [m for m in graph.nodes if n.name in m.inputs] for n in graph.nodes}
    for p in pairs:
        assert len(readers[p.activation or p.first]) == 1
    equalize(graph)
    for n in graph.nodes:
        for k, v in n.params.items():
            np.testing.assert_array_equal(v, before[n.name][k])


def test_equalization_rescues_per_tensor_weights():
    """Channels spread over 10**+-2 lose the small ones under one per-tensor weight scale;
    equalized first, the same 8-bit per-tensor model is far closer to float32."""
    graph = mobile_block(5, 3, 12, 6, 8, 1, "relu6", 2.0)
    x = images(16, (3, 12, 12), seed=6)
    want = run_float(graph, x)
    options = QuantOptions(bias_mode="int32-acc", activation_method="max", weight_scale="max")
    plain = run_integer(realize(graph, calibrate_amax(graph, x, "max"), options), x)
    eq = equalize(graph)[0]
    equalized = run_integer(realize(eq, calibrate_amax(eq, x, "max"), options), x)
    assert sqnr_db(want, equalized) > sqnr_db(want, plain) + 6


def test_tvm_equals_numpy_on_equalized_relu6_graph():
    """Per-channel clip bounds in the integer graph, and in a clip kept float32."""
    pytest.importorskip("qcal.backend.tvm.emit")
    from tests.fixtures import tvm_and_numpy_values, tvm_mismatches

    graph = equalize(mobile_block(7, 3, 9, 5, 6, 2, "relu6", 1.5))[0]
    x = images(4, (3, 9, 9), seed=8)
    amax = calibrate_amax(graph, x)
    for options in (QuantOptions(bias_bits=8), QuantOptions(float_layers=("clip6",))):
        q = realize(graph, amax, options)
        tvm_values, ref_values = tvm_and_numpy_values(q, images(2, (3, 9, 9), seed=9, std=1.5))
        assert not tvm_mismatches(q, tvm_values, ref_values)
