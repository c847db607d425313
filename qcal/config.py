"""qcal's shared vocabulary: the quantization options and every default, each defined once.

The CLI, sweep YAML files and calibration files all build a ``QuantOptions`` through
``QuantOptions.from_dict`` so that a misspelt key is an error, never silently ignored (Relay's
``qconfig(**kw)`` dropped unknown keys). ``expand_variants`` turns lists of option values (the
CLI's repeated options, a sweep file's grid) into the variants they describe.
"""
from __future__ import annotations

import itertools
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from qcal.errors import UsageProblem

# Defaults of the pipeline, used by the CLI, sweep files and the library alike.
# Empirical bias correction measures on the first N calibration images (all of a smaller set): it
# holds every one of them at the live tensors at once (qcal.quant.bias_correction).
BIAS_CORRECTION_IMAGES = 128
DEFAULT_BATCH_SIZE = 64
DEFAULT_CALIB_IMAGES = 500  # calibration images when none are given (all of a smaller split)
DEFAULT_HISTOGRAM_BINS = 8192  # |x| histogram bins per tensor in the statistics pass
DEFAULT_BATCH_CACHE_DIR = Path(".qcal-cache/batches")
# Calibration images on which each compiled variant must equal its numpy integer reference bit for
# bit before it is evaluated (qcal.eval.verify); 0 turns the check off.
DEFAULT_VERIFY_IMAGES = 2
# qcal sensitivity: label-free images each variant runs on (numpy, nothing compiled), and the
# bias precision its "bias" mode gives one layer at a time
DEFAULT_SENSITIVITY_IMAGES = 64
DEFAULT_SENSITIVITY_BIAS_BITS = 8
# On a cluster (qcal sweep --workers/--cluster), a variant evaluating more images than this is cut
# into tasks of this many (whole batches); each task compiles the variant or reads it from the
# compile cache, so shards much smaller than an evaluation's compile time do not pay.
DEFAULT_SHARD_IMAGES = 10000

# Activation calibration methods (qcal.calib.collect's registry holds their implementations).
ACTIVATION_METHODS = ("global", "max", "power2", "l2", "kl", "kl-mxnet", "percentile")
WEIGHT_SCALES = ("max", "power2")
WEIGHT_GRANULARITIES = ("tensor", "channel")
# "int32-acc": the usual int32 bias at the accumulator scale s_in * s_w (ONNX Runtime, TFLite,
# PyTorch). Otherwise bias_bits B quantizes the bias with its own power-of-2 scale (docs/background.md).
BIAS_MODES = ("bits", "int32-acc")
# A B-bit bias's power-of-2 scale: one for the layer ("tensor", Relay's), or one per output channel
# ("channel": no channel's bias rounds to zero because another channel's is large). An int32-acc bias
# is at the accumulator's scale, per channel whenever the weights are, so it ignores this.
BIAS_GRANULARITIES = ("tensor", "channel")
# "empirical": each biased layer's bias re-estimated so that the integer model's per-channel output
# mean on the calibration images equals the float model's (qcal.quant.bias_correction).
BIAS_CORRECTIONS = ("none", "empirical")
# Integer widths of weights and activations: symmetric levels -(2**(b-1)-1)..2**(b-1)-1, always
# stored in int8 (the kernels stay int8; only the clipping bounds and scales change).
MIN_BITS, MAX_BITS = 2, 8
# Width of the int32 tensors that one integer op hands to another (residual-add operands and sums,
# int32 shortcuts, pooling inputs): Relay's qconfig ``nbit_activation`` (its QAnnotateKind.ACTIVATION
# simulated quantizes, python/tvm/relay/quantize/_calibrate.py). 32 keeps them exact; B < 32
# requantizes each to symmetric B-bit levels at a power-of-2 scale from its abs-max.
EXACT_INTERMEDIATE_BITS = 32
MIN_INTERMEDIATE_BITS = 9
# How every rounding right shift and integer rescale rounds a tie: "upward" adds half and floors
# (Relay's UPWARD, ties towards +inf), "nearest" rounds ties to even (Relay's TONEAREST).
ROUNDINGS = ("upward", "nearest")
# Float ops qcal can run in integers (qcal.quant.annotate's handlers); ``quantize_ops`` picks a
# subset (Relay's debug_enabled_ops), the rest stay float32.
# How each conv/dense weight is rounded to its level: "nearest" (rint), or "adaround", learned
# per layer on calibration images (qcal.quant.adaround; Nagel et al. 2020).
WEIGHT_ROUNDINGS = ("nearest", "adaround")
DEFAULT_ADAROUND_ITERATIONS = 500  # optimiser steps per layer (the paper used 10,000)
DEFAULT_ADAROUND_IMAGES = 256  # the first calibration images AdaRound learns from
# Fields that only AdaRound reads: left out of a variant's description (to_dict) when the
# weights are rounded to nearest, so that such variants keep their keys and their label.
ADAROUND_FIELDS = ("weight_rounding", "adaround_iterations", "adaround_images")
QUANTIZABLE_OPS = ("conv2d", "dense", "channel_affine", "add", "relu", "clip", "max_pool2d",
                   "avg_pool2d", "global_avg_pool2d", "flatten")


def _is_integer(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class QuantOptions:
    activation_method: str = "power2"
    percentile: float = 99.99
    global_scale: float = 8.0  # Relay's default: every activation clipped to [-8, 8]
    weight_scale: str = "power2"
    weight_granularity: str = "tensor"
    bias_mode: str = "bits"
    bias_bits: int = 16
    bias_granularity: str = BIAS_GRANULARITIES[0]
    bias_correction: str = BIAS_CORRECTIONS[0]
    # Cross-layer equalization of consecutive convs before quantization (qcal.quant.equalize);
    # the equalized model gets its own statistics pass.
    equalize: bool = False
    skip_k_conv: int = 0
    skip_dense: bool = False
    weight_bits: int = 8
    activation_bits: int = 8
    # The first and the last quantized conv/dense layer (weights and their int8 input): None
    # gives them the widths above; common practice keeps them at 8.
    first_layer_bits: int | None = None
    last_layer_bits: int | None = None
    rounding: str = ROUNDINGS[0]
    intermediate_bits: int = EXACT_INTERMEDIATE_BITS
    # None: every op of QUANTIZABLE_OPS; else only these (a tuple, or "conv2d,dense" in a file).
    quantize_ops: tuple | None = None
    float_layers: tuple = ()  # layer (node) names kept float32, e.g. what layers.csv points at
    # Per-layer bias precision over bias_mode / bias_bits: ((layer name, bits or "int32-acc"),
    # ...); "conv1=8,conv2=int32-acc" in a file or on the CLI.
    layer_bias_bits: tuple = ()
    # Evaluate the fake-quantized float model of the integer graph (numpy, no compile) instead of
    # the compiled integer model: fast exploration, its rows labelled "simulated".
    simulate: bool = False
    weight_rounding: str = WEIGHT_ROUNDINGS[0]
    adaround_iterations: int = DEFAULT_ADAROUND_ITERATIONS
    adaround_images: int = DEFAULT_ADAROUND_IMAGES

    def __post_init__(self):
        def need(cond, message):
            if not cond:
                raise UsageProblem(message)

        for name in ("quantize_ops", "float_layers"):
            value = getattr(self, name)
            if value is not None:
                object.__setattr__(self, name, _name_list(name, value))
        object.__setattr__(self, "layer_bias_bits", _layer_biases(self.layer_bias_bits))
        # YAML hands over whatever it parsed: "no" is a string, "99.9" too; only real numbers
        # and booleans pass, and numbers are kept as floats so that 99 and 99.0 are one variant
        for name in ("percentile", "global_scale"):
            value = getattr(self, name)
            need(_is_number(value), f"{name} must be a number, not {value!r}")
            object.__setattr__(self, name, float(value))
        need(isinstance(self.skip_dense, bool),
             f"skip_dense must be true or false, not {self.skip_dense!r}")
        need(isinstance(self.equalize, bool),
             f"equalize must be true or false, not {self.equalize!r}")
        need(isinstance(self.simulate, bool),
             f"simulate must be true or false, not {self.simulate!r}")

        def width(value, optional=False):
            return (optional and value is None) or (_is_integer(value)
                                                    and MIN_BITS <= value <= MAX_BITS)

        need(self.activation_method in ACTIVATION_METHODS,
             f"activation_method must be one of {', '.join(ACTIVATION_METHODS)}, "
             f"not '{self.activation_method}'")
        need(0.0 < self.percentile <= 100.0,
             f"percentile must be in (0, 100], not {self.percentile}")
        need(math.isfinite(self.global_scale) and self.global_scale > 0,
             f"global_scale must be a positive finite number, not {self.global_scale}")
        need(self.weight_scale in WEIGHT_SCALES,
             f"weight_scale must be one of {', '.join(WEIGHT_SCALES)}, not '{self.weight_scale}'")
        need(self.weight_granularity in WEIGHT_GRANULARITIES,
             f"weight_granularity must be one of {', '.join(WEIGHT_GRANULARITIES)}, "
             f"not '{self.weight_granularity}'")
        need(self.bias_mode in BIAS_MODES,
             f"bias_mode must be one of {', '.join(BIAS_MODES)}, not '{self.bias_mode}'")
        need(_is_integer(self.bias_bits) and 2 <= self.bias_bits <= 32,
             f"bias_bits must be an integer from 2 to 32, not {self.bias_bits!r}")
        need(self.bias_granularity in BIAS_GRANULARITIES,
             f"bias_granularity must be one of {', '.join(BIAS_GRANULARITIES)}, "
             f"not '{self.bias_granularity}'")
        need(self.bias_correction in BIAS_CORRECTIONS,
             f"bias_correction must be one of {', '.join(BIAS_CORRECTIONS)}, "
             f"not '{self.bias_correction}'")
        if self.bias_mode == "int32-acc":  # one variant, whichever granularity a grid pairs it with
            object.__setattr__(self, "bias_granularity", BIAS_GRANULARITIES[0])
        need(_is_integer(self.skip_k_conv) and self.skip_k_conv >= 0,
             f"skip_k_conv must be a non-negative integer, not {self.skip_k_conv!r}")
        for name in ("weight_bits", "activation_bits", "first_layer_bits", "last_layer_bits"):
            value = getattr(self, name)
            need(width(value, optional=name.endswith("layer_bits")),
                 f"{name} must be an integer from {MIN_BITS} to {MAX_BITS}, not {value!r}")
        need(_is_integer(self.intermediate_bits)
             and MIN_INTERMEDIATE_BITS <= self.intermediate_bits <= EXACT_INTERMEDIATE_BITS,
             f"intermediate_bits must be an integer from {MIN_INTERMEDIATE_BITS} to "
             f"{EXACT_INTERMEDIATE_BITS}, not {self.intermediate_bits!r}")
        need(self.weight_rounding in WEIGHT_ROUNDINGS,
             f"weight_rounding must be one of {', '.join(WEIGHT_ROUNDINGS)}, "
             f"not '{self.weight_rounding}'")
        for name in ("adaround_iterations", "adaround_images"):
            value = getattr(self, name)
            need(_is_integer(value) and value >= 1,
                 f"{name} must be a positive integer, not {value!r}")
        if self.weight_rounding == WEIGHT_ROUNDINGS[0]:  # nearest reads neither: one variant
            object.__setattr__(self, "adaround_iterations", DEFAULT_ADAROUND_ITERATIONS)
            object.__setattr__(self, "adaround_images", DEFAULT_ADAROUND_IMAGES)
        need(self.rounding in ROUNDINGS,
             f"rounding must be one of {', '.join(ROUNDINGS)}, not '{self.rounding}'")
        need(self.float_layers is not None, "float_layers must be a list of layer names")
        unknown = [op for op in self.quantize_ops or () if op not in QUANTIZABLE_OPS]
        need(not unknown, f"quantize_ops: '{', '.join(unknown)}' is not an op qcal quantizes "
                          f"(known: {', '.join(QUANTIZABLE_OPS)})")
        need(self.quantize_ops != (), "quantize_ops must name at least one op")

    @classmethod
    def from_dict(cls, values: dict) -> "QuantOptions":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise UsageProblem(f"unknown quantization option(s): {', '.join(unknown)} "
                               f"(known: {', '.join(sorted(known))})")
        return cls(**values)

    def to_dict(self) -> dict:
        values = asdict(self)
        for name in ADDED_LATER:  # at their default: the dict (and variant keys) of before
            if values[name] == getattr(QuantOptions, name):
                del values[name]
        if self.weight_rounding == WEIGHT_ROUNDINGS[0]:
            for name in ADAROUND_FIELDS:
                del values[name]
        return values

    @property
    def label(self) -> str:
        """A short, unique, human-readable name for tables."""
        act = self.activation_method
        if act == "percentile":
            act = f"p{self.percentile:g}"
        elif act == "global":
            act = f"global{self.global_scale:g}"
        bias = "b32acc" if self.bias_mode == "int32-acc" else f"b{self.bias_bits}"
        if self.bias_granularity != BIAS_GRANULARITIES[0]:
            bias += f"/{self.bias_granularity}"
        parts = [f"a:{act}", f"w:{self.weight_scale}/{self.weight_granularity}", bias]
        if self.equalize:
            parts.append("cle")
        if self.bias_correction != BIAS_CORRECTIONS[0]:
            parts.append(f"bcorr-{self.bias_correction}")
        if self.skip_k_conv:
            parts.append(f"skip{self.skip_k_conv}")
        if self.skip_dense:
            parts.append("fdense")
        if (self.weight_bits, self.activation_bits) != (8, 8):
            parts.append(f"W{self.weight_bits}A{self.activation_bits}")
        ends = [f"{which}{bits}" for which, bits in (("first", self.first_layer_bits),
                                                     ("last", self.last_layer_bits))
                if bits is not None]
        parts.extend(ends)
        if self.rounding != ROUNDINGS[0]:
            parts.append(f"round-{self.rounding}")
        if self.intermediate_bits != EXACT_INTERMEDIATE_BITS:
            parts.append(f"intermediates:{self.intermediate_bits}b")
        if self.weight_rounding != WEIGHT_ROUNDINGS[0]:
            parts.append(f"{self.weight_rounding}:{self.adaround_iterations}it/"
                         f"{self.adaround_images}img")
        if self.quantize_ops is not None:
            parts.append(f"ops:{'+'.join(self.quantize_ops)}")
        if self.float_layers:
            parts.append(f"float:{'+'.join(self.float_layers)}")
        if self.layer_bias_bits:
            parts.append("bias:" + "+".join(f"{name}={_bias_text(value)}"
                                            for name, value in self.layer_bias_bits))
        if self.simulate:
            parts.append("simulated")
        return " ".join(parts)

    def bias_for(self, layer: str) -> tuple:
        """(bias_mode, bias_bits) of one layer: its ``layer_bias_bits`` entry, else the
        network's."""
        for name, value in self.layer_bias_bits:
            if name == layer:
                return ("int32-acc", self.bias_bits) if value == "int32-acc" else ("bits", value)
        return self.bias_mode, self.bias_bits

    def layer_bits(self, position: str | None) -> tuple:
        """(weight bits, activation bits) of a layer; ``position`` 'first', 'last' or None."""
        override = {"first": self.first_layer_bits, "last": self.last_layer_bits}.get(position)
        if override is not None:
            return override, override
        return self.weight_bits, self.activation_bits


# Fields added after results folders existed: left out of ``to_dict`` at their default, so a
# variant that does not use them keeps the key (and folder config) it had before.
ADDED_LATER = ("layer_bias_bits", "intermediate_bits")


def _name_list(what: str, value) -> tuple:
    """A tuple of names from a tuple/list or a comma-separated string, in order, duplicates
    removed."""
    if isinstance(value, str):
        value = value.split(",")
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UsageProblem(f"{what} must be names, as a list or separated by commas, not {value!r}")
    names = [v.strip() for v in value]
    if any(not n for n in names):
        raise UsageProblem(f"{what}: an empty name in {value!r}")
    return tuple(dict.fromkeys(names))


def _bias_value(value):
    """A bias precision: 2..32 bits, or "int32-acc"; a UsageProblem naming it otherwise."""
    if isinstance(value, str) and value.strip().isdigit():
        value = int(value.strip())
    elif isinstance(value, str):
        value = value.strip()
    if value == "int32-acc" or (_is_integer(value) and 2 <= value <= 32):
        return value
    raise UsageProblem(f"layer_bias_bits: a bias precision is 2..32 bits or 'int32-acc', not "
                       f"{value!r}")


def _bias_text(value) -> str:
    return "b32acc" if value == "int32-acc" else f"b{value}"


def _layer_biases(value) -> tuple:
    """((layer, bits or "int32-acc"), ...) from "name=8,name=int32-acc", a {name: bits} mapping or
    pairs; in the order given, a repeated layer refused."""
    if isinstance(value, str):
        items = []
        for part in value.split(","):
            name, sep, bits = part.partition("=")
            if not sep or not name.strip():
                raise UsageProblem(f"layer_bias_bits: {part.strip()!r} is not NAME=BITS "
                                   "(e.g. conv1=8,conv2=int32-acc)")
            items.append((name.strip(), bits))
    elif isinstance(value, dict):
        items = list(value.items())
    elif isinstance(value, (list, tuple)) and all(
            isinstance(p, (list, tuple)) and len(p) == 2 for p in value):
        items = [tuple(p) for p in value]
    else:
        raise UsageProblem(f"layer_bias_bits must be NAME=BITS pairs, as a mapping or separated "
                           f"by commas, not {value!r}")
    pairs = []
    for name, bits in items:
        if not isinstance(name, str) or not name.strip():
            raise UsageProblem(f"layer_bias_bits: {name!r} is not a layer name")
        if any(name.strip() == seen for seen, _ in pairs):
            raise UsageProblem(f"layer_bias_bits: layer '{name.strip()}' is given twice")
        pairs.append((name.strip(), _bias_value(bits)))
    return tuple(pairs)


def levels_for_bits(bits: int) -> int:
    """The largest level of a symmetric b-bit integer: 2**(b-1) - 1 (127 for 8 bits)."""
    return 2 ** (bits - 1) - 1


# Option names a variant may set: the QuantOptions fields, plus "bias", the one-key shorthand for
# bias_mode / bias_bits that the CLI's --bias-bits and sweep files use.
OPTION_KEYS = frozenset({f.name for f in fields(QuantOptions)} | {"bias"})


def options_from_values(values: dict) -> QuantOptions:
    """A ``QuantOptions`` from option values, ``bias`` (a bit count or 'int32-acc') included."""
    values = dict(values)
    bias = values.pop("bias", None)
    if bias is not None:
        if bias == "int32-acc":
            values["bias_mode"] = "int32-acc"
        elif _is_integer(bias):
            values.update(bias_mode="bits", bias_bits=bias)
        else:
            raise UsageProblem(f"bias must be a bit count (2..32) or 'int32-acc', not {bias!r}")
    return QuantOptions.from_dict(values)


def expand_variants(axes: dict, fixed: dict | None = None) -> tuple:
    """Every combination of the values in ``axes`` ({option: [values, ...]}, in that order),
    each with the ``fixed`` options: the variants a grid describes, duplicates removed."""
    fixed = dict(fixed or {})
    variants = [options_from_values({**dict(zip(axes, combo)), **fixed})
                for combo in itertools.product(*axes.values())]
    return tuple(dict.fromkeys(variants))
