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
    return float(np.mean(_kl_rows(reference_logits, logits)))


def _kl_rows(reference_logits: np.ndarray, logits: np.ndarray) -> np.ndarray:
    """KL(softmax(reference) || softmax(logits)) of each row, in nats."""
    p = softmax(reference_logits)
    log_p = np.log(np.clip(p, 1e-300, None))
    z = logits.astype(np.float64)
    log_q = z - z.max(axis=1, keepdims=True)
    log_q = log_q - np.log(np.exp(log_q).sum(axis=1, keepdims=True))
    return np.sum(p * (log_p - log_q), axis=1)


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


ROWS_PER_PASS = 2048  # images a pass of ``compare``: its float64 temporaries are this many rows


def compare(reference_logits: np.ndarray, logits: np.ndarray, suffix: str = "",
            rows_per_pass: int = ROWS_PER_PASS) -> dict:
    """Top-1 agreement (%), mean KL and logit SQNR of ``logits`` against ``reference_logits``.

    Computed ``rows_per_pass`` images at a time (counts, KL sums and energies add up), so the
    temporaries stay the same size however many images are compared: at 50,000 images of 1000
    classes the float64 softmax of all of them at once would take 400 MB an array."""
    if reference_logits.shape != logits.shape:
        raise ValueError(f"fidelity needs the same images: {reference_logits.shape} vs "
                         f"{logits.shape}")
    accumulator = FidelityAccumulator(rows_per_pass)
    accumulator.update(reference_logits, logits)
    return accumulator.result(suffix)


class FidelityAccumulator:
    """``compare`` fed batch by batch (the variant's logits need not be kept). Rows are gathered
    into passes of ``rows_per_pass`` cut where ``compare`` cuts them, so the figures are
    ``compare``'s over the whole arrays to the last bit, in any batch size."""

    def __init__(self, rows_per_pass: int = ROWS_PER_PASS):
        self.rows_per_pass = rows_per_pass
        self.images, self.agree, self.kl_sum, self.signal, self.noise = 0, 0, 0.0, 0.0, 0.0
        self._pending = []  # (reference rows, rows) not yet a whole pass
        self._pending_rows = 0

    def update(self, reference_logits: np.ndarray, logits: np.ndarray):
        if reference_logits.shape != logits.shape:
            raise ValueError(f"fidelity needs the same images: {reference_logits.shape} vs "
                             f"{logits.shape}")
        self._pending.append((reference_logits, logits))
        self._pending_rows += len(logits)
        while self._pending_rows >= self.rows_per_pass:
            self._pass(self.rows_per_pass)

    def _pass(self, rows: int):
        # the first ``rows`` pending rows, copied only when they span several updates (a whole
        # array given at once is read through views, pass by pass)
        taken, left, rest = [], rows, []
        for ref, out in self._pending:
            if left:
                taken.append((ref[:left], out[:left]))
                if len(ref) > left:
                    rest.append((ref[left:], out[left:]))
                left -= min(left, len(ref))
            else:
                rest.append((ref, out))
        self._pending, self._pending_rows = rest, self._pending_rows - rows
        ref, out = taken[0] if len(taken) == 1 else (np.concatenate(p) for p in zip(*taken))
        self.images += rows
        self.agree += int(np.sum(np.argmax(ref, axis=1) == np.argmax(out, axis=1)))
        self.kl_sum += float(np.sum(_kl_rows(ref, out)))
        ref = ref.astype(np.float64)
        self.signal += float(np.sum(ref ** 2))
        self.noise += float(np.sum((ref - out.astype(np.float64)) ** 2))

    def result(self, suffix: str = "") -> dict:
        if self._pending_rows:
            self._pass(self._pending_rows)
        if self.images == 0:
            return {f"agree_top1{suffix}": float("nan"), f"kl{suffix}": float("nan"),
                    f"sqnr_logits_db{suffix}": float("nan")}
        return {f"agree_top1{suffix}": 100.0 * self.agree / self.images,
                f"kl{suffix}": self.kl_sum / self.images,
                f"sqnr_logits_db{suffix}": sqnr_from_energies(self.signal, self.noise)}
