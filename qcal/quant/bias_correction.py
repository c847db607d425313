"""Quantize stage, empirical bias correction: re-estimate each layer's bias so that the integer
model's per-channel output mean equals the float model's on the calibration images.

Pipeline position: import -> annotate -> calibrate -> **correct biases** -> realize. The result is
the float ``Graph`` with corrected biases; ``realize`` then quantizes it as usual (so the corrected
bias goes through the same B-bit or int32-acc rounding and overflow proof as any other).

Method (Nagel et al. 2019, "Data-Free Quantization Through Weight Equalization and Bias
Correction", ICCV, section 4.2, the *empirical* bias correction; Finkelstein et al. 2019, "Fighting
Quantization Bias With Bias", which applies it layer by layer on the quantized network): a quantized
layer computes ``W~ x~`` where the float layer computes ``W x``; the expected error
``E[W~ x~] - E[W x]`` per output channel is measured on data and subtracted from the bias. qcal
measures it on the integer model itself:

- for each biased integer conv / dense / channel_affine in network order, the mean over the
  calibration images and positions of its integer accumulator (before the bias is added and
  rounded), times the accumulator scale, is compared with the float model's mean of the same
  layer's output less its float bias;
- the error therefore holds the weight quantization of this layer AND everything upstream: the
  activation (input) quantization, the rounding of earlier layers' requantizes and biases, and the
  earlier layers' corrections, which are applied before the next layer is measured ("network
  order, so later layers see corrected inputs");
- the bias's own B-bit rounding is not part of the measurement: the corrected float bias is
  rounded afterwards by the realizer, like any bias.

This is the variant with quantized inputs: AIMET's empirical bias correction compares the
quantization-simulated model's layer outputs with the float model's in the same way. NNCF's
``BiasCorrection`` removes the activation quantizers and propagates only weight quantization and
earlier corrections, and its ``FastBiasCorrection`` feeds each layer the float model's input
(weight quantization of that layer alone); neither is what qcal does.

A layer without a bias is left alone (ResNet v2's bias-free convs feed a BatchNorm, a
``channel_affine`` whose shift is corrected instead); float layers are exact and left alone.
Memory: the integer values of the live tensors of every correction image are held at once (one
layer's correction must be known before any image passes it), in their integer dtype.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcal.errors import QcalError
from qcal.ir.graph import Graph, Node
from qcal.reference.int_interpreter import run_node

BIAS_PARAM = {"conv2d": "bias", "dense": "bias", "channel_affine": "shift"}
_STORE_DTYPE = {"int8": np.int8, "int32": np.int32}


@dataclass(frozen=True)
class CorrectionData:
    """What the correction measures on: the correction images (float32 NCHW), the float model's
    per-channel output mean of every biased layer over them, and the batch to run them in."""

    images: np.ndarray
    float_means: dict
    batch_size: int


@dataclass(frozen=True)
class LayerCorrection:
    """One layer's correction: the per-channel shift removed from its bias (float units)."""

    layer: str
    shift: np.ndarray

    def summary(self) -> str:
        return (f"{self.layer}: bias corrected by up to {float(np.abs(self.shift).max()):.3g} "
                f"(mean |shift| {float(np.abs(self.shift).mean()):.3g})")


def correctable_layers(graph: Graph, annotation) -> list:
    """The biased layers the integer model computes, in network order."""
    return [name for name in biased_layers(graph) if annotation.is_integer(name)]


def float_output_means(graph: Graph, layers, batches, source) -> dict:
    """Per-channel mean of each layer's float output over ``batches`` (iterable of float32 NCHW
    arrays), read through ``source`` (a tensor source of ``qcal.calib.sources``: MXNet's executor
    for Gluon models, the numpy interpreter otherwise)."""
    wanted = set(layers)
    sums, counts = {}, {}

    def observe(name, value):
        if name in wanted:
            axes = (0,) + tuple(range(2, value.ndim))
            sums[name] = sums.get(name, 0.0) + value.astype(np.float64).sum(axis=axes)
            counts[name] = counts.get(name, 0) + value.size // value.shape[1]

    for x in batches:
        source.run(x, observe)
    return {name: sums[name] / counts[name] for name in layers}


def biased_layers(graph: Graph) -> list:
    """Every conv / dense / channel_affine with a bias, in network order."""
    return [n.name for n in graph.nodes if n.op in BIAS_PARAM and BIAS_PARAM[n.op] in n.params]


def correct_biases(graph: Graph, realize_graph, layers, data: CorrectionData):
    """(graph with corrected biases, [LayerCorrection]) for ``layers`` (``correctable_layers``).

    ``realize_graph(graph) -> QGraph`` realizes a float graph under the variant's options and
    ranges; it is called again after each correction, and the walk continues in the new integer
    graph after the corrected layer's accumulator (everything before it is unchanged)."""
    nodes = [Node(n.name, n.op, n.inputs, dict(n.attrs), dict(n.params)) for n in graph.nodes]
    corrected = Graph(nodes, graph.name)
    by_name = {n.name: n for n in nodes}
    images, size = data.images, data.batch_size
    if not len(images):
        raise QcalError("bias correction needs calibration images, and there are none")
    chunks = [images[i:i + size] for i in range(0, len(images), size)]
    qgraph = realize_graph(corrected)
    values = {}  # node name -> [per-chunk values], integers in their own dtype
    pending = list(layers)
    corrections = []
    step = 0
    while step < len(qgraph.nodes):
        node = qgraph.nodes[step]
        if step == 0:
            values[node.name] = chunks
        else:
            values[node.name] = [_stored(node, run_node(node, [_loaded(values[i][c])
                                                               for i in node.inputs]))
                                 for c in range(len(chunks))]
        if pending and node.name == f"{pending[0]}:acc":
            layer = pending.pop(0)
            target = by_name[layer]
            param = BIAS_PARAM[target.op]
            bias = target.params[param].astype(np.float64)
            shift = _accumulator_mean(node, values[node.name]) - (data.float_means[layer] - bias)
            target.params[param] = (bias - shift).astype(target.params[param].dtype)
            corrections.append(LayerCorrection(layer, shift))
            prefix = [n.name for n in qgraph.nodes[:step + 1]]
            qgraph = realize_graph(corrected)
            if [n.name for n in qgraph.nodes[:step + 1]] != prefix:
                raise QcalError(f"bias correction at '{layer}': realizing the corrected graph "
                                f"changed the layers before it (a realizer bug; please report it)")
        _drop_dead(qgraph, values, step)
        step += 1
    return corrected, corrections


def _accumulator_mean(node, chunks) -> np.ndarray:
    """The accumulator's per-channel mean in float units (exact integer sums, then one scale)."""
    total = sum(c.astype(np.int64).sum(axis=(0,) + tuple(range(2, c.ndim))) for c in chunks)
    count = sum(c.size // c.shape[1] for c in chunks)
    scale = np.asarray(node.scale, dtype=np.float64)
    return total.astype(np.float64) / count * scale


def _stored(node, value):
    dtype = _STORE_DTYPE.get(node.dtype) if node.is_int else None
    return value.astype(dtype) if dtype is not None else value


def _loaded(value):
    return value.astype(np.int64) if value.dtype.kind == "i" else value


def _drop_dead(qgraph, values, step):
    """Free every value no node after ``step`` reads (the output is never read: dropped too)."""
    live = set()
    for node in qgraph.nodes[step + 1:]:
        live.update(node.inputs)
    for name in [n for n in values if n not in live]:
        del values[name]
