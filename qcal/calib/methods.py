"""Calibrate stage, range maths: how each activation method turns collected statistics into an amax.

``qcal.calib.collect`` collects, once per model, the abs-max and histograms of |x| for every tensor;
every method here then picks its clipping threshold ``amax`` (the float value that maps to int8 127)
from those statistics alone, without running the model again (pytorch-quantization's habit: the
method is an argument of the range computation, not another pass over the data).

Each method is a pure function ``choose_amax_<name>(stats, **opts) -> float`` over a
``TensorStats`` (abs-max plus optional |x| histograms); ``CALIBRATION_METHODS`` maps the names in
``qcal.config.ACTIVATION_METHODS`` to them. Method options (``global_scale``, ``percentile``) have
no defaults here: their one default lives in ``qcal.config.QuantOptions``; ``method_options``
picks them out of a ``QuantOptions``.

All methods are symmetric (levels -L..L; L = 127 for 8 bits, 2**(b-1) - 1 for b bits); the
methods that weigh rounding error against clipping (l2, kl, kl-mxnet) take L as ``levels``, the
others only look at the range. Histograms are of |x|, equal bins from 0. l2 and percentile read
the statistics pass's fine histogram (a power-of-two range); the two KL methods read the
reference histogram (2048 bins over [0, abs-max]), whose resolution relative to the tensor's
range is fixed.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcal.config import ACTIVATION_METHODS
from qcal.errors import QcalError, UsageProblem

INT8_LEVELS = 127  # symmetric int8: amax maps to 127, -amax to -127
# TensorRT's entropy calibration: a reference histogram of 2048 bins over [0, amax], candidate
# distributions quantized into 128 bins (int8's non-negative half).
KL_REFERENCE_BINS = 2048
KL_QUANTIZED_BINS = 128
L2_MAX_CANDIDATES = 1024  # thresholds tried by the l2 search (evenly spaced bin edges)
# An all-zero tensor is exactly representable with any scale; 1.0 keeps power-of-two methods a
# power of two and avoids a zero scale (division by zero downstream).
ZERO_TENSOR_AMAX = 1.0


def reference_factor(amax: float, bins: int = KL_REFERENCE_BINS) -> np.float32:
    """The float32 factor f of the reference histogram over [0, amax]: bin of x = int(|x| * f).

    f is bins / amax rounded down until float32(amax) * f < bins in float32 arithmetic, so that
    every |x| <= amax lands in a bin below ``bins`` (the product is monotonic in |x|) and the
    histogram kernel, which computes in float32, gives numpy's counts. Edges are k / f: the last
    is amax up to float32 rounding (a few 1e-7 above it).
    """
    top = np.float32(amax)
    factor = np.float32(bins / float(top))
    while top * factor >= bins:
        factor = np.nextafter(factor, np.float32(0))
    return factor


def reference_edges(factor: float, bins: int = KL_REFERENCE_BINS) -> np.ndarray:
    return np.arange(bins + 1, dtype=np.float64) / float(factor)


def reference_bin_index(a: np.ndarray, factor: float, bins: int = KL_REFERENCE_BINS):
    """Bin indices of |x| values ``a`` (numpy's path; float64 data may round to ``bins``)."""
    return np.minimum((a * np.float32(factor)).astype(np.int64), bins - 1)


@dataclass(frozen=True)
class TensorStats:
    """What calibration knows about one tensor: its abs-max and, optionally, histograms of |x|.

    ``counts[i]`` counts values with edges[i] <= |x| < edges[i+1] (the last bin also holds
    |x| == edges[-1]); ``edges`` has len(counts) + 1 entries and starts at 0: the statistics
    pass's histogram, whose range is a power of two above the abs-max (l2, percentile read it).
    ``ref_counts``/``ref_edges``: the reference histogram, ``KL_REFERENCE_BINS`` equal bins
    over [0, amax] (``reference_factor``; the KL methods read it). ``zeros`` says how many of
    the values in bin 0 (of both) are exactly 0 (half of a ReLU output, typically).
    """

    amax: float
    counts: np.ndarray | None = None
    edges: np.ndarray | None = None
    zeros: int = 0
    ref_counts: np.ndarray | None = None
    ref_edges: np.ndarray | None = None

    @property
    def has_histogram(self) -> bool:
        return self.counts is not None

    @property
    def has_reference(self) -> bool:
        return self.ref_counts is not None

    @classmethod
    def from_values(cls, x, bins: int = 2048) -> "TensorStats":
        """Statistics of one array: a histogram of |x| over [0, max|x|] and the reference
        histogram (tests, examples)."""
        a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
        amax = float(a.max(initial=0.0))
        counts, edges = np.histogram(a, bins=bins, range=(0.0, amax if amax > 0 else 1.0))
        zeros = int(a.size - np.count_nonzero(a))
        if amax > 0:
            factor = reference_factor(amax)
            ref_counts = np.bincount(reference_bin_index(a, factor), minlength=KL_REFERENCE_BINS)
            ref_edges = reference_edges(factor)
        else:
            ref_counts = np.zeros(KL_REFERENCE_BINS, np.int64)
            ref_counts[0] = a.size
            ref_edges = np.linspace(0.0, 1.0, KL_REFERENCE_BINS + 1)
        return cls(amax, counts.astype(np.int64), edges, zeros, ref_counts.astype(np.int64),
                   ref_edges)


# --- the methods ----------------------------------------------------------------------------------

def choose_amax_global(stats: TensorStats, *, global_scale: float) -> float:
    """One fixed range for every tensor, as Relay's ``global_scale`` (the data is not looked at)."""
    return float(global_scale)


def choose_amax_max(stats: TensorStats) -> float:
    return float(stats.amax)


def choose_amax_power2(stats: TensorStats) -> float:
    """The abs-max rounded UP to a power of two, so no calibration value is clipped."""
    return float(2.0 ** np.ceil(np.log2(stats.amax)))


def choose_amax_percentile(stats: TensorStats, *, percentile: float) -> float:
    """The ``percentile``-th percentile of |x|, interpolated linearly inside its histogram bin."""
    counts, edges = _trimmed(stats)
    cdf = np.cumsum(counts, dtype=np.float64)
    target = cdf[-1] * percentile / 100.0
    i = int(np.searchsorted(cdf, target, side="left"))
    below = cdf[i - 1] if i > 0 else 0.0
    inside = (target - below) / counts[i] if counts[i] else 1.0
    value = edges[i] + inside * (edges[i + 1] - edges[i])
    return float(min(value, stats.amax))


def choose_amax_l2(stats: TensorStats, *, levels: int = INT8_LEVELS) -> float:
    """The threshold that minimises the expected squared int8 error, rounding plus clipping.

    Each histogram bin stands for its count of values at its centre; for a candidate threshold t
    (scale t/levels) a value's error is its distance to the nearest level, clipped at t. Exact zeros
    have no error at any scale and are left out.
    """
    counts, edges = _trimmed(stats)
    centres = (edges[:-1] + edges[1:]) / 2
    weights = counts.astype(np.float64)
    weights[0] -= stats.zeros
    nbins = len(counts)
    picks = np.unique(np.linspace(1, nbins, min(nbins, L2_MAX_CANDIDATES)).round().astype(int))
    thresholds = edges[picks]
    errors = np.concatenate([_squared_error(centres, weights, chunk, levels)
                             for chunk in np.array_split(thresholds, max(1, len(picks) // 64))])
    return float(min(thresholds[int(np.argmin(errors))], stats.amax))


def _squared_error(centres, weights, thresholds, levels):
    scale = thresholds[:, None] / levels
    nearest = np.minimum(np.rint(centres[None, :] / scale), levels)
    return ((centres[None, :] - nearest * scale) ** 2 * weights[None, :]).sum(axis=1)


def choose_amax_kl(stats: TensorStats, *, levels: int = INT8_LEVELS) -> float:
    """TensorRT's entropy calibration (GTC 2017, s7310), on the reference histogram of |x|.

    The reference histogram has ``KL_REFERENCE_BINS`` equal bins over [0, amax] (built by a second
    pass at the range the first pass found: ``TensorStats``), so the threshold is a fixed fraction
    of the tensor's range: scaling a tensor scales its threshold by the same factor (to float32
    rounding; ``qcal.calib.collect`` gives the measured figures). For each
    candidate k (128 <= k <= 2048), P keeps the first k bins and folds the mass beyond them into
    bin k-1; Q splits the same k bins (without the folded tail) into 128 groups at the edges
    ``linspace(0, k, 129)`` (groups of floor or ceil of k/128 bins) and spreads each group's mass
    evenly over its non-empty bins. The threshold is the right edge of bin k-1 for the k with the
    smallest KL(P || Q); ties go to the largest k, as in pytorch-quantization.

    What the implementations do differently:

    - TensorRT (s7310) and pytorch-quantization (``calib/histogram.py``,
      ``_compute_amax_entropy``): this algorithm, unsmoothed (Q = 0 where P > 0 makes the
      divergence infinite: that candidate loses). pytorch-quantization's histogram has 2048 bins
      over the first batch's range, extended with bins of the same width when a later batch
      reaches further, so its bin count depends on batch order; it quantizes unsigned tensors into
      256 levels, qcal always into 128 (symmetric int8, levels -127..127).
    - Zeros: qcal leaves exact zeros out (zero is exact at every scale; a ReLU output's spike of
      zeros smeared over the first group dominates the divergence and drags the threshold down,
      to about 1.8 sigma instead of 4 on a rectified normal, measured). pytorch-quantization
      overwrites bin 0 with bin 1 (``bins[0] = bins[1]``), zeros and small values alike; TensorRT
      does neither.
    - MXNet (``calib_mode='entropy'``, the ``calibrate_entropy`` operator) and Relay's
      ``kl_divergence.py``: a symmetric histogram of x (8001 bins over [-amax, amax], zeros in the
      centre bin), 255 quantized bins of ``len // 255`` bins with the remainder in the last
      group, and both P and Q smoothed (zeros replaced by 1e-4). ``kl-mxnet`` is that grouping on
      qcal's |x| histogram.

    A closed form over prefix sums gives every candidate at once (milliseconds a tensor). At b
    bits the candidates are quantized into ``levels + 1`` = 2**(b-1) groups instead of 128 (from
    12 bits on, more than the reference histogram's bins: nothing is clipped).
    """
    return _entropy_threshold(stats, "even", levels + 1)


def choose_amax_kl_mxnet(stats: TensorStats, *, levels: int = INT8_LEVELS) -> float:
    """The entropy method with MXNet's grouping: k kept bins make 128 groups of k // 128 bins and
    the last group takes the remainder (MXNet's ``calibrate_entropy``, Relay's
    ``kl_divergence.py``). Everything else is ``kl``'s (same reference histogram, zeros left
    out, no smoothing). Because the last group grows by one bin per extra kept bin until k
    reaches the next multiple of 128, the divergence jumps there and the chosen k clusters just
    below multiples of 128 (``choose_amax_kl``'s docstring lists what MXNet itself does besides)."""
    return _entropy_threshold(stats, "mxnet", levels + 1)


def _entropy_threshold(stats: TensorStats, grouping: str, quantized_bins: int) -> float:
    counts = np.asarray(stats.ref_counts).copy()
    counts[0] = max(counts[0] - stats.zeros, 0)  # zeros counted in the first pass
    nonzero = np.flatnonzero(counts)
    if not len(nonzero):
        return float(stats.amax)
    counts = counts[:int(nonzero[-1]) + 1]
    if len(counts) <= quantized_bins:
        return float(stats.amax)  # too few bins to clip anything at this resolution
    kept = np.arange(quantized_bins, len(counts) + 1)
    divergences = kl_divergences(counts.astype(np.float64), kept, grouping, quantized_bins)
    best = int(kept[len(kept) - 1 - int(np.argmin(divergences[::-1]))])  # ties: the largest k
    return float(min(stats.ref_edges[best], stats.amax))


def _xlogx(x):
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def quantized_groups(kept: np.ndarray, grouping: str, quantized_bins: int = KL_QUANTIZED_BINS):
    """(starts, ends): bin ranges of the n = ``quantized_bins`` groups for each candidate k, shape
    (len(kept), n).

    ``even``: the edges of ``linspace(0, k, n + 1)``; bin j is in group g when g*k/n <= j <
    (g+1)*k/n (``np.digitize``'s rule), so group g starts at ceil(g*k/n), in integers.
    ``mxnet``: k // n bins a group, the remainder in the last group.
    """
    nq = quantized_bins
    k = np.asarray(kept, dtype=np.int64)[:, None]
    g = np.arange(nq + 1, dtype=np.int64)[None, :]
    if grouping == "even":
        edges = -(-g * k // nq)
    elif grouping == "mxnet":
        edges = np.where(g == nq, k, g * (k // nq))
    else:
        raise ValueError(f"unknown grouping {grouping!r}")
    return edges[:, :-1], edges[:, 1:]


def kl_divergences(hist: np.ndarray, kept: np.ndarray, grouping: str = "even",
                   quantized_bins: int = KL_QUANTIZED_BINS) -> np.ndarray:
    """KL(P || Q) of the entropy method for each candidate number of kept bins.

    Within a group Q is constant on the non-empty bins, so sum(P log Q) needs only each group's
    mass; sum(P log P) is a prefix sum of h log h. All candidates at once, O(candidates x 128).
    """
    total = hist.sum()
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    cum_nonzero = np.concatenate([[0.0], np.cumsum(hist > 0)])
    cum_hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(hist))])
    tail = total - cum[kept]
    last = hist[kept - 1] + tail  # bin k-1 with the clipped mass folded in
    p_log_p = ((cum_hlogh[kept - 1] - cum[kept - 1] * np.log(total)) / total
               + _xlogx(last / total))
    starts, ends = quantized_groups(kept, grouping, quantized_bins)
    mass = cum[ends] - cum[starts]
    nonzero = cum_nonzero[ends] - cum_nonzero[starts]
    kept_mass = cum[kept][:, None]
    with np.errstate(divide="ignore", invalid="ignore"):
        log_q = np.where(mass > 0, np.log(mass / (np.maximum(nonzero, 1) * kept_mass)), 0.0)
    p_log_q = ((mass * log_q).sum(axis=1) + tail * log_q[:, -1]) / total
    divergence = p_log_p - p_log_q
    # clipped mass on an empty bin: Q is 0 where P is not
    return np.where((hist[kept - 1] == 0) & (tail > 0), np.inf, divergence)


# --- histogram helpers ----------------------------------------------------------------------------

def _trimmed(stats: TensorStats):
    """The histogram up to its last non-empty bin (bins past the abs-max carry no information)."""
    if not stats.has_histogram:
        raise QcalError("this method needs a histogram of |x| and the statistics hold only "
                        "the abs-max")
    counts = np.asarray(stats.counts)
    nonzero = np.flatnonzero(counts)
    last = int(nonzero[-1]) + 1 if len(nonzero) else 1
    return counts[:last], np.asarray(stats.edges, dtype=np.float64)[:last + 1]


def _merge_bins(counts, edges, factor):
    """Sum runs of ``factor`` adjacent bins (the last run may be shorter)."""
    n = len(counts)
    padded = np.concatenate([counts, np.zeros(-n % factor, dtype=counts.dtype)])
    merged = padded.reshape(-1, factor).sum(axis=1)
    width = edges[1] - edges[0]
    return merged, edges[0] + width * factor * np.arange(len(merged) + 1)


# --- registry and dispatch ------------------------------------------------------------------------

CALIBRATION_METHODS = {
    "global": choose_amax_global,
    "max": choose_amax_max,
    "power2": choose_amax_power2,
    "l2": choose_amax_l2,
    "kl": choose_amax_kl,
    "kl-mxnet": choose_amax_kl_mxnet,
    "percentile": choose_amax_percentile,
}
assert tuple(CALIBRATION_METHODS) == ACTIVATION_METHODS, "registry out of step with qcal.config"

# Which QuantOptions fields each method reads, and which methods need the |x| histogram.
METHOD_OPTIONS = {"global": ("global_scale",), "percentile": ("percentile",)}
# Methods that need histograms: the statistics pass's (l2, percentile) or the reference one (KL).
REFERENCE_METHODS = frozenset({"kl", "kl-mxnet"})
HISTOGRAM_METHODS = frozenset({"l2", "percentile"}) | REFERENCE_METHODS
# Methods whose answer depends on the number of integer levels (the others pick a range only).
LEVEL_METHODS = frozenset({"l2"}) | REFERENCE_METHODS


def method_options(method: str, options) -> dict:
    """The keyword options ``method`` takes, read from a ``QuantOptions``."""
    return {k: getattr(options, k) for k in METHOD_OPTIONS.get(method, ())}


def choose_amax(method: str, stats: TensorStats, levels: int = INT8_LEVELS, **opts) -> float:
    """Dispatch to the method, check its options, and handle an all-zero tensor. ``levels``: the
    largest integer level of the tensor's width (127 for 8 bits)."""
    if method not in CALIBRATION_METHODS:
        raise UsageProblem(f"unknown calibration method '{method}' "
                           f"(known: {', '.join(CALIBRATION_METHODS)})")
    wanted = set(METHOD_OPTIONS.get(method, ()))
    if set(opts) != wanted:
        raise UsageProblem(f"calibration method '{method}' takes options "
                           f"{sorted(wanted) or 'none'}, got {sorted(opts) or 'none'}")
    if method in HISTOGRAM_METHODS and not stats.has_histogram:
        raise QcalError(f"calibration method '{method}' needs a histogram of |x| and the "
                        f"statistics hold only the abs-max")
    if method in REFERENCE_METHODS and not stats.has_reference:
        raise QcalError(f"calibration method '{method}' needs the reference histogram "
                        f"({KL_REFERENCE_BINS} bins over [0, abs-max]) and the statistics lack it")
    if method != "global" and stats.amax <= 0:
        return ZERO_TENSOR_AMAX
    if method in LEVEL_METHODS:
        opts = {**opts, "levels": levels}
    return CALIBRATION_METHODS[method](stats, **opts)
