"""`qcal sensitivity` and `qcal report` on a real exported Gluon network with random weights, one
of whose layers is broken on purpose for per-tensor weight scales; and on an embedded residual
network (blocks). Outputs are written atomically, a run resumes, a report is the same bytes."""
from __future__ import annotations

import csv
import json

import mxnet as mx
import numpy as np
import pytest
from click.testing import CliRunner

from qcal.cli import main

SIZE = 16


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def broken_net():
    """conv-BN-relu-maxpool, conv-BN-relu (the broken one), conv-BN-relu, gap, dense. The
    middle conv's output channel 0 has one weight 500 times its largest, negative on a
    non-negative input, and a BatchNorm shift of -4: that channel is always cut by the ReLU
    (float32 does not see it), yet per-tensor weight scales round the layer's every other
    weight to zero."""
    from mxnet.gluon import nn

    net = nn.HybridSequential()
    net.add(nn.Conv2D(6, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"), nn.MaxPool2D(2),
            nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
            nn.Conv2D(8, 3, padding=1), nn.BatchNorm(), nn.Activation("relu"),
            nn.GlobalAvgPool2D(), nn.Dense(5))
    net.initialize(mx.init.Xavier(magnitude=2.5))
    net(mx.nd.zeros((1, 3, SIZE, SIZE)))
    rng = np.random.RandomState(2)
    params = net.collect_params()
    for name, param in params.items():
        if "running_var" in name:
            param.set_data(mx.nd.array(rng.uniform(0.5, 2.0, param.shape)))
        elif "running_mean" in name or "beta" in name:
            param.set_data(mx.nd.array(rng.normal(0, 0.3, param.shape)))
    conv = net[4]
    w = conv.weight.data().asnumpy()
    peak = np.abs(w).max()
    w[0] = 0
    w[0, 0, 1, 1] = -500 * peak
    conv.weight.set_data(mx.nd.array(w))
    bn = net[5]
    beta, mean = bn.beta.data().asnumpy(), bn.running_mean.data().asnumpy()
    beta[0], mean[0] = -4.0, 0.0
    bn.beta.set_data(mx.nd.array(beta))
    bn.running_mean.set_data(mx.nd.array(mean))
    return net


@pytest.fixture(scope="module")
def export(tmp_path_factory):
    root = tmp_path_factory.mktemp("broken")
    net = broken_net()
    net.hybridize()
    net(mx.nd.zeros((1, 3, SIZE, SIZE)))
    net.export(str(root / "broken"))
    rng = np.random.RandomState(5)
    for split, count in (("val", 12), ("calib", 16)):
        np.savez(root / f"{split}.npz", images=rng.randint(0, 256, (count, SIZE, SIZE, 3),
                                                           dtype=np.uint8),
                 labels=rng.randint(0, 5, count))
    return root


def _args(root, output, *extra):
    return ("sensitivity", "--model", root / "broken-symbol.json", "--data", root / "val.npz",
            "--calib-data", root / "calib.npz", "--input-size", SIZE, "--resize", "none",
            "--scale", 1, "--mean", 0.5, "--std", 0.25, "--images", 12, "--batch-size", 8, "--output", output,
            "--cache-dir", output.parent / "cache", "--quiet", *extra)


def _csv(path):
    with open(path) as f:
        return list(csv.DictReader(f))


def test_the_broken_layer_ranks_first_and_files_are_whole(export, tmp_path):
    out = tmp_path / "out"
    result = invoke(*_args(export, out))
    assert result.exit_code == 0, result.output
    rows = _csv(out / "sensitivity.csv")
    layers = [r for r in rows if r["kind"] == "layer"]
    assert [r["op"] for r in layers] == ["conv2d"] * 3 + ["dense"]  # network order
    broken = layers[1]["unit"]
    costs = {r["unit"]: float(r["sqnr_cost_db"]) for r in layers}
    assert max(costs, key=costs.get) == broken
    assert costs[broken] > 10 + max(v for k, v in costs.items() if k != broken)
    shares = {r["unit"]: float(r["noise_share"]) for r in layers}
    assert max(shares, key=shares.get) == broken and shares[broken] > 0.5
    text = (out / "sensitivity.md").read_text()
    assert f"| 1 | {broken} | conv2d |" in text
    assert "the numpy integer reference, which the compiled TVM model equals bit for bit" in text
    assert "the first 12 evaluation images" in text
    assert (out / "sensitivity.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "sensitivity.json").read_text())
    (run,) = summary["runs"]
    # base + (float, only, bias) per layer: 4 layers with a bias each
    assert len(run["variants"]) == 12 and run["engine"] == "integer"
    assert not [p for p in out.rglob("*") if ".qcal-" in p.name and p.name != ".qcal-lock"]
    assert text.splitlines()[0] == "# Per-layer sensitivity" and result.output.startswith(text)


def test_a_run_resumes_and_a_report_is_the_same_bytes(export, tmp_path):
    out = tmp_path / "out"
    assert invoke(*_args(export, out, "--mode", "float", "--mode", "bias")).exit_code == 0
    files = {name: (out / name).read_bytes() for name in ("sensitivity.csv", "sensitivity.md")}
    summary = json.loads((out / "sensitivity.json").read_text())
    lost = [v["key"] for v in summary["runs"][0]["variants"][:3]]
    for key in lost:
        (out / "variants" / f"{key}.json").unlink()
    result = invoke(*_args(export, out, "--mode", "float", "--mode", "bias"))
    assert result.exit_code == 0, result.output
    log = (out / "sensitivity.log").read_text()
    total = len(summary["runs"][0]["variants"]) + 1
    assert f"{total - 3} of {total} variants finished earlier" in log
    assert all((out / "variants" / f"{key}.json").exists() for key in lost)
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name
    for name in files:
        (out / name).unlink()
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    assert "sensitivity.csv" in result.output
    for name, data in files.items():
        assert (out / name).read_bytes() == data, name
    # another measurement into the same folder is refused, naming the difference
    result = invoke(*_args(export, out, "--mode", "only"))
    assert result.exit_code == 2 and "holds the results of another config" in result.output


def test_residual_blocks_and_a_config_section(tmp_path):
    config = tmp_path / "s.yaml"
    config.write_text("models: [fmnist_resnet20_v1]\ndata: {num_images: 8, calib_images: 16}\n"
                      "batch_size: 8\nvariants:\n  - {bias: 8}\n"
                      "sensitivity: {images: 4, modes: [float], engine: simulated}\n")
    out = tmp_path / "out"
    result = invoke("sensitivity", config, "--output", out, "--cache-dir", tmp_path / "cache",
                    "--quiet")
    assert result.exit_code == 0, result.output
    rows = _csv(out / "sensitivity.csv")
    blocks = [r for r in rows if r["kind"] == "block"]
    assert len(blocks) == 9 and all(r["only_sqnr_logits_db"] == "" for r in rows)
    assert {r["base"] for r in rows} == {"a:power2 w:power2/tensor b8"}
    # power-of-2 rescales; but a float layer that follows integer ops runs in float64 in the
    # simulation (float32 in the integer model): exact only when the first layer is the float one
    text = (out / "sensitivity.md").read_text()
    assert "simulated (fake-quantized) model, NOT exact for every variant" in text
    exact = [r["exact"] for r in rows if r["kind"] == "layer"]
    assert exact == ["True"] + ["False"] * (len(exact) - 1)


@pytest.mark.parametrize("name", ["sensitivity-fmnist.yaml", "sensitivity-lite0.yaml"])
def test_shipped_configs_are_valid(name):
    from qcal.drivers.sensitivity import SensitivitySettings
    from qcal.drivers.sweep_config import parse_sweep_config
    from qcal.files import REPO_ROOT

    config, problems = parse_sweep_config(REPO_ROOT / "configs" / name)
    assert not problems and len(config.variants) == 1
    settings = SensitivitySettings.from_section(config.sections["sensitivity"], str)
    assert settings.modes[0] == "float" and settings.engine == "integer"
