"""qcal's float graph: the one representation every stage after import works on.

Import (``qcal.importer``) turns a Gluon network or an ONNX file into a ``Graph`` of the small op set
below, with BatchNorm already folded (into the preceding conv, or into a ``channel_affine``) and
inference-only ops (Dropout) removed. Annotate, calibrate and realize read it; the numpy reference
interprets it; the TVM adapter emits it as Relax. Keeping the op set this small is deliberate: every
op here has a float semantics, an integer semantics and a numpy reference.

Tensors are named by the node that produces them (one output per node). Layout is NCHW throughout.

Float op set (``Node.op``), with ``attrs`` and ``params``:

==================  ==========================================  ==================================
op                  attrs                                       params (numpy float32)
==================  ==========================================  ==================================
input               shape: (C, H, W) of one image               -
conv2d              strides (sh, sw), padding (t, l, b, r),     weight (O, I/groups, kh, kw),
                    dilation (dh, dw), groups                   bias (O,) [optional]
dense               -  (input is 2-D: N x I)                    weight (O, I), bias (O,) [optional]
channel_affine      -  (y = x * scale[c] + shift[c])            scale (C,), shift (C,)
relu                -                                           -
clip                a_min, a_max (ReLU6 is clip 0..6), each a   -
                    number or a tuple, one per channel
max_pool2d          pool_size, strides, padding (t, l, b, r)    -
avg_pool2d          pool_size, strides, padding,                -
                    count_include_pad (bool)
global_avg_pool2d   -  (output N x C x 1 x 1)                   -
flatten             -  (N x C x H x W -> N x CHW)               -
add                 -  (two inputs, same shape)                 -
==================  ==========================================  ==================================
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from qcal.errors import QcalError

FLOAT_OPS = frozenset({
    "input", "conv2d", "dense", "channel_affine", "relu", "clip", "max_pool2d", "avg_pool2d",
    "global_avg_pool2d", "flatten", "add",
})


@dataclass
class Node:
    name: str
    op: str
    inputs: tuple = ()
    attrs: dict = field(default_factory=dict)
    params: dict = field(default_factory=dict)

    def __post_init__(self):
        self.inputs = tuple(self.inputs)


@dataclass
class Graph:
    """A topologically ordered list of nodes; the last node's output is the graph's output."""

    nodes: list
    name: str = "model"
    # tensor name -> the source framework's name for the same values (MXNet symbol outputs, set
    # by the MXNet importer): the calibration pass reads them from MXNet's own executor. Not part
    # of the fingerprint: it names where values come from, not what the model computes.
    source_tensors: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        self.validate()

    @property
    def input(self) -> Node:
        return self.nodes[0]

    @property
    def output(self) -> Node:
        return self.nodes[-1]

    def node(self, name: str) -> Node:
        for n in self.nodes:
            if n.name == name:
                return n
        raise KeyError(name)

    def consumers(self, name: str) -> list:
        return [n for n in self.nodes if name in n.inputs]

    def ops_of(self, op: str) -> list:
        return [n for n in self.nodes if n.op == op]

    def validate(self):
        if not self.nodes or self.nodes[0].op != "input":
            raise QcalError(f"graph '{self.name}': the first node must be the input")
        seen = set()
        for n in self.nodes:
            if n.op not in FLOAT_OPS:
                raise QcalError(f"graph '{self.name}': op '{n.op}' at layer '{n.name}' is not "
                                f"one qcal can quantize")
            if n.name in seen:
                raise QcalError(f"graph '{self.name}': two nodes are named '{n.name}'")
            for i in n.inputs:
                if i not in seen:
                    raise QcalError(f"graph '{self.name}': '{n.name}' reads '{i}' before it is "
                                    f"computed")
            seen.add(n.name)

    def fingerprint(self) -> str:
        """A stable hash of structure and weights: calibration files record it to refuse reuse
        with another model."""
        import hashlib

        h = hashlib.sha256()
        for n in self.nodes:
            h.update(repr((n.name, n.op, n.inputs, sorted(n.attrs.items()))).encode())
            for k in sorted(n.params):
                a = np.ascontiguousarray(n.params[k])
                h.update(k.encode() + str(a.dtype).encode() + str(a.shape).encode() + a.tobytes())
        return h.hexdigest()[:16]


def residual_blocks(graph: Graph) -> list:
    """The residual blocks of ``graph``: per ``add`` whose operands meet again (a skip
    connection), ``(add name, nodes of the block in graph order)``; the block is every node after
    the add's immediate dominator (the last node every path from the input to the add passes
    through: the block's entry) from which the add is reached, the add included. Found from the
    structure alone, whatever the model family calls its blocks."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    dominators = {}  # node -> every node that dominates it (itself included)
    for n in graph.nodes:
        common = None
        for i in n.inputs:
            common = set(dominators[i]) if common is None else common & dominators[i]
        dominators[n.name] = (common or set()) | {n.name}
    blocks = []
    for add in graph.ops_of("add"):
        entry = max(dominators[add.name] - {add.name}, key=index.get, default=None)
        if entry is None:
            continue
        reaches, members = {add.name}, []
        for n in reversed(graph.nodes[index[entry] + 1:index[add.name] + 1]):
            if n.name in reaches:
                members.append(n.name)
                reaches.update(n.inputs)
        blocks.append((add.name, tuple(reversed(members))))
    return blocks
