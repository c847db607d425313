"""Import stage, ONNX: an ONNX image classifier becomes a ``Graph``."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from qcal.errors import QcalError
from qcal.importer.common import Builder, affine_node, batch_norm_node, finish_graph, pool_node
from qcal.ir.graph import Graph, Node
from qcal.registry import Registry

ONNX_OPS = Registry("ONNX op", "is not one qcal can quantize")


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


@ONNX_OPS.register("Conv")
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


@ONNX_OPS.register("BatchNormalization")
def _onnxbatch_norm_node(layer):
    gamma, beta, mean, var = (layer.const(i, what) for i, what in
                              enumerate(("scale", "B", "mean", "var"), start=1))
    return [batch_norm_node(layer.name, layer.tensor(0), gamma, beta, mean, var,
                            float(layer.attrs.get("epsilon", 1e-5)))]


@ONNX_OPS.register("Relu")
def _onnx_relu(layer):
    return [Node(layer.name, "relu", (layer.tensor(0),))]


@ONNX_OPS.register("Clip")
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
    return [pool_node(layer.name, op, layer.tensor(0), layer.shape(0), kernel,
                      _ints(a.get("strides"), (1, 1)), _ints(a.get("pads"), (0, 0, 0, 0)),
                      bool(a.get("ceil_mode", 0)), bool(a.get("count_include_pad", 0)))]


@ONNX_OPS.register("MaxPool")
def _onnx_max_pool(layer):
    if len(layer.node.output) > 1 and layer.node.output[1]:
        layer.refuse("the Indices output is not supported")
    return _onnx_pool(layer, "max_pool2d")


@ONNX_OPS.register("AveragePool")
def _onnx_avg_pool(layer):
    return _onnx_pool(layer, "avg_pool2d")


@ONNX_OPS.register("GlobalAveragePool")
def _onnx_global_avg(layer):
    return [Node(layer.name, "global_avg_pool2d", (layer.tensor(0),))]


@ONNX_OPS.register("GlobalMaxPool")
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


@ONNX_OPS.register("Add", "Mul")
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
        return [affine_node(layer.name, layer.tensor(t), np.ones(shape[0]), value)]
    return [affine_node(layer.name, layer.tensor(t), value, np.zeros(shape[0]))]


@ONNX_OPS.register("Flatten")
def _onnx_flatten(layer):
    if int(layer.attrs.get("axis", 1)) != 1:
        layer.refuse("only Flatten with axis=1 is supported")
    flat = len(layer.shape(0)) == 1
    return [Node(layer.name, "identity" if flat else "flatten", (layer.tensor(0),))]


@ONNX_OPS.register("Reshape")
def _onnx_reshape(layer):
    target = [int(v) for v in layer.const(1, "the target shape")]
    shape = layer.shape(0)
    flat = int(np.prod(shape))
    # (N, -1), (0, -1), (1, -1) [an export at batch 1] and (-1, CHW) all flatten each image
    if not (len(target) == 2 and (target[1] == flat or (target[1] == -1 and target[0] in (0, 1)))):
        layer.refuse(f"only a reshape to (N, {flat}) (a flatten) is supported, not {target}")
    return [Node(layer.name, "identity" if len(shape) == 1 else "flatten", (layer.tensor(0),))]


@ONNX_OPS.register("Gemm")
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


@ONNX_OPS.register("MatMul")
def _onnx_matmul(layer):
    weight = layer.const(1, "the right-hand operand")
    if weight.ndim != 2:
        layer.refuse("only a 2-D constant right-hand operand is supported")
    return _dense_nodes(layer, {"weight": weight.T})


def _dense_nodes(layer, params):
    if len(layer.shape(0)) != 1:
        layer.refuse(f"a dense layer needs a flat input, got a {layer.shape(0)} feature map")
    return [Node(layer.name, "dense", (layer.tensor(0),), {}, params)]


@ONNX_OPS.register("Identity", "Dropout")
def _onnx_identity(layer):
    return [Node(layer.name, "identity", (layer.tensor(0),))]


def _onnx_constant(node):
    import onnx
    from onnx import numpy_helper

    value = onnx.helper.get_attribute_value(node.attribute[0])
    return numpy_helper.to_array(value) if isinstance(value, onnx.TensorProto) else np.array(value)


def import_onnx(path, name: str | None = None, input_shape: tuple | None = None) -> Graph:
    """Import an ONNX image classifier (one NCHW float input, one output).

    The batch dimension is never read (the graph is per image); ``input_shape`` (C, H, W) gives
    the dimensions the file leaves symbolic and must agree with those it fixes.
    """
    import onnx
    from onnx import numpy_helper

    path = Path(path)
    try:
        model = onnx.load(str(path))
    except Exception as exc:  # onnx raises protobuf DecodeError, OSError, ...
        raise QcalError(f"cannot read ONNX model '{path}': {exc}") from None
    g = model.graph
    builder = Builder(name or path.stem)
    constants = {t.name: numpy_helper.to_array(t) for t in g.initializer}
    images = [i for i in g.input if i.name not in constants]
    if len(images) != 1:
        raise QcalError(f"ONNX model '{path}': expected one image input, found "
                        f"{', '.join(i.name for i in images) or 'none'}")
    dims = [d.dim_value or None for d in images[0].type.tensor_type.shape.dim]
    if len(dims) != 4:
        raise QcalError(f"ONNX model '{path}': input '{images[0].name}' must be N x C x H x W, "
                        f"not {dims}")
    shape = tuple(dims[1:])
    if input_shape is not None:
        if any(d is not None and d != given for d, given in zip(shape, input_shape)):
            raise QcalError(f"ONNX model '{path}': input '{images[0].name}' is fixed at "
                            f"{shape}, not {tuple(input_shape)}")
        shape = tuple(input_shape)
    if None in shape:
        raise QcalError(f"ONNX model '{path}': input '{images[0].name}' has symbolic "
                        f"dimensions {dims}; give the image size (--input-size)")
    builder.tensor[images[0].name] = builder.add(
        Node(images[0].name, "input", (), {"shape": shape}))
    for index, node in enumerate(g.node):
        layer_name = node.name or node.output[0] or f"{node.op_type}_{index}"
        if node.op_type == "Constant":
            constants[node.output[0]] = _onnx_constant(node)
            continue
        handler = ONNX_OPS.lookup(node.op_type, layer=layer_name)
        if layer_name in builder.shapes:
            layer_name = node.output[0]
        for new in handler(_OnnxLayer(builder, node, constants, layer_name)):
            builder.add(new)
        builder.tensor[node.output[0]] = builder.nodes[-1].name
    if len(g.output) != 1 or g.output[0].name not in builder.tensor:
        raise QcalError(f"ONNX model '{path}': expected one computed output")
    return finish_graph(builder, builder.tensor[g.output[0].name])
