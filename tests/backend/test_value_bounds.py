"""``qcal.backend.tvm.value_bounds``: every value TVM computes lies inside the interval claimed.

The property behind the VNNI in-place read (a conv reads its input bytes as unsigned only where
the analysis proves them >= 0): random chains of the integer ops the emitter writes (and some it
does not), including ones that wrap, truncate or shift, compiled by TVM and run on random inputs
that include each dtype's extremes; each intermediate tensor is an output and is checked against
its interval. A too-wide interval costs a pack; a too-narrow one would be a wrong result."""
from __future__ import annotations

import numpy as np
import tvm
from hypothesis import given, settings
from hypothesis import strategies as st
from tvm import relax

from qcal.backend.tvm.schedules import cpu_target
from qcal.backend.tvm.value_bounds import ValueBounds, dtype_range

TARGET = cpu_target()
INT_DTYPES = ("int8", "int16", "int32")
BINARY = ("add", "subtract", "multiply", "maximum", "minimum", "bitwise_and")


def _random_constant(rng, dtype, channels):
    lo, hi = dtype_range(dtype)
    if rng.random() < 0.8:  # mostly small: a result that fits its dtype keeps a narrow interval
        lo, hi = max(lo, -20), min(hi, 20)
    shape = () if rng.random() < 0.3 else (1, channels, 1, 1)
    return rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)


def _step(rng, x, dtype, channels, size, kind=None):
    """One random op on ``x`` (``size`` x ``size`` pixels): (the expression, its dtype, its
    size)."""
    kind = kind or rng.choice(["binary", "shift", "clip", "relu", "astype", "conv", "conv", "pool"])
    if kind == "conv" and dtype == "int8":
        kh, pad = int(rng.integers(1, 4)), int(rng.integers(0, 2))
        if size + 2 * pad >= kh:
            weight = rng.integers(-128, 128, (channels, channels, kh, kh)).astype("int8")
            return relax.op.nn.conv2d(x, relax.const(weight, "int8"), padding=(pad, pad),
                                      out_dtype="int32"), "int32", size + 2 * pad - kh + 1
    if kind == "pool":
        # padding up to the window: a window may then hold padding only
        pad, ceil_mode = int(rng.integers(0, 3)), bool(rng.random() < 0.3)
        if size + 2 * pad >= 2:
            out = (size + 2 * pad - 2 + (1 if ceil_mode else 0)) // 2 + 1
            return relax.op.nn.max_pool2d(x, (2, 2), (2, 2), (pad, pad),
                                          ceil_mode=ceil_mode), dtype, out
    if kind == "astype":
        new = str(rng.choice(INT_DTYPES))
        return relax.op.astype(x, new), new, size
    if kind == "relu":
        return relax.op.nn.relu(x), dtype, size
    if kind == "clip":
        lo, hi = dtype_range(dtype)
        a, b = sorted(int(v) for v in rng.integers(max(lo, -300), min(hi, 300), 2, endpoint=True))
        return relax.op.clip(x, a, b), dtype, size
    if kind == "shift":
        bits = np.dtype(dtype).itemsize * 8
        shifts = rng.integers(0, bits, (1, channels, 1, 1)).astype(dtype)
        op = relax.op.left_shift if rng.random() < 0.5 else relax.op.right_shift
        return op(x, relax.const(shifts, dtype)), dtype, size
    name = str(rng.choice(BINARY))
    other = _random_constant(rng, dtype, channels)
    if name == "bitwise_and":
        other = np.abs(other.astype(np.int64)).astype(dtype)
    return getattr(relax.op, name)(x, relax.const(other, dtype)), dtype, size


def _chain(seed, steps, channels, size):
    rng = np.random.default_rng(seed)
    dtype = str(rng.choice(INT_DTYPES + ("int8",)))  # int8 twice: convs take only int8
    x = relax.Var("x", relax.TensorType((1, channels, size, size), dtype))
    builder = relax.BlockBuilder()
    outputs = []
    with builder.function("main", [x]):
        with builder.dataflow():
            current, current_dtype, current_size = x, dtype, size
            for i in range(steps):
                # a clip first: the intervals after it are narrow, often of one sign, where a
                # rule's ends (padding's 0, a clip wholly above its hi, a pool's padded window)
                # decide the answer
                expr, current_dtype, current_size = _step(rng, current, current_dtype, channels,
                                                          current_size, "clip" if i == 0 else None)
                var = builder.emit(expr)
                outputs.append(var)
                current = var
            out = builder.emit_output(relax.Tuple(outputs))
        builder.emit_func_output(out)
    return builder.get(), x, dtype, outputs


def _inputs(rng, dtype, shape):
    lo, hi = dtype_range(dtype)
    x = rng.integers(lo, hi, size=shape, endpoint=True).astype(dtype)
    flat = x.reshape(-1)
    flat[: flat.size // 4] = lo  # the extremes, where wrap-around and truncation show
    flat[flat.size // 4: flat.size // 2] = hi
    rng.shuffle(flat)
    return x


@settings(max_examples=max(40, 2 * settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), steps=st.integers(2, 8),
       channels=st.integers(1, 4), size=st.integers(2, 9))
def test_every_value_lies_within_its_claimed_bounds(seed, steps, channels, size):
    mod, x, dtype, outputs = _chain(seed, steps, channels, size)
    func = mod["main"]
    bindings = func.body.blocks[0].bindings
    bounds = ValueBounds({b.var: b.value for b in bindings})
    claimed = [bounds.of(var) for var in outputs]
    executable = tvm.compile(mod, TARGET)
    vm = relax.VirtualMachine(executable, tvm.cpu())
    data = _inputs(np.random.default_rng(seed + 1), dtype, (1, channels, size, size))
    results = vm["main"](tvm.runtime.tensor(data))
    for i, (result, interval) in enumerate(zip(results, claimed)):
        got = result.numpy().astype(np.int64)
        lo, hi = interval
        assert lo <= got.min() and got.max() <= hi, (
            f"step {i}: values {got.min()}..{got.max()} outside the claimed {lo}..{hi}\n"
            f"{func.script()}")


def _relu_requantize_module():
    """int8 in -> 3x3 conv -> bias -> rounding shift -> clip to int8 -> ReLU: the emitter's
    ReLU epilogue; then the same without the ReLU."""
    rng = np.random.default_rng(0)
    x = relax.Var("x", relax.TensorType((1, 4, 6, 6), "int8"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            conv = builder.emit(relax.op.nn.conv2d(
                x, relax.const(rng.integers(-127, 128, (4, 4, 3, 3)).astype("int8"), "int8"),
                padding=(1, 1), out_dtype="int32"))
            biased = builder.emit(relax.op.add(conv, relax.const(
                rng.integers(-3000, 3000, (1, 4, 1, 1)).astype("int32"), "int32")))
            rounded = builder.emit(relax.op.add(biased, relax.const(64, "int32")))
            shifted = builder.emit(relax.op.right_shift(rounded, relax.const(7, "int32")))
            clipped = builder.emit(relax.op.minimum(relax.op.maximum(
                shifted, relax.const(-127, "int32")), relax.const(127, "int32")))
            signed = builder.emit(relax.op.astype(clipped, "int8"))
            relu = builder.emit(relax.op.maximum(signed, relax.const(0, "int8")))
            out = builder.emit_output(relax.Tuple([signed, relu]))
        builder.emit_func_output(out)
    return builder.get(), signed, relu


def test_a_relu_output_is_proved_nonnegative_and_a_requantized_value_is_not():
    mod, signed, relu = _relu_requantize_module()
    bindings = mod["main"].body.blocks[0].bindings
    bounds = ValueBounds({b.var: b.value for b in bindings})
    assert bounds.of(relu) == (0, 127)
    assert bounds.nonnegative(relu)
    assert bounds.of(signed) == (-127, 127)
    assert not bounds.nonnegative(signed)


def test_a_padded_conv_counts_the_padding_zeros():
    """Inputs in [5, 10] and a 3x3 all-ones kernel: a corner output sums 4 inputs and 5 padded
    zeros (20 at least), below the 45 that 9 real inputs would give."""
    x = relax.Var("x", relax.TensorType((1, 1, 4, 4), "int8"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            clipped = builder.emit(relax.op.clip(x, 5, 10))
            conv = builder.emit(relax.op.nn.conv2d(
                clipped, relax.const(np.ones((1, 1, 3, 3), "int8"), "int8"), padding=(1, 1),
                out_dtype="int32"))
            out = builder.emit_output(conv)
        builder.emit_func_output(out)
    mod = builder.get()
    bounds = ValueBounds({b.var: b.value for b in mod["main"].body.blocks[0].bindings})
    assert bounds.of(conv) == (0, 90)
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    got = vm["main"](tvm.runtime.tensor(np.full((1, 1, 4, 4), 5, "int8"))).numpy()
    assert got.min() == 20
