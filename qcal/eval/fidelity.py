"""Evaluate stage, label-free fidelity: how closely an int8 model follows its float32 model.

These need no labels, so they work on any images (random crops of a handful of photos), where a
few labelled images cannot separate variants: top-1 agreement with float32, the mean KL divergence
KL(p_float32 || p_int8) between softmax outputs, and the SQNR of the output logits.
"""
from __future__ import annotations

import numpy as np


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def mean_kl_divergence(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Mean over images of KL(softmax(reference) || softmax(logits)), in nats."""
    p = softmax(reference_logits)
    log_p = np.log(np.clip(p, 1e-300, None))
    z = logits.astype(np.float64)
    log_q = z - z.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return float(np.mean(np.sum(p * (log_p - log_q), axis=1)))


def top1_agreement(reference_logits: np.ndarray, logits: np.ndarray) -> float:
    """Fraction of images whose top-1 class is the same (ties broken to the lower index)."""
    a = np.argmax(reference_logits, axis=1)
    b = np.argmax(logits, axis=1)
    return float(np.mean(a == b))


def sqnr_from_energies(signal: float, noise: float) -> float:
    """Signal-to-quantization-noise ratio in dB: 10 log10(signal / noise), inf without noise."""
    if noise == 0:
        return float("inf")
    return float(10.0 * np.log10(signal / noise)) if signal > 0 else float("-inf")


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """SQNR of ``approx`` against ``reference``: sum(ref^2) over sum((ref - approx)^2), in dB."""
    reference = reference.astype(np.float64)
    noise = float(np.sum((reference - approx.astype(np.float64)) ** 2))
    return sqnr_from_energies(float(np.sum(reference ** 2)), noise)


def compare(reference_logits: np.ndarray, logits: np.ndarray, suffix: str = "") -> dict:
    if reference_logits.shape != logits.shape:
        raise ValueError(f"fidelity needs the same images: {reference_logits.shape} vs "
                         f"{logits.shape}")
    return {f"agree_top1{suffix}": 100.0 * top1_agreement(reference_logits, logits),
            f"kl{suffix}": mean_kl_divergence(reference_logits, logits),
            f"sqnr_logits_db{suffix}": sqnr_db(reference_logits, logits)}
