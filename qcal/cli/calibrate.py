"""`qcal calibrate`: one statistics pass, every method's ranges in a reusable file."""
from __future__ import annotations

from pathlib import Path

import click

from qcal.cli.options import data_options, data_options_dict, model_options
from qcal.cli.params import translate_errors
from qcal.config import DEFAULT_HISTOGRAM_BINS


@click.command()
@model_options(multiple=False)
@data_options
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The calibration file to write (.npz).")
@click.option("--bins", type=click.IntRange(min=0), default=DEFAULT_HISTOGRAM_BINS, show_default=True,
              help="|x| histogram bins per tensor (0: abs-max only, enough for global/max/power2). "
                   "The KL methods read a second, fixed 2048-bin histogram over [0, abs-max], "
                   "from a second pass over the calibration images.")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path),
              help="Draw each tensor's histogram with every method's threshold into this folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@translate_errors
def calibrate(model, params, pretrained, data, num_images, calib_data, calib_range, calib_images,
              batch_size, preprocessing, cache_dir, output, bins, plots, quiet):
    """Run the model over the calibration images and save every method's ranges (two passes with
    histograms: the second bins every tensor at the range the first found).

    `qcal evaluate --calib FILE` reuses the file without touching the data again; it refuses a file
    made for another model.
    """
    from qcal.calib.result import CalibrationResult
    from qcal.drivers.sweep_config import SweepConfig
    from qcal.drivers.validate import OutputPath, check_run, cli_locations

    if output.suffix != ".npz":
        raise click.BadParameter("the calibration file must end in .npz", param_hint="--output")
    data_dict = data_options_dict(data, num_images, calib_data, calib_range, calib_images,
                                  preprocessing)
    config = SweepConfig(name="calibrate", models=(model,), data=data_dict, batch_size=batch_size,
                         seed=0, float32=False, pretrained=pretrained, variants=(),
                         params=str(params) if params else None,
                         locations=cli_locations((model,), data_dict))
    outputs = [OutputPath(output, "file", "--output")]
    if plots is not None:
        outputs.append(OutputPath(plots, "folder", "--plots"))
    checked = check_run(config, outputs, cache_dir=cache_dir, calibrate=True, quiet=quiet)
    with checked.undo_on_failure():
        session = checked.sessions[model]
        stats, selection = session.collect_statistics(bins)
        result = CalibrationResult.from_statistics(stats)
        count = None
        if plots is not None:  # before the file: a failure leaves no calibration file behind
            from qcal.report.calibration_plots import plot_thresholds

            count = plot_thresholds(result, plots)
        result.save(output)
    click.echo(f"wrote {output}: {len(result.tensors)} tensors, {result.num_images} calibration "
               f"images ({selection.describe()['kind']} {selection.start}:{selection.stop}) "
               f"through the {result.engine}, methods {', '.join(result.methods)}")
    if count is not None:
        click.echo(f"wrote {count} histogram plots to {plots}")
