"""Report stage, calibration: each tensor's |x| histogram with every method's chosen threshold."""
from __future__ import annotations

import re
from pathlib import Path

import numpy as np

from qcal.files import atomic_path

DISPLAY_BINS = 256


def _safe_name(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def plot_thresholds(result, folder: Path) -> int:
    """One PNG per tensor with a histogram; returns how many were written."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    written = 0
    for index, (name, stats) in enumerate(result.tensors.items()):
        if not stats.has_histogram or stats.amax <= 0:
            continue
        counts = stats.counts.astype(np.float64)
        counts[0] -= stats.zeros  # the spike of exact zeros (ReLU) hides everything else
        used = max(1, int(np.searchsorted(stats.edges, stats.amax, side="right")))
        group = max(1, used // DISPLAY_BINS)  # sum fine bins into about DISPLAY_BINS bars
        used = -(-used // group) * group
        padded = np.zeros(used)
        padded[:min(used, len(counts))] = counts[:used]
        counts = padded.reshape(-1, group).sum(axis=1)
        width = (stats.edges[1] - stats.edges[0]) * group
        fig, ax = plt.subplots(figsize=(8, 4))
        ax.bar(np.arange(len(counts)) * width, np.maximum(counts, 0.5), width=width,
               align="edge", alpha=0.6)
        ax.set_yscale("log")
        for method in result.methods:
            amax = result.chosen[method][name]
            ax.axvline(amax, linestyle="--", linewidth=1)
            ax.text(amax, ax.get_ylim()[1], f" {method}", rotation=90, va="top", fontsize=7)
        ax.set_xlabel("|x|")
        ax.set_ylabel("count (log; exact zeros left out)")
        ax.set_title(f"{name}  (abs-max {stats.amax:.4g}, {stats.zeros} zeros)", fontsize=8)
        fig.tight_layout()
        with atomic_path(folder / f"{index:03d}_{_safe_name(name)}.png", suffix=".png") as tmp:
            fig.savefig(tmp, dpi=90)
        plt.close(fig)
        written += 1
    return written
