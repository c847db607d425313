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

    def problems(self, channels: int = 3) -> list:
        """(field, value, reason) for each value that would make every image meaningless: a std
        of zero divides by zero, a mean or std of the wrong length is refused by MXNet mid-run
        (one value for all channels, or one per channel of the decoded RGB images)."""
        found = []
        for name in ("mean", "std"):
            values = getattr(self, name)
            text = ",".join(f"{v:g}" if isinstance(v, (int, float)) else repr(v) for v in values)
            if len(values) not in (1, channels):
                found.append((name, text, f"needs 1 or {channels} values (one per channel), "
                                          f"not {len(values)}"))
            elif not all(isinstance(v, (int, float)) and math.isfinite(v) for v in values):
                found.append((name, text, "needs finite numbers"))
            elif name == "std" and min(values) <= 0:
                found.append((name, text, "must be > 0 for every channel (images are divided "
                                          "by it)"))
        return found


IMAGENET_PREPROCESSING = Preprocessing()
