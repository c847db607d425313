#!/usr/bin/env python
"""Write the Fashion-MNIST files the embedded default needs into data/fashion-mnist/.

    python scripts/vendor_fmnist.py [--source /usr/share/datasets/fashion-mnist]

Copies the 10k test split as is and writes the calibration split: the last 2,000 images of the
training split, which scripts/train_fmnist.py holds out and never trains on. Output gzip files are
written with mtime 0, so the command is reproducible byte for byte.
"""
import argparse
import gzip
import hashlib
import shutil
import struct
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcal.data import fashion_mnist  # noqa: E402

CALIB_HOLDOUT = 2000


def write_idx(path, array):
    header = struct.pack(">I", 0x0800 | array.ndim) + struct.pack(">" + "I" * array.ndim,
                                                                  *array.shape)
    with open(path, "wb") as raw, gzip.GzipFile(fileobj=raw, mode="wb", mtime=0) as f:
        f.write(header + array.astype("uint8").tobytes())


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--source", type=Path, default=fashion_mnist.DEBIAN_DIR)
    parser.add_argument("--out", type=Path, default=fashion_mnist.VENDORED_DIR)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copyfile(args.source / name, args.out / name)
    images, labels = fashion_mnist.load_split(args.source, "train")
    write_idx(args.out / "calib-images-idx3-ubyte.gz", images[-CALIB_HOLDOUT:])
    write_idx(args.out / "calib-labels-idx1-ubyte.gz", labels[-CALIB_HOLDOUT:])
    for f in sorted(args.out.glob("*.gz")):
        print(f"{hashlib.sha256(f.read_bytes()).hexdigest()}  {f.name}  {f.stat().st_size} bytes")


if __name__ == "__main__":
    main()
