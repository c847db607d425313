"""Report stage for sweeps: one table for float32 and every variant, with intervals and paired tests."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from qcal.files import atomic_path, atomic_write_text
from qcal.report.statistics import mcnemar_exact, wilson_interval
from qcal.report.tables import format_markdown

TABLE_COLUMNS = ["model", "variant", "images", "verified", "top1", "top1_ci95", "top5", "top5_ci95",
                 "delta_top1", "lost", "gained", "mcnemar_p", "images_per_s", "wall_s"]


def _row(record, predictions, labels, baseline):
    n = len(labels)
    correct1 = predictions[:, 0] == labels
    correct5 = (predictions == labels[:, None]).any(axis=1)
    lo1, hi1 = wilson_interval(int(correct1.sum()), n)
    lo5, hi5 = wilson_interval(int(correct5.sum()), n)
    row = {"model": record["model"], "variant": record["variant"], "images": n,
           "verified": (np.nan if record["variant"] == "float32" or record.get("simulated")
                        else record.get("verified_images", 0)),
           "top1": 100 * correct1.mean(), "top1_ci95": f"{100 * lo1:.2f}-{100 * hi1:.2f}",
           "top5": 100 * correct5.mean(), "top5_ci95": f"{100 * lo5:.2f}-{100 * hi5:.2f}",
           "delta_top1": np.nan, "lost": np.nan, "gained": np.nan, "mcnemar_p": np.nan,
           "images_per_s": record["images_per_s"], "wall_s": record["wall_seconds"]}
    if baseline is not None and record["variant"] != "float32":
        base_pred, base_labels = baseline
        if np.array_equal(base_labels, labels):
            test = mcnemar_exact(base_pred[:, 0] == base_labels, correct1)
            row.update(delta_top1=row["top1"] - 100 * (base_pred[:, 0] == base_labels).mean(),
                       lost=test["lost"], gained=test["gained"], mcnemar_p=test["p_value"])
    for key, value in record.get("metrics", {}).items():
        row[key] = value
    return row


def build_table(store, keys) -> tuple:
    rows, predictions_rows = [], []
    baselines = {}
    loaded = [store.load(k) for k in keys]
    for record, predictions, labels in loaded:
        if record["variant"] == "float32":
            baselines[record["model"]] = (predictions, labels)
    for record, predictions, labels in loaded:
        rows.append(_row(record, predictions, labels, baselines.get(record["model"])))
        frame = pd.DataFrame(predictions, columns=[f"pred{i + 1}" for i in range(5)])
        frame.insert(0, "label", labels)
        frame.insert(0, "image", np.arange(len(labels)))
        frame.insert(0, "variant", record["variant"])
        frame.insert(0, "model", record["model"])
        predictions_rows.append(frame)
    table = pd.DataFrame(rows)
    ordered = [c for c in TABLE_COLUMNS if c in table.columns]
    extra = [c for c in table.columns if c not in TABLE_COLUMNS]
    return table[ordered + extra], pd.concat(predictions_rows, ignore_index=True)


def _interval(ci: str) -> tuple:
    lo, hi = ci.split("-")
    return float(lo), float(hi)


def plot_top1(table: pd.DataFrame, path: Path) -> list:
    """Top-1 with its 95 % interval for every variant, one panel per model (each with its own
    scale, so differences within a model stay visible), float32 and its interval drawn across.
    Returns the models in panel order."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = list(dict.fromkeys(table["model"]))
    widths = [max(2.5, 0.5 * int((table["model"] == m).sum())) for m in models]
    fig, axes = plt.subplots(1, len(models), figsize=(max(6.0, sum(widths) + 1.0), 5),
                             squeeze=False, gridspec_kw={"width_ratios": widths})
    for ax, model in zip(axes[0], models):
        rows = table[table["model"] == model]
        floats = rows[rows["variant"] == "float32"]
        rows = rows[rows["variant"] != "float32"]
        if len(floats):
            top1 = float(floats["top1"].iloc[0])
            lo, hi = _interval(floats["top1_ci95"].iloc[0])
            ax.axhspan(lo, hi, color="tab:green", alpha=0.15, lw=0)
            ax.axhline(top1, color="tab:green", lw=1, label=f"float32 {top1:.2f} %")
            ax.legend(loc="lower left", fontsize=7)
        if len(rows):
            top1 = rows["top1"].to_numpy(dtype=float)
            bounds = np.array([_interval(ci) for ci in rows["top1_ci95"]])
            x = np.arange(len(rows))
            ax.errorbar(x, top1, yerr=[top1 - bounds[:, 0], bounds[:, 1] - top1], fmt="o",
                        capsize=3)
            ax.set_xticks(x)
            ax.set_xticklabels(rows["variant"], rotation=75, fontsize=6)
        else:
            ax.set_xticks([])
        ax.set_title(model, fontsize=8)
        ax.grid(axis="y", alpha=0.3)
    axes[0][0].set_ylabel("top-1 (%) with 95 % Wilson interval")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)
    return models


VERIFIED_NOTE = ("verified: calibration images on which the compiled int8 model's logits equalled "
                 "its numpy integer reference bit for bit before it was evaluated (0: not "
                 "checked, --verify-images 0).")


def results_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with what its ``verified`` column means under it."""
    text = format_markdown(table)
    if "verified" in table.columns and table["verified"].notna().any():
        text += "\n" + VERIFIED_NOTE + "\n"
    return text


def write_results(store, keys, output: Path, summary: dict):
    table, predictions = build_table(store, keys)
    atomic_write_text(output / "results.csv", table.to_csv(index=False))
    atomic_write_text(output / "results.md", results_markdown(table))
    atomic_write_text(output / "predictions.csv", predictions.to_csv(index=False))
    records = [store.load(k)[0] for k in keys]
    summary = {**summary, "rows": json.loads(table.to_json(orient="records")),
               "variants": [{"key": r["key"], "description": r["description"],
                             "wall_seconds": r["wall_seconds"],
                             **({"adaround": r["adaround"]} if "adaround" in r else {})}
                            for r in records]}
    atomic_write_text(output / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    layers = [{"model": r["model"], "variant": r["variant"], **row}
              for r in records for row in r.get("layers", [])]
    if layers:
        atomic_write_text(output / "layers.csv", pd.DataFrame(layers).to_csv(index=False))
    plot_top1(table, output / "top1.png")
    return table
