"""Sweep configuration files: a YAML grid of variants, checked against a schema before any work.

Every problem is reported with the file and line of the key or value at fault, all of them at
once; unknown keys are errors (a misspelt key silently ignored would make a table that is not what
its config says), and so are values of the wrong type (``skip_dense: "no"`` is a string, not
false) and YAML tags beyond the plain scalars, lists and mappings (``!!python/...``).

Length: the whole file format in one place: every key's schema, each check located at its line.

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
    calib_repeats: 1                 # calibrate each variant on this many calibration subsets
                                     #   (qcal.data.calib_subsets) and report the spread
    keep_logits: false               # also keep every int8 variant's logits on disk
                                     #   (variants/KEY.logits.npy), for analyses of your own
    grid:                            # the cross product of these lists ...
      activation_method: [power2, kl]
      weight_granularity: [tensor, channel]
      bias: [8, 9, 16, int32-acc]    #   shorthand for bias_mode / bias_bits
    variants:                        # ... plus these single variants (any QuantOptions keys + bias)
      - {activation_method: max, skip_k_conv: 2}
"""
from __future__ import annotations

import dataclasses
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qcal.config import (DEFAULT_BATCH_SIZE, DEFAULT_VERIFY_IMAGES, OPTION_KEYS, QuantOptions,
                         expand_variants, options_from_values)
from qcal.data.plan import parse_range
from qcal.data.preprocessing import PREPROCESSING_KEYS, coerce
from qcal.errors import UsageProblem, raise_problems

DATA_KEYS = {
    "data": (str, type(None)), "num_images": (int, type(None)), "calib_images": (int, type(None)),
    "calib_data": (str, type(None)), "calib_range": (str, type(None)),
    "fidelity_data": (str, type(None)), "fidelity_crops": (int, type(None)),
    "calib_crops": (int, type(None)),
}  # and every preprocessing key (PREPROCESSING_KEYS), checked by the CLI's own rule
# Sections other commands read from the same file (``qcal sensitivity``'s settings): each a
# mapping of values kept as written, with their lines; the command checks them, a sweep ignores
# them.
COMMAND_SECTIONS = ("sensitivity", "search")
TOP_KEYS = {"name", "models", "pretrained", "data", "batch_size", "seed", "float32", "grid",
            "variants", "verify_images", "calib_repeats", "keep_logits", *COMMAND_SECTIONS}


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
    calib_repeats: int = 1  # calibration subsets per variant (qcal.data.calib_subsets)
    # int8 variants' logits streamed to files beside float32's (results do not depend on it)
    keep_logits: bool = False
    source_path: str = ""
    raw: dict = field(default_factory=dict, compare=False)
    # where each value was given, for messages: "models[0]", "data.num_images", ... ->
    # "FILE:LINE" (a sweep file) or the command-line option ("--num-images")
    locations: dict = field(default_factory=dict, compare=False)
    # COMMAND_SECTIONS given: {section: {key: value}}; their places are "SECTION.KEY" locations
    sections: dict = field(default_factory=dict, compare=False)

    def where(self, key: str, default: str = "") -> str:
        return self.locations.get(key, default)


# YAML's plain scalars, lists and mappings: any other tag (!!python/..., !!binary, a local !tag)
# makes something no sweep key takes
PLAIN_TAGS = frozenset("tag:yaml.org,2002:" + t for t in
                       ("str", "int", "float", "bool", "null", "timestamp", "seq", "map",
                        "merge"))


class _Skip(Exception):
    """One item of the config is wrong (recorded); the check goes on with the next."""


class _Located:
    """Wraps the composed YAML document: records every problem with the line of its node."""

    def __init__(self, path: Path, node):
        self.path = path
        self.node = node
        self.problems = []

    def at(self, node=None) -> str:
        return f"{self.path}:{(node or self.node).start_mark.line + 1}"

    def fail(self, message, node=None):
        self.problems.append(UsageProblem(f"{self.at(node)}: {message}"))
        raise _Skip

    @contextmanager
    def each(self):
        """Check one item; a problem in it is recorded and the next item is checked."""
        try:
            yield
        except _Skip:
            pass


def _check_tags(loc: _Located, node, seen=None):
    seen = set() if seen is None else seen
    if id(node) in seen:  # an alias of a node already checked
        return
    seen.add(id(node))
    if node.tag not in PLAIN_TAGS:
        with loc.each():
            tag = node.tag.replace("tag:yaml.org,2002:", "!!")
            loc.fail(f"YAML tag {tag} is not allowed in a sweep config (plain values, lists and "
                     f"mappings only)", node)
        return
    if isinstance(node, yaml.SequenceNode):
        for child in node.value:
            _check_tags(loc, child, seen)
    elif isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            _check_tags(loc, key, seen)
            _check_tags(loc, value, seen)


def _scalar(loc: _Located, node):
    if not isinstance(node, yaml.ScalarNode):
        loc.fail("expected a single value", node)
    try:
        return yaml.safe_load(yaml.serialize(node))
    except yaml.YAMLError as exc:
        loc.fail(f"cannot read this value ({getattr(exc, 'problem', None) or exc})", node)


def _mapping(loc: _Located, node, what):
    if not isinstance(node, yaml.MappingNode):
        loc.fail(f"{what} must be a mapping", node)
    seen = {}
    for key_node, value_node in node.value:
        with loc.each():
            if not isinstance(key_node, yaml.ScalarNode):
                loc.fail(f"a key of {what} must be a plain name, not a "
                         f"{'list' if isinstance(key_node, yaml.SequenceNode) else 'mapping'}",
                         key_node)
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


DATA_OPTIONS = {"data": "--data", "calib_data": "--calib-data", "num_images": "--num-images"}


def load_sweep_config(path, data_overrides: dict | None = None,
                      verify_images: int | None = None,
                      calib_repeats: int | None = None) -> SweepConfig:
    """Parse and check ``path``; ``data_overrides`` (from the command line) replace data keys,
    ``verify_images`` and ``calib_repeats`` (when not None) the config's. Every problem found is
    raised at once (``qcal.errors.Problems`` when there are several)."""
    config, problems = parse_sweep_config(path, data_overrides, verify_images, calib_repeats)
    raise_problems(problems)
    return config


def parse_sweep_config(path, data_overrides: dict | None = None,
                       verify_images: int | None = None,
                       calib_repeats: int | None = None) -> tuple:
    """(config, problems): the config as far as it could be read (items at fault left out), and
    every problem found, each naming its file and line."""
    path = Path(path)
    loc = _Located(path, None)
    try:
        config = _load_sweep_config(path, loc)
    except _Skip:
        return None, loc.problems
    if verify_images is not None:
        config = dataclasses.replace(config, verify_images=verify_images)
    if calib_repeats is not None:
        config = dataclasses.replace(config, calib_repeats=calib_repeats,
                                     locations={**config.locations,
                                                "calib_repeats": "--calib-repeats"})
    if data_overrides:
        given = {k: v for k, v in data_overrides.items() if v is not None}
        config = dataclasses.replace(
            config, data={**config.data, **given},
            locations={**config.locations,
                       **{f"data.{k}": DATA_OPTIONS.get(k, f"--{k.replace('_', '-')}")
                          for k in given}})
    return config, loc.problems


def _read_text(loc: _Located, path: Path) -> str:
    if not path.is_file():
        loc.problems.append(UsageProblem(f"sweep config not found: {path}"))
        raise _Skip
    try:
        data = path.read_bytes()
    except OSError as exc:
        loc.problems.append(UsageProblem(f"{path}: cannot read the sweep config "
                                         f"({exc.strerror or exc})"))
        raise _Skip from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[:exc.start].count(b"\n") + 1
        loc.problems.append(UsageProblem(
            f"{path}:{line}: not UTF-8 text (byte {data[exc.start]:#04x} at offset {exc.start}); "
            f"save the config as UTF-8"))
        raise _Skip from None


def _load_sweep_config(path: Path, loc: _Located) -> SweepConfig:
    text = _read_text(loc, path)
    try:
        root = yaml.compose(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark else ""
        loc.problems.append(UsageProblem(
            f"{path}{line}: not valid YAML ({getattr(exc, 'problem', None) or exc})"))
        raise _Skip from None
    if root is None:
        loc.problems.append(UsageProblem(f"{path}: the file is empty"))
        raise _Skip
    loc.node = root
    _check_tags(loc, root)
    if loc.problems:  # values behind a foreign tag cannot be read at all
        raise _Skip
    top = _mapping(loc, root, "the config")
    locations = {}
    for key, (key_node, _) in top.items():
        with loc.each():
            if key not in TOP_KEYS:
                loc.fail(f"unknown key '{key}' (known: {', '.join(sorted(TOP_KEYS))})", key_node)
            locations[key] = loc.at(top[key][1])
    if "models" not in top:
        with loc.each():
            loc.fail("'models' is required")

    from qcal.families import canonical_model_name

    models = []
    with loc.each():
        for node in _sequence(loc, top["models"][1], "models") if "models" in top else ():
            with loc.each():
                name = str(_scalar(loc, node))
                try:
                    canonical = canonical_model_name(name, base_dir=path.parent)
                except UsageProblem as exc:
                    loc.fail(str(exc), node)
                if canonical in models:  # its results would be one model's, twice
                    loc.fail(f"model {name} is listed twice", node)
                models.append(canonical)
                locations[f"models[{len(models) - 1}]"] = loc.at(node)

    data = {}
    with loc.each():
        for key, (key_node, value_node) in (_mapping(loc, top["data"][1], "data").items()
                                            if "data" in top else ()):
            with loc.each():
                if key in PREPROCESSING_KEYS:
                    value = _scalar(loc, value_node) if isinstance(value_node, yaml.ScalarNode) \
                        else yaml.safe_load(yaml.serialize(value_node))  # mean/std: a list
                    if value is not None:
                        try:
                            data[key] = coerce(key, value)
                        except UsageProblem as exc:
                            loc.fail(f"data.{exc}", value_node)
                        locations[f"data.{key}"] = loc.at(value_node)
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
                if key == "calib_range" and value is not None:
                    try:
                        start, stop = parse_range(value)
                    except UsageProblem as exc:
                        loc.fail(f"data.calib_range: {exc}", value_node)
                    if not 0 <= start < stop:
                        loc.fail(f"data.calib_range needs 0 <= START < STOP, not {value}",
                                 value_node)
                if key in ("data", "calib_data", "fidelity_data") and value is not None:
                    resolved = _existing_path(path, value)
                    if resolved is None:
                        loc.fail(f"data.{key}: {value} does not exist", value_node)
                    value = str(resolved)
                data[key] = value
                locations[f"data.{key}"] = loc.at(value_node)

    def integer(key, default, minimum):
        if key not in top:
            return default
        value = _scalar(loc, top[key][1])
        if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
            loc.fail(f"{key} must be an integer >= {minimum}, not {value!r}", top[key][1])
        return value

    def boolean(key, default):
        if key not in top:
            return default
        value = _scalar(loc, top[key][1])
        if not isinstance(value, bool):
            loc.fail(f"{key} must be true or false, not {value!r}", top[key][1])
        return value

    batch_size, seed, float32, pretrained = DEFAULT_BATCH_SIZE, 0, True, False
    with loc.each():
        batch_size = integer("batch_size", DEFAULT_BATCH_SIZE, 1)
    with loc.each():
        seed = integer("seed", 0, 0)
    with loc.each():
        float32 = boolean("float32", True)
    with loc.each():
        pretrained = boolean("pretrained", False)
    verify_images = DEFAULT_VERIFY_IMAGES
    with loc.each():
        verify_images = integer("verify_images", DEFAULT_VERIFY_IMAGES, 0)
    calib_repeats = 1
    with loc.each():
        calib_repeats = integer("calib_repeats", 1, 1)
    keep_logits = False
    with loc.each():
        keep_logits = boolean("keep_logits", False)

    sections = {}
    for section in COMMAND_SECTIONS:
        if section not in top:
            continue
        with loc.each():
            values = sections.setdefault(section, {})
            for key, (key_node, value_node) in _mapping(loc, top[section][1], section).items():
                values[key] = yaml.safe_load(yaml.serialize(value_node))  # tags checked above
                locations[f"{section}.{key}"] = loc.at(key_node)

    variants = []
    if "grid" in top:
        with loc.each():
            grid_node = top["grid"][1]
            axes = []
            for key, (key_node, value_node) in _mapping(loc, grid_node, "grid").items():
                with loc.each():
                    if key not in OPTION_KEYS:
                        loc.fail(f"unknown grid key '{key}' (known: "
                                 f"{', '.join(sorted(OPTION_KEYS))})", key_node)
                    values = []
                    for n in _sequence(loc, value_node, f"grid.{key}"):
                        with loc.each():  # a bad value is reported at its own line
                            value = _scalar(loc, n)
                            _options(loc, {key: value}, n)
                            values.append(value)
                    axes.append((key, values))
            try:
                variants.extend(expand_variants({key: values for key, values in axes
                                                 if values}))
            except UsageProblem as exc:  # a combination no single value rules out
                loc.fail(str(exc), grid_node)
    if "variants" in top:
        with loc.each():
            for node in _sequence(loc, top["variants"][1], "variants"):
                with loc.each():
                    fields_ = _mapping(loc, node, "a variant")
                    values = {}
                    for key, (key_node, value_node) in fields_.items():
                        with loc.each():
                            if key not in OPTION_KEYS:
                                loc.fail(f"unknown variant key '{key}' (known: "
                                         f"{', '.join(sorted(OPTION_KEYS))})", key_node)
                            values[key] = _scalar(loc, value_node)
                    variants.append(_options(loc, values, node))
    if not variants and not float32 and not loc.problems:
        with loc.each():
            loc.fail("nothing to run: no grid, no variants and float32: false")
    unique = tuple(dict.fromkeys(variants))
    name = path.stem
    if "name" in top:
        with loc.each():
            given = str(_scalar(loc, top["name"][1]))
            if not given or "/" in given or given in (".", ".."):
                loc.fail(f"name must be a folder name (no '/'), not {given!r}", top["name"][1])
            name = given
    raw = {}
    if not loc.problems:
        raw = yaml.safe_load(text)  # every node was read above: this cannot fail
    return SweepConfig(name=name, models=tuple(models), data=data, batch_size=batch_size,
                       seed=seed, float32=float32, pretrained=pretrained, variants=unique,
                       verify_images=verify_images, calib_repeats=calib_repeats,
                       keep_logits=keep_logits, source_path=str(path), raw=raw,
                       locations=locations, sections=sections)
