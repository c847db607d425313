"""intermediate_bits: int32 tensors handed between integer ops narrowed to B-bit levels (Relay's
nbit_activation); 32, the default, leaves every graph, key and label as it was."""
from __future__ import annotations

import numpy as np
import pytest

from qcal.config import QuantOptions, options_from_values
from qcal.errors import QcalError, UsageProblem
from qcal.ir.qgraph import is_narrowing
from qcal.quant.realize import realize
from qcal.reference.int_interpreter import run_integer, run_simulated
from tests.fixtures import GraphMaker, calibrate_amax, images, resnet_v1, resnet_v2


def _two_branch_add(seed=0):
    """data -> conv -> relu --+--> conv --+--> add -> gap -> flatten -> dense
                              '--> conv --'
    """
    g = GraphMaker((3, 8, 8), seed, "two_branch")
    x = g.relu(g.conv("data", 8))
    g.dense(g.flatten(g.gap(g.add(g.conv(x, 8), g.conv(x, 8)))), 4)
    return g.graph()


def test_the_default_keeps_the_description_the_key_and_the_label():
    exact = QuantOptions(intermediate_bits=32)
    assert exact == QuantOptions()
    # the fields of a variant's description before the option existed, at their defaults
    assert exact.to_dict() == {
        "activation_method": "power2", "percentile": 99.99, "global_scale": 8.0,
        "weight_scale": "power2", "weight_granularity": "tensor", "bias_mode": "bits",
        "bias_bits": 16, "bias_granularity": "tensor", "bias_correction": "none",
        "equalize": False, "skip_k_conv": 0, "skip_dense": False, "weight_bits": 8,
        "activation_bits": 8, "first_layer_bits": None, "last_layer_bits": None,
        "rounding": "upward", "quantize_ops": None, "float_layers": (), "simulate": False}
    assert exact.label == "a:power2 w:power2/tensor b16"


def test_a_narrower_width_enters_the_description_and_the_label():
    narrow = options_from_values({"intermediate_bits": 16, "rounding": "nearest"})
    assert narrow.to_dict()["intermediate_bits"] == 16
    assert QuantOptions.from_dict(narrow.to_dict()) == narrow
    assert narrow.label == "a:power2 w:power2/tensor b16 round-nearest intermediates:16b"


@pytest.mark.parametrize("bits", [8, 33, 0, "16", 16.0, True])
def test_widths_outside_9_to_32_are_refused(bits):
    with pytest.raises(UsageProblem, match="intermediate_bits must be an integer from 9 to 32"):
        QuantOptions(intermediate_bits=bits)


@pytest.mark.parametrize("make", [resnet_v1, resnet_v2])
def test_at_32_bits_the_integer_graph_is_unchanged(make):
    graph = make()
    calib = images(4, (3, 16, 16), seed=2)
    amax, wide = calibrate_amax(graph, calib), calibrate_amax(graph, calib, "max")
    before = realize(graph, amax, QuantOptions())
    after = realize(graph, amax, QuantOptions(intermediate_bits=32), wide_amax=wide)
    assert [(n.name, n.op, n.attrs) for n in after.nodes] == \
        [(n.name, n.op, n.attrs) for n in before.nodes]
    assert "narrowed_intermediates" not in after.counts() and after.report() == before.report()
    x = images(2, (3, 16, 16), seed=3)
    assert np.array_equal(run_integer(after, x), run_integer(before, x))


@pytest.mark.parametrize("rounding", ["upward", "nearest"])
def test_a_tiny_width_clips_at_the_power_of_two_scale(rounding):
    """B = 9: a branch whose abs-max is claimed to be 1/8 of its values' is clipped to exactly
    +-255 at scale 2**ceil(log2 amax) / 2**8; below the clip it is the rounded rescale."""
    graph = _two_branch_add()
    calib = images(4, (3, 8, 8), seed=1)
    amax, wide = calibrate_amax(graph, calib), calibrate_amax(graph, calib, "max")
    branch = graph.nodes[3].name  # the first conv of the add
    assert graph.nodes[3].op == "conv2d" and graph.nodes[5].op == "add"
    wide[branch] = wide[branch] / 8
    qgraph = realize(graph, amax, QuantOptions(intermediate_bits=9, rounding=rounding),
                     wide_amax=wide)
    narrow = qgraph.node(f"{branch}:narrow")
    assert is_narrowing(narrow) and narrow.attrs["levels"] == 255
    scale = 2.0 ** np.ceil(np.log2(wide[branch])) / 2 ** 8
    assert float(narrow.scale) == scale and int(narrow.bound) == 255

    x = images(3, (3, 8, 8), seed=1)  # the calibration images themselves
    values = run_integer(qgraph, x, keep="all")
    exact = values[narrow.inputs[0]].astype(np.float64) * float(qgraph.node(narrow.inputs[0]).scale)
    levels = exact / scale  # a power-of-2 ratio: exact in float64
    rounded = np.floor(levels + 0.5)
    if rounding == "nearest":
        rounded = np.where(levels + 0.5 == rounded, rounded - (rounded % 2), rounded)
    assert np.array_equal(values[narrow.name], np.clip(rounded, -255, 255))
    assert np.abs(levels).max() > 255 * 4  # the claimed range is far below the values ...
    assert values[narrow.name].max() == 255 and values[narrow.name].min() == -255  # ... so clips


def test_narrowing_counts_in_the_report_and_loses_accuracy_only_at_small_widths():
    graph = resnet_v1()
    calib = images(8, (3, 16, 16), seed=2)
    amax, wide = calibrate_amax(graph, calib), calibrate_amax(graph, calib, "max")
    x = images(8, (3, 16, 16), seed=2)
    exact = run_integer(realize(graph, amax, QuantOptions()), x)
    error = {}
    for bits in (24, 16, 9):
        qgraph = realize(graph, amax, QuantOptions(intermediate_bits=bits), wide_amax=wide)
        # each add's two int32 operands and its sum (the second block's shortcut is a conv)
        assert qgraph.counts()["narrowed_intermediates"] == 5
        assert "narrowed_intermediates 5" in qgraph.report()[0]
        assert all(n.bound.max() <= 2 ** (bits - 1) - 1 for n in qgraph.nodes if is_narrowing(n))
        logits = run_integer(qgraph, x)
        # the simulated (fake-quantized float) model follows the narrowing too
        assert np.allclose(run_simulated(qgraph, x), logits, atol=1e-5)
        error[bits] = np.abs(logits - exact).max()
    assert error[24] <= error[16] < error[9]


def test_a_missing_abs_max_is_named():
    graph = _two_branch_add()
    amax = calibrate_amax(graph, images(2, (3, 8, 8)))
    with pytest.raises(QcalError, match=f"no abs-max for the int32 tensor '{graph.nodes[3].name}'"):
        realize(graph, amax, QuantOptions(intermediate_bits=16))
