"""Shared test fixtures: tiny float graphs with random weights, their calibration, images on disk.

Test modules import from here instead of from each other. Graphs are small on purpose (a few
channels, 8-16 pixels) so that each numeric test compiles and runs in well under a second; their
shapes are in ASCII pictures in the builders' docstrings.
"""
from __future__ import annotations

import numpy as np

from qcal.config import QuantOptions
from qcal.ir.graph import Graph, Node
from qcal.quant.realize import qgraph_from_float, realize
from qcal.reference.int_interpreter import run_integer


class GraphMaker:
    def __init__(self, shape, seed=0, name="g"):
        self.rng = np.random.RandomState(seed)
        self.nodes = [Node("data", "input", attrs={"shape": tuple(shape)})]
        self.channels = {"data": shape[0]}
        self.name = name

    def _add(self, op, inputs, attrs=None, params=None, channels=None):
        name = f"{op}{len(self.nodes)}"
        self.nodes.append(Node(name, op, tuple(inputs), attrs or {}, params or {}))
        self.channels[name] = channels if channels is not None else self.channels[inputs[0]]
        return name

    def conv(self, x, out, k=3, s=1, p=None, groups=1, bias=True, bias_std=0.1):
        cin = self.channels[x] // groups
        p = k // 2 if p is None else p
        params = {"weight": (self.rng.randn(out, cin, k, k) / np.sqrt(cin * k * k)).astype(np.float32)}
        if bias:
            params["bias"] = (self.rng.randn(out) * bias_std).astype(np.float32)
        return self._add("conv2d", [x], {"strides": (s, s), "padding": (p, p, p, p),
                                         "dilation": (1, 1), "groups": groups}, params, out)

    def affine(self, x):
        c = self.channels[x]
        return self._add("channel_affine", [x], {}, {
            "scale": (0.5 + self.rng.rand(c)).astype(np.float32),
            "shift": (self.rng.randn(c) * 0.2).astype(np.float32)})

    def relu(self, x):
        return self._add("relu", [x])

    def clip(self, x, lo=0.0, hi=6.0):
        return self._add("clip", [x], {"a_min": lo, "a_max": hi})

    def maxpool(self, x, k=2, s=2, p=0):
        return self._add("max_pool2d", [x], {"pool_size": (k, k), "strides": (s, s),
                                             "padding": (p, p, p, p)})

    def avgpool(self, x, k=2, s=2, p=0, count_include_pad=True):
        return self._add("avg_pool2d", [x], {"pool_size": (k, k), "strides": (s, s),
                                             "padding": (p, p, p, p),
                                             "count_include_pad": count_include_pad})

    def gap(self, x):
        return self._add("global_avg_pool2d", [x])

    def flatten(self, x, spatial=1):
        name = self._add("flatten", [x])
        self.channels[name] = self.channels[x] * spatial
        return name

    def dense(self, x, out, bias=True):
        cin = self.channels[x]
        params = {"weight": (self.rng.randn(out, cin) / np.sqrt(cin)).astype(np.float32)}
        if bias:
            params["bias"] = (self.rng.randn(out) * 0.1).astype(np.float32)
        return self._add("dense", [x], {}, params, out)

    def add(self, a, b):
        return self._add("add", [a, b])

    def graph(self) -> Graph:
        return Graph(self.nodes, self.name)


def resnet_v1(seed=0, width=8, size=16, classes=10) -> Graph:
    """conv-relu-maxpool stem, two basic blocks (identity, then strided with a 1x1 projection)::

        data -> conv -> relu -> maxpool --+--> conv -> relu -> conv --> add -> relu --+
                                          '-------------------------------'           |
             +------------------------------------------------------------------------+
             +--> conv/2 -> relu -> conv --> add -> relu -> gap -> flatten -> dense
             '--> conv 1x1/2 ------------'
    """
    g = GraphMaker((3, size, size), seed, "resnet_v1")
    x = g.maxpool(g.relu(g.conv("data", width)), 3, 2, 1)
    for stage, w in enumerate((width, 2 * width)):
        s = 1 if stage == 0 else 2
        y = g.conv(g.relu(g.conv(x, w, s=s)), w)
        shortcut = x if s == 1 else g.conv(x, w, k=1, s=s, p=0)
        x = g.relu(g.add(y, shortcut))
    return classifier_head(g, x, classes)


def resnet_v2(seed=0, width=8, size=16, classes=10) -> Graph:
    """Input BN, pre-activation blocks (BN-ReLU as channel_affine + relu), final BN-ReLU::

        data -> affine -> conv --+--> affine -> relu --> conv -> relu -> conv --> add --+
                                 '----------------------------------------------'       |
             +--------------------------------------------------------------------------+
             +--> affine -> relu --+--> conv/2 -> relu -> conv --> add -> affine -> relu -> head
                                   '--> conv 1x1/2 ------------'
    """
    g = GraphMaker((3, size, size), seed, "resnet_v2")
    x = g.conv(g.affine("data"), width, bias=False)
    for stage, w in enumerate((width, 2 * width)):
        s = 1 if stage == 0 else 2
        pre = g.relu(g.affine(x))
        y = g.conv(g.relu(g.conv(pre, w, s=s)), w, bias=False)
        shortcut = x if s == 1 else g.conv(pre, w, k=1, s=s, p=0, bias=False)
        x = g.add(y, shortcut)
    return classifier_head(g, g.relu(g.affine(x)), classes)


def vgg(seed=0, width=8, size=16, classes=10) -> Graph:
    """Three conv-relu-maxpool stages, then flatten -> dense -> relu -> dense::

        data -> [conv -> relu -> maxpool] x 3 -> flatten -> dense -> relu -> dense
    """
    g = GraphMaker((3, size, size), seed, "vgg")
    x = "data"
    for w in (width, 2 * width, 2 * width):
        x = g.maxpool(g.relu(g.conv(x, w)))
    x = g.relu(g.dense(g.flatten(x, (size // 8) ** 2), 32))
    g.dense(x, classes)
    return g.graph()


def classifier_head(g, x, classes):
    g.dense(g.flatten(g.gap(x)), classes)
    return g.graph()


def every_op(seed=0) -> Graph:
    """Each op kind at least once: conv 1x1 / 3x3 / strided / grouped / depthwise, relu, relu6,
    residual add, max/avg (both divisor kinds)/global pooling, channel_affine, flatten, dense::

        data -> conv -> relu (r1) --+--> conv 1x1 -> clip 0..6 (relu6) --+--> avgpool 3/2 excl. pad --+
                                    |                                    '--> avgpool 2/2             |
                                    +--> conv 3x3/2                                                    |
                                    +--> conv groups=8 (depthwise)                                     |
                                    +--> conv groups=2 --> add(., r1) -> maxpool 3/2                   |
                                                                             -> affine -> relu --> add <-+
                                                                                                 -> head
    """
    g = GraphMaker((4, 8, 8), seed, "every_op")
    r1 = g.relu(g.conv("data", 8))
    c2 = g.conv(r1, 8, k=1, p=0)
    g.conv(r1, 8, k=3, s=2)
    c4 = g.conv(r1, 8, groups=2)
    g.conv(r1, 8, groups=8, bias=False)
    relu6 = g.clip(c2, 0.0, 6.0)
    mp = g.maxpool(g.add(c4, r1), 3, 2, 1)
    ap = g.avgpool(relu6, 3, 2, 1, count_include_pad=False)
    g.avgpool(relu6, 2, 2, 0)
    a2 = g.add(g.relu(g.affine(mp)), ap)
    return classifier_head(g, a2, 10)


MODELS = {"resnet_v1": resnet_v1, "resnet_v2": resnet_v2, "vgg": vgg}


def float_values(graph: Graph, x) -> dict:
    return run_integer(qgraph_from_float(graph), x, keep="all")


def calibrate_amax(graph: Graph, x, method="power2") -> dict:
    """Per-tensor abs-max over ``x`` (rounded up to a power of two for 'power2')."""
    amax = {k: float(np.abs(v).max()) for k, v in float_values(graph, x).items()}
    if method == "power2":
        amax = {k: float(2.0 ** np.ceil(np.log2(v))) if v > 0 else 0.0 for k, v in amax.items()}
    return amax


def images(n, shape, seed=1, std=1.0):
    return (np.random.RandomState(seed).randn(n, *shape) * std).astype(np.float32)


OPTION_SETS = {
    "power2-b16": QuantOptions(),
    "power2-b8": QuantOptions(bias_bits=8),
    "power2-b9-channel": QuantOptions(bias_bits=9, weight_granularity="channel"),
    "power2-b32": QuantOptions(bias_bits=32),
    "max-int32acc-channel": QuantOptions(activation_method="max", weight_scale="max",
                                         weight_granularity="channel", bias_mode="int32-acc"),
    "max-b16": QuantOptions(activation_method="max", weight_scale="max", bias_bits=16),
}


def realized(graph, options, calib):
    method = "power2" if options.activation_method == "power2" else "max"
    return realize(graph, calibrate_amax(graph, calib, method), options)


def sweep_in_process(config, out, *extra):
    """``qcal sweep CONFIG --output OUT --quiet EXTRA...`` through the CLI in this process; it must
    exit 0. Returns (the folder's results.json, the command's output)."""
    import json

    from click.testing import CliRunner

    from qcal.cli import main

    result = CliRunner().invoke(main, ["sweep", str(config), "--output", str(out), "--quiet",
                                       *extra], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return json.loads((out / "results.json").read_text()), result.output


def write_jpeg(path, rng, size=(40, 56)):
    import cv2

    image = rng.randint(0, 256, size=size + (3,), dtype=np.uint8)
    path.parent.mkdir(parents=True, exist_ok=True)
    assert cv2.imwrite(str(path), image)
    return path


def tvm_and_numpy_values(qgraph, x, use_schedules=True):
    """TVM's value of every node of ``qgraph`` on ``x`` (one compile), and numpy's."""
    from qcal.backend.tvm import emit

    names = [n.name for n in qgraph.nodes[1:]]
    main = emit.build(emit.emit_relax(qgraph, len(x), outputs=names), use_schedules=use_schedules)
    return dict(zip(names, emit.run(main, x))), run_integer(qgraph, x, keep="all")


def tvm_mismatches(qgraph, tvm_values, ref_values) -> list:
    """Nodes whose TVM value differs from numpy's in any bit (or in dtype)."""
    bad = []
    for name, got in tvm_values.items():
        node = qgraph.node(name)
        want = ref_values[name]
        if node.is_int:
            ok = got.dtype == np.dtype(node.dtype) and np.array_equal(got.astype(np.int64), want)
        else:
            ok = got.dtype == np.float32 and np.array_equal(got, want)
        if not ok:
            bad.append(f"{name} ({node.op})")
    return bad
