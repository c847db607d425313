"""Evaluate stage: run a model over an image selection and score top-1 / top-5.

A *runner* is anything callable as ``runner(batch_float32_nchw) -> logits (N x classes)``: MXNet's
float32 network, or a TVM-compiled integer model. Scoring is a streaming accumulator over exact counts;
per-image top-5 predictions are kept so later stages can run paired tests on the same images.
Timing excludes data loading (batches are decoded and cached before the clock starts on each batch).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from qcal.data.cache import BatchCache, iter_batches
from qcal.data.plan import Selection


class TopKAccumulator:
    def __init__(self, k: int = 5):
        self.k = k
        self.predictions = []
        self.labels = []

    def update(self, logits: np.ndarray, labels: np.ndarray):
        if len(logits) != len(labels):
            raise ValueError(f"{len(logits)} outputs for {len(labels)} labels")
        # stable sort: ties resolve to the lower class index, identically for every runner
        topk = np.argsort(-logits, axis=1, kind="stable")[:, :self.k]
        self.predictions.append(topk.astype(np.int32))
        self.labels.append(np.asarray(labels, dtype=np.int64))

    @property
    def top5_predictions(self) -> np.ndarray:
        return np.concatenate(self.predictions) if self.predictions else np.zeros((0, self.k),
                                                                                  np.int32)

    @property
    def all_labels(self) -> np.ndarray:
        return np.concatenate(self.labels) if self.labels else np.zeros(0, np.int64)


@dataclass
class EvalResult:
    images: int
    top1: float
    top5: float
    seconds: float
    predictions: np.ndarray = field(repr=False)  # N x 5 class indices
    labels: np.ndarray = field(repr=False)
    # N x classes float32, unless ``evaluate`` was given a reference, a logits file, or told not
    # to keep them
    logits: np.ndarray | None = field(repr=False, default=None)
    fidelity: dict | None = None  # ``qcal.eval.fidelity.compare``'s figures against the reference

    @property
    def images_per_second(self) -> float:
        return self.images / self.seconds if self.seconds > 0 else float("nan")


def evaluate(runner, selection: Selection, batch_size: int, cache: BatchCache | None = None,
             progress=None, reference=None, logits_file=None, fidelity_suffix: str = "",
             keep_logits: bool = True) -> EvalResult:
    """Top-1 / top-5 of ``runner`` on ``selection``; what happens to the logits:

    * ``reference`` (a ``qcal.eval.logit_rows.LogitsReader`` or ``ArrayRows`` of float32's logits
      on the same images, in order): compared batch by batch (``EvalResult.fidelity``), not kept;
    * ``logits_file``: written there as ``.npy`` batch by batch (``LogitsWriter``), not kept;
    * neither: kept in ``EvalResult.logits`` (N x classes) unless ``keep_logits`` is False.
    Either of the first two keeps memory to one batch whatever the number of images."""
    from qcal.eval.fidelity import FidelityAccumulator
    from qcal.eval.logit_rows import LogitsWriter

    if reference is not None and reference.rows != len(selection):
        raise ValueError(f"fidelity needs the same images: {reference.rows} reference rows for "
                         f"{len(selection)} images")
    acc = TopKAccumulator()
    compute_seconds = 0.0
    fidelity = FidelityAccumulator() if reference is not None else None
    writer = LogitsWriter(logits_file, len(selection)) if logits_file is not None else None
    keep = keep_logits and fidelity is None and writer is None
    all_logits, rows = None, 0  # filled in place: no list of batches to concatenate (twice the memory)
    try:
        for images, labels in iter_batches(selection, batch_size, cache):
            start = time.perf_counter()
            logits = runner(images)
            compute_seconds += time.perf_counter() - start
            acc.update(logits, labels)
            if fidelity is not None:
                fidelity.update(reference.take(len(logits)), np.asarray(logits, np.float32))
            if writer is not None:
                writer.write(logits)
            if keep:
                if all_logits is None:
                    all_logits = np.empty((len(selection),) + np.shape(logits)[1:], np.float32)
                all_logits[rows:rows + len(logits)] = logits
            rows += len(logits)
            if progress is not None:
                progress.update(len(labels))
    except BaseException:
        if writer is not None:
            writer.close(complete=False)
        raise
    if writer is not None:
        writer.close()
    result = _result(acc.top5_predictions, acc.all_labels, all_logits[:rows] if keep else None,
                     compute_seconds)
    result.fidelity = fidelity.result(fidelity_suffix) if fidelity is not None else None
    return result


def route_logits(result: EvalResult, reference=None, logits_file=None,
                 fidelity_suffix: str = "") -> EvalResult:
    """What ``evaluate`` does with its logits, for a result computed elsewhere whose logits are
    in memory (merged shards): compared with ``reference``, written to ``logits_file``."""
    from qcal.eval.fidelity import FidelityAccumulator
    from qcal.eval.logit_rows import LogitsWriter

    if reference is not None:
        fidelity = FidelityAccumulator()
        fidelity.update(reference.take(len(result.logits)), result.logits)
        result.fidelity = fidelity.result(fidelity_suffix)
    if logits_file is not None:
        writer = LogitsWriter(logits_file, len(result.logits))
        writer.write(result.logits)
        writer.close()
    return result


def _result(predictions, labels, logits, seconds: float) -> EvalResult:
    labelled = labels >= 0  # label-free images (label -1) count for fidelity only
    correct1 = predictions[:, 0] == labels
    correct5 = (predictions == labels[:, None]).any(axis=1)
    return EvalResult(images=len(labels),
                      top1=float(correct1.mean()) if labelled.all() else float("nan"),
                      top5=float(correct5.mean()) if labelled.all() else float("nan"),
                      seconds=seconds, predictions=predictions, labels=labels, logits=logits)


def merge_results(parts) -> EvalResult:
    """The results of consecutive image ranges as one: what one pass over them all gives (the
    same per-image predictions and logits, the same scores; the compute time is their sum)."""
    return _result(np.concatenate([p.predictions for p in parts]),
                   np.concatenate([p.labels for p in parts]),
                   np.concatenate([p.logits for p in parts]), sum(p.seconds for p in parts))


class MXNetFloatRunner:
    """The float32 reference: the Gluon network itself, run by MXNet (oneDNN)."""

    def __init__(self, net):
        self.net = net
        net.hybridize(static_alloc=True)

    def __call__(self, images: np.ndarray) -> np.ndarray:
        import mxnet as mx

        out = self.net(mx.nd.array(images, dtype="float32"))
        return out.asnumpy()
