"""Load stage, preprocessing: how an encoded image becomes the float32 C x H x W a model takes.

Preprocessing is MXNet's own transforms (``Resize(keep_ratio)`` of the short side to
``ceil(size / crop_ratio)``, ``CenterCrop``, ``ToTensor``, ``Normalize``), as gluoncv's
``verify_pretrained.py`` does.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Preprocessing:
    """Resize-short-side, centre crop and per-channel normalisation (mean/std on a 0..1 scale)."""

    input_size: int = 224
    crop_ratio: float = 0.875
    mean: tuple = (0.485, 0.456, 0.406)
    std: tuple = (0.229, 0.224, 0.225)

    @property
    def resize(self) -> int:
        return int(math.ceil(self.input_size / self.crop_ratio))

    def to_dict(self):
        return asdict(self)


IMAGENET_PREPROCESSING = Preprocessing()
