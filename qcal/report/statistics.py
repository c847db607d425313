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
