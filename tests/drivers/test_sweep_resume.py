"""A real sweep killed mid-way and started again: nothing finished is recomputed or lost."""
import json
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

CONFIG = """\
name: resume
models: [fmnist_vgg11_bn]
data: {num_images: 96, calib_images: 64}
batch_size: 32
grid:
  activation_method: [power2, max]
  bias: [8, int32-acc]
"""


def start_sweep(config, output, cache):
    return subprocess.Popen(
        [sys.executable, "-m", "qcal.cli", "sweep", str(config), "--output", str(output),
         "--quiet"],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, cwd=cache, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)


def finished_records(output):
    folder = output / "variants"
    return {p.name: p.read_bytes() for p in folder.glob("*.json")} if folder.is_dir() else {}


def run_lines(output, marker, run=-1):
    """Log lines of one run of the sweep (the log is appended to by every run)."""
    runs = (output / "sweep.log").read_text().split(" started: ")[1:]
    return [line for line in runs[run].splitlines() if marker in line]


@pytest.mark.slow
def test_killed_sweep_resumes_without_recomputation(tmp_path):
    config = tmp_path / "resume.yaml"
    config.write_text(CONFIG)
    output = tmp_path / "out"
    proc = start_sweep(config, output, tmp_path)
    deadline = time.monotonic() + 300
    while len(finished_records(output)) < 2:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = finished_records(output)
    assert 2 <= len(before) < 5  # float32 + at least one int8 variant, not all of them
    assert not (output / "results.md").exists()

    proc = start_sweep(config, output, tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    after = finished_records(output)
    assert len(after) == 5
    for name, content in before.items():
        assert after[name] == content  # finished variants untouched
    reused = run_lines(output, "finished earlier, reusing")
    assert len(reused) == len(before)
    assert len(run_lines(output, ": running")) == 5 - len(before)  # only the unfinished ones

    # the same sweep from scratch gives the same table
    fresh = tmp_path / "fresh"
    proc = start_sweep(config, fresh, tmp_path)
    proc.communicate(timeout=600)
    resumed_table = pd.read_csv(output / "results.csv").drop(columns=["images_per_s", "wall_s"])
    fresh_table = pd.read_csv(fresh / "results.csv").drop(columns=["images_per_s", "wall_s"])
    pd.testing.assert_frame_equal(resumed_table, fresh_table)
    assert (pd.read_csv(output / "predictions.csv")
            .equals(pd.read_csv(fresh / "predictions.csv")))

    # a changed config recomputes only what it changes
    config.write_text(CONFIG.replace("bias: [8, int32-acc]", "bias: [8, 16, int32-acc]"))
    proc = start_sweep(config, output, tmp_path)
    out, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, out
    assert [line.split("INFO ")[1] for line in run_lines(output, ": running")] == [
        "fmnist_vgg11_bn a:power2 w:power2/tensor b16: running",
        "fmnist_vgg11_bn a:max w:power2/tensor b16: running"]  # only what the change added
    summary = json.loads((output / "results.json").read_text())
    assert len(summary["rows"]) == 7
    assert summary["versions"]["apache-tvm"] == "0.27.0.post1"
    assert (output / "top1.png").stat().st_size > 1000
