"""TVM Relax emission and compilation: TVM's integers equal the numpy reference bit for bit.

Each compile takes a few seconds on this machine, so every module is compiled once (module-scoped
fixtures) and checked on every node it computes.
"""
from __future__ import annotations

import numpy as np
import pytest

from qcal.backend.tvm.compile import compile_model
from qcal.config import QUANTIZABLE_OPS, QuantOptions
from qcal.errors import QcalError, UsageProblem
from qcal.quant.realize import qgraph_from_float
from qcal.reference.int_interpreter import run_integer, run_simulated
from tests.fixtures import MODELS, OPTION_SETS, every_op, images, realized
from tests.fixtures import tvm_and_numpy_values as _every_node
from tests.fixtures import tvm_mismatches as _mismatches

tvm_adapter = pytest.importorskip("qcal.backend.tvm.emit")

BATCH = 4


# Per op: conv 1x1 / 3x3 / strided / grouped / depthwise, dense, relu, relu6, residual add,
# max/avg/sum/global pooling, channel_affine, quantize, dequantize and both requantize kinds,
# under each bias mode and bias width. Calibrated on a milder batch than the test batch, so int8
# saturation is exercised too.
OP_OPTION_SETS = ["power2-b8", "power2-b9-channel", "power2-b16", "power2-b32",
                  "max-int32acc-channel"]


@pytest.mark.parametrize("options", OP_OPTION_SETS)
def test_every_op_bit_exact(options):
    graph = every_op()
    qgraph = realized(graph, OPTION_SETS[options], images(8, (4, 8, 8), seed=1))
    kinds = {n.attrs.get("kind") for n in qgraph.nodes if n.op == "requantize"}
    # power-of-2 scales rescale by shifts only; 'max' scales need the fixed-point multiplier
    assert kinds == ({"multiply"} if options.startswith("max") else {"shift"})
    x = images(BATCH, (4, 8, 8), seed=2, std=1.5)
    tvm_values, ref_values = _every_node(qgraph, x)
    assert not _mismatches(qgraph, tvm_values, ref_values)


@pytest.mark.parametrize("options", [
    QuantOptions(weight_bits=4, activation_bits=4, bias_bits=8),
    QuantOptions(activation_method="max", weight_scale="max", weight_granularity="channel",
                 weight_bits=3, activation_bits=6, first_layer_bits=8, bias_mode="int32-acc"),
], ids=["W4A4-power2", "W3A6-max-channel-first8"])
def test_every_op_bit_exact_below_8_bits(options):
    graph = every_op()
    qgraph = realized(graph, options, images(8, (4, 8, 8), seed=1))
    x = images(BATCH, (4, 8, 8), seed=2, std=1.5)
    tvm_values, ref_values = _every_node(qgraph, x)
    assert not _mismatches(qgraph, tvm_values, ref_values)
    narrow = [n for n in qgraph.nodes if n.dtype == "int8" and n.attrs.get("levels", 127) < 127]
    # the inputs saturate: TVM reaches the narrow tensors' top level and never passes it
    assert narrow and any(np.abs(tvm_values[n.name]).max() == n.attrs["levels"] for n in narrow)


def test_every_op_bit_exact_without_cpu_schedules():
    graph = every_op()
    qgraph = realized(graph, OPTION_SETS["max-b16"], images(8, (4, 8, 8), seed=1))
    x = images(BATCH, (4, 8, 8), seed=3, std=1.5)
    tvm_values, ref_values = _every_node(qgraph, x, use_schedules=False)
    assert not _mismatches(qgraph, tvm_values, ref_values)


def test_overflow_realignment_is_what_tvm_computes():
    """The 32-bit-bias case: the realigned graph (recorded adjustments) runs identically in TVM,
    on inputs that drive every int8 to its extremes."""
    graph = every_op(seed=4)
    qgraph = realized(graph, OPTION_SETS["power2-b32"], images(8, (4, 8, 8), seed=1))
    assert qgraph.adjustments
    x = images(BATCH, (4, 8, 8), seed=5, std=40.0)
    tvm_values, ref_values = _every_node(qgraph, x)
    assert not _mismatches(qgraph, tvm_values, ref_values)


# Whole models through compile_model: 10 images at batch 4 (the last batch is padded).
MODEL_CASES = [("resnet_v1", "power2-b16"), ("resnet_v2", "max-int32acc-channel"),
               ("vgg", "power2-b9-channel")]


@pytest.fixture(scope="module", params=MODEL_CASES, ids=["-".join(c) for c in MODEL_CASES])
def compiled_model(request):
    model, options = request.param
    graph = MODELS[model]()
    qgraph = realized(graph, OPTION_SETS[options], images(16, (3, 16, 16), seed=1))
    return qgraph, compile_model(qgraph, BATCH)


def test_whole_model_bit_exact_with_padded_last_batch(compiled_model):
    qgraph, compiled = compiled_model
    x = images(10, (3, 16, 16), seed=6, std=1.2)
    got = compiled.run(x)
    assert got.shape == (10, 10) and got.dtype == np.float32
    assert np.array_equal(got, run_integer(qgraph, x))


def test_simulated_agrees_with_tvm_on_top1(compiled_model):
    qgraph, compiled = compiled_model
    x = images(24, (3, 16, 16), seed=7)
    assert np.array_equal(compiled.run(x).argmax(1), run_simulated(qgraph, x).argmax(1))


def test_run_int_returns_the_integer_logits():
    graph = MODELS["vgg"]()
    qgraph = realized(graph, OPTION_SETS["power2-b16"], images(16, (3, 16, 16), seed=1))
    compiled = compile_model(qgraph, BATCH)
    x = images(5, (3, 16, 16), seed=8)
    got = compiled.run_int(x)
    ref = run_integer(qgraph, x, keep="all")[qgraph.output.inputs[0]]
    assert got.dtype == np.int32 and np.array_equal(got.astype(np.int64), ref)


def test_float_graph_compiles_and_matches_numpy():
    graph = MODELS["resnet_v2"]()
    compiled = compile_model(graph, BATCH)
    x = images(6, (3, 16, 16), seed=9)
    np.testing.assert_allclose(compiled.run(x), run_integer(qgraph_from_float(graph), x),
                               rtol=1e-4, atol=1e-5)


def test_skipped_layers_run_in_float():
    graph = MODELS["resnet_v1"]()
    options = QuantOptions(skip_k_conv=1, skip_dense=True)
    qgraph = realized(graph, options, images(16, (3, 16, 16), seed=1))
    assert qgraph.node(graph.nodes[1].name).op == "conv2d"  # the first conv stayed float
    compiled = compile_model(qgraph, BATCH)
    x = images(8, (3, 16, 16), seed=10)
    # float convs sum in another order than numpy, so a rounding can flip one int8 step
    ref = run_integer(qgraph, x)
    np.testing.assert_allclose(compiled.run(x), ref, atol=0.05 * np.abs(ref).max())
    assert (compiled.run(x).argmax(1) == ref.argmax(1)).mean() >= 0.85


def test_wrong_image_shape_and_batch_size_are_refused():
    graph = MODELS["vgg"]()
    with pytest.raises(UsageProblem, match="batch size must be a positive integer"):
        compile_model(graph, 0)
    compiled = compile_model(graph, 2)
    with pytest.raises(QcalError, match=r"expects images of shape \(3, 16, 16\)"):
        compiled.run(np.zeros((2, 3, 8, 8), np.float32))


def test_selected_ops_and_float_layers_bit_exact():
    # every op but add, and one conv (a branch nothing reads) named float: the float adds and
    # everything after them run in float32, every integer node stays bit-exact
    graph = every_op()
    name = [n.name for n in graph.nodes if n.op == "conv2d"][2]
    ops = ",".join(op for op in QUANTIZABLE_OPS if op != "add")
    options = QuantOptions(quantize_ops=ops, float_layers=name, rounding="nearest", weight_bits=5)
    qgraph = realized(graph, options, images(8, (4, 8, 8), seed=1))
    assert qgraph.node(name).op == "conv2d"
    assert {n.op for n in qgraph.nodes} >= {"qconv2d", "qavg_pool2d", "qsum_pool2d", "add"}
    x = images(BATCH, (4, 8, 8), seed=2, std=1.5)
    tvm_values, ref_values = _every_node(qgraph, x)
    integer = [n for n in tvm_values if qgraph.node(n).is_int]
    assert len(integer) > 10
    assert not _mismatches(qgraph, {n: tvm_values[n] for n in integer}, ref_values)
    for n in set(tvm_values) - set(integer):  # float32 sums in another order than numpy's
        np.testing.assert_allclose(tvm_values[n], ref_values[n], rtol=1e-4, atol=1e-4)
