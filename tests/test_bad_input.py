"""Malformed input of every kind a user gives qcal: refused before any work, in one line.

Each case of the battery runs a real command line (in this process, so that MXNet loads once) in
an empty working folder that every output of the case points into, and asserts the exit code (2:
a bad invocation, 1: a runtime failure), that the error is one line naming the culprit, that no
traceback is printed, and that nothing at all was left in that folder.
"""
from __future__ import annotations

import gzip
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from qcal.cli import main
from tests.fixtures import write_jpeg

SMALL = "models: [fmnist_resnet20_v1]\ndata: {num_images: 16, calib_images: 16}\nbatch_size: 16\n"


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """Inputs shared by the cases, each file bad in one way (nothing here is written to)."""
    import mxnet as mx

    from qcal.families import resolve_model

    root = tmp_path_factory.mktemp("inputs")
    rng = np.random.RandomState(0)
    good = root / "val"
    for number, wnid in enumerate(["065", "970", "230", "809"], start=1):
        write_jpeg(good / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", rng)
    truncated = root / "truncated"
    for number, wnid in enumerate(["065", "970"], start=1):
        write_jpeg(truncated / wnid / f"ILSVRC2012_val_{number:08d}.JPEG", rng)
    cut = truncated / "970" / "ILSVRC2012_val_00000002.JPEG"
    cut.write_bytes(cut.read_bytes()[:400])
    (root / "empty-jpeg" / "065").mkdir(parents=True)
    (root / "empty-jpeg" / "065" / "ILSVRC2012_val_00000001.JPEG").write_bytes(b"")
    (root / "no-images" / "065").mkdir(parents=True)
    (root / "no-images" / "065" / "readme.txt").write_text("no images here")
    (root / "garbage.rec").write_bytes(b"\0" * 64)
    (root / "garbage.idx").write_text("not\ta number\n")
    (root / "lonely.rec").write_bytes(b"\0" * 64)  # no .idx beside it
    (root / "damaged.rec").write_bytes(os.urandom(256))
    (root / "damaged.idx").write_text("0\t0\n1\t128\n")
    (root / "fmnist-garbage").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / "fmnist-garbage" / name).write_bytes(b"not gzip at all")
    (root / "fmnist-cut").mkdir()
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        (root / "fmnist-cut" / name).write_bytes(gzip.compress(bytes(range(256)) * 8)[:40])
    (root / "fmnist-missing").mkdir()
    (root / "a-file.txt").write_text("I am not a folder\n")
    (root / "garbage.params").write_bytes(b"not params" * 10)
    (root / "empty.params").write_bytes(b"")
    (root / "garbage.onnx").write_bytes(b"not onnx" * 10)
    net = resolve_model("fmnist_vgg11_bn").resolved_network()
    net.initialize(mx.init.Normal(0.05), force_reinit=True)
    net.save_parameters(str(root / "vgg.params"))  # weights of another architecture
    r18 = resolve_model("resnet18_v1").resolved_network()
    r18.save_parameters(str(root / "r18.params"))
    (root / "garbage.npz").write_bytes(b"PK\x03\x04" + os.urandom(200))
    np.savez(root / "numpy.npz", x=np.zeros(3))  # a valid .npz, not a calibration file
    (root / "empty.npz").write_bytes(b"")
    result = CliRunner().invoke(main, ["calibrate", "--model", "fmnist_resnet20_v1",
                                       "--calib-images", "16", "--bins", "0", "--quiet",
                                       "--output", str(root / "calib.npz"),
                                       "--cache-dir", str(root / "cache")])
    assert result.exit_code == 0, result.output
    data = (root / "calib.npz").read_bytes()
    (root / "calib-half.npz").write_bytes(data[:len(data) // 2])
    (root / "calib-tail.npz").write_bytes(data[:-40])  # only the check record damaged
    flipped = bytearray(data)
    flipped[len(data) // 3] ^= 0xFF
    (root / "calib-flipped.npz").write_bytes(bytes(flipped))
    (root / "damaged-results").mkdir()
    (root / "damaged-results" / "sensitivity.json").write_text('{"runs": [')
    (root / "foreign-results").mkdir()
    (root / "foreign-results" / "sensitivity.json").write_text('{"runs": []}')
    return root


def _sweep(name, text, command="sweep"):
    """A sweep case: the config is written into the case's folder, results go there too."""
    return (command, name, text)


def _sensitivity(name, text):
    """A `qcal sensitivity` case on a config written like a sweep's."""
    return _sweep(name, text, "sensitivity")


EVAL = ["evaluate", "--model", "fmnist_resnet20_v1", "--num-images", "16", "--quiet"]
R18 = ["evaluate", "--model", "resnet18_v1", "--params", "{ws}/r18.params", "--input-size", "32",
       "--quiet"]
CAL = ["calibrate", "--model", "fmnist_resnet20_v1", "--calib-images", "16", "--bins", "0",
       "--quiet"]
SENS = ["sensitivity", "--model", "fmnist_resnet20_v1", "--num-images", "16", "--quiet"]

# (id, command line or sweep config, exit code, text the one error line must contain)
CASES = [
    # --- sweep configs: YAML itself -----------------------------------------------------------
    ("yaml-not-utf8", _sweep("s.yaml", b"models: [fmnist\xff]\n"), 2, "s.yaml:1: not UTF-8"),
    ("yaml-utf16", _sweep("s.yaml", "models: [x]\n".encode("utf-16")), 2, "not UTF-8"),
    ("yaml-python-object", _sweep("s.yaml", SMALL + "seed: !!python/object:os.system {}\n"), 2,
     "s.yaml:4: YAML tag !!python/object:os.system"),
    ("yaml-python-name", _sweep("s.yaml", SMALL + "name: !!python/name:os.system\n"), 2,
     "s.yaml:4: YAML tag !!python/name:os.system"),
    ("yaml-python-tuple", _sweep("s.yaml", SMALL + "grid: {percentile: [!!python/tuple [1]]}\n"),
     2, "s.yaml:4: YAML tag !!python/tuple"),
    ("yaml-local-tag", _sweep("s.yaml", SMALL + "seed: !mine 3\n"), 2, "s.yaml:4: YAML tag !mine"),
    ("yaml-binary", _sweep("s.yaml", SMALL + "name: !!binary aGVsbG8=\n"), 2,
     "s.yaml:4: YAML tag !!binary"),
    ("yaml-complex-key-list", _sweep("s.yaml", SMALL + "? [a, b]\n: 1\n"), 2,
     "s.yaml:4: a key of the config must be a plain name, not a list"),
    ("yaml-complex-key-map", _sweep("s.yaml", SMALL + "grid:\n  ? {a: 1}\n  : [1]\n"), 2,
     "s.yaml:5: a key of grid must be a plain name, not a mapping"),
    ("yaml-syntax", _sweep("s.yaml", "models: [fmnist_resnet20_v1\n"), 2, "not valid YAML"),
    ("yaml-tab-indent", _sweep("s.yaml", "models:\n\t- fmnist_resnet20_v1\n"), 2,
     "s.yaml:2: not valid YAML"),
    ("yaml-empty", _sweep("s.yaml", ""), 2, "s.yaml: the file is empty"),
    ("yaml-a-list", _sweep("s.yaml", "- fmnist_resnet20_v1\n"), 2,
     "s.yaml:1: the config must be a mapping"),
    ("yaml-missing-file", ("sweep-args", ["sweep", "nowhere.yaml"]), 2,
     "sweep config not found: nowhere.yaml"),
    ("yaml-a-folder", ("sweep-args", ["sweep", "."]), 2, "sweep config not found: ."),
    ("yaml-duplicate-key", _sweep("s.yaml", SMALL + "seed: 1\nseed: 2\n"), 2,
     "s.yaml:5: duplicate key 'seed'"),
    # --- sweep configs: keys and types ----------------------------------------------------------
    ("yaml-unknown-key", _sweep("s.yaml", SMALL + "batchsize: 3\n"), 2,
     "s.yaml:4: unknown key 'batchsize'"),
    ("yaml-unknown-data-key", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata: {num_imgs: 3}\n"),
     2, "s.yaml:2: unknown data key 'num_imgs'"),
    ("yaml-unknown-grid-key", _sweep("s.yaml", SMALL + "grid: {granularity: [channel]}\n"), 2,
     "s.yaml:4: unknown grid key 'granularity'"),
    ("yaml-unknown-variant-key", _sweep("s.yaml", SMALL + "variants: [{bits: 8}]\n"), 2,
     "s.yaml:4: unknown variant key 'bits'"),
    ("yaml-percentile-string", _sweep("s.yaml", SMALL + "grid: {percentile: [abc]}\n"), 2,
     "s.yaml:4: percentile must be a number, not 'abc'"),
    ("yaml-percentile-quoted", _sweep("s.yaml", SMALL + "grid: {percentile: ['99.9']}\n"), 2,
     "percentile must be a number, not '99.9'"),
    ("yaml-percentile-zero", _sweep("s.yaml", SMALL + "grid: {percentile: [0]}\n"), 2,
     "s.yaml:4: percentile must be in (0, 100]"),
    ("yaml-percentile-nan", _sweep("s.yaml", SMALL + "grid: {percentile: [.nan]}\n"), 2,
     "percentile must be in (0, 100], not nan"),
    ("yaml-global-scale-string", _sweep(
        "s.yaml", SMALL + "variants: [{activation_method: global, global_scale: big}]\n"), 2,
     "s.yaml:4: global_scale must be a number, not 'big'"),
    ("yaml-global-scale-inf", _sweep("s.yaml", SMALL + "grid: {global_scale: [.inf]}\n"), 2,
     "global_scale must be a positive finite number, not inf"),
    ("yaml-global-scale-negative", _sweep("s.yaml", SMALL + "grid: {global_scale: [-1]}\n"), 2,
     "global_scale must be a positive finite number, not -1"),
    ("yaml-skip-dense-string", _sweep("s.yaml", SMALL + "grid: {skip_dense: ['no']}\n"), 2,
     "s.yaml:4: skip_dense must be true or false, not 'no'"),
    ("yaml-skip-dense-number", _sweep("s.yaml", SMALL + "variants: [{skip_dense: 1}]\n"), 2,
     "skip_dense must be true or false, not 1"),
    ("yaml-equalize-string", _sweep("s.yaml", SMALL + "grid: {equalize: ['yes']}\n"), 2,
     "s.yaml:4: equalize must be true or false, not 'yes'"),
    ("yaml-bias-correction-unknown", _sweep("s.yaml", SMALL + "variants: [{bias_correction: fast}]\n"),
     2, "bias_correction must be one of none, empirical, not 'fast'"),
    ("yaml-bias-granularity-unknown", _sweep("s.yaml", SMALL + "grid: {bias_granularity: [layer]}\n"),
     2, "bias_granularity must be one of tensor, channel, not 'layer'"),
    ("yaml-bias-float", _sweep("s.yaml", SMALL + "variants: [{bias_bits: 8.0}]\n"), 2,
     "bias_bits must be an integer from 2 to 32, not 8.0"),
    ("yaml-bias-bool", _sweep("s.yaml", SMALL + "grid: {bias: [true]}\n"), 2,
     "bias must be a bit count (2..32) or 'int32-acc', not True"),
    ("yaml-bias-33", _sweep("s.yaml", SMALL + "grid: {bias: [8, 33]}\n"), 2,
     "s.yaml:4: bias_bits must be an integer from 2 to 32, not 33"),
    ("yaml-skip-k-fraction", _sweep("s.yaml", SMALL + "grid: {skip_k_conv: [1.5]}\n"), 2,
     "skip_k_conv must be a non-negative integer, not 1.5"),
    ("yaml-method-unknown", _sweep("s.yaml", SMALL + "grid: {activation_method: [entropy]}\n"), 2,
     "activation_method must be one of"),
    ("yaml-batch-size-string", _sweep("s.yaml", SMALL.replace("batch_size: 16", "batch_size: '16'")),
     2, "s.yaml:3: batch_size must be an integer >= 1, not '16'"),
    ("yaml-batch-size-bool", _sweep("s.yaml", SMALL.replace("batch_size: 16", "batch_size: true")),
     2, "s.yaml:3: batch_size must be an integer >= 1, not True"),
    ("yaml-seed-negative", _sweep("s.yaml", SMALL + "seed: -1\n"), 2,
     "s.yaml:4: seed must be an integer >= 0, not -1"),
    ("yaml-float32-string", _sweep("s.yaml", SMALL + "float32: 'yes'\n"), 2,
     "s.yaml:4: float32 must be true or false, not 'yes'"),
    ("yaml-pretrained-number", _sweep("s.yaml", SMALL + "pretrained: 1\n"), 2,
     "s.yaml:4: pretrained must be true or false, not 1"),
    ("yaml-name-path", _sweep("s.yaml", SMALL + "name: ../elsewhere\n"), 2,
     "s.yaml:4: name must be a folder name"),
    ("yaml-models-missing", _sweep("s.yaml", "batch_size: 4\n"), 2, "'models' is required"),
    ("yaml-models-empty", _sweep("s.yaml", "models: []\n"), 2,
     "s.yaml:1: models must be a non-empty list"),
    ("yaml-model-unknown", _sweep("s.yaml", "models:\n  - fmnist_resnet20_v1\n  - resnet1000\n"), 2,
     "s.yaml:3: unknown model 'resnet1000'"),
    ("yaml-model-twice", _sweep("s.yaml", "models:\n  - fmnist_resnet20_v1\n  - fmnist_resnet20_v1\n"),
     2, "s.yaml:3: model fmnist_resnet20_v1 is listed twice"),
    ("yaml-onnx-missing", _sweep("s.yaml", "models: [nowhere/model.onnx]\n"), 2,
     "s.yaml:1: ONNX model not found: nowhere/model.onnx"),
    ("yaml-grid-a-list", _sweep("s.yaml", SMALL + "grid: [bias, 8]\n"), 2,
     "s.yaml:4: grid must be a mapping"),
    ("yaml-grid-empty-axis", _sweep("s.yaml", SMALL + "grid: {bias: []}\n"), 2,
     "s.yaml:4: grid.bias must be a non-empty list"),
    ("yaml-variants-a-mapping", _sweep("s.yaml", SMALL + "variants: {bias: 8}\n"), 2,
     "s.yaml:4: variants must be a non-empty list"),
    ("yaml-nothing-to-run", _sweep("s.yaml", SMALL + "float32: false\n"), 2, "nothing to run"),
    # --- sweep configs: data keys -----------------------------------------------------------------
    ("yaml-data-a-list", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata: [16]\n"), 2,
     "s.yaml:2: data must be a mapping"),
    ("yaml-num-images-zero", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata: {num_images: 0}\n"),
     2, "s.yaml:2: data.num_images must be at least 1"),
    ("yaml-num-images-word", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  num_images: ten\n"),
     2, "s.yaml:3: data.num_images has the wrong type (str)"),
    ("yaml-num-images-too-many", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  num_images: 999999\n"), 2,
     "s.yaml:3: data.num_images 999999: exceeds the 10000 images"),
    ("yaml-calib-images-too-many", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  num_images: 16\n  calib_images: 5000\n"
                  "grid: {bias: [8]}\n"),
     2, "s.yaml:4: data.calib_images 5000: exceeds the 2000 images"),
    ("yaml-calib-range-overlap", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  num_images: 16\n  calib_range: '8:24'\n"
                  "grid: {bias: [8]}\n"),
     2, "s.yaml:4: data.calib_range 8:24: calibration images 8:24 overlap the evaluated images 0:16"),
    ("yaml-calib-range-outside", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  num_images: 16\n  calib_range: '20000:20010'\n"
                  "grid: {bias: [8]}\n"),
     2, "s.yaml:4: data.calib_range 20000:20010: outside the 10000 images"),
    ("yaml-calib-range-malformed", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  calib_range: '5-9'\n"), 2,
     "s.yaml:3: data.calib_range: image range must look like START:STOP"),
    ("yaml-calib-range-reversed", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  calib_range: '9:3'\n"), 2,
     "s.yaml:3: data.calib_range needs 0 <= START < STOP"),
    ("yaml-data-missing", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  data: /no/such\n"),
     2, "s.yaml:3: data.data: /no/such does not exist"),
    ("yaml-crop-ratio", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata: {crop_ratio: 2}\n"), 2,
     "s.yaml:2: data.crop_ratio must be at most 1, not 2"),
    ("yaml-input-size", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata: {input_size: 4}\n"), 2,
     "s.yaml:2: data.input_size must be at least 8, not 4"),
    ("yaml-std-zero", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata: {std: [0]}\n"), 2,
     "s.yaml:2: data.std must be positive, not (0.0,)"),
    ("yaml-mean-words", _sweep("s.yaml", "models: [fmnist_resnet20_v1]\ndata:\n  mean: [a]\n"), 2,
     "s.yaml:3: data.mean must be comma-separated numbers"),
    ("yaml-calib-data-a-file", _sweep(
        "s.yaml", "models: [fmnist_resnet20_v1]\ndata: {calib_data: {ws}/a-file.txt}\ngrid: {bias: [8]}\n"),
     1, "data source not found or not understood"),
    ("yaml-second-model-unreadable", _sweep(
        "s.yaml", "models:\n  - fmnist_resnet20_v1\n  - {ws}/garbage.onnx\n"), 1,
     "s.yaml:3: cannot read ONNX model {ws}/garbage.onnx"),
    ("yaml-cli-num-images", ("sweep-args", ["sweep", "{cfg}", "--num-images", "999999"]),
     2, "--num-images 999999: exceeds the 10000 images"),
    # --- command-line options -------------------------------------------------------------------
    ("cli-unknown-model", ["evaluate", "--model", "resnet1000_v9"], 2, "unknown model 'resnet1000_v9'"),
    ("cli-zoo-no-weights", ["evaluate", "--model", "resnet18_v1", "--data", "{ws}/val",
                            "--float-only"], 2,
     "'resnet18_v1' needs weights: pass --pretrained"),
    ("cli-params-and-pretrained", R18 + ["--pretrained", "--data", "{ws}/val", "--float-only"], 2,
     "give either --params or --pretrained, not both"),
    ("cli-zoo-no-data", ["evaluate", "--model", "resnet18_v1", "--params", "{ws}/r18.params"], 2,
     "'resnet18_v1' needs --data"),
    ("cli-params-missing", EVAL + ["--params", "missing.params"], 2, "missing.params"),
    ("cli-params-garbage", EVAL + ["--params", "{ws}/garbage.params"], 1,
     "cannot read parameter file {ws}/garbage.params: not an MXNet .params file"),
    ("cli-params-empty", EVAL + ["--params", "{ws}/empty.params"], 1,
     "cannot read parameter file {ws}/empty.params"),
    ("cli-params-misfit", EVAL + ["--params", "{ws}/vgg.params"], 1,
     "{ws}/vgg.params does not fit this architecture: layer"),
    ("cli-params-two-models", EVAL + ["--model", "fmnist_vgg11_bn", "--params", "{ws}/vgg.params"],
     2, "--params and --calib apply to one --model only"),
    ("cli-onnx-garbage", ["evaluate", "--model", "{ws}/garbage.onnx", "--data", "{ws}/val"], 1,
     "cannot read ONNX model {ws}/garbage.onnx"),
    ("cli-num-images-zero", EVAL + ["--num-images", "0"], 2, "--num-images"),
    ("cli-num-images-too-many", EVAL + ["--num-images", "20000"], 2,
     "--num-images 20000: exceeds the 10000 images"),
    ("cli-calib-images-too-many", EVAL + ["--calib-images", "5000"], 2,
     "--calib-images 5000: exceeds the 2000 images"),
    ("cli-calib-range-malformed", EVAL + ["--calib-range", "3-9"], 2, "START:STOP"),
    ("cli-calib-range-reversed", EVAL + ["--calib-range", "9:3"], 2, "need 0 <= START < STOP"),
    ("cli-calib-range-outside", EVAL + ["--calib-range", "20000:20010"], 2,
     "--calib-range 20000:20010: outside the 10000 images"),
    ("cli-calib-range-overlap", R18 + ["--data", "{ws}/val", "--num-images", "3", "--calib-range",
                                       "0:2"], 2, "--calib-range 0:2: calibration images 0:2 overlap"),
    ("cli-no-room-to-calibrate", R18 + ["--data", "{ws}/val", "--num-images", "4"], 2,
     "--num-images 4: calibration images 0:4 overlap the evaluated images 0:4"),
    ("cli-mean-two-values", R18 + ["--data", "{ws}/val", "--mean", "0.5,0.5", "--float-only"], 2,
     "--mean: mean has 2 values for 3 channel(s)"),
    ("cli-mean-four-values", R18 + ["--data", "{ws}/val", "--mean", "1,2,3,4", "--float-only"], 2,
     "--mean: mean has 4 values for 3 channel(s)"),
    ("cli-mean-words", EVAL + ["--mean", "a,b,c"], 2, "mean must be comma-separated numbers"),
    ("cli-std-zero", R18 + ["--data", "{ws}/val", "--std", "0,0,0", "--float-only"], 2,
     "--std: std must be positive, not (0.0, 0.0, 0.0)"),
    ("cli-std-negative", EVAL + ["--std=-0.1"], 2, "--std: std must be positive, not (-0.1,)"),
    ("cli-std-nan", EVAL + ["--std", "nan"], 2, "--std: std must be finite numbers, not (nan,)"),
    ("cli-mean-inf", EVAL + ["--mean", "inf"], 2, "--mean: mean must be finite numbers"),
    ("cli-bias-33", EVAL + ["--bias-bits", "33"], 2, "bias bits must be from 2 to 32"),
    ("cli-bias-word", EVAL + ["--bias-bits", "int16"], 2, "neither a bit count nor int32-acc"),
    ("cli-method-unknown", EVAL + ["--method", "entropy"], 2, "'entropy' is not one of"),
    ("cli-percentile-zero", EVAL + ["--percentile", "0"], 2, "--percentile"),
    ("cli-percentile-word", EVAL + ["--percentile", "high"], 2, "--percentile"),
    ("cli-global-scale-negative", EVAL + ["--global-scale", "-1"], 2, "--global-scale"),
    ("cli-batch-size-zero", EVAL + ["--batch-size", "0"], 2, "--batch-size"),
    ("cli-input-size-tiny", EVAL + ["--input-size", "4"], 2, "--input-size"),
    ("cli-crop-ratio-two", EVAL + ["--crop-ratio", "2"], 2, "--crop-ratio"),
    ("cli-threads-zero", ["--threads", "0", "models"], 2, "--threads"),
    ("env-threads-word", ("env", {"QCAL_THREADS": "abc"}, ["models"]), 2,
     "QCAL_THREADS must be a number of threads >= 1, not 'abc'"),
    ("env-threads-zero", ("env", {"QCAL_THREADS": "0"}, ["models"]), 2,
     "QCAL_THREADS must be a number of threads >= 1, not '0'"),
    ("env-threads-negative", ("env", {"QCAL_THREADS": "-2"}, ["models"]), 2, "QCAL_THREADS"),
    # --- files given to qcal ----------------------------------------------------------------------
    ("file-calib-half", EVAL + ["--calib", "{ws}/calib-half.npz"], 1,
     "{ws}/calib-half.npz is not a qcal calibration file, or is damaged"),
    ("file-calib-check-record", EVAL + ["--calib", "{ws}/calib-tail.npz"], 1,
     "{ws}/calib-tail.npz"),
    ("file-calib-flipped-byte", EVAL + ["--calib", "{ws}/calib-flipped.npz"], 1,
     "calibration file {ws}/calib-flipped.npz failed its check"),
    ("file-calib-equalize", EVAL + ["--equalize", "--calib", "{ws}/calib.npz"], 2,
     "equalize: {ws}/calib.npz holds the ranges of the model as imported"),
    ("cli-bias-correction-unknown", EVAL + ["--bias-correction", "aimet"], 2,
     "'aimet' is not one of 'none', 'empirical'"),
    ("file-calib-garbage", EVAL + ["--calib", "{ws}/garbage.npz"], 1, "{ws}/garbage.npz"),
    ("file-calib-numpy", EVAL + ["--calib", "{ws}/numpy.npz"], 1,
     "{ws}/numpy.npz is not a qcal calibration file"),
    ("file-calib-empty", EVAL + ["--calib", "{ws}/empty.npz"], 1, "{ws}/empty.npz"),
    ("file-calib-other-model", ["evaluate", "--model", "fmnist_vgg11_bn", "--num-images", "16",
                                "--calib", "{ws}/calib.npz", "--quiet"], 1,
     "was made for model 'fmnist_resnet20_v1'"),
    ("file-calib-needs-histograms", EVAL + ["--calib", "{ws}/calib.npz", "--method", "kl"], 1,
     "method 'kl' needs histograms"),
    ("file-data-no-class-folders", EVAL + ["--calib-data", "."], 1,
     "has no images in class folders"),
    ("file-data-no-images", EVAL + ["--calib-data", "{ws}/no-images"], 1,
     "{ws}/no-images has no images in class folders"),
    ("file-data-plain-file", EVAL + ["--calib-data", "{ws}/a-file.txt"], 1,
     "data source not found or not understood: {ws}/a-file.txt"),
    ("file-rec-garbage-idx", EVAL + ["--calib-data", "{ws}/garbage.rec"], 1,
     "{ws}/garbage.idx is not a RecordIO index"),
    ("file-rec-no-idx", EVAL + ["--calib-data", "{ws}/lonely.rec"], 1,
     "RecordIO file not found: {ws}/lonely.idx"),
    ("file-rec-damaged", EVAL + ["--calib-data", "{ws}/damaged.rec"], 1,
     "{ws}/damaged.rec: record 0 (key 0) cannot be read"),
    ("file-fmnist-garbage", EVAL + ["--data", "{ws}/fmnist-garbage"], 1,
     "{ws}/fmnist-garbage/t10k-images-idx3-ubyte.gz is not an IDX uint8 file"),
    ("file-fmnist-cut-gzip", EVAL + ["--data", "{ws}/fmnist-cut"], 1,
     "{ws}/fmnist-cut/t10k-images-idx3-ubyte.gz is not a gzip IDX file, or is truncated"),
    ("file-fmnist-missing", EVAL + ["--data", "{ws}/fmnist-missing"], 1,
     "Fashion-MNIST file not found: {ws}/fmnist-missing/t10k-images-idx3-ubyte.gz"),
    ("file-jpeg-truncated", R18 + ["--data", "{ws}/truncated", "--float-only", "--output",
                                   "t.csv"], 1,
     "image {ws}/truncated/970/ILSVRC2012_val_00000002.JPEG is truncated"),
    ("file-jpeg-empty", R18 + ["--data", "{ws}/empty-jpeg", "--float-only", "--output", "t.csv"],
     1, "cannot decode image {ws}/empty-jpeg/065/ILSVRC2012_val_00000001.JPEG"),
    # --- where results go -----------------------------------------------------------------------
    ("out-suffix", EVAL + ["--output", "table.xlsx"], 2, "--output"),
    ("out-parent-is-file", EVAL + ["--output", "{ws}/a-file.txt/t.csv"], 1,
     "--output {ws}/a-file.txt/t.csv: {ws}/a-file.txt is a file, not a folder"),
    ("out-is-folder", EVAL + ["--output", "{ws}/val"], 2, "--output"),
    ("out-cannot-write", EVAL + ["--output", "/sys/qcal-test/t.csv"], 1,
     "--output /sys/qcal-test/t.csv: cannot write into /sys/qcal-test"),
    ("out-results-dir-is-file", EVAL + ["--results-dir", "{ws}/a-file.txt"], 2, "--results-dir"),
    ("out-results-dir-under-file", EVAL + ["--results-dir", "{ws}/a-file.txt/r"], 1,
     "--results-dir {ws}/a-file.txt/r: {ws}/a-file.txt is a file, not a folder"),
    ("out-results-dir-foreign", EVAL + ["--results-dir", "{ws}"], 2,
     "output folder {ws} holds files qcal did not write"),
    ("out-cache-dir-under-file", EVAL + ["--cache-dir", "{ws}/a-file.txt/cache"], 1,
     "--cache-dir {ws}/a-file.txt/cache: {ws}/a-file.txt is a file, not a folder"),
    ("out-sweep-under-file", ("sweep-args", ["sweep", "{cfg}", "--output",
                                             "{ws}/a-file.txt/s"]), 1,
     "--output {ws}/a-file.txt/s: {ws}/a-file.txt is a file, not a folder"),
    ("out-sweep-cannot-write", ("sweep-args", ["sweep", "{cfg}", "--output",
                                               "/sys/qcal-test"]), 1,
     "--output /sys/qcal-test: cannot write into /sys/qcal-test"),
    ("out-calibrate-suffix", CAL + ["--output", "c.txt"], 2, "must end in .npz"),
    ("out-calibrate-plots-under-file", CAL + ["--output", "c.npz", "--plots",
                                              "{ws}/a-file.txt/plots"], 1,
     "--plots {ws}/a-file.txt/plots: {ws}/a-file.txt is a file, not a folder"),
    ("out-calibrate-cannot-write", CAL + ["--output", "/sys/qcal-test/c.npz"], 1,
     "--output /sys/qcal-test/c.npz: cannot write into /sys/qcal-test"),
    ("out-calibrate-data-bad", CAL + ["--output", "c.npz", "--calib-images", "5000"], 2,
     "--calib-images 5000: exceeds the 2000 images"),
    # --- qcal sensitivity and qcal report ----------------------------------------------------
    ("sens-images-zero", SENS + ["--images", "0"], 2, "--images"),
    ("sens-mode", SENS + ["--mode", "bits"], 2, "'bits' is not one of"),
    ("sens-probe-bits", SENS + ["--probe-bias-bits", "1"], 2, "--probe-bias-bits"),
    ("sens-nothing", ["sensitivity"], 2, "give a CONFIG file or --model"),
    ("sens-both", ("sweep-args", ["sensitivity", "{cfg}", "--model", "fmnist_resnet20_v1"]), 2,
     "give either CONFIG or --model"),
    ("sens-float-layer", SENS + ["--float-layers", "nosuch"], 2,
     "float_layers: model 'fmnist_resnet20_v1' has no layer 'nosuch'"),
    ("sens-layer-bias", SENS + ["--layer-bias-bits", "cifarresnetv10_stage1_relu0_fwd=8"], 2,
     "layer_bias_bits: layer 'cifarresnetv10_stage1_relu0_fwd' of model 'fmnist_resnet20_v1' "
     "has no bias"),
    ("sens-too-many-images", SENS + ["--num-images", "999999"], 2,
     "--num-images 999999: exceeds the 10000 images"),
    ("sens-key", _sensitivity("s.yaml", SMALL + "sensitivity: {imgs: 4}\n"), 2,
     "s.yaml:4: unknown sensitivity key 'imgs'"),
    ("sens-value", _sensitivity("s.yaml", SMALL + "sensitivity:\n  images: -1\n"), 2,
     "s.yaml:5: sensitivity.images must be an integer >= 1, not -1"),
    ("sens-engine", _sensitivity("s.yaml", SMALL + "sensitivity:\n  engine: tvm\n"), 2,
     "s.yaml:5: sensitivity.engine must be one of integer, simulated, not 'tvm'"),
    ("sens-modes", _sensitivity("s.yaml", SMALL + "sensitivity: {modes: [float, all]}\n"), 2,
     "s.yaml:4: sensitivity.modes: 'all' is not a sensitivity mode"),
    ("sens-section-list", _sensitivity("s.yaml", SMALL + "sensitivity: [4]\n"), 2,
     "s.yaml:4: sensitivity must be a mapping"),
    ("sens-out-under-file", SENS + ["--output", "{ws}/a-file.txt/s"], 1,
     "--output {ws}/a-file.txt/s: {ws}/a-file.txt is a file, not a folder"),
    ("sens-out-foreign", SENS + ["--output", "{ws}"], 2,
     "output folder {ws} holds files qcal did not write"),
    ("report-missing", ["report", "{ws}/nowhere"], 2, "does not exist"),
    ("report-no-results", ["report", "{ws}"], 1, "{ws} holds no qcal results"),
    ("report-damaged", ["report", "{ws}/damaged-results"], 1,
     "{ws}/damaged-results/sensitivity.json cannot be read"),
    ("report-foreign", ["report", "{ws}/foreign-results"], 1,
     "{ws}/foreign-results/sensitivity.json is not a summary this qcal writes"),
]


def _error_lines(output: str) -> list:
    """The lines of an error message (click prints a usage hint above a bad invocation's)."""
    return [line for line in output.splitlines()
            if line.strip() and not line.startswith(("Usage: ", "Try '"))]


def _left_in(folder: Path) -> list:
    return sorted(str(p.relative_to(folder)) for p in folder.rglob("*"))


@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_refused_in_one_line(case, ws, tmp_path, monkeypatch):
    _, spec, exit_code, culprit = case
    work = tmp_path / "work"
    work.mkdir()
    (tmp_path / "cfg.yaml").write_text(SMALL)  # for cases that only vary the command line
    monkeypatch.chdir(work)  # default outputs (results/, .qcal-cache/) land here too
    env = {}

    def fill(text):
        return str(text).replace("{cfg}", str(tmp_path / "cfg.yaml")).replace("{ws}", str(ws))

    if isinstance(spec, tuple) and spec[0] in ("sweep", "sensitivity"):
        config = work.parent / spec[1]
        text = spec[2]
        if isinstance(text, bytes):
            config.write_bytes(text)
        else:
            config.write_text(fill(text))
        args = [spec[0], str(config), "--quiet"]
        culprit = culprit.replace(spec[1], str(config))
    elif isinstance(spec, tuple) and spec[0] == "env":
        env, args = spec[1], spec[2]
    elif isinstance(spec, tuple):
        args = spec[1]
    else:
        args = list(spec)
    args = [fill(a) for a in args]
    result = CliRunner(env=env).invoke(main, args, catch_exceptions=False)
    assert result.exit_code == exit_code, result.output
    lines = _error_lines(result.output)
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    assert fill(culprit) in lines[0], result.output
    assert "Traceback" not in result.output
    assert _left_in(work) == []


def test_a_sweep_reports_every_problem_with_its_line(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "s.yaml"
    config.write_text("models: [fmnist_resnet20_v1, resnet1000]\n"    # 1
                      "batch_size: 0\n"                                 # 2
                      "grid:\n"                                         # 3
                      "  bias: [8, 33]\n"                               # 4
                      "  skip_dense: ['no']\n"                          # 5
                      "variants:\n"                                     # 6
                      "  - {activation_method: entropy}\n"              # 7
                      "colour: blue\n")                                 # 8
    result = CliRunner().invoke(main, ["sweep", str(config)], catch_exceptions=False)
    assert result.exit_code == 2
    lines = _error_lines(result.output)
    assert [line.replace("Error: ", "").split(":")[1] for line in lines] == [
        "8", "1", "2", "4", "5", "7"], result.output
    assert "Traceback" not in result.output and not (tmp_path / "results").exists()


def test_a_sweep_checks_every_model_and_output_together(tmp_path, monkeypatch, ws):
    """Weights of the second model, data of the first and the output folder: all at once, before
    the first model runs."""
    monkeypatch.chdir(tmp_path)
    config = tmp_path / "s.yaml"
    config.write_text("models: [fmnist_resnet20_v1, resnet18_v1]\n"
                      "data: {num_images: 16, calib_images: 5000}\n"
                      "grid: {bias: [8]}\n")
    result = CliRunner().invoke(main, ["sweep", str(config), "--quiet", "--output",
                                       str(ws / "a-file.txt" / "out")], catch_exceptions=False)
    assert result.exit_code == 2
    text = "\n".join(_error_lines(result.output))
    assert f"{config}:1: 'resnet18_v1' needs weights" in text
    assert f"{config}:2: data.calib_images 5000: exceeds the 2000 images" in text
    assert f"{ws / 'a-file.txt'} is a file, not a folder" in text
    assert _left_in(tmp_path) == ["s.yaml"]


def _sweep_once(tmp_path, text, *extra):
    config = tmp_path / "s.yaml"
    config.write_text(text)
    return CliRunner().invoke(main, ["sweep", str(config), "--quiet", "--output",
                                     str(tmp_path / "out"), *extra], catch_exceptions=False)


def test_a_results_folder_belongs_to_one_config(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    base = "models: [fmnist_resnet20_v1]\ndata: {num_images: 16}\nbatch_size: 16\n"
    assert _sweep_once(tmp_path, base).exit_code == 0
    owner = json.loads((tmp_path / "out" / "config.json").read_text())
    assert owner["identity"]["data"] == {"num_images": 16}
    results = (tmp_path / "out" / "results.json").read_bytes()
    # another config: refused, naming the difference, and the folder is untouched
    result = _sweep_once(tmp_path, base.replace("16}", "32}"))
    assert result.exit_code == 2
    line = _error_lines(result.output)[0]
    assert "holds the results of another config (data.num_images is 16 there, 32 here" in line
    assert "--force" in line and (tmp_path / "out" / "results.json").read_bytes() == results
    # fewer variants than the folder holds: refused too (the table would lose rows)
    result = _sweep_once(tmp_path, base + "float32: false\ngrid: {bias: [8]}\n")
    assert result.exit_code == 2 and "float32 is not evaluated by this config" in result.output
    # a superset resumes: the first model's float32 is reused, only the new model runs
    result = _sweep_once(tmp_path, base.replace("[fmnist_resnet20_v1]",
                                                "[fmnist_resnet20_v1, fmnist_vgg11_bn]"))
    assert result.exit_code == 0, result.output
    log = (tmp_path / "out" / "sweep.log").read_text()
    assert "adds models or variants" in log
    assert "fmnist_resnet20_v1 float32: finished earlier, reusing" in log
    assert json.loads((tmp_path / "out" / "config.json").read_text())["identity"]["models"] == [
        "fmnist_resnet20_v1", "fmnist_vgg11_bn"]
    # --force hands the folder to another config
    result = _sweep_once(tmp_path, base.replace("16}", "32}"), "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((tmp_path / "out" / "config.json").read_text())["identity"]["data"] == {
        "num_images": 32}
    # a damaged config.json is never taken for agreement
    (tmp_path / "out" / "config.json").write_text("{not json")
    result = _sweep_once(tmp_path, base.replace("16}", "32}"))
    assert result.exit_code == 2 and "config.json cannot be read" in result.output


def test_an_escaping_error_is_one_line_and_a_log(tmp_path, monkeypatch):
    """What qcal does not translate is a bug: one line naming it and the file with the full
    traceback (a real numpy error, raised inside a command)."""
    import click

    from qcal.cli.params import translate_errors

    monkeypatch.setenv("QCAL_CRASH_DIR", str(tmp_path / "crash"))

    @click.command()
    @translate_errors
    def broken():
        np.zeros(3).reshape(2)

    result = CliRunner().invoke(broken, [], catch_exceptions=False)
    assert result.exit_code == 1
    lines = _error_lines(result.output)
    assert len(lines) == 1 and "internal error ValueError: cannot reshape array" in lines[0]
    assert "Traceback" not in result.output
    logs = list((tmp_path / "crash").glob("qcal-crash-*.log"))
    assert len(logs) == 1 and str(logs[0]) in lines[0]
    assert "Traceback (most recent call last)" in logs[0].read_text()
    assert "reshape" in logs[0].read_text()


def test_ctrl_c_mid_compile_exits_130_in_one_line_and_resumes(tmp_path):
    """A real process interrupted while TVM compiles its int8 model: exit 130, one line, no
    traceback; the same command then finishes, reusing the float32 result."""
    env = dict(os.environ, QCAL_CACHE_DIR=str(tmp_path / "compiled"), PYTHONUNBUFFERED="1")
    args = [sys.executable, "-m", "qcal.cli", "evaluate", "--model", "fmnist_resnet20_v1",
            "--num-images", "16", "--calib-images", "16", "--batch-size", "16",
            "--cache-dir", str(tmp_path / "batches"), "--results-dir", str(tmp_path / "r")]
    process = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env,
                               cwd=tmp_path)
    seen = b""
    while b"requantize" not in seen:  # the integer graph's report: tvm.compile starts next
        chunk = process.stdout.readline()
        assert chunk, seen.decode(errors="replace")
        seen += chunk
    time.sleep(0.3)
    process.send_signal(signal.SIGINT)
    rest, _ = process.communicate(timeout=120)
    output = (seen + rest).decode(errors="replace")
    assert process.returncode == 130, output
    tail = rest.decode(errors="replace").strip().splitlines()
    assert tail[-1].startswith("Interrupted: finished work is kept"), output
    assert "Traceback" not in output
    left = os.listdir(tmp_path / "r" / "variants")
    assert not [name for name in left if ".tmp" in name]
    done = subprocess.run(args + ["--quiet"], capture_output=True, text=True, env=env,
                          cwd=tmp_path)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "float32: finished earlier, reusing" in (tmp_path / "r" / "sweep.log").read_text()
