"""qcal's command line: thin commands that validate, translate arguments and call the pipeline.

Domain errors become one line and an exit code (click's convention: 2 for a bad invocation, 1 for a
runtime failure); no traceback reaches the user.
"""
from __future__ import annotations

import functools
import sys
from pathlib import Path

import click

from . import __version__
from .errors import QcalError, UsageProblem


def _translate_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageProblem as exc:
            raise click.UsageError(str(exc)) from None
        except QcalError as exc:
            raise click.ClickException(str(exc)) from None
    return wrapper


class ImageRangeType(click.ParamType):
    name = "START:STOP"

    def convert(self, value, param, ctx):
        from .datasets import parse_range

        if isinstance(value, tuple):
            return value
        try:
            start, stop = parse_range(value)
        except UsageProblem as exc:
            self.fail(str(exc), param, ctx)
        if not 0 <= start < stop:
            self.fail(f"need 0 <= START < STOP, got {value}", param, ctx)
        return start, stop


def model_options(multiple: bool):
    def decorate(func):
        func = click.option("--pretrained", is_flag=True,
                            help="Load ImageNet weights from MXNet's model store ($MXNET_HOME).")(func)
        func = click.option("--params", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help="Load weights from this Gluon .params file.")(func)
        help_text = "Model name (see `qcal models`)" + (", repeatable." if multiple else ".")
        func = click.option("--model", "models" if multiple else "model", required=True,
                            multiple=multiple, help=help_text)(func)
        return func
    return decorate


def data_options(func):
    options = [
        click.option("--data", "data", type=click.Path(exists=True, path_type=Path),
                     help="Evaluation images: an ImageNet class-folder directory or a .rec file "
                          "(Fashion-MNIST models default to the vendored test split)."),
        click.option("--num-images", type=click.IntRange(min=1),
                     help="Evaluate the first N images of the fixed order (default: all)."),
        click.option("--calib-data", type=click.Path(exists=True, path_type=Path),
                     help="Calibration images from a separate source."),
        click.option("--calib-range", type=ImageRangeType(),
                     help="Calibration images at these positions of the source."),
        click.option("--calib-images", type=click.IntRange(min=1),
                     help="How many calibration images (default 500, or all of a smaller set)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=64, show_default=True),
        click.option("--input-size", type=click.IntRange(min=8), default=224, show_default=True,
                     help="ImageNet models: centre-crop size."),
        click.option("--crop-ratio", type=click.FloatRange(0.1, 1.0), default=0.875,
                     show_default=True, help="ImageNet models: resize short side to size/ratio."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=Path(".qcal-cache/batches"), show_default=True,
                     help="Where decoded, preprocessed batches are cached."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _data_plan(spec, data, num_images, calib_data, calib_range, calib_images, input_size,
               crop_ratio, calibrate=True):
    from .datasets import Preprocessing, plan_data

    preprocessing = Preprocessing(input_size=input_size, crop_ratio=crop_ratio)
    return plan_data(spec.family, data=data, num_images=num_images, calib_data=calib_data,
                     calib_range=calib_range, calib_images=calib_images,
                     preprocessing=preprocessing, calibrate=calibrate)


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcal")
def main():
    """Calibrate, quantize (int8, through Apache TVM) and evaluate convolutional classifiers."""


@main.command()
def models():
    """List the supported models and where their weights come from."""
    from .models import MODEL_SPECS, pretrained_params_path

    for spec in MODEL_SPECS.values():
        if spec.embedded_params is not None:
            weights = "embedded" if spec.embedded_params.is_file() else "embedded (missing)"
        else:
            weights = ("model store: found" if pretrained_params_path(spec.name).is_file()
                       else "--pretrained or --params")
        shape = "x".join(str(d) for d in spec.input_shape)
        click.echo(f"{spec.name:22s} {shape:10s} {spec.classes:5d} classes  {weights:26s} "
                   f"{spec.description}")


@main.command()
@model_options(multiple=True)
@data_options
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table here (.csv, .md or .json, by suffix).")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_translate_errors
def evaluate(models, params, pretrained, data, num_images, calib_data, calib_range,
             calib_images, batch_size, input_size, crop_ratio, cache_dir, output, quiet):
    """Evaluate models and report top-1/top-5.

    This version evaluates float32 only (MXNet); int8 evaluation through TVM arrives with the
    quantizer. It never reports int8 numbers it did not compute.
    """
    from . import report
    from .datasets import BatchCache
    from .evaluate import MXNetFloatRunner, evaluate as run_evaluation
    from .models import get_spec, load_model

    if output is not None and output.suffix not in report.WRITERS:
        raise click.BadParameter(f"suffix must be one of {', '.join(report.WRITERS)}",
                                 param_hint="--output")
    if params is not None and len(models) > 1:
        raise click.UsageError("--params applies to one --model only")
    rows = []
    for name in models:
        spec = get_spec(name)
        plan = _data_plan(spec, data, num_images, calib_data, calib_range, calib_images,
                          input_size, crop_ratio, calibrate=False)
        net = load_model(name, params=params, pretrained=pretrained)
        progress = report.progress_bar(len(plan.evaluation), f"{name} float32", quiet)
        with progress:
            result = run_evaluation(MXNetFloatRunner(net), plan.evaluation, batch_size,
                                    BatchCache(cache_dir), progress)
        rows.append(report.result_row(name, "float32", result))
    table = report.make_table(rows)
    click.echo(report.format_terminal(table))
    if output is not None:
        report.write_table(table, output)


@main.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: results/<config name>).")
@click.option("--data", type=click.Path(exists=True, path_type=Path),
              help="Evaluation images, replacing the config's data.data (ImageNet folder or .rec).")
@click.option("--calib-data", type=click.Path(exists=True, path_type=Path),
              help="Calibration images, replacing the config's data.calib_data.")
@click.option("--num-images", type=click.IntRange(min=1), help="Replace data.num_images.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on the terminal.")
@_translate_errors
def sweep(config, output, data, calib_data, num_images, quiet):
    """Run every variant of a YAML sweep CONFIG into one table (resumable: run it again to finish).

    The config is checked completely before any work starts; see configs/ for examples.
    """
    from .sweep import run_sweep
    from .sweep_config import load_sweep_config

    cfg = load_sweep_config(config, {"data": str(data) if data else None,
                                     "calib_data": str(calib_data) if calib_data else None,
                                     "num_images": num_images})
    output = output or Path("results") / cfg.name
    run_sweep(cfg, output, quiet=quiet, command=" ".join(["qcal", *sys.argv[1:]]))
    click.echo((output / "results.md").read_text(), nl=False)
    click.echo(f"wrote {output}/results.md, results.csv, results.json, predictions.csv, top1.png")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
