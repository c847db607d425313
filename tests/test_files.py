"""Checked files: every kind of file qcal reads back, damaged each way, and what qcal does.

The table: each kind of cached or resumable file (decoded batch, compiled library, sweep variant
record and arrays, calibration file) x each kind of damage (truncated, emptied, same-size
scrambled bytes). A cache reports the file by name, removes it and recomputes the right result;
a calibration file, which the user supplies and nothing can recompute, is refused with one line
and exit 1. Every file is made by qcal's own writer and read by qcal's own reader.
"""
from __future__ import annotations

import io
import json
import logging
import os
import shutil

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qcal.cli import main
from qcal.errors import QcalError
from qcal.files import (CHECK_MARK, DamagedFile, read_checked, remove_stale_temporaries, verify_checked,
                        write_checked)

SMALL_SWEEP = dict(name="checked", models=("fmnist_resnet20_v1",), data={"num_images": 16},
                   batch_size=16, seed=0, float32=True, pretrained=False, variants=())


def truncated(path):
    data = path.read_bytes()
    path.write_bytes(data[:len(data) * 2 // 3])


def emptied(path):
    path.write_bytes(b"")


def scrambled(path):
    """Same size, 64 bytes in the middle of the payload replaced (what a bad disk block does)."""
    data = bytearray(path.read_bytes())
    at = len(data) // 2
    rng = np.random.RandomState(0)
    while True:
        noise = rng.randint(0, 256, 64, dtype=np.uint8).tobytes()
        if noise != bytes(data[at:at + 64]):
            break
    data[at:at + 64] = noise
    path.write_bytes(bytes(data))
    assert len(data) == path.stat().st_size


DAMAGE = {"truncated": truncated, "emptied": emptied, "scrambled": scrambled}


def warned_about(caplog, path) -> bool:
    return any(r.levelno == logging.WARNING and str(path) in r.getMessage() and
               "failed its check" in r.getMessage() for r in caplog.records)


# --- the rule itself -----------------------------------------------------------------------------

def test_a_checked_file_is_its_payload_then_one_record_line(tmp_path):
    path = tmp_path / "a.bin"
    write_checked(path, b"payload\x00bytes", "test file", "k1")
    data = path.read_bytes()
    assert data.startswith(b"payload\x00bytes" + CHECK_MARK) and data.endswith(b"\n")
    payload, record = read_checked(path, "test file", "k1")
    assert bytes(payload) == b"payload\x00bytes"
    assert record["size"] == 13 and record["key"] == "k1" and record["producer"].startswith("qcal")
    assert verify_checked(path, "test file", "k1") == record
    assert os.listdir(tmp_path) == ["a.bin"]  # no temporary left


@pytest.mark.parametrize("kind, key, message", [
    ("other file", "k1", "it is a 'test file' file, not a 'other file' file"),
    ("test file", "k2", "it holds key 'k1', not 'k2'"),
])
def test_a_file_of_another_kind_or_key_fails(tmp_path, kind, key, message):
    path = tmp_path / "a.bin"
    write_checked(path, b"x" * 100, "test file", "k1")
    for read in (read_checked, verify_checked):
        with pytest.raises(DamagedFile, match=message):
            read(path, kind, key)


@pytest.mark.parametrize("damage", DAMAGE)
def test_each_damage_fails_the_check(tmp_path, damage):
    path = tmp_path / "a.bin"
    write_checked(path, bytes(range(256)) * 40, "test file", "k")
    DAMAGE[damage](path)
    for read in (read_checked, verify_checked):
        with pytest.raises(DamagedFile, match=f"^{path} failed its check: "):
            read(path, "test file", "k")


def test_temporaries_of_dead_writers_are_removed_and_live_ones_kept(tmp_path):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    dead_pid = int(dead.stdout)
    names = {f".a.npy.qcal-{dead_pid}-x1y2.tmp": "dead",
             f".b.so.qcal-{dead_pid}-k3j4.tmp.so": "dead",
             f".c.json.qcal-{os.getpid()}-abcd.tmp": "live",
             f".d.json.qcal-{os.getppid()}-abcd.tmp": "live",
             f".e.{dead_pid}.abcd.tmp": "another program's", "f.npy": "not a temporary"}
    for name in names:
        (tmp_path / name).write_bytes(b"x")
    scratch = tmp_path / f".g.so.qcal-{dead_pid}-zz11.tmp"  # a linker's scratch folder
    scratch.mkdir()
    (scratch / "lib0.o").write_bytes(b"x")
    removed = remove_stale_temporaries(tmp_path)
    assert sorted(p.name for p in removed) == sorted(
        [n for n, what in names.items() if what == "dead"] + [scratch.name])
    assert sorted(os.listdir(tmp_path)) == sorted(n for n, what in names.items() if what != "dead")


# --- every kind of file x every kind of damage ---------------------------------------------------

@pytest.fixture(scope="module")
def fashion_source():
    from qcal.data.sources import FashionMNISTSource

    return FashionMNISTSource("t10k")


def _damaged_batch(fashion_source, damage, tmp_path, caplog):
    from qcal.data.cache import CHECK_KIND, BatchCache

    cache = BatchCache(tmp_path / "batches")
    indices = np.arange(8, 20)
    expected = fashion_source.decode(indices)
    assert np.array_equal(cache.load(fashion_source, indices), expected)
    path = tmp_path / "batches" / f"{cache.key(fashion_source, indices)}.npy"
    DAMAGE[damage](path)
    decoded = []

    class Counting:  # the same source, counting what it decodes
        def __getattr__(self, name):
            return getattr(fashion_source, name)

        def decode(self, idx):
            decoded.append(len(idx))
            return fashion_source.decode(idx)

    again = cache.load(Counting(), indices)
    assert decoded == [12], "the damaged batch was used instead of decoded again"
    assert np.array_equal(again, expected)
    assert warned_about(caplog, path)
    read_checked(path, CHECK_KIND)  # written again, whole
    assert np.array_equal(cache.load(fashion_source, indices), expected)


@pytest.fixture(scope="module")
def compiled_library(tmp_path_factory):
    """A tiny integer model, the compile cache folder holding its library, and its output."""
    from qcal.backend.tvm.compile import compile_model
    from tests.fixtures import OPTION_SETS, GraphMaker, classifier_head, images, realized

    g = GraphMaker((3, 8, 8), 0, "checked_net")
    net = classifier_head(g, g.relu(g.conv("data", 8)), 10)
    qgraph = realized(net, OPTION_SETS["power2-b16"], images(8, (3, 8, 8), seed=1))
    folder = tmp_path_factory.mktemp("compiled")
    x = images(3, (3, 8, 8), seed=2)
    return qgraph, folder, x, compile_model(qgraph, 2, cache_dir=folder).run(x)


def _damaged_library(compiled_library, damage, tmp_path, caplog, monkeypatch):
    from qcal.backend.tvm import emit as tvm_adapter
    from qcal.backend.tvm.compile import CHECK_KIND, compile_model

    qgraph, original, x, expected = compiled_library
    folder = tmp_path / "compiled"
    shutil.copytree(original, folder)
    (path,) = folder.glob("*.so")
    DAMAGE[damage](path)
    loaded = []
    real_load = tvm_adapter.load_library
    monkeypatch.setattr(tvm_adapter, "load_library", lambda p: loaded.append(p) or real_load(p))
    again = compile_model(qgraph, 2, cache_dir=folder)
    assert loaded == [], "a damaged library was handed to the dynamic loader"
    assert not again.build.cache_hit and again.build.library == path
    assert np.array_equal(again.run(x), expected)
    assert warned_about(caplog, path)
    verify_checked(path, CHECK_KIND)
    assert compile_model(qgraph, 2, cache_dir=folder).build.cache_hit


@pytest.fixture(scope="module")
def finished_sweep(tmp_path_factory):
    """A finished float32 sweep (16 Fashion-MNIST images): its variant files and its table."""
    from qcal.drivers.sweep import run_sweep
    from qcal.drivers.sweep_config import SweepConfig

    folder = tmp_path_factory.mktemp("sweep")
    output, batches = folder / "out", folder / "batches"
    run_sweep(SweepConfig(**SMALL_SWEEP), output, quiet=True, cache_dir=batches)
    return output, batches


def _table(output):
    return pd.read_csv(output / "results.csv").drop(columns=["images_per_s", "wall_s"])


def _damaged_variant(finished_sweep, suffix, damage, tmp_path, caplog):
    from qcal.drivers.sweep import ResultStore, run_sweep
    from qcal.drivers.sweep_config import SweepConfig

    original, batches = finished_sweep
    output = tmp_path / "out"
    shutil.copytree(original, output)
    (key,) = [p.stem for p in (output / "variants").glob("*.json")]
    path = output / "variants" / f"{key}{suffix}"
    DAMAGE[damage](path)
    run_sweep(SweepConfig(**SMALL_SWEEP), output, quiet=True, cache_dir=batches)
    assert warned_about(caplog, path)
    log = (output / "sweep.log").read_text().split(" started: ")[-1]
    assert "float32: running" in log and "finished earlier" not in log
    pd.testing.assert_frame_equal(_table(output), _table(original))
    assert ResultStore(output).load(key) is not None  # written again, whole


@pytest.fixture(scope="module")
def calibration_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("calib") / "vgg.npz"
    result = CliRunner().invoke(main, ["calibrate", "--model", "fmnist_vgg11_bn",
                                       "--calib-images", "16", "--bins", "0", "--quiet",
                                       "--output", str(path)], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return path


def _damaged_calibration(calibration_file, damage, tmp_path):
    path = tmp_path / "user.npz"
    shutil.copy(calibration_file, path)
    DAMAGE[damage](path)
    before = path.read_bytes()
    result = CliRunner().invoke(main, ["evaluate", "--model", "fmnist_vgg11_bn", "--calib",
                                       str(path), "--num-images", "16", "--quiet", "--output",
                                       str(tmp_path / "t.md")], catch_exceptions=False)
    assert result.exit_code == 1, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("Error: ") and str(path) in lines[0], lines
    assert "Traceback" not in result.output and not (tmp_path / "t.md").exists()
    assert path.read_bytes() == before  # the user's file is left as it was
    return lines[0]


KINDS = ["decoded batch", "compiled library", "variant record (.json)", "variant arrays (.npz)",
         "calibration file (--calib)"]


@pytest.mark.slow
@pytest.mark.parametrize("damage", DAMAGE)
@pytest.mark.parametrize("kind", KINDS)
def test_a_damaged_file_is_reported_and_recomputed_or_refused(
        kind, damage, tmp_path, caplog, monkeypatch, request):
    caplog.set_level(logging.WARNING)
    if kind == "decoded batch":
        _damaged_batch(request.getfixturevalue("fashion_source"), damage, tmp_path, caplog)
    elif kind == "compiled library":
        _damaged_library(request.getfixturevalue("compiled_library"), damage, tmp_path, caplog,
                         monkeypatch)
    elif kind.startswith("variant"):
        _damaged_variant(request.getfixturevalue("finished_sweep"),
                         ".json" if "json" in kind else ".npz", damage, tmp_path, caplog)
    else:
        line = _damaged_calibration(request.getfixturevalue("calibration_file"), damage, tmp_path)
        assert "calibration file" in line or "not a qcal calibration file" in line


def test_calibration_files_intact_old_and_cut_at_the_record(calibration_file, tmp_path, caplog):
    from qcal.calib.result import UNCHECKED_FORMAT, CalibrationResult

    caplog.set_level(logging.WARNING)
    intact = CalibrationResult.load(calibration_file)
    assert not caplog.records
    payload, record = read_checked(calibration_file, "calibration file", intact.fingerprint)
    # the same file as qcal wrote it before it checked its files: read, with a warning
    with np.load(io.BytesIO(payload)) as f:
        arrays = {name: f[name] for name in f.files}
    meta = json.loads(str(arrays["meta"]))
    arrays["meta"] = np.array(json.dumps({**meta, "format": UNCHECKED_FORMAT}))
    old = tmp_path / "old.npz"
    np.savez_compressed(old, **arrays)
    loaded = CalibrationResult.load(old)
    assert loaded.chosen == intact.chosen and loaded.summaries == intact.summaries
    assert any(str(old) in r.getMessage() and "without a checksum" in r.getMessage()
               for r in caplog.records)
    # a checked file cut exactly before its record is not mistaken for an old one
    cut = tmp_path / "cut.npz"
    cut.write_bytes(bytes(payload))
    with pytest.raises(QcalError, match=f"calibration file {cut} has lost its check record"):
        CalibrationResult.load(cut)
