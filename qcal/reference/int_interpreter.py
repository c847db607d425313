"""Numpy interpreters of a ``QGraph`` (the reference for ``qcal.backend.tvm.emit``).

Pipeline position: realize -> **int_reference** (checks) and realize -> compile (TVM). Two
interpreters of the same graph:

- ``run_integer``: the integer semantics bit for bit (TVM must produce the same bits). Integer
  values are carried as int64; after every integer node the result is checked against the node's
  dtype range and its proven ``bound`` (``QcalError`` if exceeded), so an overflow the realizer
  failed to rule out is caught here instead of wrapping around.
- ``run_simulated``: the "fake-quantized" float model of the same decisions: every value is the
  real number ``v * scale`` in float64; only ``quantize`` and int8 ``requantize`` round (to their
  int8 grid), weights and biases are their quantized values; int32 alignments, bias shifts and
  pooling divisions are taken as exact. Its top-1 should agree with the integer model's.
"""
from __future__ import annotations

import numpy as np

from qcal.errors import QcalError
from qcal.ir.qgraph import INT8_MAX, QGraph, QNode, clip_levels, int8_levels, rounding_of
from qcal.reference import kernels as K
from qcal.reference.float_interpreter import channel_view, float_op

_DTYPE_RANGE = {"int8": (-128, 127), "int32": (-2 ** 31, 2 ** 31 - 1)}


def rounding_right_shift(v, rshift, rounding="upward"):
    """``rshr`` of qcal.ir.qgraph: add half (ties up), or for "nearest" half minus one plus the
    low bit of the result (ties to even)."""
    rshift = np.asarray(rshift, dtype=np.int64)
    rnd = np.where(rshift > 0, np.left_shift(np.int64(1), np.maximum(rshift - 1, 0)), 0)
    if rounding == "nearest":
        shifts = rshift > 0
        odd = np.bitwise_and(np.right_shift(v, rshift), shifts.astype(np.int64))
        return np.right_shift(v + (rnd - shifts) + odd, rshift)
    return np.right_shift(v + rnd, rshift)


def rounded_mean(sums, counts, rounding="upward"):
    """sums / counts rounded to the nearest integer, ties up or (for "nearest") to even."""
    num = 2 * sums + counts
    mean = num // (2 * counts)
    if rounding == "nearest":
        tie = (num % (2 * counts)) == 0
        mean = mean - (tie & (np.bitwise_and(mean, 1) == 1))
    return mean


# -- integer semantics ------------------------------------------------------------------------

def _requantize_int(node: QNode, v):
    p, rank = node.params, v.ndim
    rshift, rounding = channel_view(p["rshift"], rank), rounding_of(node)
    if node.attrs["kind"] == "shift":
        v = rounding_right_shift(np.left_shift(v, channel_view(p["lshift"], rank)), rshift, rounding)
    else:
        v = rounding_right_shift(v * channel_view(p["multiplier"], rank), rshift, rounding)
    levels = clip_levels(node)
    return v if levels is None else np.clip(v, -levels, levels)


def _int_op(node: QNode, args):
    a, p = node.attrs, node.params
    x = args[0]
    rank = x.ndim
    if node.op == "quantize":
        q = np.rint(x.astype(np.float32) * np.float32(p["inv_scale"]))
        return np.clip(q, -int8_levels(node), int8_levels(node)).astype(np.int64)
    if node.op == "requantize":
        return _requantize_int(node, x)
    if node.op == "qconv2d":
        return K.conv2d(x, p["weight"].astype(np.int64), a["strides"], a["padding"],
                        a["dilation"], a["groups"])
    if node.op == "qdense":
        return K.dense(x, p["weight"].astype(np.int64))
    if node.op == "qchannel_mul":
        return x * channel_view(p["multiplier"].astype(np.int64), rank)
    if node.op == "bias_add":
        return x + channel_view(p["bias"].astype(np.int64), rank)
    if node.op == "qclip":
        return np.clip(x, channel_view(p["lo"], rank), channel_view(p["hi"], rank))
    if node.op == "relu":
        return np.maximum(x, 0)
    if node.op == "max_pool2d":
        lowest = _DTYPE_RANGE[node.dtype][0]
        return K.windows(K.pad_nchw(x, a.get("padding", (0, 0, 0, 0)), lowest),
                         a["pool_size"], a["strides"]).max(axis=(4, 5))
    if node.op == "qsum_pool2d":
        return K.pool_sum_and_count(x, a["pool_size"], a["strides"], a["padding"], True)[0]
    if node.op == "qavg_pool2d":
        sums, _ = K.pool_sum_and_count(x, a["pool_size"], a["strides"], a["padding"], True)
        return rounded_mean(sums, p["counts"].astype(np.int64), rounding_of(node))
    if node.op == "qglobal_sum_pool2d":
        return x.sum(axis=(2, 3), keepdims=True)
    if node.op == "flatten":
        return x.reshape(x.shape[0], -1)
    if node.op == "qadd":
        return x + args[1]
    raise QcalError(f"no integer semantics for op '{node.op}' at '{node.name}'")


def _check_range(node: QNode, v):
    lo, hi = _DTYPE_RANGE[node.dtype]
    if v.size and (v.min() < lo or v.max() > hi):
        raise QcalError(f"integer overflow at '{node.name}': values reach [{v.min()}, {v.max()}], "
                        f"outside {node.dtype}")
    bound = channel_view(node.bound, v.ndim)
    if v.size and np.any(np.abs(v) > bound):
        raise QcalError(f"'{node.name}' exceeds its proven bound {int(np.max(node.bound))} "
                        f"(reached {int(np.abs(v).max())})")


def _dequantize(node: QNode, v):
    return v.astype(np.float32) * channel_view(node.params["scale"], v.ndim).astype(np.float32)


def iter_integer(qgraph: QGraph, x: np.ndarray):
    """Run the integer graph on a float32 NCHW batch, yielding ``(node, value)`` for every node in
    graph order, the input first (integers as int64). A value is dropped once no later node reads
    it, so memory holds only the live tensors plus what the caller keeps; a yielded array stays
    valid for as long as the caller holds it."""
    last_use = {}
    for step, node in enumerate(qgraph.nodes):
        for name in node.inputs:
            last_use[name] = step
    output = qgraph.output.name
    values = {}
    for step, node in enumerate(qgraph.nodes):
        if step == 0:
            out = np.asarray(x, dtype=np.float32)
        else:
            args = [values[i] for i in node.inputs]
            out = run_node(node, args)
            del args
            for name in set(node.inputs):
                if last_use[name] == step and name != output:
                    del values[name]
        if node.name in last_use or node.name == output:
            values[node.name] = out
        yield node, out
        del out


def run_integer(qgraph: QGraph, x: np.ndarray, keep=None):
    """Run the integer graph on a float32 NCHW batch; returns the float32 output, or with
    ``keep='all'`` a dict of every node's value (integers as int64)."""
    if keep == "all":
        return {node.name: value for node, value in iter_integer(qgraph, x)}
    output = qgraph.output.name
    for node, value in iter_integer(qgraph, x):
        if node.name == output:
            result = value
    return result


def run_node(node: QNode, args: list):
    """One node's value from its inputs' values (integers as int64, floats as float32); an
    integer result is checked against its dtype and proven bound."""
    if node.op == "dequantize":
        return _dequantize(node, args[0])
    if node.is_int:
        out = _int_op(node, args)
        _check_range(node, out)
        return out
    return float_op(node, args, np.float32).astype(np.float32)


# -- simulated (fake-quantized float) semantics -------------------------------------------------

def _real_scale(node: QNode, rank):
    return channel_view(node.scale, rank)


def _fake_quant(v, scale, limit=INT8_MAX, rounding=np.rint):
    return np.clip(rounding(v / scale), -limit, limit) * scale


def _round_half_up(v):
    """What an "upward" rounding right shift does: add half, then floor (ties towards +inf)."""
    return np.floor(v + 0.5)


def _rounding(node: QNode):
    """The float rounding function that matches the node's integer rounding ("nearest": rint,
    ties to even)."""
    return np.rint if rounding_of(node) == "nearest" else _round_half_up


def simulated_op(node: QNode, args, qgraph: QGraph):
    a, p = node.attrs, node.params
    x = args[0]
    rank = x.ndim
    if node.op in ("quantize",):
        return _fake_quant(x, _real_scale(node, rank), int8_levels(node))
    # Rescales round as the integer model does (its ties), and int32 alignments that shift right
    # lose their low bits here too: with power-of-2 scales every simulated value is a dyadic
    # rational that float64 holds exactly, so the simulation then equals the integer model.
    if node.op == "requantize":
        levels = clip_levels(node)
        limit = np.inf if levels is None else levels
        return _fake_quant(x, _real_scale(node, rank), limit, _rounding(node))
    if node.op == "dequantize":
        return x
    src = qgraph.node(node.inputs[0]) if node.inputs else None
    if node.op in ("qconv2d", "qdense"):
        w_scale = np.asarray(node.scale) / np.asarray(src.scale)  # s_w = s_acc / s_x
        if w_scale.ndim:
            w_scale = w_scale.reshape((-1,) + (1,) * (p["weight"].ndim - 1))
        w = p["weight"].astype(np.float64) * w_scale
        if node.op == "qdense":
            return K.dense(x, w)
        return K.conv2d(x, w, a["strides"], a["padding"], a["dilation"], a["groups"])
    if node.op == "qchannel_mul":
        mult = p["multiplier"] * (np.asarray(node.scale) / np.asarray(src.scale))
        return x * channel_view(mult, rank)
    if node.op == "bias_add":
        return x + channel_view(p["bias"] * np.asarray(node.scale), rank)
    if node.op == "qclip":
        scale = _real_scale(node, rank)
        return np.clip(x, channel_view(p["lo"], rank) * scale, channel_view(p["hi"], rank) * scale)
    if node.op in ("qsum_pool2d", "qavg_pool2d"):
        sums, counts = K.pool_sum_and_count(x, a["pool_size"], a["strides"], a["padding"],
                                            node.op == "qsum_pool2d")
        if node.op == "qavg_pool2d":  # the integer mean rounds in the input's units
            step = _real_scale(src, rank)
            return _rounding(node)(sums / counts / step) * step
        return sums / counts
    if node.op == "qglobal_sum_pool2d":
        return x.mean(axis=(2, 3), keepdims=True)
    if node.op == "qadd":
        return x + args[1]
    if node.op == "relu":
        return np.maximum(x, 0.0)
    if node.op == "max_pool2d":
        return K.max_pool2d(x, a["pool_size"], a["strides"], a.get("padding", (0, 0, 0, 0)))
    if node.op == "flatten":
        return x.reshape(x.shape[0], -1)
    return float_op(node, args, np.float64)


def run_simulated(qgraph: QGraph, x: np.ndarray) -> np.ndarray:
    """The fake-quantized float model of ``qgraph`` (float64 output)."""
    values = {qgraph.input.name: np.asarray(x, dtype=np.float64)}
    for node in qgraph.nodes[1:]:
        values[node.name] = simulated_op(node, [values[i] for i in node.inputs], qgraph)
    return values[qgraph.output.name]


# -- several graphs that begin alike ------------------------------------------------------------

def same_node(a: QNode, b: QNode) -> bool:
    """Whether two nodes compute the same value from the same inputs."""
    if (a.name, a.op, a.inputs, a.dtype, a.attrs) != (b.name, b.op, b.inputs, b.dtype, b.attrs):
        return False
    if a.params.keys() != b.params.keys() or any(not np.array_equal(a.params[k], b.params[k])
                                                 for k in a.params):
        return False
    return all((u is None and v is None)
               or (u is not None and v is not None and np.array_equal(u, v))
               for u, v in ((a.scale, b.scale), (a.bound, b.bound)))


def shared_prefix(a: QGraph, b: QGraph) -> int:
    """How many leading nodes ``a`` and ``b`` have in common (their values are then equal)."""
    count = 0
    for m, n in zip(a.nodes, b.nodes):
        if not same_node(m, n):
            break
        count += 1
    return count


SEMANTICS = ("integer", "simulated")


def _step(semantics: str, qgraph: QGraph):
    if semantics == "integer":
        return lambda node, args: run_node(node, args)
    return lambda node, args: simulated_op(node, args, qgraph)


def run_sharing_prefix(reference: QGraph, graphs: list, x: np.ndarray,
                       semantics: str = "integer") -> list:
    """Each of ``graphs``' outputs on ``x`` (``run_integer``'s, or with ``semantics='simulated'``
    ``run_simulated``'s, the same values), computing the nodes a graph shares with the start of
    ``reference`` once: the reference runs once, node by node, and each graph continues from
    the reference's values at the first node where it differs. Memory holds the reference's
    live values (and those a graph that has not run yet will read), plus one graph's."""
    if semantics not in SEMANTICS:
        raise ValueError(f"semantics must be one of {', '.join(SEMANTICS)}, not {semantics!r}")
    x = np.asarray(x, dtype=np.float32 if semantics == "integer" else np.float64)
    starts = [max(1, shared_prefix(reference, g)) for g in graphs]
    position = {n.name: i for i, n in enumerate(reference.nodes)}
    keep = {}  # reference value -> the last reference step at which something still reads it
    for step, node in enumerate(reference.nodes):
        for name in node.inputs:
            keep[name] = step
    keep[reference.output.name] = len(reference.nodes)
    for graph, start in zip(graphs, starts):
        for node in graph.nodes[start:]:
            for name in node.inputs:
                if position.get(name, len(reference.nodes)) < start:
                    keep[name] = max(keep.get(name, -1), start)
    step_of = _step(semantics, reference)
    values = {reference.input.name: x}
    done = 1  # reference nodes computed
    outputs = [None] * len(graphs)
    for index in sorted(range(len(graphs)), key=starts.__getitem__):
        start = starts[index]
        while done < start:
            node = reference.nodes[done]
            values[node.name] = step_of(node, [values[i] for i in node.inputs])
            for name in [n for n in values if keep.get(n, -1) < done + 1]:
                del values[name]
            done += 1
        outputs[index] = _continue(graphs[index], start, values, semantics)
    return outputs


def _continue(qgraph: QGraph, start: int, known: dict, semantics: str):
    """``qgraph``'s output from its nodes ``start`` on, the values before them in ``known``."""
    last_use = {}
    for step, node in enumerate(qgraph.nodes[start:], start):
        for name in node.inputs:
            last_use[name] = step
    step_of = _step(semantics, qgraph)
    values = {name: known[name] for name in last_use if name in known}
    output = qgraph.output.name
    if start >= len(qgraph.nodes):
        return known[output]
    for step, node in enumerate(qgraph.nodes[start:], start):
        values[node.name] = step_of(node, [values[i] for i in node.inputs])
        for name in set(node.inputs):
            if last_use[name] == step and name != output:
                del values[name]
    return values[output]
