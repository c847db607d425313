"""Per-layer sensitivity (qcal.eval.sensitivity) on fixture graphs with random weights."""
from __future__ import annotations

import numpy as np
import pytest

from qcal.calib.collect import collect_statistics
from qcal.calib.result import CalibrationResult
from qcal.config import QuantOptions
from qcal.eval.sensitivity import (layer_sensitivity, measure, probes, ranked, run_variant, sensitivity_units,
                                   simulation_is_exact)
from qcal.ir.graph import residual_blocks
from qcal.quant import quantize
from qcal.quant.realize import qgraph_from_float
from qcal.reference.int_interpreter import run_integer, shared_prefix
from tests.fixtures import images, resnet_v1, resnet_v2, vgg


def _ranges(graph, calib):
    statistics = collect_statistics(graph, [calib[:8], calib[8:]], progress=False, bins=0)
    return CalibrationResult.from_statistics(statistics).ranges


def _float_logits(graph, x):
    return run_integer(qgraph_from_float(graph), x)


def _with_outlier(graph, layer, factor=400.0):
    """``layer`` (a conv reading a ReLU's output, followed by a ReLU) made obviously broken
    under per-tensor weight scales: output channel 0 gets one weight ``factor`` times the
    largest, negative, and a negative bias, so that channel is always cut by the ReLU and the
    float model does not change; at the scale that outlier asks for, every other weight of the
    layer rounds to zero."""
    node = graph.node(layer)
    w = node.params["weight"]
    peak = np.abs(w).max()
    w[0] = 0.0
    w[0, 0, 1, 1] = -factor * peak
    node.params["bias"][0] = -1.0
    return graph


def test_residual_blocks_are_found_from_the_structure():
    graph = resnet_v1()
    blocks = dict(residual_blocks(graph))
    assert list(blocks) == ["add7", "add13"]
    # identity block: its entry is the stem's max-pool; strided block: the projection is inside
    assert blocks["add7"] == ("conv2d4", "relu5", "conv2d6", "add7")
    assert blocks["add13"] == ("conv2d9", "relu10", "conv2d11", "conv2d12", "add13")
    assert residual_blocks(vgg()) == []


def test_units_and_probes_in_network_order():
    graph = resnet_v2()
    units = sensitivity_units(graph)
    positions = [u.position for u in units]
    assert positions == sorted(positions)
    kinds = {u.kind for u in units}
    assert kinds == {"layer", "block"}
    assert {u.op for u in units if u.kind == "layer"} == {"conv2d", "dense", "channel_affine"}
    made = probes(graph, QuantOptions(), units)
    by_mode = {}
    for p in made:
        by_mode.setdefault(p.mode, []).append(p.unit.name)
    # the input channel_affine cannot be integer on its own (its input is the float image)
    assert "channel_affine1" not in by_mode["only"]
    # biases: only layers that have one (these convs have none)
    assert set(by_mode["bias"]) == {u.name for u in units if u.kind == "layer"
                                    and ("bias" in graph.node(u.name).params
                                         or u.op == "channel_affine")}
    assert not [n for n in by_mode["bias"] if n.startswith("add")]


def test_a_layer_with_a_weight_outlier_ranks_first():
    graph = _with_outlier(resnet_v1(seed=3), "conv2d4")
    calib, x = images(16, (3, 16, 16), seed=1), images(24, (3, 16, 16), seed=2)
    rows, base = layer_sensitivity(graph, _ranges(graph, calib), QuantOptions(), x,
                                   _float_logits(graph, x), bias_bits=4)
    layers = ranked(rows, "float", kind="layer")
    assert layers[0]["unit"] == "conv2d4"
    assert layers[0]["sqnr_cost_db"] > 10 + layers[1]["sqnr_cost_db"]
    assert ranked(rows, "only", kind="layer")[0]["unit"] == "conv2d4"
    # its noise alone is most of the network's
    assert ranked(rows, "only", kind="layer")[0]["noise_share"] > 0.5
    # the block holding it is the costlier block
    assert ranked(rows, "float", kind="block")[0]["unit"] == "add7"
    assert [r["order"] for r in rows] == list(range(len(rows)))
    assert base["exact"] and np.isfinite(base["sqnr_logits_db"])


def test_keeping_every_layer_float_gives_the_float_model_and_bias_mode_changes_only_that_bias():
    graph = resnet_v1(seed=4)
    calib, x = images(16, (3, 16, 16), seed=1), images(8, (3, 16, 16), seed=5)
    ranges = _ranges(graph, calib)
    every = tuple(n.name for n in graph.nodes[1:])
    reference = _float_logits(graph, x)
    metrics = measure(graph, ranges, QuantOptions(float_layers=every), x, reference)
    assert metrics["sqnr_logits_db"] == float("inf") and metrics["agree_top1"] == 100.0
    base = QuantOptions(bias_bits=16)
    probe = next(p for p in probes(graph, base, sensitivity_units(graph), ("bias",), 3)
                 if p.unit.name == "conv2d6")
    a, b = quantize(graph, ranges, base), quantize(graph, ranges, probe.options)

    def biases(qgraph):  # each layer's bias as added, in real units
        return {n.name: n.params["bias"] * np.asarray(n.scale) for n in qgraph.nodes
                if n.op == "bias_add"}

    before, after = biases(a), biases(b)
    assert before.keys() == after.keys()
    assert [name for name in before if not np.array_equal(before[name], after[name])] == \
        ["conv2d6"]
    assert len(np.unique(after["conv2d6"])) <= 7 < len(np.unique(before["conv2d6"]))  # 3 bits


@pytest.mark.parametrize("options, exact", [(QuantOptions(), True),
                                            (QuantOptions(float_layers="conv2d6"), False)])
def test_simulation_exactness_is_told_and_holds_when_claimed(options, exact):
    graph = resnet_v1(seed=5)
    calib, x = images(16, (3, 16, 16), seed=1), images(6, (3, 16, 16), seed=6)
    ranges = _ranges(graph, calib)
    assert simulation_is_exact(quantize(graph, ranges, options)) is exact
    simulated, told = run_variant(graph, ranges, options, x, "simulated", batch_size=4)
    integer, _ = run_variant(graph, ranges, options, x, "integer", batch_size=4)
    assert told is exact
    if exact:
        assert np.array_equal(simulated, integer)
    assert np.array_equal(simulated.argmax(1), integer.argmax(1))


@pytest.mark.parametrize("engine", ["integer", "simulated"])
def test_variants_run_together_give_each_ones_own_logits(engine):
    from qcal.eval.sensitivity import every_layer_float, run_variants

    graph = resnet_v2(seed=6)
    calib, x = images(16, (3, 16, 16), seed=1), images(5, (3, 16, 16), seed=7)
    ranges = _ranges(graph, calib)
    base = QuantOptions(bias_bits=8)
    made = probes(graph, base, sensitivity_units(graph), bias_bits=4)
    variants = [base] + [p.options for p in made]
    together = run_variants(graph, ranges, variants, x, engine, batch_size=3,
                            references=(base, every_layer_float(graph, base)))
    late = next(p.options for p in made if (p.unit.name, p.mode) == ("dense20", "float"))
    q_base, q_late = quantize(graph, ranges, base), quantize(graph, ranges, late)
    assert shared_prefix(q_base, q_late) > len(q_base.nodes) // 2  # computed once, shared
    for options, (logits, exact) in zip(variants, together):
        alone, exact_alone = run_variant(graph, ranges, options, x, engine, batch_size=3)
        assert np.array_equal(logits, alone) and exact == exact_alone, options.label
