"""`qcal search`: the cheapest configurations not significantly worse than float32."""
from __future__ import annotations

import sys
from pathlib import Path

import click

from qcal.cli.options import verify_images_option
from qcal.cli.params import BiasType, translate_errors
from qcal.config import ACTIVATION_METHODS, WEIGHT_GRANULARITIES


class ListType(click.ParamType):
    """A comma-separated list, each item checked by ``item`` (a Choice or another type)."""

    name = "A,B,..."

    def __init__(self, item):
        self.item = item

    def convert(self, value, param, ctx):
        if isinstance(value, tuple):
            return value
        items = [v.strip() for v in str(value).split(",")]
        if not all(items):
            self.fail(f"an empty item in {value!r}", param, ctx)
        return tuple(dict.fromkeys(self.item.convert(v, param, ctx) for v in items))


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: results/<config name>-search).")
@click.option("--margin", type=click.FloatRange(0, 100, max_open=True), default=0.3,
              show_default=True,
              help="Top-1 points a configuration may lose to float32 and still pass the "
                   "non-inferiority test.")
@click.option("--alpha", type=click.FloatRange(0, 0.5, min_open=True, max_open=True),
              default=0.05, show_default=True, help="Level of the one-sided test.")
@click.option("--budget-variants", type=click.IntRange(min=1), default=None,
              help="Evaluate at most this many configurations (finished ones a resumed search "
                   "reuses count too) [default: 24 unless --budget-minutes is given].")
@click.option("--budget-minutes", type=click.FloatRange(0, min_open=True), default=None,
              help="Start no new configuration after this many minutes of this run.")
@click.option("--methods", type=ListType(click.Choice(ACTIVATION_METHODS)),
              default="power2,l2,percentile", show_default=True,
              help="Activation methods to try.")
@click.option("--granularities", type=ListType(click.Choice(WEIGHT_GRANULARITIES)),
              default="tensor,channel", show_default=True, help="Weight granularities to try.")
@click.option("--bias", type=ListType(BiasType()), default="8,16,int32-acc", show_default=True,
              help="Bias precisions to try (bits or int32-acc).")
@click.option("--skip-k-conv", type=ListType(click.IntRange(min=0)), default="0",
              show_default=True, help="skip_k_conv values to try (first K convs in float32).")
@click.option("--max-float-layers", type=click.IntRange(min=0), default=8, show_default=True,
              help="At most this many layers kept float32 by the greedy step (0: no greedy step).")
@click.option("--ranking-images", type=click.IntRange(min=1), default=32, show_default=True,
              help="Label-free images the sensitivity ranking of the greedy step runs on.")
@verify_images_option(from_config=True)
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on the terminal.")
@click.option("--wait", is_flag=True,
              help="If another run is writing into the output folder, wait for it.")
@click.option("--force", is_flag=True,
              help="Use the output folder even if it holds another config's results.")
@translate_errors
def search(config, output, margin, alpha, budget_variants, budget_minutes, methods,
           granularities, bias, skip_k_conv, max_float_layers, ranking_images, verify_images,
           quiet, wait, force):
    """Find the cheapest configurations of CONFIG's model whose top-1 is not significantly worse
    than float32's (one-sided paired non-inferiority test at --margin, on the same images).

    CONFIG is a sweep file (see configs/) with one model, its data, and at most one variant: the
    base configuration the search varies. The search tries every combination of --methods,
    --granularities, --bias and --skip-k-conv, cheapest first, then keeps layers in float32 one
    at a time in the order of their sensitivity ranking until the test passes. Every
    configuration lands in the output folder's result store (run it again to resume, or with a
    larger budget to go further); search.md holds the front and the chosen configuration,
    chosen.yaml reruns it with `qcal sweep`.
    """
    from qcal.drivers.search import SearchSettings, run_search
    from qcal.drivers.sweep_config import parse_sweep_config
    from qcal.drivers.validate import OutputPath, check_run
    from qcal.errors import raise_problems

    if budget_variants is None and budget_minutes is None:
        budget_variants = 24
    settings = SearchSettings(
        margin=margin / 100, alpha=alpha, budget_variants=budget_variants,
        budget_seconds=None if budget_minutes is None else 60 * budget_minutes,
        methods=methods, granularities=granularities, bias=bias, skip_k_conv=skip_k_conv,
        max_float_layers=max_float_layers, ranking_images=ranking_images)
    cfg, problems = parse_sweep_config(config, verify_images=verify_images)
    if cfg is None:
        raise_problems(problems)
    if not problems and len(cfg.models) != 1:
        raise click.UsageError(f"{config}: a search takes one model, not {len(cfg.models)}")
    if not problems and len(cfg.variants) > 1:
        raise click.UsageError(f"{config}: a search takes at most one variant (the base "
                               f"configuration), not {len(cfg.variants)}")
    named = OutputPath(output, "folder", "--output") if output else OutputPath(
        Path("results") / f"{cfg.name}-search", "folder", "output folder")
    checked = check_run(cfg, [named], quiet=quiet, problems=problems)
    with checked.undo_on_failure():
        found, chosen = run_search(cfg, settings, named.path, checked.sessions[cfg.models[0]],
                                   quiet=quiet, command=" ".join(["qcal", *sys.argv[1:]]),
                                   force=force, wait=wait)
    click.echo((named.path / "search.md").read_text(), nl=False)
    click.echo(f"wrote {named.path}/search.md, search.csv, search.json, front.png"
               + (", chosen.yaml" if chosen is not None else ""))
