"""qcal.backend.tvm.schedules: scheduled results equal unscheduled ones bit for bit, and the schedules apply.

Every module here is a small hand-built Relax graph of the kind the TVM adapter emits (int8 conv /
dense with int32 accumulation, requantize epilogue, pooling). Each is compiled through the same CPU
pipeline with and without qcal's schedules (and, for int8 convs, with the VNNI rewrite the host
target picks, with the int16-pair rewrite of the same target without VNNI, and without either)
and run on the same input; integer results must be equal bit for bit. On a host without VNNI the
VNNI tests compile the VNNI conv with ``vpdpbusd`` emulated (tests/backend/vnni_emulation.py).
"""
from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qcal.backend.tvm import depthwise, schedules, vnni  # noqa: E402
from qcal.errors import QcalError, UsageProblem  # noqa: E402
from qcal.reference import kernels as numpy_kernels  # noqa: E402
from tests.backend.vnni_emulation import assert_vnni_kernel, avx_vnni_target, vnni_kernels  # noqa: E402,E501

TARGET = schedules.cpu_target()
RNG_SEED = 7


def _const(array: np.ndarray):
    return relax.const(array, str(array.dtype))


def _module(input_shape, emit, dtype="int8", extra_params=()):
    """main(x[, *extra_params]) whose body is what ``emit(bb, x, *params)`` returns."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(input_shape, dtype))
    params = [relax.Var(name, relax.TensorType(shape, dt)) for name, shape, dt in extra_params]
    with bb.function("main", [x, *params]):
        with bb.dataflow():
            out = bb.emit_output(emit(bb, x, *params))
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, *inputs, schedule=True, pair_convs=True, target=TARGET):
    ex = schedules.build(mod, target, schedule=schedule, pair_convs=pair_convs)
    vm = relax.VirtualMachine(ex, tvm.cpu())
    return vm["main"](*[tvm.runtime.tensor(a) for a in inputs]).numpy()


def _int8(rng, shape):
    return rng.integers(-128, 128, shape).astype("int8")


def _requantize(bb, acc, channels, rng):
    """The adapter's epilogue: + int32 bias, per-channel rounding right shift in int64, clip, cast.

        acc(int32) -> add bias -> astype int64 -> add (1 << (s-1)) -> right_shift s -> clip -> int8
    """
    bias = rng.integers(-5000, 5000, (1, channels, 1, 1)).astype("int32")
    shift = rng.integers(6, 12, (1, channels, 1, 1)).astype("int64")
    y = bb.emit(relax.op.add(acc, _const(bias)))
    y = bb.emit(relax.op.astype(y, "int64"))
    y = bb.emit(relax.op.add(y, _const(np.left_shift(1, shift - 1).astype("int64"))))
    y = bb.emit(relax.op.right_shift(y, _const(shift)))
    y = bb.emit(relax.op.clip(y, -128, 127))
    return bb.emit(relax.op.astype(y, "int8"))


# (N, C, H, W), out channels, kernel, stride, pad, groups
CONVS = {
    "1x1": ((1, 32, 10, 10), 32, 1, 1, 0, 1),
    "3x3": ((1, 16, 12, 12), 32, 3, 1, 1, 1),
    "3x3_stride2": ((2, 16, 13, 13), 32, 3, 2, 1, 1),
    # out channels not a multiple of 16 (EfficientNet-Lite0's projections): VNNI pads them
    "1x1_24_out": ((2, 40, 9, 9), 24, 1, 1, 0, 1),
    "3x3_20_out": ((1, 13, 7, 7), 20, 3, 1, 1, 1),
    "7x7_stem": ((1, 3, 32, 32), 16, 7, 2, 3, 1),
    "grouped": ((1, 32, 8, 8), 64, 3, 1, 1, 2),
    "depthwise": ((1, 24, 12, 12), 24, 3, 1, 1, 24),
    "depthwise_stride2": ((2, 16, 11, 11), 16, 3, 2, 1, 16),
    # output rows and widths with no divisor from 2 to 16 (17 wide, 67 wide): a tile of one pixel,
    # which once vectorized the tile loop and shared one accumulator between all lanes
    "depthwise_stride2_17_wide": ((1, 16, 33, 33), 16, 3, 2, 1, 16),
    "depthwise_67_wide": ((1, 8, 67, 67), 8, 3, 1, 1, 8),
}
DEPTHWISE = {kind for kind in CONVS if kind.startswith("depthwise")}
PAIRS = schedules.pair_lanes(TARGET) is not None
with vnni_kernels():  # real or emulated: the VNNI tests' lanes
    VNNI_LANES = vnni.vnni_lanes(TARGET)
    AVX_VNNI = avx_vnni_target()
    AVX_VNNI_LANES = vnni.vnni_lanes(AVX_VNNI)
VNNI = VNNI_LANES is not None
# the int8 conv kernel a test compiles for: (target, whether the conv rewrite runs)
KERNELS = {"vnni": (TARGET, True), "pairs": (vnni.without_vnni(TARGET), True),
           "s_tir": (TARGET, False)}


def _expected_rule(kind, kernel):
    if kind in DEPTHWISE:
        vnni_depthwise = kernel == "vnni" and depthwise.depthwise_supported(TARGET)
        return "depthwise_vnni" if vnni_depthwise else "depthwise_conv2d_nchw"
    if kind == "grouped" or kernel == "s_tir":
        return "conv2d_nchw"
    if kernel == "vnni" and VNNI:
        return "conv2d_vnni"  # any out channel count
    pairs = PAIRS and CONVS[kind][1] % schedules.pair_lanes(vnni.without_vnni(TARGET)) == 0
    return "conv2d_int16_pairs" if pairs else "conv2d_nchw"


def _conv_module(kind, epilogue, weight_as_input=False):
    shape, out_ch, k, stride, pad, groups = CONVS[kind]
    rng = np.random.default_rng(RNG_SEED)
    weight = _int8(rng, (out_ch, shape[1] // groups, k, k))
    extra = [("w", weight.shape, "int8")] if weight_as_input else []

    def emit(bb, x, *params):
        w = params[0] if weight_as_input else _const(weight)
        acc = bb.emit(relax.op.nn.conv2d(x, w, strides=stride, padding=pad, groups=groups,
                                         out_dtype="int32"))
        return _requantize(bb, acc, out_ch, rng) if epilogue else acc

    return _module(shape, emit, extra_params=extra), weight


def _primfuncs(mod):
    return {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}


@pytest.mark.usefixtures("vnni_kernels")
@pytest.mark.parametrize("kernel", sorted(KERNELS))
class TestConv:
    """Every int8 conv path: VNNI (the default on a VNNI CPU), the int16-pair rewrite (the default
    without VNNI) and the s_tir conv schedule."""

    @pytest.mark.parametrize("kind", sorted(CONVS))
    @pytest.mark.parametrize("epilogue", [True, False], ids=["requantize", "raw"])
    def test_bit_exact_against_unscheduled(self, kind, epilogue, kernel):
        target, pair_convs = KERNELS[kernel]
        mod, weight = _conv_module(kind, epilogue)
        x = _int8(np.random.default_rng(1), CONVS[kind][0])
        scheduled = _run(mod, x, pair_convs=pair_convs, target=target)
        assert np.array_equal(scheduled, _run(mod, x, schedule=False))
        if not epilogue:  # and against qcal's own numpy reference
            _, _, _, stride, pad, groups = CONVS[kind]
            ref = numpy_kernels.conv2d(x, weight, (stride, stride), (pad,) * 4, groups=groups)
            assert scheduled.dtype == np.int32
            assert np.array_equal(scheduled, ref)

    @pytest.mark.parametrize("kind", sorted(CONVS))
    def test_schedule_applied(self, kind, kernel):
        target, pair_convs = KERNELS[kernel]
        mod, _ = _conv_module(kind, epilogue=True)
        lowered = schedules.lower(mod, target, pair_convs=pair_convs)
        rules = schedules.scheduled_functions(lowered)
        expected = _expected_rule(kind, kernel)
        convs = [name for name, rule in rules.items() if rule == expected]
        assert len(convs) == 1, rules
        text = _primfuncs(lowered)[convs[0]].script()
        assert "T.parallel" in text
        if expected == "conv2d_int16_pairs":
            assert "pmadd" in text
            return
        if expected == "conv2d_vnni":
            assert_vnni_kernel(text, target)
        else:
            assert "vpdpbusd" in text if expected == "depthwise_vnni" else "T.vectorized" in text
        # the requantize epilogue was inlined: one block writes the int8 output after the conv
        assert text.count('T.sblock("compute') <= 1
        assert "int8" in str(_primfuncs(lowered)[convs[0]].params[-1].dtype)

    def test_weight_given_at_run_time_is_repacked_in_the_call(self, kernel):
        """Only constant weights take the conv rewrites; a run-time weight gets the s_tir conv."""
        target, pair_convs = KERNELS[kernel]
        mod, weight = _conv_module("3x3", epilogue=True, weight_as_input=True)
        x = _int8(np.random.default_rng(2), CONVS["3x3"][0])
        out = _run(mod, x, weight, pair_convs=pair_convs, target=target)
        assert np.array_equal(out, _run(mod, x, weight, schedule=False))
        rules = schedules.scheduled_functions(schedules.lower(mod, target, pair_convs=pair_convs))
        assert list(rules.values()) == ["conv2d_nchw"]

    def test_float32_conv_close_to_unscheduled(self, kernel):
        target, pair_convs = KERNELS[kernel]
        rng = np.random.default_rng(3)
        weight = rng.standard_normal((32, 16, 3, 3)).astype("float32")
        mod = _module((1, 16, 12, 12), lambda bb, x: bb.emit(relax.op.nn.relu(bb.emit(
            relax.op.nn.conv2d(x, _const(weight), padding=1)))), dtype="float32")
        x = rng.standard_normal((1, 16, 12, 12)).astype("float32")
        out = _run(mod, x, pair_convs=pair_convs, target=target)
        np.testing.assert_allclose(out, _run(mod, x, schedule=False), rtol=1e-5, atol=1e-5)
        lowered = schedules.lower(mod, target, pair_convs=pair_convs)
        assert list(schedules.scheduled_functions(lowered).values()) == ["conv2d_nchw"]


class TestStirConv:
    def test_constant_weight_is_repacked_at_compile_time(self):
        mod, _ = _conv_module("3x3", epilogue=True)
        funcs = _primfuncs(schedules.lower(mod, TARGET, pair_convs=False))
        (name,) = funcs
        assert name.endswith("_prepacked")
        # no in-function repack block is left; the weight parameter is (O/v, I, kh, kw, v)
        assert "param_0_global" not in funcs[name].script()


class TestInt16Pairs:
    @pytest.mark.skipif(not PAIRS, reason="no AVX2 on this CPU")
    @pytest.mark.parametrize("kind", ["3x3_stride2", "7x7_stem"])
    def test_avx2_eight_lane_path_bit_exact(self, kind):
        """An AVX2-only target (haswell) takes the 8-lane pmaddwd; it runs on any AVX2 host."""
        avx2 = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
        assert schedules.pair_lanes(avx2) == 8
        mod, _ = _conv_module(kind, epilogue=True)
        x = _int8(np.random.default_rng(11), CONVS[kind][0])
        assert np.array_equal(_run(mod, x, target=avx2), _run(mod, x, schedule=False))
        rules = schedules.scheduled_functions(schedules.lower(mod, avx2))
        assert "conv2d_int16_pairs" in rules.values()

    def test_target_without_avx2_is_not_rewritten(self):
        generic = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
        assert schedules.pair_lanes(generic) is None
        mod, _ = _conv_module("3x3", epilogue=True)
        assert schedules.rewrite_int8_convs(mod, generic) is mod

    def test_pack_pair_weight_layout(self):
        """Lane l of vector (f, c2, ky, kx) holds out channel f*v + l//2, in channel 2*c2 + l%2."""
        rng = np.random.default_rng(12)
        weight = _int8(rng, (16, 3, 2, 2))
        packed = schedules.pack_pair_weight(weight, 8)
        assert packed.shape == (2, 2, 2, 2, 16) and packed.dtype == np.int16
        assert packed[1, 0, 1, 0, 2 * 3 + 1] == weight[8 + 3, 1, 1, 0]
        assert packed[0, 1, 0, 1, 2 * 5] == weight[5, 2, 0, 1]
        assert packed[0, 1, 0, 1, 2 * 5 + 1] == 0  # the zero channel that pads 3 channels to 4


def _vnni_conv(x, weight, strides, pads, target):
    mod = _module(x.shape, lambda bb, v: bb.emit(relax.op.nn.conv2d(
        v, _const(weight), strides=strides, padding=pads, out_dtype="int32")))
    lowered = schedules.lower(mod, target)
    rules = schedules.scheduled_functions(lowered)
    for name, rule in rules.items():
        if rule == "conv2d_vnni":
            assert_vnni_kernel(_primfuncs(lowered)[name].script(), target)
    return _run(mod, x, target=target), rules


class TestVnni:
    @pytest.mark.skipif(not VNNI, reason="this CPU has neither VNNI nor AVX2 to emulate it")
    @hypothesis.settings(max_examples=14, deadline=None, derandomize=True, database=None)
    @hypothesis.given(
        batch=st.integers(1, 2), in_channels=st.integers(1, 13), vectors=st.integers(1, 3),
        kernel=st.sampled_from([1, 3, 5, 7]), stride=st.integers(1, 3), size=st.integers(5, 14),
        pads=st.tuples(*[st.integers(0, 3)] * 4), seed=st.integers(0, 2 ** 16))
    def test_bit_exact_with_numpy_on_random_shapes(self, batch, in_channels, vectors, kernel,
                                                   stride, size, pads, seed):
        """Odd channel counts (zero-padded to quads), strides, 1x1 to 7x7, asymmetric padding,
        the whole int8 range (-128 included): the u8 + 128 shift and its weight-sum correction
        are exact."""
        lanes = VNNI_LANES
        hypothesis.assume(size + pads[0] + pads[2] >= kernel and size + pads[1] + pads[3] >= kernel)
        rng = np.random.default_rng(seed)
        x = _int8(rng, (batch, in_channels, size, size + 1))
        weight = _int8(rng, (vectors * lanes, in_channels, kernel, kernel))
        with vnni_kernels():
            out, rules = _vnni_conv(x, weight, (stride, stride), pads, TARGET)
        # the conv, and the conversion of its channel-blocked output to NCHW when it is large
        # enough for threads
        assert set(rules.values()) <= {"conv2d_vnni", "parallel_outer"}, rules
        assert list(rules.values()).count("conv2d_vnni") == 1
        ref = numpy_kernels.conv2d(x, weight, (stride, stride), pads)
        assert out.dtype == np.int32 and np.array_equal(out, ref)

    @pytest.mark.skipif(not VNNI, reason="this CPU has neither VNNI nor AVX2 to emulate it")
    @pytest.mark.usefixtures("vnni_kernels")
    def test_extreme_values_do_not_saturate(self):
        """-128 activations against -128 weights over 64 channels x 3x3: the largest sums a
        ResNet conv can make; vpdpbusd (unlike vpdpbusds) wraps, and nothing here reaches int32's
        limits, so the result is the plain sum."""
        lanes = VNNI_LANES
        x = np.full((1, 64, 6, 6), -128, np.int8)
        weight = np.full((lanes, 64, 3, 3), -128, np.int8)
        weight[1::2] = 127
        out, _ = _vnni_conv(x, weight, (1, 1), (1, 1, 1, 1), TARGET)
        assert np.array_equal(out, numpy_kernels.conv2d(x, weight, (1, 1), (1, 1, 1, 1)))
        assert out[0, 0, 2, 2] == 64 * 9 * 128 * 128

    @pytest.mark.skipif(AVX_VNNI_LANES != 8, reason="this CPU has neither AVX-VNNI nor AVX2 to "
                        "emulate it")
    @pytest.mark.usefixtures("vnni_kernels")
    @pytest.mark.parametrize("kind", ["3x3_stride2", "7x7_stem", "1x1"])
    def test_avx_vnni_eight_lane_path_bit_exact(self, kind):
        """A target with AVX-VNNI but not AVX-512 VNNI takes the 8-lane 256-bit vpdpbusd."""
        assert vnni.vnni_lanes(AVX_VNNI) == 8
        mod, _ = _conv_module(kind, epilogue=True)
        x = _int8(np.random.default_rng(13), CONVS[kind][0])
        assert np.array_equal(_run(mod, x, target=AVX_VNNI), _run(mod, x, schedule=False))
        lowered = schedules.lower(mod, AVX_VNNI)
        (name,) = [n for n, r in schedules.scheduled_functions(lowered).items()
                   if r == "conv2d_vnni"]
        assert_vnni_kernel(_primfuncs(lowered)[name].script(), AVX_VNNI)

    @pytest.mark.skipif(not VNNI, reason="this CPU has neither VNNI nor AVX2 to emulate it")
    @pytest.mark.usefixtures("vnni_kernels")
    def test_conv_output_read_twice_bit_exact(self):
        """The conv's int32 output feeds its requantize and, beside it, a sum with the
        requantized value: FuseOps then leaves the conv alone in its PrimFunc, and the rule
        schedules it without an epilogue (the int32 tensor is written out)."""
        rng = np.random.default_rng(15)
        shape, lanes = (1, 8, 9, 9), VNNI_LANES
        weight = _int8(rng, (lanes, 8, 3, 3))

        def emit(bb, x):
            acc = bb.emit(relax.op.nn.conv2d(x, _const(weight), padding=1, out_dtype="int32"))
            y = _requantize(bb, acc, lanes, rng)
            return relax.Tuple([y, bb.emit(relax.op.add(relax.op.astype(y, "int32"), acc))])

        mod = _module(shape, emit)
        x = _int8(rng, shape)

        def run(**kw):
            ex = schedules.build(mod, TARGET, **kw)
            return [o.numpy() for o in relax.VirtualMachine(ex, tvm.cpu())["main"](
                tvm.runtime.tensor(x))]

        for got, want in zip(run(), run(schedule=False)):
            assert np.array_equal(got, want)
        rules = schedules.scheduled_functions(schedules.lower(mod, TARGET))
        assert rules.get("conv2d_vnni") == "conv2d_vnni"  # the PrimFunc of the conv alone

    def test_chosen_by_target_features(self):
        assert vnni.vnni_lanes(vnni.without_vnni(TARGET)) is None
        assert vnni.vnni_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})) is None
        assert vnni.vnni_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})) == 16
        assert vnni.vnni_lanes(tvm.target.Target({"kind": "llvm", "mcpu": "alderlake"})) == 8

    def test_emulation_answers_for_avx2_targets_without_vnni(self, monkeypatch):
        """$QCAL_VNNI_EMULATE: the lanes asked for on an AVX2 target without VNNI, less a VNNI
        feature its mattr switches off; a VNNI target and a target without AVX2 keep their own
        answer; a bad value is a one-line error naming the variable."""
        haswell = tvm.target.Target({"kind": "llvm", "mcpu": "haswell"})
        no_avx512_vnni = tvm.target.Target({"kind": "llvm", "mcpu": "haswell",
                                            "mattr": ["-avx512vnni"]})
        icelake = tvm.target.Target({"kind": "llvm", "mcpu": "icelake-server"})
        plain = tvm.target.Target({"kind": "llvm", "mcpu": "x86-64"})
        assert not vnni.vnni_emulated(haswell)
        monkeypatch.setenv(vnni.EMULATE_ENV, "16")
        assert [vnni.vnni_lanes(t) for t in (haswell, no_avx512_vnni, icelake, plain)] == [
            16, 8, 16, None]
        assert vnni.vnni_lanes(vnni.without_vnni(haswell)) is None
        assert [vnni.vnni_emulated(t) for t in (haswell, icelake, plain)] == [True, False, False]
        monkeypatch.setenv(vnni.EMULATE_ENV, "8")
        assert [vnni.vnni_lanes(t) for t in (haswell, icelake)] == [8, 16]
        monkeypatch.setenv(vnni.EMULATE_ENV, "32")
        with pytest.raises(UsageProblem, match="QCAL_VNNI_EMULATE must be 16 or 8.*not '32'"):
            vnni.vnni_lanes(haswell)

    def test_pack_vnni_weight_layout_and_correction(self):
        """Lane l of vector (f, c4, ky, kx) holds out channel f*v + l, in channels 4*c4 .. +3 as
        little-endian bytes; the accumulator start is -128 * the out channel's weight sum."""
        rng = np.random.default_rng(14)
        weight = _int8(rng, (16, 5, 2, 2))
        packed, init = vnni.pack_vnni_weight(weight, 8)
        assert packed.shape == (2, 2, 2, 2, 8) and packed.dtype == np.int32
        lane = packed[1, 0, 1, 0, 3:4].view(np.int8)  # out channel 11, in channels 0..3
        assert np.array_equal(lane, weight[11, 0:4, 1, 0])
        lane = packed[0, 1, 0, 1, 5:6].view(np.int8)  # out channel 5, in channel 4 + 3 zeros
        assert np.array_equal(lane, [weight[5, 4, 0, 1], 0, 0, 0])
        assert init.shape == (2, 8) and init.dtype == np.int32
        assert init[1, 3] == -128 * int(weight[11].astype(np.int64).sum())

    def test_pack_vnni_weight_pads_channels_with_zero_weights(self):
        """20 out channels on 8 lanes: 3 vectors, lanes 4..7 of the last zero weights with a zero
        accumulator start; 6 in channels read from a padded blocked input of 4 quads (16
        channels): quads 2 and 3 zero."""
        rng = np.random.default_rng(15)
        weight = _int8(rng, (20, 6, 3, 1))
        packed, init = vnni.pack_vnni_weight(weight, 8, in_quads=4)
        assert packed.shape == (3, 4, 3, 1, 8) and init.shape == (3, 8)
        lane = packed[2, 1, 2, 0, 3:4].view(np.int8)  # out channel 19, in channels 4, 5 + 2 zeros
        assert np.array_equal(lane, [weight[19, 4, 2, 0], weight[19, 5, 2, 0], 0, 0])
        assert not packed[2, :, :, :, 4:].any() and not packed[:, 2:].any()
        assert not init[2, 4:].any()
        assert init[2, 3] == -128 * int(weight[19].astype(np.int64).sum())
        unpadded, _ = vnni.pack_vnni_weight(weight, 8)
        assert np.array_equal(packed[:, :2], unpadded)
        with pytest.raises(ValueError, match="cannot hold 6 input channels"):
            vnni.pack_vnni_weight(weight, 8, in_quads=1)


class TestDense:
    @pytest.mark.parametrize("op", ["matmul", "linear"])
    def test_bit_exact_and_applied(self, op):
        rng = np.random.default_rng(4)
        batch, k, n = 4, 64, 48
        weight = _int8(rng, (k, n) if op == "matmul" else (n, k))
        bias = rng.integers(-3000, 3000, (n,)).astype("int32")

        def emit(bb, x):
            if op == "matmul":
                acc = bb.emit(relax.op.matmul(x, _const(weight), out_dtype="int32"))
            else:
                acc = bb.emit(relax.op.linear(x, _const(weight), out_dtype="int32"))
            y = bb.emit(relax.op.add(acc, _const(bias)))
            y = bb.emit(relax.op.right_shift(y, _const(np.array(5, "int32"))))
            return bb.emit(relax.op.astype(relax.op.clip(y, -128, 127), "int8"))

        mod = _module((batch, k), emit)
        x = _int8(rng, (batch, k))
        out = _run(mod, x)
        assert np.array_equal(out, _run(mod, x, schedule=False))
        ref = (x.astype(np.int64) @ (weight if op == "matmul" else weight.T) + bias) >> 5
        assert np.array_equal(out, np.clip(ref, -128, 127).astype("int8"))
        rules = schedules.scheduled_functions(schedules.lower(mod, TARGET))
        assert list(rules.values()) == ["dense"]


class TestPoolingAndElementwise:
    @pytest.mark.parametrize("pool", ["max", "avg"])
    def test_pool_bit_exact_and_parallel(self, pool):
        op = relax.op.nn.max_pool2d if pool == "max" else relax.op.nn.avg_pool2d
        mod = _module((2, 16, 20, 20), lambda bb, x: bb.emit(op(x, 3, 2, 1)))
        x = _int8(np.random.default_rng(5), (2, 16, 20, 20))
        assert np.array_equal(_run(mod, x), _run(mod, x, schedule=False))
        lowered = schedules.lower(mod, TARGET)
        rules = schedules.scheduled_functions(lowered)
        assert list(rules.values()) == ["parallel_outer"]
        assert "T.parallel" in _primfuncs(lowered)[next(iter(rules))].script()

    def test_residual_add_requantize_bit_exact(self):
        """The residual join: int8 + int8 in int32, shift, clip, cast (one fused PrimFunc)."""
        shape = (1, 32, 14, 14)

        def emit(bb, x, y):
            s = bb.emit(relax.op.add(relax.op.astype(x, "int32"), relax.op.astype(y, "int32")))
            s = bb.emit(relax.op.right_shift(s, _const(np.array(1, "int32"))))
            return bb.emit(relax.op.astype(relax.op.clip(s, 0, 127), "int8"))

        mod = _module(shape, emit, extra_params=[("y", shape, "int8")])
        rng = np.random.default_rng(6)
        x, y = _int8(rng, shape), _int8(rng, shape)
        out = _run(mod, x, y)
        assert np.array_equal(out, _run(mod, x, y, schedule=False))
        ref = np.clip((x.astype(np.int32) + y) >> 1, 0, 127).astype("int8")
        assert np.array_equal(out, ref)


class TestDecline:
    def test_unknown_primfunc_left_unchanged(self):
        """A tiny elementwise op is not worth threads: every rule declines and the PrimFunc is
        the one legalization produced."""
        mod = _module((2, 8), lambda bb, x: bb.emit(relax.op.negative(x)))
        unscheduled = _primfuncs(schedules.lower(mod, TARGET, schedule=False))
        scheduled_mod = schedules.lower(mod, TARGET)
        assert schedules.scheduled_functions(scheduled_mod) == {}
        scheduled = _primfuncs(scheduled_mod)
        assert scheduled.keys() == unscheduled.keys()
        for name, func in scheduled.items():
            tvm.ir.assert_structural_equal(func, unscheduled[name])

    def test_schedule_primfunc_declines_a_conv_it_cannot_vectorize(self):
        """Two output channels per group leave nothing to vectorize: the conv rule declines and
        the function falls through to a later rule (or none) -- never a wrong schedule."""
        rng = np.random.default_rng(8)
        weight = _int8(rng, (4, 2, 3, 3))
        mod = _module((1, 4, 6, 6), lambda bb, x: bb.emit(relax.op.nn.conv2d(
            x, _const(weight), padding=1, groups=2, out_dtype="int32")))
        x = _int8(rng, (1, 4, 6, 6))
        rules = schedules.scheduled_functions(schedules.lower(mod, TARGET))
        assert "conv2d_nchw" not in rules.values()
        assert np.array_equal(_run(mod, x), _run(mod, x, schedule=False))

    def test_a_failing_rule_is_an_error_not_a_decline(self, monkeypatch):
        """Only ``Decline`` passes a PrimFunc on to the next rule; a rule that breaks stops the
        compile and names itself and the PrimFunc."""
        mod, _ = _conv_module("3x3", epilogue=True)

        def broken(func, lanes, prepack):
            raise ValueError("bug in a rule")

        monkeypatch.setitem(schedules.SCHEDULE_RULES, "conv2d_nchw", broken)
        with pytest.raises(RuntimeError, match="rule 'conv2d_nchw' failed on PrimFunc "
                           "'fused_conv2d_.*': ValueError: bug in a rule"):
            schedules.lower(mod, TARGET, pair_convs=False)

        def declines(func, lanes, prepack):
            raise schedules.Decline("not mine")

        monkeypatch.setitem(schedules.SCHEDULE_RULES, "conv2d_nchw", declines)
        rules = schedules.scheduled_functions(schedules.lower(mod, TARGET, pair_convs=False))
        assert "conv2d_nchw" not in rules.values()

    def test_non_cpu_target_is_refused(self):
        mod = _module((2, 8), lambda bb, x: bb.emit(relax.op.negative(x)))
        with pytest.raises(QcalError, match="LLVM CPU targets only"):
            schedules.build(mod, tvm.target.Target("cuda"))


class TestModulePass:
    def test_apply_cpu_schedules_after_fusion_leaves_its_input_alone(self):
        """The adapter's call sequence: legalize + fuse, then apply_cpu_schedules(mod, target)."""
        from tvm.relax.backend.cpu_generic import pipeline as cpu_pipeline

        mod, _ = _conv_module("1x1", epilogue=True)
        with TARGET:
            fused = tvm.transform.Sequential(cpu_pipeline.library_dispatch_passes(TARGET)
                                             + cpu_pipeline.legalize_passes(TARGET))(mod)
        before = fused.script()
        scheduled = schedules.apply_cpu_schedules(fused, TARGET)  # (no pair rewrite here)
        assert fused.script() == before
        assert list(schedules.scheduled_functions(scheduled).values()) == ["conv2d_nchw"]
        # applying twice changes nothing: scheduled PrimFuncs are marked and skipped
        tvm.ir.assert_structural_equal(schedules.apply_cpu_schedules(scheduled, TARGET), scheduled)

    @pytest.mark.usefixtures("vnni_kernels")
    def test_small_residual_network_bit_exact(self):
        """Two same-shape convs (their fused PrimFuncs may be shared by two call sites, each with
        its own weight constant), a residual join, max pool and a dense head, end to end.

            x -> conv3x3+rq -> conv3x3+rq -> (+ x) >> 1 -> maxpool -> flatten -> dense+rq
        """
        rng = np.random.default_rng(9)
        shape = (2, 16, 8, 8)
        w1, w2 = _int8(rng, (16, 16, 3, 3)), _int8(rng, (16, 16, 3, 3))
        wd = _int8(rng, (16 * 4 * 4, 10))

        def emit(bb, x):
            y = _requantize(bb, bb.emit(relax.op.nn.conv2d(x, _const(w1), padding=1,
                                                           out_dtype="int32")), 16, rng)
            y = _requantize(bb, bb.emit(relax.op.nn.conv2d(y, _const(w2), padding=1,
                                                           out_dtype="int32")), 16, rng)
            s = bb.emit(relax.op.add(relax.op.astype(y, "int32"), relax.op.astype(x, "int32")))
            s = bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(
                s, _const(np.array(1, "int32"))), -128, 127), "int8"))
            p = bb.emit(relax.op.nn.max_pool2d(s, 2, 2))
            f = bb.emit(relax.op.reshape(p, (2, 16 * 4 * 4)))
            d = bb.emit(relax.op.matmul(f, _const(wd), out_dtype="int32"))
            return bb.emit(relax.op.right_shift(d, _const(np.array(4, "int32"))))

        mod = _module(shape, emit)
        x = _int8(rng, shape)
        reference = _run(mod, x, schedule=False)
        for kernel, (target, pair_convs) in KERNELS.items():
            assert np.array_equal(_run(mod, x, pair_convs=pair_convs, target=target), reference)
            lowered = schedules.lower(mod, target, pair_convs=pair_convs)
            rules = list(schedules.scheduled_functions(lowered).values())
            assert _expected_rule("3x3", kernel) in rules and "dense" in rules

    def test_primfunc_shared_by_two_calls_gets_each_calls_weight_packed(self):
        """FuseTIR deduplicates two same-shape conv+requantize groups into one PrimFunc called
        twice; each call's own weight constant must be repacked."""
        rng = np.random.default_rng(10)
        w1, w2 = _int8(rng, (16, 16, 3, 3)), _int8(rng, (16, 16, 3, 3))
        shift = _const(np.array(7, "int32"))

        def conv_rq(bb, x, w):
            y = bb.emit(relax.op.nn.conv2d(x, _const(w), padding=1, out_dtype="int32"))
            return bb.emit(relax.op.astype(relax.op.clip(relax.op.right_shift(y, shift), -128, 127),
                                           "int8"))

        mod = _module((1, 16, 8, 8), lambda bb, x: conv_rq(bb, conv_rq(bb, x, w1), w2))
        lowered = schedules.lower(mod, TARGET, pair_convs=False)
        (name,) = schedules.scheduled_functions(lowered)
        assert lowered["main"].script().count(name + "(") == 2
        x = _int8(rng, (1, 16, 8, 8))
        reference = _run(mod, x, schedule=False)
        assert np.array_equal(_run(mod, x, pair_convs=False), reference)
        assert np.array_equal(_run(mod, x), reference)
