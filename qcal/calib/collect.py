"""Calibrate stage, collect: one statistics pass over the calibration images.

Pipeline position: import -> annotate -> **calibrate** -> realize -> compile. ``collect_statistics``
runs the float model once over the calibration batches (a tensor source of ``qcal.calib.sources``,
or the model family's own: MXNet's executor for Gluon models) and accumulates, for every tensor
of the graph (the input included), its signed min/max, abs-max, exact-zero count and a histogram
of |x| (binned by the TIR kernel of ``qcal.backend.tvm.histogram``). ``qcal.calib.result`` turns
those statistics into each method's ranges.

The histogram is built in the same single pass although the final range is not known in
advance: it has a fixed number of equal bins over [0, R), R being the smallest power of two above
the first batch's abs-max; when a later batch reaches R, R is doubled as often as needed and each
run of 2**k old bins is summed into one new bin. Bin edges of the doubled range are a subset of
the old ones and every value lies strictly below R, so this re-binning is exact (the same counts
as binning all the data at the final R at once), and the final histogram covers the abs-max with
at least half of its bins (4096 of the default 8192).

That histogram's resolution relative to the abs-max depends on where the abs-max falls in its
octave (4096 to 8192 bins below it), and the KL methods' threshold moves with the bin count. So a
second pass over the same batches bins every tensor again into ``KL_REFERENCE_BINS`` (2048) equal
bins over [0, abs-max], the range the first pass found (TensorRT's reference histogram): a tensor
scaled by any factor gets the same counts (but for values that float32 rounding of the scaled data
moves across a bin edge) and a threshold scaled by that factor (measured on the embedded models'
252 tensors, 7 scales each: worst 1.4e-7 for kl; for kl-mxnet one ResNet-56 v2 tensor moved 8.9 %,
its divergence being flat enough at the minimum for those few values to move the argmin). The
second pass
costs a second run of the model over the calibration batches (``bins=0`` skips both histograms).
"""
from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np

from qcal.calib.methods import (KL_REFERENCE_BINS, TensorStats, reference_bin_index, reference_edges,
                                reference_factor)
from qcal.calib.sources import GraphInterpreter
from qcal.config import DEFAULT_HISTOGRAM_BINS
from qcal.errors import QcalError, UsageProblem

log = logging.getLogger("qcal.calib.collect")

HISTOGRAM_CHUNK = 1 << 18  # elements per histogram step: 1 MB float32 + 2 MB int64 buffers


class AbsHistogram:
    """Running abs-max, signed min/max and |x| histogram of one tensor (bins=0: no histogram)."""

    def __init__(self, bins: int = DEFAULT_HISTOGRAM_BINS):
        if bins and bins & (bins - 1):
            raise UsageProblem(f"calibration histogram bins must be a power of two (for exact "
                               f"re-binning), not {bins}")
        self.bins = bins
        self.counts = np.zeros(bins, dtype=np.int64) if bins else None
        self.range = 0.0  # a power of two; bins cover [0, range); 0 until a non-zero value
        self.amax = 0.0
        self.min = np.inf
        self.max = -np.inf
        self.count = 0
        self.zeros = 0
        self._pending_zeros = 0  # elements seen while everything was zero: bin 0, once R exists

    def collect(self, x: np.ndarray, kernel=None):
        """Add every element of ``x``. ``kernel``: a ``qcal.backend.tvm.histogram.AbsHistogramKernel``
        for this many bins, used for float32 data (the numpy path below is its reference)."""
        # Speed matters here: this runs on every tensor of every calibration batch. None of the
        # statistics depends on element order, so the tensor is read in memory order (ravel "K":
        # a view even for the NHWC-in-memory arrays the numpy conv returns, where a C-order ravel
        # copies), in chunks small enough to stay in cache while every statistic of the chunk is
        # computed. Collecting chunk after chunk gives the same counts as binning the whole
        # tensor at once: the range only doubles, and re-binning is exact (module docstring).
        flat = np.asarray(x).ravel(order="K")
        if flat.size == 0:
            raise ValueError("empty tensor")
        if kernel is not None and flat.dtype != np.float32:
            kernel = None
        scratch = {}
        try:
            self._collect_chunks(flat, kernel, scratch)
        finally:
            if kernel is not None and kernel.unflushed:
                self._add_kernel_counts(kernel)

    def _add_kernel_counts(self, kernel):
        counts, zeros = kernel.flush()
        self.counts += counts
        self.zeros += zeros

    def _collect_chunks(self, flat, kernel, scratch):
        for start in range(0, flat.size, HISTOGRAM_CHUNK):
            part = flat[start:start + HISTOGRAM_CHUNK]
            lo, hi = part.min(), part.max()
            if not (np.isfinite(lo) and np.isfinite(hi)):  # NaN propagates through min/max
                raise ValueError("non-finite values")
            self.count += part.size
            self.min = min(self.min, float(lo))
            self.max = max(self.max, float(hi))
            self.amax = max(self.amax, -float(lo), float(hi))  # = max |x|, exactly
            if not self.bins or self.amax == 0:
                self.zeros += int(np.count_nonzero(part == 0))
                if self.bins:
                    self._pending_zeros += part.size
                continue
            if self.range == 0:
                self.range = 2.0 ** (np.floor(np.log2(self.amax)) + 1)
            if kernel is not None and kernel.unflushed and (
                    self.range <= self.amax
                    or kernel.unflushed + part.size > kernel.MAX_UNFLUSHED):
                self._add_kernel_counts(kernel)  # made at the old range / before overflow
            while self.range <= self.amax:
                self._double_range()
            self.counts[0] += self._pending_zeros
            self._pending_zeros = 0
            if kernel is not None:
                kernel.add(part, self.bins / self.range)  # zeros counted there
            else:
                self.zeros += int(np.count_nonzero(part == 0))
                self.counts += np.bincount(self._bin_index(part, scratch), minlength=self.bins)

    def _bin_index(self, part: np.ndarray, scratch: dict) -> np.ndarray:
        """floor(|x| * bins / range) as int64: bins / range is a power of two, so the product is
        exact and strictly below bins."""
        factor = self.bins / self.range
        dtype = (np.abs(part[:1]) * factor).dtype  # numpy's own choice of type for the product
        if part.dtype.kind != "f" or dtype != part.dtype:
            return (np.abs(part) * factor).astype(np.int64)
        # the same arithmetic, in reused buffers (no fresh temporaries per chunk)
        if "scaled" not in scratch or scratch["scaled"].dtype != dtype:
            scratch.update(scaled=np.empty(HISTOGRAM_CHUNK, dtype),
                           index=np.empty(HISTOGRAM_CHUNK, np.int64))
        scaled, index = scratch["scaled"][:part.size], scratch["index"][:part.size]
        np.multiply(np.abs(part, out=scaled), factor, out=scaled)
        np.copyto(index, scaled, casting="unsafe")  # truncation toward zero, as astype(int64)
        return index

    def _double_range(self):
        merged = self.counts.reshape(-1, 2).sum(axis=1)
        self.counts = np.concatenate([merged, np.zeros(self.bins // 2, dtype=np.int64)])
        self.range *= 2

    def stats(self) -> TensorStats:
        if not self.bins:
            return TensorStats(self.amax, zeros=self.zeros)
        edges = np.linspace(0.0, self.range or 1.0, self.bins + 1)
        counts = self.counts.copy()
        if self.range == 0:  # all zeros so far: every value sits in the first bin
            counts[0] = self.count
        return TensorStats(self.amax, counts, edges, self.zeros)

    def summary(self) -> dict:
        return {"amax": self.amax, "min": self.min, "max": self.max, "count": self.count,
                "zeros": self.zeros}


class ReferenceHistogram:
    """The second pass over one tensor: ``KL_REFERENCE_BINS`` equal bins of |x| over [0, amax],
    amax being the first pass's abs-max (``qcal.calib.methods.reference_factor``)."""

    def __init__(self, amax: float, bins: int = KL_REFERENCE_BINS):
        self.bins = bins
        self.amax = amax
        self.factor = reference_factor(amax, bins) if amax > 0 else None
        self.counts = np.zeros(bins, dtype=np.int64)
        self.count = 0
        self.beyond = 0  # values above amax (a source that does not repeat itself): last bin

    def collect(self, x: np.ndarray, kernel=None):
        flat = np.asarray(x).ravel(order="K")
        self.count += flat.size
        if self.factor is None:
            self.counts[0] += flat.size
            return
        if kernel is not None and flat.dtype != np.float32:
            kernel = None
        top = np.float32(self.amax)
        try:
            for start in range(0, flat.size, HISTOGRAM_CHUNK):
                part = flat[start:start + HISTOGRAM_CHUNK]
                lo, hi = part.min(), part.max()
                if not (np.isfinite(lo) and np.isfinite(hi)):
                    raise ValueError("non-finite values")
                if max(-lo, hi) > top:  # the kernel's index would pass the last bin
                    a = np.abs(part)
                    self.beyond += int(np.count_nonzero(a > top))
                    self.counts += np.bincount(reference_bin_index(a, self.factor, self.bins),
                                               minlength=self.bins)
                elif kernel is not None:
                    if kernel.unflushed + part.size > kernel.MAX_UNFLUSHED:
                        self.counts += kernel.flush()[0]
                    kernel.add(part, self.factor)
                else:
                    self.counts += np.bincount(
                        reference_bin_index(np.abs(part), self.factor, self.bins),
                        minlength=self.bins)
        finally:
            if kernel is not None and kernel.unflushed:
                self.counts += kernel.flush()[0]

    def edges(self) -> np.ndarray:
        if self.factor is None:
            return np.linspace(0.0, 1.0, self.bins + 1)
        return reference_edges(self.factor, self.bins)


@dataclass
class TensorStatistics:
    """What one pass over the calibration images saw, per tensor."""

    fingerprint: str
    model: str
    num_images: int
    bins: int
    tensors: dict  # name -> TensorStats
    summaries: dict  # name -> {"amax", "min", "max", "count", "zeros"}
    engine: str = "qcal numpy float interpreter"  # what computed the float values


def collect_statistics(graph, batches, progress: bool = True,
                       bins: int = DEFAULT_HISTOGRAM_BINS, source=None) -> TensorStatistics:
    """One pass over ``batches`` (float32 N x C x H x W arrays) collecting every tensor's
    statistics. ``source``: where the float values come from (``qcal.calib.sources``; default
    the numpy interpreter of ``graph``).

    ``bins=0`` collects abs-max/min/max only (enough for global, max, power2); otherwise a
    second pass over the same batches builds the reference histograms (module docstring).
    """
    source = source or GraphInterpreter(graph)
    accumulators = {n.name: AbsHistogram(bins) for n in graph.nodes}
    kernel = _histogram_kernel(bins)
    if bins and isinstance(batches, Iterator):
        batches = list(batches)  # an iterator is read once; a re-iterable (ImageBatches) is not kept
    num_images = 0
    for index, batch in enumerate(_progress(batches, progress, graph.name)):
        source.run(batch, partial(_observe, accumulators, kernel, graph.name, index))
        num_images += len(batch)
    if num_images == 0:
        raise QcalError(f"calibration of '{graph.name}' got no images")
    missing = [k for k, a in accumulators.items() if a.count == 0]
    if missing:
        raise QcalError(f"calibration of '{graph.name}': {source.description} produced no "
                        f"values for tensor '{missing[0]}'")
    tensors = {k: a.stats() for k, a in accumulators.items()}
    if bins:
        references = {k: ReferenceHistogram(a.amax) for k, a in accumulators.items()}
        kernel = _histogram_kernel(KL_REFERENCE_BINS)
        for index, batch in enumerate(_progress(batches, progress, f"{graph.name} (reference)")):
            source.run(batch, partial(_observe, references, kernel, graph.name, index))
        beyond = {k: r.beyond for k, r in references.items() if r.beyond}
        if beyond:
            log.warning("calibration of '%s': the second pass saw values above the first pass's "
                        "abs-max in %d tensor(s) (e.g. '%s'); counted in their last bin",
                        graph.name, len(beyond), next(iter(beyond)))
        tensors = {k: dataclasses.replace(t, ref_counts=references[k].counts,
                                          ref_edges=references[k].edges())
                   for k, t in tensors.items()}
    return TensorStatistics(graph.fingerprint(), graph.name, num_images, bins, tensors,
                            {k: a.summary() for k, a in accumulators.items()},
                            source.description)


def _histogram_kernel(bins):
    if not bins:
        return None
    from qcal.backend.tvm.histogram import AbsHistogramKernel

    return AbsHistogramKernel(bins)


def _observe(accumulators, kernel, model, batch_index, name, values):
    try:
        accumulators[name].collect(values, kernel)
    except ValueError:
        raise QcalError(f"calibration of '{model}': tensor '{name}' has non-finite values "
                        f"(inf or NaN) in calibration batch {batch_index}") from None


def _progress(batches, enabled, name):
    if not enabled:
        return batches
    from tqdm import tqdm

    total = len(batches) if hasattr(batches, "__len__") else None
    return tqdm(batches, total=total, desc=f"calibrating {name}", unit="batch", leave=False)
