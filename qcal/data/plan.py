"""Load stage, data plan: which images a model is evaluated and calibrated on, never overlapping.

A ``Selection`` is the positions [start, stop) of one source's fixed order; a ``DataPlan`` holds the
evaluated images, the calibration images (disjoint from them) and optional label-free images for
the fidelity metrics.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from qcal.config import DEFAULT_CALIB_IMAGES
from qcal.data.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from qcal.data.sources import AugmentedSource, DecodedImageSource, ImageSource, SubsetSource, open_source
from qcal.errors import UsageProblem


class DataProblem(UsageProblem):
    """A data option that the data cannot satisfy: ``key`` (a data key: num_images, calib_range,
    ...) and its ``value`` say which, so that a message can name where it was given (an option, or
    a sweep file's line)."""

    def __init__(self, key: str, value, reason: str):
        self.key, self.value, self.reason = key, value, reason
        super().__init__(f"{key} {value}: {reason}")


def source_name(source: ImageSource) -> str:
    """A source as messages name it: its kind and where it lives."""
    identity = source.identity
    while "base" in identity:  # subsets and crops of another source
        identity = identity["base"]
    where = identity.get("path")
    return f"{source.kind} source {where}" if where else f"{source.kind} source"


@dataclass(frozen=True)
class Selection:
    """Which images of which source a stage uses: the positions [start, stop) of its fixed order."""

    source: ImageSource
    start: int
    stop: int

    def __post_init__(self):
        n = len(self.source)
        if not 0 <= self.start < self.stop <= n:
            raise UsageProblem(f"image range {self.start}:{self.stop} is outside the "
                               f"{n} images of the {source_name(self.source)}")

    @property
    def indices(self):
        return np.arange(self.start, self.stop)

    def __len__(self):
        return self.stop - self.start

    def describe(self):
        return {**self.source.describe(), "range": [self.start, self.stop]}


def check_disjoint(calibration: Selection, evaluation: Selection, key: str = "calib_range",
                   value=None):
    """qcal never calibrates on an image it evaluates (gluoncv's script calibrates on its eval split).

    ``key`` and ``value`` name the option that chose the calibration images (for the message)."""
    if calibration.source.identity != evaluation.source.identity:
        return
    lo = max(calibration.start, evaluation.start)
    hi = min(calibration.stop, evaluation.stop)
    if lo < hi:
        raise DataProblem(
            key, f"{calibration.start}:{calibration.stop}" if value is None else value,
            f"calibration images {calibration.start}:{calibration.stop} overlap the evaluated images "
            f"{evaluation.start}:{evaluation.stop} of the same source ({hi - lo} shared); choose "
            f"a disjoint calibration range, fewer images, or separate calibration data")


def parse_range(text: str) -> tuple:
    """'START:STOP' -> (start, stop)."""
    try:
        start, stop = (int(v) for v in str(text).split(":"))
    except ValueError:
        raise UsageProblem(f"image range must look like START:STOP, not '{text}'") from None
    return start, stop


@dataclass(frozen=True)
class DataPlan:
    evaluation: Selection
    calibration: Selection | None  # None when only float32 is evaluated
    fidelity: Selection | None = None  # extra label-free images for fidelity metrics

    def describe(self):
        return {"evaluation": self.evaluation.describe(),
                "calibration": self.calibration.describe() if self.calibration else None,
                "fidelity": self.fidelity.describe() if self.fidelity else None}


def plan_data(eval_source: ImageSource, default_calib: ImageSource | None = None, num_images=None,
              calib_data=None, calib_range=None, calib_images=None,
              preprocessing: Preprocessing = IMAGENET_PREPROCESSING, calibrate: bool = True,
              fidelity_data=None, fidelity_crops=None, fidelity_seed: int = 0,
              calib_crops=None) -> DataPlan:
    """Choose the evaluated images of ``eval_source`` and the (disjoint) calibration images.

    Calibration comes from ``calib_data``, or a ``calib_range`` of the evaluation source, or the
    model's ``default_calib`` source (the embedded models' split held out of training), or else
    the last ``calib_images`` images of the evaluation source.
    """
    n_eval = len(eval_source) if num_images is None else num_images
    if n_eval > len(eval_source):
        raise DataProblem("num_images", n_eval, f"exceeds the {len(eval_source)} images of the "
                                                f"{source_name(eval_source)}")
    evaluation = Selection(eval_source, 0, n_eval)
    fidelity = None
    if fidelity_crops:
        base = open_source(fidelity_data, preprocessing) if fidelity_data else eval_source
        if not isinstance(base, DecodedImageSource):
            raise DataProblem("fidelity_crops", fidelity_crops,
                              f"random crops need a source of photos (class folder or .rec), "
                              f"not the {source_name(base)}")
        fidelity = Selection(AugmentedSource(base, fidelity_crops, fidelity_seed), 0,
                             fidelity_crops)
    if not calibrate:
        return DataPlan(evaluation, None, fidelity)

    if calib_data is not None:
        calib_source = open_source(calib_data, preprocessing)
    elif calib_range is None and default_calib is not None:
        calib_source = default_calib
    else:
        calib_source = eval_source
    if calib_range is not None:
        start, stop = parse_range(calib_range) if isinstance(calib_range, str) else calib_range
        if not 0 <= start < stop <= len(calib_source):
            raise DataProblem("calib_range", f"{start}:{stop}",
                              f"outside the {len(calib_source)} images of the "
                              f"{source_name(calib_source)}")
        key, value = "calib_range", f"{start}:{stop}"
    else:
        if calib_images is not None and calib_images > len(calib_source):
            raise DataProblem("calib_images", calib_images,
                              f"exceeds the {len(calib_source)} images of the "
                              f"{source_name(calib_source)}")
        count = calib_images or min(len(calib_source), DEFAULT_CALIB_IMAGES)
        start, stop = (0, count) if calib_source is not eval_source else (
            len(calib_source) - count, len(calib_source))
        # the option that left no room for calibration images, for the message
        if calib_images is not None:
            key, value = "calib_images", calib_images
        elif num_images is not None:
            key, value = "num_images", num_images
        else:
            key, value = "data", eval_source.describe().get("path", "")
    calibration = Selection(calib_source, start, stop)
    if calib_crops:  # random crops of the chosen calibration images (few photos, many views)
        if not isinstance(calib_source, DecodedImageSource):
            raise DataProblem("calib_crops", calib_crops,
                              f"calibration crops need a source of photos (class folder or "
                              f".rec), not the {source_name(calib_source)}")
        check_disjoint(calibration, evaluation, key, value)
        crops = AugmentedSource(SubsetSource(calib_source, start, stop), calib_crops,
                                fidelity_seed + 1)
        calibration = Selection(crops, 0, calib_crops)
    check_disjoint(calibration, evaluation, key, value)
    return DataPlan(evaluation, calibration, fidelity)
