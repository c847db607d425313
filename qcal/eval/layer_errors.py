"""Evaluate stage, per-layer errors: where in the network the integer model departs from float.

The integer model's tensors are read from the numpy integer interpreter, which TVM's output equals
bit for bit (``qcal.reference.int_interpreter``; a run verifies it), and compared with the float
model's on the same images. Both interpreters run side by side, tensor by tensor, a couple of
images at a time: each layer's error is accumulated as soon as both of its values exist and the
values are then dropped, so memory holds a few live tensors of a few images, never every
activation of the network (at 260x260, 16 images of EfficientNet-Lite0 are 3 GB of int64
activations) and nothing that grows with the number of images.
"""
from __future__ import annotations

import numpy as np

from qcal.eval.fidelity import sqnr_from_energies
from qcal.ir.qgraph import QGraph, QNode
from qcal.quant.realize import qgraph_from_float
from qcal.reference.float_interpreter import channel_view
from qcal.reference.int_interpreter import iter_integer

IMAGES_PER_PASS = 2  # the interpreters' temporaries scale with this, not with the image count


def layer_errors(qgraph: QGraph, graph, x: np.ndarray, images_per_pass: int = IMAGES_PER_PASS
                 ) -> list:
    """Per float-graph tensor that the integer model computes: how far its dequantized integer
    value is from the float model's, on images ``x``. Rows (graph order) with ``tensor``, ``op``,
    ``sqnr_db`` (signal-to-quantization-noise ratio) and ``max_abs_error``; layers with a bias also
    get ``bias_max_error`` (|bias as added - float bias|, static) and ``bias_error_vs_acc_lsb``
    (that error in units of the accumulator's scale: above 0.5 the bias is coarser than the
    accumulator it is added to, which is where short biases lose accuracy).

    The images go through in passes of ``images_per_pass``; the energies and the largest error
    add up over passes, so the figures are those of all images at once (up to float64 rounding)."""
    names = {n.name for n in qgraph.nodes}
    measured = [f.name for f in graph.nodes[1:] if f.name in names and qgraph.node(f.name).is_int]
    totals = {name: [0.0, 0.0, 0.0] for name in measured}  # signal, noise energies; max |error|
    float_qgraph = qgraph_from_float(graph)
    for start in range(0, len(x), images_per_pass):
        _accumulate(qgraph, float_qgraph, x[start:start + images_per_pass], totals)
    rows = []
    for name in measured:
        signal, noise, max_abs = totals[name]
        qnode = qgraph.node(name)
        rows.append({"tensor": name, "op": graph.node(name).op,
                     "sqnr_db": sqnr_from_energies(signal, noise), "max_abs_error": max_abs,
                     **(_bias_error(graph.node(name), qgraph, qnode)
                        if qnode.op == "bias_add" else {})})
    return rows


def _accumulate(qgraph: QGraph, float_qgraph: QGraph, x: np.ndarray, totals: dict):
    """One pass of both interpreters over ``x``, side by side, adding to ``totals``."""
    floats = ((node.name, value) for node, value in iter_integer(float_qgraph, x)
              if node.name in totals)
    pending = {}  # float values computed ahead of their integer counterpart (none when the
    # two graphs list the measured tensors in the same order, as realize does)
    for qnode, value in iter_integer(qgraph, x):
        if qnode.name in totals:
            while qnode.name not in pending:
                name, reference = next(floats)
                pending[name] = reference
                del reference
            reference = pending.pop(qnode.name).astype(np.float64)
            error = reference - value.astype(np.float64) * channel_view(qnode.scale, value.ndim)
            total = totals[qnode.name]
            total[0] += float(np.sum(np.square(reference)))
            total[1] += float(np.sum(np.square(error)))
            total[2] = max(total[2], float(np.abs(error).max()))
            del reference, error
        del value  # not held while the next tensor is computed


def _bias_error(fnode, qgraph: QGraph, qnode: QNode) -> dict:
    bias = fnode.params.get("bias", fnode.params.get("shift"))
    added = qnode.params["bias"].astype(np.float64) * np.asarray(qnode.scale)
    error = np.abs(added - np.asarray(bias, dtype=np.float64))
    return {"bias_max_error": float(error.max()),
            "bias_error_vs_acc_lsb": float((error / _accumulator_scale(qgraph, qnode)).max())}


def _accumulator_scale(qgraph: QGraph, node: QNode):
    """The scale of the product s_in * s_w feeding a bias_add (before any alignment shift)."""
    src = qgraph.node(node.inputs[0])
    while src.op == "requantize":
        src = qgraph.node(src.inputs[0])
    return np.asarray(src.scale)
