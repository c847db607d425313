"""Calibrate stage, range maths: how each activation method turns collected statistics into an amax.

``qcal.calib.collect`` collects, once per model, the abs-max and a histogram of |x| for every tensor;
every method here then picks its clipping threshold ``amax`` (the float value that maps to int8 127)
from those statistics alone, without running the model again (pytorch-quantization's habit: the
method is an argument of the range computation, not a second pass over the data).

Each method is a pure function ``choose_amax_<name>(stats, **opts) -> float`` over a
``TensorStats`` (abs-max plus an optional |x| histogram); ``CALIBRATION_METHODS`` maps the names in
``qcal.config.ACTIVATION_METHODS`` to them. Method options (``global_scale``, ``percentile``) have
no defaults here: their one default lives in ``qcal.config.QuantOptions``; ``method_options``
picks them out of a ``QuantOptions``.

All methods are symmetric (levels -L..L; L = 127 for 8 bits, 2**(b-1) - 1 for b bits); the
methods that weigh rounding error against clipping (l2, kl) take L as ``levels``, the others only
look at the range. Histograms are of |x|, equal bins from 0.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcal.config import ACTIVATION_METHODS
from qcal.errors import QcalError, UsageProblem

INT8_LEVELS = 127  # symmetric int8: amax maps to 127, -amax to -127
# TensorRT's entropy calibration: the reference histogram has at least 2048 bins and the candidate
# distribution is quantized into 128 bins (int8's non-negative half).
KL_MIN_BINS = 2048
KL_QUANTIZED_BINS = 128
L2_MAX_CANDIDATES = 1024  # thresholds tried by the l2 search (evenly spaced bin edges)
# An all-zero tensor is exactly representable with any scale; 1.0 keeps power-of-two methods a
# power of two and avoids a zero scale (division by zero downstream).
ZERO_TENSOR_AMAX = 1.0


@dataclass(frozen=True)
class TensorStats:
    """What calibration knows about one tensor: its abs-max and, optionally, a histogram of |x|.

    ``counts[i]`` counts values with edges[i] <= |x| < edges[i+1] (the last bin also holds
    |x| == edges[-1]); ``edges`` has len(counts) + 1 entries and starts at 0. ``zeros`` says how
    many of the values in bin 0 are exactly 0 (half of a ReLU output, typically).
    """

    amax: float
    counts: np.ndarray | None = None
    edges: np.ndarray | None = None
    zeros: int = 0

    @property
    def has_histogram(self) -> bool:
        return self.counts is not None

    @classmethod
    def from_values(cls, x, bins: int = 2048) -> "TensorStats":
        """Statistics of one array, with a histogram of |x| over [0, max|x|] (tests, examples)."""
        a = np.abs(np.asarray(x, dtype=np.float64)).ravel()
        amax = float(a.max(initial=0.0))
        counts, edges = np.histogram(a, bins=bins, range=(0.0, amax if amax > 0 else 1.0))
        return cls(amax, counts.astype(np.int64), edges, int(a.size - np.count_nonzero(a)))


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
    """TensorRT's entropy calibration (GTC 2017, s7310), on the |x| histogram.

    For each candidate k (keep the first k bins and fold the mass beyond them into bin k-1: P),
    quantize those k bins into 128 groups and spread each group's mass evenly over its non-empty
    bins (Q); the threshold is the right edge of bin k-1 for the k with the smallest KL(P || Q).
    Groups have k // 128 bins each and the last one takes the remainder, as in MXNet's calibrator.
    Unlike MXNet and Relay, P and Q are not smoothed: a candidate whose clipped tail lands on an
    empty bin (Q = 0 where P > 0) has infinite divergence and loses, as in TensorRT and
    pytorch-quantization; that keeps KL a closed form over prefix sums (milliseconds a tensor).

    Exact zeros are left out of the histogram: zero is exact at every scale, and the spike of
    a ReLU output's zeros, smeared over the first quantized group, dominates the divergence and
    drags the threshold down (about 1.8 sigma instead of 4 on a rectified normal; measured).
    pytorch-quantization patches the same spike with ``bins[0] = bins[1]``.

    At b bits the candidates are quantized into ``levels + 1`` = 2**(b-1) groups instead of 128.
    """
    counts, edges = _trimmed(stats)
    counts = counts.copy()
    counts[0] -= stats.zeros
    if not counts.any():
        return float(stats.amax)
    factor = max(1, len(counts) // KL_MIN_BINS)  # coarsen very fine histograms, exactly
    if factor > 1:
        counts, edges = _merge_bins(counts, edges, factor)
    quantized_bins = levels + 1
    if len(counts) <= quantized_bins:
        return float(stats.amax)  # too few bins to clip anything at this resolution
    kept = np.arange(quantized_bins, len(counts) + 1)
    divergences = kl_divergences(counts.astype(np.float64), kept, quantized_bins)
    best = int(kept[int(np.argmin(divergences))])
    return float(min(edges[best], stats.amax))


def _xlogx(x):
    return np.where(x > 0, x * np.log(np.where(x > 0, x, 1.0)), 0.0)


def kl_divergences(hist: np.ndarray, kept: np.ndarray,
                   quantized_bins: int = KL_QUANTIZED_BINS) -> np.ndarray:
    """KL(P || Q) of the entropy method for each candidate number of kept bins.

    Within a group Q is constant on the non-empty bins, so sum(P log Q) needs only each group's
    mass; sum(P log P) is a prefix sum of h log h. All candidates at once, O(candidates x 128).
    """
    nq = quantized_bins
    total = hist.sum()
    cum = np.concatenate([[0.0], np.cumsum(hist)])
    cum_nonzero = np.concatenate([[0.0], np.cumsum(hist > 0)])
    cum_hlogh = np.concatenate([[0.0], np.cumsum(_xlogx(hist))])
    k = kept[:, None]
    tail = total - cum[kept]
    last = hist[kept - 1] + tail  # bin k-1 with the clipped mass folded in
    p_log_p = ((cum_hlogh[kept - 1] - cum[kept - 1] * np.log(total)) / total
               + _xlogx(last / total))
    per_group = k // nq
    starts = np.arange(nq)[None, :] * per_group
    ends = np.where(np.arange(nq)[None, :] == nq - 1, k, starts + per_group)
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
    "percentile": choose_amax_percentile,
}
assert tuple(CALIBRATION_METHODS) == ACTIVATION_METHODS, "registry out of step with qcal.config"

# Which QuantOptions fields each method reads, and which methods need the |x| histogram.
METHOD_OPTIONS = {"global": ("global_scale",), "percentile": ("percentile",)}
HISTOGRAM_METHODS = frozenset({"l2", "kl", "percentile"})
# Methods whose answer depends on the number of integer levels (the others pick a range only).
LEVEL_METHODS = frozenset({"l2", "kl"})


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
    if method != "global" and stats.amax <= 0:
        return ZERO_TENSOR_AMAX
    if method in LEVEL_METHODS:
        opts = {**opts, "levels": levels}
    return CALIBRATION_METHODS[method](stats, **opts)
