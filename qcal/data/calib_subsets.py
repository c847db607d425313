"""Load stage, calibration subsets: R calibration sets of the same size, to measure how much a
result owes to the particular calibration images (``--calib-repeats R``).

From the plan's calibration selection (N images) and the images around it that the evaluation does
not use (the *pool*), in this order of preference:

- ``disjoint``: R non-overlapping blocks of N consecutive images of the pool, the first being the
  plan's own calibration images (so subset 0 is the run without repeats, and reuses its results);
- ``bootstrap``: when the pool holds fewer than R * N images, R draws of N images with replacement
  from the whole pool (Efron and Tibshirani, *An Introduction to the Bootstrap*, 1993, ch. 6), each
  from its own generator ``(seed, r)``;
- ``crops``: calibration on random crops of a few photos (``calib_crops``): subset r is a fresh set
  of N crops of the same photos, crop seed ``seed + r`` (the photos cannot be split further).

Every subset is a ``Selection`` whose description names its images, so a result's cache key
includes the subset it was calibrated on.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from qcal.data.plan import Selection
from qcal.data.sources import AugmentedSource, ImageSource
from qcal.errors import UsageProblem

SUBSET_KINDS = ("disjoint", "bootstrap", "crops")


class ResampledSource(ImageSource):
    """The images of ``base`` at ``positions`` (repeats allowed), in that order: one bootstrap
    draw as a source of its own."""

    kind = "resample"

    def __init__(self, base: ImageSource, positions, seed: int, draw: int):
        self.base = base
        self.positions = np.asarray(positions, dtype=np.int64)
        self.seed, self.draw = seed, draw

    def __len__(self):
        return len(self.positions)

    @property
    def labels(self):
        return np.asarray(self.base.labels)[self.positions]

    def decode(self, indices):
        return self.base.decode(self.positions[np.asarray(indices, dtype=np.int64)])

    def raw(self, index: int) -> tuple:
        return self.base.raw(int(self.positions[int(index)]))

    @property
    def identity(self):
        digest = hashlib.sha256(self.positions.tobytes()).hexdigest()[:16]
        return {"base": self.base.identity, "seed": self.seed, "draw": self.draw,
                "images": len(self.positions), "positions_sha256": digest}

    @property
    def preprocessing(self):
        return self.base.preprocessing


@dataclass(frozen=True)
class CalibrationSubsets:
    kind: str  # one of SUBSET_KINDS
    subsets: tuple  # of Selection, subset 0 first
    pool: tuple  # (start, stop) of the positions drawn from ((0, photos) for crops)
    seed: int

    def describe(self) -> dict:
        return {"kind": self.kind, "repeats": len(self.subsets), "images": len(self.subsets[0]),
                "pool": list(self.pool), "seed": self.seed}

    @property
    def label(self) -> str:
        return f"{len(self.subsets)} {self.kind}"


def _pool(calibration: Selection, evaluation: Selection | None) -> tuple:
    """The largest run of positions around ``calibration`` that the evaluation does not use."""
    lo, hi = 0, len(calibration.source)
    if evaluation is not None and calibration.source.identity == evaluation.source.identity:
        if calibration.start >= evaluation.stop:
            lo = evaluation.stop
        elif calibration.stop <= evaluation.start:
            hi = evaluation.start
    return lo, hi


def calibration_subsets(calibration: Selection, evaluation: Selection | None, repeats: int,
                        seed: int = 0) -> CalibrationSubsets:
    """``repeats`` calibration selections of ``len(calibration)`` images each (module docstring)."""
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise UsageProblem(f"calib_repeats must be an integer >= 1, not {repeats!r}")
    source, count = calibration.source, len(calibration)
    if isinstance(source, AugmentedSource):
        subsets = tuple(calibration if r == 0 else Selection(
            AugmentedSource(source.base, source.count, source.seed + r), calibration.start,
            calibration.stop) for r in range(repeats))
        return CalibrationSubsets("crops", subsets, (0, len(source.base)), source.seed)
    lo, hi = _pool(calibration, evaluation)
    starts = [calibration.start + k * count for k in range(repeats)
              if calibration.start + (k + 1) * count <= hi]
    starts += [calibration.start - k * count for k in range(1, repeats)
               if calibration.start - k * count >= lo]
    if len(starts) >= repeats:
        subsets = tuple(Selection(source, s, s + count) for s in starts[:repeats])
        return CalibrationSubsets("disjoint", subsets, (lo, hi), seed)
    subsets = []
    for r in range(repeats):
        positions = np.sort(np.random.default_rng([seed, r]).integers(lo, hi, count))
        subsets.append(Selection(ResampledSource(source, positions, seed, r), 0, count))
    return CalibrationSubsets("bootstrap", tuple(subsets), (lo, hi), seed)
