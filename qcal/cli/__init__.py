"""qcal's command line: thin commands that validate, translate arguments and call a driver.

One module per command; the group and the options every command shares live here.
"""
from __future__ import annotations

import os
import sys

import click

from qcal import __version__

THREADS_ENV = "QCAL_THREADS"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcal")
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help=f"CPU threads for MXNet (OpenMP) and TVM's runtime (or ${THREADS_ENV}) "
                   "[default: each engine's own choice, half the logical CPUs on x86]. Results "
                   "do not depend on it.")
def main(threads):
    """Calibrate, quantize (int8, through Apache TVM) and evaluate convolutional classifiers."""
    where = "--threads"
    if threads is None and os.environ.get(THREADS_ENV, "").strip():
        # read here rather than by click's envvar: an invalid value must blame the variable
        where, text = THREADS_ENV, os.environ[THREADS_ENV].strip()
        if not text.isdigit() or int(text) < 1:
            raise click.UsageError(f"{THREADS_ENV} must be a number of threads >= 1, not "
                                   f"{text!r}")
        threads = int(text)
    if threads is not None:
        # read by MXNet when it loads and by TVM's pool when it starts: both happen later,
        # inside the command (qcal imports them lazily)
        loaded = "mxnet" in sys.modules or "tvm" in sys.modules
        if loaded and os.environ.get("OMP_NUM_THREADS") != str(threads):
            raise click.UsageError(f"{where} must be set before MXNet or TVM is loaded")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["TVM_NUM_THREADS"] = str(threads)


def _register_commands():
    from qcal.cli.calibrate import calibrate
    from qcal.cli.evaluate import evaluate
    from qcal.cli.models import models
    from qcal.cli.report import report
    from qcal.cli.search import search
    from qcal.cli.sensitivity import sensitivity
    from qcal.cli.sweep import sweep

    for command in (models, evaluate, calibrate, sweep, search, sensitivity, report):
        main.add_command(command)


_register_commands()
