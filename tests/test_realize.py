"""Annotate and realize: scales, rescale plans, bias alignment, overflow proofs, counts.

The small float graphs built here (ResNet v1 / v2 / VGG shapes, an every-op graph) are reused by
tests/test_int_reference.py and tests/test_compile.py.
"""
from __future__ import annotations

import numpy as np
import pytest

from qcal.annotate import annotate
from qcal.config import QuantOptions
from qcal.errors import QcalError, UsageProblem
from qcal.graph import Graph, Node
from qcal.int_reference import run_integer, run_simulated
from qcal.realize import (INT32_MAX, bias_scale, ceil_log2, qgraph_from_float, quantize_weight,
                          realize, rescale_plan, scale_for_amax)


# --------------------------------------------------------------------------------------------
# Tiny float graphs with random float32 weights.
# --------------------------------------------------------------------------------------------

class GraphMaker:
    def __init__(self, shape, seed=0, name="g"):
        self.rng = np.random.RandomState(seed)
        self.nodes = [Node("data", "input", attrs={"shape": tuple(shape)})]
        self.channels = {"data": shape[0]}
        self.name = name

    def _add(self, op, inputs, attrs=None, params=None, channels=None):
        name = f"{op}{len(self.nodes)}"
        self.nodes.append(Node(name, op, tuple(inputs), attrs or {}, params or {}))
        self.channels[name] = channels if channels is not None else self.channels[inputs[0]]
        return name

    def conv(self, x, out, k=3, s=1, p=None, groups=1, bias=True, bias_std=0.1):
        cin = self.channels[x] // groups
        p = k // 2 if p is None else p
        params = {"weight": (self.rng.randn(out, cin, k, k) / np.sqrt(cin * k * k)).astype(np.float32)}
        if bias:
            params["bias"] = (self.rng.randn(out) * bias_std).astype(np.float32)
        return self._add("conv2d", [x], {"strides": (s, s), "padding": (p, p, p, p),
                                         "dilation": (1, 1), "groups": groups}, params, out)

    def affine(self, x):
        c = self.channels[x]
        return self._add("channel_affine", [x], {}, {
            "scale": (0.5 + self.rng.rand(c)).astype(np.float32),
            "shift": (self.rng.randn(c) * 0.2).astype(np.float32)})

    def relu(self, x):
        return self._add("relu", [x])

    def clip(self, x, lo=0.0, hi=6.0):
        return self._add("clip", [x], {"a_min": lo, "a_max": hi})

    def maxpool(self, x, k=2, s=2, p=0):
        return self._add("max_pool2d", [x], {"pool_size": (k, k), "strides": (s, s),
                                             "padding": (p, p, p, p)})

    def avgpool(self, x, k=2, s=2, p=0, count_include_pad=True):
        return self._add("avg_pool2d", [x], {"pool_size": (k, k), "strides": (s, s),
                                             "padding": (p, p, p, p),
                                             "count_include_pad": count_include_pad})

    def gap(self, x):
        return self._add("global_avg_pool2d", [x])

    def flatten(self, x, spatial=1):
        name = self._add("flatten", [x])
        self.channels[name] = self.channels[x] * spatial
        return name

    def dense(self, x, out, bias=True):
        cin = self.channels[x]
        params = {"weight": (self.rng.randn(out, cin) / np.sqrt(cin)).astype(np.float32)}
        if bias:
            params["bias"] = (self.rng.randn(out) * 0.1).astype(np.float32)
        return self._add("dense", [x], {}, params, out)

    def add(self, a, b):
        return self._add("add", [a, b])

    def graph(self) -> Graph:
        return Graph(self.nodes, self.name)


def resnet_v1(seed=0, width=8, size=16, classes=10) -> Graph:
    """conv-relu-maxpool stem, two basic blocks (identity, then strided with a 1x1 projection)."""
    g = GraphMaker((3, size, size), seed, "resnet_v1")
    x = g.maxpool(g.relu(g.conv("data", width)), 3, 2, 1)
    for stage, w in enumerate((width, 2 * width)):
        s = 1 if stage == 0 else 2
        y = g.conv(g.relu(g.conv(x, w, s=s)), w)
        shortcut = x if s == 1 else g.conv(x, w, k=1, s=s, p=0)
        x = g.relu(g.add(y, shortcut))
    return _head(g, x, classes)


def resnet_v2(seed=0, width=8, size=16, classes=10) -> Graph:
    """Input BN, pre-activation blocks (BN-ReLU as channel_affine + relu), final BN-ReLU."""
    g = GraphMaker((3, size, size), seed, "resnet_v2")
    x = g.conv(g.affine("data"), width, bias=False)
    for stage, w in enumerate((width, 2 * width)):
        s = 1 if stage == 0 else 2
        pre = g.relu(g.affine(x))
        y = g.conv(g.relu(g.conv(pre, w, s=s)), w, bias=False)
        shortcut = x if s == 1 else g.conv(pre, w, k=1, s=s, p=0, bias=False)
        x = g.add(y, shortcut)
    return _head(g, g.relu(g.affine(x)), classes)


def vgg(seed=0, width=8, size=16, classes=10) -> Graph:
    g = GraphMaker((3, size, size), seed, "vgg")
    x = "data"
    for w in (width, 2 * width, 2 * width):
        x = g.maxpool(g.relu(g.conv(x, w)))
    x = g.relu(g.dense(g.flatten(x, (size // 8) ** 2), 32))
    g.dense(x, classes)
    return g.graph()


def _head(g, x, classes):
    g.dense(g.flatten(g.gap(x)), classes)
    return g.graph()


def every_op(seed=0) -> Graph:
    """Each op kind at least once: conv 1x1 / 3x3 / strided / grouped / depthwise, relu, relu6,
    residual add, max/avg (both divisor kinds)/global pooling, channel_affine, flatten, dense."""
    g = GraphMaker((4, 8, 8), seed, "every_op")
    r1 = g.relu(g.conv("data", 8))
    c2 = g.conv(r1, 8, k=1, p=0)
    g.conv(r1, 8, k=3, s=2)
    c4 = g.conv(r1, 8, groups=2)
    g.conv(r1, 8, groups=8, bias=False)
    relu6 = g.clip(c2, 0.0, 6.0)
    mp = g.maxpool(g.add(c4, r1), 3, 2, 1)
    ap = g.avgpool(relu6, 3, 2, 1, count_include_pad=False)
    g.avgpool(relu6, 2, 2, 0)
    a2 = g.add(g.relu(g.affine(mp)), ap)
    return _head(g, a2, 10)


MODELS = {"resnet_v1": resnet_v1, "resnet_v2": resnet_v2, "vgg": vgg}


def float_values(graph: Graph, x) -> dict:
    return run_integer(qgraph_from_float(graph), x, keep="all")


def calibrate_amax(graph: Graph, x, method="power2") -> dict:
    """Per-tensor abs-max over ``x`` (rounded up to a power of two for 'power2')."""
    amax = {k: float(np.abs(v).max()) for k, v in float_values(graph, x).items()}
    if method == "power2":
        amax = {k: float(2.0 ** np.ceil(np.log2(v))) if v > 0 else 0.0 for k, v in amax.items()}
    return amax


def images(n, shape, seed=1, std=1.0):
    return (np.random.RandomState(seed).randn(n, *shape) * std).astype(np.float32)


OPTION_SETS = {
    "power2-b16": QuantOptions(),
    "power2-b8": QuantOptions(bias_bits=8),
    "power2-b9-channel": QuantOptions(bias_bits=9, weight_granularity="channel"),
    "power2-b32": QuantOptions(bias_bits=32),
    "max-int32acc-channel": QuantOptions(activation_method="max", weight_scale="max",
                                         weight_granularity="channel", bias_mode="int32-acc"),
    "max-b16": QuantOptions(activation_method="max", weight_scale="max", bias_bits=16),
}


def realized(graph, options, calib):
    method = "power2" if options.activation_method == "power2" else "max"
    return realize(graph, calibrate_amax(graph, calib, method), options)


# --------------------------------------------------------------------------------------------
# Scales and rescale plans (pure functions, known answers).
# --------------------------------------------------------------------------------------------

class TestScales:
    def test_power_of_two_amax_gives_power_of_two_scale(self):
        assert scale_for_amax(4.0) == 4.0 / 128
        assert scale_for_amax(0.25) == 2.0 ** -9

    def test_other_amax_uses_the_full_symmetric_range(self):
        assert scale_for_amax(3.0) == pytest.approx(3.0 / 127, rel=0, abs=0)

    def test_zero_range_gets_a_usable_scale(self):
        assert scale_for_amax(0.0) == 1.0 / 128

    def test_ceil_log2_is_exact(self):
        assert list(ceil_log2([1.0, 2.0, 3.0, 4.0, 0.5, 0.3, 2.0 ** -20])) == [0, 1, 2, 2, -1, -1, -20]

    def test_bias_scale_is_its_own_power_of_two(self):
        bias = np.array([0.3, -0.1])
        assert bias_scale(bias, 8) == 0.5 / 128
        assert bias_scale(bias, 16) == 0.5 / 2 ** 15
        assert bias_scale(np.zeros(3), 8) == 1.0

    def test_weights_per_tensor_and_per_channel(self):
        w = np.array([[[[0.5]], [[-0.25]]], [[[0.01]], [[0.02]]]], dtype=np.float32)  # (2, 2, 1, 1)
        q, s = quantize_weight(w, "max", "tensor")
        assert s.shape == () and s == 0.5 / 128  # 0.5 is a power of two: 1/128 exactly
        # the power-of-2 amax itself maps to 128 and clips to 127 (one LSB), as in Relay
        assert q.dtype == np.int8 and q[0, 0, 0, 0] == 127 and q[0, 1, 0, 0] == -64
        assert q[1, 1, 0, 0] == 5  # 0.02 * 256 = 5.12
        q, s = quantize_weight(w, "max", "channel")
        assert s.shape == (2,) and s[1] == pytest.approx(0.02 / 127)
        assert q[1, 1, 0, 0] == 127 and q[1, 0, 0, 0] == 64  # 63.5 rounds to 64
        q, s = quantize_weight(w, "power2", "channel")
        assert list(s) == [0.5 / 128, 2.0 ** -5 / 128]


class TestRescalePlan:
    values = np.arange(-1000, 1001, dtype=np.int64)

    def _apply(self, plan, v):
        from qcal.int_reference import rounding_right_shift

        if plan.kind == "shift":
            return rounding_right_shift(np.left_shift(v, plan.lshift), plan.rshift)
        return rounding_right_shift(v * plan.multiplier, plan.rshift)

    @pytest.mark.parametrize("log2", [-7, -1, 0, 3])
    def test_powers_of_two_are_exact_shifts(self, log2):
        plan = rescale_plan(2.0 ** log2, 1000)
        assert plan.kind == "shift" and plan.compute == "int32"
        exact = np.floor(self.values * 2.0 ** log2 + 0.5)  # round half up
        assert np.array_equal(self._apply(plan, self.values), exact)

    @pytest.mark.parametrize("ratio", [0.3, 1 / 3, 0.9999, 1.7, 37.5])
    def test_other_ratios_use_a_fixed_point_multiplier(self, ratio):
        plan = rescale_plan(ratio, 1000)
        assert plan.kind == "multiply" and plan.compute == "int64"
        assert 2 ** 30 <= int(plan.multiplier) < 2 ** 31
        got = self._apply(plan, self.values)
        assert np.abs(got - self.values * ratio).max() <= 0.5 + 1e-6
        assert int(plan.out_bound) >= np.abs(got).max()

    def test_shift_needing_more_than_int32_computes_in_int64(self):
        assert rescale_plan(2.0 ** 4, 2 ** 28).compute == "int64"
        assert rescale_plan(2.0 ** -40, 100).compute == "int64"


# --------------------------------------------------------------------------------------------
# Annotate: decisions and counts.
# --------------------------------------------------------------------------------------------

class TestAnnotate:
    def test_resnet_v1_counts(self):
        # data -q-> conv1 -> relu -> maxpool -rq-> [block1: conv(rq relu) conv add relu -rq->]
        # [block2: conv(rq relu) conv, 1x1 conv, add, relu] -> gap -> flatten -rq-> dense -dq->
        a = annotate(resnet_v1(), QuantOptions())
        assert a.counts()["quantize"] == 1
        assert a.counts()["requantize"] == 5
        assert a.counts()["dequantize"] == 1
        assert a.counts()["float_ops"] == 0

    def test_skip_k_conv_keeps_the_first_convs_float(self):
        g = resnet_v1()
        a = annotate(g, QuantOptions(skip_k_conv=2))
        convs = [n.name for n in g.nodes if n.op == "conv2d"]
        assert not a.is_integer(convs[0]) and not a.is_integer(convs[1])
        assert a.is_integer(convs[2])
        # block 1's second conv reads a float relu: quantized from float, not requantized
        assert g.node(convs[2]).inputs[0] in a.quantize_points

    def test_skip_dense_keeps_the_classifier_float(self):
        g = vgg()
        a = annotate(g, QuantOptions(skip_dense=True))
        dense = [n.name for n in g.nodes if n.op == "dense"]
        assert not any(a.is_integer(d) for d in dense)
        assert a.counts()["dequantize"] == 1  # the last pooled feature map, once

    def test_pre_activation_bn_on_the_float_input_stays_float(self):
        g = resnet_v2()
        a = annotate(g, QuantOptions())
        affines = [n.name for n in g.nodes if n.op == "channel_affine"]
        assert not a.is_integer(affines[0])
        assert all(a.is_integer(name) for name in affines[1:])


class TestResidualQuantizedOnce:
    def test_one_int8_value_serves_both_branches(self):
        g = resnet_v1()
        q = realize(g, calibrate_amax(g, images(4, (3, 16, 16))), QuantOptions())
        block_in = "max_pool2d3"  # stem output: feeds block 1's conv and its residual add
        requants = [n for n in q.nodes if n.inputs == (block_in,) and n.op == "requantize"]
        assert len(requants) == 1 and requants[0].dtype == "int8"
        readers = [n.name for n in q.nodes if requants[0].name in n.inputs]
        assert len(readers) == 2  # the conv, and the add's alignment


# --------------------------------------------------------------------------------------------
# Bias modes and overflow.
# --------------------------------------------------------------------------------------------

def _single_conv(bias_value, k=3, cin=4, seed=0, weight_std=1.0):
    g = GraphMaker((cin, 6, 6), seed, "one_conv")
    g.conv("data", 2, k=k)
    node = g.nodes[-1]
    node.params["weight"] = (g.rng.randn(*node.params["weight"].shape) * weight_std).astype(np.float32)
    node.params["bias"] = np.asarray(bias_value, dtype=np.float32)
    return g.graph()


class TestBias:
    amax = {"data": 4.0}

    def test_int32_acc_bias_is_rint_of_bias_over_accumulator_scale(self):
        g = _single_conv([0.3, -0.7])
        q = realize(g, self.amax, QuantOptions(bias_mode="int32-acc", weight_scale="max"))
        add = q.node("conv2d1")
        acc = q.node("conv2d1:acc")
        assert add.op == "bias_add" and acc.op == "qconv2d"
        assert np.array_equal(add.params["bias"], np.rint(np.array([0.3, -0.7]) / acc.scale))
        assert np.array_equal(add.scale, acc.scale)

    def test_finer_bias_scale_wins_and_the_accumulator_is_shifted_left(self):
        g = _single_conv([0.3, -0.7])
        q = realize(g, self.amax, QuantOptions(bias_bits=16))
        acc, shift, add = q.node("conv2d1:acc"), q.node("conv2d1:align"), q.node("conv2d1")
        s_b = bias_scale(np.array([0.3, -0.7]), 16)
        assert s_b < acc.scale
        assert int(shift.params["lshift"]) == int(np.log2(acc.scale / s_b))
        assert add.scale == s_b
        assert np.array_equal(add.params["bias"], np.rint(np.array([0.3, -0.7]) / s_b))

    def test_coarser_bias_is_shifted_left_offline(self):
        g = _single_conv([0.3, -0.7])
        q = realize(g, self.amax, QuantOptions(bias_bits=2))  # s_b = 0.5: coarser than the acc
        names = [n.name for n in q.nodes]
        assert "conv2d1:align" not in names
        acc, add = q.node("conv2d1:acc"), q.node("conv2d1")
        b_q = np.clip(np.rint(np.array([0.3, -0.7]) / 0.5), -1, 1)
        assert np.array_equal(add.params["bias"], b_q * (0.5 / acc.scale))

    def test_32_bit_bias_that_would_overflow_is_realigned_and_reported(self):
        # The thread: "32 bits will make lhs overflow after left shift".
        g = _single_conv([0.3, -0.7], cin=16)
        q = realize(g, self.amax, QuantOptions(bias_bits=32))
        assert q.adjustments, "the overflowing alignment must be reported"
        text = str(q.adjustments[0])
        assert text.startswith("conv2d1: bias alignment") and "requested <<" in text
        add = q.node("conv2d1")
        assert int(np.max(add.bound)) <= INT32_MAX
        # worst case inputs (every int8 at +-127 with the weights' signs) stay inside int32
        w = g.node("conv2d1").params["weight"]
        x = np.sign(w[0:1]).repeat(1, axis=0) * 100.0
        x = np.pad(x, ((0, 0), (0, 0), (1, 2), (1, 2)))[:, :, :6, :6].astype(np.float32)
        run_integer(q, x)  # raises on any value outside its proven bound

    def test_huge_int32_acc_bias_shifts_the_accumulator_right(self):
        g = _single_conv([3.0e6, -1.0])
        q = realize(g, self.amax, QuantOptions(bias_mode="int32-acc"))
        assert q.adjustments and ">>" in q.adjustments[0].applied
        out = run_integer(q, images(2, (4, 6, 6)))
        assert np.allclose(out[:, 0], 3.0e6, rtol=1e-3)

    @pytest.mark.parametrize("bits", [1, 33, 0])
    def test_bias_bits_out_of_range_are_refused(self, bits):
        with pytest.raises(UsageProblem, match="bias_bits must be an integer from 2 to 32"):
            QuantOptions(bias_bits=bits)


class TestRefusals:
    def test_missing_range_names_the_tensor(self):
        g = resnet_v1()
        with pytest.raises(QcalError, match="no calibrated range for tensor 'data'"):
            realize(g, {}, QuantOptions())

    def test_required_amax_lists_exactly_what_realize_reads(self):
        g = resnet_v2()
        a = annotate(g, QuantOptions())
        full = calibrate_amax(g, images(4, (3, 16, 16)))
        realize(g, {k: full[k] for k in a.required_amax}, QuantOptions(), a)


# --------------------------------------------------------------------------------------------
# Whole graphs: proven bounds hold; simulated and integer models agree on top-1.
# --------------------------------------------------------------------------------------------

@pytest.mark.parametrize("model", sorted(MODELS))
@pytest.mark.parametrize("options", sorted(OPTION_SETS))
def test_simulated_and_integer_models_agree_on_top1(model, options):
    graph = MODELS[model]()
    calib, test = images(16, (3, 16, 16), seed=1), images(48, (3, 16, 16), seed=2, std=1.3)
    q = realized(graph, OPTION_SETS[options], calib)
    integer = run_integer(q, test)  # also checks every value against its proven bound
    simulated = run_simulated(q, test)
    assert np.array_equal(integer.argmax(axis=1), simulated.argmax(axis=1))
    assert np.abs(integer - simulated).max() < 0.05 * np.abs(simulated).max()


def test_saturating_inputs_stay_within_proven_bounds():
    for build in MODELS.values():
        graph = build()
        q = realized(graph, OPTION_SETS["power2-b32"], images(4, (3, 16, 16)))
        run_integer(q, images(8, (3, 16, 16), seed=3, std=50.0))


def test_integer_model_tracks_the_float_model():
    graph = resnet_v1()
    calib, test = images(32, (3, 16, 16), seed=1), images(64, (3, 16, 16), seed=2)
    q = realized(graph, OPTION_SETS["max-int32acc-channel"], calib)
    ref = float_values(graph, test)[graph.output.name]
    out = run_integer(q, test)
    assert (out.argmax(1) == ref.argmax(1)).mean() >= 0.9
