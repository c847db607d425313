"""Quantize stage, cross-layer equalization: rescale consecutive convs so that their per-channel
weight ranges are balanced before the weights are quantized per tensor.

Pipeline position: import -> **equalize** -> calibrate (its own statistics pass: the tensors between
the rescaled convs change) -> annotate -> realize. The float32 output is unchanged.

Method (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV, section 4.1). For a pair ``conv1 -> f -> conv2`` where ``f`` commutes with a
positive per-channel scaling (``f(x / s) = f(x) / s``), output channel ``c`` of conv1 (its weights
and bias) is divided by ``s_c`` and input channel ``c`` of conv2 multiplied by it. With ``r1_c`` the
range of conv1's output channel ``c`` and ``r2_c`` that of conv2's input channel ``c``,
``s_c = sqrt(r1_c / r2_c)`` makes both ranges ``sqrt(r1_c r2_c)``, which maximises the product of the
two layers' per-channel precisions (the paper's result). Pairs are equalized in network order and
the sweep repeated until no scale moves by more than ``TOLERANCE`` (the paper iterates; a depthwise
conv between two convs is the middle of two pairs, so its scales settle over the sweeps, as the
paper's MobileNetV2 triplets).

Where ``f`` commutes:
- identity (conv1 feeds conv2 directly) and ReLU: exactly;
- a clip (ReLU6 = clip 0..6): its bounds are divided by ``s_c`` too, so clip(x / s, 0, 6 / s) =
  clip(x, 0, 6) / s exactly; the equalized graph carries per-channel clip bounds (a tuple in
  ``a_min`` / ``a_max``), which the realizer turns into per-channel integer bounds. The paper
  instead replaces ReLU6 by ReLU for MobileNetV2, which changes the float model; qcal does not.
A pair is taken only when conv1's output has no other reader (not a residual branch, not the
output) and, through ``f``, conv2 is its only reader. conv2 may be grouped or depthwise (each input
channel's weights are those of its group's outputs); conv1 may be any conv.

High-bias absorption (the paper's section 4.1.3, which moves ``max(0, beta - 3 gamma)`` of the
BatchNorm statistics from conv1's bias into conv2's through a ReLU) is not done: the BatchNorm is
folded at import, so its statistics are gone, and an absorption estimated from the calibration data
would change the float model wherever an evaluated image falls below the estimate.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcal.ir.graph import Graph, Node

MAX_SWEEPS = 50
TOLERANCE = 1e-4  # stop when every scale of a sweep is within this of 1 (relative)


@dataclass(frozen=True)
class EqualizedPair:
    first: str
    activation: str | None
    second: str


def equalizable_pairs(graph: Graph) -> list:
    """(conv1, activation or None, conv2) triples where the scaling commutes, in network order."""
    readers = {}
    for n in graph.nodes:
        for i in n.inputs:
            readers.setdefault(i, []).append(n)
    output = graph.output.name
    pairs = []
    for n in graph.nodes:
        if n.op != "conv2d" or n.name == output:
            continue
        after = readers.get(n.name, [])
        if len(after) != 1:
            continue
        act = after[0] if after[0].op in ("relu", "clip") else None
        if act is not None:
            if act.name == output:
                continue
            after = readers.get(act.name, [])
            if len(after) != 1:
                continue
        second = after[0]
        if second.op == "conv2d" and second.inputs == ((act or n).name,):
            pairs.append(EqualizedPair(n.name, act.name if act else None, second.name))
    return pairs


def _input_channel_view(weight: np.ndarray, groups: int):
    """conv2's weights (O, I/g, kh, kw) as (input channel, everything it multiplies): the
    outputs of its group at that channel's position in the group."""
    out, per_group = weight.shape[0], weight.shape[1]
    outs_per_group = out // groups
    w = weight.reshape(groups, outs_per_group, per_group, -1)  # g, o/g, i/g, k
    return w.transpose(0, 2, 1, 3).reshape(groups * per_group, -1)


def _scale_input_channels(weight: np.ndarray, groups: int, s: np.ndarray) -> np.ndarray:
    out, per_group = weight.shape[0], weight.shape[1]
    w = weight.reshape(groups, out // groups, per_group, *weight.shape[2:])
    w = w * s.reshape(groups, 1, per_group, *(1,) * (weight.ndim - 2))
    return w.reshape(weight.shape)


def equalize(graph: Graph):
    """(the equalized graph, its pairs, the number of sweeps); the input graph is not changed."""
    nodes = [Node(n.name, n.op, n.inputs, dict(n.attrs), {k: np.array(v, dtype=np.float64)
                                                          for k, v in n.params.items()})
             for n in graph.nodes]
    by_name = {n.name: n for n in nodes}
    pairs = equalizable_pairs(graph)
    clip_scale = {p.activation: np.ones(by_name[p.first].params["weight"].shape[0])
                  for p in pairs if p.activation and by_name[p.activation].op == "clip"}
    sweeps = 0
    for sweeps in range(1, MAX_SWEEPS + 1):
        worst = 0.0
        for pair in pairs:
            first, second = by_name[pair.first], by_name[pair.second]
            w1, w2 = first.params["weight"], second.params["weight"]
            groups = int(second.attrs.get("groups", 1))
            r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
            r2 = np.abs(_input_channel_view(w2, groups)).max(axis=1)
            s = np.where((r1 > 0) & (r2 > 0), np.sqrt(r1 / np.where(r2 > 0, r2, 1.0)), 1.0)
            first.params["weight"] = w1 / s.reshape((-1,) + (1,) * (w1.ndim - 1))
            if "bias" in first.params:
                first.params["bias"] = first.params["bias"] / s
            second.params["weight"] = _scale_input_channels(w2, groups, s)
            if pair.activation in clip_scale:
                clip_scale[pair.activation] = clip_scale[pair.activation] * s
            worst = max(worst, float(np.abs(s - 1).max(initial=0.0)))
        if worst < TOLERANCE:
            break
    for name, s in clip_scale.items():
        node = by_name[name]
        for key in ("a_min", "a_max"):
            node.attrs[key] = tuple(float(v) for v in np.broadcast_to(
                np.asarray(graph.node(name).attrs[key], np.float64), s.shape) / s)
    for node, original in zip(nodes, graph.nodes):
        node.params = {k: v.astype(original.params[k].dtype) for k, v in node.params.items()}
    return Graph(nodes, graph.name), pairs, sweeps
