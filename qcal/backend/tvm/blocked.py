"""Channel-blocked activations between VNNI convs: a Relax rewrite that runs before legalization.

Where this sits: ``qcal.backend.tvm.vnni.rewrite_vnni_convs`` (called by
``schedules.rewrite_int8_convs`` on a VNNI target) runs ``rewrite_blocked``. It replaces every
int8 conv2d that ``schedules.int8_conv_geometry`` accepts by the VNNI PrimFuncs and keeps the
tensors around them in a channel-blocked layout, ``(N, C/v, H, W, v)`` with v the int32 lanes of
``vpdpbusd`` (16 with AVX-512, NCHW16c): the layout of the conv's accumulator tiles (8 pixels x
v channels, one register a pixel). So

* the conv writes its accumulators (and the epilogue FuseOps fuses into it) as whole vectors,
  16 channels of one pixel contiguous, instead of gathering each NCHW row of 8 pixels from 8
  registers (a transpose that cost as much as the multiply-adds of a 1x1 conv with 64 input
  channels, measured by ``scripts/profile_layers.py``);
* the epilogue's per-channel constants (bias, shifts, multipliers, clip bounds), the residual
  add's other operand and the max pool follow the same layout, so an int32 shortcut is written
  and read back as contiguous vectors;
* the next conv's input pack reads 16 contiguous bytes a pixel (the u8 quads it writes are the
  same bytes, +128, with the padding around them).

A channel count that is not a multiple of v (a VNNI conv's out channels, ``qcal.backend.tvm.vnni``)
is padded to whole blocks: the padded lanes hold values no real channel ever reads. The ops here
are lane-wise (elementwise, pools over pixels) and never move a value to another channel, a conv
multiplies those lanes by zero weights, and the conversion to NCHW drops them; a blocked tensor
is never broadcast along its channels (a 1-channel one is converted instead).

Only the values' positions change, never an integer operation: every op is the one the emitter
wrote (``qcal.backend.tvm.emit``, checked against ``qcal.reference``), applied to the same
values, and the constants are permuted, not recomputed. Layout conversions are emitted where a
blocked value meets an op this pass does not know (flatten, dense, a conv the VNNI kernel does
not take, the function's outputs): at the graph's edges, once per tensor.

The pass walks the bindings of each Relax function whose body is one dataflow block (what
``emit_relax`` makes); any other function keeps NCHW around each VNNI conv (a conversion right
after it).

Length: the layout walk and its fallback for functions it does not take share one table of
layout-following ops and the conversions at the region's edges; they change together.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcal.backend.tvm import vnni
from qcal.backend.tvm.schedules import _CONV2D, int8_conv_geometry
from qcal.backend.tvm.value_bounds import MAX_POOL, ValueBounds
from qcal.backend.tvm.vnni import vector_blocks

# Elementwise ops the emitter's integer epilogues are made of (requantize, bias, ReLU, clip,
# residual add): each is applied to blocked operands as it is to NCHW ones.
_ELEMENTWISE = frozenset(f"relax.{name}" for name in (
    "add", "subtract", "multiply", "right_shift", "left_shift", "bitwise_and", "bitwise_or",
    "bitwise_xor", "maximum", "minimum", "astype", "clip", "floor_divide", "floor_mod", "equal"))
_SUM = tvm.ir.Op.get("relax.sum")


def _static_shape(expr) -> tuple[int, ...] | None:
    ty = getattr(expr, "ty", None)
    shape = getattr(ty, "shape", None)
    if shape is None or not isinstance(ty, relax.TensorType):
        return None
    try:
        return tuple(int(d) for d in shape)
    except (TypeError, ValueError):
        return None


def blocked_array(a: np.ndarray, lanes: int) -> np.ndarray | None:
    """An NCHW-broadcastable constant in the blocked layout: () stays, (A, C, B, D) ->
    (A, ceil(C/lanes), B, D, lanes), with C == 1 -> (A, 1, B, D, 1); other ranks None. Padded
    channels repeat the last real one: whatever op takes the constant is as valid in a padded
    lane as in a real one (a divisor stays non-zero, a shift in range)."""
    if a.ndim == 0:
        return a
    if a.ndim != 4:
        return None
    n, c, h, w = a.shape
    if c == 1:
        return a.reshape(n, 1, h, w, 1)
    f = vector_blocks(c, lanes)
    a = np.pad(a, ((0, 0), (0, f * lanes - c), (0, 0), (0, 0)), mode="edge")
    return np.ascontiguousarray(a.reshape(n, f, lanes, h, w).transpose(0, 1, 3, 4, 2))


def _is_tensor(expr) -> bool:
    return isinstance(getattr(expr, "ty", None), relax.TensorType)


class _Blocker:
    """One function's rewrite: ``nchw`` / ``blocked`` map each original variable to the new
    variable holding its value in that layout (made on first use)."""

    def __init__(self, builder: relax.BlockBuilder, lanes: int, func=None, emulate=False):
        self.bb = builder
        self.lanes = lanes
        self.emulate = emulate  # vpdpbusd emulated (vnni.rewrite_vnni_convs)
        self.nchw: dict = {}
        self.blocked: dict = {}
        # residual adds done by one shortcut-fused conv: add's var -> (main, shortcut, bias,
        # shift, main's bias); the bindings they absorb are skipped
        self.fused: dict = {}
        self.absorbed: set = set()
        self.values: dict = {}  # original var -> its bound value
        self.bounds = ValueBounds(self.values)
        if func is not None:
            self._plan_shortcuts(func)

    # -- residual blocks: the projection shortcut computed inside the last conv's tiles --------

    def _plan_shortcuts(self, func):
        bindings = func.body.blocks[0].bindings
        self.values.update({b.var: b.value for b in bindings})
        self.uses: dict = {}

        def count(expr):
            if isinstance(expr, relax.Var):
                self.uses[expr] = self.uses.get(expr, 0) + 1
            elif isinstance(expr, relax.Tuple):
                for f in expr.fields:
                    count(f)
            elif isinstance(expr, relax.TupleGetItem):
                count(expr.tuple_value)
            elif isinstance(expr, relax.Call):
                for a in expr.args:
                    count(a)

        for b in bindings:
            count(b.value)
        count(func.body.body)
        outputs = {b.var for b in bindings if not isinstance(b.var, relax.DataflowVar)}
        for b in bindings:
            value = b.value
            if not (isinstance(value, relax.Call) and value.op.name == "relax.add"
                    and all(isinstance(a, relax.Var) for a in value.args)):
                continue
            for a, m in (value.args, value.args[::-1]):
                plan = self._match_shortcut(a, m, outputs)
                if plan is not None:
                    self.fused[b.var] = plan[0]
                    self.absorbed.update(plan[1])
                    break

    def _single_use(self, var, outputs) -> bool:
        return var in self.values and self.uses.get(var) == 1 and var not in outputs

    def _conv(self, var, outputs):
        value = self.values.get(var)
        if not (self._single_use(var, outputs) and isinstance(value, relax.Call)
                and value.op.same_as(_CONV2D)):
            return None
        geometry = int8_conv_geometry(value)
        return None if geometry is None else (value, *geometry)

    def _constant(self, expr, channels):
        """An int32 constant per output channel (scalar or (1, C, 1, 1)) as a (C,) array."""
        if not isinstance(expr, tvm.ir.expr.Constant) or str(expr.value.dtype) != "int32":
            return None
        a = expr.value.numpy()
        if a.ndim == 0 or a.shape == (1, channels, 1, 1) or a.shape == (1, 1, 1, 1):
            return np.broadcast_to(a.reshape(-1), (channels,)).astype(np.int32)
        return None

    def _match_shortcut(self, a, m, outputs):
        """``a`` = (conv + bias) << shift (casts to int32 between) and ``m`` = conv [+ bias] of
        two VNNI convs of the same output shape, each used only here: the plan, else None."""
        absorbed, ops, var = [a, m], [], a
        while True:
            value = self.values.get(var)
            if not self._single_use(var, outputs) or not isinstance(value, relax.Call):
                return None
            if value.op.same_as(_CONV2D):
                break
            if value.op.name not in ("relax.add", "relax.left_shift", "relax.astype"):
                return None
            if value.op.name == "relax.astype" and str(value.attrs.dtype) != "int32":
                return None
            ops.append(value)
            var = value.args[0]
            absorbed.append(var)
        short = self._conv(var, outputs)
        main_var, main_bias = m, None
        value = self.values.get(m)
        if isinstance(value, relax.Call) and value.op.name == "relax.add":
            main_var, main_bias = value.args[0], value.args[1]
            absorbed.append(main_var)
        main = self._conv(main_var, outputs) if isinstance(main_var, relax.Var) else None
        if short is None or main is None:
            return None
        if _static_shape(short[0]) != _static_shape(main[0]):
            return None
        channels = _static_shape(main[0])[1]
        if main_bias is not None and self._constant(main_bias, channels) is None:
            return None
        bias, shift = np.zeros(channels, np.int32), np.zeros(channels, np.int32)
        stage = 0  # the order realize emits: bias add, then the alignment's left shift
        for op in reversed(ops):
            if op.op.name == "relax.astype":
                continue
            c = self._constant(op.args[1], channels)
            if c is None:
                return None
            if op.op.name == "relax.add" and stage == 0:
                bias, stage = c, 1
            elif op.op.name == "relax.left_shift" and stage <= 1 and np.all((c >= 0) & (c < 32)):
                shift, stage = c, 2
            else:
                return None
        return (main, short, bias, shift, main_bias), absorbed

    def emit_fused(self, var, plan):
        main, short, bias, shift, main_bias = plan
        sides = []
        for call, shape, pads, strides in (main, short):
            source = call.args[0]
            blocked_input = self.blocked.get(source) if isinstance(source, relax.Var) else None
            if blocked_input is None:
                call = relax.Call(call.op, [self.as_nchw(source), call.args[1]], call.attrs,
                                  call.ty_args)
            sides.append((call, shape, pads, strides, blocked_input, self.bounds.nonnegative(source)))
        out = self.bb.emit(vnni.emit_vnni_shortcut_conv(self.bb, self.lanes, sides[0], sides[1],
                                                        bias, shift, self.emulate))
        if main_bias is not None:
            like = _static_shape(main[0])
            out = self.bb.emit(relax.op.add(out, self.as_blocked(main_bias, like)))
        return out

    # -- conversions -------------------------------------------------------------------------

    def to_nchw(self, value, channels: int):
        """The blocked ``value`` in NCHW with its first ``channels`` channels (the padded lanes
        of the last block dropped)."""
        return self.bb.emit(nchw_of_blocked(value, channels, self.bb))

    def to_blocked(self, value):
        n, c, h, w = _static_shape(value)
        v = self.lanes
        split = self.bb.emit(relax.op.reshape(value, (n, c // v, v, h, w)))
        return self.bb.emit(relax.op.permute_dims(split, [0, 1, 3, 4, 2]))

    def as_nchw(self, expr):
        """``expr`` (an original argument) with every variable replaced by its NCHW value."""
        if isinstance(expr, relax.Var):
            if expr in self.nchw:
                return self.nchw[expr]
            if expr in self.blocked:
                self.nchw[expr] = self.to_nchw(self.blocked[expr], _static_shape(expr)[1])
                return self.nchw[expr]
            return expr  # a parameter of the function
        if isinstance(expr, relax.Tuple):
            return relax.Tuple([self.as_nchw(f) for f in expr.fields])
        return expr

    def as_blocked(self, expr, like: tuple[int, ...]):
        """``expr`` in the blocked layout, for an elementwise op whose result has shape ``like``
        (NCHW); None when it cannot be (a shape that is not a broadcast of ``like``'s channels,
        a blocked variable broadcast along its channels: its padded lanes would be read)."""
        if isinstance(expr, relax.Var):
            if expr in self.blocked:
                return self.blocked[expr] if _static_shape(expr)[1] == like[1] else None
            if _static_shape(expr) == like and like[1] % self.lanes == 0:
                self.blocked[expr] = self.to_blocked(self.as_nchw(expr))
                return self.blocked[expr]
            return None
        if isinstance(expr, tvm.ir.expr.Constant):
            a = expr.value.numpy()
            shape = a.shape
            if a.ndim == 4 and any(s not in (1, t) for s, t in zip(shape, like)):
                return None
            b = blocked_array(a, self.lanes)
            return None if b is None else relax.const(b, str(a.dtype))
        return None

    # -- ops ---------------------------------------------------------------------------------

    def blocked_value(self, value):
        """The blocked form of a binding's value, or None to keep it in NCHW."""
        if not isinstance(value, relax.Call) or not isinstance(value.op, tvm.ir.Op):
            return None
        if value.op.same_as(_CONV2D):
            geometry = int8_conv_geometry(value)
            if geometry is None:
                return None
            shape, pads, strides = geometry
            source = value.args[0]
            blocked_input = self.blocked.get(source) if isinstance(source, relax.Var) else None
            if blocked_input is None:
                value = relax.Call(value.op, [self.as_nchw(source), value.args[1]], value.attrs,
                                   value.ty_args)
            return vnni.emit_vnni_conv(self.bb, value, self.lanes, shape, pads, strides,
                                       blocked_input, self.emulate, self.bounds.nonnegative(source))
        name = value.op.name
        like = _static_shape(value)
        if name in _ELEMENTWISE and like is not None and len(like) == 4:
            tensors = [a for a in value.args if _is_tensor(a)]
            if not any(isinstance(a, relax.Var) and a in self.blocked for a in tensors):
                return None
            args = []
            for a in value.args:
                b = self.as_blocked(a, like) if _is_tensor(a) else a
                if b is None:
                    return None
                args.append(b)
            return relax.Call(value.op, args, value.attrs, value.ty_args)
        source = value.args[0] if value.args else None
        if not (isinstance(source, relax.Var) and source in self.blocked):
            return None
        x = self.blocked[source]
        if value.op.same_as(MAX_POOL) and str(value.attrs.layout) == "NCHW" and (
                str(value.attrs.out_layout) == "NCHW"):
            a = value.attrs
            layout = f"NCHW{self.lanes}c"
            return relax.op.nn.max_pool2d(x, a.pool_size, a.strides, a.padding, a.dilation,
                                          bool(a.ceil_mode), bool(a.count_include_pad),
                                          layout, layout)
        if value.op.same_as(_SUM) and value.attrs.axis is not None and bool(
                value.attrs.keepdims) and sorted(int(i) for i in value.attrs.axis) == [2, 3]:
            return relax.op.sum(x, axis=[2, 3], keepdims=True)
        return None

    def rebuild(self, value):
        """A value kept in NCHW, its variables replaced by their NCHW values."""
        if isinstance(value, relax.Call):
            return relax.Call(value.op, [self.as_nchw(a) for a in value.args], value.attrs,
                              value.ty_args)
        if isinstance(value, relax.TupleGetItem):
            return relax.TupleGetItem(self.as_nchw(value.tuple_value), value.index)
        return self.as_nchw(value)

    def binding(self, binding):
        var, value = binding.var, binding.value
        output = not isinstance(var, relax.DataflowVar)
        if var in self.absorbed:
            return
        if var in self.fused:
            self.blocked[var] = self.emit_fused(var, self.fused[var])
            if output:
                self.nchw[var] = self.bb.emit_output(
                    self.to_nchw(self.blocked[var], _static_shape(var)[1]))
            return
        blocked = self.blocked_value(value)
        if blocked is not None:
            self.blocked[var] = self.bb.emit(blocked)
            if output:
                self.nchw[var] = self.bb.emit_output(
                    self.to_nchw(self.blocked[var], _static_shape(var)[1]))
            return
        rebuilt = self.rebuild(value)
        self.nchw[var] = self.bb.emit_output(rebuilt) if output else self.bb.emit(rebuilt)


def nchw_of_blocked(value, channels: int, builder: relax.BlockBuilder):
    """(N, F, H, W, v) -> (N, channels, H, W): the layout conversion back to NCHW, dropping the
    padded lanes of the last block when ``channels`` < F * v (the last expression unemitted)."""
    n, f, h, w, v = _static_shape(value)
    moved = builder.emit(relax.op.permute_dims(value, [0, 1, 4, 2, 3]))
    if f * v == channels:
        return relax.op.reshape(moved, (n, channels, h, w))
    flat = builder.emit(relax.op.reshape(moved, (n, f * v, h, w)))
    return relax.op.strided_slice(flat, axes=[1], begin=[0], end=[channels])


def single_dataflow_body(func) -> bool:
    """The function's body is one dataflow block of variable bindings (what ``emit_relax``
    makes): the functions the rewrites here and in ``pool_order`` walk binding by binding."""
    body = func.body
    return (isinstance(body, relax.SeqExpr) and len(body.blocks) == 1
            and isinstance(body.blocks[0], relax.DataflowBlock)
            and all(isinstance(b, relax.VarBinding) for b in body.blocks[0].bindings))


@relax.expr_functor.mutator
class _NchwVnniConvs(relax.PyExprMutator):
    """Functions the layout walk does not take: each VNNI conv converted back to NCHW at once."""

    def __init__(self, mod, lanes, emulate):
        super().__init__(mod)
        self.lanes = lanes
        self.emulate = emulate  # vpdpbusd emulated (vnni.rewrite_vnni_convs)

    def visit_call_(self, call):
        call = super().visit_call_(call)
        if not (isinstance(call, relax.Call) and call.op.same_as(_CONV2D)):
            return call
        geometry = int8_conv_geometry(call)
        if geometry is None:
            return call
        conv = self.builder_.emit(vnni.emit_vnni_conv(self.builder_, call, self.lanes, *geometry,
                                                      emulate=self.emulate))
        return nchw_of_blocked(conv, int(call.args[1].ty.shape[0]), self.builder_)


def rewrite_blocked(mod: tvm.IRModule, lanes: int, emulate: bool = False) -> tvm.IRModule:
    """``mod`` with every VNNI-eligible int8 conv replaced by the VNNI PrimFuncs and the tensors
    between them channel-blocked (module docstring); ``emulate``: as for
    ``vnni.rewrite_vnni_convs``."""
    walked = {gv: f for gv, f in mod.functions.items()
              if isinstance(f, relax.Function) and single_dataflow_body(f)}
    fallback = _NchwVnniConvs(mod, lanes, emulate)
    for gvar, func in list(mod.functions.items()):
        if isinstance(func, relax.Function) and gvar not in walked:
            fallback.builder_.update_func(gvar, fallback.visit_expr(func))
    mod = fallback.builder_.get()
    if not walked:
        return mod
    builder = relax.BlockBuilder(mod)
    names = {}
    for gvar, func in walked.items():
        blocker = _Blocker(builder, lanes, func, emulate)
        names[gvar] = f"qcal_blocked_{gvar.name_hint}"
        with builder.function(names[gvar], list(func.params), private=True):
            with builder.dataflow():
                for b in func.body.blocks[0].bindings:
                    blocker.binding(b)
            builder.emit_func_output(blocker.as_nchw(func.body.body))
    return rebuilt_module(builder, mod, names)


def rebuilt_module(builder: relax.BlockBuilder, mod: tvm.IRModule, names: dict) -> tvm.IRModule:
    """``builder``'s module with each function it built as ``names[gvar]`` put in the place of
    ``mod``'s function ``gvar``, keeping that function's attributes and span."""
    result = builder.get()
    for gvar, name in names.items():
        tmp = result.get_global_var(name)
        new = result[tmp]
        result[gvar] = relax.Function(new.params, new.body, new.ret_ty, new.is_pure,
                                      mod[gvar].attrs, mod[gvar].span)
        del result[tmp]
    return result
