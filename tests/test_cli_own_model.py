"""`qcal evaluate` and `qcal sweep` on a researcher's own files: a small Gluon network exported with
HybridBlock.export, grey PNGs in class folders with custom names, preprocessing from options or
from the YAML (the same keys), float32 equal to MXNet's own forward image by image, int8 running."""
import csv
import json

import mxnet as mx
import numpy as np
import pytest
from click.testing import CliRunner

from qcal.cli import main

CLASSES = ("ant", "bee", "cat", "dog", "eel", "fox")  # sorted: the label order
MEAN, STD, PAD = 0.45, 0.3, 2


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def small_gluon_net():
    from mxnet.gluon import nn

    net = nn.HybridSequential()
    net.add(nn.Conv2D(6, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"), nn.MaxPool2D(2),
            nn.Conv2D(10, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
            nn.GlobalAvgPool2D(), nn.Dense(len(CLASSES)))
    net.initialize(mx.init.Xavier(magnitude=2.5))
    net(mx.nd.zeros((1, 1, 16, 16)))
    rng = np.random.RandomState(4)
    for name, param in net.collect_params().items():
        if "running_var" in name:
            param.set_data(mx.nd.array(rng.uniform(0.5, 2.0, param.shape)))
        elif "running_mean" in name or "beta" in name:
            param.set_data(mx.nd.array(rng.normal(0, 0.3, param.shape)))
    return net


@pytest.fixture(scope="module")
def own_model(tmp_path_factory):
    import cv2

    root = tmp_path_factory.mktemp("own")
    net = small_gluon_net()
    net.hybridize()
    net(mx.nd.zeros((1, 1, 16, 16)))
    net.export(str(root / "tiny"))
    rng = np.random.RandomState(8)
    images, labels = [], []
    for split, count in (("val", 24), ("calib", 12)):
        for i in range(count):
            image = rng.randint(0, 256, size=(12, 12), dtype=np.uint8)
            label = int(rng.randint(len(CLASSES)))
            path = root / split / CLASSES[label] / f"{i:03d}.png"
            path.parent.mkdir(parents=True, exist_ok=True)
            assert cv2.imwrite(str(path), image)
            if split == "val":
                images.append(image)
                labels.append(label)
    x = np.pad(np.stack(images), ((0, 0), (PAD, PAD), (PAD, PAD))).astype(np.float32) / 255.0
    x = ((x - np.float32(MEAN)) / np.float32(STD))[:, None]
    predictions = net(mx.nd.array(x)).asnumpy().argmax(axis=1)
    return root, predictions, np.array(labels)


def float32_predictions(results):
    with open(results / "predictions.csv") as f:
        rows = [r for r in csv.DictReader(f) if r["variant"] == "float32"]
    return np.array([int(r["pred1"]) for r in rows]), np.array([int(r["label"]) for r in rows])


def test_evaluate_an_export_on_class_folders_from_one_command(own_model, tmp_path):
    root, mxnet_predictions, labels = own_model
    results = tmp_path / "results"
    result = invoke("evaluate", "--model", root / "tiny-symbol.json", "--data", root / "val",
                    "--calib-data", root / "calib", "--input-size", 16, "--pad", PAD,
                    "--resize", "none", "--mean", MEAN, "--std", STD, "--bias-bits", 16,
                    "--results-dir", results, "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.exit_code == 0, result.output
    qcal_predictions, qcal_labels = float32_predictions(results)
    assert np.array_equal(qcal_labels, labels)  # file names in order; cat/dog/... sorted
    assert np.array_equal(qcal_predictions, mxnet_predictions)
    rows = {r["variant"]: r for r in json.loads((results / "results.json").read_text())["rows"]}
    assert rows["float32"]["top1"] == pytest.approx(100 * np.mean(mxnet_predictions == labels))
    assert len(rows) == 2 and all(r["images"] == len(labels) for r in rows.values())

    # the same preprocessing as sweep YAML keys gives the same float32 predictions
    config = tmp_path / "own.yaml"
    config.write_text(f"models: [{root / 'tiny-symbol.json'}]\n"
                      f"data: {{data: {root / 'val'}, calib_data: {root / 'calib'}, "
                      f"input_size: 16, pad: {PAD}, resize: none, mean: [{MEAN}], std: {STD}}}\n")
    swept = tmp_path / "swept"
    result = invoke("sweep", config, "--output", swept, "--quiet")
    assert result.exit_code == 0, result.output
    assert np.array_equal(float32_predictions(swept)[0], mxnet_predictions)


def test_missing_preprocessing_is_named_in_one_line(own_model, tmp_path):
    root, _, _ = own_model
    result = invoke("evaluate", "--model", root / "tiny-symbol.json", "--data", root / "val",
                    "--pad", PAD, "--float-only", "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 2
    assert "tiny does not state its preprocessing: pass --input-size, --mean, --std" in result.output
    assert "Traceback" not in result.output
    config = tmp_path / "bad.yaml"
    config.write_text(f"models: [{root / 'tiny-symbol.json'}]\ndata: {{pad: two}}\n")
    result = invoke("sweep", config, "--output", tmp_path / "out")
    assert result.exit_code == 2 and "bad.yaml:2: data.pad must be an integer" in result.output
