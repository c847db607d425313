"""Float reference: the float semantics of every op, and a plain-numpy interpreter of the float ``Graph``.

It sits beside the pipeline rather than in it: import tests compare it with MXNet's own output
(proving the importer and the BatchNorm fold), calibration runs it to observe every tensor, and
the fake-quantized simulation and integer interpreter are checked against it. It favours
obviousness over speed: one kernel per op in ``FLOAT_KERNELS``, built on ``qcal.reference.kernels``.
"""
from __future__ import annotations

import numpy as np

from qcal.errors import QcalError
from qcal.reference import kernels as nk
from qcal.registry import Registry

# kernels ``f(node, dtype, *inputs)``, one per float op; the integer interpreter runs the float
# parts of an integer graph through the same ones
FLOAT_KERNELS = Registry("numpy float kernel for op")
_kernel = FLOAT_KERNELS.register


def channel_view(a, rank: int) -> np.ndarray:
    """A () or (C,) per-channel array shaped to broadcast along axis 1 of a rank-``rank`` tensor."""
    a = np.asarray(a)
    if a.ndim == 0:
        return a
    return a.reshape((1, -1) + (1,) * (rank - 2))


@_kernel("conv2d")
def _conv2d(node, dtype, x):
    a, p = node.attrs, node.params
    y = nk.conv2d(x, p["weight"].astype(dtype, copy=False), a.get("strides", (1, 1)),
                  a.get("padding", (0, 0, 0, 0)), a.get("dilation", (1, 1)), a.get("groups", 1))
    return y + channel_view(p["bias"], 4).astype(dtype, copy=False) if "bias" in p else y


@_kernel("dense")
def _dense(node, dtype, x):
    p = node.params
    y = nk.dense(x, p["weight"].astype(dtype, copy=False))
    return y + p["bias"].astype(dtype, copy=False) if "bias" in p else y


@_kernel("channel_affine")
def _channel_affine(node, dtype, x):
    p = node.params
    return (x * channel_view(p["scale"], x.ndim).astype(dtype, copy=False)
            + channel_view(p["shift"], x.ndim).astype(dtype, copy=False))


@_kernel("relu")
def _relu(node, dtype, x):
    return np.maximum(x, dtype(0))


@_kernel("clip")
def _clip(node, dtype, x):
    # a bound is one number, or one per channel (an equalized ReLU6: qcal.quant.equalize)
    lo, hi = (channel_view(np.asarray(node.attrs[k], dtype), x.ndim) for k in ("a_min", "a_max"))
    return np.clip(x, lo, hi)


@_kernel("max_pool2d")
def _max_pool2d(node, dtype, x):
    a = node.attrs
    return nk.max_pool2d(x, a["pool_size"], a["strides"], a.get("padding", (0, 0, 0, 0)))


@_kernel("avg_pool2d")
def _avg_pool2d(node, dtype, x):
    a = node.attrs
    sums, counts = nk.pool_sum_and_count(x, a["pool_size"], a["strides"],
                                         a.get("padding", (0, 0, 0, 0)),
                                         a.get("count_include_pad", True))
    return (sums / counts).astype(dtype)


@_kernel("global_avg_pool2d")
def _global_avg_pool2d(node, dtype, x):
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float64).astype(dtype)


@_kernel("flatten")
def _flatten(node, dtype, x):
    return x.reshape(x.shape[0], -1)


@_kernel("add")
def _add(node, dtype, a, b):
    return a + b


def float_op(node, args, dtype=np.float32) -> np.ndarray:
    """The float semantics of ``node`` (an op of ``qcal.ir.graph``'s table) on ``args``, computed in
    ``dtype`` (float32 for the float model; float64 for the fake-quantized simulation)."""
    return FLOAT_KERNELS.lookup(node.op, layer=node.name)(node, dtype, *args)


def run_float(graph, x, keep=None, observe=None):
    """Run ``graph`` on an N x C x H x W float32 batch.

    keep: None returns the output array; ``"all"`` returns {tensor name: array} for every node;
    a set of names returns those tensors (the output only if named). ``observe(name, array)``,
    if given, is called for every tensor as it is computed (calibration uses it, so that tensors
    need not be kept). Tensors nobody needs any more are freed as the run goes.
    """
    x = np.asarray(x)
    expected = tuple(graph.input.attrs["shape"])
    if x.ndim != 4 or tuple(x.shape[1:]) != expected:
        raise QcalError(f"model '{graph.name}' takes N x {' x '.join(map(str, expected))} "
                        f"images, got an array of shape {x.shape}")
    wanted = _wanted(graph, keep)
    last_use = {}
    for step, n in enumerate(graph.nodes):
        for i in n.inputs:
            last_use[i] = step
    values = {}
    kept = {}
    for step, n in enumerate(graph.nodes):
        if n.op == "input":
            y = x.astype(np.float32, copy=False)
        else:
            y = float_op(n, [values[i] for i in n.inputs]).astype(np.float32, copy=False)
        values[n.name] = y
        if observe is not None:
            observe(n.name, y)
        if n.name in wanted:
            kept[n.name] = y
        for i in set(n.inputs):
            if last_use[i] == step:
                del values[i]
    return values[graph.output.name] if keep is None else kept


def _wanted(graph, keep):
    names = [n.name for n in graph.nodes]
    if keep is None:
        return set()
    if keep == "all":
        return set(names)
    unknown = sorted(set(keep) - set(names))
    if unknown:
        raise QcalError(f"model '{graph.name}' has no tensor(s) named {', '.join(unknown)}")
    return set(keep)
