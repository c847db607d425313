"""Option groups shared by the commands, and their translation into a sweep's configuration."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from qcal.cli.params import BiasType, ImageRangeType, ModelType, PreprocessingValueType
from qcal.config import (DEFAULT_BATCH_CACHE_DIR, DEFAULT_BATCH_SIZE, DEFAULT_CALIB_IMAGES,
                         DEFAULT_VERIFY_IMAGES)


def model_options(multiple: bool, required: bool = True):
    def decorate(func):
        func = click.option("--pretrained", is_flag=True,
                            help="Load ImageNet weights from MXNet's model store ($MXNET_HOME).")(func)
        func = click.option("--params", type=click.Path(exists=True, dir_okay=False, path_type=Path),
                            help="Load weights from this Gluon .params file (save_parameters, or "
                                 "the NAME-0000.params of an export).")(func)
        help_text = ("Model: a name from `qcal models`, a gluoncv model-zoo name, an "
                     "NAME-symbol.json export or an .onnx file"
                     + ("; repeatable." if multiple else "."))
        func = click.option("--model", "models" if multiple else "model", type=ModelType(),
                            required=required, multiple=multiple, help=help_text)(func)
        return func
    return decorate


def verify_images_option(from_config: bool = False):
    """``--verify-images K``: before each int8 variant is evaluated, its compiled model must equal
    the numpy integer reference bit for bit on K calibration images (0: no check). With
    ``from_config`` the option only overrides a sweep file's ``verify_images``."""
    default = (f"the config's verify_images, else {DEFAULT_VERIFY_IMAGES}" if from_config
               else str(DEFAULT_VERIFY_IMAGES))
    return click.option(
        "--verify-images", type=click.IntRange(min=0),
        default=None if from_config else DEFAULT_VERIFY_IMAGES,
        help="Before evaluating each int8 variant, check its compiled model against the numpy "
             "integer reference, bit for bit, on this many calibration images (0: off; default "
             f"{default}). A mismatch names the first differing layer and stops with exit 1.")


def calib_repeats_option(from_config: bool = False):
    """``--calib-repeats R``: every int8 variant calibrated on R calibration subsets
    (``qcal.data.calib_subsets``), the table showing the spread of its top-1 and agreement."""
    return click.option(
        "--calib-repeats", type=click.IntRange(min=1), default=None if from_config else 1,
        help="Recalibrate every int8 variant on this many calibration subsets of the "
             "calibration size (disjoint blocks of the calibration source when it has room, else "
             "bootstrap draws; fresh crops with --calib-crops), one statistics pass each, and "
             "report the spread (min/max/std) of top-1 and agreement across them (default "
             + ("the config's calib_repeats, else 1)." if from_config else "1: off)."))


def data_options(func):
    """The data options; the preprocessing ones (``PREPROCESSING_FIELDS``, shared with sweep files
    and preprocessing files) reach the command as one ``preprocessing`` dict of those given."""
    from qcal.data.preprocessing import PREPROCESSING_FIELDS, PREPROCESSING_KEYS

    options = [
        click.option("--data", "data", type=click.Path(exists=True, path_type=Path),
                     help="Evaluation images: class folders (ROOT/<class>/<image>; ImageNet synset "
                          "ids, class numbers or any names, sorted), a .rec file, an .npz of "
                          "'images' and 'labels' or an MNIST-style NAME-images-idx3-ubyte[.gz] "
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
        *[click.option(f.option, f.key, type=PreprocessingValueType(f.key), help=f.help)
          for f in PREPROCESSING_FIELDS],
        click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path),
                     default=DEFAULT_BATCH_CACHE_DIR, show_default=True,
                     help="Where decoded, preprocessed batches are cached."),
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        given = {key: kwargs.pop(key) for key in PREPROCESSING_KEYS}
        return func(*args, preprocessing={k: v for k, v in given.items() if v is not None},
                    **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


# The quantization options that make variants: their values reach the command as one
# ``variant_values`` dict ({option: values given}), which ``variants_from_options`` expands.
VARIANT_AXES = ("activation_method", "percentile", "global_scale", "weight_scale",
                "weight_granularity", "bias", "skip_k_conv", "weight_bits", "activation_bits",
                "first_layer_bits", "last_layer_bits", "rounding", "quantize_ops", "float_layers",
                "bias_granularity", "bias_correction", "layer_bias_bits", "weight_rounding",
                "adaround_iterations", "adaround_images", "intermediate_bits")
FLAGS = ("skip_dense", "simulate", "equalize")  # on/off options that apply to every variant


def quant_options(func):
    """Each option may repeat; evaluate runs the cross product of the values given."""
    from qcal.config import (ACTIVATION_METHODS, BIAS_CORRECTIONS, BIAS_GRANULARITIES,
                             EXACT_INTERMEDIATE_BITS, MAX_BITS, MIN_BITS, MIN_INTERMEDIATE_BITS,
                             QUANTIZABLE_OPS, ROUNDINGS, WEIGHT_GRANULARITIES, WEIGHT_ROUNDINGS,
                             WEIGHT_SCALES, QuantOptions)

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
        click.option("--bias-granularity", multiple=True, type=click.Choice(BIAS_GRANULARITIES),
                     help=f"One power-of-2 scale for a layer's B-bit bias, or one per output "
                          f"channel (default {d.bias_granularity}; int32-acc ignores it)."),
        click.option("--bias-correction", multiple=True, type=click.Choice(BIAS_CORRECTIONS),
                     help="empirical: re-estimate each layer's bias, in network order, so that the "
                          "integer model's per-channel output mean on the calibration images equals "
                          f"float32's (default {d.bias_correction})."),
        click.option("--equalize", is_flag=True,
                     help="Cross-layer equalization (Nagel et al. 2019) of consecutive convs through "
                          "ReLU/ReLU6 before quantization; float32 output unchanged (its own "
                          "statistics pass)."),
        click.option("--skip-k-conv", multiple=True, type=click.IntRange(min=0),
                     help="Keep the first K convs in float32 (default 0)."),
        click.option("--skip-dense", is_flag=True, help="Keep dense (classifier) layers in float32."),
        click.option("--weight-bits", multiple=True, type=click.IntRange(MIN_BITS, MAX_BITS),
                     help=f"Weight width: symmetric levels +-(2^(b-1)-1), stored in int8 "
                          f"(default {d.weight_bits})."),
        click.option("--activation-bits", multiple=True, type=click.IntRange(MIN_BITS, MAX_BITS),
                     help=f"Activation width, as --weight-bits (default {d.activation_bits})."),
        click.option("--first-layer-bits", multiple=True, type=click.IntRange(MIN_BITS, MAX_BITS),
                     help="Weight and input width of the first conv/dense layer (default: as the "
                          "others)."),
        click.option("--last-layer-bits", multiple=True, type=click.IntRange(MIN_BITS, MAX_BITS),
                     help="Weight and input width of the last conv/dense layer (default: as the "
                          "others)."),
        click.option("--rounding", multiple=True, type=click.Choice(ROUNDINGS),
                     help=f"Ties of every rounding right shift and integer rescale: upward (half "
                          f"up) or nearest (half to even) (default {d.rounding})."),
        click.option("--intermediate-bits", multiple=True,
                     type=click.IntRange(MIN_INTERMEDIATE_BITS, EXACT_INTERMEDIATE_BITS),
                     help="Width of the int32 tensors one integer op hands to another (residual "
                          "adds' operands and sums, int32 shortcuts, pooling inputs): B < 32 "
                          "requantizes each to +-(2^(B-1)-1) at a power-of-2 scale from its "
                          "abs-max, as Relay's nbit_activation; conv accumulators stay int32 "
                          f"(default {d.intermediate_bits}: exact)."),
        click.option("--weight-rounding", multiple=True, type=click.Choice(WEIGHT_ROUNDINGS),
                     help=f"How each conv/dense weight rounds to its level: nearest, or adaround "
                          f"(directions learned per layer on calibration images; Nagel et al. "
                          f"2020) (default {d.weight_rounding})."),
        click.option("--adaround-iterations", multiple=True, type=click.IntRange(min=1),
                     help=f"AdaRound's optimiser steps per layer (default "
                          f"{d.adaround_iterations})."),
        click.option("--adaround-images", multiple=True, type=click.IntRange(min=1),
                     help=f"AdaRound learns from the first N calibration images (default "
                          f"{d.adaround_images})."),
        click.option("--quantize-ops", multiple=True, metavar="OP,OP,...",
                     help=f"Quantize only these op types, the rest stay float32 (default: all of "
                          f"{', '.join(QUANTIZABLE_OPS)})."),
        click.option("--float-layers", multiple=True, metavar="NAME,NAME,...",
                     help="Keep these layers (names as in layers.csv) in float32."),
        click.option("--layer-bias-bits", multiple=True, metavar="NAME=BITS,...",
                     help="Bias precision of single layers over --bias-bits: bits (2..32) or "
                          "int32-acc per layer, e.g. conv1=8,conv2=int32-acc."),
        click.option("--simulate", is_flag=True,
                     help="Evaluate the fake-quantized float model (numpy, nothing compiled) "
                          "instead of the integer one; rows are labelled 'simulated'."),
        click.option("--calib", "calibration_file",
                     type=click.Path(exists=True, dir_okay=False, path_type=Path),
                     help="Reuse the ranges of a `qcal calibrate` file (no calibration pass)."),
    ]

    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        values = {key: kwargs.pop(key) for key in VARIANT_AXES + FLAGS}
        return func(*args, variant_values=values, **kwargs)

    for option in reversed(options):
        wrapper = option(wrapper)
    return wrapper


def variants_from_options(variant_values: dict):
    """The variants the quantization options describe: the cross product of every option's values
    (in ``VARIANT_AXES`` order), ``--skip-dense`` applying to all."""
    from qcal.config import expand_variants

    axes = {k: variant_values[k] for k in VARIANT_AXES if variant_values.get(k)}
    return expand_variants(axes, {k: variant_values[k] for k in FLAGS})


def data_options_dict(data, num_images, calib_data, calib_range, calib_images, preprocessing):
    values = {"data": data, "num_images": num_images, "calib_data": calib_data,
              "calib_range": calib_range, "calib_images": calib_images, **preprocessing}
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in values.items() if v is not None}
