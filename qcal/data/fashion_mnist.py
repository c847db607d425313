"""Fashion-MNIST in its original IDX (gzip) files: the embedded default's data.

The repo vendors the 10k test split and a 2,000-image calibration subset of the training split under
``data/fashion-mnist/`` (see its PROVENANCE.md); training reads the full set from Debian's
``dataset-fashion-mnist`` package.
"""
from __future__ import annotations

import gzip
import struct
import zlib
from pathlib import Path

import numpy as np

from qcal.errors import QcalError
from qcal.files import REPO_ROOT

DEBIAN_DIR = Path("/usr/share/datasets/fashion-mnist")
VENDORED_DIR = REPO_ROOT / "data" / "fashion-mnist"

CLASS_NAMES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
               "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
# Per-pixel statistics of the 60k training images, after scaling to [0, 1]. Normalising by them
# makes the parameter-free input BatchNorm of ResNet v2 exact (MXNet updates BatchNorm statistics
# in the backward pass only, and the input has no gradient: they stay mean 0, var 1 for ever).
PIXEL_MEAN = 0.2860
PIXEL_STD = 0.3530
PAD = 2  # 28x28 -> 32x32: the CIFAR architectures and VGG's five 2x2 pools need 32


def read_idx(path: Path, what: str = "Fashion-MNIST file") -> np.ndarray:
    """Read one IDX file, gzip or plain (images uint8 N x H x W or labels uint8 N)."""
    path = Path(path)
    if not path.is_file():
        raise QcalError(f"{what} not found: {path}")
    raw = path.read_bytes()
    if raw[:2] == b"\x1f\x8b":  # gzip's magic
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise QcalError(f"{path} is not a gzip IDX file, or is truncated ({exc})") from None
    magic, = struct.unpack(">I", raw[:4]) if len(raw) >= 4 else (0,)
    ndim = magic & 0xFF
    if magic >> 8 != 0x08 or ndim not in (1, 3) or len(raw) < 4 + 4 * ndim:
        raise QcalError(f"{path} is not an IDX uint8 file (magic {magic:#x})")
    dims = struct.unpack(">" + "I" * ndim, raw[4:4 + 4 * ndim])
    data = np.frombuffer(raw, dtype=np.uint8, offset=4 + 4 * ndim)
    if data.size != int(np.prod(dims)):
        raise QcalError(f"{path} is truncated: header says {dims}, found {data.size} values")
    return data.reshape(dims)


def load_split(directory: Path, split: str):
    """(images uint8 N x 28 x 28, labels int64 N) for split 'train', 't10k' or 'calib'."""
    directory = Path(directory)
    images = read_idx(directory / f"{split}-images-idx3-ubyte.gz")
    labels = read_idx(directory / f"{split}-labels-idx1-ubyte.gz").astype(np.int64)
    if len(images) != len(labels):
        raise QcalError(f"{directory}: {split} has {len(images)} images but {len(labels)} labels")
    return images, labels


def preprocess(images_uint8: np.ndarray) -> np.ndarray:
    """uint8 N x 28 x 28 -> float32 N x 1 x 32 x 32, zero-padded, normalised."""
    x = images_uint8.astype(np.float32) / 255.0
    x = (x - PIXEL_MEAN) / PIXEL_STD
    background = (0.0 - PIXEL_MEAN) / PIXEL_STD
    x = np.pad(x, ((0, 0), (PAD, PAD), (PAD, PAD)), constant_values=background)
    return x[:, None, :, :].astype(np.float32)
