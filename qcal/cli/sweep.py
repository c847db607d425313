"""`qcal sweep`: a YAML grid of models and variants into one table."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from pathlib import Path

import click

from qcal.cli.options import calib_repeats_option, verify_images_option
from qcal.cli.params import translate_errors
from qcal.config import DEFAULT_SHARD_IMAGES


@contextmanager
def distributed(address, workers, shard_images):
    """The Dask cluster the sweep runs on (``qcal.drivers.cluster``), or None: this process."""
    if not (address or workers):
        yield None
        return
    from qcal.drivers.cluster import connect

    with connect(address, workers, shard_images) as cluster:
        yield cluster


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: results/<config name>).")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Evaluation images, replacing the config's data.data (ImageNet folder or .rec).")
@click.option("--calib-data", type=click.Path(exists=True, path_type=Path),
              help="Calibration images, replacing the config's data.calib_data.")
@click.option("--num-images", type=click.IntRange(min=1), help="Replace data.num_images.")
@verify_images_option(from_config=True)
@calib_repeats_option(from_config=True)
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on the terminal.")
@click.option("--wait", is_flag=True,
              help="If another sweep is writing into the output folder, wait for it to finish "
                   "(then reuse what it finished) instead of stopping.")
@click.option("--force", is_flag=True,
              help="Use the output folder even if it holds another config's results (its "
                   "finished variants this config shares are reused).")
@click.option("--cluster", "cluster_address", metavar="ADDRESS",
              help="Run the variants as tasks on the Dask scheduler at ADDRESS "
                   "(tcp://HOST:8786); its workers must reach the data and the output folder "
                   "at the same paths (docs/cluster.md).")
@click.option("--workers", type=click.IntRange(min=1),
              help="Run the variants as tasks on a local Dask cluster of N worker processes.")
@click.option("--shard-images", type=click.IntRange(min=1), default=DEFAULT_SHARD_IMAGES,
              show_default=True,
              help="On a cluster, evaluate a variant's images in tasks of at most this many "
                   "(whole batches).")
@translate_errors
def sweep(config, output, data, calib_data, num_images, verify_images, calib_repeats, quiet, wait,
          force, cluster_address, workers, shard_images):
    """Run every variant of a YAML sweep CONFIG into one table (resumable: run it again to finish).

    The config is checked completely before any work starts (every model, weights file, data
    source, calibration range and output location; all problems are reported, each with its file
    and line); see configs/ for examples. An output folder belongs to one config: another is
    refused unless it only adds models or variants (then the sweep resumes) or --force is given.
    One sweep writes into an output folder at a time: a second one stops with exit 1, naming the
    other process, unless --wait is given. With --workers N or --cluster ADDRESS the same sweep
    runs as tasks on Dask workers (the same results, byte for byte, apart from timings).
    """
    from qcal.drivers.sweep import run_sweep
    from qcal.drivers.sweep_config import parse_sweep_config
    from qcal.drivers.validate import OutputPath, check_run
    from qcal.errors import raise_problems

    if cluster_address and workers:
        raise click.UsageError("--cluster connects to a running cluster, --workers starts a "
                               "local one: give one of them")
    cfg, problems = parse_sweep_config(config, {
        "data": str(data) if data else None,
        "calib_data": str(calib_data) if calib_data else None, "num_images": num_images},
        verify_images=verify_images, calib_repeats=calib_repeats)
    if cfg is None:  # not even a config to check further
        raise_problems(problems)
    named = OutputPath(output, "folder", "--output") if output else OutputPath(
        Path("results") / cfg.name, "folder", "output folder")
    checked = check_run(cfg, [named], results_folder=named.path, force=force, quiet=quiet,
                        problems=problems)
    output = named.path
    with checked.undo_on_failure(), distributed(cluster_address, workers, shard_images) as cluster:
        run_sweep(cfg, output, quiet=quiet, command=" ".join(["qcal", *sys.argv[1:]]),
                  wait=wait, force=force, sessions=checked.sessions, cluster=cluster)
    click.echo((output / "results.md").read_text(), nl=False)
    click.echo(f"wrote {output}/results.md, results.csv, results.json, predictions.csv, top1.png")
