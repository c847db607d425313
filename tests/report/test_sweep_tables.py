import numpy as np
import pandas as pd

from qcal.report.sweep_tables import plot_top1


def _table():
    rows = []
    for model, base in (("net_a", 92.0), ("net_b", 75.0)):
        for i, variant in enumerate(["float32", "a:power2 b8", "a:kl b32acc"]):
            top1 = base - 2.0 * i
            rows.append({"model": model, "variant": variant, "top1": top1,
                         "top1_ci95": f"{top1 - 0.5:.2f}-{top1 + 0.5:.2f}"})
    return pd.DataFrame(rows)


def test_top1_plot_has_one_panel_per_model(tmp_path):
    path = tmp_path / "top1.png"
    assert plot_top1(_table(), path) == ["net_a", "net_b"]
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert [p.name for p in tmp_path.iterdir()] == ["top1.png"]  # no temporary file left


def test_top1_plot_takes_a_model_without_float32_or_variants(tmp_path):
    table = _table()
    only_float = table[(table["model"] == "net_a") & (table["variant"] == "float32")]
    no_float = table[(table["model"] == "net_b") & (table["variant"] != "float32")]
    assert plot_top1(pd.concat([only_float, no_float]), tmp_path / "p.png") == ["net_a", "net_b"]
    nan_row = no_float.assign(top1=np.nan)  # label-free images: no top-1
    assert plot_top1(nan_row, tmp_path / "q.png") == ["net_b"]
