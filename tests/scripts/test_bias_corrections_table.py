"""scripts/bias_corrections_table.py on a sweep folder written through qcal's own ResultStore:
paired counts against float32 and against b8, agreement, SQNR and its bootstrap interval."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from qcal.config import QuantOptions
from qcal.drivers.sweep import ResultStore

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))
import bias_corrections_table as table  # noqa: E402


def _save(store, name, options, predictions, labels, logits):
    variant = None if options is None else options.to_dict()
    description = {"model": "m", "variant": variant}
    key = store.key(description)
    record = {"model": "m", "variant": name, "description": description}
    store.save(key, record, predictions[:, None].repeat(5, axis=1), labels, logits=logits)


def test_paired_columns(tmp_path):
    rng = np.random.RandomState(0)
    store = ResultStore(tmp_path)
    store.variants.mkdir(parents=True)
    labels = np.arange(40) % 4
    ref = rng.randn(40, 4).astype(np.float32) + 3 * np.eye(4, dtype=np.float32)[labels]
    float_pred = ref.argmax(axis=1)
    _save(store, "float32", None, float_pred, labels, ref)
    b8 = ref.copy()
    b8[:6] = np.roll(b8[:6], 1, axis=1)  # disagrees with float32 on 6 images
    _save(store, "b8", QuantOptions(bias_bits=8), b8.argmax(axis=1), labels, b8)
    fixed = ref + 0.01 * rng.randn(40, 4).astype(np.float32)
    _save(store, "b8 bcorr", QuantOptions(bias_bits=8, bias_correction="empirical"),
          fixed.argmax(axis=1), labels, fixed)
    variants = table.load_variants(tmp_path)
    lines = table.model_table(variants, rounds=200)
    rows = {line.split(" | ")[0].strip("| "): line.split(" | ") for line in lines[2:]}
    assert set(rows) == {"float32", "b8", "b8 bcorr"}
    b8_lost = int(((float_pred == labels) & (b8.argmax(axis=1) != labels)).sum())
    assert rows["b8"][2].startswith(f"-{b8_lost}/+0")
    assert rows["b8"][4].startswith("85.00")  # 34 of 40 agree
    corr = rows["b8 bcorr"]
    assert corr[4].startswith("100.00") and corr[5].startswith("-0/+6")  # agreement vs b8
    sqnr = float(corr[6].split()[0])
    assert abs(sqnr - 10 * np.log10((ref.astype(np.float64) ** 2).sum()
                                    / ((ref - fixed).astype(np.float64) ** 2).sum())) < 0.01
    lo, hi = (float(v) for v in corr[6].split("[")[1].rstrip("]").split(", "))
    assert lo <= sqnr <= hi
    assert corr[7].startswith("+")  # better than b8, paired
