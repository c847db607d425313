"""Load stage, preprocessing: how an encoded image becomes the float32 C x H x W a model takes.

A small declared pipeline, applied in this order to each decoded image:

1. decode to ``channels`` (1: grey; 3: RGB, a grey image repeated to three channels);
2. bring it to the crop size ``input_size - 2 * pad``: ``resize: short`` resizes the short side to
   ``ceil(crop / crop_ratio)`` and centre-crops (gluoncv's ``verify_pretrained.py``; MXNet's own
   ``Resize(keep_ratio)`` and ``CenterCrop``), ``exact`` resizes to crop x crop (aspect not kept),
   ``none`` only centre-crops (an image smaller than the crop is refused);
3. pad ``pad`` pixels on every side with ``pad_value`` (on the 0..255 pixel scale);
4. scale pixels to 0..``scale`` (1: ``ToTensor``'s 0..1; 255: raw pixel values);
5. subtract ``mean`` and divide by ``std`` per channel, both on that same 0..``scale`` scale.

``PREPROCESSING_FIELDS`` is the one definition of these keys: the CLI's options, the sweep YAML's
``data`` keys and the preprocessing file saved beside a model (``NAME.preprocess.json``) are all
made from it and checked by ``coerce``.
"""
from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import numpy as np

from qcal.errors import QcalError, UsageProblem

RESIZE_MODES = ("short", "exact", "none")


@dataclass(frozen=True)
class PreprocessingField:
    """One preprocessing key: its kind, bounds and the help both the CLI and docs show."""

    key: str
    kind: str  # "int", "float", "choice" or "channels" (comma-separated numbers / a list)
    help: str
    minimum: float | None = None
    maximum: float | None = None
    choices: tuple = ()

    @property
    def option(self) -> str:
        return "--" + self.key.replace("_", "-")


PREPROCESSING_FIELDS = (
    PreprocessingField("input_size", "int", "Image size the model takes, after any --pad "
                       "(default: what the model declares, else 224).", minimum=8),
    PreprocessingField("crop_ratio", "float", "With --resize short: resize the short side to "
                       "crop/ratio before the centre crop (default 0.875).", minimum=0.1, maximum=1.0),
    PreprocessingField("resize", "choice", "short: short side to crop/ratio, then centre crop; "
                       "exact: to crop x crop; none: centre crop only (default short).",
                       choices=RESIZE_MODES),
    PreprocessingField("pad", "int", "Pixels of padding on every side after the crop, e.g. 28x28 "
                       "images with --input-size 32 --pad 2 (default 0).", minimum=0),
    PreprocessingField("pad_value", "float", "Value of padded pixels on the 0..255 scale "
                       "(default 0).", minimum=0, maximum=255),
    PreprocessingField("channels", "choice", "1: decode grey; 3: RGB, grey repeated to three "
                       "(default: the model's input channels).", choices=(1, 3)),
    PreprocessingField("scale", "choice", "Pixels on 0..1 or 0..255 before mean/std, which are "
                       "on the same scale (default 1).", choices=(1, 255)),
    PreprocessingField("mean", "channels", "Per-channel mean, one value or one per channel "
                       "(default ImageNet's, or what the model declares)."),
    PreprocessingField("std", "channels", "Per-channel std (default ImageNet's, or what the model "
                       "declares)."),
)
PREPROCESSING_KEYS = tuple(f.key for f in PREPROCESSING_FIELDS)
_FIELDS = {f.key: f for f in PREPROCESSING_FIELDS}


def coerce(key: str, value):
    """``value`` (from the CLI, YAML or a preprocessing file) as ``key`` takes it; a
    ``UsageProblem`` saying what is wrong otherwise."""
    spec = _FIELDS.get(key)
    if spec is None:
        raise UsageProblem(f"unknown preprocessing key '{key}' (known: {', '.join(PREPROCESSING_KEYS)})")
    if spec.kind == "channels":
        if isinstance(value, str):
            value = value.split(",")
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = [value]
        try:
            numbers = tuple(float(v) for v in value)
        except (TypeError, ValueError):
            raise UsageProblem(f"{key} must be comma-separated numbers, not {value!r}") from None
        if not numbers:
            raise UsageProblem(f"{key} needs at least one number")
        return numbers
    if spec.kind == "choice":
        for choice in spec.choices:
            if str(value) == str(choice) or (not isinstance(value, (bool, str))
                                             and isinstance(choice, int) and value == choice):
                return choice
        raise UsageProblem(f"{key} must be one of {', '.join(map(str, spec.choices))}, not {value!r}")
    convert = int if spec.kind == "int" else float
    try:
        if isinstance(value, bool) or (spec.kind == "int" and isinstance(value, float)
                                       and not value.is_integer()):
            raise ValueError
        number = convert(value)
    except (TypeError, ValueError):
        raise UsageProblem(f"{key} must be {'an integer' if spec.kind == 'int' else 'a number'}, "
                           f"not {value!r}") from None
    if spec.minimum is not None and number < spec.minimum:
        raise UsageProblem(f"{key} must be at least {spec.minimum:g}, not {number:g}")
    if spec.maximum is not None and number > spec.maximum:
        raise UsageProblem(f"{key} must be at most {spec.maximum:g}, not {number:g}")
    return number


def coerce_all(values: dict, where: str = "") -> dict:
    """Every key of ``values`` coerced; unknown keys are errors, named with ``where``."""
    out = {}
    for key, value in values.items():
        try:
            out[key] = coerce(key, value)
        except UsageProblem as exc:
            raise UsageProblem(f"{where}: {exc}" if where else str(exc)) from None
    return out


@dataclass(frozen=True)
class Preprocessing:
    """The declared pipeline (see the module docstring); mean/std on the 0..``scale`` scale."""

    input_size: int = 224
    crop_ratio: float = 0.875
    resize: str = "short"
    pad: int = 0
    pad_value: float = 0.0
    channels: int = 3
    scale: int = 1
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    def __post_init__(self):
        for f in fields(self):
            object.__setattr__(self, f.name, coerce(f.name, getattr(self, f.name)))
        if self.crop_size < 1:
            raise UsageProblem(f"pad {self.pad} leaves nothing of a {self.input_size}-pixel image")
        for key in ("mean", "std"):
            if len(getattr(self, key)) not in (1, self.channels):
                raise UsageProblem(f"{key} has {len(getattr(self, key))} values for "
                                   f"{self.channels} channel(s)")
        for key in ("mean", "std"):  # nan or inf would make every image meaningless
            if not all(math.isfinite(v) for v in getattr(self, key)):
                raise UsageProblem(f"{key} must be finite numbers, not {getattr(self, key)}")
        if any(s <= 0 for s in self.std):
            raise UsageProblem(f"std must be positive, not {self.std}")

    @property
    def crop_size(self) -> int:
        return self.input_size - 2 * self.pad

    @property
    def resize_to(self) -> int:
        """With ``resize: short``: the short side before the centre crop."""
        return int(math.ceil(self.crop_size / self.crop_ratio))

    def to_dict(self):
        return asdict(self)

    def apply(self, image, what: str = "image") -> np.ndarray:
        """A decoded HWC uint8 MXNet NDArray (``channels`` channels) -> float32 C x H x W."""
        from mxnet.gluon.data.vision import transforms

        crop = self.crop_size
        if self.resize == "short":
            image = transforms.CenterCrop(crop)(transforms.Resize(self.resize_to, keep_ratio=True)(image))
        elif self.resize == "exact":
            image = transforms.Resize((crop, crop), keep_ratio=False)(image)
        else:
            h, w = image.shape[:2]
            if h < crop or w < crop:
                raise QcalError(f"{what} is {h}x{w}, smaller than the {crop}x{crop} crop "
                                f"(resize: none); choose --resize short or exact, or a smaller "
                                f"--input-size/--pad")
            y0, x0 = (h - crop) // 2, (w - crop) // 2
            image = image[y0:y0 + crop, x0:x0 + crop]
        pixels = image.asnumpy()
        if self.pad:
            p = self.pad
            pixels = np.pad(pixels.astype(np.float32), ((p, p), (p, p), (0, 0)),
                            constant_values=self.pad_value)
        x = pixels.astype(np.float32)
        if self.scale == 1:
            x = x / np.float32(255.0)
        x = (x - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return np.ascontiguousarray(x.transpose(2, 0, 1), dtype=np.float32)


IMAGENET_PREPROCESSING = Preprocessing()


def preprocessing_file(stem: Path) -> Path:
    """The preprocessing file saved beside a model named ``stem`` (``NAME.preprocess.json``)."""
    return Path(f"{stem}.preprocess.json")


def read_preprocessing_file(path: Path) -> dict:
    """The preprocessing keys a model's ``NAME.preprocess.json`` declares ({} when absent)."""
    path = Path(path)
    if not path.is_file():
        return {}
    try:
        values = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise QcalError(f"cannot read preprocessing file {path}: {exc}") from None
    if not isinstance(values, dict):
        raise QcalError(f"{path} must hold a JSON object of preprocessing keys")
    try:
        return coerce_all(values, str(path))
    except UsageProblem as exc:
        raise QcalError(str(exc)) from None
