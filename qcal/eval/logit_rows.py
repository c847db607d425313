"""Evaluate stage, per-image logits on disk: written and read a batch at a time, never all held.

The fidelity metrics of an int8 variant compare its logits with float32's on the same images
(``qcal.eval.fidelity``). At 50,000 ImageNet images a logits array is 200 MB, so float32's are
written to an ``.npy`` file as the batches come (``LogitsWriter``) and read back in the same order
while a variant runs (``LogitsReader``), and the variant's own logits go straight into a
``FidelityAccumulator``: memory stays one batch (plus one pass of the accumulator) whatever the
number of images. Plain reads and writes, not ``np.memmap``: mapped pages count as resident
memory once touched.

The file is a standard ``.npy`` (version 1.0 header, float32, C order), so ``np.load`` reads it;
bytes after the array (a ``qcal.files`` check record) are ignored.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

DTYPE = np.dtype("<f4")


class LogitsWriter:
    """``rows`` x classes float32 logits written to ``path`` in order, batch by batch."""

    def __init__(self, path, rows: int):
        self.path, self.rows = Path(path), rows
        self.written = 0
        self.classes = None
        self._file = open(self.path, "wb")

    def write(self, logits: np.ndarray):
        logits = np.ascontiguousarray(logits, dtype=DTYPE)
        if self.classes is None:
            self.classes = logits.shape[1]
            np.lib.format.write_array_header_1_0(self._file, {
                "descr": np.lib.format.dtype_to_descr(DTYPE), "fortran_order": False,
                "shape": (self.rows, self.classes)})
        if logits.shape[1:] != (self.classes,) or self.written + len(logits) > self.rows:
            raise ValueError(f"logits of shape {logits.shape} after {self.written} of "
                             f"{self.rows} rows of {self.classes} classes")
        self._file.write(logits.tobytes())
        self.written += len(logits)

    def close(self, complete: bool = True):
        """Close the file; ``complete``: check that every row was written (an evaluation that
        stopped early closes without the check, and its file is not kept)."""
        self._file.close()
        if complete and self.written != self.rows:
            raise ValueError(f"{self.written} rows of logits written, {self.rows} expected")


class LogitsReader:
    """Rows of an ``.npy`` logits file (``LogitsWriter``'s), read in order: ``take(n)``."""

    def __init__(self, path):
        self._file = open(path, "rb")
        version = np.lib.format.read_magic(self._file)
        read_header = (np.lib.format.read_array_header_1_0 if version == (1, 0)
                       else np.lib.format.read_array_header_2_0)
        shape, fortran, dtype = read_header(self._file)
        if fortran or dtype != DTYPE or len(shape) != 2:
            self._file.close()
            raise ValueError(f"{path}: not a C-order float32 rows x classes array")
        self.rows, self.classes = shape
        self.taken = 0

    def take(self, count: int) -> np.ndarray:
        if self.taken + count > self.rows:
            raise ValueError(f"{count} rows asked after {self.taken} of {self.rows}")
        data = self._file.read(count * self.classes * DTYPE.itemsize)
        if len(data) != count * self.classes * DTYPE.itemsize:
            raise ValueError("the logits file is shorter than its header says")
        self.taken += count
        return np.frombuffer(data, DTYPE).reshape(count, self.classes)

    def close(self):
        self._file.close()


class ArrayRows:
    """An array in memory read like a ``LogitsReader`` (float32 logits saved inside a results
    folder's ``.npz`` by qcal versions before the logits files)."""

    def __init__(self, array: np.ndarray):
        self.array = array
        self.rows = len(array)
        self.taken = 0

    def take(self, count: int) -> np.ndarray:
        if self.taken + count > self.rows:
            raise ValueError(f"{count} rows asked after {self.taken} of {self.rows}")
        self.taken += count
        return self.array[self.taken - count:self.taken]

    def close(self):
        pass
