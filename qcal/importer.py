"""Import stage: a Gluon network or an ONNX classifier becomes a ``qcal.graph.Graph``.

This is the first stage of the pipeline (import -> annotate -> calibrate -> realize -> compile);
everything after it reads only the ``Graph``.

Gluon networks are imported by walking their exported MXNet symbol graph (JSON nodes plus the
parameter arrays) rather than by exporting to ONNX first, because
- the MXNet layer names (``resnetv20_stage1_conv0_fwd``) survive unchanged into qcal's reports,
  calibration files and ``--skip-k-conv`` counting, where ONNX export renames or drops some
  (unnamed Conv/Pool nodes, ``*_data_flattened`` helpers);
- BatchNorm is folded here, in float64 and with MXNet's exact semantics (``fix_gamma``, ``eps``),
  instead of trusting an exporter's translation of them;
- ``mxnet.onnx`` needs ``onnx<=1.15`` and an opset choice: a direct importer has no version pin;
- one small IR is shared by the numpy float/integer references and the TVM emitter, so a
  Gluon model and an ONNX file go through exactly the same later stages.
ONNX files (``import_onnx``) are still supported for models that do not come from Gluon.

Both importers translate each source op into a few nodes of an intermediate op set: the float op
set of ``qcal.graph`` plus ``affine`` (a per-channel ``x * scale + shift`` in float64: BatchNorm,
or an ONNX Add/Mul by a constant) and ``identity`` (Dropout, Identity, a no-op reshape). Two
shared passes then remove identities and fold each ``affine`` into the conv/dense before it when
that conv/dense has no other consumer; an ``affine`` that cannot fold (ResNet v2's pre-activation
BatchNorm, the input BatchNorm) becomes a ``channel_affine`` node. Shapes are tracked while
translating, because pooling conventions, global max pooling and "flatten before dense" depend on
them; ``infer_shapes`` exposes the same shape rules for a finished graph.
"""
from __future__ import annotations

import ast
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from .errors import QcalError
from .graph import Graph, Node
from .numpy_kernels import output_size

# --- shapes (per image, without the batch axis) ---------------------------------------------------


def _conv_shape(node, ins):
    c, h, w = ins[0]
    kh, kw = node.params["weight"].shape[2:]
    t, l, b, r = node.attrs["padding"]
    (sh, sw), (dh, dw) = node.attrs["strides"], node.attrs["dilation"]
    return (node.params["weight"].shape[0], output_size(h, kh, sh, t, b, dh),
            output_size(w, kw, sw, l, r, dw))


def _pool_shape(node, ins):
    c, h, w = ins[0]
    (kh, kw), (sh, sw) = node.attrs["pool_size"], node.attrs["strides"]
    t, l, b, r = node.attrs["padding"]
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


def _node_shape(node, ins):
    shape = SHAPE_RULES[node.op](node, ins)
    if node.op == "conv2d" and (len(ins[0]) != 3 or
                                ins[0][0] != node.params["weight"].shape[1] * node.attrs["groups"]):
        raise QcalError(f"layer '{node.name}': weight {node.params['weight'].shape} does not fit "
                        f"input {ins[0]} with groups={node.attrs['groups']}")
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
        shapes[node.name] = _node_shape(node, [shapes[i] for i in node.inputs])
    return shapes


class _Builder:
    """Collects translated nodes in order, tracks their shapes and the source-tensor mapping."""

    def __init__(self, name):
        self.name = name
        self.nodes = []
        self.shapes = {}
        self.tensor = {}  # source tensor name -> producing node name here

    def add(self, node: Node) -> str:
        if node.name in self.shapes:
            raise QcalError(f"model '{self.name}': two layers are named '{node.name}'")
        self.shapes[node.name] = _node_shape(node, [self.shapes[i] for i in node.inputs])
        self.nodes.append(node)
        return node.name

    def shape(self, name):
        return self.shapes[name]


# --- pooling helpers shared by both importers -----------------------------------------------------

def _ceil_extra(size, kernel, stride, pad_before, pad_after):
    """Extra bottom/right padding that makes floor-mode output size equal ceil-mode's."""
    span = size + pad_before + pad_after - kernel
    ceil_out = -(-span // stride) + 1
    return max(0, (ceil_out - 1) * stride + kernel - (size + pad_before + pad_after))


def _pool_node(layer, op, x, in_shape, kernel, strides, padding, ceil_mode,
               count_include_pad=True):
    """A max/avg pool node with ceil-mode output size expressed as extra bottom/right padding."""
    t, l, b, r = padding
    extra_h = _ceil_extra(in_shape[1], kernel[0], strides[0], t, b) if ceil_mode else 0
    extra_w = _ceil_extra(in_shape[2], kernel[1], strides[1], l, r) if ceil_mode else 0
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


def _finish(builder, output, sources=()):
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


def _affine(layer, x, scale, shift):
    params = {"scale": np.asarray(scale, dtype=np.float64),
              "shift": np.asarray(shift, dtype=np.float64)}
    return Node(layer, "affine", (x,), {}, params)


def _batch_norm(layer, x, gamma, beta, mean, var, eps):
    """BatchNorm as y = x * scale + shift, computed in float64 (folded later, stored float32)."""
    scale = gamma.astype(np.float64) / np.sqrt(var.astype(np.float64) + eps)
    return _affine(layer, x, scale, beta.astype(np.float64) - mean.astype(np.float64) * scale)


# --- MXNet symbol graphs --------------------------------------------------------------------------

MXNET_OPS = {}


def _mxnet_op(*names):
    def register(fn):
        for name in names:
            MXNET_OPS[name] = fn
        return fn
    return register


def _tuple(text, default):
    if text is None:
        return default
    value = ast.literal_eval(text)
    return tuple(value) if isinstance(value, (tuple, list)) else (value,)


def _bool(text, default):
    return default if text is None else str(text).lower() in ("true", "1")


class _MxnetLayer:
    """One symbol-graph node being translated: its name, attrs, data inputs and parameters."""

    def __init__(self, builder, node, data, params):
        self.builder = builder
        self.name = node["name"]
        self.op = node["op"]
        self.attrs = node.get("attrs", node.get("param", {})) or {}
        self.data = data  # names (in the builder) of data inputs, in order
        self.params = params  # parameter arrays of this node, in input order

    def refuse(self, why):
        raise QcalError(f"layer '{self.name}' (MXNet op {self.op}): {why}")


@_mxnet_op("Convolution")
def _mx_conv(layer):
    a = layer.attrs
    if a.get("layout", "NCHW") != "NCHW" or len(_tuple(a.get("kernel"), ())) != 2:
        layer.refuse("only 2-D NCHW convolution is supported")
    ph, pw = _tuple(a.get("pad"), (0, 0))
    weight = layer.params[0]
    params = {"weight": weight}
    if not _bool(a.get("no_bias"), False):
        params["bias"] = layer.params[1]
    return [Node(layer.name, "conv2d", layer.data, {
        "strides": _tuple(a.get("stride"), (1, 1)), "padding": (ph, pw, ph, pw),
        "dilation": _tuple(a.get("dilate"), (1, 1)), "groups": int(a.get("num_group", 1))},
        params)]


@_mxnet_op("BatchNorm")
def _mx_batch_norm(layer):
    a = layer.attrs
    if int(a.get("axis", 1)) != 1:
        layer.refuse("BatchNorm over an axis other than 1 (channels)")
    gamma, beta, mean, var = layer.params
    if _bool(a.get("fix_gamma"), True):  # MXNet's op default; the stored gamma is then ignored
        gamma = np.ones_like(gamma)
    return [_batch_norm(layer.name, layer.data[0], gamma, beta, mean, var,
                        float(a.get("eps", 1e-3)))]


@_mxnet_op("Activation")
def _mx_activation(layer):
    if layer.attrs.get("act_type") != "relu":
        layer.refuse(f"activation '{layer.attrs.get('act_type')}' is not supported (only relu)")
    return [Node(layer.name, "relu", layer.data)]


@_mxnet_op("relu")
def _mx_relu(layer):
    return [Node(layer.name, "relu", layer.data)]


@_mxnet_op("clip")
def _mx_clip(layer):
    bounds = {"a_min": float(layer.attrs["a_min"]), "a_max": float(layer.attrs["a_max"])}
    return [Node(layer.name, "clip", layer.data, bounds)]


@_mxnet_op("elemwise_add", "broadcast_add", "_Plus", "_plus", "_add")
def _mx_add(layer):
    if len(layer.data) != 2:
        layer.refuse("addition needs two tensor inputs")
    return [Node(layer.name, "add", layer.data)]


@_mxnet_op("Pooling")
def _mx_pooling(layer):
    a = layer.attrs
    kind = a.get("pool_type", "max")
    if kind not in ("max", "avg"):
        layer.refuse(f"pool_type '{kind}' is not supported (only max and avg)")
    if a.get("layout", "NCHW") != "NCHW":
        layer.refuse("only NCHW pooling is supported")
    x = layer.data[0]
    shape = layer.builder.shape(x)
    if _bool(a.get("global_pool"), False):
        if kind == "avg":
            return [Node(layer.name, "global_avg_pool2d", (x,))]
        return [Node(layer.name, "max_pool2d", (x,), {
            "pool_size": tuple(shape[1:]), "strides": (1, 1), "padding": (0, 0, 0, 0)})]
    convention = a.get("pooling_convention", "valid")
    if convention not in ("valid", "full"):
        layer.refuse(f"pooling_convention '{convention}' is not supported")
    kernel = _tuple(a.get("kernel"), ())
    ph, pw = _tuple(a.get("pad"), (0, 0))
    return [_pool_node(layer.name, f"{kind}_pool2d", x, shape, kernel,
                       _tuple(a.get("stride"), (1, 1)), (ph, pw, ph, pw), convention == "full",
                       _bool(a.get("count_include_pad"), True))]


@_mxnet_op("FullyConnected")
def _mx_dense(layer):
    a = layer.attrs
    x = layer.data[0]
    nodes = []
    if len(layer.builder.shape(x)) > 1:
        if not _bool(a.get("flatten"), True):
            layer.refuse("FullyConnected with flatten=False on a feature map")
        nodes.append(Node(f"{layer.name}_flatten", "flatten", (x,)))
        x = nodes[-1].name
    params = {"weight": layer.params[0]}
    if not _bool(a.get("no_bias"), False):
        params["bias"] = layer.params[1]
    return nodes + [Node(layer.name, "dense", (x,), {}, params)]


@_mxnet_op("Flatten", "flatten")
def _mx_flatten(layer):
    flat = len(layer.builder.shape(layer.data[0])) == 1
    return [Node(layer.name, "identity" if flat else "flatten", layer.data)]


@_mxnet_op("Dropout", "_copy", "identity", "BlockGrad")
def _mx_identity(layer):
    return [Node(layer.name, "identity", layer.data[:1])]


def import_mxnet_symbol(symbol, params: dict, input_shape, name: str = "model") -> Graph:
    """Translate an MXNet symbol graph (JSON text or parsed dict) and its parameter arrays.

    ``params`` maps parameter names (``arg:``/``aux:`` prefixes allowed, as in ``.params`` files)
    to numpy arrays or NDArrays. The one symbol input that is not a parameter is the image batch.
    """
    graph = json.loads(symbol) if isinstance(symbol, str) else symbol
    arrays = {k.split(":", 1)[-1]: _to_numpy(v) for k, v in params.items()}
    builder = _Builder(name)
    nodes = graph["nodes"]
    data_inputs = [n["name"] for n in nodes if n["op"] == "null" and n["name"] not in arrays]
    if len(data_inputs) != 1:
        raise QcalError(f"model '{name}': expected one image input, found "
                        f"{', '.join(data_inputs) or 'none'} (are parameters missing?)")
    for index, node in enumerate(nodes):
        if node["op"] == "null":
            if node["name"] not in arrays:
                builder.tensor[index] = builder.add(
                    Node(node["name"], "input", (), {"shape": tuple(input_shape)}))
            continue
        handler = MXNET_OPS.get(node["op"])
        if handler is None:
            raise QcalError(f"layer '{node['name']}': MXNet op '{node['op']}' is not one qcal "
                            f"can quantize")
        data, layer_params = [], []
        for src, out_index, *_ in node["inputs"]:
            source = nodes[src]
            if source["op"] == "null" and source["name"] in arrays:
                layer_params.append(arrays[source["name"]])
            else:
                if out_index != 0:
                    raise QcalError(f"layer '{node['name']}' reads output {out_index} of "
                                    f"'{source['name']}'; only first outputs are supported")
                data.append(builder.tensor[src])
        layer = _MxnetLayer(builder, node, tuple(data), layer_params)
        for new in handler(layer):
            builder.add(new)
        builder.tensor[index] = builder.nodes[-1].name
    heads = graph["heads"]
    if len(heads) != 1:
        raise QcalError(f"model '{name}': {len(heads)} outputs; qcal handles one-output "
                        f"classifiers")
    sources = [(builder.tensor[i], node["name"] if node["op"] == "null" else f"{node['name']}_output")
               for i, node in enumerate(nodes) if i in builder.tensor]
    return _finish(builder, builder.tensor[heads[0][0]], sources)


def _to_numpy(value):
    return value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)


def import_gluon(net, input_shape, name: str = "model") -> Graph:
    """Import an initialised (or loaded) Gluon network through its exported symbol graph.

    The network is hybridized and run once on zeros of ``(1,) + input_shape`` so that it has a
    symbol graph; ``HybridBlock.export`` then writes the symbol and parameters, read back here.
    """
    import mxnet as mx

    net.hybridize()
    net(mx.nd.zeros((1,) + tuple(input_shape)))
    with tempfile.TemporaryDirectory(prefix="qcal-import-") as tmp:
        prefix = os.path.join(tmp, "net")
        net.export(prefix)
        symbol = Path(f"{prefix}-symbol.json").read_text()
        params = mx.nd.load(f"{prefix}-0000.params") if list(net.collect_params()) else {}
    return import_mxnet_symbol(symbol, params, input_shape, name)


# --- ONNX -----------------------------------------------------------------------------------------

ONNX_OPS = {}


def _onnx_op(*names):
    def register(fn):
        for name in names:
            ONNX_OPS[name] = fn
        return fn
    return register


class _OnnxLayer:
    """One ONNX node being translated: resolves its inputs to tensors or constants."""

    def __init__(self, builder, node, constants, name):
        import onnx

        self.builder = builder
        self.node = node
        self.name = name
        self.op = node.op_type
        self.attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
        self.constants = constants

    def refuse(self, why):
        raise QcalError(f"layer '{self.name}' (ONNX op {self.op}): {why}")

    def is_const(self, i):
        return i < len(self.node.input) and self.node.input[i] in self.constants

    def const(self, i, what):
        if i >= len(self.node.input) or not self.node.input[i]:
            return None
        if self.node.input[i] not in self.constants:
            self.refuse(f"{what} must be a constant (initializer)")
        return self.constants[self.node.input[i]]

    def tensor(self, i):
        source = self.node.input[i]
        if source not in self.builder.tensor:
            self.refuse(f"input '{source}' is neither a computed tensor nor supported here")
        return self.builder.tensor[source]

    def shape(self, i):
        return self.builder.shape(self.tensor(i))


def _ints(values, default):
    return tuple(int(v) for v in values) if values is not None else default


@_onnx_op("Conv")
def _onnx_conv(layer):
    a = layer.attrs
    auto_pad = a.get("auto_pad", b"NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if auto_pad != "NOTSET":
        layer.refuse(f"auto_pad={auto_pad} is not supported; export with explicit pads")
    weight = layer.const(1, "the weight")
    if weight.ndim != 4:
        layer.refuse("only 2-D convolution is supported")
    params = {"weight": weight}
    bias = layer.const(2, "the bias")
    if bias is not None:
        params["bias"] = bias
    return [Node(layer.name, "conv2d", (layer.tensor(0),), {
        "strides": _ints(a.get("strides"), (1, 1)), "padding": _ints(a.get("pads"), (0, 0, 0, 0)),
        "dilation": _ints(a.get("dilations"), (1, 1)), "groups": int(a.get("group", 1))}, params)]


@_onnx_op("BatchNormalization")
def _onnx_batch_norm(layer):
    gamma, beta, mean, var = (layer.const(i, what) for i, what in
                              enumerate(("scale", "B", "mean", "var"), start=1))
    return [_batch_norm(layer.name, layer.tensor(0), gamma, beta, mean, var,
                        float(layer.attrs.get("epsilon", 1e-5)))]


@_onnx_op("Relu")
def _onnx_relu(layer):
    return [Node(layer.name, "relu", (layer.tensor(0),))]


@_onnx_op("Clip")
def _onnx_clip(layer):
    low, high = layer.const(1, "min"), layer.const(2, "max")
    low = float(low) if low is not None else float(layer.attrs.get("min", -np.inf))
    high = float(high) if high is not None else float(layer.attrs.get("max", np.inf))
    if low == 0 and high == np.inf:
        return [Node(layer.name, "relu", (layer.tensor(0),))]
    if not (np.isfinite(low) and np.isfinite(high)):
        layer.refuse("Clip needs finite min and max (or min 0 alone, a ReLU)")
    return [Node(layer.name, "clip", (layer.tensor(0),), {"a_min": low, "a_max": high})]


def _onnx_pool(layer, op):
    a = layer.attrs
    if any(d != 1 for d in a.get("dilations", (1, 1))):
        layer.refuse("dilated pooling is not supported")
    auto_pad = a.get("auto_pad", b"NOTSET")
    if (auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad) != "NOTSET":
        layer.refuse("auto_pad is not supported; export with explicit pads")
    kernel = _ints(a["kernel_shape"], None)
    return [_pool_node(layer.name, op, layer.tensor(0), layer.shape(0), kernel,
                       _ints(a.get("strides"), (1, 1)), _ints(a.get("pads"), (0, 0, 0, 0)),
                       bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))]


@_onnx_op("MaxPool")
def _onnx_max_pool(layer):
    if len(layer.node.output) > 1 and layer.node.output[1]:
        layer.refuse("the Indices output is not supported")
    return _onnx_pool(layer, "max_pool2d")


@_onnx_op("AveragePool")
def _onnx_avg_pool(layer):
    return _onnx_pool(layer, "avg_pool2d")


@_onnx_op("GlobalAveragePool")
def _onnx_global_avg(layer):
    return [Node(layer.name, "global_avg_pool2d", (layer.tensor(0),))]


@_onnx_op("GlobalMaxPool")
def _onnx_global_max(layer):
    shape = layer.shape(0)
    return [Node(layer.name, "max_pool2d", (layer.tensor(0),), {
        "pool_size": tuple(shape[1:]), "strides": (1, 1), "padding": (0, 0, 0, 0)})]


def _per_channel(layer, value, channels):
    """A constant that broadcasts per channel over N x C [x H x W], as a (C,) vector."""
    v = np.asarray(value, dtype=np.float64)
    if v.size == 1:
        return np.full(channels, float(v.ravel()[0]))
    squeezed = v.reshape(-1)
    if squeezed.size == channels and (v.ndim <= 1 or v.shape[-1] == channels
                                      or all(d == 1 for d in v.shape[-2:])):
        return squeezed
    layer.refuse(f"constant of shape {v.shape} is not a per-channel vector of {channels}")


@_onnx_op("Add", "Mul")
def _onnx_add_mul(layer):
    consts = [layer.is_const(i) for i in range(2)]
    if not any(consts):
        if layer.op == "Mul":
            layer.refuse("multiplying two tensors is not supported")
        return [Node(layer.name, "add", (layer.tensor(0), layer.tensor(1)))]
    if all(consts):
        layer.refuse("an operation on two constants should be folded before import")
    t = 0 if consts[1] else 1
    shape = layer.shape(t)
    value = _per_channel(layer, layer.const(1 - t, "the operand"), shape[0])
    if layer.op == "Add":
        return [_affine(layer.name, layer.tensor(t), np.ones(shape[0]), value)]
    return [_affine(layer.name, layer.tensor(t), value, np.zeros(shape[0]))]


@_onnx_op("Flatten")
def _onnx_flatten(layer):
    if int(layer.attrs.get("axis", 1)) != 1:
        layer.refuse("only Flatten with axis=1 is supported")
    flat = len(layer.shape(0)) == 1
    return [Node(layer.name, "identity" if flat else "flatten", (layer.tensor(0),))]


@_onnx_op("Reshape")
def _onnx_reshape(layer):
    target = [int(v) for v in layer.const(1, "the target shape")]
    shape = layer.shape(0)
    flat = int(np.prod(shape))
    # (N, -1), (0, -1), (1, -1) [an export at batch 1] and (-1, CHW) all flatten each image
    if not (len(target) == 2 and (target[1] == flat or (target[1] == -1 and target[0] in (0, 1)))):
        layer.refuse(f"only a reshape to (N, {flat}) (a flatten) is supported, not {target}")
    return [Node(layer.name, "identity" if len(shape) == 1 else "flatten", (layer.tensor(0),))]


@_onnx_op("Gemm")
def _onnx_gemm(layer):
    a = layer.attrs
    if int(a.get("transA", 0)):
        layer.refuse("transA=1 is not supported")
    weight = layer.const(1, "the weight") * float(a.get("alpha", 1.0))
    if not int(a.get("transB", 0)):
        weight = weight.T
    params = {"weight": weight}
    bias = layer.const(2, "the bias")
    if bias is not None:
        params["bias"] = np.broadcast_to(np.asarray(bias).reshape(-1) * float(a.get("beta", 1.0)),
                                         (weight.shape[0],))
    return _dense_nodes(layer, params)


@_onnx_op("MatMul")
def _onnx_matmul(layer):
    weight = layer.const(1, "the right-hand operand")
    if weight.ndim != 2:
        layer.refuse("only a 2-D constant right-hand operand is supported")
    return _dense_nodes(layer, {"weight": weight.T})


def _dense_nodes(layer, params):
    if len(layer.shape(0)) != 1:
        layer.refuse(f"a dense layer needs a flat input, got a {layer.shape(0)} feature map")
    return [Node(layer.name, "dense", (layer.tensor(0),), {}, params)]


@_onnx_op("Identity", "Dropout")
def _onnx_identity(layer):
    return [Node(layer.name, "identity", (layer.tensor(0),))]


def _onnx_constant(node):
    import onnx
    from onnx import numpy_helper

    value = onnx.helper.get_attribute_value(node.attribute[0])
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.array(value)


def import_onnx(path, name: str | None = None) -> Graph:
    """Import an ONNX image classifier (one NCHW float input, one output)."""
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises protobuf DecodeError, OSError, ...
        raise QcalError(f"cannot read ONNX model '{path}': {exc}") from None
    g = model.graph
    builder = _Builder(name or path.stem)
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    images = [i for i in g.input if i.name not in constants]
    if len(images) != 1:
        raise QcalError(f"ONNX model '{path}': expected one image input, found "
                        f"{', '.join(i.name for i in images) or 'none'}")
    dims = [d.dim_value for d in images[0].type.tensor_type.shape.dim]
    if len(dims) != 4 or not all(dims[1:]):
        raise QcalError(f"ONNX model '{path}': input '{images[0].name}' must be N x C x H x W "
                        f"with known C, H, W, not {dims}")
    builder.tensor[images[0].name] = builder.add(
        Node(images[0].name, "input", (), {"shape": tuple(dims[1:])}))
    for index, node in enumerate(g.node):
        layer_name = node.name or node.output[0] or f"{node.op_type}_{index}"
        if node.op_type == "Constant":
            constants[node.output[0]] = _onnx_constant(node)
            continue
        handler = ONNX_OPS.get(node.op_type)
        if handler is None:
            raise QcalError(f"layer '{layer_name}': ONNX op '{node.op_type}' is not one qcal "
                            f"can quantize")
        if layer_name in builder.shapes:
            layer_name = node.output[0]
        for new in handler(_OnnxLayer(builder, node, constants, layer_name)):
            builder.add(new)
        builder.tensor[node.output[0]] = builder.nodes[-1].name
    if len(g.output) != 1 or g.output[0].name not in builder.tensor:
        raise QcalError(f"ONNX model '{path}': expected one computed output")
    return _finish(builder, builder.tensor[g.output[0].name])
