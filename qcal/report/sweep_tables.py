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


CALIBRATION_COLUMNS = ["calib_subsets", "calib_top1_min", "calib_top1_max", "calib_top1_std",
                       "calib_agree_min", "calib_agree_max", "calib_agree_std",
                       "calib_agree_crops_min", "calib_agree_crops_max", "calib_agree_crops_std"]


def calibration_spread(store, repeats: dict) -> tuple:
    """({row key: spread columns}, per-subset rows): top-1 and top-1 agreement with float32 of
    each variant across its calibration subsets (min, max, sample standard deviation)."""
    spread, subset_rows = {}, []
    for key, keys in repeats.items():
        records = [store.load(k) for k in keys]
        if records[0][0]["variant"] == "float32":
            continue
        top1 = np.array([100 * np.mean(p[:, 0] == labels) for _, p, labels in records])
        agree, agree_crops = (np.array([r.get("metrics", {}).get(name, np.nan)
                                        for r, _, _ in records], dtype=float)
                              for name in ("agree_top1", "agree_top1_crops"))
        calibration = records[0][0].get("calibration", {})
        spread[key] = {"calib_subsets": f"{len(keys)} {calibration.get('kind', '')}".strip()}
        spreads = [("top1", top1), ("agree", agree)]
        if not np.isnan(agree_crops).all():  # label-free crops: agreement on many more images
            spreads.append(("agree_crops", agree_crops))
        for name, values in spreads:
            spread[key].update({f"calib_{name}_min": float(np.min(values)),
                                f"calib_{name}_max": float(np.max(values)),
                                f"calib_{name}_std": (float(np.std(values, ddof=1))
                                                      if len(values) > 1 else np.nan)})
        for subset, ((record, _, _), value, agreement) in enumerate(zip(records, top1, agree)):
            subset_rows.append({"model": record["model"], "variant": records[0][0]["variant"],
                                "subset": subset, "kind": calibration.get("kind", ""),
                                "calibration_images": record.get("calibration", {}).get("images"),
                                "top1": value, "agree_top1": agreement,
                                "agree_top1_crops": record.get("metrics", {}).get(
                                    "agree_top1_crops", np.nan), "key": record["key"]})
    return spread, subset_rows


def build_table(store, keys, repeats: dict | None = None) -> tuple:
    """(the results table, per-image predictions) of the variants ``keys``; with ``repeats``
    ({key: its calibration subsets' keys}) the table has the ``CALIBRATION_COLUMNS`` too."""
    spread = calibration_spread(store, repeats)[0] if repeats else {}
    rows, predictions_rows = [], []
    baselines = {}
    loaded = [store.load(k) for k in keys]
    for record, predictions, labels in loaded:
        if record["variant"] == "float32":
            baselines[record["model"]] = (predictions, labels)
    for record, predictions, labels in loaded:
        rows.append({**_row(record, predictions, labels, baselines.get(record["model"])),
                     **spread.get(record["key"], {})})
        frame = pd.DataFrame(predictions, columns=[f"pred{i + 1}" for i in range(5)])
        frame.insert(0, "label", labels)
        frame.insert(0, "image", np.arange(len(labels)))
        frame.insert(0, "variant", record["variant"])
        frame.insert(0, "model", record["model"])
        predictions_rows.append(frame)
    table = pd.DataFrame(rows)
    ordered = [c for c in TABLE_COLUMNS + CALIBRATION_COLUMNS if c in table.columns]
    extra = [c for c in table.columns if c not in TABLE_COLUMNS + CALIBRATION_COLUMNS]
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


CALIBRATION_NOTE = ("calib_*: the variant recalibrated on each of the calibration subsets "
                    "named in calib_subsets (disjoint blocks of calibration images, or bootstrap "
                    "draws when there are too few for disjoint ones, or fresh random crops): "
                    "min / max / sample std of its top-1 and of its top-1 agreement with float32 "
                    "(%). The row's own top-1, interval and paired test are subset 0's. A "
                    "difference between two variants within calib_top1_max - calib_top1_min is "
                    "of the size that the choice of calibration images alone makes.")


def results_markdown(table: pd.DataFrame) -> str:
    """The table as Markdown, with what its ``verified`` and calibration columns mean under it."""
    text = format_markdown(table)
    if "verified" in table.columns and table["verified"].notna().any():
        text += "\n" + VERIFIED_NOTE + "\n"
    if "calib_subsets" in table.columns:
        text += "\n" + CALIBRATION_NOTE + "\n"
    return text


def write_results(store, keys, output: Path, summary: dict, repeats: dict | None = None):
    table, predictions = build_table(store, keys, repeats)
    if repeats:
        subset_rows = calibration_spread(store, repeats)[1]
        atomic_write_text(output / "calibration_subsets.csv",
                          pd.DataFrame(subset_rows).to_csv(index=False))
    atomic_write_text(output / "results.csv", table.to_csv(index=False))
    atomic_write_text(output / "results.md", results_markdown(table))
    atomic_write_text(output / "predictions.csv", predictions.to_csv(index=False))
    records = [store.load(k)[0] for k in keys]
    summary = {**summary, "rows": json.loads(table.to_json(orient="records")),
               "variants": [{"key": r["key"], "description": r["description"],
                             "wall_seconds": r["wall_seconds"],
                             **({"adaround": r["adaround"]} if "adaround" in r else {})}
                            for r in records]}
    if repeats:  # what `qcal report` rebuilds the calibration spread from
        summary["calibration_subset_keys"] = repeats
    atomic_write_text(output / "results.json", json.dumps(summary, indent=2, default=str) + "\n")
    layers = [{"model": r["model"], "variant": r["variant"], **row}
              for r in records for row in r.get("layers", [])]
    if layers:
        atomic_write_text(output / "layers.csv", pd.DataFrame(layers).to_csv(index=False))
    plot_top1(table, output / "top1.png")
    return table
