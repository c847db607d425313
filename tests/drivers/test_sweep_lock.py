"""Two real sweeps on one output folder: the second stops naming the folder and the first one's
pid, or with --wait waits and then reuses what the first finished; the results stay whole."""
import os
import signal
import subprocess
import sys
import time

import pandas as pd
import pytest

from qcal.files import LOCK_NAME

CONFIG = """\
name: lock
models: [fmnist_resnet20_v1]
data: {num_images: 32}
batch_size: 32
"""


def start_sweep(config, output, log, *extra):
    return subprocess.Popen(
        [sys.executable, "-m", "qcal.cli", "sweep", str(config), "--output", str(output),
         "--quiet", *extra],
        env={**os.environ, "PYTHONPATH": os.getcwd()}, cwd=config.parent, stdout=log,
        stderr=subprocess.STDOUT, text=True)


def wait_for(condition, proc, log):
    deadline = time.monotonic() + 300
    while not condition():
        assert proc.poll() is None, log.read_text()
        assert time.monotonic() < deadline
        time.sleep(0.01)


@pytest.mark.slow
def test_one_sweep_per_output_folder(tmp_path):
    config = tmp_path / "lock.yaml"
    config.write_text(CONFIG)
    output = tmp_path / "out"
    logs = {name: tmp_path / f"{name}.txt" for name in ("first", "second", "waiting")}
    first = start_sweep(config, output, logs["first"].open("w"))
    lock = output / LOCK_NAME
    try:
        wait_for(lambda: lock.is_file() and lock.read_text().strip() == str(first.pid), first,
                 logs["first"])
        first.send_signal(signal.SIGSTOP)  # holds the folder, alive, for as long as we need
        second = start_sweep(config, output, logs["second"].open("w"))
        waiting = start_sweep(config, output, logs["waiting"].open("w"), "--wait")
        assert second.wait(timeout=300) == 1
        lines = logs["second"].read_text().strip().splitlines()
        assert lines == [f"Error: output folder {output} is in use by another qcal process "
                         f"(pid {first.pid}); wait for it to finish or pass --wait"]
        wait_for(lambda: "waiting for it" in logs["waiting"].read_text(), waiting,
                 logs["waiting"])
        assert waiting.poll() is None
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=300) == 0, logs["first"].read_text()
    assert waiting.wait(timeout=300) == 0, logs["waiting"].read_text()

    runs = (output / "sweep.log").read_text().split(" started: ")[1:]
    assert len(runs) == 2  # the refused sweep wrote nothing, not even a log line
    assert "float32: running" in runs[0]
    assert "finished earlier, reusing" in runs[1] and ": running" not in runs[1]
    table = pd.read_csv(output / "results.csv")
    assert list(table["variant"]) == ["float32"] and table["images"].tolist() == [32]
