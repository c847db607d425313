"""Property tests: every schedule rule, the int16-pair and the VNNI conv, on random shapes, bit for bit.

Each example is a small graph of the kind qcal compiles -- a ``QGraph`` (int8) or a float ``Graph``
built here with random weights -- emitted by ``qcal.backend.tvm.emit.emit_relax`` and compiled by
``qcal.backend.tvm.schedules`` three ways: unscheduled (TVM's stock lowering of the same fused
PrimFuncs), scheduled, and for int8 convs scheduled without the int16-pair rewrite (so the s_tir
conv schedule sees them too). Integer results must equal each other and the numpy reference
(``qcal.reference.int_interpreter.run_integer``) bit for bit.

Float32: scheduled and unscheduled TVM must be equal bit for bit (the schedules keep each output's
reduction order), except after a ``channel_affine``: inlined into the conv's epilogue,
``x * scale + shift`` becomes one fused multiply-add (LLVM contracts it; one rounding instead of
two), so there the two are held to float32 rounding. The numpy reference sums through BLAS in
another order, so it is held to a tolerance scaled by sum |x||w| (the same graph on |x|, |w|).

Each example also asserts which rule scheduled each conv, dense or pool PrimFunc, predicted from the
rule's documented domain (VNNI where the target has it: groups 1, any out channel count, padded
to whole vectors; else int16 pairs: groups 1 and out channels a multiple of the vector lanes;
s_tir conv: out channels per group a multiple of 4; depthwise: int8 with one in and out channel
per group, as ``depthwise_vnni`` (``qcal.backend.tvm.depthwise``) where the target has AVX-512
VNNI and VBMI and one load holds a row's windows, else the s_tir rule), so a rule that silently
declines fails the test, and the strategies are weighted so that most examples fall in some rule's
domain. ``--hypothesis-show-statistics`` prints how often
each rule ran.

On a host without VNNI, the VNNI conv runs with ``vpdpbusd`` emulated (tests/backend/vnni_emulation.py):
in the groups-1 int8 conv property beside the host's own int16-pair conv (a drawn choice), and in
the chains of convs throughout.

Budget: the hypothesis profile (``tests/conftest.py``): ``ci`` by default, a fixed number of
derandomized examples per test; ``QCAL_HYPOTHESIS_PROFILE=long`` for many more, by hand.
"""
from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from hypothesis import assume, event, example, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402
from tvm import relax  # noqa: E402

from qcal.backend.tvm import depthwise, emit, schedules, vnni  # noqa: E402
from qcal.config import ROUNDINGS  # noqa: E402
from qcal.ir.graph import Graph, Node  # noqa: E402
from qcal.ir.qgraph import QGraph, QNode  # noqa: E402
from qcal.quant.fixed_point import rescale_plan  # noqa: E402
from qcal.quant.realize import qgraph_from_float  # noqa: E402
from qcal.reference.int_interpreter import run_integer  # noqa: E402
from qcal.reference.kernels import pool_sum_and_count  # noqa: E402
from tests.backend.vnni_emulation import (EMULATED_LANES, assert_vnni_kernel, avx_vnni_target,  # noqa: E402
                                          vnni_kernels)

TARGET = schedules.cpu_target()
# CPUs older than the host run on it too: on an AVX-512 host int8 convs are also fuzzed for
# AVX-512 without VNNI (the 16-lane pair conv where the host takes VNNI) and for AVX2 alone
# (8 int32 lanes: the 8-lane pmaddwd, 8-lane conv tiles).
AVX512 = tvm.target.Target({"kind": "llvm", "mcpu": "skylake-avx512"})
AVX2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
INT_TARGETS = ((TARGET, AVX512, AVX2) if schedules.pair_lanes(TARGET) == 16 else (TARGET,))
# without VNNI on the host: the host target's groups-1 int8 convs also drawn as emulated VNNI
EMULATE_VNNI = (False, True) if EMULATED_LANES else (False,)
PRIMES = (2, 3, 5, 7, 11, 13, 17, 19, 23, 29, 31, 37, 41, 43, 47, 53, 59, 61, 67)
# Multiply-accumulates of one example at most: keeps the unscheduled conv and numpy fast.
MAX_MACS = 10_000_000
INPUT_SCALE = 40.0  # quantize's 1/scale: N(0, 1) inputs use most of the int8 range, some clip


# -- compile and run -----------------------------------------------------------------------------

def _lower_and_run(mod, x, target=TARGET, **options):
    """(output, {PrimFunc name: rule or None}) of ``mod`` lowered by qcal's CPU pipeline."""
    lowered = schedules.lower(mod, target, **options)
    # the pipeline already ran: compile the lowered module as is (what ``schedules.build`` does)
    executable = tvm.compile(lowered, target, relax_pipeline=tvm.transform.Sequential([]))
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()
    rules = schedules.scheduled_functions(lowered)
    if options.get("schedule", True):
        for rule in set(rules.values()):  # --hypothesis-show-statistics: examples per rule
            event(f"rule applied: {rule}")
    return out, {gv.name_hint: rules.get(gv.name_hint) for gv, f in lowered.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc)}


def _rules_of(functions: dict, word: str) -> Counter:
    return Counter(rule for name, rule in functions.items() if word in name)


def _check_int(graph: QGraph, x, pair_path: bool, target=TARGET):
    """Scheduled (with and, where it applies, without the pair rewrite) == unscheduled == numpy;
    returns the PrimFunc -> rule map of each scheduled build."""
    out_node = graph.output
    mod = emit.emit_relax(graph, x.shape[0], outputs=[out_node.name])
    reference = run_integer(graph, x, keep="all")[out_node.name]
    unscheduled, _ = _lower_and_run(mod, x, target, schedule=False)
    assert unscheduled.dtype == np.dtype(out_node.dtype)
    assert np.array_equal(unscheduled.astype(np.int64), reference), "stock lowering != numpy"
    builds = {"pairs": _lower_and_run(mod, x, target)}
    if pair_path:
        builds["s_tir"] = _lower_and_run(mod, x, target, pair_convs=False)
    for path, (out, _) in builds.items():
        diff = np.abs(out.astype(np.int64) - reference)
        assert diff.max(initial=0) == 0, (f"{path} schedule differs from numpy at "
                                          f"{int(np.count_nonzero(diff))} of {diff.size} values, "
                                          f"by up to {int(diff.max())}")
    return {path: functions for path, (_, functions) in builds.items()}


def _check_float(graph: Graph, x):
    qgraph = qgraph_from_float(graph)
    mod = emit.emit_relax(qgraph, x.shape[0])
    unscheduled, _ = _lower_and_run(mod, x, schedule=False)
    scheduled, functions = _lower_and_run(mod, x)
    assert scheduled.dtype == np.float32
    magnitude = float(run_integer(_absolute(graph), np.abs(x)).max(initial=0))
    tolerance = magnitude * 1e-5 + 1e-6
    if any(n.op == "channel_affine" for n in graph.nodes):
        # the rules inline x * scale + shift into one expression, which LLVM contracts to a
        # fused multiply-add (one rounding, not two): equal to within float32 rounding only
        np.testing.assert_allclose(scheduled, unscheduled, rtol=0, atol=magnitude * 1e-6)
    else:
        mismatch = scheduled != unscheduled
        assert not mismatch.any(), (f"scheduled float32 differs from unscheduled at "
                                    f"{int(mismatch.sum())} values, by up to "
                                    f"{float(np.abs(scheduled - unscheduled).max())}")
    reference = run_integer(qgraph, x, keep="all")[qgraph.output.name]
    np.testing.assert_allclose(scheduled, reference, rtol=0, atol=tolerance)
    return functions


def _absolute(graph: Graph) -> QGraph:
    """The same graph with |weights|, |params| and no clipping: run on |x| it bounds every
    intermediate's magnitude (the scale of float32 rounding error)."""
    nodes = []
    for n in graph.nodes:
        params = {k: np.abs(v) for k, v in n.params.items()}
        op, attrs = n.op, dict(n.attrs)
        if op == "clip":
            op, attrs = "relu", {}
        nodes.append(Node(n.name, op, n.inputs, attrs, params))
    return qgraph_from_float(Graph(nodes, graph.name))


# -- conv geometry ---------------------------------------------------------------------------------

@dataclass(frozen=True)
class ConvCase:
    batch: int
    channels: int
    height: int
    width: int
    out_channels: int
    kernel: tuple
    strides: tuple
    padding: tuple  # top, left, bottom, right
    groups: int

    @property
    def out_hw(self):
        kh, kw = self.kernel
        t, left, b, r = self.padding
        return ((self.height + t + b - kh) // self.strides[0] + 1,
                (self.width + left + r - kw) // self.strides[1] + 1)

    @property
    def macs(self):
        oh, ow = self.out_hw
        return (self.batch * self.out_channels * oh * ow * (self.channels // self.groups)
                * self.kernel[0] * self.kernel[1])

    @property
    def same_size(self):
        """Pads that sum to kernel - 1 on each axis: the output is ceil(input / stride), the
        geometry of a ResNet block whose shortcut (identity or 1x1 conv) can be added."""
        t, left, b, r = self.padding
        return t + b == self.kernel[0] - 1 and left + r == self.kernel[1] - 1


def _size(low, high=70):
    primes = [p for p in PRIMES if low <= p <= high]
    return st.one_of(st.integers(low, high), st.sampled_from(primes or [low]))


@st.composite
def _extent(draw, kernel, stride, pad_sum):
    """An input height or width: drawn directly (1..70), or made from a drawn output extent (the
    rules tile the output: a prime, or 1, leaves tiles of one pixel)."""
    low = max(1, kernel - pad_sum)
    if draw(st.booleans()):
        return draw(_size(low))
    out = draw(_size(1, (70 - kernel + pad_sum) // stride + 1))  # its input fits in 70
    return max(low, (out - 1) * stride + kernel - pad_sum + draw(st.integers(0, stride - 1)))


@st.composite
def _geometry(draw, same_size):
    kh, kw = draw(st.integers(1, 7)), draw(st.one_of(st.just(None), st.integers(1, 7)))
    kw = kh if kw is None else kw  # square kernels mostly, rectangular too
    sh = draw(st.integers(1, 3))
    sw = draw(st.one_of(st.just(sh), st.integers(1, 3)))
    if same_size:
        t, left = draw(st.integers(0, kh - 1)), draw(st.integers(0, kw - 1))
        b, r = kh - 1 - t, kw - 1 - left
    else:
        t, b = draw(st.integers(0, kh - 1)), draw(st.integers(0, kh - 1))
        left, r = draw(st.integers(0, kw - 1)), draw(st.integers(0, kw - 1))
    h, w = draw(_extent(kh, sh, t + b)), draw(_extent(kw, sw, left + r))
    return (h, w), (kh, kw), (sh, sw), (t, left, b, r)


CHANNELS = (1, 2, 3, 4, 5, 7, 8, 11, 13, 16, 17, 24, 29, 32, 37)
PAIR_OUT = (16, 32, 48)  # multiples of 16: the pair rewrite's domain (AVX-512BW and AVX2)
# multiples of 4 only: the s_tir conv's domain, and VNNI's with padded out channels (24, 40:
# EfficientNet-Lite0's projections)
STIR_OUT = (4, 8, 12, 20, 24, 36, 40)
ODD_OUT = (1, 3, 5, 7, 13, 17, 31)  # VNNI pads these too; without it, the fallback path


@st.composite
def conv_cases(draw, kind, same_size=None):
    """kind: 'dense' (groups 1), 'grouped' or 'depthwise' (one in channel per group, 1-4 out)."""
    same_size = draw(st.booleans()) if same_size is None else same_size
    (h, w), kernel, strides, padding = draw(_geometry(same_size))
    batch = draw(st.sampled_from((1, 1, 2, 3)))
    if kind == "dense":
        c = draw(st.sampled_from(CHANNELS))
        o = draw(st.one_of(st.sampled_from(PAIR_OUT), st.sampled_from(PAIR_OUT),
                           st.sampled_from(STIR_OUT), st.sampled_from(ODD_OUT)))
        groups = 1
    elif kind == "depthwise":
        c = draw(st.sampled_from(CHANNELS[1:] + PRIMES[5:]))  # 1 channel: a groups-1 conv
        groups = c
        o = c * draw(st.sampled_from((1, 1, 1, 2, 4)))
    else:
        groups = draw(st.sampled_from((2, 3, 4, 5)))
        c = groups * draw(st.sampled_from((1, 2, 3, 4, 5, 8)))
        o = groups * draw(st.sampled_from((4, 4, 8, 12, 16, 1, 2, 3, 5)))
    case = ConvCase(batch, c, h, w, o, kernel, strides, padding, groups)
    if case.macs > MAX_MACS:
        case = ConvCase(1, c, h, w, o, kernel, strides, padding, groups)
    assume(case.macs <= MAX_MACS)  # shapes and channel counts decide the schedule: keep both
    return case


def expected_conv_rule(case: ConvCase, dtype: str, pairs: bool, target=TARGET):
    """The rule that must schedule this conv's PrimFunc; None: the rules may decline it."""
    ocg, icg = case.out_channels // case.groups, case.channels // case.groups
    if dtype == "int8" and pairs and case.groups == 1:
        if vnni.vnni_lanes(target):
            return "conv2d_vnni"  # any out channel count: padded to whole vectors
        lanes = schedules.pair_lanes(target)
        if lanes and case.out_channels % lanes == 0:
            return "conv2d_int16_pairs"
    if case.groups > 1 and ocg == 1:
        if (dtype == "int8" and pairs and icg == 1 and depthwise.depthwise_supported(target)
                and depthwise.fits(case.kernel[1], case.strides[1])):
            return "depthwise_vnni"
        return "depthwise_conv2d_nchw" if icg == 1 and dtype != "float32" else None
    return "conv2d_nchw" if ocg % 4 == 0 else None


# -- epilogues ---------------------------------------------------------------------------------

EPILOGUES = st.fixed_dictionaries({
    "bias": st.booleans(),
    "requantize": st.sampled_from(("shift", "multiply", "shift", "multiply", None)),
    "per_channel": st.booleans(),
    "activation": st.sampled_from((None, "relu", "relu6")),
    "residual": st.booleans(),
    "rounding": st.sampled_from(ROUNDINGS),  # of every rounding right shift (qcal.ir.qgraph)
})


class _IntGraph:
    """A QGraph under construction, each node with the proven bound ``run_integer`` checks."""

    def __init__(self, shape, rng):
        self.rng = rng
        self.nodes = [QNode("data", "input", attrs={"shape": shape}, shape=shape)]
        self.add("quantize", "data", shape, "int8", 127, inv_scale=np.float32(INPUT_SCALE))

    def add(self, op, inputs, shape, dtype, bound, attrs=None, **params):
        inputs = (inputs,) if isinstance(inputs, str) else tuple(inputs)
        node = QNode(f"{op}{len(self.nodes)}", op, inputs, attrs or {}, params, dtype, shape,
                     np.float64(1.0), np.asarray(bound, dtype=np.int64))
        self.nodes.append(node)
        return node

    def conv(self, x: QNode, case: ConvCase):
        weight = self.rng.integers(-127, 128, (case.out_channels, case.channels // case.groups)
                                   + case.kernel).astype(np.int8)
        bound = 127 * np.abs(weight.astype(np.int64)).sum(axis=(1, 2, 3))
        attrs = {"strides": case.strides, "padding": case.padding, "dilation": (1, 1),
                 "groups": case.groups}
        return self.add("qconv2d", x.name, (case.out_channels,) + case.out_hw, "int32", bound,
                        attrs, weight=weight)

    def requantize(self, x: QNode, ratio, dtype, rounding=ROUNDINGS[0]):
        plan = rescale_plan(ratio, x.bound)
        params = {"lshift": plan.lshift, "rshift": plan.rshift}
        if plan.kind == "multiply":
            params["multiplier"] = plan.multiplier
        bound = np.minimum(plan.out_bound, 127) if dtype == "int8" else plan.out_bound
        return self.add("requantize", x.name, x.shape, dtype, bound,
                        {"kind": plan.kind, "compute": plan.compute, "rounding": rounding},
                        **params)

    def ratio(self, x: QNode, kind, per_channel, target=40.0):
        """A rescale that maps a typical |x| (a 30th of its bound) to about ``target``: a power
        of two for 'shift', any positive number for 'multiply'; per channel or per tensor."""
        bound = np.broadcast_to(np.maximum(x.bound, 1), (x.shape[0],)).astype(np.float64)
        if not per_channel:
            bound = bound.max(keepdims=True)
        ratio = target * 30.0 / bound * 2.0 ** self.rng.uniform(-1.5, 1.5, bound.shape)
        if kind == "shift":
            ratio = 2.0 ** np.round(np.log2(ratio))
        return ratio if per_channel else ratio.reshape(())

    def epilogue(self, acc: QNode, options, shortcut: QNode | None):
        y = acc
        channels = acc.shape[0]
        if options["bias"]:
            bias = self.rng.integers(-3000, 3000, channels).astype(np.int32)
            y = self.add("bias_add", y.name, y.shape, "int32", y.bound + np.abs(bias), bias=bias)
        if shortcut is not None:
            # realize's align: the int8 or int32 shortcut brought to the accumulator's scale
            s = self.requantize(shortcut, 2.0 ** self.rng.integers(0, 8), "int32",
                                options["rounding"])
            y = self.add("qadd", (y.name, s.name), y.shape, "int32", y.bound + s.bound)
        if options["requantize"]:
            y = self.requantize(y, self.ratio(y, options["requantize"], options["per_channel"]),
                                "int8", options["rounding"])
        if options["activation"] == "relu":
            y = self.add("relu", y.name, y.shape, y.dtype, y.bound)
        elif options["activation"] == "relu6":  # ReLU6's integer form: clip to [0, 6 / scale]
            hi = (self.rng.integers(1, 128, channels) if options["per_channel"]
                  else np.int64(self.rng.integers(1, 128)))
            y = self.add("qclip", y.name, y.shape, y.dtype, np.minimum(y.bound, hi),
                         lo=np.int64(0), hi=np.asarray(hi, dtype=np.int64))
        return y

    def graph(self):
        return QGraph(self.nodes, "fuzz")


def int_conv_graph(case: ConvCase, options, seed):
    g = _IntGraph((case.channels, case.height, case.width), np.random.default_rng(seed))
    x = g.nodes[-1]
    acc = g.conv(x, case)
    shortcut = None
    if options["residual"] and case.same_size:
        if case.channels == case.out_channels and case.strides == (1, 1):
            shortcut = x  # identity
        else:  # projection: a 1x1 conv with the block's stride
            shortcut = g.conv(x, ConvCase(case.batch, case.channels, case.height, case.width,
                                          case.out_channels, (1, 1), case.strides, (0, 0, 0, 0), 1))
    g.epilogue(acc, options, shortcut)
    return g.graph(), shortcut is not None and shortcut is not x


def _inputs(case, seed):
    shape = (case.batch, case.channels, case.height, case.width)
    return np.random.default_rng(seed + 1).standard_normal(shape).astype(np.float32)


def _assert_conv_rules(functions, case, dtype, pairs, projection, target=TARGET):
    expected = [expected_conv_rule(case, dtype, pairs, target)]
    if projection:
        expected.append(expected_conv_rule(
            ConvCase(case.batch, case.channels, case.height, case.width, case.out_channels,
                     (1, 1), case.strides, (0, 0, 0, 0), 1), dtype, pairs, target))
    applied = _rules_of(functions, "conv2d") + _rules_of(functions, "depthwise_vnni")
    for rule in expected:
        path = " (pair rewrite off)" if dtype == "int8" and not pairs else ""
        event(f"{dtype} conv{path}: {rule or 'may decline'}")
        if rule is not None:
            assert applied[rule], (rule, functions)
    # one PrimFunc per conv, or one for both when FuseTIR found them identical (same shapes)
    assert 1 <= sum(applied.values()) <= len(expected), functions


# -- the properties ---------------------------------------------------------------------------------

SEEDS = st.integers(0, 2 ** 16)


def budget(share):
    """``share`` of the profile's example count for one test (its cost per example sets it)."""
    return settings(max_examples=max(1, round(settings.default.max_examples * share)))


@budget(1.0)
@given(case=conv_cases("dense"), options=EPILOGUES, seed=SEEDS,
       target=st.sampled_from(INT_TARGETS), emulate_vnni=st.sampled_from(EMULATE_VNNI))
@example(  # a 1x1 conv on one pixel: a tile of one output
    case=ConvCase(1, 3, 1, 1, 16, (1, 1), (1, 1), (0, 0, 0, 0), 1),
    options={"bias": True, "requantize": "multiply", "per_channel": True, "activation": "relu",
             "residual": False, "rounding": "upward"}, seed=0, target=TARGET,
    emulate_vnni=EMULATE_VNNI[-1])
def test_int8_conv_pairs_and_stir(case, options, seed, target, emulate_vnni):
    """groups 1: the VNNI conv where the target has VNNI (``emulate_vnni``: emulated, on the host
    target), else the int16-pair conv, and (pair rewrite off) the s_tir conv schedule."""
    graph, projection = int_conv_graph(case, options, seed)
    with vnni_kernels(emulate_vnni and target is TARGET):
        builds = _check_int(graph, _inputs(case, seed), pair_path=True, target=target)
        _assert_conv_rules(builds["pairs"], case, "int8", True, projection, target)
        _assert_conv_rules(builds["s_tir"], case, "int8", False, projection, target)


@budget(1.0)
@given(case=st.one_of(conv_cases("depthwise"), conv_cases("depthwise"), conv_cases("grouped")),
       options=EPILOGUES,
       seed=SEEDS, target=st.sampled_from(INT_TARGETS))
@example(  # the 33x33 -> 17x17 stride-2 depthwise conv whose output width has no divisor 2..16
    case=ConvCase(1, 16, 33, 33, 16, (3, 3), (2, 2), (1, 1, 1, 1), 16),
    options={"bias": True, "requantize": "shift", "per_channel": True, "activation": "relu6",
             "residual": False, "rounding": "upward"}, seed=0, target=TARGET)
def test_int8_depthwise_and_grouped_conv(case, options, seed, target):
    graph, projection = int_conv_graph(case, options, seed)
    builds = _check_int(graph, _inputs(case, seed), pair_path=False, target=target)
    _assert_conv_rules(builds["pairs"], case, "int8", True, projection, target)


FLOAT_EPILOGUES = st.fixed_dictionaries({
    "bias": st.booleans(), "affine": st.booleans(),
    "activation": st.sampled_from((None, "relu", "relu6")), "residual": st.booleans()})


def float_conv_graph(case: ConvCase, options, seed):
    rng = np.random.default_rng(seed)
    shape = (case.channels, case.height, case.width)
    nodes = [Node("data", "input", attrs={"shape": shape})]

    def conv(c: ConvCase, bias):
        fan_in = c.channels // c.groups * c.kernel[0] * c.kernel[1]
        params = {"weight": (rng.standard_normal((c.out_channels, c.channels // c.groups)
                                                 + c.kernel) / np.sqrt(fan_in)).astype(np.float32)}
        if bias:
            params["bias"] = rng.standard_normal(c.out_channels).astype(np.float32)
        nodes.append(Node(f"conv{len(nodes)}", "conv2d", ("data",), {
            "strides": c.strides, "padding": c.padding, "dilation": (1, 1), "groups": c.groups},
            params))
        return nodes[-1].name

    y = conv(case, options["bias"])
    if options["affine"]:  # a BatchNorm that did not fold
        o = case.out_channels
        nodes.append(Node("affine", "channel_affine", (y,), {}, {
            "scale": rng.uniform(0.5, 1.5, o).astype(np.float32),
            "shift": rng.standard_normal(o).astype(np.float32)}))
        y = "affine"
    projection = False
    if options["residual"] and case.same_size:
        if case.channels == case.out_channels and case.strides == (1, 1):
            shortcut = "data"
        else:
            projection = True
            shortcut = conv(ConvCase(case.batch, case.channels, case.height, case.width,
                                     case.out_channels, (1, 1), case.strides, (0, 0, 0, 0), 1),
                            bias=False)
        nodes.append(Node("residual", "add", (y, shortcut)))
        y = "residual"
    if options["activation"] == "relu":
        nodes.append(Node("relu", "relu", (y,)))
    elif options["activation"] == "relu6":
        nodes.append(Node("relu6", "clip", (y,), {"a_min": 0.0, "a_max": 6.0}))
    return Graph(nodes, "fuzz"), projection


@budget(0.6)
@given(case=st.one_of(conv_cases("dense"), conv_cases("grouped"), conv_cases("depthwise")),
       options=FLOAT_EPILOGUES, seed=SEEDS)
def test_float32_conv(case, options, seed):
    graph, projection = float_conv_graph(case, options, seed)
    functions = _check_float(graph, _inputs(case, seed))
    _assert_conv_rules(functions, case, "float32", False, projection)


@budget(0.6)
@given(batch=st.integers(1, 16), features=st.one_of(st.integers(1, 300), st.sampled_from(PRIMES)),
       outputs=st.one_of(st.sampled_from((16, 32, 48, 64, 10, 12, 100)), st.integers(1, 130)),
       dtype=st.sampled_from(("int8", "float32")), options=EPILOGUES, seed=SEEDS)
def test_dense(batch, features, outputs, dtype, options, seed):
    """qdense (int8) / dense (float32) after a flatten, with the conv epilogues (no residual)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, features, 1, 1)).astype(np.float32)
    if dtype == "int8":
        g = _IntGraph((features, 1, 1), rng)
        flat = g.add("flatten", g.nodes[-1].name, (features,), "int8", 127)
        weight = rng.integers(-127, 128, (outputs, features)).astype(np.int8)
        acc = g.add("qdense", flat.name, (outputs,), "int32",
                    127 * np.abs(weight.astype(np.int64)).sum(axis=1), weight=weight)
        g.epilogue(acc, dict(options, residual=False), None)
        functions = _check_int(g.graph(), x, pair_path=False)["pairs"]
    else:
        params = {"weight": rng.standard_normal((outputs, features)).astype(np.float32)}
        if options["bias"]:
            params["bias"] = rng.standard_normal(outputs).astype(np.float32)
        nodes = [Node("data", "input", attrs={"shape": (features, 1, 1)}),
                 Node("flat", "flatten", ("data",)), Node("fc", "dense", ("flat",), {}, params)]
        if options["activation"] == "relu":
            nodes.append(Node("act", "relu", ("fc",)))
        elif options["activation"] == "relu6":
            nodes.append(Node("act", "clip", ("fc",), {"a_min": 0.0, "a_max": 6.0}))
        functions = _check_float(Graph(nodes, "fuzz"), x)
    assert _rules_of(functions, "matmul") == Counter({"dense": 1}), functions


# op -> the word in the name of the PrimFunc that holds it ("" for the elementwise chains: all of
# the graph fuses into one or two PrimFuncs)
POOLS = {"max_pool2d": "pool", "qavg_pool2d": "conv2d", "qsum_pool2d": "conv2d",
         "qglobal_sum_pool2d": "sum", "avg_pool2d": "pool", "float_max_pool2d": "pool",
         "global_avg_pool2d": "mean", "qchannel_mul": "", "qadd": ""}


def _int_pool_graph(pool, shape, out_shape, attrs, counts, rng):
    g = _IntGraph(shape, rng)
    q = g.nodes[-1]
    channels = shape[0]
    if pool == "max_pool2d":
        g.add("max_pool2d", q.name, out_shape, "int8", 127, attrs)
    elif pool == "qsum_pool2d":
        g.add("qsum_pool2d", q.name, out_shape, "int32", 127 * counts.max(), attrs)
    elif pool == "qavg_pool2d":
        g.add("qavg_pool2d", q.name, out_shape, "int32", 127,
              dict(attrs, rounding=ROUNDINGS[int(rng.integers(len(ROUNDINGS)))]),
              counts=counts.astype(np.int32))
    elif pool == "qglobal_sum_pool2d":
        g.add("qglobal_sum_pool2d", q.name, (channels, 1, 1), "int32", 127 * shape[1] * shape[2])
    elif pool == "qchannel_mul":  # an unfolded BatchNorm's integer form, then requantize + ReLU
        multiplier = rng.integers(-127, 128, channels).astype(np.int8)
        y = g.add("qchannel_mul", q.name, shape, "int32", 127 * np.abs(multiplier.astype(np.int64)),
                  multiplier=multiplier)
        g.epilogue(y, {"bias": True, "requantize": "multiply", "per_channel": True,
                       "activation": "relu", "residual": False, "rounding": ROUNDINGS[-1]}, None)
    else:  # the residual join on its own: two operands aligned to int32, added, requantized
        a = g.requantize(q, 2.0 ** rng.integers(0, 6), "int32")
        g.epilogue(a, {"bias": False, "requantize": "shift", "per_channel": False,
                       "activation": "relu6", "residual": True, "rounding": ROUNDINGS[0]}, q)
    return g.graph()


@budget(0.6)
@given(pool=st.sampled_from(sorted(POOLS)), batch=st.sampled_from((1, 2, 3)),
       channels=st.sampled_from(CHANNELS + (48, 64)), size=_size(7),
       kernel=st.integers(1, 7), stride=st.integers(1, 3), pad=st.integers(0, 3),
       count_include_pad=st.booleans(), seed=SEEDS)
def test_pooling_and_elementwise(pool, batch, channels, size, kernel, stride, pad,
                                 count_include_pad, seed):
    """Pools (int8 max, integer sums and rounded mean, float max/avg/global) and the elementwise
    integer chains (channel multiply, residual join): the parallel_outer rule, and the depthwise
    rule for the integer window sums (an int32 depthwise conv with a ones kernel)."""
    pad = min(pad, kernel - 1)  # every window holds a pixel: no empty mean, no all-pad max
    pads = (pad, pad // 2, (pad + 1) // 2, 0)
    attrs = {"pool_size": (kernel, kernel), "strides": (stride, stride), "padding": pads}
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, channels, size, size)).astype(np.float32)
    shape = (channels, size, size)
    sums, counts = pool_sum_and_count(np.zeros((1, 1, size, size), np.int64), attrs["pool_size"],
                                      attrs["strides"], pads, count_include_pad)
    out_shape = (channels,) + sums.shape[2:]
    if pool.startswith("q") or pool == "max_pool2d":
        graph = _int_pool_graph(pool, shape, out_shape, attrs, counts, rng)
        functions = _check_int(graph, x, pair_path=False)["pairs"]
    else:
        op = "max_pool2d" if pool == "float_max_pool2d" else pool
        node_attrs = {} if op == "global_avg_pool2d" else dict(
            attrs, count_include_pad=count_include_pad)
        graph = Graph([Node("data", "input", attrs={"shape": shape}),
                       Node("pool", op, ("data",), node_attrs)], "fuzz")
        functions = _check_float(graph, x)
    applied = _rules_of(functions, POOLS[pool])
    if POOLS[pool]:
        assert sum(applied.values()) == 1, functions
    if POOLS[pool] == "conv2d" and channels > 1:
        # one channel lowers to a plain conv2d_nchw (not a grouped conv): the depthwise rule's
        # domain ends there and the unscheduled loops, checked above, run instead
        assert applied["depthwise_conv2d_nchw"] == 1, functions
    elif batch * channels * size * size >= 4096 * kernel * kernel:  # output >= 4096 elements
        assert applied["parallel_outer"] >= 1, functions


# -- chains of int8 convs: activations channel-blocked between the VNNI convs -------------------

# A target with AVX-VNNI but not AVX-512 VNNI: 8-lane vpdpbusd and 8-channel blocks.
AVX_VNNI = avx_vnni_target()
with vnni_kernels():  # real or emulated
    CHAIN_TARGETS = (TARGET, AVX_VNNI) if vnni.vnni_lanes(AVX_VNNI) == 8 else (TARGET,)


def _middle(options):
    """A hidden layer's epilogue: the drawn one, ending in int8 (the next conv reads int8)."""
    return dict(options, requantize=options["requantize"] or "shift", residual=False)


def int_conv_chain(batch, channels, widths, size, pool, residual, stride, options, seed):
    """quantize -> 3x3 conv (+ epilogue, int8) [-> 3x3/2 max pool, int8 or on the int32 before
    the requantize] -> 3x3 conv with stride ``stride`` (+ identity or 1x1 projection shortcut,
    the drawn epilogue) -> 1x1 conv: a ResNet block's shape of layers. ``widths``: the out
    channels of the three convs."""
    g = _IntGraph((channels, size, size), np.random.default_rng(seed))
    x = g.nodes[-1]
    w1, w2, w3 = widths
    a = g.conv(x, ConvCase(batch, channels, size, size, w1, (3, 3), (1, 1), (1, 1, 1, 1), 1))
    middle = _middle(options)
    if pool == "int32":  # the stem: conv, bias, ReLU, pool on int32, then requantize
        a = g.add("relu", a.name, a.shape, "int32", a.bound)
    else:
        a = g.epilogue(a, middle, None)
    if pool:
        hw = (a.shape[1] - 1) // 2 + 1
        a = g.add("max_pool2d", a.name, (w1, hw, hw), a.dtype, a.bound,
                  {"pool_size": (3, 3), "strides": (2, 2), "padding": (1, 1, 1, 1)})
    if pool == "int32":
        a = g.requantize(a, 2.0 ** -np.ceil(np.log2(max(int(np.max(a.bound)), 1) / 100)), "int8")
    hw = a.shape[1]
    block = ConvCase(batch, w1, hw, hw, w2, (3, 3), (stride, stride), (1, 1, 1, 1), 1)
    b = g.conv(a, block)
    shortcut = None
    if residual == "identity" and w1 == w2 and stride == 1:
        shortcut = a
    elif residual:
        shortcut = g.conv(a, ConvCase(batch, w1, hw, hw, w2, (1, 1), (stride, stride),
                                      (0, 0, 0, 0), 1))
    b = g.epilogue(b, _middle(options), shortcut)
    ohw = b.shape[1]
    c = g.conv(b, ConvCase(batch, w2, ohw, ohw, w3, (1, 1), (1, 1), (0, 0, 0, 0), 1))
    g.epilogue(c, dict(options, residual=False), None)
    return g.graph(), a


@budget(0.6)
@given(batch=st.sampled_from((1, 2)), channels=st.sampled_from((3, 5, 16, 32)),
       widths=st.tuples(st.sampled_from((16, 32, 48, 24, 40)), st.sampled_from((16, 32, 24, 20, 7)),
                        st.sampled_from((16, 24, 10))),
       size=_size(3, 24), pool=st.sampled_from((None, None, "int8", "int32")),
       residual=st.sampled_from((None, "identity", "projection")), stride=st.integers(1, 2),
       read_twice=st.booleans(), options=EPILOGUES, seed=SEEDS,
       target=st.sampled_from(CHAIN_TARGETS))
@example(  # the ResNet shapes: 3 -> 16 stem, int32 max pool, 16 -> 16 identity, 16 -> 32 stride 2
    batch=2, channels=3, widths=(16, 32, 16), size=13, pool="int32", residual="projection", stride=2,
    read_twice=True, options={"bias": True, "requantize": "shift", "per_channel": False,
                              "activation": "relu", "residual": True, "rounding": "upward"},
    seed=0, target=TARGET)
def test_int8_conv_chain_channel_blocked(batch, channels, widths, size, pool, residual, stride,
                                         read_twice, options, seed, target):
    """Convs feeding convs (through epilogues, max pools on int8 and int32, identity and int32
    projection shortcuts), where the VNNI path keeps the tensors between them channel-blocked
    (``qcal.backend.tvm.blocked``), out channels that are not whole blocks padded, and converts
    at the edges (the input, the outputs; ``read_twice`` also returns a hidden layer, whose
    padded lanes must not show): TVM == numpy. On a host without VNNI: the emulated VNNI conv."""
    with vnni_kernels():
        _check_conv_chain(batch, channels, widths, size, pool, residual, stride, read_twice,
                          options, seed, target)


def _check_conv_chain(batch, channels, widths, size, pool, residual, stride, read_twice, options,
                      seed, target):
    graph, hidden = int_conv_chain(batch, channels, widths, size, pool, residual, stride,
                                   options, seed)
    w1, w2, _ = widths
    x = np.random.default_rng(seed + 1).standard_normal(
        (batch, channels, size, size)).astype(np.float32)
    names = [hidden.name, graph.output.name] if read_twice else [graph.output.name]
    mod = emit.emit_relax(graph, batch, outputs=names)
    reference = run_integer(graph, x, keep="all")
    lowered = schedules.lower(mod, target)
    executable = tvm.compile(lowered, target, relax_pipeline=tvm.transform.Sequential([]))
    out = relax.VirtualMachine(executable, tvm.cpu())["main"](tvm.runtime.tensor(x))
    outs = [out] if len(names) == 1 else list(out)
    for name, value in zip(names, outs):
        got = value.numpy().astype(np.int64)
        diff = np.abs(got - reference[name])
        assert diff.max(initial=0) == 0, (f"{name}: differs from numpy at "
                                          f"{int(np.count_nonzero(diff))} of {diff.size} values")
    lanes = vnni.vnni_lanes(target)
    if lanes is None:
        return
    rules = schedules.scheduled_functions(lowered)
    functions = [gv.name_hint for gv, f in lowered.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc)]
    # every conv runs on VNNI, whole blocks of out channels or not; the block's conv reads its
    # input (a VNNI conv's output, pooled or not) blocked, padded lanes and all, and so does the
    # last conv after it
    assert all(rules.get(name) == "conv2d_vnni" for name in functions if "conv2d_vnni" in name)
    assert "conv2d_nchw" not in rules.values(), rules
    blocked_packs = [name for name in functions if name.startswith("pack_blocked_u8_quads")]
    assert blocked_packs, functions
    # a projection shortcut of two VNNI convs is computed inside the block conv's tiles
    fused = [name for name in functions if "conv2d_vnni_shortcut" in name]
    projection = residual == "projection" or (residual == "identity" and (w1, stride) != (w2, 1))
    assert len(fused) == (1 if projection else 0)
    for gv, f in lowered.functions.items():
        if rules.get(gv.name_hint) == "conv2d_vnni":
            assert_vnni_kernel(f.script(), target)
    event(f"blocked packs: {len(blocked_packs)}")
    # a 1x1 conv whose blocked input is a ReLU's or ReLU6's output reads it in place, with no
    # pack (vnni.reads_in_place): the last conv, and a projection shortcut of such an input; a
    # conv reading signed values never does (it would read them as unsigned, and TVM != numpy)
    # calls, not PrimFuncs: two packs of the same shape share one
    packs = re.findall(r"\b(?:pack_u8_quads|pack_blocked_u8_quads)\w*\(",
                       lowered["main"].script())
    in_place = 3 + projection - len(packs)
    if options["activation"] is not None:
        assert in_place == 1 + projection, (in_place, functions)
    elif pool != "int32":
        assert in_place == 0, (in_place, functions)
    event(f"inputs read in place: {in_place}")
    if pool == "int32":
        # the stem's requantize (rounding upward: a chain of monotone ops) runs before the max
        # pool, which reads its int8 result (qcal.backend.tvm.pool_order)
        pools = [f for gv, f in lowered.functions.items()
                 if isinstance(f, tvm.tirx.PrimFunc) and "max_pool2d" in gv.name_hint]
        assert [str(f.params[0].dtype) for f in pools] == ["int8"], functions
