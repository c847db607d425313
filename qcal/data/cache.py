"""Load stage, batch cache: preprocessed batches on disk, so that a sweep decodes each image once.

Batches are ``.npy`` files keyed by the source's identity, the indices and the preprocessing.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from qcal.data.plan import Selection
from qcal.data.sources import ImageSource
from qcal.files import atomic_open


class BatchCache:
    """Preprocessed batches on disk, one ``.npy`` per (source, indices, preprocessing)."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory else None

    def key(self, source: ImageSource, indices) -> str:
        payload = json.dumps({"source": source.describe(),
                              "indices": [int(indices[0]), int(indices[-1]), len(indices)]},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def load(self, source: ImageSource, indices) -> np.ndarray:
        indices = np.asarray(indices)
        contiguous = len(indices) and np.array_equal(indices, np.arange(indices[0],
                                                                        indices[0] + len(indices)))
        if self.directory is None or not contiguous:
            return source.decode(indices)
        path = self.directory / f"{self.key(source, indices)}.npy"
        if path.is_file():
            return np.load(path)
        batch = source.decode(indices)
        with atomic_open(path) as f:
            np.save(f, batch)
        return batch


def iter_batches(selection: Selection, batch_size: int, cache: BatchCache | None = None):
    """(images, labels) batches in order; the last batch may be short and is never padded here."""
    cache = cache or BatchCache(None)
    labels = selection.source.labels
    for lo in range(selection.start, selection.stop, batch_size):
        idx = np.arange(lo, min(lo + batch_size, selection.stop))
        yield cache.load(selection.source, idx), labels[idx]
