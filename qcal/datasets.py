"""Load stage, data: image sources, preprocessing, a fixed image order, and an on-disk batch cache.

Sources (each a ``ImageSource``: ``len``, ``labels``, ``decode(indices)``, ``identity``):

- ``FashionMNISTSource``: the IDX files vendored under ``data/fashion-mnist/`` (test split ``t10k``,
  calibration split ``calib`` drawn from the training split).
- ``ImageFolderSource``: ImageNet validation in the class-folder layout (``ROOT/<wnid>/<image>``), the
  layout gluoncv's ``ImageNet`` dataset reads. Images are ordered by FILE NAME across all classes, so
  with the original names (``ILSVRC2012_val_00000001.JPEG`` ...) "the first N images" are the first N
  of the official validation order, as in the forum thread's "first 3k images"; ordering by class
  folder would make the first 3000 images cover only 60 classes.
- ``RecordIOSource``: ``val.rec`` + ``val.idx`` (gluoncv's ``ImageNet`` RecordIO layout, made by
  ``im2rec``); images are in the order of the ``.idx`` file.

Preprocessing is MXNet's own transforms (``Resize(keep_ratio)`` of the short side to
``ceil(size / crop_ratio)``, ``CenterCrop``, ``ToTensor``, ``Normalize``), as gluoncv's
``verify_pretrained.py`` does. Preprocessed batches are cached as ``.npy`` files keyed by the
source's identity, the indices and the preprocessing, so a sweep decodes each image once.
"""
from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from . import fashion_mnist
from .errors import QcalError, UsageProblem

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


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


class ImageSource:
    """A fixed, ordered collection of labelled images."""

    kind = "abstract"

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def labels(self) -> np.ndarray:
        raise NotImplementedError

    def decode(self, indices) -> np.ndarray:
        """Preprocessed float32 N x C x H x W for the given positions in the fixed order."""
        raise NotImplementedError

    @property
    def identity(self) -> dict:
        """What makes two sources the same data: used for cache keys and overlap checks."""
        raise NotImplementedError

    @property
    def preprocessing(self) -> dict:
        raise NotImplementedError

    def describe(self) -> dict:
        return {"kind": self.kind, **self.identity, "preprocessing": self.preprocessing}


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


class FashionMNISTSource(ImageSource):
    kind = "fashion-mnist"

    def __init__(self, split: str = "t10k", directory: Path = fashion_mnist.VENDORED_DIR):
        if split not in ("t10k", "calib", "train"):
            raise UsageProblem(f"Fashion-MNIST split must be t10k, calib or train, not '{split}'")
        self.split = split
        self.directory = Path(directory)
        self._images, self._labels = fashion_mnist.load_split(self.directory, split)

    @property
    def labels(self):
        return self._labels

    def decode(self, indices):
        return fashion_mnist.preprocess(self._images[np.asarray(indices, dtype=np.int64)])

    @functools.cached_property  # read once: cache keys ask for it every batch
    def identity(self):
        path = self.directory / f"{self.split}-images-idx3-ubyte.gz"
        return {"split": self.split, "path": str(path), "sha256": sha256_file(path)[:16]}

    @property
    def preprocessing(self):
        return {"pad": fashion_mnist.PAD, "mean": fashion_mnist.PIXEL_MEAN,
                "std": fashion_mnist.PIXEL_STD}


class _DecodedImageSource(ImageSource):
    """Sources of encoded images (JPEG/PNG) preprocessed with MXNet's transforms."""

    def __init__(self, preprocessing: Preprocessing):
        self._pre = preprocessing
        self._transform = None

    @property
    def preprocessing(self):
        return self._pre.to_dict()

    def _preprocess(self, image_nd):
        if self._transform is None:
            from mxnet.gluon.data.vision import transforms

            self._transform = transforms.Compose([
                transforms.Resize(self._pre.resize, keep_ratio=True),
                transforms.CenterCrop(self._pre.input_size),
                transforms.ToTensor(),
                transforms.Normalize(self._pre.mean, self._pre.std),
            ])
        return self._transform(image_nd).asnumpy()

    def _decode_bytes(self, raw: bytes, what: str):
        import mxnet as mx

        try:
            return mx.image.imdecode(raw, flag=1)  # RGB, HWC uint8
        except Exception:
            raise QcalError(f"cannot decode image {what}") from None


def imagenet_label_of(wnid: str, known: list) -> int:
    """The standard ImageNet-1k index of a synset folder name.

    With the full list of 1000 synsets the index is the position in that sorted list (what gluoncv
    and torchvision use); folders named by the index itself ("000".."999") are accepted too, and a
    folder named "unlabelled" holds images without a class (label -1: calibration, fidelity).
    """
    if wnid == "unlabelled":
        return -1
    if wnid.isdigit():
        return int(wnid)
    try:
        from .imagenet_classes import IMAGENET_WNIDS
    except ImportError:
        IMAGENET_WNIDS = None
    if IMAGENET_WNIDS is not None and wnid in IMAGENET_WNIDS:
        return IMAGENET_WNIDS.index(wnid)
    if len(known) == 1000:
        return known.index(wnid)
    raise QcalError(f"class folder '{wnid}' is neither an ImageNet synset id nor a class index")


class ImageFolderSource(_DecodedImageSource):
    kind = "image-folder"

    def __init__(self, root: Path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING):
        super().__init__(preprocessing)
        self.root = Path(root)
        if not self.root.is_dir():
            raise QcalError(f"image folder not found: {self.root}")
        classes = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        entries = []
        for wnid in classes:
            label = imagenet_label_of(wnid, classes)
            for f in (self.root / wnid).iterdir():
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((f.name, wnid, label))
        if not entries:
            raise QcalError(f"{self.root} has no images in class folders (ROOT/<class>/<image>)")
        entries.sort()
        self._files = [self.root / wnid / name for name, wnid, _ in entries]
        self._labels = np.array([label for _, _, label in entries], dtype=np.int64)

    @property
    def labels(self):
        return self._labels

    @property
    def files(self):
        return list(self._files)

    def raw(self, index: int) -> tuple:
        """(encoded image bytes, a name for messages)."""
        path = self._files[int(index)]
        return path.read_bytes(), str(path)

    def decode(self, indices):
        return np.stack([self._preprocess(self._decode_bytes(*self.raw(i)))
                         for i in indices]).astype(np.float32)

    @functools.cached_property  # read once: cache keys ask for it every batch
    def identity(self):
        h = hashlib.sha256()
        for f in self._files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return {"path": str(self.root.resolve()), "listing": h.hexdigest()[:16],
                "images": len(self._files)}


class RecordIOSource(_DecodedImageSource):
    kind = "recordio"

    def __init__(self, rec_path: Path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING):
        super().__init__(preprocessing)
        self.rec_path = Path(rec_path)
        self.idx_path = self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise QcalError(f"RecordIO file not found: {p} (need both .rec and .idx)")
        import mxnet as mx

        self._reader = mx.recordio.MXIndexedRecordIO(str(self.idx_path), str(self.rec_path), "r")
        self._keys = list(self._reader.keys)
        labels = []
        for k in self._keys:
            header, _ = mx.recordio.unpack(self._reader.read_idx(k))
            label = header.label
            labels.append(int(label if np.isscalar(label) else label[0]))
        self._labels = np.array(labels, dtype=np.int64)

    @property
    def labels(self):
        return self._labels

    def raw(self, index: int) -> tuple:
        import mxnet as mx

        _, raw = mx.recordio.unpack(self._reader.read_idx(self._keys[int(index)]))
        return raw, f"{self.rec_path}#{index}"

    def decode(self, indices):
        return np.stack([self._preprocess(self._decode_bytes(*self.raw(i)))
                         for i in indices]).astype(np.float32)

    @functools.cached_property  # read once: cache keys ask for it every batch
    def identity(self):
        st_rec, st_idx = self.rec_path.stat(), self.idx_path.stat()
        return {"path": str(self.rec_path.resolve()),
                "stat": f"{st_rec.st_size}|{st_rec.st_mtime_ns}|{st_idx.st_size}|{st_idx.st_mtime_ns}",
                "images": len(self._keys)}


class _SubsetSource(_DecodedImageSource):
    """Positions [start, stop) of another encoded-image source, as a source of its own."""

    kind = "subset"

    def __init__(self, base: _DecodedImageSource, start: int, stop: int):
        super().__init__(Preprocessing(**base.preprocessing))
        self.base, self.start, self.stop = base, start, stop

    @property
    def labels(self):
        return self.base.labels[self.start:self.stop]

    def raw(self, index: int) -> tuple:
        return self.base.raw(self.start + int(index))

    def decode(self, indices):
        return self.base.decode([self.start + int(i) for i in indices])

    @property
    def identity(self):
        return {"base": self.base.identity, "range": [self.start, self.stop]}


class AugmentedSource(_DecodedImageSource):
    """Label-free images: ``count`` random crops (area 25-100 %, aspect 3/4-4/3) with random
    horizontal flips of a base source's images, each then preprocessed as usual.

    Image j crops base image j mod len(base) with its own generator (seed, j), so every image is
    reproducible on its own. Labels are -1: these images serve label-free fidelity metrics only.
    """

    kind = "augmented"

    def __init__(self, base: _DecodedImageSource, count: int, seed: int = 0):
        super().__init__(Preprocessing(**base.preprocessing))
        if count < 1:
            raise UsageProblem(f"the number of random crops must be at least 1, not {count}")
        self.base, self.count, self.seed = base, count, seed

    @property
    def labels(self):
        return np.full(self.count, -1, dtype=np.int64)

    def _augment(self, image, j: int):
        import mxnet as mx

        rng = np.random.RandomState([self.seed, j])
        h, w = image.shape[:2]
        for _ in range(10):
            area = rng.uniform(0.25, 1.0) * h * w
            aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
            cw, ch = int(round(np.sqrt(area * aspect))), int(round(np.sqrt(area / aspect)))
            if 0 < cw <= w and 0 < ch <= h:
                break
        else:
            cw, ch = w, h
        x0, y0 = rng.randint(0, w - cw + 1), rng.randint(0, h - ch + 1)
        crop = mx.image.fixed_crop(image, x0, y0, cw, ch)
        return mx.nd.flip(crop, axis=1) if rng.rand() < 0.5 else crop

    def decode(self, indices):
        out = []
        for j in indices:
            image = self._decode_bytes(*self.base.raw(int(j) % len(self.base)))
            out.append(self._preprocess(self._augment(image, int(j))))
        return np.stack(out).astype(np.float32)

    @property
    def identity(self):
        return {"base": self.base.identity, "count": self.count, "seed": self.seed,
                "augment": "crop25-100%/aspect3:4-4:3/hflip"}


def open_source(path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING) -> ImageSource:
    """An ImageNet-style source from a path: a ``.rec`` file or a class-folder directory."""
    path = Path(path)
    if path.suffix == ".rec":
        return RecordIOSource(path, preprocessing)
    if path.is_dir():
        return ImageFolderSource(path, preprocessing)
    raise QcalError(f"data source not found or not understood: {path} "
                    f"(expected a class-folder directory or a .rec file)")


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
                               f"{n} images of {self.source.describe()['kind']} source")

    @property
    def indices(self):
        return np.arange(self.start, self.stop)

    def __len__(self):
        return self.stop - self.start

    def describe(self):
        return {**self.source.describe(), "range": [self.start, self.stop]}


def check_disjoint(calibration: Selection, evaluation: Selection):
    """qcal never calibrates on an image it evaluates (gluoncv's script calibrates on its eval split)."""
    if calibration.source.identity != evaluation.source.identity:
        return
    lo = max(calibration.start, evaluation.start)
    hi = min(calibration.stop, evaluation.stop)
    if lo < hi:
        raise UsageProblem(
            f"calibration images {calibration.start}:{calibration.stop} overlap the evaluated "
            f"images {evaluation.start}:{evaluation.stop} of the same source ({hi - lo} shared); "
            f"choose a disjoint --calib-range or a separate --calib-dir")


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
        self.directory.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.directory, suffix=".npy.tmp")
        with os.fdopen(fd, "wb") as f:
            np.save(f, batch)
        os.replace(tmp, path)
        return batch


def iter_batches(selection: Selection, batch_size: int, cache: BatchCache | None = None):
    """(images, labels) batches in order; the last batch may be short and is never padded here."""
    cache = cache or BatchCache(None)
    labels = selection.source.labels
    for lo in range(selection.start, selection.stop, batch_size):
        idx = np.arange(lo, min(lo + batch_size, selection.stop))
        yield cache.load(selection.source, idx), labels[idx]


def parse_range(text: str) -> tuple:
    """'START:STOP' -> (start, stop)."""
    try:
        start, stop = (int(v) for v in text.split(":"))
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


def plan_data(family: str, data=None, num_images=None, calib_data=None, calib_range=None,
              calib_images=None, preprocessing: Preprocessing = IMAGENET_PREPROCESSING,
              calibrate: bool = True, fidelity_data=None, fidelity_crops=None,
              fidelity_seed: int = 0, calib_crops=None) -> DataPlan:
    """Choose the evaluated images and the (disjoint) calibration images for one model.

    Fashion-MNIST models default to the vendored test split and the calibration split held out of
    training. ImageNet models need ``data``; calibration comes from ``calib_data``, or a
    ``calib_range`` of the same source, or else the last ``calib_images`` images of it.
    """
    if family == "fashion-mnist":
        eval_source = (FashionMNISTSource("t10k") if data is None
                       else FashionMNISTSource("t10k", directory=Path(data)))
        default_calib = FashionMNISTSource("calib")
    else:
        if data is None:
            raise UsageProblem("ImageNet models need --data (a class-folder directory or a .rec file)")
        eval_source = open_source(data, preprocessing)
        default_calib = None
    n_eval = len(eval_source) if num_images is None else num_images
    if n_eval > len(eval_source):
        raise UsageProblem(f"--num-images {n_eval} exceeds the {len(eval_source)} images available")
    evaluation = Selection(eval_source, 0, n_eval)
    fidelity = None
    if fidelity_crops:
        base = open_source(fidelity_data, preprocessing) if fidelity_data else eval_source
        if not isinstance(base, _DecodedImageSource):
            raise UsageProblem("random crops need a source of photos (class folder or .rec)")
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
    else:
        count = calib_images or min(len(calib_source), 500)
        count = min(count, len(calib_source))
        start, stop = (0, count) if calib_source is not eval_source else (
            len(calib_source) - count, len(calib_source))
    calibration = Selection(calib_source, start, stop)
    if calib_crops:  # random crops of the chosen calibration images (few photos, many views)
        if not isinstance(calib_source, _DecodedImageSource):
            raise UsageProblem("calibration crops need a source of photos (class folder or .rec)")
        check_disjoint(calibration, evaluation)
        crops = AugmentedSource(_SubsetSource(calib_source, start, stop), calib_crops,
                                fidelity_seed + 1)
        calibration = Selection(crops, 0, calib_crops)
    check_disjoint(calibration, evaluation)
    return DataPlan(evaluation, calibration, fidelity)
