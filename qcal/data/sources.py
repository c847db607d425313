"""Load stage, data sources: fixed, ordered collections of labelled images.

Sources (each a ``ImageSource``: ``len``, ``labels``, ``decode(indices)``, ``identity``):

- ``FashionMNISTSource``: the IDX files vendored under ``data/fashion-mnist/`` (test split ``t10k``,
  calibration split ``calib`` drawn from the training split).
- ``ImageFolderSource``: labelled class folders (``ROOT/<class>/<image>``): ImageNet validation
  by synset id (the layout gluoncv's ``ImageNet`` dataset reads) or any class names
  (``class_indices``). Images are ordered by FILE NAME across all classes, so
  with the original names (``ILSVRC2012_val_00000001.JPEG`` ...) "the first N images" are the first N
  of the official validation order, as in docs/background.md's "first 3,000 images"; ordering by class
  folder would make the first 3000 images cover only 60 classes.
- ``ArraySource``: images and labels as arrays (``.npz``, MNIST-style IDX files).
- ``RecordIOSource``: ``val.rec`` + ``val.idx`` (gluoncv's ``ImageNet`` RecordIO layout, made by
  ``im2rec``); images are in the order of the ``.idx`` file.

Length: every kind of image source qcal reads lives here, each with the checks that name a
damaged file (index, record, truncated image) where it is read.
"""
from __future__ import annotations

import functools
import hashlib
import struct
from pathlib import Path

import numpy as np

from qcal.data import fashion_mnist
from qcal.data.class_folders import LABELS_FILE, UNLABELLED_FOLDER, class_indices, labels_from_file
from qcal.data.preprocessing import IMAGENET_PREPROCESSING, Preprocessing
from qcal.errors import QcalError, UsageProblem
from qcal.files import file_digest

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp")


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
        return {"split": self.split, "path": str(path), "sha256": file_digest(path, "Fashion-MNIST file")}

    @property
    def preprocessing(self):
        return {"pad": fashion_mnist.PAD, "mean": fashion_mnist.PIXEL_MEAN,
                "std": fashion_mnist.PIXEL_STD}


class DecodedImageSource(ImageSource):
    """Sources of encoded images (JPEG/PNG) preprocessed with MXNet's transforms."""

    def __init__(self, preprocessing: Preprocessing):
        self._pre = preprocessing

    @property
    def preprocessing(self):
        return self._pre.to_dict()

    def _preprocess(self, image_nd, what: str = "image"):
        return self._pre.apply(image_nd, what)

    def _decode_bytes(self, raw: bytes, what: str):
        import mxnet as mx

        truncated = image_truncated(raw)
        if truncated:  # libjpeg fills a cut-short JPEG with grey and only warns
            raise QcalError(f"image {what} is truncated ({truncated})")
        try:  # flag 1: RGB (a grey image repeated to three channels); 0: grey; HWC uint8
            return mx.image.imdecode(raw, flag=1 if self._pre.channels == 3 else 0)
        except Exception:
            raise QcalError(f"cannot decode image {what}") from None

    def _decode_one(self, raw: bytes, what: str):
        """One encoded image, decoded and preprocessed; a failure names the image."""
        return self._preprocess_named(self._decode_bytes(raw, what), what)

    def _preprocess_named(self, image, what: str) -> np.ndarray:
        import mxnet as mx

        try:
            return self._preprocess(image, what)
        except mx.base.MXNetError as exc:  # MXNet's message is its C++ stack after one line
            message = next((line for line in str(exc).splitlines() if "Check failed" in line),
                           str(exc).splitlines()[0] if str(exc) else "")
            raise QcalError(f"cannot preprocess image {what}: "
                            f"{message.split(': ', 1)[-1][:200]}") from None


def image_truncated(raw: bytes) -> str:
    """Why an encoded JPEG or PNG is cut short ('' when it is whole, or another format)."""
    if raw[:3] == b"\xff\xd8\xff":
        # the end-of-image marker ends the file (some writers pad after it)
        if b"\xff\xd9" not in raw[-64:]:
            return "a JPEG without its end-of-image marker"
    elif raw[:8] == b"\x89PNG\r\n\x1a\n":
        if b"IEND" not in raw[-32:]:
            return "a PNG without its IEND chunk"
    return ""


class ImageFolderSource(DecodedImageSource):
    """Class folders; ``ROOT/labels.txt``, when present, numbers them instead of ``class_indices``."""

    kind = "image-folder"

    def __init__(self, root: Path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING):
        super().__init__(preprocessing)
        self.root = Path(root)
        if not self.root.is_dir():
            raise QcalError(f"image folder not found: {self.root}")
        folders = sorted(p.name for p in self.root.iterdir() if p.is_dir())
        labels = class_indices(folders)
        if (self.root / LABELS_FILE).is_file():
            labels = labels_from_file(self.root / LABELS_FILE, folders)
        entries = []
        for folder in folders:
            for f in (self.root / folder).iterdir():
                if f.suffix.lower() in IMAGE_SUFFIXES:
                    entries.append((f.name, folder, labels[folder]))
        if not entries:
            loose = [f for f in self.root.iterdir() if f.suffix.lower() in IMAGE_SUFFIXES]
            if loose:
                raise QcalError(f"{self.root} holds images but no class folders: put each "
                                f"class's images in {self.root}/<class>/ (or in "
                                f"{self.root}/{UNLABELLED_FOLDER}/ for images without labels)")
            raise QcalError(f"{self.root} has no images in class folders (ROOT/<class>/<image>, "
                            f"{', '.join(IMAGE_SUFFIXES)})")
        entries.sort()
        self.class_names = {folder: labels[folder] for folder in folders}
        self._files = [self.root / folder / name for name, folder, _ in entries]
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
        return np.stack([self._decode_one(*self.raw(i)) for i in indices]).astype(np.float32)

    @functools.cached_property  # read once: cache keys ask for it every batch
    def identity(self):
        h = hashlib.sha256()
        for f in self._files:
            st = f.stat()
            h.update(f"{f.relative_to(self.root)}|{st.st_size}|{st.st_mtime_ns}".encode())
        return {"path": str(self.root.resolve()), "listing": h.hexdigest()[:16],
                "images": len(self._files)}


class RecordIOSource(DecodedImageSource):
    kind = "recordio"

    def __init__(self, rec_path: Path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING):
        super().__init__(preprocessing)
        self.rec_path = Path(rec_path)
        self.idx_path = self.rec_path.with_suffix(".idx")
        for p in (self.rec_path, self.idx_path):
            if not p.is_file():
                raise QcalError(f"RecordIO file not found: {p} (need both .rec and .idx)")
        import mxnet as mx

        try:
            self._reader = mx.recordio.MXIndexedRecordIO(str(self.idx_path), str(self.rec_path),
                                                         "r")
        except (ValueError, IndexError, UnicodeDecodeError):  # MXNet parses "KEY\tOFFSET" lines
            raise QcalError(f"{self.idx_path} is not a RecordIO index (lines of KEY<TAB>OFFSET, "
                            f"as im2rec writes them)") from None
        self._keys = list(self._reader.keys)
        if not self._keys:
            raise QcalError(f"{self.idx_path} lists no images")
        labels = []
        for position, k in enumerate(self._keys):
            try:
                header, _ = mx.recordio.unpack(self._reader.read_idx(k))
            except (mx.base.MXNetError, struct.error, ValueError, OSError):
                raise QcalError(f"{self.rec_path}: record {position} (key {k}) cannot be read: "
                                f"the .rec file is damaged or does not belong to "
                                f"{self.idx_path.name}") from None
            label = header.label
            labels.append(int(label if np.isscalar(label) else label[0]))
        self._labels = np.array(labels, dtype=np.int64)

    @property
    def labels(self):
        return self._labels

    def raw(self, index: int) -> tuple:
        import mxnet as mx

        try:
            _, raw = mx.recordio.unpack(self._reader.read_idx(self._keys[int(index)]))
        except (mx.base.MXNetError, struct.error, ValueError, OSError):
            raise QcalError(f"{self.rec_path}#{index}: the record cannot be read (damaged "
                            f".rec file)") from None
        return raw, f"{self.rec_path}#{index}"

    def decode(self, indices):
        return np.stack([self._decode_one(*self.raw(i)) for i in indices]).astype(np.float32)

    @functools.cached_property  # read once: cache keys ask for it every batch
    def identity(self):
        st_rec, st_idx = self.rec_path.stat(), self.idx_path.stat()
        return {"path": str(self.rec_path.resolve()),
                "stat": f"{st_rec.st_size}|{st_rec.st_mtime_ns}|{st_idx.st_size}|{st_idx.st_mtime_ns}",
                "images": len(self._keys)}


class SubsetSource(DecodedImageSource):
    """Positions [start, stop) of another encoded-image source, as a source of its own."""

    kind = "subset"

    def __init__(self, base: DecodedImageSource, start: int, stop: int):
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


class AugmentedSource(DecodedImageSource):
    """Label-free images: ``count`` random crops (area 25-100 %, aspect 3/4-4/3) with random
    horizontal flips of a base source's images, each then preprocessed as usual.

    Image j crops base image j mod len(base) with its own generator (seed, j), so every image is
    reproducible on its own. Labels are -1: these images serve label-free fidelity metrics only.
    """

    kind = "augmented"

    def __init__(self, base: DecodedImageSource, count: int, seed: int = 0):
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
            raw, what = self.base.raw(int(j) % len(self.base))
            image = self._decode_bytes(raw, what)
            out.append(self._preprocess_named(self._augment(image, int(j)), what))
        return np.stack(out).astype(np.float32)

    @property
    def identity(self):
        return {"base": self.base.identity, "count": self.count, "seed": self.seed,
                "augment": "crop25-100%/aspect3:4-4:3/hflip"}


IDX_IMAGES = "-images-idx3-ubyte"  # MNIST-style names: NAME-images-idx3-ubyte[.gz]


class ArraySource(DecodedImageSource):
    """Images held as arrays: an ``.npz`` with ``images`` (N x H x W or N x H x W x 3, uint8, RGB)
    and ``labels`` (N integers), or MNIST-style IDX files (``NAME-images-idx3-ubyte[.gz]`` with
    ``NAME-labels-idx1-ubyte[.gz]`` beside it). Each image goes through the same decode and
    preprocessing as a file in a class folder: ``raw`` gives it as a PNG (lossless)."""

    kind = "arrays"

    def __init__(self, path: Path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING):
        super().__init__(preprocessing)
        self.path = Path(path)
        if self.path.suffix == ".npz":
            images, labels = self._read_npz(self.path)
        else:
            images = fashion_mnist.read_idx(self.path, "IDX file")
            labels_path = Path(str(self.path).replace(IDX_IMAGES, "-labels-idx1-ubyte"))
            labels = fashion_mnist.read_idx(labels_path, "IDX labels file (beside the images)")
        if images.dtype != np.uint8 or images.ndim not in (3, 4) or (
                images.ndim == 4 and images.shape[3] not in (1, 3)):
            raise QcalError(f"{self.path}: images must be uint8 N x H x W or N x H x W x 3, not "
                            f"{images.dtype} {images.shape}")
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != len(images) or not np.issubdtype(labels.dtype, np.integer):
            raise QcalError(f"{self.path}: {len(images)} images but {len(labels)} "
                            f"{labels.dtype} labels (need one integer label per image)")
        self._images = images
        self._labels = labels.astype(np.int64)

    @staticmethod
    def _read_npz(path: Path):
        try:
            with np.load(path, allow_pickle=False) as arrays:
                missing = {"images", "labels"} - set(arrays.files)
                if missing:
                    raise QcalError(f"{path} has no '{sorted(missing)[0]}' array (it holds "
                                    f"{', '.join(arrays.files) or 'none'})")
                return arrays["images"], arrays["labels"]
        except (OSError, ValueError) as exc:
            raise QcalError(f"cannot read {path}: {exc}") from None

    @property
    def labels(self):
        return self._labels

    def raw(self, index: int) -> tuple:
        import cv2

        image = self._images[int(index)]
        if image.ndim == 3 and image.shape[2] == 3:
            image = image[:, :, ::-1]  # OpenCV writes BGR
        ok, encoded = cv2.imencode(".png", np.ascontiguousarray(image))
        return encoded.tobytes(), f"{self.path}#{index}"

    def decode(self, indices):
        return np.stack([self._decode_one(*self.raw(i)) for i in indices]).astype(np.float32)

    @functools.cached_property  # read once: cache keys ask for it every batch
    def identity(self):
        return {"path": str(self.path.resolve()), "sha256": file_digest(self.path, "array file"),
                "images": len(self._labels)}


def open_source(path, preprocessing: Preprocessing = IMAGENET_PREPROCESSING) -> ImageSource:
    """A source from a path: a ``.rec`` file, an ``.npz`` or IDX image file, or class folders."""
    path = Path(path)
    if path.suffix == ".rec":
        return RecordIOSource(path, preprocessing)
    if path.suffix == ".npz" or IDX_IMAGES in path.name:
        return ArraySource(path, preprocessing)
    if path.is_dir():
        return ImageFolderSource(path, preprocessing)
    raise QcalError(f"data source not found or not understood: {path} (expected class folders, "
                    f"a .rec file, an .npz of images and labels or an NAME{IDX_IMAGES}[.gz] file)")
