"""``--calib-repeats R``: every variant recalibrated on R calibration subsets, one statistics pass
per subset (not per variant), the spread reported beside the test-set interval, resumable."""
from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from click.testing import CliRunner

from qcal.cli import main
from qcal.data.calib_subsets import calibration_subsets
from qcal.data.plan import Selection
from qcal.data.sources import FashionMNISTSource
from qcal.errors import UsageProblem
from tests.fixtures import sweep_in_process


@pytest.fixture(scope="module")
def calib_split():
    return FashionMNISTSource("calib")  # 2,000 held-out images


def test_disjoint_blocks_when_the_pool_has_room(calib_split):
    base = Selection(calib_split, 0, 400)
    subsets = calibration_subsets(base, None, 5, seed=3)
    assert subsets.kind == "disjoint" and subsets.pool == (0, 2000)
    assert [(s.start, s.stop) for s in subsets.subsets] == [(0, 400), (400, 800), (800, 1200),
                                                            (1200, 1600), (1600, 2000)]
    assert subsets.subsets[0] == base  # subset 0 is the run without repeats


def test_blocks_stay_out_of_the_evaluated_images():
    # calibration from the tail of the evaluation source (no separate calibration images)
    source = FashionMNISTSource("t10k")
    evaluation, base = Selection(source, 0, 9000), Selection(source, 9800, 10000)
    subsets = calibration_subsets(base, evaluation, 5)
    assert subsets.kind == "disjoint" and subsets.pool == (9000, 10000)
    assert sorted((s.start, s.stop) for s in subsets.subsets) == [
        (9000, 9200), (9200, 9400), (9400, 9600), (9600, 9800), (9800, 10000)]
    # one block more than the pool holds: bootstrap draws from the pool, never from evaluation
    boot = calibration_subsets(base, evaluation, 6, seed=1)
    assert boot.kind == "bootstrap" and len(boot.subsets) == 6
    for s in boot.subsets:
        assert len(s) == 200 and s.source.positions.min() >= 9000
    again = calibration_subsets(base, evaluation, 6, seed=1)
    assert all(np.array_equal(a.source.positions, b.source.positions)
               for a, b in zip(boot.subsets, again.subsets))  # seeded: the same draws
    other = calibration_subsets(base, evaluation, 6, seed=2)
    assert not np.array_equal(boot.subsets[0].source.positions,
                              other.subsets[0].source.positions)
    # each draw is its own set of images: different cache keys, labels of the drawn images
    assert len({json.dumps(s.describe(), sort_keys=True) for s in boot.subsets}) == 6
    positions = boot.subsets[2].source.positions
    assert np.array_equal(boot.subsets[2].source.labels, source.labels[positions])
    assert np.array_equal(boot.subsets[2].source.decode([0, 5]), source.decode(positions[[0, 5]]))


def test_bootstrap_draws_with_replacement(calib_split):
    subsets = calibration_subsets(Selection(calib_split, 0, 500), None, 5, seed=0)
    assert subsets.kind == "bootstrap" and subsets.pool == (0, 2000)  # 5 x 500 > 2,000
    positions = subsets.subsets[0].source.positions
    # 500 draws from 2,000 with replacement: repeats are all but certain (expected ~60)
    assert len(np.unique(positions)) < 500


def test_repeats_must_be_positive(calib_split):
    with pytest.raises(UsageProblem, match="calib_repeats must be an integer >= 1, not 0"):
        calibration_subsets(Selection(calib_split, 0, 10), None, 0)


CONFIG = """\
name: repeats
models: [fmnist_vgg11_bn]
data: {num_images: 64, calib_images: 48}
batch_size: 32
calib_repeats: 3
grid:
  activation_method: [power2, l2]
  simulate: [true]
"""


def test_statistics_pass_runs_once_per_subset_and_the_spread_is_reported(tmp_path):
    config = tmp_path / "repeats.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "out"
    summary, output = sweep_in_process(config, out)
    # 2 variants x 3 subsets evaluated, 3 statistics passes (counted by the session, and logged)
    assert summary["statistics_passes_this_run"] == {"fmnist_vgg11_bn": 3}
    assert (out / "sweep.log").read_text().count("statistics over 48 calibration images") == 3
    subsets = pd.read_csv(out / "calibration_subsets.csv")
    assert len(subsets) == 6 and set(subsets["kind"]) == {"disjoint"}
    assert subsets.groupby("variant")["subset"].apply(list).tolist() == [[0, 1, 2], [0, 1, 2]]
    table = pd.read_csv(out / "results.csv")
    int8 = table[table["variant"] != "float32"]
    assert len(table) == 3 and set(int8["calib_subsets"]) == {"3 disjoint"}
    for _, row in int8.iterrows():
        mine = subsets[subsets["variant"] == row["variant"]]
        assert row["calib_top1_min"] == mine["top1"].min()
        assert row["calib_top1_max"] == mine["top1"].max()
        assert row["calib_top1_std"] == pytest.approx(np.std(mine["top1"], ddof=1))
        assert row["calib_agree_min"] == mine["agree_top1"].min()
        assert row["top1"] == mine[mine["subset"] == 0]["top1"].iloc[0]  # the row is subset 0
    assert "calib_top1_max - calib_top1_min" in (out / "results.md").read_text()
    # the three subsets are three calibrations: their ranges differ
    records = [json.loads((out / "variants" / f"{k}.json").read_text().split("\n#qcal-check")[0])
               for k in subsets["key"]]
    assert len({json.dumps(r["description"]["data"]["calibration"]) for r in records}) == 3
    assert {r["calibration"]["subset"] for r in records} == {0, 1, 2}

    # resumed: everything is in the store, no statistics pass, the same table
    again, _ = sweep_in_process(config, out)
    assert again["statistics_passes_this_run"] == {"fmnist_vgg11_bn": 0}
    pd.testing.assert_frame_equal(pd.read_csv(out / "results.csv").drop(
        columns=["images_per_s", "wall_s"]), table.drop(columns=["images_per_s", "wall_s"]))

    # without repeats, a fresh folder: subset 0's results are its results (same cache key)
    plain = tmp_path / "plain"
    single, _ = sweep_in_process(config, plain, "--calib-repeats", "1")
    assert single["statistics_passes_this_run"] == {"fmnist_vgg11_bn": 1}
    first = set(subsets[subsets["subset"] == 0]["key"])
    assert first == {v["key"] for v in single["variants"]} - {summary["variants"][0]["key"]}
    assert "calib_subsets" not in pd.read_csv(plain / "results.csv").columns


@pytest.mark.parametrize("args, message", [
    (["--calib-repeats", "0"], "Invalid value for '--calib-repeats': 0 is not in the range x>=1"),
    (["--calib-repeats", "2", "--calib", "{calib}"],
     "--calib-repeats 2: calibration subsets need calibration images, not a calibration file"),
])
def test_bad_repeats_on_the_command_line(tmp_path, args, message):
    calib = tmp_path / "c.npz"
    calib.write_bytes(b"")
    args = [a.replace("{calib}", str(calib)) for a in args]
    result = CliRunner().invoke(main, ["evaluate", "--model", "fmnist_vgg11_bn", "--num-images",
                                       "8", "--quiet", *args], catch_exceptions=False)
    assert result.exit_code == 2, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("Error")]
    assert len(errors) == 1 and message in errors[0], result.output
    assert "Traceback" not in result.output


def test_bad_repeats_in_a_sweep_file(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG.replace("calib_repeats: 3", "calib_repeats: two"))
    result = CliRunner().invoke(main, ["sweep", str(config), "--output", str(tmp_path / "o")],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert f"{config}:5: calib_repeats must be an integer >= 1, not 'two'" in result.output
    assert not (tmp_path / "o").exists()


def test_crops_are_drawn_afresh_from_the_same_photos():
    from qcal.data.sources import AugmentedSource, ImageFolderSource
    from qcal.files import REPO_ROOT

    photos = ImageFolderSource(REPO_ROOT / "data" / "calibration-photos")
    base = Selection(AugmentedSource(photos, 32, seed=1), 0, 32)
    subsets = calibration_subsets(base, None, 3)
    assert subsets.kind == "crops" and subsets.subsets[0] == base
    assert [s.source.seed for s in subsets.subsets] == [1, 2, 3]
    assert all(s.source.base is photos and len(s) == 32 for s in subsets.subsets)
    crops = [s.source.decode([0]) for s in subsets.subsets[:2]]
    assert crops[0].shape == crops[1].shape and not np.array_equal(crops[0], crops[1])
