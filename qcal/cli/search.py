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


# The search's settings: a command-line option each, or a key of the config's ``search:``
# section (the option wins); both checked by the same click type. key -> (type, default, help)
SETTINGS = {
    "margin": (click.FloatRange(0, 100, max_open=True), 0.3,
               "Top-1 points a configuration may lose to float32 and still pass the "
               "non-inferiority test."),
    "alpha": (click.FloatRange(0, 0.5, min_open=True, max_open=True), 0.05,
              "Level of the one-sided test (per configuration)."),
    "budget_variants": (click.IntRange(min=1), None,
                        "Evaluate at most this many configurations (finished ones a resumed "
                        "search reuses count too) [default: 24 unless a time budget is given]."),
    "budget_minutes": (click.FloatRange(0, min_open=True), None,
                       "Start no new configuration after this many minutes of this run."),
    "methods": (ListType(click.Choice(ACTIVATION_METHODS)), "power2,l2,percentile",
                "Activation methods to try."),
    "granularities": (ListType(click.Choice(WEIGHT_GRANULARITIES)), "tensor,channel",
                      "Weight granularities to try."),
    "bias": (ListType(BiasType()), "8,16,int32-acc", "Bias precisions to try (bits or int32-acc)."),
    "skip_k_conv": (ListType(click.IntRange(min=0)), "0",
                    "skip_k_conv values to try (first K convs in float32)."),
    "max_float_layers": (click.IntRange(min=0), 8,
                         "At most this many layers kept float32 by the greedy step (0: none)."),
    "ranking_images": (click.IntRange(min=1), 32,
                       "Label-free images the sensitivity ranking of the greedy step runs on."),
}


def setting_options(func):
    for key, (kind, default, help_text) in reversed(SETTINGS.items()):
        shown = "" if default is None else f" [default: {default}]"
        func = click.option(f"--{key.replace('_', '-')}", key, type=kind, default=None,
                            help=help_text + shown)(func)
    return func


def settings_values(given: dict, section: dict, where) -> dict:
    """Each setting from the command line, else the config's section, else its default, checked
    by its click type; a bad section value is a ``UsageProblem`` naming its FILE:LINE."""
    from qcal.errors import UsageProblem

    unknown = [k for k in section if k not in SETTINGS]
    if unknown:
        raise UsageProblem(f"{where(unknown[0])}: unknown search key '{unknown[0]}' (known: "
                           f"{', '.join(SETTINGS)})")
    values = {}
    for key, (kind, default, _) in SETTINGS.items():
        if given.get(key) is not None:
            values[key] = given[key]
            continue
        value = section.get(key, default)
        if isinstance(value, list):
            value = ",".join(map(str, value))
        try:
            values[key] = None if value is None else kind.convert(value, None, None)
        except click.BadParameter as exc:
            raise UsageProblem(f"{where(key)}: search.{key}: {exc.message}") from None
    return values


@click.command()
@click.argument("config", type=click.Path(path_type=Path))
@click.option("--output", type=click.Path(file_okay=False, path_type=Path),
              help="Output folder (default: results/<config name>-search).")
@setting_options
@verify_images_option(from_config=True)
@click.option("--quiet", is_flag=True, help="No progress bars or log lines on the terminal.")
@click.option("--wait", is_flag=True,
              help="If another run is writing into the output folder, wait for it.")
@click.option("--force", is_flag=True,
              help="Use the output folder even if it holds another config's results.")
@translate_errors
def search(config, output, verify_images, quiet, wait, force, **given):
    """Find the cheapest configurations of CONFIG's model whose top-1 is not significantly worse
    than float32's (one-sided paired non-inferiority test at --margin, on the same images).

    CONFIG is a sweep file (see configs/) with one model, its data, and at most one variant: the
    base configuration the search varies; its optional `search:` section takes the settings
    below by their names (margin, alpha, budget_variants, ..., methods: [l2, percentile]), an
    option given overriding it. The search tries every combination of --methods,
    --granularities, --bias and --skip-k-conv, cheapest first, then keeps layers in float32 one
    at a time in the order of their sensitivity ranking until the test passes. Every
    configuration lands in the output folder's result store (run it again to resume, or with a
    larger budget to go further); search.md holds the front and the chosen configuration,
    chosen.yaml reruns it with `qcal sweep`.
    """
    from qcal.drivers.search import SearchSettings, run_search
    from qcal.drivers.sweep_config import parse_sweep_config
    from qcal.drivers.validate import OutputPath, check_run
    from qcal.errors import UsageProblem, raise_problems

    cfg, problems = parse_sweep_config(config, verify_images=verify_images)
    if cfg is None:
        raise_problems(problems)
    try:
        v = settings_values(given, cfg.sections.get("search", {}),
                            lambda key: cfg.where(f"search.{key}", str(config)))
    except UsageProblem as exc:
        raise_problems([*problems, exc])
    if v["budget_variants"] is None and v["budget_minutes"] is None:
        v["budget_variants"] = 24
    settings = SearchSettings(
        margin=v["margin"] / 100, alpha=v["alpha"], budget_variants=v["budget_variants"],
        budget_seconds=None if v["budget_minutes"] is None else 60 * v["budget_minutes"],
        methods=v["methods"], granularities=v["granularities"], bias=v["bias"],
        skip_k_conv=v["skip_k_conv"], max_float_layers=v["max_float_layers"],
        ranking_images=v["ranking_images"])
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
