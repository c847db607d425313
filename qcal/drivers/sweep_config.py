"""Sweep configuration files: a YAML grid of variants, checked against a schema before any work.

Every problem is reported with the file and line of the key or value at fault; unknown keys are
errors (a misspelt key silently ignored would make a table that is not what its config says).

    name: fmnist-embedded            # output folder name under results/ (default: file stem)
    models: [fmnist_resnet20_v1]     # registry names or .onnx paths
    data:                            # the same vocabulary as the CLI's data options
      data: null                     #   evaluation source (null: the model's default)
      num_images: 10000
      calib_images: 500
      calib_data: null
      calib_range: null              #   "START:STOP"
      calib_crops: null              #   calibrate on this many random crops of those images
      input_size: 224                #   every CLI preprocessing option is a key here too:
      crop_ratio: 0.875              #   resize, pad, pad_value, channels, scale, mean, std
      fidelity_data: null            #   photos whose random crops feed label-free metrics
      fidelity_crops: null           #   how many crops (null: none; metrics use data only)
    pretrained: false                # zoo models: weights from MXNet's model store
    batch_size: 64
    seed: 0
    float32: true                    # evaluate the float32 model too (the baseline of every delta)
    verify_images: 2                 # check each compiled variant on this many calibration images
                                     #   against its numpy integer reference first (0: off)
    grid:                            # the cross product of these lists ...
      activation_method: [power2, kl]
      weight_granularity: [tensor, channel]
      bias: [8, 9, 16, int32-acc]    #   shorthand for bias_mode / bias_bits
    variants:                        # ... plus these single variants (any QuantOptions keys + bias)
      - {activation_method: max, skip_k_conv: 2}
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qcal.config import (DEFAULT_BATCH_SIZE, DEFAULT_VERIFY_IMAGES, OPTION_KEYS, QuantOptions,
                         expand_variants, options_from_values)
from qcal.data.preprocessing import PREPROCESSING_KEYS, coerce
from qcal.errors import UsageProblem

DATA_KEYS = {
    "data": (str, type(None)), "num_images": (int, type(None)), "calib_images": (int, type(None)),
    "calib_data": (str, type(None)), "calib_range": (str, type(None)),
    "fidelity_data": (str, type(None)), "fidelity_crops": (int, type(None)),
    "calib_crops": (int, type(None)),
}  # and every preprocessing key (PREPROCESSING_KEYS), checked by the CLI's own rule
TOP_KEYS = {"name", "models", "pretrained", "data", "batch_size", "seed", "float32", "grid",
            "variants", "verify_images"}


@dataclass(frozen=True)
class SweepConfig:
    name: str
    models: tuple
    data: dict
    batch_size: int
    seed: int
    float32: bool
    pretrained: bool
    variants: tuple  # of QuantOptions, in grid order, duplicates removed
    params: str | None = None  # a local weights file (one model only; the CLI's --params)
    calibration_file: str | None = None  # reuse a `qcal calibrate` file instead of a pass
    verify_images: int = DEFAULT_VERIFY_IMAGES  # qcal.eval.verify before each variant (0: off)
    source_path: str = ""
    raw: dict = field(default_factory=dict, compare=False)


class _Located:
    """Wraps a composed YAML node so errors can name its line."""

    def __init__(self, path: Path, node):
        self.path = path
        self.node = node

    def fail(self, message, node=None):
        line = (node or self.node).start_mark.line + 1
        raise UsageProblem(f"{self.path}:{line}: {message}")


def _scalar(loc: _Located, node):
    if not isinstance(node, yaml.ScalarNode):
        loc.fail("expected a single value", node)
    return yaml.safe_load(yaml.serialize(node))


def _mapping(loc: _Located, node, what):
    if not isinstance(node, yaml.MappingNode):
        loc.fail(f"{what} must be a mapping", node)
    seen = {}
    for key_node, value_node in node.value:
        key = key_node.value
        if key in seen:
            loc.fail(f"duplicate key '{key}'", key_node)
        seen[key] = (key_node, value_node)
    return seen


def _sequence(loc: _Located, node, what):
    if isinstance(node, yaml.ScalarNode):
        return [node]
    if not isinstance(node, yaml.SequenceNode) or not node.value:
        loc.fail(f"{what} must be a non-empty list", node)
    return node.value


def _options(loc: _Located, values: dict, node) -> QuantOptions:
    try:
        return options_from_values(values)
    except UsageProblem as exc:
        loc.fail(str(exc), node)


def _existing_path(config_path: Path, value: str):
    """A path as written (absolute, or relative to the working directory), else relative to the
    config file's folder; None when neither exists."""
    for candidate in (Path(value), config_path.parent / value):
        if candidate.exists():
            return candidate.resolve()
    return None


def load_sweep_config(path, data_overrides: dict | None = None,
                      verify_images: int | None = None) -> SweepConfig:
    """Parse and check ``path``; ``data_overrides`` (from the command line) replace data keys,
    ``verify_images`` (when not None) the config's."""
    config = _load_sweep_config(Path(path))
    if verify_images is not None:
        config = dataclasses.replace(config, verify_images=verify_images)
    if data_overrides:
        data = {**config.data, **{k: v for k, v in data_overrides.items() if v is not None}}
        config = dataclasses.replace(config, data=data)
    return config


def _load_sweep_config(path: Path) -> SweepConfig:
    path = Path(path)
    if not path.is_file():
        raise UsageProblem(f"sweep config not found: {path}")
    try:
        root = yaml.compose(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        raise UsageProblem(f"{path}{line}: not valid YAML ({getattr(exc, 'problem', exc)})") from None
    if root is None:
        raise UsageProblem(f"{path}: the file is empty")
    loc = _Located(path, root)
    top = _mapping(loc, root, "the config")
    for key, (key_node, _) in top.items():
        if key not in TOP_KEYS:
            loc.fail(f"unknown key '{key}' (known: {', '.join(sorted(TOP_KEYS))})", key_node)
    if "models" not in top:
        loc.fail("'models' is required")

    from qcal.families import canonical_model_name

    models = []
    for node in _sequence(loc, top["models"][1], "models"):
        name = str(_scalar(loc, node))
        try:
            models.append(canonical_model_name(name, base_dir=path.parent))
        except UsageProblem as exc:
            loc.fail(str(exc), node)

    data = {}
    if "data" in top:
        for key, (key_node, value_node) in _mapping(loc, top["data"][1], "data").items():
            if key in PREPROCESSING_KEYS:
                value = yaml.safe_load(yaml.serialize(value_node))
                if value is not None:
                    try:
                        data[key] = coerce(key, value)
                    except UsageProblem as exc:
                        loc.fail(f"data.{exc}", value_node)
                continue
            if key not in DATA_KEYS:
                known = sorted([*DATA_KEYS, *PREPROCESSING_KEYS])
                loc.fail(f"unknown data key '{key}' (known: {', '.join(known)})", key_node)
            value = _scalar(loc, value_node)
            if not isinstance(value, DATA_KEYS[key]) or isinstance(value, bool):
                loc.fail(f"data.{key} has the wrong type ({type(value).__name__})", value_node)
            positive = ("num_images", "calib_images", "fidelity_crops", "calib_crops")
            if key in positive and value is not None and value < 1:
                loc.fail(f"data.{key} must be at least 1", value_node)
            if key in ("data", "calib_data", "fidelity_data") and value is not None:
                resolved = _existing_path(path, value)
                if resolved is None:
                    loc.fail(f"data.{key}: {value} does not exist", value_node)
                value = str(resolved)
            data[key] = value

    def integer(key, default, minimum):
        if key not in top:
            return default
        value = _scalar(loc, top[key][1])
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            loc.fail(f"{key} must be an integer >= {minimum}", top[key][1])
        return value

    batch_size = integer("batch_size", DEFAULT_BATCH_SIZE, 1)
    seed = integer("seed", 0, 0)
    verify_images = integer("verify_images", DEFAULT_VERIFY_IMAGES, 0)

    def boolean(key, default):
        if key not in top:
            return default
        value = _scalar(loc, top[key][1])
        if not isinstance(value, bool):
            loc.fail(f"{key} must be true or false", top[key][1])
        return value

    float32 = boolean("float32", True)
    pretrained = boolean("pretrained", False)

    variants = []
    if "grid" in top:
        grid_node = top["grid"][1]
        axes = []
        for key, (key_node, value_node) in _mapping(loc, grid_node, "grid").items():
            if key not in OPTION_KEYS:
                loc.fail(f"unknown grid key '{key}' (known: {', '.join(sorted(OPTION_KEYS))})",
                         key_node)
            axes.append((key, [(_scalar(loc, n), n) for n in
                               _sequence(loc, value_node, f"grid.{key}")]))
        for key, values in axes:  # a bad value is reported at its own line
            for value, node in values:
                _options(loc, {key: value}, node)
        try:
            variants.extend(expand_variants({key: [v for v, _ in values] for key, values in axes}))
        except UsageProblem as exc:  # a combination no single value rules out
            loc.fail(str(exc), grid_node)
    if "variants" in top:
        for node in _sequence(loc, top["variants"][1], "variants"):
            fields_ = _mapping(loc, node, "a variant")
            values = {}
            for key, (key_node, value_node) in fields_.items():
                if key not in OPTION_KEYS:
                    loc.fail(f"unknown variant key '{key}' (known: {', '.join(sorted(OPTION_KEYS))})",
                             key_node)
                values[key] = _scalar(loc, value_node)
            variants.append(_options(loc, values, node))
    if not variants and not float32:
        loc.fail("nothing to run: no grid, no variants and float32: false")
    unique = tuple(dict.fromkeys(variants))
    name = str(_scalar(loc, top["name"][1])) if "name" in top else path.stem
    return SweepConfig(name=name, models=tuple(models), data=data, batch_size=batch_size,
                       seed=seed, float32=float32, pretrained=pretrained, variants=unique,
                       verify_images=verify_images, source_path=str(path),
                       raw=yaml.safe_load(path.read_text()))
