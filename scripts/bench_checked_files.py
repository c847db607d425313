#!/usr/bin/env python
"""What checking qcal's files costs: the batch cache read of the embedded demo, with and without
the check, and the check of a library the size of resnet50_v1's int8 one.

    python scripts/bench_checked_files.py            # about 20 s here

* The demo's evaluation batches (Fashion-MNIST t10k, 10,000 images of 1x32x32 float32, batch 64:
  157 files, 40 MB) are written once into a scratch batch cache; then every round reads all of
  them twice, alternating: ``np.load`` of each file (the reader before files were checked; it
  stops at the array's end and never sees the check line) and ``BatchCache.load`` (read, sha256,
  parse). The page cache is warm for both; the median round counts.
* ``verify_checked`` on a 47 MB checked file (resnet50_v1's int8 library is about that size),
  the check a compiled library passes before it is loaded.
"""
from __future__ import annotations

import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcal.data.cache import BatchCache, iter_batches  # noqa: E402
from qcal.data.plan import Selection  # noqa: E402
from qcal.data.sources import FashionMNISTSource  # noqa: E402
from qcal.files import verify_checked, write_checked  # noqa: E402

BATCH = 64
ROUNDS = 7
LIBRARY_MB = 47


def main():
    with tempfile.TemporaryDirectory(prefix="qcal-bench-checked-") as scratch:
        folder = Path(scratch) / "batches"
        source = FashionMNISTSource("t10k")
        selection = Selection(source, 0, len(source.labels))
        cache = BatchCache(folder)
        for _ in iter_batches(selection, BATCH, cache):
            pass
        files = sorted(folder.glob("*.npy"))
        megabytes = sum(p.stat().st_size for p in files) / 2 ** 20
        source.decode = None  # every batch below comes from the cache

        def unchecked():
            for path in files:
                np.load(path)

        def checked():
            for _ in iter_batches(selection, BATCH, cache):
                pass

        times = {"np.load, unchecked": [], "BatchCache.load, checked": []}
        for _ in range(ROUNDS):
            for name, read in zip(times, (unchecked, checked)):
                start = time.perf_counter()
                read()
                times[name].append(time.perf_counter() - start)
        print(f"batch cache read of the demo's evaluation split: {len(selection)} images, "
              f"{len(files)} files, {megabytes:.0f} MB, median of {ROUNDS} rounds")
        for name, seconds in times.items():
            print(f"  {name:26s} {statistics.median(seconds):.3f} s")

        library = Path(scratch) / "library.so"
        write_checked(library, os.urandom(LIBRARY_MB * 2 ** 20), "compiled library", "k")
        seconds = []
        for _ in range(ROUNDS):
            start = time.perf_counter()
            verify_checked(library, "compiled library", "k")
            seconds.append(time.perf_counter() - start)
        print(f"verify_checked of a {LIBRARY_MB} MB library: {statistics.median(seconds):.3f} s")
    print(f"load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
