"""Sound value intervals of integer Relax tensors, from the bindings that compute them.

What it is for: a VNNI conv can read a channel-blocked int8 input in place, without the pack
that adds 128 to every byte, only when every value of that input is >= 0 (``vpdpbusd`` reads
its activation bytes as unsigned; ``qcal.backend.tvm.vnni``). ``ValueBounds.nonnegative``
answers that from the graph alone: interval arithmetic over the dataflow bindings, from the
constants (exact) and the function's parameters (their dtype's whole range). The same
intervals tell ``qcal.backend.tvm.pool_order`` that a requantize cannot wrap (``exact``).

Soundness is the only requirement; a loose interval costs a pack, an unsound one a wrong
result. So every rule either computes the exact image of its operands' intervals, or answers
the result dtype's whole range: wherever the exact interval leaves that dtype (an add or
multiply that could wrap, a cast that could truncate, a shift by the dtype's width or more, whose
result LLVM leaves undefined), and for every op it does not know.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

Interval = tuple[int, int]

_CONV2D = tvm.ir.Op.get("relax.nn.conv2d")
MAX_POOL = tvm.ir.Op.get("relax.nn.max_pool2d")


def dtype_range(dtype: str) -> Interval | None:
    """The values an integer dtype holds; None for any other dtype."""
    try:
        info = np.iinfo(np.dtype(str(dtype)))
    except (TypeError, ValueError):
        return None
    return int(info.min), int(info.max)


def _within(interval: Interval, dtype: str) -> Interval | None:
    whole = dtype_range(dtype)
    if whole is None:
        return None
    lo, hi = interval
    return (lo, hi) if whole[0] <= lo and hi <= whole[1] else whole


def pool_windows_hold_input(attrs) -> bool:
    """Every window of a max pool with these attributes holds at least one input value (no
    ``ceil_mode``, padding smaller than the window), so each output is one of its inputs: a window
    of padding alone would give the padding's value instead."""
    window = [int(k) for k in attrs.pool_size]
    return not bool(attrs.ceil_mode) and all(
        int(p) < window[i % 2] for i, p in enumerate(attrs.padding))


def _dtype(expr) -> str | None:
    ty = getattr(expr, "ty", None)
    return str(ty.dtype) if isinstance(ty, relax.TensorType) else None


def _prim_int(expr) -> int | None:
    """The integer of a clip bound (an ``IntImm``, or a ``relax.PrimValue`` holding one), else
    None (a float bound)."""
    value = getattr(expr, "value", None)
    if isinstance(value, tvm.tirx.IntImm):
        value = value.value
    return value if isinstance(value, int) and not isinstance(value, bool) else None


def _products(a: Interval, b: Interval) -> Interval:
    products = [x * y for x in a for y in b]
    return min(products), max(products)


class ValueBounds:
    """Intervals of the variables bound in ``values`` (var -> its bound expression), computed
    on demand and memoised."""

    def __init__(self, values: dict):
        self.values = values
        self.memo: dict = {}

    def nonnegative(self, expr) -> bool:
        interval = self.of(expr)
        return interval is not None and interval[0] >= 0

    def exact(self, var) -> bool:
        """Whether the op bound to ``var`` computes its exact result: its operands' intervals
        map into its dtype, so nothing wraps, truncates or shifts out of range."""
        value = self.values.get(var)
        whole = dtype_range(_dtype(var))
        if whole is None or not (isinstance(value, relax.Call)
                                 and isinstance(value.op, tvm.ir.Op)):
            return False
        interval = self._call(value, _dtype(var))
        return interval is not None and whole[0] <= interval[0] and interval[1] <= whole[1]

    def of(self, expr) -> Interval | None:
        """[lo, hi] holding every value of the integer tensor ``expr``; None for a non-integer
        one."""
        if isinstance(expr, tvm.ir.expr.Constant):
            a = expr.value.numpy()
            if dtype_range(a.dtype) is None or a.size == 0:
                return None
            return int(a.min()), int(a.max())
        if isinstance(expr, relax.Var):
            if expr not in self.memo:
                value = self.values.get(expr)
                self.memo[expr] = (dtype_range(_dtype(expr)) if value is None
                                   else self.of(value))
            return self.memo[expr]
        dtype = _dtype(expr)
        whole = dtype_range(dtype)
        if whole is None:
            return None
        if not (isinstance(expr, relax.Call) and isinstance(expr.op, tvm.ir.Op)):
            return whole
        exact = self._call(expr, dtype)
        return whole if exact is None else _within(exact, dtype)

    def _call(self, call, dtype) -> Interval | None:
        """The exact interval of ``call``'s result before any wrap-around, or None (unknown)."""
        name = call.op.name
        if call.op.same_as(_CONV2D):
            return self._conv2d(call)
        if name == "relax.clip":
            x, lo, hi = self.of(call.args[0]), _prim_int(call.args[1]), _prim_int(call.args[2])
            if x is None or lo is None or hi is None:
                return None
            # min(max(x, lo), hi), end by end: right for an x wholly above hi or below lo too
            return min(max(x[0], lo), hi), min(max(x[1], lo), hi)
        if name == "relax.nn.relu":
            x = self.of(call.args[0])
            return None if x is None else (max(x[0], 0), max(x[1], 0))
        if name == "relax.astype":
            return self.of(call.args[0])  # exact when it fits the new dtype (checked by of)
        if call.op.same_as(MAX_POOL):
            return self.of(call.args[0]) if pool_windows_hold_input(call.attrs) else None
        if len(call.args) != 2:
            return None
        a, b = self.of(call.args[0]), self.of(call.args[1])
        if a is None or b is None:
            return None
        if name == "relax.add":
            return a[0] + b[0], a[1] + b[1]
        if name == "relax.subtract":
            return a[0] - b[1], a[1] - b[0]
        if name == "relax.multiply":
            return _products(a, b)
        if name == "relax.maximum":
            return max(a[0], b[0]), max(a[1], b[1])
        if name == "relax.minimum":
            return min(a[0], b[0]), min(a[1], b[1])
        if name == "relax.bitwise_and" and a[0] >= 0 and b[0] >= 0:
            return 0, min(a[1], b[1])
        bits = np.dtype(dtype).itemsize * 8
        if name in ("relax.left_shift", "relax.right_shift") and 0 <= b[0] and b[1] < bits:
            if name == "relax.left_shift":
                return _products(a, (1 << b[0], 1 << b[1]))
            # x >> s falls with s for x >= 0 and rises towards -1 for x < 0: the ends are
            # reached at the ends of both intervals
            ends = [x >> s for x in a for s in b]
            return min(ends), max(ends)
        return None

    def _conv2d(self, call) -> Interval | None:
        weight = call.args[1]
        x = self.of(call.args[0])
        if x is None or not isinstance(weight, tvm.ir.expr.Constant):
            return None
        w = weight.value.numpy().astype(np.int64)
        if dtype_range(w.dtype) is None or w.ndim != 4:
            return None
        lo, hi = x
        if any(int(p) for p in call.attrs.padding):
            lo, hi = min(lo, 0), max(hi, 0)  # padded positions read 0
        flat = w.reshape(w.shape[0], -1)
        positive, negative = np.clip(flat, 0, None).sum(1), np.clip(flat, None, 0).sum(1)
        # per output channel: each product's range is w * [lo, hi]
        lows = positive * lo + negative * hi
        highs = positive * hi + negative * lo
        return int(lows.min()), int(highs.max())
