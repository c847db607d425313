"""``keep_logits: true``: every int8 variant's logits are streamed to ``variants/KEY.logits.npy``
beside float32's, the very logits its fidelity figures were computed on; a folder made without it
computes only the variants whose file is missing."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
from click.testing import CliRunner

from qcal.cli import main
from qcal.drivers.sweep import ResultStore
from qcal.eval.fidelity import compare
from tests.fixtures import sweep_in_process

CONFIG = """\
name: logits
models: [fmnist_resnet20_v1]
data: {num_images: 48, calib_images: 32}
batch_size: 16
grid:
  activation_method: [power2]
  bias: [8]
  simulate: [true]
"""


def test_int8_logits_kept_on_disk_are_the_ones_measured(tmp_path):
    config, out = tmp_path / "logits.yaml", tmp_path / "out"
    config.write_text(CONFIG)
    summary, _ = sweep_in_process(config, out)
    float_key, int8_key = (v["key"] for v in summary["variants"])
    store = ResultStore(out)
    assert store.logits_path(float_key, "evaluation").is_file()
    assert not store.logits_path(int8_key, "evaluation").exists()  # off by default

    config.write_text(CONFIG + "keep_logits: true\n")
    again, _ = sweep_in_process(config, out)
    assert [v["key"] for v in again["variants"]] == [float_key, int8_key]  # same variants
    log = (out / "sweep.log").read_text()
    assert log.count("without its logits file; running again") == 1  # the int8 variant only
    reference = np.load(store.logits_path(float_key, "evaluation"))
    logits = np.load(store.logits_path(int8_key, "evaluation"))
    assert logits.shape == reference.shape == (48, 10) and logits.dtype == np.float32
    record, predictions, _ = store.load(int8_key)
    assert np.array_equal(logits.argmax(axis=1), predictions[:, 0])
    measured = compare(reference, logits)
    for name, value in measured.items():  # the record's figures come from these very logits
        assert record["metrics"][name] == value, name

    sweep_in_process(config, out)  # everything is there now: nothing runs again
    assert (out / "sweep.log").read_text().count("running again") == 1

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
    import bias_corrections_table as table

    loaded = {r["key"]: a for r, a in table.load_variants(out)}
    assert np.array_equal(loaded[int8_key]["logits"], logits)


def test_keep_logits_must_be_a_boolean(tmp_path):
    config = tmp_path / "bad.yaml"
    config.write_text(CONFIG + "keep_logits: yes please\n")
    result = CliRunner().invoke(main, ["sweep", str(config), "--output", str(tmp_path / "o")],
                                catch_exceptions=False)
    assert result.exit_code == 2
    assert f"{config}:9: keep_logits must be true or false, not 'yes please'" in result.output
    assert not (tmp_path / "o").exists()
