"""Requantize before a max pool instead of after it: a Relax rewrite that runs before legalization.

The stem of a ResNet is conv -> bias -> ReLU -> 3x3/2 max pool on the int32 accumulators ->
requantize to int8 (``qcal.quant.realize`` emits the pool where the float graph has it). The
pool then reads the int32 tensor, 4 bytes a value, and the conv writes it: resnet50_v1's stem
pool was 2.5 % of its forward (``scripts/profile_layers.py``). Every op of a requantize is
monotone non-decreasing in its input (adds, shifts and non-negative multiplies that cannot
wrap, min/max and clips with constants, widening or fitting casts), and for such an f,
``max(f(a), f(b)) == f(max(a, b))``: the requantize can run first, fused into the conv's
epilogue, and the pool on the int8 result gives the same values exactly, with a quarter of the
bytes read and written.

Conditions, each needed for that identity:

* the ops between the pool and the narrowing cast form a chain, each used once, each with one
  variable operand (the chain's value, first for subtract and shifts) and constants that do not
  vary within a window (scalars, or per channel / per image: shape (A, C, 1, 1));
  ties-to-even rounding (``(v >> s) & 1`` of the value) is not a chain and stays after the pool;
* every op is exact on the pool's input range (``qcal.backend.tvm.value_bounds``: no add,
  multiply or shift can wrap, no cast can truncate);
* every window of the pool holds at least one input value (no ``ceil_mode``, padding smaller than
  the window): a window of padding alone would give the padding's value, which f does not map.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcal.backend.tvm.blocked import rebuilt_module, single_dataflow_body
from qcal.backend.tvm.value_bounds import MAX_POOL, ValueBounds, pool_windows_hold_input

# monotone non-decreasing in their first operand for any constant second operand, given no wrap
# (multiply: for a non-negative constant only)
_MONOTONE = frozenset(f"relax.{name}" for name in (
    "add", "subtract", "multiply", "left_shift", "right_shift", "maximum", "minimum"))


def _window_constant(expr) -> bool:
    """A constant that is the same at every pixel of a pool window."""
    if not isinstance(expr, tvm.ir.expr.Constant):
        return False
    shape = expr.value.shape
    return len(shape) == 0 or (len(shape) == 4 and tuple(shape[2:]) == (1, 1))


def _pool_keeps_values(call) -> bool:
    a = call.attrs
    return (str(a.layout) == "NCHW" and str(a.out_layout) == "NCHW"
            and pool_windows_hold_input(a))


def _width(dtype: str) -> int:
    return np.dtype(dtype).itemsize


class _Planner:
    """Which pools of one dataflow function move below their requantize."""

    def __init__(self, func):
        bindings = func.body.blocks[0].bindings
        self.values = {b.var: b.value for b in bindings}
        self.bounds = ValueBounds(self.values)
        self.users: dict = {}
        for b in bindings:
            for arg in self._var_args(b.value):
                self.users.setdefault(arg, []).append(b.var)
        for arg in self._var_args(func.body.body):
            self.users.setdefault(arg, []).append(None)  # the function's result
        self.outputs = {b.var for b in bindings if not isinstance(b.var, relax.DataflowVar)}

    @staticmethod
    def _var_args(expr):
        if isinstance(expr, relax.Var):
            return [expr]
        if isinstance(expr, relax.Call):
            return [a for a in expr.args if isinstance(a, relax.Var)]
        if isinstance(expr, relax.Tuple):
            return [f for f in expr.fields if isinstance(f, relax.Var)]
        if isinstance(expr, relax.TupleGetItem):
            return _Planner._var_args(expr.tuple_value)
        return []

    def _only_user(self, var):
        users = self.users.get(var, [])
        if len(users) != 1 or users[0] is None or var in self.outputs:
            return None
        return users[0]

    def _monotone_step(self, var, user) -> bool:
        """``user``'s value is a monotone op of ``var`` and constants that cannot wrap."""
        value = self.values[user]
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return False
        name = value.op.name
        if name == "relax.astype":
            return value.args[0].same_as(var) and self.bounds.exact(user)
        if name not in _MONOTONE or len(value.args) != 2:
            return False
        first, second = value.args
        if not first.same_as(var):
            if name in ("relax.subtract", "relax.left_shift", "relax.right_shift"):
                return False
            first, second = second, first
        if not (first.same_as(var) and _window_constant(second)):
            return False
        if name == "relax.multiply" and second.value.numpy().min(initial=0) < 0:
            return False
        return self.bounds.exact(user)

    def plan(self):
        """pool var -> the chain of vars after it, the last a cast to a narrower dtype."""
        plans = {}
        for var, value in self.values.items():
            if not (isinstance(value, relax.Call) and value.op.same_as(MAX_POOL)
                    and _pool_keeps_values(value)):
                continue
            chain, current = [], var
            source_width = _width(str(var.ty.dtype))
            while True:
                user = self._only_user(current)
                if user is None or not self._monotone_step(current, user):
                    break
                chain.append(user)
                current = user
            # end at the narrowest cast, so the pool reads the fewest bytes
            widths = [_width(str(v.ty.dtype)) for v in chain]
            if widths and min(widths) < source_width:
                chain = chain[:widths.index(min(widths)) + 1]
                plans[var] = chain
        return plans


def _rebuild(func, plans, builder, name):
    """Emit into ``builder`` as ``name`` the function with each planned pool moved after its
    chain."""
    moved = {v for chain in plans.values() for v in chain}
    last_of = {chain[-1]: pool for pool, chain in plans.items()}
    new: dict = {}

    def sub(expr):
        if isinstance(expr, relax.Var):
            return new.get(expr, expr)
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([sub(f) for f in expr.fields])
        if isinstance(expr, relax.TupleGetItem):
            return relax.TupleGetItem(sub(expr.tuple_value), expr.index)
        if isinstance(expr, relax.Call):
            return relax.Call(expr.op, [sub(a) for a in expr.args], expr.attrs, expr.ty_args)
        return expr

    values = {b.var: b.value for b in func.body.blocks[0].bindings}
    with builder.function(name, list(func.params), private=True):
        with builder.dataflow():
            for b in func.body.blocks[0].bindings:
                var, value = b.var, b.value
                if var in plans:
                    continue  # emitted after its chain
                if var in moved and var not in last_of:
                    continue  # emitted with its chain's end
                if var in last_of:
                    pool = last_of[var]
                    x, previous = sub(values[pool].args[0]), pool
                    for step in plans[pool]:
                        op = values[step]
                        args = [x if a.same_as(previous) else a for a in op.args]
                        x = builder.emit(relax.Call(op.op, args, op.attrs, op.ty_args))
                        previous = step
                    a = values[pool].attrs
                    value = relax.op.nn.max_pool2d(x, a.pool_size, a.strides, a.padding,
                                                   a.dilation, bool(a.ceil_mode),
                                                   bool(a.count_include_pad), str(a.layout),
                                                   str(a.out_layout))
                else:
                    value = sub(value)
                output = not isinstance(var, relax.DataflowVar)
                new[var] = builder.emit_output(value) if output else builder.emit(value)
        builder.emit_func_output(sub(func.body.body))


def requantize_before_max_pools(mod: tvm.IRModule) -> tvm.IRModule:
    """``mod`` with every max pool whose result is only requantized computed after the
    requantize, on the narrower values (module docstring); other functions as they are."""
    builder, names = relax.BlockBuilder(mod), {}
    for gvar, func in list(mod.functions.items()):
        if not (isinstance(func, relax.Function) and single_dataflow_body(func)):
            continue
        plans = _Planner(func).plan()
        if plans:
            names[gvar] = f"qcal_pool_order_{gvar.name_hint}"
            _rebuild(func, plans, builder, names[gvar])
    return rebuilt_module(builder, mod, names) if names else mod
