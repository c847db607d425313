"""Quantization options: one frozen object, defaults in exactly one place, unknown keys refused.

The CLI, sweep YAML files and calibration files all build a ``QuantOptions`` through
``QuantOptions.from_dict`` so that a misspelt key is an error, never silently ignored (Relay's
``qconfig(**kw)`` dropped unknown keys).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, fields

from .errors import UsageProblem

# Activation calibration methods (qcal.calibrate's registry holds their implementations).
ACTIVATION_METHODS = ("global", "max", "power2", "l2", "kl", "percentile")
WEIGHT_SCALES = ("max", "power2")
WEIGHT_GRANULARITIES = ("tensor", "channel")
# "int32-acc": the usual int32 bias at the accumulator scale s_in * s_w (ONNX Runtime, TFLite,
# PyTorch). Otherwise bias_bits B quantizes the bias with its own power-of-2 scale (the thread).
BIAS_MODES = ("bits", "int32-acc")


@dataclass(frozen=True)
class QuantOptions:
    activation_method: str = "power2"
    percentile: float = 99.99
    global_scale: float = 8.0  # Relay's default: every activation clipped to [-8, 8]
    weight_scale: str = "power2"
    weight_granularity: str = "tensor"
    bias_mode: str = "bits"
    bias_bits: int = 16
    skip_k_conv: int = 0
    skip_dense: bool = False

    def __post_init__(self):
        def need(cond, message):
            if not cond:
                raise UsageProblem(message)

        need(self.activation_method in ACTIVATION_METHODS,
             f"activation_method must be one of {', '.join(ACTIVATION_METHODS)}, "
             f"not '{self.activation_method}'")
        need(0.0 < self.percentile <= 100.0,
             f"percentile must be in (0, 100], not {self.percentile}")
        need(self.global_scale > 0, f"global_scale must be positive, not {self.global_scale}")
        need(self.weight_scale in WEIGHT_SCALES,
             f"weight_scale must be one of {', '.join(WEIGHT_SCALES)}, not '{self.weight_scale}'")
        need(self.weight_granularity in WEIGHT_GRANULARITIES,
             f"weight_granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, "
             f"not '{self.weight_granularity}'")
        need(self.bias_mode in BIAS_MODES,
             f"bias_mode must be one of {', '.join(BIAS_MODES)}, not '{self.bias_mode}'")
        need(isinstance(self.bias_bits, int) and 2 <= self.bias_bits <= 32,
             f"bias_bits must be an integer from 2 to 32, not {self.bias_bits!r}")
        need(isinstance(self.skip_k_conv, int) and self.skip_k_conv >= 0,
             f"skip_k_conv must be a non-negative integer, not {self.skip_k_conv!r}")

    @classmethod
    def from_dict(cls, values: dict) -> "QuantOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageProblem(f"unknown quantization option(s): {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict:
        return asdict(self)

    @property
    def label(self) -> str:
        """A short, unique, human-readable name for tables."""
        act = self.activation_method
        if act == "percentile":
            act = f"p{self.percentile:g}"
        elif act == "global":
            act = f"global{self.global_scale:g}"
        bias = "b32acc" if self.bias_mode == "int32-acc" else f"b{self.bias_bits}"
        parts = [f"a:{act}", f"w:{self.weight_scale}/{self.weight_granularity}", bias]
        if self.skip_k_conv:
            parts.append(f"skip{self.skip_k_conv}")
        if self.skip_dense:
            parts.append("fdense")
        return " ".join(parts)
