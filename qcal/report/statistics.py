"""Report stage, statistics: which differences in a table are real.

Accuracies get Wilson score intervals (well behaved near 0 and 100 %, unlike the normal
approximation); the change of a variant against float32 on the SAME images gets an exact McNemar test
(a two-sided binomial test on the discordant images), the test that uses the pairing.
"""
from __future__ import annotations

import math

import numpy as np
from scipy import stats


def wilson_interval(correct: int, total: int, confidence: float = 0.95) -> tuple:
    if total == 0:
        return (float("nan"), float("nan"))
    z = stats.norm.ppf(0.5 + confidence / 2)
    p = correct / total
    denom = 1 + z * z / total
    centre = (p + z * z / (2 * total)) / denom
    half = z * math.sqrt(p * (1 - p) / total + z * z / (4 * total * total)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def mcnemar_exact(baseline_correct: np.ndarray, variant_correct: np.ndarray) -> dict:
    """Exact McNemar test of two classifiers scored on the same images."""
    a = np.asarray(baseline_correct, dtype=bool)
    b = np.asarray(variant_correct, dtype=bool)
    if a.shape != b.shape:
        raise ValueError(f"paired test needs the same images: {a.shape} vs {b.shape}")
    only_baseline = int((a & ~b).sum())
    only_variant = int((~a & b).sum())
    discordant = only_baseline + only_variant
    p = 1.0 if discordant == 0 else float(
        stats.binomtest(only_variant, discordant, 0.5, alternative="two-sided").pvalue)
    return {"lost": only_baseline, "gained": only_variant, "p_value": p}


NONINFERIORITY_TEST = ("Tango's score test for non-inferiority of paired proportions (one-sided, "
                       "H0: top-1 difference <= -margin; Tango 1998, Statistics in Medicine "
                       "17:891-908)")


def _tango_z(gained: int, lost: int, n: int, delta0: float) -> float:
    """Tango's score statistic for H0: p_variant - p_reference = ``delta0`` from the discordant
    counts of a paired table: ``gained`` images only the variant gets right, ``lost`` images only
    the reference gets right, ``n`` images in all.

    The variance is taken at the restricted maximum-likelihood estimate of P(lost) under H0, the
    root of a quadratic (Tango 1998, eq. 3; Nam 1997, Biometrics 53:1422-1430). At ``delta0`` 0
    it is McNemar's statistic (gained - lost) / sqrt(gained + lost)."""
    a = 2.0 * n
    b = -gained - lost + (2.0 * n - gained + lost) * delta0
    c = -lost * delta0 * (1.0 - delta0)
    q_lost = (math.sqrt(max(b * b - 4.0 * a * c, 0.0)) - b) / (2.0 * a)
    variance = n * (2.0 * q_lost + delta0 * (1.0 - delta0))
    numerator = gained - lost - n * delta0
    if variance <= 0.0:  # no discordant image and delta0 0: no evidence either way
        return 0.0 if numerator == 0 else math.copysign(math.inf, numerator)
    return numerator / math.sqrt(variance)


def paired_lower_bound(gained: int, lost: int, n: int, confidence: float = 0.95) -> float:
    """One-sided lower confidence bound on p_variant - p_reference (Tango's score interval): the
    smallest difference the score test at level 1 - ``confidence`` does not reject."""
    critical = stats.norm.ppf(confidence)
    lo, hi = -1.0 + 1e-12, (gained - lost) / n  # the statistic falls as delta0 grows
    if _tango_z(gained, lost, n, lo) < critical:
        return -1.0
    for _ in range(100):
        mid = (lo + hi) / 2
        if _tango_z(gained, lost, n, mid) > critical:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def noninferiority_test(reference_correct: np.ndarray, variant_correct: np.ndarray,
                        margin: float, alpha: float = 0.05) -> dict:
    """Is the variant's top-1 not worse than the reference's by ``margin`` (a fraction: 0.003 is
    0.3 points), on the same images? One-sided score test (``NONINFERIORITY_TEST``) of
    H0: p_variant - p_reference <= -margin against H1: > -margin; non-inferior when p < alpha,
    equivalently when the one-sided 1 - alpha lower confidence bound exceeds -margin."""
    a = np.asarray(reference_correct, dtype=bool)
    b = np.asarray(variant_correct, dtype=bool)
    if a.shape != b.shape or a.ndim != 1 or not len(a):
        raise ValueError(f"paired test needs the same images: {a.shape} vs {b.shape}")
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be a fraction in [0, 1), not {margin}")
    if not 0.0 < alpha < 0.5:
        raise ValueError(f"alpha must be in (0, 0.5), not {alpha}")
    n = len(a)
    lost, gained = int((a & ~b).sum()), int((~a & b).sum())
    z = _tango_z(gained, lost, n, -margin)
    p = float(stats.norm.sf(z))
    lower = paired_lower_bound(gained, lost, n, 1.0 - alpha)
    return {"test": NONINFERIORITY_TEST, "images": n, "lost": lost, "gained": gained,
            "difference": (gained - lost) / n, "margin": margin, "alpha": alpha, "z": z,
            "p_value": p, "lower_bound": lower, "non_inferior": bool(p < alpha)}
