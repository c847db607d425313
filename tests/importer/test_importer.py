"""Import stage: Gluon and ONNX models become Graphs whose numpy interpretation matches the source.

BatchNorm running statistics are randomised everywhere, so a wrong fold shows up as a mismatch.
"""
import os
from collections import Counter

import mxnet as mx
import numpy as np
import onnx
import pytest
from mxnet.gluon import nn
from onnx import TensorProto, helper, numpy_helper

from qcal.errors import QcalError
from qcal.families import resolve_model
from qcal.files import REPO_ROOT
from qcal.importer import import_gluon, import_onnx
from qcal.ir.shapes import infer_shapes
from qcal.reference.float_interpreter import run_float


def _randomise_batch_norms(net, seed=0):
    rng = np.random.default_rng(seed)
    draws = {"running_mean": lambda s: rng.normal(0, 0.3, s),
             "running_var": lambda s: rng.uniform(0.3, 2.0, s),
             "gamma": lambda s: rng.uniform(0.5, 1.5, s),
             "beta": lambda s: rng.normal(0, 0.3, s)}
    for name, param in net.collect_params().items():
        for suffix, draw in draws.items():
            if name.endswith(suffix):
                param.set_data(mx.nd.array(draw(param.shape)))


def _random_net(name, shape, classes=None, seed=0):
    mx.random.seed(seed)
    net = resolve_model(name).build_network(classes=classes)
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1,) + shape))
    _randomise_batch_norms(net, seed)
    return net


def _images(shape, n=2, seed=1):
    return np.random.default_rng(seed).standard_normal((n,) + shape).astype(np.float32)


def _assert_matches(ours, reference):
    scale = np.abs(reference).max()
    np.testing.assert_allclose(ours, reference, rtol=1e-4, atol=1e-4 * scale)


MODELS = [  # name, image shape, classes (None: the spec's)
    ("fmnist_resnet20_v1", (1, 32, 32), None),
    ("fmnist_resnet56_v2", (1, 32, 32), None),
    ("fmnist_vgg11_bn", (1, 32, 32), None),
    ("resnet18_v1", (3, 64, 64), 10),
    ("resnet18_v2", (3, 64, 64), 10),
    ("vgg11_bn", (3, 32, 32), 10),
]


@pytest.mark.parametrize("name, shape, classes", MODELS, ids=[m[0] for m in MODELS])
def test_gluon_model_matches_mxnet(name, shape, classes):
    net = _random_net(name, shape, classes)
    graph = import_gluon(net, shape, name)
    x = _images(shape)
    _assert_matches(run_float(graph, x), net(mx.nd.array(x)).asnumpy())
    assert graph.name == name
    assert graph.output.op == "dense"


def test_batch_norm_after_conv_folds_and_preactivation_does_not():
    v1 = import_gluon(_random_net("fmnist_resnet20_v1", (1, 32, 32)), (1, 32, 32))
    assert Counter(n.op for n in v1.nodes)["channel_affine"] == 0
    assert all("bias" in n.params for n in v1.ops_of("conv2d"))
    v2 = import_gluon(_random_net("fmnist_resnet56_v2", (1, 32, 32)), (1, 32, 32))
    ops = Counter(n.op for n in v2.nodes)
    # 27 blocks: the pre-activation BN of each block, one before the pool, one on the input
    assert ops["channel_affine"] == 27 + 1 + 1
    assert ops["conv2d"] == 57
    assert v2.nodes[1].op == "channel_affine" and v2.nodes[1].inputs == (v2.input.name,)


def test_fix_gamma_ignores_the_stored_gamma():
    net = _random_net("fmnist_resnet56_v2", (1, 32, 32))
    graph = import_gluon(net, (1, 32, 32))
    params = {k: v.data().asnumpy() for k, v in net.collect_params().items()}
    first = graph.nodes[1]
    prefix = first.name[:-len("_fwd")]
    assert not np.allclose(params[f"{prefix}_gamma"], 1)  # randomised, yet unused
    expected = 1 / np.sqrt(params[f"{prefix}_running_var"].astype(np.float64) + 1e-5)
    np.testing.assert_allclose(first.params["scale"], expected, rtol=1e-6)


@pytest.fixture(scope="module")
def resnet18_v1():
    net = _random_net("resnet18_v1", (3, 64, 64), 10)
    return net.prefix, import_gluon(net, (3, 64, 64))  # Gluon numbers prefixes: resnetv1N_


def test_layer_names_survive(resnet18_v1):
    p, graph = resnet18_v1
    names = [n.name for n in graph.nodes]
    assert names[:3] == ["data", f"{p}conv0_fwd", f"{p}relu0_fwd"]
    assert names[-2:] == [f"{p}dense0_fwd_flatten", f"{p}dense0_fwd"]


def test_import_is_deterministic():
    net = _random_net("fmnist_resnet20_v1", (1, 32, 32))
    first, again = import_gluon(net, (1, 32, 32)), import_gluon(net, (1, 32, 32))
    assert first.fingerprint() == again.fingerprint()


def test_infer_shapes(resnet18_v1):
    p, graph = resnet18_v1
    shapes = infer_shapes(graph)
    assert shapes["data"] == (3, 64, 64)
    assert shapes[f"{p}conv0_fwd"] == (64, 32, 32)
    assert shapes[f"{p}pool0_fwd"] == (64, 16, 16)
    assert shapes[f"{p}dense0_fwd_flatten"] == (512,)
    assert shapes[f"{p}dense0_fwd"] == (10,)


class _Relu6(nn.HybridBlock):
    def hybrid_forward(self, F, x):
        return F.clip(x, 0, 6)


def _op_zoo_net():
    """Conv variants, both pooling conventions, relu6, global max pool, dropout, dense."""
    net = nn.HybridSequential()
    net.add(nn.Conv2D(8, 3, strides=2, padding=1, use_bias=True),
            nn.BatchNorm(), _Relu6(),
            nn.Conv2D(8, 3, padding=2, dilation=2, groups=4, use_bias=False),
            nn.MaxPool2D(3, 2, ceil_mode=True),                      # 8x8 -> 4x4 (ceil)
            nn.AvgPool2D(2, 1, padding=1, count_include_pad=False),  # 4x4 -> 5x5
            nn.AvgPool2D(2, 2, ceil_mode=True),                      # 5x5 -> 3x3 (ceil, no pad)
            nn.Activation("relu"),
            nn.Conv2D(16, 1),
            nn.GlobalMaxPool2D(),
            nn.Dropout(0.5),
            nn.Dense(5))
    net.initialize(mx.init.Xavier())
    net(mx.nd.zeros((1, 3, 15, 15)))
    _randomise_batch_norms(net)
    return net


def test_op_variants_match_mxnet():
    net = _op_zoo_net()
    graph = import_gluon(net, (3, 15, 15), "zoo")
    x = _images((3, 15, 15), n=3)
    _assert_matches(run_float(graph, x), net(mx.nd.array(x)).asnumpy())
    ops = [n.op for n in graph.nodes]
    assert ops == ["input", "conv2d", "clip", "conv2d", "max_pool2d", "avg_pool2d",
                   "avg_pool2d", "relu", "conv2d", "max_pool2d", "flatten", "dense"]
    shapes = infer_shapes(graph)
    assert [shapes[n.name] for n in graph.nodes[4:7]] == [(8, 4, 4), (8, 5, 5), (8, 3, 3)]


def test_average_pool_in_ceil_mode_with_counted_padding_is_refused():
    net = nn.HybridSequential()
    net.add(nn.AvgPool2D(2, 2, padding=1, ceil_mode=True, count_include_pad=True))
    net.initialize()
    with pytest.raises(QcalError, match=r"layer '\w*pool\d+_fwd': average pooling in ceil"):
        import_gluon(net, (1, 7, 7))
    # on 6 x 6 the ceil mode adds no window: nothing to refuse
    x = _images((1, 6, 6))
    _assert_matches(run_float(import_gluon(net, (1, 6, 6)), x), net(mx.nd.array(x)).asnumpy())


def test_unknown_op_is_refused_with_its_layer():
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3), nn.Activation("sigmoid"))
    net.initialize()
    refusal = r"layer '\w*sigmoid\d+_fwd' \(MXNet op Activation\): activation 'sigmoid' is not"
    with pytest.raises(QcalError, match=refusal):
        import_gluon(net, (1, 8, 8))
    net = nn.HybridSequential()
    net.add(nn.Conv2D(4, 3), nn.LeakyReLU(0.1))
    net.initialize()
    with pytest.raises(QcalError, match="MXNet op 'LeakyReLU' is not one qcal can quantize"):
        import_gluon(net, (1, 8, 8))


# --- ONNX -----------------------------------------------------------------------------------------

def _export_onnx(net, shape, tmp_path):
    prefix = str(tmp_path / "net")
    net.hybridize()
    net(mx.nd.zeros((1,) + shape))
    net.export(prefix)
    return mx.onnx.export_model(f"{prefix}-symbol.json", f"{prefix}-0000.params",
                                [(1,) + shape], np.float32, str(tmp_path / "net.onnx"))


@pytest.mark.parametrize("name, shape, classes", [MODELS[0], MODELS[4]],
                         ids=["fmnist_resnet20_v1", "resnet18_v2"])
def test_onnx_export_of_gluon_matches_mxnet(name, shape, classes, tmp_path):
    net = _random_net(name, shape, classes)
    # mxnet.onnx writes the stored gamma of a fix_gamma BatchNorm (trained ones hold 1.0)
    for pname, param in net.collect_params().items():
        if pname.endswith("batchnorm0_gamma") and "stage" not in pname:
            param.set_data(mx.nd.ones(param.shape))
    graph = import_onnx(_export_onnx(net, shape, tmp_path))
    x = _images(shape)
    _assert_matches(run_float(graph, x), net(mx.nd.array(x)).asnumpy())
    assert graph.name == "net"
    gluon_graph = import_gluon(net, shape)
    assert Counter(n.op for n in graph.nodes) == Counter(n.op for n in gluon_graph.nodes)


def _const(name, array):
    return numpy_helper.from_array(np.asarray(array), name)


def _hand_built_onnx(path, rng):
    """A graph using every ONNX form the importer takes:

    x(1x3x9x9) -Conv(asym pads, stride 2, dilation, group 3)- BN - Clip(0,6 as inputs)
      - MaxPool(ceil) - AveragePool(pads, count_include_pad=0) - Add(per-channel const)
      - Mul(per-channel const) - Relu --+-- Add --- GlobalAveragePool - Reshape(0,-1)
                                        |    |      - MatMul - Add(bias) - Identity - Gemm(transB)
                          Conv 1x1 -----+    |
                                        '----'
    """
    w = rng.standard_normal((6, 1, 3, 3)).astype(np.float32)
    nodes = [
        helper.make_node("Conv", ["x", "w", "b"], ["c1"], name="conv1", pads=[1, 0, 2, 1],
                         strides=[2, 2], dilations=[1, 2], group=3),
        helper.make_node("BatchNormalization", ["c1", "g", "beta", "mean", "var"], ["bn1"],
                         name="bn1", epsilon=1e-3),
        helper.make_node("Clip", ["bn1", "lo", "hi"], ["clip1"], name="clip1"),
        helper.make_node("MaxPool", ["clip1"], ["mp"], name="mp", kernel_shape=[2, 2],
                         strides=[2, 2], ceil_mode=1),
        helper.make_node("AveragePool", ["mp"], ["ap"], kernel_shape=[2, 2], pads=[1, 1, 1, 1],
                         count_include_pad=0),
        helper.make_node("Add", ["ap", "shift"], ["sh"], name="shift_add"),
        helper.make_node("Mul", ["scale", "sh"], ["sc"], name="scale_mul"),
        helper.make_node("Relu", ["sc"], ["r"], name="relu"),
        helper.make_node("Conv", ["r", "w2"], ["c2"], name="conv2"),
        helper.make_node("Add", ["r", "c2"], ["res"], name="residual"),
        helper.make_node("GlobalAveragePool", ["res"], ["gap"], name="gap"),
        helper.make_node("Reshape", ["gap", "flat"], ["fl"], name="flat"),
        helper.make_node("MatMul", ["fl", "mm_w"], ["mm"], name="mm"),
        helper.make_node("Add", ["mm", "mm_b"], ["mmb"], name="mm_bias"),
        helper.make_node("Identity", ["mmb"], ["id"], name="id"),
        helper.make_node("Gemm", ["id", "fc_w", "fc_b"], ["y"], name="fc", transB=1,
                         alpha=0.5, beta=2.0),
    ]
    inits = [_const("w", w), _const("b", rng.standard_normal(6).astype(np.float32)),
             _const("g", rng.uniform(0.5, 1.5, 6).astype(np.float32)),
             _const("beta", rng.normal(0, 0.3, 6).astype(np.float32)),
             _const("mean", rng.normal(0, 0.3, 6).astype(np.float32)),
             _const("var", rng.uniform(0.3, 2, 6).astype(np.float32)),
             _const("lo", np.float32(0)), _const("hi", np.float32(6)),
             _const("shift", rng.normal(0, 1, (1, 6, 1, 1)).astype(np.float32)),
             _const("scale", rng.uniform(0.5, 2, (6, 1, 1)).astype(np.float32)),
             _const("w2", rng.standard_normal((6, 6, 1, 1)).astype(np.float32)),
             _const("flat", np.array([0, -1], dtype=np.int64)),
             _const("mm_w", rng.standard_normal((6, 7)).astype(np.float32)),
             _const("mm_b", rng.standard_normal(7).astype(np.float32)),
             _const("fc_w", rng.standard_normal((4, 7)).astype(np.float32)),
             _const("fc_b", rng.standard_normal(4).astype(np.float32))]
    graph = helper.make_graph(
        nodes, "hand", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 9, 9])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4])], inits)
    # opset 15: onnx 1.15's reference evaluator runs opset-9..13 BatchNormalization with batch
    # statistics (it fills in the momentum default), which is not ONNX's inference semantics
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 15)])
    onnx.checker.check_model(model)
    onnx.save(model, str(path))
    return model


def test_hand_built_onnx_matches_onnx_reference(tmp_path):
    from onnx.reference import ReferenceEvaluator

    rng = np.random.default_rng(5)
    model = _hand_built_onnx(tmp_path / "hand.onnx", rng)
    graph = import_onnx(tmp_path / "hand.onnx")
    x = _images((3, 9, 9), n=2)
    _assert_matches(run_float(graph, x), ReferenceEvaluator(model).run(None, {"x": x})[0])
    ops = [n.op for n in graph.nodes]
    # BN folds into conv1; MatMul+Add becomes one dense; Add/Mul by constants after a pool
    # cannot fold, so they become channel_affine nodes
    assert ops == ["input", "conv2d", "clip", "max_pool2d", "avg_pool2d", "channel_affine",
                   "channel_affine", "relu", "conv2d", "add", "global_avg_pool2d", "flatten",
                   "dense", "dense"]
    assert graph.node("mm").params["bias"].shape == (7,)


def _one_node_onnx(path, node, inits=()):
    graph = helper.make_graph(
        [node], "one", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 8, 8])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], list(inits))
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), str(path))
    return path


def test_onnx_auto_pad_is_refused(tmp_path):
    w = _const("w", np.ones((4, 3, 3, 3), np.float32))
    path = _one_node_onnx(tmp_path / "m.onnx", helper.make_node(
        "Conv", ["x", "w"], ["y"], name="c", auto_pad="SAME_UPPER"), [w])
    with pytest.raises(QcalError, match="layer 'c' \\(ONNX op Conv\\): auto_pad=SAME_UPPER"):
        import_onnx(path)


def test_onnx_unknown_op_is_refused(tmp_path):
    path = _one_node_onnx(tmp_path / "m.onnx",
                          helper.make_node("Sigmoid", ["x"], ["y"], name="act"))
    with pytest.raises(QcalError, match="layer 'act': ONNX op 'Sigmoid' is not one qcal"):
        import_onnx(path)


def test_unreadable_onnx_file(tmp_path):
    bad = tmp_path / "bad.onnx"
    bad.write_bytes(b"not a model")
    with pytest.raises(QcalError, match="cannot read ONNX model"):
        import_onnx(bad)
    assert not os.path.exists(tmp_path / "missing.onnx")
    with pytest.raises(QcalError, match="missing.onnx"):
        import_onnx(tmp_path / "missing.onnx")


EFFICIENTNET = str(REPO_ROOT / "weights" / "efficientnet-lite0")


@pytest.mark.skipif(not os.path.exists(os.path.join(EFFICIENTNET, "efficientnet_lite0.onnx")),
                    reason="EfficientNet-Lite0 ONNX file not present")
def test_efficientnet_lite0_onnx_matches_pytorch():
    graph = import_onnx(os.path.join(EFFICIENTNET, "efficientnet_lite0.onnx"))
    reference = np.load(os.path.join(EFFICIENTNET, "pytorch_reference.npz"))
    x = ((reference["pixels_nhwc_rgb"].astype(np.float32) - 127) / 128).transpose(0, 3, 1, 2)
    _assert_matches(run_float(graph, x), reference["logits"])
    ops = Counter(n.op for n in graph.nodes)
    assert ops["conv2d"] == 49 and ops["clip"] == 33  # depthwise convs, ReLU6 as Clip(0, 6)
