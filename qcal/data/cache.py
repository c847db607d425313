"""Load stage, batch cache: preprocessed batches on disk, so that a sweep decodes each image once.

Batches are ``.npy`` files keyed by the source's identity, the indices and the preprocessing,
each a checked file (``qcal.files``): a batch whose check fails is reported, removed and decoded
again, never used.
"""
from __future__ import annotations

import hashlib
import io
import json
import math
from pathlib import Path

import numpy as np

from qcal.data.plan import Selection
from qcal.data.sources import ImageSource
from qcal.errors import stop_if_interrupted
from qcal.files import checked_open, load_checked

CHECK_KIND = "decoded batch"
# In the key: batches cached before they were checked files are never looked up (each would
# otherwise be reported as damaged once); the cache folder can be deleted at any time.
CACHE_FORMAT = "checked-npy"


def _parse_npy(payload) -> np.ndarray:
    """The array of an ``.npy`` payload: a view of the bytes that were checked, not a copy."""
    stream = io.BytesIO(bytes(payload[:1 << 16]))  # the header; the data are not copied
    read_header = {(1, 0): np.lib.format.read_array_header_1_0,
                   (2, 0): np.lib.format.read_array_header_2_0}[np.lib.format.read_magic(stream)]
    shape, fortran_order, dtype = read_header(stream)
    if dtype.hasobject:
        raise ValueError("object arrays are never cached")
    count = math.prod(shape)
    if stream.tell() + count * dtype.itemsize != len(payload):
        raise ValueError(f"{len(payload)} bytes for an array of {shape} {dtype}")
    array = np.frombuffer(payload, dtype=dtype, count=count, offset=stream.tell())
    return array.reshape(shape, order="F" if fortran_order else "C")


class BatchCache:
    """Preprocessed batches on disk, one ``.npy`` per (source, indices, preprocessing)."""

    def __init__(self, directory: Path | None):
        self.directory = Path(directory) if directory else None

    def key(self, source: ImageSource, indices) -> str:
        payload = json.dumps({"format": CACHE_FORMAT, "source": source.describe(),
                              "indices": [int(indices[0]), int(indices[-1]), len(indices)]},
                             sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:24]

    def load(self, source: ImageSource, indices) -> np.ndarray:
        indices = np.asarray(indices)
        contiguous = len(indices) and np.array_equal(indices, np.arange(indices[0],
                                                                        indices[0] + len(indices)))
        if self.directory is None or not contiguous:
            return source.decode(indices)
        key = self.key(source, indices)
        path = self.directory / f"{key}.npy"
        batch = load_checked(path, CHECK_KIND, key, _parse_npy, "decoding the images again")
        if batch is not None:
            return batch
        batch = source.decode(indices)
        with checked_open(path, CHECK_KIND, key) as f:
            np.save(f, batch)
        return batch


def iter_batches(selection: Selection, batch_size: int, cache: BatchCache | None = None):
    """(images, labels) batches in order; the last batch may be short and is never padded here."""
    cache = cache or BatchCache(None)
    labels = selection.source.labels
    for lo in range(selection.start, selection.stop, batch_size):
        stop_if_interrupted()
        idx = np.arange(lo, min(lo + batch_size, selection.stop))
        yield cache.load(selection.source, idx), labels[idx]


class ImageBatches:
    """The images of ``iter_batches``, read lazily each time it is iterated: a pass over many
    batches holds one at a time, whatever the size of the selection. ``len`` is the number of
    batches (for progress bars)."""

    def __init__(self, selection: Selection, batch_size: int, cache: BatchCache | None = None):
        self.selection, self.batch_size, self.cache = selection, batch_size, cache

    def __len__(self) -> int:
        return math.ceil(len(self.selection) / self.batch_size)

    def __iter__(self):
        for images, _ in iter_batches(self.selection, self.batch_size, self.cache):
            yield images
