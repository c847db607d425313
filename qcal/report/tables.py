"""Report stage: result rows, tables as CSV / Markdown / JSON (written atomically), progress bars."""
from __future__ import annotations

import numpy as np
import pandas as pd


def result_row(model: str, variant: str, result) -> dict:
    return {"model": model, "variant": variant, "images": result.images,
            "top1": 100.0 * result.top1, "top5": 100.0 * result.top5,
            "images_per_s": result.images_per_second}


def format_markdown(table: pd.DataFrame) -> str:
    def cell(column, value):
        if isinstance(value, float):
            if np.isnan(value):
                return ""
            if column in ("mcnemar_p", "p_value") or column.startswith("kl"):
                return f"{value:.3g}"
            if column in ("lost", "gained", "verified"):
                return f"{value:.0f}"
            if column in ("images_per_s", "wall_s"):
                return f"{value:.1f}"
            if column == "delta_top1":
                return f"{value:+.2f}"
            return f"{value:.2f}"
        return str(value)

    lines = ["| " + " | ".join(table.columns) + " |",
             "|" + "|".join("---" for _ in table.columns) + "|"]
    for _, row in table.iterrows():
        lines.append("| " + " | ".join(cell(c, row[c]) for c in table.columns) + " |")
    return "\n".join(lines) + "\n"


TABLE_WRITERS = {
    ".csv": lambda table: table.to_csv(index=False),
    ".md": format_markdown,
    ".json": lambda table: table.to_json(orient="records", indent=2) + "\n",
}


def progress_bar(total: int, description: str, quiet: bool, unit: str = "img"):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit=unit, disable=quiet, leave=False,
                dynamic_ncols=True)
