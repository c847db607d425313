"""`qcal report`: a results folder's tables and plots written again from its stored results."""
from __future__ import annotations

from pathlib import Path

import click

from qcal.cli.params import translate_errors


@click.command()
@click.argument("results_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--wait", is_flag=True,
              help="If a run is writing into the folder, wait for it instead of stopping.")
@translate_errors
def report(results_dir, wait):
    """Write every table and plot of RESULTS_DIR (the output folder of `qcal sweep`,
    `qcal sensitivity` or `qcal search`) again from its stored results, recomputing nothing:
    the sweep's tables and its top-1 plot (one panel per model, float32 and its interval drawn
    across), the sensitivity tables and bars, the search's front."""
    from qcal.drivers.report import regenerate

    written = regenerate(results_dir, wait=wait)
    click.echo(f"wrote {results_dir}/{', '.join(written)}")
