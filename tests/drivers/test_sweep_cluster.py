"""`qcal sweep --workers 2` (a real Dask LocalCluster of worker processes) against the
single-process sweep: the same files byte for byte apart from timings; a worker killed mid-task
costs that task only; an unreachable scheduler is one line, exit 1, nothing written."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

CONFIG = """\
name: cluster
models: [fmnist_resnet20_v1]
data: {num_images: 96, calib_images: 64}
batch_size: 32
grid:
  activation_method: [power2, max]
"""
# what depends on when and where a variant ran, not on what it computed
TIMING_COLUMNS = ["images_per_s", "wall_s"]
TIMING_FIELDS = {"wall_seconds", "images_per_s", "compile_seconds", "verify_seconds",
                 "compile_cache_hit"}


def sweep(config, output, *extra, wait=True):
    """The CLI in its own process (workers of a local cluster are processes of it)."""
    env = {**os.environ, "PYTHONPATH": os.getcwd(),
           "QCAL_CACHE_DIR": str(config.parent / "compiled")}  # one compile cache for all runs
    proc = subprocess.Popen(
        [sys.executable, "-m", "qcal.cli", "sweep", str(config), "--output", str(output),
         "--quiet", *extra], env=env, cwd=config.parent, stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT, text=True)
    return proc if not wait else finish(proc)


def finish(proc):
    try:
        out, _ = proc.communicate(timeout=900)
    except subprocess.TimeoutExpired:
        proc.kill()  # with its worker processes' parent, they end too
        raise
    return proc.returncode, out


def records(output):
    """{variant file: its JSON record without the timing fields}."""
    found = {}
    for path in sorted((output / "variants").glob("*.json")):
        record = json.loads(path.read_text().rsplit("\n#qcal-check ", 1)[0])
        found[path.name] = {k: v for k, v in record.items() if k not in TIMING_FIELDS}
    return found


def assert_same_results(reference, output):
    assert records(output) == records(reference)
    arrays = sorted(p.name for p in (reference / "variants").glob("*.np[yz]"))
    assert arrays == sorted(p.name for p in (output / "variants").glob("*.np[yz]"))  # no shards left
    assert any(name.endswith(".npy") for name in arrays)  # float32's logits
    for name in arrays:  # per-image predictions, labels and float32 logits, merged from shards
        assert (output / "variants" / name).read_bytes() == (reference / "variants" / name).read_bytes()
    for name in ("predictions.csv", "layers.csv"):
        assert (output / name).read_bytes() == (reference / name).read_bytes()
    table = pd.read_csv(output / "results.csv")
    pd.testing.assert_frame_equal(table.drop(columns=TIMING_COLUMNS),
                                  pd.read_csv(reference / "results.csv").drop(columns=TIMING_COLUMNS))
    assert table["verified"].tolist()[1:] == [2, 2]


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """The single-process sweep (it also fills the compile cache the cluster runs share)."""
    folder = tmp_path_factory.mktemp("cluster")
    config = folder / "cluster.yaml"
    config.write_text(CONFIG)
    code, out = sweep(config, folder / "single")
    assert code == 0, out
    return config, folder / "single"


@pytest.mark.slow
def test_two_local_workers_equal_the_single_process_sweep(reference):
    config, single = reference
    output = config.parent / "two-workers"
    code, out = sweep(config, output, "--workers", "2", "--shard-images", "32")
    assert code == 0, out
    assert_same_results(single, output)
    logs = sorted(p.name for p in (output / "workers").glob("*.log"))
    assert logs == ["0.log", "1.log"]
    worked = [(output / "workers" / name).read_text() for name in logs]
    assert all(": running" in text for text in worked)  # both workers evaluated something
    shards = sum(len(re.findall(r"\[\d+:\d+\]: running", text)) for text in worked)
    assert shards == 9  # 3 variants x 96 images in shards of 32
    sweep_log = (output / "sweep.log").read_text()
    assert re.search(r"cluster: 3/3 variants finished, 0 running, 0 queued", sweep_log)
    assert len(list((output / "statistics").glob("*.npz"))) == 1  # one pass for both variants


def worker_running_statistics(output):
    """(pid, log) of the worker whose log says it is in a statistics pass, else None."""
    for path in (output / "workers").glob("*.log") if (output / "workers").is_dir() else ():
        text = path.read_text()
        if "statistics pass into" in text:
            return int(re.search(r"\(pid (\d+) on", text).group(1)), path
    return None


@pytest.mark.slow
def test_a_worker_killed_mid_task_loses_only_that_task(reference):
    config, single = reference
    output = config.parent / "killed"
    proc = sweep(config, output, "--workers", "2", wait=False)
    deadline = time.monotonic() + 300
    while (found := worker_running_statistics(output)) is None:
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.05)
    pid, log = found
    assert not list((output / "statistics").glob("*.npz"))  # the pass is still running
    os.kill(pid, signal.SIGKILL)
    code, out = finish(proc)
    assert code == 0, out
    assert_same_results(single, output)
    passes = sum((output / "workers" / p.name).read_text().count("statistics pass into")
                 for p in (output / "workers").glob("*.log"))
    assert passes == 2  # the killed task ran again, nothing else did
    assert (output / "sweep.log").read_text().count(": submitted") == 3


def test_an_unreachable_scheduler_is_one_line(tmp_path, monkeypatch):
    config = tmp_path / "cluster.yaml"
    config.write_text(CONFIG)
    monkeypatch.setenv("DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT", "2s")  # not qcal's 10 s
    code, out = sweep(config, tmp_path / "out", "--cluster", "tcp://127.0.0.1:9")
    assert code == 1
    assert out.strip().splitlines() == [
        "Error: cannot reach the Dask scheduler at tcp://127.0.0.1:9 (Timed out trying to connect "
        "to tcp://127.0.0.1:9 after 2 s); start one (dask scheduler, dask worker) or pass "
        "--workers N for a local cluster"]
    assert [p.name for p in tmp_path.iterdir()] == ["cluster.yaml"]  # nothing written
