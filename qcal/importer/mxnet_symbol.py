"""Import stage, MXNet: a Gluon network (through its exported symbol graph) becomes a ``Graph``.

Why the symbol graph and not an ONNX export: see the ``qcal.importer`` package docstring.
"""
from __future__ import annotations

import ast
import json
import os
import tempfile
from pathlib import Path

import numpy as np

from qcal.errors import QcalError
from qcal.importer.common import Builder, batch_norm_node, finish_graph, pool_node
from qcal.ir.graph import Graph, Node
from qcal.registry import Registry

MXNET_OPS = Registry("MXNet op", "is not one qcal can quantize")


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


@MXNET_OPS.register("Convolution")
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


@MXNET_OPS.register("BatchNorm")
def _mxbatch_norm_node(layer):
    a = layer.attrs
    if int(a.get("axis", 1)) != 1:
        layer.refuse("BatchNorm over an axis other than 1 (channels)")
    gamma, beta, mean, var = layer.params
    if _bool(a.get("fix_gamma"), True):  # MXNet's op default; the stored gamma is then ignored
        gamma = np.ones_like(gamma)
    return [batch_norm_node(layer.name, layer.data[0], gamma, beta, mean, var,
                            float(a.get("eps", 1e-3)))]


@MXNET_OPS.register("Activation")
def _mx_activation(layer):
    if layer.attrs.get("act_type") != "relu":
        layer.refuse(f"activation '{layer.attrs.get('act_type')}' is not supported (only relu)")
    return [Node(layer.name, "relu", layer.data)]


@MXNET_OPS.register("relu")
def _mx_relu(layer):
    return [Node(layer.name, "relu", layer.data)]


@MXNET_OPS.register("clip")
def _mx_clip(layer):
    bounds = {"a_min": float(layer.attrs["a_min"]), "a_max": float(layer.attrs["a_max"])}
    return [Node(layer.name, "clip", layer.data, bounds)]


@MXNET_OPS.register("elemwise_add", "broadcast_add", "_Plus", "_plus", "_add")
def _mx_add(layer):
    if len(layer.data) != 2:
        layer.refuse("addition needs two tensor inputs")
    return [Node(layer.name, "add", layer.data)]


@MXNET_OPS.register("Pooling")
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
    return [pool_node(layer.name, f"{kind}_pool2d", x, shape, kernel,
                      _tuple(a.get("stride"), (1, 1)), (ph, pw, ph, pw), convention == "full",
                      _bool(a.get("count_include_pad"), True))]


@MXNET_OPS.register("FullyConnected")
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


@MXNET_OPS.register("Flatten", "flatten")
def _mx_flatten(layer):
    flat = len(layer.builder.shape(layer.data[0])) == 1
    return [Node(layer.name, "identity" if flat else "flatten", layer.data)]


@MXNET_OPS.register("Dropout", "_copy", "identity", "BlockGrad")
def _mx_identity(layer):
    return [Node(layer.name, "identity", layer.data[:1])]


def import_mxnet_symbol(symbol, params: dict, input_shape, name: str = "model") -> Graph:
    """Translate an MXNet symbol graph (JSON text or parsed dict) and its parameter arrays.

    ``params`` maps parameter names (``arg:``/``aux:`` prefixes allowed, as in ``.params`` files)
    to numpy arrays or NDArrays. The one symbol input that is not a parameter is the image batch.
    """
    graph = json.loads(symbol) if isinstance(symbol, str) else symbol
    arrays = {k.split(":", 1)[-1]: _to_numpy(v) for k, v in params.items()}
    builder = Builder(name)
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
        handler = MXNET_OPS.lookup(node["op"], layer=node["name"])
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
    return finish_graph(builder, builder.tensor[heads[0][0]], sources)


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
