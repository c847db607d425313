import dataclasses
import json
import os
import subprocess
import sys

import pytest
from click.testing import CliRunner

from qcal import __version__
from qcal.cli import main
from qcal.drivers.sweep import ResultStore


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0 and __version__ in result.output


def test_models_lists_zoo_and_embedded():
    result = invoke("models")
    assert result.exit_code == 0, result.output
    listed, families = result.output.split("\n\n")
    lines = listed.splitlines()
    assert len(lines) == 10 + 8 + 3  # ResNet 5 depths x v1/v2, VGG 4 depths x bn, embedded
    for family in ("imagenet-zoo", "fashion-mnist", "mxnet-export", "gluoncv-zoo", "onnx"):
        assert f"  {family} " in families
    assert any(line.startswith("fmnist_resnet56_v2") and "embedded" in line for line in lines)
    assert any(line.startswith("resnet101_v2") for line in lines)


@pytest.mark.parametrize("args, exit_code, message", [
    (["--model", "resnet1000_v9"], 2, "unknown model 'resnet1000_v9'"),
    (["--model", "resnet18_v1"], 2, "needs --data"),
    (["--model", "fmnist_vgg11_bn", "--num-images", "0"], 2, "--num-images"),
    (["--model", "fmnist_vgg11_bn", "--num-images", "20000"], 2, "exceeds the 10000 images"),
    (["--model", "fmnist_vgg11_bn", "--output", "table.xlsx"], 2, "--output"),
    (["--model", "fmnist_vgg11_bn", "--params", "missing.params"], 2, "missing.params"),
    (["--model", "fmnist_vgg11_bn", "--calib-range", "3-9"], 2, "START:STOP"),
    (["--model", "fmnist_resnet20_v1", "--calib-data", "."], 1, "class folder"),
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
                    "--num-images", 4, "--float-only")
    assert result.exit_code == 1, result.output
    error_lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(error_lines) == 1 and "resnet18_v1-a0666292.params" in error_lines[0]


def test_evaluate_imagenet_folder_with_local_params(tmp_path, imagenet_folder):
    """The whole float32 path on real files: JPEG folder -> MXNet -> table, every option used."""
    import mxnet as mx

    from qcal.families import resolve_model

    root, layout = imagenet_folder
    net = resolve_model("resnet18_v1").resolved_network()
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
    assert [r["variant"] for r in rows] == ["float32", "a:power2 w:power2/tensor b16"]
    # the cache holds the evaluated batches (2 + 2 + 1 images) and the calibration batches
    # (images 5..7: 2 + 1) at the requested size, each decoded once for both variants
    import numpy as np

    shapes = sorted(np.load(p).shape for p in (tmp_path / "cache").glob("*.npy"))
    assert shapes == [(1, 3, 64, 64)] * 2 + [(2, 3, 64, 64)] * 3


def test_evaluate_int8_options_reach_the_pipeline(tmp_path):
    """Every quantization option given on the command line shows up in the recorded variant."""
    results = tmp_path / "results"
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", "--num-images", 64,
                    "--calib-images", 64, "--batch-size", 32, "--method", "percentile",
                    "--percentile", 99.9, "--weight-scale", "max", "--weight-granularity",
                    "channel", "--bias-bits", 9, "--bias-granularity", "channel",
                    "--bias-correction", "empirical", "--equalize",
                    "--skip-k-conv", 1, "--skip-dense",
                    "--weight-bits", 6, "--activation-bits", 7, "--last-layer-bits", 8,
                    "--rounding", "nearest", "--quantize-ops", "conv2d,dense,relu,max_pool2d",
                    "--intermediate-bits", 16,
                    "--results-dir", results, "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.exit_code == 0, result.output
    summary = json.loads((results / "results.json").read_text())
    int8 = [v for v in summary["variants"] if v["description"]["variant"] is not None]
    assert len(int8) == 1
    assert int8[0]["description"]["variant"] == {
        "activation_method": "percentile", "percentile": 99.9, "global_scale": 8.0,
        "weight_scale": "max", "weight_granularity": "channel", "bias_mode": "bits",
        "bias_bits": 9, "bias_granularity": "channel", "bias_correction": "empirical",
        "skip_k_conv": 1, "skip_dense": True,
        "weight_bits": 6,
        "activation_bits": 7, "first_layer_bits": None, "last_layer_bits": 8,
        "rounding": "nearest", "quantize_ops": ["conv2d", "dense", "relu", "max_pool2d"],
        "float_layers": [], "simulate": False, "equalize": True, "intermediate_bits": 16}
    assert int8[0]["description"]["data"]["calibration"]["range"] == [0, 64]
    rows = {r["variant"]: r for r in summary["rows"]}
    label = ("a:p99.9 w:max/channel b9/channel cle bcorr-empirical skip1 fdense W6A7 last8 round-nearest "
             "intermediates:16b ops:conv2d+dense+relu+max_pool2d")
    assert set(rows) == {"float32", label}
    assert f"| fmnist_vgg11_bn | {label} | 64 | 2 |" in result.output
    # float layers (skip1, fdense) sum in another order: checked layer by layer
    record = ResultStore(results).load(int8[0]["key"])[0]
    assert (record["verified_images"], record["verify_check"]) == (2, "layers")
    assert "verified: calibration images on which the compiled int8 model" in result.output


def test_verify_images_zero_records_unverified_rows(tmp_path):
    results = tmp_path / "results"
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", "--num-images", 16,
                    "--calib-images", 16, "--verify-images", 0, "--results-dir", results,
                    "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.exit_code == 0, result.output
    rows = {r["variant"]: r for r in json.loads((results / "results.json").read_text())["rows"]}
    assert rows["a:power2 w:power2/tensor b16"]["verified"] == 0
    assert rows["float32"]["verified"] is None
    assert "| fmnist_vgg11_bn | a:power2 w:power2/tensor b16 | 16 | 0 |" in result.output


def test_a_miscompiled_variant_stops_with_one_line_naming_the_layer(tmp_path, monkeypatch):
    """A qconv2d emitter that negates one filter of the third conv (a wrong kernel put in through
    the backend's emitter table): no table, exit 1, the layer named, nothing of it saved."""
    from qcal.backend.tvm import emit as tvm_adapter

    right = tvm_adapter.EMITTERS.lookup("qconv2d")

    def wrong(node, x, batch):
        if node.name.startswith("vgg0_conv2_fwd"):
            weight = node.params["weight"].copy()
            weight[0] = -weight[0]
            node = dataclasses.replace(node, params={**node.params, "weight": weight})
        return right(node, x, batch)

    monkeypatch.setitem(tvm_adapter.EMITTERS._handlers, "qconv2d", wrong)
    results = tmp_path / "results"
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", "--num-images", 16,
                    "--calib-images", 16, "--results-dir", results,
                    "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.exit_code == 1, result.output
    lines = result.output.splitlines()
    assert len(lines) == 1 and lines[0].startswith(
        "Error: fmnist_vgg11_bn a:power2 w:power2/tensor b16: the compiled model differs from its "
        "numpy integer reference on 2 calibration images; first differing layer "
        "'vgg0_conv2_fwd' (qconv2d > "), result.output
    assert not (results / "results.md").exists()
    assert len(list((results / "variants").glob("*.json"))) == 1  # float32 only
    assert "first differing layer 'vgg0_conv2_fwd'" in (results / "sweep.log").read_text()


def test_repeated_options_make_the_cross_product(tmp_path):
    out = tmp_path / "table.csv"
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", "--num-images", 32,
                    "--calib-images", 32, "--bias-bits", 8, "--bias-bits", "int32-acc",
                    "--method", "max", "--method", "kl", "--output", out,
                    "--cache-dir", tmp_path / "cache", "--quiet")
    assert result.exit_code == 0, result.output
    import pandas as pd

    table = pd.read_csv(out)
    assert list(table["variant"]) == ["float32", "a:max w:power2/tensor b8",
                                      "a:max w:power2/tensor b32acc", "a:kl w:power2/tensor b8",
                                      "a:kl w:power2/tensor b32acc"]


def test_calibrate_then_evaluate_reuses_the_file(tmp_path):
    calib = tmp_path / "vgg.npz"
    result = invoke("calibrate", "--model", "fmnist_vgg11_bn", "--calib-images", 64,
                    "--output", calib, "--plots", tmp_path / "plots", "--quiet",
                    "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "methods global, max, power2, l2, kl, kl-mxnet, percentile" in result.output
    assert len(list((tmp_path / "plots").glob("*.png"))) > 10
    # the data are never read again: an empty calibration split would fail a new pass
    results = tmp_path / "results"
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", "--num-images", 32, "--calib",
                    calib, "--method", "kl", "--results-dir", results, "--quiet",
                    "--cache-dir", tmp_path / "cache")
    assert result.exit_code == 0, result.output
    assert "statistics over" not in (results / "sweep.log").read_text()  # no calibration pass
    record = json.loads((results / "results.json").read_text())
    assert record["variants"][1]["description"]["calibration_file"] is not None
    variant = ResultStore(results).load(record["variants"][1]["key"])[0]
    assert variant["calibration"] == {"source": str(calib), "images": 64}


def test_calibration_file_of_another_model_is_refused(tmp_path):
    calib = tmp_path / "vgg.npz"
    assert invoke("calibrate", "--model", "fmnist_vgg11_bn", "--calib-images", 16, "--output",
                  calib, "--quiet", "--bins", 0).exit_code == 0
    result = invoke("evaluate", "--model", "fmnist_resnet20_v1", "--num-images", 16,
                    "--calib", calib, "--quiet", "--output", tmp_path / "t.md")
    assert result.exit_code == 1
    assert "fmnist_vgg11_bn" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "t.md").exists()
    # abs-max-only statistics cannot answer KL: refused, naming the method
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", "--num-images", 16,
                    "--calib", calib, "--method", "kl", "--quiet")
    assert result.exit_code == 1 and "kl" in result.output


@pytest.mark.parametrize("args, message", [
    (["--bias-bits", 33], "bias bits must be from 2 to 32"),
    (["--bias-bits", 1], "bias bits must be from 2 to 32"),
    (["--bias-bits", "int16"], "neither a bit count nor int32-acc"),
    (["--method", "entropy"], "'entropy' is not one of"),
    (["--skip-k-conv", -1], "--skip-k-conv"),
    (["--weight-bits", 9], "--weight-bits"),
    (["--activation-bits", 1], "--activation-bits"),
    (["--rounding", "even"], "'even' is not one of"),
    (["--weight-rounding", "stochastic"], "'stochastic' is not one of"),
    (["--adaround-iterations", 0], "--adaround-iterations"),
    (["--intermediate-bits", 8], "'--intermediate-bits': 8 is not in the range 9<=x<=32"),
    (["--intermediate-bits", 33], "'--intermediate-bits': 33 is not in the range 9<=x<=32"),
    (["--quantize-ops", "conv2d,pool"], "quantize_ops: 'pool' is not an op qcal quantizes"),
    (["--float-layers", "conv2d_nosuch", "--num-images", 8],
     "float_layers: model 'fmnist_vgg11_bn' has no layer 'conv2d_nosuch'"),
    (["--layer-bias-bits", "vgg0_conv0_fwd", "--num-images", 8],
     "layer_bias_bits: 'vgg0_conv0_fwd' is not NAME=BITS"),
    (["--layer-bias-bits", "conv2d_nosuch=8", "--num-images", 8],
     "layer_bias_bits: model 'fmnist_vgg11_bn' has no layer 'conv2d_nosuch'"),
])
def test_bad_quantization_options_exit_2(args, message):
    result = invoke("evaluate", "--model", "fmnist_vgg11_bn", *args)
    assert result.exit_code == 2 and message in result.output


def test_unwritable_output_is_one_line_exit_1(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("")
    result = invoke("calibrate", "--model", "fmnist_vgg11_bn", "--calib-images", 8, "--bins", 0,
                    "--output", blocker / "c.npz", "--quiet")
    assert result.exit_code == 1
    assert result.output.startswith("Error: ") and "Traceback" not in result.output


@pytest.mark.parametrize("threads", [1, 2])
def test_threads_reach_tvm_and_mxnet(threads):
    if threads > len(os.sched_getaffinity(0)):
        pytest.skip("TVM caps its pool at the CPUs it may use")
    code = ("import os; from qcal.cli import main; "
            f"main(['--threads', '{threads}', 'models'], standalone_mode=False); "
            "import tvm, mxnet; "
            "print(tvm.get_global_func('runtime.NumThreads')(), os.environ['OMP_NUM_THREADS'])")
    env = {k: v for k, v in os.environ.items() if k not in ("OMP_NUM_THREADS", "TVM_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env=env)
    assert out.stdout.strip().splitlines()[-1] == f"{threads} {threads}"


def test_threads_after_the_engines_loaded_is_refused():
    import mxnet  # noqa: F401  (loaded: too late to choose its threads)

    result = CliRunner().invoke(main, ["--threads", "2", "models"])
    assert result.exit_code == 2 and "--threads must be set before" in result.output
    assert CliRunner().invoke(main, ["--threads", "0", "models"]).exit_code == 2


def test_float32_logits_do_not_depend_on_threads():
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one CPU")
    code = ("import hashlib, numpy as np, mxnet as mx; from qcal.families import resolve_model; "
            "from qcal.data.sources import FashionMNISTSource; "
            "net = resolve_model('fmnist_resnet56_v2').net; net.hybridize(static_alloc=True); "
            "x = FashionMNISTSource('t10k').decode(np.arange(64)); "
            "print(hashlib.sha1(net(mx.nd.array(x)).asnumpy().tobytes()).hexdigest())")
    digests = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                              check=True, env=dict(os.environ, OMP_NUM_THREADS=str(threads))
                              ).stdout.strip().splitlines()[-1] for threads in (1, 2)}
    assert len(digests) == 1
