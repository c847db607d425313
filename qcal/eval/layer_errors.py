"""Evaluate stage, per-layer errors: where in the network the integer model departs from float.

The integer model's tensors are read from the numpy integer interpreter, which TVM's output equals
bit for bit (``qcal.reference.int_interpreter``; a run verifies it), and compared with the float
model's on the same images.
"""
from __future__ import annotations

import numpy as np

from qcal.eval.fidelity import sqnr_db
from qcal.ir.qgraph import QGraph, QNode
from qcal.quant.realize import qgraph_from_float
from qcal.reference.float_interpreter import channel_view
from qcal.reference.int_interpreter import run_integer


def layer_errors(qgraph: QGraph, graph, x: np.ndarray) -> list:
    """Per float-graph tensor that the integer model computes: how far its dequantized integer
    value is from the float model's, on images ``x``. Rows (graph order) with ``tensor``, ``op``,
    ``sqnr_db`` (signal-to-quantization-noise ratio) and ``max_abs_error``; layers with a bias also
    get ``bias_max_error`` (|bias as added - float bias|, static) and ``bias_error_vs_acc_lsb``
    (that error in units of the accumulator's scale: above 0.5 the bias is coarser than the
    accumulator it is added to, which is where short biases lose accuracy)."""
    floats = run_integer(qgraph_from_float(graph), x, keep="all")
    ints = run_integer(qgraph, x, keep="all")
    names = {n.name for n in qgraph.nodes}
    rows = []
    for fnode in graph.nodes[1:]:
        if fnode.name not in names or not qgraph.node(fnode.name).is_int:
            continue
        qnode = qgraph.node(fnode.name)
        value = ints[fnode.name]
        real = value.astype(np.float64) * channel_view(qnode.scale, value.ndim)
        ref = floats[fnode.name].astype(np.float64)
        row = {"tensor": fnode.name, "op": fnode.op, "sqnr_db": sqnr_db(ref, real),
               "max_abs_error": float(np.abs(ref - real).max())}
        if qnode.op == "bias_add":
            bias = fnode.params.get("bias", fnode.params.get("shift"))
            added = qnode.params["bias"].astype(np.float64) * np.asarray(qnode.scale)
            error = np.abs(added - np.asarray(bias, dtype=np.float64))
            acc_scale = _accumulator_scale(qgraph, qnode)
            row["bias_max_error"] = float(error.max())
            row["bias_error_vs_acc_lsb"] = float((error / acc_scale).max())
        rows.append(row)
    return rows


def _accumulator_scale(qgraph: QGraph, node: QNode):
    """The scale of the product s_in * s_w feeding a bias_add (before any alignment shift)."""
    src = qgraph.node(node.inputs[0])
    while src.op == "requantize":
        src = qgraph.node(src.inputs[0])
    return np.asarray(src.scale)
