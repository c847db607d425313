"""Realize stage, fixed-point maths: scales, integer constants and exact rescales (pure functions).

Scales. ``scale_for_amax``: an amax that is a power of two gives ``amax / 128`` (Relay's
``dom_scale = scale / 2**(nbit-1)``: the scale is then a power of two too, and rescaling between such
scales is an exact shift); any other amax gives ``amax / 127`` (the full symmetric range). int8
values are clipped to [-127, 127]. At b bits the same rules hold with L = 2**(b-1) - 1 levels:
``amax / (L + 1)`` or ``amax / L``, values clipped to [-L, L].
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcal.errors import QcalError
from qcal.ir.qgraph import INT8_MAX, INT32_MAX

INT64_SAFE = 2 ** 62  # products and shifts in int64 are kept below this
MAX_LEFT_SHIFT = 30
MAX_RIGHT_SHIFT = 62


def is_power_of_two(x) -> np.ndarray:
    mantissa, _ = np.frexp(np.asarray(x, dtype=np.float64))
    return mantissa == 0.5


def ceil_log2(x) -> np.ndarray:
    """Exact ceil(log2(x)) for positive x (frexp, not floating-point log)."""
    mantissa, exponent = np.frexp(np.asarray(x, dtype=np.float64))
    return np.where(mantissa == 0.5, exponent - 1, exponent).astype(np.int64)


def power2_ceil(x) -> np.ndarray:
    return np.ldexp(1.0, ceil_log2(x))


def scale_for_amax(amax, levels: int = INT8_MAX) -> np.ndarray:
    """Symmetric scale for a range at ``levels`` (L): amax/(L+1) when amax is a power of two (then
    the scale is a power of two), else amax/L. A zero range (a dead channel or tensor) gets amax 1."""
    amax = np.asarray(amax, dtype=np.float64)
    if not np.all(np.isfinite(amax)) or np.any(amax < 0):
        raise QcalError(f"activation/weight range must be finite and non-negative, got {amax}")
    amax = np.where(amax == 0, 1.0, amax)
    return np.where(is_power_of_two(amax), amax / (levels + 1.0), amax / float(levels))


def quantize_array(x, scale, limit=INT8_MAX) -> np.ndarray:
    """rint(x / scale) clipped to [-limit, limit], as int64 (offline constants only)."""
    return np.clip(np.rint(np.asarray(x, np.float64) / scale), -limit, limit).astype(np.int64)


def weight_amax(w: np.ndarray, granularity: str) -> np.ndarray:
    w = np.abs(np.asarray(w, dtype=np.float64))
    if granularity == "tensor":
        return np.asarray(w.max(initial=0.0))
    return w.reshape(w.shape[0], -1).max(axis=1, initial=0.0)


def weight_scale(w: np.ndarray, method: str, granularity: str, levels: int = INT8_MAX):
    """The scale of int8 weights within +-``levels`` (shape () per tensor, (O,) per output
    channel), and that scale shaped to broadcast against ``w``."""
    amax = weight_amax(w, granularity)
    if method == "power2":
        amax = np.where(amax == 0, 0.0, power2_ceil(np.where(amax == 0, 1.0, amax)))
    scale = scale_for_amax(amax, levels)
    return scale, (scale.reshape((-1,) + (1,) * (w.ndim - 1)) if scale.ndim else scale)


def quantize_weight(w: np.ndarray, method: str, granularity: str, levels: int = INT8_MAX,
                    round_up=None):
    """int8 weights within +-``levels`` and their scale (``weight_scale``). Each weight rounds to
    the nearest level, or, where ``round_up`` (a boolean array shaped like ``w``, AdaRound's
    learned directions) is given, to floor(w / s) + round_up; both are clipped to +-levels."""
    scale, shaped = weight_scale(w, method, granularity, levels)
    if round_up is None:
        return quantize_array(w, shaped, levels).astype(np.int8), scale
    round_up = np.asarray(round_up)
    if round_up.shape != w.shape or round_up.dtype != bool:
        raise QcalError(f"learned weight rounding of shape {round_up.shape} ({round_up.dtype}) "
                        f"for weights of shape {w.shape}")
    q = np.floor(np.asarray(w, np.float64) / shaped) + round_up
    return np.clip(q, -levels, levels).astype(np.int8), scale


def power2_scale(amax, bits: int) -> np.ndarray:
    """Relay's power-of-2 scale of a B-bit value whose range is ``amax``:
    2**ceil(log2 amax) / 2**(B-1) (python/tvm/relay/quantize/_calibrate.py, ``scale / 2**valid_bit``).
    A zero range gets scale 1: its values are 0 at any scale."""
    amax = np.asarray(amax, dtype=np.float64)
    return np.where(amax == 0, 1.0, power2_ceil(np.where(amax == 0, 1.0, amax)) / 2.0 ** (bits - 1))


def bias_scale(bias: np.ndarray, bits: int, granularity: str = "tensor"):
    """The bias's own power-of-2 scale for B bits (``power2_scale`` of max|b|), the max over
    the layer (a float) or, for ``granularity`` "channel", over each channel alone (a (C,) array)."""
    b = np.abs(np.asarray(bias, dtype=np.float64))
    amax = b if granularity == "channel" else np.asarray(b.max(initial=0.0))
    scale = power2_scale(amax, bits)
    return scale if granularity == "channel" else float(scale)


@dataclass(frozen=True)
class RescalePlan:
    """How ``requantize`` multiplies an integer tensor by ``ratio`` (per channel), exactly."""

    kind: str  # "shift" or "multiply"
    lshift: np.ndarray
    rshift: np.ndarray
    multiplier: np.ndarray  # int64, only for "multiply"
    compute: str  # "int32" or "int64"
    out_bound: np.ndarray  # proven bound of the result before any int8 clip


def rounding_shift_bound(bound, rshift):
    """A bound of ``rshr(v, rshift)`` for |v| <= bound, and the half it adds (``rnd``); it holds for
    both roundings (qcal.ir.qgraph): each adds at most ``rnd`` before the shift."""
    rnd = np.where(rshift > 0, np.left_shift(np.int64(1), np.maximum(rshift - 1, 0)), 0)
    return np.right_shift(bound + rnd, rshift), rnd


def rescale_plan(ratio, bound) -> RescalePlan:
    """Rescale by ``ratio`` > 0: a shift when every ratio is a power of two, else a fixed-point
    multiplier m in [2**30, 2**31) with a rounding right shift, computed in int64."""
    ratio = np.asarray(ratio, dtype=np.float64)
    bound = np.asarray(bound, dtype=np.int64)
    if np.any(ratio <= 0) or not np.all(np.isfinite(ratio)):
        raise QcalError(f"cannot rescale by {ratio}")
    mantissa, exponent = np.frexp(ratio)
    if np.all(mantissa == 0.5):
        log2 = exponent.astype(np.int64) - 1
        lshift = np.maximum(log2, 0)
        rshift = np.minimum(np.maximum(-log2, 0), MAX_RIGHT_SHIFT)
        if np.any(lshift > MAX_LEFT_SHIFT):
            raise QcalError(f"rescale ratio {ratio.max()} is too large to shift")
        shifted = np.left_shift(bound, lshift)
        out, rnd = rounding_shift_bound(shifted, rshift)
        fits32 = np.all(shifted + rnd <= INT32_MAX) and np.all(rshift <= 31)
        return RescalePlan("shift", lshift, rshift, np.zeros_like(lshift),
                           "int32" if fits32 else "int64", out)
    multiplier = np.rint(mantissa * 2.0 ** 31).astype(np.int64)
    exponent = exponent.astype(np.int64)
    carry = multiplier == 2 ** 31
    multiplier = np.where(carry, 2 ** 30, multiplier)
    exponent = exponent + carry
    rshift = 31 - exponent
    if np.any(rshift < 1):
        raise QcalError(f"rescale ratio {ratio.max()} is too large for a fixed-point multiplier")
    too_fine = rshift > MAX_RIGHT_SHIFT
    multiplier = np.where(too_fine, np.right_shift(multiplier, np.maximum(rshift - MAX_RIGHT_SHIFT, 0)),
                          multiplier)
    rshift = np.minimum(rshift, MAX_RIGHT_SHIFT)
    if np.any(bound * multiplier >= INT64_SAFE):
        raise QcalError("fixed-point rescale would overflow int64")
    out, _ = rounding_shift_bound(bound * multiplier, rshift)
    return RescalePlan("multiply", np.zeros_like(rshift), rshift, multiplier, "int64", out)
