"""``qcal report``: every table and plot of a results folder written again from its stored
results, nothing recomputed.

A folder's summary file says what it holds and names every stored variant by key: a sweep's
``results.json``, a sensitivity run's ``sensitivity.json``, a search's ``search.json`` (its
evaluated configurations, with their tests; the configurations themselves are the folder's
sweep records). Each summary has one writer in the
report stage, the same one the run itself called, so the files come out as the run wrote them
(the same bytes for the tables, from the same records).
"""
from __future__ import annotations

import json
from pathlib import Path

from qcal.errors import QcalError
from qcal.files import folder_lock


def _sweep(store, summary: dict, folder: Path) -> list:
    from qcal.report.sweep_tables import write_results

    keys = [v["key"] for v in summary["variants"]]
    repeats = summary.get("calibration_subset_keys")
    kept = {k: v for k, v in summary.items()
            if k not in ("rows", "variants", "calibration_subset_keys")}
    write_results(store, keys, folder, kept, repeats)
    written = ["results.csv", "results.md", "results.json", "predictions.csv", "top1.png"]
    return written + [name for name, made in (("layers.csv", (folder / "layers.csv").exists()),
                                              ("calibration_subsets.csv", bool(repeats)))
                      if made]


def _sensitivity(store, summary: dict, folder: Path) -> list:
    from qcal.report.sensitivity_tables import write_sensitivity

    write_sensitivity(store, summary, folder)
    return ["sensitivity.csv", "sensitivity.md", "sensitivity.png"]


def _search(store, summary: dict, folder: Path) -> list:
    from qcal.report.search_tables import write_search

    table = write_search(summary, folder)
    return ["search.csv", "search.md", "search.json"] + (["front.png"] if len(table) else [])


# summary file -> its writer ``(store, summary, folder) -> names written``
REPORTS = {"results.json": _sweep, "sensitivity.json": _sensitivity, "search.json": _search}


def regenerate(folder: Path, wait: bool = False) -> list:
    """Write every report of ``folder`` again from its stored results; returns the file names
    written. A ``QcalError`` names a folder without results, or a summary or variant that
    cannot be read (the run that made it can be run again: it resumes)."""
    from qcal.drivers.sweep import ResultStore

    folder = Path(folder)
    found = [name for name in REPORTS if (folder / name).is_file()]
    if not found:
        raise QcalError(f"{folder} holds no qcal results (none of {', '.join(REPORTS)})")
    store = ResultStore(folder)
    written = []
    with folder_lock(folder, wait=wait, what="results folder"):
        for name in found:
            try:
                summary = json.loads((folder / name).read_text())
                if not isinstance(summary, dict):
                    raise ValueError("not a JSON object")
            except (OSError, UnicodeDecodeError, ValueError) as exc:
                raise QcalError(f"{folder / name} cannot be read ({exc}); run the command that "
                                "wrote it again") from None
            try:
                written.extend(REPORTS[name](store, summary, folder))
            except (KeyError, TypeError) as exc:
                raise QcalError(f"{folder / name} is not a summary this qcal writes (no "
                                f"{exc}); run the command that wrote it again") from None
    return written
