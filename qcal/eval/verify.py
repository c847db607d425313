"""Verify stage: before a variant is evaluated, its compiled model must compute what the numpy
integer reference (``qcal.reference.int_interpreter``) computes, bit for bit.

Pipeline position: realize -> compile -> **verify** -> evaluate. A top-1 figure computed from wrong
integers looks like any other figure (a miscompiled depthwise conv once printed 0 % top-1 for
every variant, while the per-layer SQNR columns, computed on the reference, looked healthy), so
each variant first runs a few calibration images through the very executable it is evaluated with
and compares its logits with the reference's. On a mismatch a *probe* (the same graph compiled to
return every layer's output) names the first layer whose output differs, and the variant stops
with ``VerificationFailed``, one line.

Two kinds of check, chosen from the graph:

- ``logits``: every float op left in the graph computes each output with a fixed sequence of
  IEEE operations (ResNet v2's input affine, the final dequantize), so TVM's logits and the
  reference's are the same bits.
- ``layers``: float layers that sum (a conv or dense kept in float32 by ``skip_k_conv`` /
  ``skip_dense``) add in another order than numpy, so a last-bit difference is no error, and it
  can move an int8 rounding downstream. Then the probe is the check: each layer is computed by
  the reference from TVM's own values of its inputs, integer layers must match bit for bit,
  summing float layers to a relative 1e-4; and the evaluated executable's logits must equal the
  probe's.

This module holds the comparisons only; the backend supplies the two runners
(``qcal.backend.tvm.compile.CompiledModel.run`` and ``run_probe``).
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import numpy as np

from qcal.errors import QcalError
from qcal.ir.qgraph import QGraph
from qcal.reference.int_interpreter import run_integer, run_node

# Float ops whose every output element is a sum of many products: their last bit depends on the
# order of summation, which TVM's schedules choose differently from numpy.
SUMMING_FLOAT_OPS = frozenset({"conv2d", "dense", "avg_pool2d", "global_avg_pool2d"})
FLOAT_RTOL = 1e-4  # for those: float32 sums of a few thousand terms agree far closer than this
LAYER_OPS = ("qconv2d", "qdense", "conv2d", "dense")  # the op a layer is named after


class VerificationFailed(QcalError):
    """The compiled model computes something else than its reference."""


@dataclass(frozen=True)
class Verification:
    images: int  # calibration images checked (0: not verified)
    check: str  # "logits", "layers" or "off"
    seconds: float

    def record(self) -> dict:
        return {"verified_images": self.images, "verify_check": self.check,
                "verify_seconds": round(self.seconds, 3)}


@dataclass(frozen=True)
class LayerDifference:
    node: str  # the probed node whose value differs
    layer: str  # the layer it belongs to (the conv or dense feeding it, else the node)
    ops: tuple  # the ops computed from the previous probed values up to ``node``
    differing: int
    total: int
    max_difference: float
    note: str = ""

    def describe(self) -> str:
        where = f"'{self.layer}' ({' > '.join(self.ops)}"
        where += f", output '{self.node}')" if self.node != self.layer else ")"
        if self.note:
            return f"{where}: {self.note}"
        return (f"{where}: {self.differing} of {self.total} values differ, by up to "
                f"{self.max_difference:g}")


def bit_reproducible(qgraph: QGraph) -> bool:
    """Whether TVM's logits must be the reference's exact bits (no float op that sums)."""
    return not any(n.op in SUMMING_FLOAT_OPS for n in qgraph.nodes if not n.is_int)


def probe_outputs(qgraph: QGraph) -> list:
    """The nodes a probe returns: every layer output (int8 and float32 tensors) and the graph
    output. int32 accumulators stay inside their layer, so the probe's layers fuse as the
    evaluated model's do."""
    names = [n.name for n in qgraph.nodes[1:] if n.dtype != "int32"]
    if qgraph.output.name not in names:
        names.append(qgraph.output.name)
    return names


def _difference(node, got, want) -> tuple | None:
    """(differing, total, largest difference) when ``got`` is not ``want``'s value for ``node``;
    None when it is."""
    got = np.asarray(got)
    if got.shape != want.shape:
        return want.size, want.size, float("inf")
    if node.is_int:
        if got.dtype != np.dtype(node.dtype):
            return want.size, want.size, float("inf")
        delta = np.abs(got.astype(np.int64) - want)
        bad = delta != 0
    else:
        want32 = want.astype(np.float32)
        if node.op in SUMMING_FLOAT_OPS:
            scale = max(1.0, float(np.abs(want32).max(initial=0)))
            bad = ~np.isclose(got, want32, rtol=FLOAT_RTOL, atol=FLOAT_RTOL * scale)
        else:
            bad = ~((got == want32) | (np.isnan(got) & np.isnan(want32)))
        delta = np.abs(got.astype(np.float64) - want32)
    if not bad.any():
        return None
    return int(bad.sum()), int(bad.size), float(delta[bad].max())


def first_differing_layer(qgraph: QGraph, x: np.ndarray, probed: dict) -> LayerDifference | None:
    """The first probed node (graph order) whose TVM value differs from the reference's value of
    it computed from TVM's own values of the probed nodes before it; None when all agree."""
    known = {qgraph.input.name: np.asarray(x, dtype=np.float32)}
    chains = {qgraph.input.name: ()}
    for node in qgraph.nodes[1:]:
        chain = tuple(dict.fromkeys(
            [n for i in node.inputs if i not in probed for n in chains[i]] + [node.name]))
        try:
            want = run_node(node, [known[i] for i in node.inputs])
        except QcalError as exc:  # the reference itself refuses TVM's inputs (a bound exceeded)
            want, note = None, str(exc)
        else:
            note = ""
        if node.name not in probed:
            if want is None:
                return _layer(qgraph, node.name, chain, 0, 0, 0.0, note)
            known[node.name], chains[node.name] = want, chain
            continue
        got = probed[node.name]
        if want is None:
            return _layer(qgraph, node.name, chain, 0, 0, 0.0, note)
        difference = _difference(node, got, want)
        if difference is not None:
            return _layer(qgraph, node.name, chain, *difference)
        known[node.name] = np.asarray(got).astype(want.dtype)
        chains[node.name] = ()
    return None


def _layer(qgraph, name, chain, differing, total, largest, note="") -> LayerDifference:
    nodes = [qgraph.node(n) for n in chain]
    anchor = next((n for n in nodes if n.op in LAYER_OPS), qgraph.node(name))
    return LayerDifference(name, anchor.name.split(":")[0], tuple(n.op for n in nodes),
                           differing, total, largest, note)


def verify_compiled(qgraph: QGraph, images: np.ndarray, run_logits, run_probe,
                    what: str) -> Verification:
    """Check the compiled model on ``images`` (float32 NCHW) before it is evaluated.

    ``run_logits(x)``: the executable that will be evaluated; ``run_probe(x, names)``: a dict of
    those nodes' values from the same graph compiled to return them. Raises
    ``VerificationFailed`` (one line naming the first differing layer) on a mismatch."""
    start = time.perf_counter()
    count = len(images)
    if count == 0:
        return Verification(0, "off", 0.0)
    x = np.asarray(images, dtype=np.float32)
    head = f"{what}: the compiled model differs from its numpy integer reference on {count} " \
           f"calibration image{'s' if count != 1 else ''}"
    logits = np.asarray(run_logits(x))
    if bit_reproducible(qgraph):
        difference = _difference(qgraph.output, logits, run_integer(qgraph, x))
        if difference is None:
            return Verification(count, "logits", time.perf_counter() - start)
        probed = run_probe(x, probe_outputs(qgraph))
        layer = first_differing_layer(qgraph, x, probed)
        if layer is None:
            raise VerificationFailed(
                f"{head} ({difference[0]} of {difference[1]} logits, by up to "
                f"{difference[2]:g}), yet every layer of a probe returning each layer's output "
                "matches: the difference comes from compiling the layers together")
        raise VerificationFailed(f"{head}; first differing layer {layer.describe()}")
    probed = run_probe(x, probe_outputs(qgraph))
    layer = first_differing_layer(qgraph, x, probed)
    if layer is not None:
        raise VerificationFailed(f"{head}; first differing layer {layer.describe()}")
    difference = _difference(qgraph.output, logits, np.asarray(probed[qgraph.output.name]))
    if difference is not None:
        raise VerificationFailed(
            f"{what}: the evaluated executable's logits differ from those of a probe whose every "
            f"layer matches the reference ({difference[0]} of {difference[1]}, by up to "
            f"{difference[2]:g}) on {count} calibration image{'s' if count != 1 else ''}")
    return Verification(count, "layers", time.perf_counter() - start)
