"""Shape rules of the float graph: the per-image output shape of every op, defined once.

Shapes are per image, without the batch axis: (C, H, W) for feature maps, (F,) after flatten. The
importers use ``node_shape`` while they translate (pooling conventions and "flatten before dense"
depend on shapes), realize uses ``infer_shapes`` on a finished graph. Besides the float op set of
``qcal.ir.graph`` the rules know the importers' intermediate ops ``affine`` and ``identity``.
"""
from __future__ import annotations

import numpy as np

from qcal.errors import QcalError
from qcal.ir.graph import Graph


def output_size(size, kernel, stride, pad_before, pad_after, dilation=1):
    """Output length of a window op along one axis (floor mode)."""
    return (size + pad_before + pad_after - dilation * (kernel - 1) - 1) // stride + 1


def _conv_shape(node, ins):
    c, h, w = ins[0]
    kh, kw = node.params["weight"].shape[2:]
    t, l, b, r = node.attrs.get("padding", (0, 0, 0, 0))
    (sh, sw) = node.attrs.get("strides", (1, 1))
    (dh, dw) = node.attrs.get("dilation", (1, 1))
    return (node.params["weight"].shape[0], output_size(h, kh, sh, t, b, dh),
            output_size(w, kw, sw, l, r, dw))


def _pool_shape(node, ins):
    c, h, w = ins[0]
    (kh, kw), (sh, sw) = node.attrs["pool_size"], node.attrs["strides"]
    t, l, b, r = node.attrs.get("padding", (0, 0, 0, 0))
    return (c, output_size(h, kh, sh, t, b), output_size(w, kw, sw, l, r))


def _same_shape(node, ins):
    if any(s != ins[0] for s in ins[1:]):
        raise QcalError(f"layer '{node.name}': inputs have different shapes "
                        f"{' and '.join(str(s) for s in ins)}")
    return ins[0]


SHAPE_RULES = {
    "input": lambda node, ins: tuple(node.attrs["shape"]),
    "conv2d": _conv_shape,
    "dense": lambda node, ins: (node.params["weight"].shape[0],),
    "channel_affine": _same_shape,
    "affine": _same_shape,
    "identity": _same_shape,
    "relu": _same_shape,
    "clip": _same_shape,
    "max_pool2d": _pool_shape,
    "avg_pool2d": _pool_shape,
    "global_avg_pool2d": lambda node, ins: (ins[0][0], 1, 1),
    "flatten": lambda node, ins: (int(np.prod(ins[0])),),
    "add": _same_shape,
}


def node_shape(node, ins):
    shape = SHAPE_RULES[node.op](node, ins)
    if node.op == "conv2d" and (len(ins[0]) != 3 or
                                ins[0][0] != node.params["weight"].shape[1] * node.attrs.get("groups", 1)):
        raise QcalError(f"layer '{node.name}': weight {node.params['weight'].shape} does not fit "
                        f"input {ins[0]} with groups={node.attrs.get('groups', 1)}")
    if node.op == "dense" and ins[0] != (node.params["weight"].shape[1],):
        raise QcalError(f"layer '{node.name}': weight {node.params['weight'].shape} does not fit "
                        f"input {ins[0]}")
    if min(shape) < 1:
        raise QcalError(f"layer '{node.name}': output shape {shape} is empty")
    return tuple(int(s) for s in shape)


def infer_shapes(graph: Graph) -> dict:
    """Per-image output shape of every node: (C, H, W) for feature maps, (F,) after flatten."""
    shapes = {}
    for node in graph.nodes:
        shapes[node.name] = node_shape(node, [shapes[i] for i in node.inputs])
    return shapes
