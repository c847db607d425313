"""Import stage, shared by both importers: the node builder, pooling conventions, and the
passes that remove identities and fold affines (BatchNorm) into the conv/dense before them."""
from __future__ import annotations

import numpy as np

from qcal.errors import QcalError
from qcal.ir.graph import Graph, Node
from qcal.ir.shapes import node_shape


class Builder:
    """Collects translated nodes in order, tracks their shapes and the source-tensor mapping."""

    def __init__(self, name):
        self.name = name
        self.nodes = []
        self.shapes = {}
        self.tensor = {}  # source tensor name -> producing node name here

    def add(self, node: Node) -> str:
        if node.name in self.shapes:
            raise QcalError(f"model '{self.name}': two layers are named '{node.name}'")
        self.shapes[node.name] = node_shape(node, [self.shapes[i] for i in node.inputs])
        self.nodes.append(node)
        return node.name

    def shape(self, name):
        return self.shapes[name]


# --- pooling helpers shared by both importers -----------------------------------------------------

def ceil_extra(size, kernel, stride, pad_before, pad_after):
    """Extra bottom/right padding that makes floor-mode output size equal ceil-mode's."""
    span = size + pad_before + pad_after - kernel
    ceil_out = -(-span // stride) + 1
    return max(0, (ceil_out - 1) * stride + kernel - (size + pad_before + pad_after))


def pool_node(layer, op, x, in_shape, kernel, strides, padding, ceil_mode,
              count_include_pad=True):
    """A max/avg pool node with ceil-mode output size expressed as extra bottom/right padding."""
    t, l, b, r = padding
    extra_h = ceil_extra(in_shape[1], kernel[0], strides[0], t, b) if ceil_mode else 0
    extra_w = ceil_extra(in_shape[2], kernel[1], strides[1], l, r) if ceil_mode else 0
    attrs = {"pool_size": tuple(kernel), "strides": tuple(strides),
             "padding": (t, l, b + extra_h, r + extra_w)}
    if op == "avg_pool2d":
        if (extra_h or extra_w) and count_include_pad and any(padding):
            # MXNet and ONNX divide ceil-mode edge windows by a count that includes the declared
            # padding but not the extra ceil region: no single count_include_pad flag says that.
            raise QcalError(f"layer '{layer}': average pooling in ceil mode with padding and "
                            f"count_include_pad is not supported")
        # Without declared padding, the only padding is the ceil region, which is never counted.
        attrs["count_include_pad"] = bool(count_include_pad) and not (extra_h or extra_w)
    return Node(layer, op, (x,), attrs)


# --- the shared passes ----------------------------------------------------------------------------

def _remove_identities(nodes):
    alias = {}
    kept = []
    for n in nodes:
        inputs = tuple(alias.get(i, i) for i in n.inputs)
        if n.op == "identity":
            alias[n.name] = inputs[0]
            continue
        kept.append(Node(n.name, n.op, inputs, n.attrs, n.params))
    return kept, alias


def _fold_affines(nodes, output):
    """Fold each ``affine`` into its producer conv/dense if nothing else reads that producer."""
    readers = {}
    for n in nodes:
        for i in n.inputs:
            readers[i] = readers.get(i, 0) + 1
    alias = {}
    kept = {}  # name -> node, in order
    for n in nodes:
        inputs = tuple(alias.get(i, i) for i in n.inputs)
        if n.op != "affine":
            kept[n.name] = Node(n.name, n.op, inputs, n.attrs, dict(n.params))
            continue
        producer = kept.get(inputs[0])
        if (producer is not None and producer.op in ("conv2d", "dense")
                and readers[n.inputs[0]] == 1 and n.inputs[0] != output):
            _fold_into(producer, n.params["scale"], n.params["shift"])
            alias[n.name] = producer.name
            continue
        kept[n.name] = Node(n.name, "channel_affine", inputs, {},
                            {"scale": n.params["scale"], "shift": n.params["shift"]})
    return list(kept.values()), alias


def _fold_into(producer, scale, shift):
    weight = producer.params["weight"].astype(np.float64)
    bias = producer.params.get("bias")
    bias = np.zeros(weight.shape[0]) if bias is None else bias.astype(np.float64)
    if len(scale) != weight.shape[0]:
        raise QcalError(f"layer '{producer.name}': {len(scale)} per-channel factors for "
                        f"{weight.shape[0]} channels")
    producer.params = {"weight": weight * scale.reshape((-1,) + (1,) * (weight.ndim - 1)),
                       "bias": bias * scale + shift}


def finish_graph(builder, output, sources=()):
    """The graph, identities removed and affines folded. ``sources``: (node name before those
    rewrites, the source framework's name for its output), in the source graph's order; the
    graph's ``source_tensors`` maps each final tensor to the last source output holding its value
    (a folded conv's value is its BatchNorm's output, an identity's its input's)."""
    nodes, identity_alias = _remove_identities(builder.nodes)
    output = identity_alias.get(output, output)
    nodes, affine_alias = _fold_affines(nodes, output)
    output = affine_alias.get(output, output)
    nodes = _reachable(nodes, output)
    for n in nodes:  # affines were folded in float64; the graph stores float32
        n.params = {k: np.ascontiguousarray(v, dtype=np.float32) for k, v in n.params.items()}
    graph = Graph(nodes, builder.name)
    present = {n.name for n in nodes}
    for name, source in sources:
        name = identity_alias.get(name, name)
        name = affine_alias.get(name, name)
        if name in present:
            graph.source_tensors[name] = source
    return graph


def _reachable(nodes, output):
    """The nodes the output depends on, in order (so the output comes last)."""
    needed = {output}
    for n in reversed(nodes):
        if n.name in needed:
            needed.update(n.inputs)
    return [n for n in nodes if n.name in needed]


def affine_node(layer, x, scale, shift):
    params = {"scale": np.asarray(scale, dtype=np.float64),
              "shift": np.asarray(shift, dtype=np.float64)}
    return Node(layer, "affine", (x,), {}, params)


def batch_norm_node(layer, x, gamma, beta, mean, var, eps):
    """BatchNorm as y = x * scale + shift, computed in float64 (folded later, stored float32)."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return affine_node(layer, x, scale, beta.astype(np.float64) - mean.astype(np.float64) * scale)
