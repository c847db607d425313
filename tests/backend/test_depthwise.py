"""The VNNI depthwise conv (``qcal.backend.tvm.depthwise``): bit for bit the numpy reference's
depthwise conv on random shapes, the whole int8 range, its packed layouts, and where it declines."""
from __future__ import annotations

import hypothesis
import hypothesis.strategies as st
import numpy as np
import pytest

tvm = pytest.importorskip("tvm")
from tvm import relax  # noqa: E402

from qcal.backend.tvm import depthwise, schedules  # noqa: E402
from qcal.reference import kernels as numpy_kernels  # noqa: E402

TARGET = schedules.cpu_target()
needs_vnni_vbmi = pytest.mark.skipif(not depthwise.depthwise_supported(TARGET),
                                     reason="this CPU has no AVX-512 VNNI + VBMI")


def _const(array):
    return relax.const(array, str(array.dtype))


def _conv_module(shape, weight, strides, pads, epilogue=False, groups=None):
    """main(x) = the int32 depthwise conv of x (optionally requantized to int8 after it)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType(shape, "int8"))
    with bb.function("main", [x]):
        with bb.dataflow():
            y = bb.emit(relax.op.nn.conv2d(x, _const(weight), strides=strides, padding=pads,
                                           groups=groups or shape[1], out_dtype="int32"))
            if epilogue:  # the adapter's requantize: + bias, rounding shift in int64, clip, cast
                channels = weight.shape[0]
                rng = np.random.default_rng(5)
                bias = rng.integers(-3000, 3000, (1, channels, 1, 1)).astype("int32")
                shift = rng.integers(4, 10, (1, channels, 1, 1)).astype("int64")
                y = bb.emit(relax.op.astype(bb.emit(relax.op.add(y, _const(bias))), "int64"))
                y = bb.emit(relax.op.add(y, _const(np.left_shift(1, shift - 1))))
                y = bb.emit(relax.op.clip(bb.emit(relax.op.right_shift(y, _const(shift))),
                                          -128, 127))
                y = bb.emit(relax.op.astype(y, "int8"))
            out = bb.emit_output(y)
        bb.emit_func_output(out)
    return bb.get()


def _run(mod, x, target=TARGET, schedule=True):
    ex = schedules.build(mod, target, schedule=schedule)
    return relax.VirtualMachine(ex, tvm.cpu())["main"](tvm.runtime.tensor(x)).numpy()


def _rules(mod, target=TARGET):
    return sorted(schedules.scheduled_functions(schedules.lower(mod, target)).values())


def _int8(rng, shape):
    return rng.integers(-128, 128, shape).astype("int8")


@needs_vnni_vbmi
@hypothesis.settings(max_examples=12, deadline=None, derandomize=True, database=None)
@hypothesis.given(
    batch=st.integers(1, 2), channels=st.sampled_from([2, 3, 5, 16, 17, 37]),
    kernel=st.tuples(st.integers(1, 7), st.integers(1, 7)),
    strides=st.tuples(st.integers(1, 3), st.integers(1, 3)),
    size=st.tuples(st.integers(1, 23), st.integers(1, 41)),
    pads=st.tuples(*[st.integers(0, 3)] * 4), seed=st.integers(0, 2 ** 16))
def test_bit_exact_with_numpy_on_random_shapes(batch, channels, kernel, strides, size, pads, seed):
    """Square and rectangular kernels 1x1..7x7, strides 1-3 per axis, asymmetric padding, rows
    from 1 pixel to several vectors (partial last vectors and row tiles), the whole int8 range:
    the windows, the +128 shift and its correction are exact."""
    (kh, kw), (h, w) = kernel, size
    pads = tuple(min(p, k - 1) for p, k in zip(pads, (kh, kw, kh, kw)))
    hypothesis.assume(h + pads[0] + pads[2] >= kh and w + pads[1] + pads[3] >= kw)
    hypothesis.assume(depthwise.fits(kw, strides[1]))
    rng = np.random.default_rng(seed)
    x = _int8(rng, (batch, channels, h, w))
    weight = _int8(rng, (channels, 1, kh, kw))
    mod = _conv_module(x.shape, weight, strides, pads)
    assert _rules(mod) == ["depthwise_pack", "depthwise_vnni"]
    out = _run(mod, x)
    ref = numpy_kernels.conv2d(x, weight, strides, pads, groups=channels)
    assert out.dtype == np.int32 and np.array_equal(out, ref)


@needs_vnni_vbmi
def test_extreme_values_and_fused_requantize():
    """-128 inputs against -128 / 127 taps over a 7x7 window (the largest sums), raw and with the
    requantize epilogue fused into the kernel (its output is then int8: no int32 tensor)."""
    x = np.full((1, 4, 9, 20), -128, np.int8)
    weight = np.full((4, 1, 7, 7), -128, np.int8)
    weight[1::2] = 127
    raw = _conv_module(x.shape, weight, (1, 1), (3, 3, 3, 3))
    out = _run(raw, x)
    assert np.array_equal(out, numpy_kernels.conv2d(x, weight, (1, 1), (3, 3, 3, 3), groups=4))
    assert out[0, 0, 4, 10] == 49 * 128 * 128 and out[0, 1, 4, 10] == -49 * 128 * 127
    rng = np.random.default_rng(3)
    x, weight = _int8(rng, (2, 24, 30, 30)), _int8(rng, (24, 1, 3, 3))
    fused = _conv_module(x.shape, weight, (2, 2), (0, 0, 1, 1), epilogue=True)
    assert np.array_equal(_run(fused, x), _run(fused, x, schedule=False))
    lowered = schedules.lower(fused, TARGET)
    (name,) = [n for n, r in schedules.scheduled_functions(lowered).items() if r == "depthwise_vnni"]
    assert str(lowered[name].params[-1].dtype) == "int8"


def test_packed_weight_and_window_indices():
    """Lane bytes: taps 4q..4q+3 of one kernel row (zero past the width), little-endian; the
    accumulator start is -128 x the channel's tap sum; byte 4l + k of quad q reads input byte
    l * stride + 4q + k."""
    weight = np.arange(-15, 15, dtype=np.int8).reshape(2, 1, 3, 5)
    packed, init = depthwise.pack_depthwise_weight(weight)
    assert packed.shape == (2, 3, 2) and packed.dtype == np.int32
    as_bytes = packed.astype("<i4").view(np.int8).reshape(2, 3, 8)
    assert np.array_equal(as_bytes[:, :, :5], weight[:, 0]) and not as_bytes[:, :, 5:].any()
    assert list(init) == [-128 * int(weight[0].sum()), -128 * int(weight[1].sum())]
    idx = depthwise.permute_indices(5, 2)
    assert idx.shape == (2, 64)
    assert [int(idx[q, 4 * lane + k]) for q, lane, k in ((0, 0, 0), (0, 3, 2), (1, 15, 3))] == \
        [0, 8, 30 + 4 + 3]
    assert depthwise.fits(7, 3) and not depthwise.fits(7, 4)


@needs_vnni_vbmi
@pytest.mark.parametrize("case", ["multiplier", "wide_stride"])
def test_declined_convs_take_the_s_tir_rule(case):
    """Two output channels per input channel, or a stride whose 16 windows one load cannot hold:
    the conv stays for the s_tir depthwise rule (or the grouped one), and stays exact."""
    rng = np.random.default_rng(4)
    x = _int8(rng, (1, 8, 17, 37))
    if case == "multiplier":
        weight, strides = _int8(rng, (16, 1, 3, 3)), (1, 1)
    else:
        weight, strides = _int8(rng, (8, 1, 3, 7)), (1, 4)
    mod = _conv_module(x.shape, weight, strides, (1, 1, 1, 1))
    assert "depthwise_vnni" not in _rules(mod)
    assert np.array_equal(_run(mod, x), numpy_kernels.conv2d(x, weight, strides, (1, 1, 1, 1),
                                                             groups=8))


def test_feature_check():
    """VNNI without VBMI (Cascade Lake) or VBMI without VNNI (Cannon Lake) is not enough."""
    def target(mcpu):
        return tvm.target.Target({"kind": "llvm", "mcpu": mcpu})

    assert depthwise.depthwise_supported(target("icelake-server"))
    assert not depthwise.depthwise_supported(target("cascadelake"))
    assert not depthwise.depthwise_supported(target("cannonlake"))
    assert not depthwise.depthwise_supported(target("haswell"))
