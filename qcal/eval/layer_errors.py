"""Evaluate stage, per-layer errors: where in the network the integer model departs from float.

The integer model's tensors are read from the numpy integer interpreter, which TVM's output equals
bit for bit (``qcal.reference.int_interpreter``; a run verifies it), and compared with the float
model's on the same images. Both interpreters run side by side, tensor by tensor: each layer's
error is measured as soon as both of its values exist and the values are then dropped, so memory
holds a few live tensors, never every activation of the network (at 260x260, 16 images of
EfficientNet-Lite0 are 3 GB of int64 activations).
"""
from __future__ import annotations

import numpy as np

from qcal.eval.fidelity import sqnr_from_energies
from qcal.ir.qgraph import QGraph, QNode
from qcal.quant.realize import qgraph_from_float
from qcal.reference.float_interpreter import channel_view
from qcal.reference.int_interpreter import iter_integer


def layer_errors(qgraph: QGraph, graph, x: np.ndarray) -> list:
    """Per float-graph tensor that the integer model computes: how far its dequantized integer
    value is from the float model's, on images ``x``. Rows (graph order) with ``tensor``, ``op``,
    ``sqnr_db`` (signal-to-quantization-noise ratio) and ``max_abs_error``; layers with a bias also
    get ``bias_max_error`` (|bias as added - float bias|, static) and ``bias_error_vs_acc_lsb``
    (that error in units of the accumulator's scale: above 0.5 the bias is coarser than the
    accumulator it is added to, which is where short biases lose accuracy)."""
    names = {n.name for n in qgraph.nodes}
    measured = [f.name for f in graph.nodes[1:] if f.name in names and qgraph.node(f.name).is_int]
    wanted = set(measured)
    floats = ((node.name, value) for node, value in iter_integer(qgraph_from_float(graph), x)
              if node.name in wanted)
    pending = {}  # float values computed ahead of their integer counterpart (none when the
    rows = {}     # two graphs list the measured tensors in the same order, as realize does)
    for qnode, value in iter_integer(qgraph, x):
        if qnode.name in wanted:
            while qnode.name not in pending:
                name, reference = next(floats)
                pending[name] = reference
                del reference
            rows[qnode.name] = _row(graph.node(qnode.name), qgraph, qnode, value,
                                    pending.pop(qnode.name))
        del value  # not held while the next tensor is computed
    return [rows[name] for name in measured]


def _row(fnode, qgraph: QGraph, qnode: QNode, value: np.ndarray, reference: np.ndarray) -> dict:
    # image by image: the float64 temporaries are one image's, whatever the number of images
    signal = noise = max_abs = 0.0
    scale = channel_view(qnode.scale, value.ndim)
    for image in range(len(value)):
        ref = reference[image:image + 1].astype(np.float64)
        error = ref - value[image:image + 1].astype(np.float64) * scale
        signal += float(np.sum(np.square(ref)))
        noise += float(np.sum(np.square(error)))
        max_abs = max(max_abs, float(np.abs(error).max()))
    row = {"tensor": fnode.name, "op": fnode.op, "sqnr_db": sqnr_from_energies(signal, noise),
           "max_abs_error": max_abs}
    if qnode.op == "bias_add":
        bias = fnode.params.get("bias", fnode.params.get("shift"))
        added = qnode.params["bias"].astype(np.float64) * np.asarray(qnode.scale)
        error = np.abs(added - np.asarray(bias, dtype=np.float64))
        acc_scale = _accumulator_scale(qgraph, qnode)
        row["bias_max_error"] = float(error.max())
        row["bias_error_vs_acc_lsb"] = float((error / acc_scale).max())
    return row


def _accumulator_scale(qgraph: QGraph, node: QNode):
    """The scale of the product s_in * s_w feeding a bias_add (before any alignment shift)."""
    src = qgraph.node(node.inputs[0])
    while src.op == "requantize":
        src = qgraph.node(src.inputs[0])
    return np.asarray(src.scale)
