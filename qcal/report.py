"""Report stage: tables of results (pandas), written atomically as CSV, Markdown or JSON."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import pandas as pd

COLUMNS = ["model", "variant", "images", "top1", "top5", "images_per_s"]


def result_row(model: str, variant: str, result) -> dict:
    return {"model": model, "variant": variant, "images": result.images,
            "top1": 100.0 * result.top1, "top5": 100.0 * result.top5,
            "images_per_s": result.images_per_second}


def make_table(rows) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=COLUMNS)


def format_markdown(table: pd.DataFrame) -> str:
    def cell(column, value):
        if column in ("top1", "top5"):
            return f"{value:.2f}"
        if column == "images_per_s":
            return f"{value:.0f}"
        return str(value)

    header = "| " + " | ".join(table.columns) + " |"
    rule = "| " + " | ".join("---" for _ in table.columns) + " |"
    body = ["| " + " | ".join(cell(c, row[c]) for c in table.columns) + " |"
            for _, row in table.iterrows()]
    return "\n".join([header, rule, *body]) + "\n"


def format_terminal(table: pd.DataFrame) -> str:
    return table.to_string(index=False, float_format=lambda v: f"{v:.2f}")


def atomic_write_text(path: Path, text: str):
    """Write to a temporary file beside ``path`` and rename: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


WRITERS = {
    ".csv": lambda table: table.to_csv(index=False),
    ".md": format_markdown,
    ".json": lambda table: json.dumps(table.to_dict(orient="records"), indent=2) + "\n",
}


def write_table(table: pd.DataFrame, path: Path):
    atomic_write_text(path, WRITERS[Path(path).suffix](table))


def progress_bar(total: int, description: str, quiet: bool):
    from tqdm import tqdm

    return tqdm(total=total, desc=description, unit="img", disable=quiet, leave=False,
                dynamic_ncols=True)
