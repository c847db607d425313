"""Realize stage: turn an annotated float ``Graph`` plus activation ranges into an integer ``QGraph``.

Pipeline position: import -> annotate -> calibrate -> **realize** -> compile (``qcal.backend.tvm``).
The numpy interpreter ``qcal.reference.int_interpreter`` runs the same ``QGraph`` and must agree
with TVM bit for bit, so every rounding and every shift is decided here, once, and stored in the node params.

The integer graph's value model and op table are in ``qcal.ir.qgraph``; the scale maths in
``qcal.quant.fixed_point``.

Bias. ``bias_mode='bits'``: the bias gets its own power-of-2 scale ``2**ceil(log2 max|b|) / 2**(B-1)``
and B-bit values (Relay annotated the folded BN bias as a weight; docs/background.md's experiments
widen it); with ``bias_granularity='channel'`` each output channel's max gives its own such scale.
It is added as Relay's AddRealize does: the finer of the two scales wins and the other operand is
shifted left -- the accumulator at run time (``requantize`` with a left shift), or the bias constant
offline -- decided per channel.
When the accumulator scale is not a power of two the common scale is ``s_acc / 2**k`` with the
smallest k that is at least as fine as the bias scale, so the run-time shift stays exact.
``bias_mode='int32-acc'``: ``rint(b / s_acc)`` in int32 at the accumulator scale (ONNX Runtime, TFLite).
``layer_bias_bits`` gives single layers another bias precision than the network's.
Both go through the same overflow check: per channel the accumulator shift k is lowered (down to a
rounding right shift) until ``bound(acc << k) + |bias| <= 2**31 - 1``; each lowering is recorded.

Intermediates. With ``intermediate_bits`` B < 32 (Relay's ``nbit_activation``) an int32 value is
narrowed where one integer op hands it to another that computes on it in int32: each int32 operand
of an add and every add's sum, and the int32 input of a pooling sum. ``narrow`` requantizes it (the
same rescale and ``rounding`` as every other requantize) to the power-of-2 scale of the tensor's
calibrated abs-max at B bits, clipped to +-(2**(B-1) - 1), which becomes its ``bound`` for the
overflow proofs after it. ReLU, clip, max-pool and flatten pass a narrowed value on as it is. A
conv's accumulator, its bias add and its requantize to int8 are untouched, and so is the
dequantize to float32. At B = 32 nothing is narrowed.

Length: one pass over the graph whose shared integer building blocks (bias, alignment,
narrowing, pooling pre-shift) carry the overflow proof that every op's rule relies on.
"""
from __future__ import annotations

from typing import Mapping

import numpy as np

from qcal.config import EXACT_INTERMEDIATE_BITS, QuantOptions, levels_for_bits
from qcal.errors import QcalError
from qcal.ir.graph import Graph, Node
from qcal.ir.qgraph import INT8_MAX, INT32_MAX, Adjustment, QGraph, QNode, channels_of, collapse, per_channel
from qcal.ir.shapes import infer_shapes
from qcal.quant.annotate import Annotation, annotate
from qcal.quant.fixed_point import (MAX_LEFT_SHIFT, bias_scale, ceil_log2, power2_scale, quantize_array,
                                    quantize_weight, rescale_plan, rounding_shift_bound, scale_for_amax)
from qcal.reference.kernels import pool_sum_and_count
from qcal.registry import Registry

# ---------------------------------------------------------------------------------------------
# The realizer: one pass over the float graph in order.
# ---------------------------------------------------------------------------------------------


class _Realizer:
    def __init__(self, graph, annotation, amax, options, round_up=None, wide_amax=None):
        self.graph, self.annotation, self.amax, self.options = graph, annotation, amax, options
        self.round_up = dict(round_up or {})
        self.wide_amax = dict(wide_amax or {})
        self.narrow_of, self.narrowed = {}, set()  # tensor -> its narrowed node; B-bit node names
        self.shapes = infer_shapes(graph)
        self.nodes, self.adjustments = [], []
        self.value, self.int8_of, self.float_of = {}, {}, {}
        self.names = set()

    # -- node bookkeeping --
    def emit(self, node: QNode) -> QNode:
        if node.name in self.names:
            raise QcalError(f"realize: two nodes named '{node.name}'")
        if node.is_int:
            node.scale = collapse(np.asarray(node.scale, dtype=np.float64))
            node.bound = collapse(np.asarray(node.bound, dtype=np.int64))
            limit = INT8_MAX if node.dtype == "int8" else INT32_MAX
            if np.any(node.bound > limit):
                raise QcalError(f"realize: '{node.name}' could reach {int(node.bound.max())}, "
                                f"beyond {node.dtype} (a realizer bug; please report it)")
        if node.op in _PASS_ON and node.inputs and node.inputs[0] in self.narrowed:
            self.narrowed.add(node.name)
        self.names.add(node.name)
        self.nodes.append(node)
        return node

    def adjust(self, layer, what, mask, requested, applied):
        mask = np.atleast_1d(mask)
        if mask.any():
            req, app = np.atleast_1d(requested)[mask], np.atleast_1d(applied)[mask]
            self.adjustments.append(Adjustment(
                layer, what, int(mask.sum()), _span(req), _span(app)))

    def amax_of(self, tensor):
        if tensor not in self.amax:
            raise QcalError(f"no calibrated range for tensor '{tensor}' (the calibration result "
                            f"lacks it)")
        return float(self.amax[tensor])

    # -- domain conversions, each made once per tensor and shared --
    def int8(self, tensor) -> QNode:
        if tensor in self.int8_of:
            return self.int8_of[tensor]
        src = self.value[tensor]
        if src.dtype == "int8":
            node = src
        else:
            levels = levels_for_bits(self.annotation.activation_bits.get(
                tensor, self.options.activation_bits))
            scale = scale_for_amax(self.amax_of(tensor), levels)
            if src.is_int:
                node = self.requantize(src, f"{tensor}:q", scale, "int8", levels)
            else:
                node = self.emit(QNode(f"{tensor}:q", "quantize", (src.name,),
                                       attrs={"levels": levels},
                                       params={"inv_scale": np.float32(1.0 / scale)},
                                       dtype="int8", shape=src.shape, scale=scale,
                                       bound=np.int64(levels)))
        self.int8_of[tensor] = node
        return node

    def as_float(self, tensor) -> QNode:
        if tensor in self.float_of:
            return self.float_of[tensor]
        src = self.value[tensor]
        node = src
        if src.is_int:
            node = self.emit(QNode(f"{tensor}:dq", "dequantize", (src.name,),
                                   params={"scale": src.scale.astype(np.float32)},
                                   shape=src.shape))
        self.float_of[tensor] = node
        return node

    def requantize(self, src: QNode, name, out_scale, out_dtype, levels=None) -> QNode:
        """``src`` rescaled to ``out_scale``; clipped to +-``levels`` (int8: 127 when not given;
        int32: only a narrowing gives levels, an alignment is exact)."""
        if out_dtype == "int8" and levels is None:
            levels = INT8_MAX
        channels = channels_of(src.shape)
        ratio = per_channel(src.scale, channels) / per_channel(out_scale, channels)
        plan = rescale_plan(collapse(ratio), src.bound)
        bound = plan.out_bound if levels is None else np.minimum(plan.out_bound, levels)
        params = {"lshift": collapse(plan.lshift), "rshift": collapse(plan.rshift)}
        if plan.kind == "multiply":
            params["multiplier"] = collapse(plan.multiplier)
        attrs = {"kind": plan.kind, "compute": plan.compute, "rounding": self.options.rounding}
        if levels is not None:
            attrs["levels"] = levels
        return self.emit(QNode(name, "requantize", (src.name,), attrs=attrs,
                               params=params, dtype=out_dtype, shape=src.shape,
                               scale=out_scale, bound=bound))

    def narrow(self, tensor, src: QNode | None = None) -> QNode:
        """``tensor``'s value (``src``, else its realized node) as one integer op hands it to
        another: as it is, or under ``intermediate_bits`` B < 32 an exact int32 value requantized
        to B-bit levels at ``power2_scale(abs-max, B)`` (module docstring)."""
        src = self.value[tensor] if src is None else src
        bits = self.options.intermediate_bits
        if bits == EXACT_INTERMEDIATE_BITS or src.dtype != "int32" or src.name in self.narrowed:
            return src
        if tensor not in self.narrow_of:
            if tensor not in self.wide_amax:
                raise QcalError(f"no abs-max for the int32 tensor '{tensor}' (intermediate_bits "
                                f"{bits} narrows it; the calibration result lacks it)")
            scale = power2_scale(float(self.wide_amax[tensor]), bits)
            node = self.requantize(src, f"{tensor}:narrow", scale, "int32", levels_for_bits(bits))
            self.narrowed.add(node.name)
            self.narrow_of[tensor] = node
        return self.narrow_of[tensor]

    # -- shared integer building blocks --
    def add_bias(self, acc: QNode, bias: np.ndarray, layer: str) -> QNode:
        channels = channels_of(acc.shape)
        s_acc = per_channel(acc.scale, channels)
        bound = per_channel(acc.bound, channels).astype(np.int64)
        bias = np.asarray(bias, dtype=np.float64)
        mode, bits = self.options.bias_for(layer)  # layer_bias_bits over the network's
        if mode == "int32-acc":
            k0 = np.zeros(channels, dtype=np.int64)

            def bias_at(common):
                return np.rint(bias / common)
        else:
            s_b = bias_scale(bias, bits, self.options.bias_granularity)
            b_q = quantize_array(bias, s_b, 2 ** (bits - 1) - 1).astype(np.float64)
            # per channel, the finer of the two scales wins (s_b is () or, per channel, (C,))
            k0 = np.maximum(ceil_log2(s_acc / s_b), 0) if np.any(b_q) else np.zeros(channels, np.int64)

            def bias_at(common):
                return np.rint(b_q * (s_b / common))
        k, b_c, acc_bound = _fit_bias_shift(bound, s_acc, k0, bias_at)
        self.adjust(layer, "bias alignment (accumulator shift)", k != k0,
                    [f"<<{v}" if v >= 0 else f">>{-v}" for v in k0],
                    [f"<<{v}" if v >= 0 else f">>{-v}" for v in k])
        common = np.ldexp(s_acc, -k)
        if np.any(k != 0):
            acc = self.requantize(acc, f"{layer}:align", common, "int32")
        return self.emit(QNode(layer, "bias_add", (acc.name,), params={"bias": b_c.astype(np.int32)},
                               dtype="int32", shape=acc.shape, scale=common,
                               bound=per_channel(acc.bound, channels) + np.abs(b_c)))

    def align(self, operands, layer) -> list:
        """Bring integer operands to one int32 scale: the finer one per channel, coarsened by
        powers of two where the sum could overflow."""
        channels = channels_of(operands[0].shape)
        scales = [per_channel(o.scale, channels) for o in operands]
        base = np.minimum.reduce(scales)
        coarsen = np.zeros(channels, dtype=np.int64)
        for _ in range(64):
            common = np.ldexp(base, coarsen)
            total = sum(rescale_plan(s / common, per_channel(o.bound, channels)).out_bound
                        for s, o in zip(scales, operands))
            over = total > INT32_MAX
            if not over.any():
                break
            coarsen = coarsen + over
        else:
            raise QcalError(f"{layer}: cannot align the operands of an add within int32")
        self.adjust(layer, "add alignment (common scale coarsened)", coarsen > 0,
                    ["finest"] * channels, [f"finest*2^{c}" for c in coarsen])
        out = []
        for i, (s, o) in enumerate(zip(scales, operands)):
            if o.dtype == "int32" and np.all(s == common):
                out.append(o)
            else:
                out.append(self.requantize(o, f"{layer}:align{i}", common, "int32"))
        return out

    def fit_for_sum(self, src: QNode, count: int, layer: str) -> QNode:
        """Right-shift an input whose window sums could overflow int32."""
        bound = int(np.max(src.bound))
        shift = 0
        while ((bound + ((1 << shift) >> 1)) >> shift) * count > INT32_MAX:
            shift += 1
        if shift == 0:
            return src
        self.adjust(layer, "pooling input pre-shift", np.array([True]), ["none"], [f">>{shift}"])
        return self.requantize(src, f"{layer}:presum", src.scale * 2.0 ** shift, "int32")

    def run(self) -> QGraph:
        for node in self.graph.nodes:
            if node.op == "input":
                self.value[node.name] = self.emit(QNode(node.name, "input", attrs=dict(node.attrs),
                                                        shape=self.shapes[node.name]))
            elif self.annotation.is_integer(node.name):
                self.value[node.name] = REALIZERS.lookup(node.op, layer=node.name)(self, node)
            else:
                self.value[node.name] = self.emit(QNode(
                    node.name, node.op, tuple(self.as_float(i).name for i in node.inputs),
                    dict(node.attrs), dict(node.params), shape=self.shapes[node.name]))
        out = self.as_float(self.graph.output.name)
        if out is not self.nodes[-1]:
            raise QcalError("realize: the output must be the last node")
        return QGraph(self.nodes, self.graph.name, self.adjustments, self.options)


def _span(values) -> str:
    values = sorted(set(str(v) for v in values))
    return values[0] if len(values) == 1 else f"{values[0]}..{values[-1]}"


def _fit_bias_shift(bound, s_acc, k0, bias_at):
    """Per channel, the largest shift k <= k0 with bound(acc << k) + |bias| within int32."""
    channels = len(bound)
    k = np.full(channels, np.iinfo(np.int64).min)
    b_c = np.zeros(channels)
    acc_bound = np.zeros(channels, dtype=np.int64)
    for cand in range(min(int(k0.max()), MAX_LEFT_SHIFT), -MAX_LEFT_SHIFT - 1, -1):
        todo = (k == np.iinfo(np.int64).min) & (k0 >= cand)
        if not todo.any():
            continue
        if cand >= 0:
            shifted = np.left_shift(bound, cand)
        else:
            shifted, _ = rounding_shift_bound(bound, np.full(channels, -cand))
        bias_c = bias_at(np.ldexp(s_acc, -cand))
        fits = todo & (shifted + np.abs(bias_c) <= INT32_MAX)
        k = np.where(fits, cand, k)
        b_c = np.where(fits, bias_c, b_c)
        acc_bound = np.where(fits, shifted, acc_bound)
        if not (k == np.iinfo(np.int64).min).any():
            break
    if (k == np.iinfo(np.int64).min).any():
        raise QcalError("cannot add the bias within int32 at any alignment")
    return k, b_c.astype(np.int64), acc_bound


# ---------------------------------------------------------------------------------------------
# Per-op integer realizers (the annotation decided these nodes are integer).
# ---------------------------------------------------------------------------------------------

REALIZERS = Registry("integer realization of op")
# Integer ops whose output holds values of their input (or fewer): a narrowed input stays narrowed.
_PASS_ON = frozenset({"relu", "max_pool2d", "flatten", "qclip"})
realizer = REALIZERS.register


def accumulator_name(node: Node) -> str:
    """The name of the integer node that multiplies ``node``'s weights (its int32 accumulator;
    the layer's own name is its output's, after the bias)."""
    return node.name if node.params.get("bias") is None else f"{node.name}:acc"


def _weighted(ctx: _Realizer, node: Node, op: str, attrs: dict, x: QNode, wq, s_w, l1) -> QNode:
    bias = node.params.get("bias")
    name = accumulator_name(node)
    acc = ctx.emit(QNode(name, op, (x.name,), attrs, {"weight": wq} if op != "qchannel_mul" else
                         {"multiplier": wq}, dtype="int32", shape=ctx.shapes[node.name],
                         scale=x.scale * s_w, bound=int(np.max(x.bound)) * l1))
    return acc if bias is None else ctx.add_bias(acc, bias, node.name)


def _quantized_weight(ctx: _Realizer, node: Node, weight):
    o = ctx.options
    return quantize_weight(weight, o.weight_scale, o.weight_granularity,
                           weight_levels(ctx.annotation, node.name),
                           ctx.round_up.get(node.name))


def weight_levels(annotation: Annotation, layer: str) -> int:
    """The largest weight level of an integer weighted layer."""
    return levels_for_bits(annotation.weight_bits.get(layer, annotation.options.weight_bits))


@realizer("conv2d")
def _conv2d(ctx: _Realizer, node: Node) -> QNode:
    x = ctx.int8(node.inputs[0])
    wq, s_w = _quantized_weight(ctx, node, node.params["weight"])
    l1 = np.abs(wq.astype(np.int64)).reshape(wq.shape[0], -1).sum(axis=1)
    attrs = {k: tuple(node.attrs.get(k, d)) for k, d in
             (("strides", (1, 1)), ("padding", (0, 0, 0, 0)), ("dilation", (1, 1)))}
    attrs["groups"] = int(node.attrs.get("groups", 1))
    return _weighted(ctx, node, "qconv2d", attrs, x, wq, s_w, l1)


@realizer("dense")
def _dense(ctx: _Realizer, node: Node) -> QNode:
    x = ctx.int8(node.inputs[0])
    wq, s_w = _quantized_weight(ctx, node, node.params["weight"])
    l1 = np.abs(wq.astype(np.int64)).sum(axis=1)
    return _weighted(ctx, node, "qdense", {}, x, wq, s_w, l1)


@realizer("channel_affine")
def _channel_affine(ctx: _Realizer, node: Node) -> QNode:
    """y = x * a[c] + b[c]: a is quantized like a weight, b like a bias."""
    x = ctx.int8(node.inputs[0])
    wq, s_a = _quantized_weight(ctx, node, node.params["scale"])
    fake = Node(node.name, node.op, node.inputs, node.attrs, {"bias": node.params["shift"]})
    return _weighted(ctx, fake, "qchannel_mul", {}, x, wq, s_a, np.abs(wq.astype(np.int64)))


@realizer("relu", "max_pool2d")
def _passthrough(ctx: _Realizer, node: Node) -> QNode:
    x = ctx.value[node.inputs[0]]
    return ctx.emit(QNode(node.name, node.op, (x.name,), dict(node.attrs), dtype=x.dtype,
                          shape=ctx.shapes[node.name], scale=x.scale, bound=x.bound))


@realizer("flatten")
def _flatten(ctx: _Realizer, node: Node) -> QNode:
    x = ctx.value[node.inputs[0]]
    per_feature = int(np.prod(x.shape[1:])) if len(x.shape) > 1 else 1
    scale = np.repeat(x.scale, per_feature) if x.scale.ndim else x.scale
    bound = np.repeat(x.bound, per_feature) if x.bound.ndim else x.bound
    return ctx.emit(QNode(node.name, "flatten", (x.name,), dtype=x.dtype,
                          shape=ctx.shapes[node.name], scale=scale, bound=bound))


@realizer("clip")
def _clip(ctx: _Realizer, node: Node) -> QNode:
    x = ctx.value[node.inputs[0]]
    limit = INT8_MAX if x.dtype == "int8" else INT32_MAX
    # a bound is one number, or one per channel (an equalized ReLU6: qcal.quant.equalize)
    a_min, a_max = (np.asarray(node.attrs[k], np.float64) for k in ("a_min", "a_max"))
    lo = np.clip(np.rint(a_min / x.scale), -limit, limit).astype(np.int64)
    hi = np.clip(np.rint(a_max / x.scale), -limit, limit).astype(np.int64)
    bound = np.minimum(x.bound, np.maximum(np.abs(lo), np.abs(hi)))
    return ctx.emit(QNode(node.name, "qclip", (x.name,), params={"lo": lo, "hi": hi},
                          dtype=x.dtype, shape=ctx.shapes[node.name], scale=x.scale, bound=bound))


@realizer("avg_pool2d")
def _avg_pool2d(ctx: _Realizer, node: Node) -> QNode:
    a = node.attrs
    count = int(np.prod(a["pool_size"]))
    x = ctx.fit_for_sum(ctx.narrow(node.inputs[0]), count, node.name)
    attrs = {"pool_size": tuple(a["pool_size"]), "strides": tuple(a["strides"]),
             "padding": tuple(a.get("padding", (0, 0, 0, 0)))}
    shape = ctx.shapes[node.name]
    if a.get("count_include_pad", True) or not any(attrs["padding"]):
        return ctx.emit(QNode(node.name, "qsum_pool2d", (x.name,), attrs, dtype="int32",
                              shape=shape, scale=x.scale / count, bound=x.bound * count))
    _, counts = pool_sum_and_count(np.zeros((1, 1) + tuple(x.shape[1:]), np.int64),
                                   attrs["pool_size"], attrs["strides"], attrs["padding"], False)
    attrs["rounding"] = ctx.options.rounding
    return ctx.emit(QNode(node.name, "qavg_pool2d", (x.name,), attrs,
                          {"counts": counts.astype(np.int32)}, dtype="int32", shape=shape,
                          scale=x.scale, bound=x.bound))


@realizer("global_avg_pool2d")
def _global_avg_pool2d(ctx: _Realizer, node: Node) -> QNode:
    src = ctx.narrow(node.inputs[0])
    count = int(src.shape[1] * src.shape[2])
    x = ctx.fit_for_sum(src, count, node.name)
    return ctx.emit(QNode(node.name, "qglobal_sum_pool2d", (x.name,), dtype="int32",
                          shape=ctx.shapes[node.name], scale=x.scale / count,
                          bound=x.bound * count))


@realizer("add")
def _add(ctx: _Realizer, node: Node) -> QNode:
    # An operand that is quantized to int8 anyway (it also feeds a conv) is read as int8, so the
    # tensor has one quantized value for all its consumers (Relay did the same); an operand
    # nobody else quantizes keeps its int32 value (exact, or narrowed); a float operand is
    # quantized.
    shared = set(ctx.annotation.int8_needed)
    operands = [ctx.int8(i) if i in shared or not ctx.value[i].is_int else ctx.narrow(i)
                for i in node.inputs]
    a, b = ctx.align(operands, node.name)
    total = ctx.emit(QNode(node.name, "qadd", (a.name, b.name), dtype="int32",
                           shape=ctx.shapes[node.name], scale=a.scale, bound=a.bound + b.bound))
    return ctx.narrow(node.name, total)


def realize(graph: Graph, amax: Mapping[str, float], options: QuantOptions,
            annotation: Annotation | None = None, round_up: Mapping | None = None,
            wide_amax: Mapping[str, float] | None = None) -> QGraph:
    """The integer graph for ``graph`` under ``options``, with activation ranges ``amax``
    ({tensor name: abs-max}; ``annotation.required_amax`` lists the names needed).
    ``round_up`` ({conv/dense layer: boolean array like its weight}) rounds those layers'
    weights in the learned directions (``qcal.quant.adaround``) instead of to nearest.
    ``wide_amax`` ({tensor: calibrated abs-max} of ``annotation.int32_tensors``) scales the
    narrowed intermediates when ``options.intermediate_bits`` < 32."""
    annotation = annotation or annotate(graph, options)
    return _Realizer(graph, annotation, amax, options, round_up, wide_amax).run()


def qgraph_from_float(graph: Graph) -> QGraph:
    """The float graph as a QGraph with no integer node (so one emitter serves both)."""
    shapes = infer_shapes(graph)
    return QGraph([QNode(n.name, n.op, n.inputs, dict(n.attrs), dict(n.params),
                         shape=shapes[n.name]) for n in graph.nodes], graph.name)
