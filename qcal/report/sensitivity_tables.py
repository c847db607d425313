"""Report stage for ``qcal sensitivity``: its CSV, ranked Markdown and bar plot, from the stored
variants alone (the driver and ``qcal report`` both call ``write_sensitivity``, so a report
written again from the same folder is the same bytes)."""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd

from qcal.eval.sensitivity import MODES, RANK_KEYS, Unit, ranked, sensitivity_rows
from qcal.files import atomic_path, atomic_write_text

ENGINE_WORDS = {
    "integer": "the numpy integer reference, which the compiled TVM model equals bit for bit",
    "simulated": "the simulated (fake-quantized) model",
}
MODE_TITLES = {
    "float": "sqnr_cost_db: logit SQNR regained when only this unit is kept float32 (dB)",
    "only": "noise_share: logit noise energy with only this unit quantized, over the base's",
    "bias": "bias_cost_db: logit SQNR lost with only this layer's bias at {bits} bits (dB)",
}


def run_table(store, run: dict) -> pd.DataFrame:
    """One run's rows (network order): the unit and, per mode, its metrics and cost."""
    units = [Unit(u["name"], u["kind"], u["op"], u["position"], tuple(u["nodes"]))
             for u in run["units"]]
    measured, exact = {}, {}
    for entry in run["variants"]:
        record = store.load(entry["key"])
        if record is None:
            from qcal.errors import QcalError

            raise QcalError(f"{store.variants / entry['key']}.json is missing or damaged; run "
                            "qcal sensitivity again to measure it")
        measured[(entry["unit"], entry["mode"])] = record[0]["metrics"]
        exact[entry["unit"]] = exact.get(entry["unit"], True) and record[0]["metrics"]["exact"]
    base = store.load(run["base_key"])[0]["metrics"]
    rows = sensitivity_rows(units, measured, base)
    for row in rows:
        row["exact"] = exact.get(row["unit"], True) and base["exact"]
    table = pd.DataFrame(rows)
    table.insert(0, "base", run["base"])
    table.insert(0, "model", run["model"])
    return table


def _base_metrics(store, run: dict) -> dict:
    return store.load(run["base_key"])[0]["metrics"]


def _number(value, digits=2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and math.isinf(value):
        return "inf" if value > 0 else "-inf"
    return f"{value:.{digits}f}"


def _share(value) -> str:
    return "" if value is None or math.isnan(value) else f"{value:.3g}"


def _ranked_table(rows, kind: str, mode: str, modes) -> list:
    lines = []
    columns = ["rank", kind, "op" if kind == "layer" else "nodes"]
    if "float" in modes:
        columns += ["sqnr_cost_db", "float: SQNR dB", "float: agree %", "float: KL"]
    if "only" in modes:
        columns += ["noise_share", "only: SQNR dB", "only: agree %"]
    if "bias" in modes and kind == "layer":
        columns += ["bias_cost_db", "bias: agree %"]
    lines.append("| " + " | ".join(columns) + " |")
    lines.append("|" + "|".join("---" for _ in columns) + "|")
    for rank, row in enumerate(ranked(rows, mode, kind=kind), 1):
        cells = [str(rank), row["unit"], row["op"] if kind == "layer" else str(row["nodes"])]
        if "float" in modes:
            cells += [_number(row["sqnr_cost_db"]), _number(row["float_sqnr_logits_db"]),
                      _number(row["float_agree_top1"]), _share(row["float_kl"])]
        if "only" in modes:
            cells += [_share(row["noise_share"]), _number(row["only_sqnr_logits_db"]),
                      _number(row["only_agree_top1"])]
        if "bias" in modes and kind == "layer":
            cells += [_number(row["bias_cost_db"]), _number(row["bias_agree_top1"])]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _calibration(calibration: dict) -> str:
    """Where the ranges came from: this run's pass, or a calibration file (its path)."""
    images = f"{calibration['images']} calibration images"
    source = calibration["source"]
    return images if source.startswith("<") else f"{images}, read from {source}"


def run_markdown(store, run: dict, settings: dict, table: pd.DataFrame) -> str:
    modes = [m for m in MODES if m in settings["modes"]]
    rank_mode = modes[0]
    base = _base_metrics(store, run)
    rows = table.to_dict("records")
    exact = bool(table["exact"].all()) if len(table) else bool(base["exact"])
    engine = ENGINE_WORDS[run["engine"]]
    if run["engine"] == "simulated":
        engine += (", exact here (every rescale a shift, no float layer between integer ones)"
                   if exact else ", NOT exact for every variant here (the exact column says "
                   "which units' variants were): figures approximate the integer model's")
    lines = [f"## {run['model']}: sensitivity of {run['base']}", "",
             f"Each variant ran on the first {run['images']} {run['image_source']} "
             f"(label-free, against float32's logits of them) with {engine}. One statistics "
             f"pass serves every variant ({_calibration(run['calibration'])}).", "",
             f"Base: logit SQNR {_number(base['sqnr_logits_db'])} dB, top-1 agreement "
             f"{_number(base['agree_top1'])} %, KL {_share(base['kl'])}.", ""]
    lines += [f"- {MODE_TITLES[m].format(bits=settings['bias_bits'])}" for m in modes]
    lines += ["", f"Layers, costliest first ({RANK_KEYS[rank_mode][0]}):", ""]
    lines += _ranked_table(rows, "layer", rank_mode, modes)
    if any(r["kind"] == "block" for r in rows) and rank_mode != "bias":
        lines += ["", f"Residual blocks, costliest first ({RANK_KEYS[rank_mode][0]}):", ""]
        lines += _ranked_table(rows, "block", rank_mode, modes)
    return "\n".join(lines) + "\n"


def plot_sensitivity(tables, summaries, settings: dict, path: Path):
    """Bars per unit in network order, one panel per (run, mode); blocks hatched grey."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    modes = [m for m in MODES if m in settings["modes"]]
    panels = [(table, run, mode) for table, run in zip(tables, summaries) for mode in modes]
    units = max((len(t) for t in tables), default=1)
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(8.0, 0.14 * units + 2), 3.2 *
                                                      len(panels)), squeeze=False)
    ops = sorted({op for t in tables for op in t["op"] if op != "block"})
    colours = {op: f"C{i}" for i, op in enumerate(ops)}
    for ax, (table, run, mode) in zip(axes[:, 0], panels):
        key = RANK_KEYS[mode][0]
        values = table[key].to_numpy(dtype=float)
        x = np.arange(len(table))
        finite = np.where(np.isfinite(values), values, np.nan)
        for op in [*ops, "block"]:
            chosen = (table["op"] == op).to_numpy()
            if not chosen.any():
                continue
            ax.bar(x[chosen], np.nan_to_num(finite[chosen]), width=0.8,
                   color="0.75" if op == "block" else colours[op],
                   hatch="//" if op == "block" else None, label=op)
        ax.axhline(0, color="black", lw=0.5)
        ax.set_xticks(x)
        ax.set_xticklabels(table["unit"], rotation=90, fontsize=5)
        ax.set_xlim(-0.6, len(table) - 0.4)
        ax.set_ylabel(key, fontsize=8)
        ax.set_title(f"{run['model']} ({run['base']}): "
                     f"{MODE_TITLES[mode].format(bits=settings['bias_bits'])}", fontsize=8)
        ax.legend(fontsize=6, loc="upper right", ncol=len(ops) + 1)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=110)
    plt.close(fig)


def write_sensitivity(store, summary: dict, output: Path) -> pd.DataFrame:
    """sensitivity.csv (every run's rows, network order), sensitivity.md (ranked), and
    sensitivity.png (bars), from the variants ``summary`` (sensitivity.json) names."""
    output = Path(output)
    tables = [run_table(store, run) for run in summary["runs"]]
    settings = summary["settings"]
    table = pd.concat(tables, ignore_index=True) if tables else pd.DataFrame()
    atomic_write_text(output / "sensitivity.csv", table.to_csv(index=False))
    text = "# Per-layer sensitivity\n\n" + "\n".join(
        run_markdown(store, run, settings, t) for run, t in zip(summary["runs"], tables))
    atomic_write_text(output / "sensitivity.md", text)
    if tables:
        plot_sensitivity(tables, summary["runs"], settings, output / "sensitivity.png")
    return table
