"""`qcal evaluate`: float32 and int8 variants of one or more models, one table."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from qcal.cli.options import (calib_repeats_option, data_options, data_options_dict, model_options,
                              quant_options, variants_from_options, verify_images_option)
from qcal.cli.params import translate_errors
from qcal.files import atomic_write_text


@click.command()
@model_options(multiple=True)
@data_options
@quant_options
@verify_images_option()
@calib_repeats_option()
@click.option("--float-only", is_flag=True, help="Evaluate float32 only (no int8 variant).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table here (.csv, .md or .json, by suffix).")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the run's full results (per-variant records, predictions, plot) here.")
@click.option("--wait", is_flag=True,
              help="If another run is writing into --results-dir, wait for it instead of stopping.")
@click.option("--force", is_flag=True,
              help="Use --results-dir even if it holds another config's results (its finished "
                   "variants this run shares are reused).")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines.")
@translate_errors
def evaluate(models, params, pretrained, data, num_images, calib_data, calib_range,
             calib_images, batch_size, preprocessing, cache_dir, variant_values, calibration_file,
             verify_images, calib_repeats, float_only, output, results_dir, wait, force, quiet):
    """Quantize through TVM, run the integer model, report top-1/top-5 against float32.

    Quantization options may repeat (e.g. --bias-bits 8 --bias-bits 16); every combination is one
    int8 variant. Options not given take their defaults (shown in each option's help). Everything
    is checked before any work: models, weights, data, calibration images, output locations.
    """
    import tempfile

    from qcal.drivers.sweep import run_sweep
    from qcal.drivers.sweep_config import SweepConfig
    from qcal.drivers.validate import OutputPath, check_run, cli_locations
    from qcal.report import tables as report
    from qcal.report.sweep_tables import results_markdown

    if output is not None and output.suffix not in report.TABLE_WRITERS:
        raise click.BadParameter(f"suffix must be one of {', '.join(report.TABLE_WRITERS)}",
                                 param_hint="--output")
    if (params is not None or calibration_file is not None) and len(models) > 1:
        raise click.UsageError("--params and --calib apply to one --model only")
    variants = () if float_only else variants_from_options(variant_values)
    data_dict = data_options_dict(data, num_images, calib_data, calib_range, calib_images,
                                  preprocessing)
    config = SweepConfig(
        name="evaluate", models=tuple(models), data=data_dict,
        batch_size=batch_size, seed=0, float32=True, pretrained=pretrained, variants=variants,
        params=str(params) if params else None,
        calibration_file=str(calibration_file) if calibration_file else None,
        verify_images=verify_images, calib_repeats=calib_repeats,
        locations={**cli_locations(models, data_dict), "calib_repeats": "--calib-repeats"})
    outputs = [OutputPath(output, "file", "--output")] if output is not None else []
    if results_dir is not None:
        outputs.append(OutputPath(results_dir, "folder", "--results-dir"))
    checked = check_run(config, outputs, results_folder=results_dir, force=force,
                        cache_dir=cache_dir, quiet=quiet)
    with checked.undo_on_failure(), tempfile.TemporaryDirectory(prefix="qcal-evaluate-") as scratch:
        table = run_sweep(config, results_dir or Path(scratch), quiet=quiet,
                          command=" ".join(["qcal", *sys.argv[1:]]), cache_dir=cache_dir,
                          wait=wait, force=force, sessions=checked.sessions)
        if output is not None:
            atomic_write_text(output, report.TABLE_WRITERS[output.suffix](table))
    click.echo(results_markdown(table), nl=False)
