"""`qcal report`: a sweep's tables and plot written again from its result store, the same bytes,
nothing recomputed."""
from __future__ import annotations

import json

from click.testing import CliRunner

from qcal.cli import main


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args], catch_exceptions=False)


def test_a_sweeps_report_is_written_again_the_same(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # the batch cache
    config = tmp_path / "s.yaml"
    config.write_text("models: [fmnist_resnet20_v1]\ndata: {num_images: 8, calib_images: 16}\n"
                      "batch_size: 8\ncalib_repeats: 2\n"
                      "grid: {simulate: [true], bias: [8, 16]}\n")
    out = tmp_path / "out"
    result = invoke("sweep", config, "--output", out, "--quiet")
    assert result.exit_code == 0, result.output
    names = ["results.csv", "results.md", "results.json", "predictions.csv",
             "calibration_subsets.csv"]
    before = {name: (out / name).read_bytes() for name in names}
    for name in names + ["top1.png"]:
        if name != "results.json":  # the summary qcal report reads (and writes again)
            (out / name).unlink()
    stored = {p: p.stat().st_mtime_ns for p in (out / "variants").iterdir()}
    result = invoke("report", out)
    assert result.exit_code == 0, result.output
    for name in names:
        assert (out / name).read_bytes() == before[name], name
    assert (out / "top1.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    summary = json.loads((out / "results.json").read_text())
    # float32 (one calibration) and the two int8 rows (two subsets each)
    assert [len(v) for v in summary["calibration_subset_keys"].values()] == [1, 2, 2]
    assert {p: p.stat().st_mtime_ns for p in (out / "variants").iterdir()} == stored
