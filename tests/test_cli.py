import json

import pytest
from click.testing import CliRunner

from qcal import __version__
from qcal.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_models_lists_zoo_and_embedded():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert len(lines) == 10 + 8 + 3  # ResNet 5 depths x v1/v2, VGG 4 depths x bn, embedded
    assert any(line.startswith("fmnist_resnet56_v2") and "embedded" in line for line in lines)
    assert any(line.startswith("resnet101_v2") for line in lines)


@pytest.mark.parametrize("args, exit_code, message", [
    (["--model", "resnet1000_v9"], 2, "unknown model 'resnet1000_v9'"),
    (["--model", "resnet18_v1"], 2, "need --data"),
    (["--model", "fmnist_vgg11_bn", "--num-images", "0"], 2, "--num-images"),
    (["--model", "fmnist_vgg11_bn", "--num-images", "20000"], 2, "exceeds the 10000 images"),
    (["--model", "fmnist_vgg11_bn", "--output", "table.xlsx"], 2, "--output"),
    (["--model", "fmnist_vgg11_bn", "--params", "missing.params"], 2, "missing.params"),
    (["--model", "fmnist_vgg11_bn", "--calib-range", "3-9"], 2, "START:STOP"),
    (["--model", "resnet18_v1", "--data", "."], 1, "class folder"),
])
def test_bad_invocations_give_one_line_and_exit_code(args, exit_code, message, tmp_path,
                                                     monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("evaluate", *args)
    assert result.exit_code == exit_code, result.output
    assert message in result.output
    assert "Traceback" not in result.output
    assert not (tmp_path / "table.xlsx").exists()


def test_pretrained_offline_is_one_line_exit_1(tmp_path, monkeypatch, imagenet_folder):
    monkeypatch.setenv("MXNET_HOME", str(tmp_path))
    monkeypatch.setenv("QCAL_OFFLINE", "1")
    root, _ = imagenet_folder
    result = invoke("evaluate", "--model", "resnet18_v1", "--pretrained", "--data", root,
                    "--num-images", 4)
    assert result.exit_code == 1
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "resnet18_v1-a0666292.params" in error_lines[0]


def test_evaluate_imagenet_folder_with_local_params(tmp_path, imagenet_folder):
    """The whole float32 path on real files: JPEG folder -> MXNet -> table, every option used."""
    import mxnet as mx

    from qcal.models import _resolved_network

    root, layout = imagenet_folder
    net = _resolved_network("resnet18_v1")
    net.initialize(mx.init.Normal(0.05), force_reinit=True)
    params = tmp_path / "r18.params"
    net.save_parameters(str(params))
    out = tmp_path / "out" / "table.json"
    result = invoke("evaluate", "--model", "resnet18_v1", "--params", params, "--data", root,
                    "--num-images", 5, "--calib-images", 3, "--batch-size", 2,
                    "--input-size", 64, "--crop-ratio", 0.5, "--cache-dir", tmp_path / "cache",
                    "--output", out, "--quiet")
    assert result.exit_code == 0, result.output
    rows = json.loads(out.read_text())
    assert rows[0]["model"] == "resnet18_v1" and rows[0]["images"] == 5
    # the cache holds the 3 evaluated batches (2 + 2 + 1 images) at the requested size
    import numpy as np

    shapes = sorted(np.load(p).shape for p in (tmp_path / "cache").glob("*.npy"))
    assert shapes == [(1, 3, 64, 64), (2, 3, 64, 64), (2, 3, 64, 64)]
