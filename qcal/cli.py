"""qcal's command line: thin commands that validate, translate arguments and call the pipeline.

Domain errors become one line and an exit code (click's convention: 2 for a bad invocation, 1 for a
runtime failure); no traceback reaches the user.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click

from qcal import __version__
from qcal.config import (DEFAULT_BATCH_CACHE_DIR, DEFAULT_BATCH_SIZE, DEFAULT_CALIB_IMAGES,
                         DEFAULT_HISTOGRAM_BINS)
from qcal.errors import QcalError, UsageProblem
from qcal.files import atomic_write_text


def _translate_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageProblem as exc:
            raise click.UsageError(str(exc)) from None
        except QcalError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a file qcal was asked to read or write: name it, no traceback
            where = exc.filename or ""
            raise click.ClickException(f"{where}: {exc.strerror or exc}") from None
    return wrapper


class ImageRangeType(click.ParamType):
    name = "START:STOP"

    def convert(self, value, param, ctx):
        from qcal.data.plan import parse_range

        if isinstance(value, tuple):
            return value
        try:
            start, stop = parse_range(value)
        except UsageProblem as exc:
            self.fail(str(exc), param, ctx)
        if not 0 <= start < stop:
            self.fail(f"need 0 <= START < STOP, got {value}", param, ctx)
        return start, stop


class ModelType(click.ParamType):
    """A name `qcal models` lists, or a model file a family takes (an ONNX classifier)."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        from qcal.families import canonical_model_name

        try:
            return canonical_model_name(value)
        except UsageProblem as exc:
            self.fail(str(exc), param, ctx)


class BiasType(click.ParamType):
    """Bias precision: a bit count 2..32 (own power-of-2 scale) or int32-acc."""

    name = "BITS|int32-acc"

    def convert(self, value, param, ctx):
        if value == "int32-acc" or isinstance(value, int):
            return value
        try:
            bits = int(value)
        except ValueError:
            self.fail(f"'{value}' is neither a bit count nor int32-acc", param, ctx)
        if not 2 <= bits <= 32:
            self.fail(f"bias bits must be from 2 to 32, not {bits}", param, ctx)
        return bits


class ChannelsType(click.ParamType):
    name = "R,G,B"

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        try:
            numbers = tuple(float(v) for v in value.split(","))
        except ValueError:
            self.fail(f"expected comma-separated numbers, not '{value}'", param, ctx)
        return numbers


def model_options(multiple: bool):
    def decorate(func):
        func = click.option("--pretrained", is_flag=True,
                            help="Load ImageNet weights from MXNet's model store ($MXNET_HOME).")(func)
        func = click.option("--params", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help="Load weights from this Gluon .params file.")(func)
        help_text = ("Model: a name from `qcal models` or an .onnx file"
                     + ("; repeatable." if multiple else "."))
        func = click.option("--model", "models" if multiple else "model", type=ModelType(),
                            required=True, multiple=multiple, help=help_text)(func)
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
                     help=f"How many calibration images (default {DEFAULT_CALIB_IMAGES}, or all of a "
                          f"smaller set)."),
        click.option("--batch-size", type=click.IntRange(min=1), default=DEFAULT_BATCH_SIZE,
                     show_default=True),
        click.option("--input-size", type=click.IntRange(min=8),
                     help="Centre-crop size (default: 224, or what an ONNX model states)."),
        click.option("--crop-ratio", type=click.FloatRange(0.1, 1.0),
                     help="Resize the short side to size/ratio before the crop (default 0.875)."),
        click.option("--mean", type=ChannelsType(),
                     help="Per-channel mean on a 0..1 scale (default ImageNet's, or the ONNX "
                          "model's)."),
        click.option("--std", type=ChannelsType(), help="Per-channel std on a 0..1 scale."),
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=DEFAULT_BATCH_CACHE_DIR, show_default=True,
                     help="Where decoded, preprocessed batches are cached."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def quant_options(func):
    """Each option may repeat; evaluate runs the cross product of the values given."""
    from qcal.config import ACTIVATION_METHODS, WEIGHT_GRANULARITIES, WEIGHT_SCALES, QuantOptions

    d = QuantOptions()
    options = [
        click.option("--method", "activation_method", multiple=True,
                     type=click.Choice(ACTIVATION_METHODS),
                     help=f"Activation calibration method (default {d.activation_method})."),
        click.option("--percentile", type=click.FloatRange(0, 100, min_open=True), multiple=True,
                     help=f"For --method percentile (default {d.percentile})."),
        click.option("--global-scale", type=click.FloatRange(0, min_open=True), multiple=True,
                     help=f"For --method global: every activation's range (default "
                          f"{d.global_scale})."),
        click.option("--weight-scale", multiple=True, type=click.Choice(WEIGHT_SCALES),
                     help=f"Weight scale rounding (default {d.weight_scale})."),
        click.option("--weight-granularity", multiple=True, type=click.Choice(WEIGHT_GRANULARITIES),
                     help=f"Per-tensor or per-output-channel weight scales (default "
                          f"{d.weight_granularity})."),
        click.option("--bias-bits", "bias", multiple=True, type=BiasType(),
                     help=f"Bias precision: 2..32 bits with its own power-of-2 scale, or int32-acc "
                          f"(int32 at the accumulator scale) (default {d.bias_bits})."),
        click.option("--skip-k-conv", multiple=True, type=click.IntRange(min=0),
                     help="Keep the first K convs in float32 (default 0)."),
        click.option("--skip-dense", is_flag=True, help="Keep dense (classifier) layers in float32."),
        click.option("--calib", "calibration_file",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Reuse the ranges of a `qcal calibrate` file (no calibration pass)."),
    ]
    for option in reversed(options):
        func = option(func)
    return func


def _variants(activation_method, percentile, global_scale, weight_scale, weight_granularity,
              bias, skip_k_conv, skip_dense):
    from qcal.config import expand_variants

    axes = {"activation_method": activation_method, "percentile": percentile,
            "global_scale": global_scale, "weight_scale": weight_scale,
            "weight_granularity": weight_granularity, "bias": bias, "skip_k_conv": skip_k_conv}
    return expand_variants({k: v for k, v in axes.items() if v}, {"skip_dense": skip_dense})


def _data_dict(data, num_images, calib_data, calib_range, calib_images, input_size, crop_ratio,
               mean, std):
    values = {"data": data, "num_images": num_images, "calib_data": calib_data,
              "calib_range": calib_range, "calib_images": calib_images,
              "input_size": input_size, "crop_ratio": crop_ratio, "mean": mean, "std": std}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="qcal")
@click.option("--threads", type=click.IntRange(min=1), default=None, envvar="QCAL_THREADS",
              help="CPU threads for MXNet (OpenMP) and TVM's runtime [default: each engine's own "
                   "choice, half the logical CPUs on x86]. Results do not depend on it.")
def main(threads):
    """Calibrate, quantize (int8, through Apache TVM) and evaluate convolutional classifiers."""
    if threads is not None:
        # read by MXNet when it loads and by TVM's pool when it starts: both happen later,
        # inside the command (qcal imports them lazily)
        if "mxnet" in sys.modules or "tvm" in sys.modules:
            raise click.UsageError("--threads must be set before MXNet or TVM is loaded")
        os.environ["OMP_NUM_THREADS"] = str(threads)
        os.environ["TVM_NUM_THREADS"] = str(threads)


@main.command()
def models():
    """List the supported models and where their weights come from."""
    from qcal.families import family_of, listed_specs

    for spec in listed_specs():
        weights = family_of(spec.name).weights_note(spec)
        shape = "x".join(str(d) for d in spec.input_shape)
        click.echo(f"{spec.name:22s} {shape:10s} {spec.classes:5d} classes  {weights:26s} "
                   f"{spec.description}")


@main.command()
@model_options(multiple=True)
@data_options
@quant_options
@click.option("--float-only", is_flag=True, help="Evaluate float32 only (no int8 variant).")
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path),
              help="Also write the table here (.csv, .md or .json, by suffix).")
@click.option("--results-dir", type=click.Path(file_okay=False, path_type=Path),
              help="Keep the run's full results (per-variant records, predictions, plot) here.")
@click.option("--wait", is_flag=True,
              help="If another run is writing into --results-dir, wait for it instead of stopping.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines.")
@_translate_errors
def evaluate(models, params, pretrained, data, num_images, calib_data, calib_range,
             calib_images, batch_size, input_size, crop_ratio, mean, std, cache_dir,
             activation_method, percentile, global_scale, weight_scale, weight_granularity, bias,
             skip_k_conv, skip_dense, calibration_file, float_only, output, results_dir, wait,
             quiet):
    """Quantize through TVM, run the integer model, report top-1/top-5 against float32.

    Quantization options may repeat (e.g. --bias-bits 8 --bias-bits 16); every combination is one
    int8 variant. Options not given take their defaults (shown in each option's help).
    """
    import tempfile

    from qcal.drivers.sweep import run_sweep
    from qcal.drivers.sweep_config import SweepConfig
    from qcal.report import tables as report

    if output is not None and output.suffix not in report.TABLE_WRITERS:
        raise click.BadParameter(f"suffix must be one of {', '.join(report.TABLE_WRITERS)}",
                                 param_hint="--output")
    if (params is not None or calibration_file is not None) and len(models) > 1:
        raise click.UsageError("--params and --calib apply to one --model only")
    variants = () if float_only else _variants(activation_method, percentile, global_scale,
                                               weight_scale, weight_granularity, bias,
                                               skip_k_conv, skip_dense)
    config = SweepConfig(
        name="evaluate", models=tuple(models),
        data=_data_dict(data, num_images, calib_data, calib_range, calib_images, input_size,
                        crop_ratio, mean, std),
        batch_size=batch_size, seed=0, float32=True, pretrained=pretrained, variants=variants,
        params=str(params) if params else None,
        calibration_file=str(calibration_file) if calibration_file else None)
    with tempfile.TemporaryDirectory(prefix="qcal-evaluate-") as scratch:
        table = run_sweep(config, results_dir or Path(scratch), quiet=quiet,
                          command=" ".join(["qcal", *sys.argv[1:]]), cache_dir=cache_dir,
                          wait=wait)
    click.echo(report.format_markdown(table), nl=False)
    if output is not None:
        atomic_write_text(output, report.TABLE_WRITERS[output.suffix](table))


@main.command()
@model_options(multiple=False)
@data_options
@click.option("--output", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The calibration file to write (.npz).")
@click.option("--bins", type=click.IntRange(min=0), default=DEFAULT_HISTOGRAM_BINS, show_default=True,
              help="|x| histogram bins per tensor (0: abs-max only, enough for global/max/power2).")
@click.option("--plots", type=click.Path(file_okay=False, path_type=Path),
              help="Draw each tensor's histogram with every method's threshold into this folder.")
@click.option("--quiet", is_flag=True, help="No progress bars.")
@_translate_errors
def calibrate(model, params, pretrained, data, num_images, calib_data, calib_range, calib_images,
              batch_size, input_size, crop_ratio, mean, std, cache_dir, output, bins, plots, quiet):
    """Run the model once over the calibration images and save every method's ranges.

    `qcal evaluate --calib FILE` reuses the file without touching the data again; it refuses a file
    made for another model.
    """
    from qcal.calib.result import CalibrationResult
    from qcal.drivers.session import ModelSession

    if output.suffix != ".npz":
        raise click.BadParameter("the calibration file must end in .npz", param_hint="--output")
    data_dict = _data_dict(data, num_images, calib_data, calib_range, calib_images, input_size,
                           crop_ratio, mean, std)
    session = ModelSession(model, data_dict, batch_size, params=params, pretrained=pretrained,
                           quiet=quiet, cache_dir=cache_dir)
    stats, selection = session.collect_statistics(bins)
    result = CalibrationResult.from_statistics(stats)
    result.save(output)
    click.echo(f"wrote {output}: {len(result.tensors)} tensors, {result.num_images} calibration "
               f"images ({selection.describe()['kind']} {selection.start}:{selection.stop}) "
               f"through the {result.engine}, methods {', '.join(result.methods)}")
    if plots is not None:
        from qcal.report.calibration_plots import plot_thresholds

        count = plot_thresholds(result, plots)
        click.echo(f"wrote {count} histogram plots to {plots}")


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
@click.option("--wait", is_flag=True,
              help="If another sweep is writing into the output folder, wait for it to finish "
                   "(then reuse what it finished) instead of stopping.")
@_translate_errors
def sweep(config, output, data, calib_data, num_images, quiet, wait):
    """Run every variant of a YAML sweep CONFIG into one table (resumable: run it again to finish).

    The config is checked completely before any work starts; see configs/ for examples. One sweep
    writes into an output folder at a time: a second one stops with exit 1, naming the other
    process, unless --wait is given.
    """
    from qcal.drivers.sweep import run_sweep
    from qcal.drivers.sweep_config import load_sweep_config

    cfg = load_sweep_config(config, {"data": str(data) if data else None,
                                     "calib_data": str(calib_data) if calib_data else None,
                                     "num_images": num_images})
    output = output or Path("results") / cfg.name
    run_sweep(cfg, output, quiet=quiet, command=" ".join(["qcal", *sys.argv[1:]]), wait=wait)
    click.echo((output / "results.md").read_text(), nl=False)
    click.echo(f"wrote {output}/results.md, results.csv, results.json, predictions.csv, top1.png")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
