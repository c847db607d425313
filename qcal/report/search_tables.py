"""Report stage for ``qcal search``: every evaluated configuration with its cost and test, the
Pareto front (top-1 against cost) as a table and a plot, and the chosen configuration."""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from qcal.files import atomic_path, atomic_write_text
from qcal.report.tables import format_markdown

FRONT_COLUMNS = ["step", "variant", "float_layers", "per_channel", "bias_bits", "top1",
                 "delta_top1", "lost", "gained", "lower_bound", "p_value", "non_inferior"]


def search_markdown(info: dict, table: pd.DataFrame) -> str:
    s = info["settings"]
    margin, confidence = 100 * s["margin"], 100 * (1 - s["alpha"])
    lines = [f"# qcal search: {info['model']}", "",
             f"Test: {info['test']}, margin {margin:g} points, alpha {s['alpha']:g}, on "
             f"{info['images']} images (float32 top-1 {info['float32_top1']:.2f} %). A "
             f"configuration passes (non_inferior) when the test rejects \"worse than float32 "
             f"by {margin:g} points or more\", i.e. when the one-sided {confidence:g} % lower "
             f"confidence bound of its top-1 difference (lower_bound, points) is above "
             f"-{margin:g}.", "",
             f"Stopped: {info['stop_reason']}; {len(table)} configuration(s) evaluated, "
             f"{len(info['skipped'])} skipped as costlier than one that passed. alpha holds per "
             f"configuration, not for the search as a whole: for a claim about the chosen one, "
             f"rerun chosen.yaml on images the search did not see, or use alpha / "
             f"{max(1, len(table))} (Bonferroni).", ""]
    chosen = info["chosen"]
    if chosen is None:
        lines += ["No configuration passed: none is chosen (no chosen.yaml).", ""]
    else:
        lines += [f"Chosen (cheapest that passed: fewest float layers, then per-tensor, then "
                  f"fewest bias bits): **{chosen['variant']}**, top-1 {chosen['top1']:.2f} % "
                  f"({chosen['delta_top1']:+.2f}), lower bound {chosen['lower_bound']:+.2f} "
                  f"points, p = {chosen['p_value']:.3g}; rerun with "
                  f"`qcal sweep chosen.yaml`.", ""]
    if len(table):
        front = table[table["pareto"]]
        lines += ["## Pareto front (top-1 against float layers, per-channel, bias bits)", "",
                  format_markdown(front[FRONT_COLUMNS]).rstrip(), "",
                  "## Every evaluated configuration", "",
                  format_markdown(table[["phase", *FRONT_COLUMNS, "pareto"]]).rstrip(), ""]
    return "\n".join(lines) + "\n"


def plot_front(table: pd.DataFrame, info: dict, path: Path):
    """Top-1 against layers kept float32, one marker per configuration (filled: passed; square:
    per-channel; colour: bias bits), the front joined, float32 and float32 - margin drawn."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    top1 = info["float32_top1"]
    margin = 100 * info["settings"]["margin"]
    ax.axhline(top1, color="tab:green", lw=1, label=f"float32 {top1:.2f} %")
    ax.axhline(top1 - margin, color="tab:green", lw=1, ls="--",
               label=f"float32 - margin ({margin:g} points)")
    colours = {b: plt.cm.viridis(i / max(1, len(set(table["bias_bits"])) - 1))
               for i, b in enumerate(sorted(set(table["bias_bits"])))}
    for _, row in table.iterrows():
        ax.scatter(row["float_layers"], row["top1"], marker="s" if row["per_channel"] else "o",
                   s=40, edgecolors=colours[row["bias_bits"]],
                   facecolors=colours[row["bias_bits"]] if row["non_inferior"] else "none",
                   zorder=3)
    front = table[table["pareto"]].sort_values(["float_layers", "top1"])
    ax.plot(front["float_layers"], front["top1"], color="tab:red", lw=1, zorder=2,
            label="Pareto front")
    for bits, colour in colours.items():
        ax.scatter([], [], color=colour, label=f"bias {bits if bits < 32 else 'int32'}")
    ax.scatter([], [], marker="s", color="grey", label="per-channel (circle: per-tensor)")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel("layers kept in float32")
    ax.set_ylabel("top-1 (%)  filled: not worse than float32 by the test")
    ax.set_title(info["model"], fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=120)
    plt.close(fig)


def write_search(info: dict, output: Path):
    """``info``: the search's summary (``qcal.drivers.search.summary``)."""
    table = pd.DataFrame(info["rows"])
    atomic_write_text(output / "search.csv", table.to_csv(index=False))
    atomic_write_text(output / "search.md", search_markdown(info, table))
    atomic_write_text(output / "search.json", json.dumps(info, indent=2, default=str) + "\n")
    if len(table):
        plot_front(table, info, output / "front.png")
    return table
