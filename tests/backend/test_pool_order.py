"""``qcal.backend.tvm.pool_order``: a max pool moved after the requantize it feeds gives the same
values bit for bit, and is left in place where the identity behind it does not hold."""
from __future__ import annotations

import numpy as np
import tvm
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tvm import relax

from qcal.backend.tvm.pool_order import requantize_before_max_pools
from qcal.backend.tvm.schedules import cpu_target

TARGET = cpu_target()
_MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")


def _pool_input_dtypes(mod):
    found = []

    def visit(expr):
        if isinstance(expr, relax.Call) and expr.op.same_as(_MAX_POOL):
            found.append(str(expr.args[0].ty.dtype))

    relax.analysis.post_order_visit(mod["main"].body, visit)
    return found


def _const(rng, lo, hi, channels, dtype, scalar):
    shape = () if scalar else (1, channels, 1, 1)
    return relax.const(rng.integers(lo, hi, shape, endpoint=True).astype(dtype), dtype)


def _module(seed, channels, size, pool, steps, rounding="upward", multiplier_sign=1):
    """x int32 -> clip to +-2^20 -> max pool -> a requantize-like chain -> int8."""
    rng = np.random.default_rng(seed)
    x = relax.Var("x", relax.TensorType((2, channels, size, size), "int32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            v = builder.emit(relax.op.clip(x, -(1 << 20), 1 << 20))
            kernel, stride, pad, ceil_mode = pool
            v = builder.emit(relax.op.nn.max_pool2d(v, (kernel, kernel), (stride, stride),
                                                    (pad, pad), ceil_mode=ceil_mode))
            for kind in steps:
                scalar = bool(rng.random() < 0.3)
                if kind == "add":
                    v = builder.emit(relax.op.add(v, _const(rng, -5000, 5000, channels, "int32",
                                                            scalar)))
                elif kind == "subtract":
                    v = builder.emit(relax.op.subtract(v, _const(rng, -5000, 5000, channels,
                                                                 "int32", scalar)))
                elif kind == "multiply":
                    m = _const(rng, 0, 300, channels, "int32", scalar)
                    v = builder.emit(relax.op.multiply(v, relax.const(
                        multiplier_sign * m.value.numpy(), "int32")))
                elif kind == "right_shift":
                    v = builder.emit(relax.op.right_shift(v, _const(rng, 0, 12, channels, "int32",
                                                                    scalar)))
                elif kind == "left_shift":
                    v = builder.emit(relax.op.left_shift(v, _const(rng, 0, 3, channels, "int32",
                                                                   scalar)))
                elif kind == "maximum":
                    v = builder.emit(relax.op.maximum(v, _const(rng, -3000, 3000, channels,
                                                                "int32", scalar)))
                elif kind == "minimum":
                    v = builder.emit(relax.op.minimum(v, _const(rng, -3000, 3000, channels,
                                                                "int32", scalar)))
            if rounding == "nearest":  # ties to even: the shifted value's low bit is added
                odd = builder.emit(relax.op.bitwise_and(
                    relax.op.right_shift(v, relax.const(4, "int32")), relax.const(1, "int32")))
                v = builder.emit(relax.op.right_shift(
                    relax.op.add(relax.op.add(v, relax.const(7, "int32")), odd),
                    relax.const(4, "int32")))
            v = builder.emit(relax.op.minimum(relax.op.maximum(v, relax.const(-127, "int32")),
                                              relax.const(127, "int32")))
            out = builder.emit_output(relax.op.astype(v, "int8"))
        builder.emit_func_output(out)
    return builder.get()


def _run(mod, data):
    vm = relax.VirtualMachine(tvm.compile(mod, TARGET), tvm.cpu())
    return vm["main"](tvm.runtime.tensor(data)).numpy()


def _data(seed, channels, size):
    rng = np.random.default_rng(seed + 1)
    data = rng.integers(-(1 << 21), 1 << 21, (2, channels, size, size)).astype(np.int32)
    data.reshape(-1)[::7] = 0  # ties: equal values in a window
    return data


STEPS = st.lists(st.sampled_from(("add", "subtract", "multiply", "right_shift", "left_shift",
                                  "maximum", "minimum")), max_size=5)
POOLS = st.sampled_from(((3, 2, 1, False), (2, 2, 0, False), (3, 1, 1, False), (3, 2, 0, False)))


@settings(max_examples=max(20, 2 * settings.default.max_examples), deadline=None)
@given(seed=st.integers(0, 2 ** 31 - 1), channels=st.integers(1, 5), size=st.integers(3, 12),
       pool=POOLS, steps=STEPS)
def test_the_pool_after_the_requantize_gives_the_same_values(seed, channels, size, pool, steps):
    mod = _module(seed, channels, size, pool, steps)
    moved = requantize_before_max_pools(mod)
    data = _data(seed, channels, size)
    assert np.array_equal(_run(moved, data), _run(mod, data))
    dtypes = _pool_input_dtypes(moved)
    event(f"pool reads {dtypes}")
    assert len(dtypes) == 1
    if "multiply" not in steps and "left_shift" not in steps:
        # adds of |c| <= 5000, shifts, min and max on +-2^20 cannot wrap: always moved, the pool
        # then reads the int8 result
        assert dtypes == ["int8"]


def test_a_pool_is_left_where_the_identity_does_not_hold():
    steps = ["add", "right_shift"]
    # the same chain moves ...
    assert _pool_input_dtypes(requantize_before_max_pools(
        _module(0, 3, 8, (3, 2, 1, False), steps))) == ["int8"]
    # ... but not with ties-to-even rounding (not a chain: it reads the shifted value's low bit),
    # a ceil-mode or all-padding window, or a negative multiplier (decreasing)
    for mod in (_module(0, 3, 8, (3, 2, 1, False), steps, rounding="nearest"),
                _module(0, 3, 8, (3, 2, 1, True), steps),
                _module(0, 3, 8, (2, 2, 2, False), steps),
                _module(0, 3, 8, (3, 2, 1, False), ["multiply"], multiplier_sign=-1)):
        assert _pool_input_dtypes(requantize_before_max_pools(mod)) == ["int32"]
    # and not where an add could wrap: the same chain on the whole int32 range
    x = relax.Var("x", relax.TensorType((1, 2, 6, 6), "int32"))
    builder = relax.BlockBuilder()
    with builder.function("main", [x]):
        with builder.dataflow():
            pooled = builder.emit(relax.op.nn.max_pool2d(x, (2, 2), (2, 2)))
            shifted = builder.emit(relax.op.add(pooled, relax.const(1, "int32")))
            out = builder.emit_output(relax.op.astype(shifted, "int8"))
        builder.emit_func_output(out)
    assert _pool_input_dtypes(requantize_before_max_pools(builder.get())) == ["int32"]
