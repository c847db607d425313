"""Float reference: a plain-numpy interpreter of the float ``Graph``.

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

FLOAT_KERNELS = Registry("numpy float kernel for op")
_kernel = FLOAT_KERNELS.register


def _per_channel(v, ndim):
    """A (C,) vector shaped to broadcast over axis 1 of an ndim-dimensional batch."""
    return v.reshape((1, -1) + (1,) * (ndim - 2))


@_kernel("conv2d")
def _conv2d(node, x):
    a = node.attrs
    y = nk.conv2d(x, node.params["weight"], a["strides"], a["padding"], a["dilation"],
                  a["groups"])
    if "bias" in node.params:
        y = y + _per_channel(node.params["bias"], 4)
    return y


@_kernel("dense")
def _dense(node, x):
    y = nk.dense(x, node.params["weight"])
    if "bias" in node.params:
        y = y + node.params["bias"]
    return y


@_kernel("channel_affine")
def _channel_affine(node, x):
    return x * _per_channel(node.params["scale"], x.ndim) + _per_channel(node.params["shift"],
                                                                         x.ndim)


@_kernel("relu")
def _relu(node, x):
    return np.maximum(x, 0)


@_kernel("clip")
def _clip(node, x):
    return np.clip(x, node.attrs["a_min"], node.attrs["a_max"])


@_kernel("max_pool2d")
def _max_pool2d(node, x):
    a = node.attrs
    return nk.max_pool2d(x, a["pool_size"], a["strides"], a["padding"])


@_kernel("avg_pool2d")
def _avg_pool2d(node, x):
    a = node.attrs
    sums, counts = nk.pool_sum_and_count(x, a["pool_size"], a["strides"], a["padding"],
                                         a["count_include_pad"])
    return sums / counts


@_kernel("global_avg_pool2d")
def _global_avg_pool2d(node, x):
    return x.mean(axis=(2, 3), keepdims=True, dtype=np.float64)


@_kernel("flatten")
def _flatten(node, x):
    return x.reshape(x.shape[0], -1)


@_kernel("add")
def _add(node, a, b):
    return a + b


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
            y = FLOAT_KERNELS.lookup(n.op, layer=n.name)(n, *(values[i] for i in n.inputs))
            y = y.astype(np.float32, copy=False)
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
