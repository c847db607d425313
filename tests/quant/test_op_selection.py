"""Op selection: ``quantize_ops`` (Relay's debug_enabled_ops) and ``float_layers``; per-layer bias
precision (``layer_bias_bits``)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from qcal.config import QUANTIZABLE_OPS, QuantOptions
from qcal.errors import UsageProblem
from qcal.quant.annotate import annotate
from qcal.quant.realize import realize
from qcal.reference.int_interpreter import run_integer
from tests.fixtures import calibrate_amax, float_values, images, realized, resnet_v1


def _integer_ops(options):
    a = annotate(resnet_v1(), options)
    return {a.graph.node(name).op for name in a.decisions}, a


def test_default_quantizes_every_op_kind_of_the_graph():
    ops, _ = _integer_ops(QuantOptions())
    assert ops == {"conv2d", "relu", "max_pool2d", "add", "global_avg_pool2d", "flatten", "dense"}


def test_only_the_named_op_types_become_integer():
    ops, a = _integer_ops(QuantOptions(quantize_ops="conv2d,dense"))
    assert ops == {"conv2d", "dense"}
    # every layer reads int8 and hands float32 on: one quantize per distinct layer input (relu8
    # feeds two convs: 6), one dequantize per layer output (6 convs + the dense: 7)
    assert a.counts()["quantize"] == 6 and a.counts()["dequantize"] == 7


def test_residual_adds_can_stay_float():
    ops, a = _integer_ops(QuantOptions(quantize_ops=("conv2d", "relu", "max_pool2d", "dense",
                                                     "global_avg_pool2d", "flatten")))
    assert "add" not in ops
    assert {a.domain[n] for n in ("add7", "add13")} == {"float"}


def test_named_layers_stay_float_and_the_rest_does_not_move():
    ops, a = _integer_ops(QuantOptions(float_layers=("conv2d4", "dense17")))
    assert not a.is_integer("conv2d4") and not a.is_integer("dense17")
    assert a.is_integer("conv2d1") and a.is_integer("conv2d6") and a.is_integer("conv2d9")


def test_selected_model_computes_what_its_float_parts_say():
    g = resnet_v1()
    calib, x = images(16, (3, 16, 16), seed=1), images(8, (3, 16, 16), seed=2)
    full = run_integer(realized(g, QuantOptions(), calib), x)
    none_but_dense = realized(g, QuantOptions(quantize_ops="dense"), calib)
    partial = run_integer(none_but_dense, x)
    ref = float_values(g, x)[g.output.name]
    # only the classifier is quantized: far closer to float32 than the fully integer model
    assert np.abs(partial - ref).max() < np.abs(full - ref).max()
    assert sum(1 for n in none_but_dense.nodes if n.op == "qconv2d") == 0


@pytest.mark.parametrize("values, message", [
    ({"quantize_ops": "conv2d,conv"}, "quantize_ops: 'conv' is not an op qcal quantizes"),
    ({"quantize_ops": ""}, "quantize_ops: an empty name"),
    ({"float_layers": 3}, "float_layers must be names"),
])
def test_bad_selections_are_refused(values, message):
    with pytest.raises(UsageProblem, match=message):
        QuantOptions(**values)


def test_unknown_layer_is_refused_naming_it():
    with pytest.raises(UsageProblem, match="float_layers: model 'resnet_v1' has no layer 'conv99'"):
        annotate(resnet_v1(), QuantOptions(float_layers="conv2d1,conv99"))


def test_names_are_kept_in_order_without_duplicates_and_label_them():
    o = QuantOptions(quantize_ops=" conv2d, dense ,conv2d", float_layers=["b", "a"])
    assert o.quantize_ops == ("conv2d", "dense") and o.float_layers == ("b", "a")
    assert o.label.endswith("ops:conv2d+dense float:b+a")
    assert set(QUANTIZABLE_OPS) >= set(o.quantize_ops)


def test_layer_bias_bits_parse_label_and_leave_other_keys_alone():
    o = QuantOptions(layer_bias_bits=" conv2d1=8, dense17=int32-acc")
    assert o.layer_bias_bits == (("conv2d1", 8), ("dense17", "int32-acc"))
    assert QuantOptions(layer_bias_bits={"conv2d1": 8, "dense17": "int32-acc"}) == o
    assert QuantOptions.from_dict(json.loads(json.dumps(o.to_dict()))) == o
    assert o.label.endswith("bias:conv2d1=b8+dense17=b32acc")
    assert (o.bias_for("conv2d1"), o.bias_for("dense17"), o.bias_for("conv2d4")) == \
        (("bits", 8), ("int32-acc", 16), ("bits", 16))
    # unused, it is not in the dict: variant keys of older results stay valid
    assert "layer_bias_bits" not in QuantOptions().to_dict()


@pytest.mark.parametrize("value, message", [
    ("conv2d1", "'conv2d1' is not NAME=BITS"),
    ("conv2d1=1", "a bias precision is 2..32 bits or 'int32-acc', not 1"),
    ("conv2d1=8,conv2d1=9", "layer 'conv2d1' is given twice"),
    (7, "layer_bias_bits must be NAME=BITS pairs"),
])
def test_bad_layer_bias_bits_are_refused(value, message):
    with pytest.raises(UsageProblem, match=message):
        QuantOptions(layer_bias_bits=value)


@pytest.mark.parametrize("value, message", [
    ("conv99=8", "layer_bias_bits: model 'resnet_v1' has no layer 'conv99'"),
    ("relu2=8", "layer_bias_bits: layer 'relu2' of model 'resnet_v1' has no bias"),
])
def test_layer_bias_bits_name_layers_with_a_bias(value, message):
    with pytest.raises(UsageProblem, match=message):
        annotate(resnet_v1(), QuantOptions(layer_bias_bits=value))


def test_one_layers_bias_precision_changes_only_that_bias():
    g = resnet_v1()
    x = np.random.RandomState(0).randn(8, 3, 16, 16).astype(np.float32)
    amax = calibrate_amax(g, x)
    base = realize(g, amax, QuantOptions(bias_bits=16))
    short = realize(g, amax, QuantOptions(bias_bits=16, layer_bias_bits="conv2d4=3"))
    everywhere = realize(g, amax, QuantOptions(bias_bits=3))

    def real_bias(q, name):
        node = q.node(name)
        return node.params["bias"] * np.asarray(node.scale)

    for name in ("conv2d1", "conv2d6", "dense17"):
        assert np.array_equal(real_bias(short, name), real_bias(base, name))
    assert np.array_equal(real_bias(short, "conv2d4"), real_bias(everywhere, "conv2d4"))
    assert not np.array_equal(real_bias(short, "conv2d4"), real_bias(base, "conv2d4"))
