"""`qcal sensitivity`: per layer and residual block, what quantizing it costs the int8 model."""
from __future__ import annotations

import dataclasses
import sys
from pathlib import Path

import click

from qcal.cli.options import data_options, data_options_dict, model_options, quant_options
from qcal.cli.params import translate_errors
from qcal.config import DEFAULT_SENSITIVITY_BIAS_BITS, DEFAULT_SENSITIVITY_IMAGES


def _modes():
    from qcal.eval.sensitivity import MODES

    return MODES


def _engines():
    from qcal.eval.sensitivity import ENGINES

    return ENGINES


@click.command()
@click.argument("config", required=False, type=click.Path(path_type=Path))
@model_options(multiple=True, required=False)
@data_options
@quant_options
@click.option("--images", type=click.IntRange(min=1),
              help="Label-free images each variant runs on: the first N fidelity crops, else "
                   f"evaluation images (default: the config's, else "
                   f"{DEFAULT_SENSITIVITY_IMAGES}).")
@click.option("--mode", "modes", multiple=True, type=click.Choice(_modes()),
              help="What to measure per unit (repeatable; default all): float (only this unit "
                   "kept float32), only (only this unit quantized), bias (only this layer's bias "
                   "at --probe-bias-bits).")
@click.option("--probe-bias-bits", type=click.IntRange(2, 32),
              help="The bias precision the bias mode gives one layer at a time (default: the "
                   f"config's, else {DEFAULT_SENSITIVITY_BIAS_BITS}).")
@click.option("--engine", type=click.Choice(_engines()),
              help="integer: the numpy integer reference (the compiled model equals it bit for "
                   "bit); simulated: the fake-quantized model (exact only with power-of-2 "
                   "rescales and no float layer between integer ones). Default integer.")
@click.option("--no-blocks", is_flag=True, help="Layers only, no residual blocks.")
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: results/<config name>, or "
                   "results/sensitivity-<model>).")
@click.option("--wait", is_flag=True,
              help="If another run is writing into the output folder, wait for it instead of "
                   "stopping.")
@click.option("--force", is_flag=True,
              help="Use the output folder even if it holds another config's results.")
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on the terminal.")
@translate_errors
def sensitivity(config, models, params, pretrained, data, num_images, calib_data, calib_range,
                calib_images, batch_size, preprocessing, cache_dir, variant_values,
                calibration_file, images, modes, probe_bias_bits, engine, no_blocks, output,
                wait, force, quiet):
    """Which layer costs the int8 model its fidelity: per quantizable layer (conv, dense,
    channel affine) and residual block, keep only it float32, quantize only it, and shorten only
    its bias; each scored label-free against float32 (logit SQNR, top-1 agreement, KL).

    Either a CONFIG (a sweep file: its models, data and variants, each variant one base
    configuration, none meaning the defaults, and an optional `sensitivity:` section with
    images, modes, bias_bits, engine, blocks) or --model with the quantization options (each
    combination one base). Writes sensitivity.csv, a ranked sensitivity.md and
    sensitivity.png into the output folder; resumable (run it again to finish), and
    `qcal report FOLDER` writes them again.
    """
    from qcal.drivers.sensitivity import SensitivitySettings, run_sensitivity
    from qcal.drivers.validate import OutputPath, check_run, cli_locations
    from qcal.errors import UsageProblem, raise_problems

    given = {"images": images, "modes": tuple(modes) or None, "bias_bits": probe_bias_bits,
             "engine": engine, "blocks": False if no_blocks else None}
    given = {k: v for k, v in given.items() if v is not None}
    problems = []
    if config is not None:
        from qcal.drivers.sweep_config import parse_sweep_config

        if models or params or calibration_file:
            raise click.UsageError("give either CONFIG or --model (with --params / --calib), "
                                   "not both")
        cfg, problems = parse_sweep_config(config, {"data": str(data) if data else None,
                                                    "calib_data": str(calib_data)
                                                    if calib_data else None,
                                                    "num_images": num_images})
        if cfg is None:
            raise_problems(problems)
        section = cfg.sections.get("sensitivity", {})
        try:
            settings = SensitivitySettings.from_section(
                section, lambda key: cfg.where(f"sensitivity.{key}", str(config)))
            settings = dataclasses.replace(settings, **given)
        except UsageProblem as exc:
            problems.append(exc)
            settings = None
        if not cfg.variants:  # no grid, no variants: the default configuration is the base
            from qcal.config import QuantOptions

            cfg = dataclasses.replace(cfg, variants=(QuantOptions(),))
        default_output = Path("results") / cfg.name
    else:
        if not models:
            raise click.UsageError("give a CONFIG file or --model")
        from qcal.cli.options import variants_from_options
        from qcal.drivers.sweep_config import SweepConfig

        if (params is not None or calibration_file is not None) and len(models) > 1:
            raise click.UsageError("--params and --calib apply to one --model only")
        settings = SensitivitySettings(**given)
        data_dict = data_options_dict(data, num_images, calib_data, calib_range, calib_images,
                                      preprocessing)
        variants = variants_from_options(variant_values)
        cfg = SweepConfig(
            name="sensitivity", models=tuple(models), data=data_dict, batch_size=batch_size,
            seed=0, float32=True, pretrained=pretrained, variants=variants,
            params=str(params) if params else None,
            calibration_file=str(calibration_file) if calibration_file else None,
            verify_images=0, locations=cli_locations(models, data_dict))
        default_output = Path("results") / f"sensitivity-{Path(models[0]).stem}"
    named = OutputPath(output, "folder", "--output") if output else OutputPath(
        default_output, "folder", "output folder")
    identity = None
    if settings is not None and not problems:
        from qcal.drivers.sensitivity import sensitivity_identity

        identity = sensitivity_identity(cfg, settings)
    checked = check_run(cfg, [named], results_folder=named.path if identity else None,
                        force=force, cache_dir=cache_dir, quiet=quiet, problems=problems,
                        identity=identity)
    with checked.undo_on_failure():
        run_sensitivity(cfg, settings, named.path, quiet=quiet,
                        command=" ".join(["qcal", *sys.argv[1:]]), cache_dir=cache_dir,
                        wait=wait, force=force, sessions=checked.sessions)
    click.echo((named.path / "sensitivity.md").read_text(), nl=False)
    click.echo(f"wrote {named.path}/sensitivity.md, sensitivity.csv, sensitivity.png, "
               "sensitivity.json")
