"""Each variant verifies its compiled model against the numpy integer reference before it is
evaluated: a real compiled model passes; a compiled model with one wrong weight, or compiled with
a wrong schedule (the depthwise tile-of-one bug, put back through the real rule table), is caught,
naming the first layer whose output differs.
"""
from __future__ import annotations

import copy

import pytest

from qcal.backend.tvm.compile import compile_model
from qcal.config import QuantOptions
from qcal.eval.verify import (VerificationFailed, bit_reproducible, first_differing_layer, probe_outputs,
                              verify_compiled)
from tests.fixtures import MODELS, OPTION_SETS, GraphMaker, classifier_head, images, realized

BATCH = 4


@pytest.fixture(scope="module")
def resnet():
    graph = MODELS["resnet_v1"](seed=3, size=15)  # odd sizes: padded, strided, pooled rows
    qgraph = realized(graph, OPTION_SETS["power2-b9-channel"], images(8, (3, 15, 15), seed=1))
    return qgraph, compile_model(qgraph, BATCH)


def _verify(qgraph, compiled, x):
    return verify_compiled(qgraph, x, compiled.run, compiled.run_probe, "resnet_v1 b9")


def test_a_real_compiled_variant_verifies(resnet):
    qgraph, compiled = resnet
    assert bit_reproducible(qgraph)
    verification = _verify(qgraph, compiled, images(3, (3, 15, 15), seed=2))
    assert (verification.images, verification.check) == (3, "logits")
    assert verification.record()["verified_images"] == 3


def test_the_probe_of_a_real_model_matches_every_layer(resnet):
    qgraph, compiled = resnet
    x = images(2, (3, 15, 15), seed=4)
    probed = compiled.run_probe(x, probe_outputs(qgraph))
    assert {qgraph.node(n).dtype for n in probed} == {"int8", "float32"}  # layer outputs only
    assert first_differing_layer(qgraph, x, probed) is None


def test_zero_images_is_unverified(resnet):
    qgraph, compiled = resnet
    verification = _verify(qgraph, compiled, images(0, (3, 15, 15)))
    assert verification.record() == {"verified_images": 0, "verify_check": "off",
                                     "verify_seconds": 0.0}


def test_one_wrong_weight_in_the_compiled_graph_is_caught_and_named(resnet):
    qgraph, _ = resnet
    convs = [n for n in qgraph.nodes if n.op == "qconv2d"]
    target = convs[2]  # the first conv of the second block: layers before it stay right
    corrupted = copy.deepcopy(qgraph)
    weight = corrupted.node(target.name).params["weight"]
    weight[0] = -weight[0]  # one output channel's filter negated
    compiled = compile_model(corrupted, BATCH)
    layer = target.name.split(":")[0]
    with pytest.raises(VerificationFailed) as caught:
        _verify(qgraph, compiled, images(2, (3, 15, 15), seed=5))
    message = str(caught.value)
    assert "\n" not in message
    assert message.startswith("resnet_v1 b9: the compiled model differs from its numpy integer "
                              "reference on 2 calibration images; first differing layer "
                              f"'{layer}' (qconv2d > ")
    assert "values differ, by up to" in message


def _mobile_block(size: int):
    """data -> conv 3x3 (16) -> relu -> depthwise 3x3/2 (16) -> relu -> conv 1x1 -> relu -> head."""
    g = GraphMaker((3, size, size), seed=7, name="mobile")
    x = g.relu(g.conv("data", 16))
    depthwise = g.conv(x, 16, s=2, groups=16)
    x = g.relu(g.conv(g.relu(depthwise), 16, k=1, p=0))
    return classifier_head(g, x, 10), depthwise


def test_a_wrong_schedule_is_caught_and_the_layer_named(monkeypatch):
    """The int8 depthwise rule once vectorized the epilogue's last loop, which for a 1x1 tile is
    the tile loop holding the accumulator: TVM accepts that schedule and computes wrong values
    (``schedules._vectorize``). A strided 33x33 -> 17x17 depthwise conv tiles 1x1 (17 has no
    divisor from 2 to 16). Put the old step back into the real rule and verification must name
    the depthwise conv."""
    from qcal.backend.tvm import depthwise as vnni_depthwise
    from qcal.backend.tvm import schedules

    # on a CPU with AVX-512 VNNI + VBMI the depthwise conv would take the VNNI kernel instead
    monkeypatch.setattr(vnni_depthwise, "depthwise_supported", lambda target: False)
    graph, depthwise = _mobile_block(33)
    qgraph = realized(graph, OPTION_SETS["power2-b16"], images(8, (3, 33, 33), seed=1))
    x = images(2, (3, 33, 33), seed=2)
    assert _verify(qgraph, compile_model(qgraph, BATCH, cache_dir=None), x).check == "logits"

    def old_epilogue_vectorize(sch, out, tile_loop):
        sch.vectorize(sch.get_loops(out)[-1])

    monkeypatch.setattr(schedules, "_vectorize_tile_epilogue", old_epilogue_vectorize)
    wrong = compile_model(qgraph, BATCH, cache_dir=None)  # the rule is not in the cache key
    with pytest.raises(VerificationFailed, match=f"first differing layer '{depthwise}' "
                                                 r"\(qconv2d > "):
        _verify(qgraph, wrong, x)


def test_float_layers_are_checked_layer_by_layer():
    """A float conv and dense (skip_k_conv, skip_dense) sum in another order than numpy: the
    check runs every layer of the probe from TVM's own inputs instead, and still names a wrong
    integer layer after the float one."""
    graph = MODELS["vgg"](seed=2)
    qgraph = realized(graph, QuantOptions(skip_k_conv=1, skip_dense=True),
                      images(8, (3, 16, 16), seed=1))
    assert not bit_reproducible(qgraph)
    compiled = compile_model(qgraph, BATCH)
    x = images(2, (3, 16, 16), seed=3)
    verification = _verify(qgraph, compiled, x)
    assert (verification.images, verification.check) == (2, "layers")
    probed = compiled.run_probe(x, probe_outputs(qgraph))
    nodes = qgraph.nodes
    first_int_conv = next(i for i, n in enumerate(nodes) if n.op == "qconv2d")
    its_output = next(n for n in nodes[first_int_conv:] if n.dtype == "int8")
    probed[its_output.name] = probed[its_output.name] // 2
    difference = first_differing_layer(qgraph, x, probed)
    assert difference.layer == nodes[first_int_conv].name.split(":")[0]
    assert difference.node == its_output.name and difference.ops[0] == "qconv2d"
