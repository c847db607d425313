"""The search driver: the cheapest configurations of one model whose top-1 is not significantly
worse than float32's, by a one-sided paired non-inferiority test on the same images.

Cost of a configuration, compared component by component (``cost``): the layers it keeps in
float32 (``float_layers`` plus ``skip_k_conv``), per-channel weight scales (1) or per-tensor (0),
and the bias width (32 for int32-acc). The activation method costs nothing at run time.

1. **Grid.** Every combination of the activation methods, weight granularities, bias widths and
   ``skip_k_conv`` values asked for, over the base configuration, in increasing cost (float
   layers, then per-channel, then bias bits). A candidate whose cost is strictly above (no
   component lower, one higher) a configuration already shown non-inferior is not evaluated: it
   cannot be cheaper.
2. **Float layers, greedy** (as accuracy-control tools revert layers, but stopping by the test):
   from the grid configuration without float layers whose lower confidence bound is highest, keep
   one more layer in float32 at a time, in the order of the sensitivity ranking of that
   configuration (``qcal.drivers.sensitivity.rank_layers``: the logit SQNR each layer costs, on
   label-free images, numpy integer reference), until a configuration passes the test, the
   ranking or ``max_float_layers`` runs out, or it is strictly costlier than one that passed.

Each configuration is tested against float32 with ``qcal.report.statistics.noninferiority_test``
(Tango's score test, one-sided, at ``margin`` and ``alpha``): a configuration *passes* when the
test rejects "worse by at least the margin". A point estimate never decides. The search stops
when the grid and the greedy step are done, or when the budget (evaluated configurations, wall
time of this run) is spent.

Every configuration runs through the sweep driver (``qcal.drivers.sweep.run_sweep``) into the
search's output folder, so each is one record of the same result store (resumable: a second run
reuses what the first finished, and with a larger budget goes on from there) and the folder has
the sweep's tables too. Written beside them: ``search.csv`` (every evaluated configuration, its
cost, test and whether it is on the Pareto front), ``search.md``, ``front.png``, ``search.json``,
``ranking.json`` (the sensitivity ranking, reused on resume) and ``chosen.yaml``: a sweep config
of the chosen (cheapest passing) configuration that ``qcal sweep`` reruns.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from qcal.config import WEIGHT_GRANULARITIES, QuantOptions, options_from_values
from qcal.errors import UsageProblem
from qcal.files import atomic_write_text, folder_lock

log = logging.getLogger("qcal.drivers.search")

DEFAULT_MARGIN_POINTS = 0.3  # top-1 points float32 may lose and still count as not worse
DEFAULT_ALPHA = 0.05
DEFAULT_BUDGET_VARIANTS = 24
DEFAULT_RANKING_IMAGES = 32
DEFAULT_MAX_FLOAT_LAYERS = 8
SEARCH_FORMAT = "qcal-search/1"


@dataclass(frozen=True)
class SearchSettings:
    """What the search explores and how it decides. ``margin`` is a fraction (0.003: 0.3 points)."""

    margin: float = DEFAULT_MARGIN_POINTS / 100
    alpha: float = DEFAULT_ALPHA
    budget_variants: int | None = DEFAULT_BUDGET_VARIANTS
    budget_seconds: float | None = None
    methods: tuple = ("power2", "l2", "percentile")
    granularities: tuple = WEIGHT_GRANULARITIES
    bias: tuple = (8, 16, "int32-acc")
    skip_k_conv: tuple = (0,)
    max_float_layers: int = DEFAULT_MAX_FLOAT_LAYERS
    ranking_images: int = DEFAULT_RANKING_IMAGES

    def __post_init__(self):
        if not 0.0 <= self.margin < 1.0:
            raise UsageProblem(f"--margin {100 * self.margin:g}: must be from 0 to 100 points")
        if not 0.0 < self.alpha < 0.5:
            raise UsageProblem(f"--alpha {self.alpha:g}: must be in (0, 0.5)")
        if self.budget_variants is None and self.budget_seconds is None:
            raise UsageProblem("give a budget: --budget-variants or --budget-minutes")

    def identity(self) -> dict:
        """What the decisions depend on (the budget only says how far the search gets)."""
        values = dataclasses.asdict(self)
        for key in ("budget_variants", "budget_seconds"):
            values.pop(key)
        return json.loads(json.dumps(values))


def cost(options: QuantOptions) -> tuple:
    """(layers kept float32, per-channel weights, bias bits): lower is cheaper."""
    return (options.skip_k_conv + len(options.float_layers),
            int(options.weight_granularity == "channel"),
            32 if options.bias_mode == "int32-acc" else options.bias_bits)


def strictly_cheaper(a: tuple, b: tuple) -> bool:
    """Cost ``a`` is nowhere above ``b`` and below it somewhere."""
    return all(x <= y for x, y in zip(a, b)) and a != b


def grid_candidates(base: QuantOptions, settings: SearchSettings) -> list:
    """The grid's configurations over ``base``, cheapest first (ties in the order asked)."""
    out = []
    for method in settings.methods:
        for granularity in settings.granularities:
            for bias in settings.bias:
                for skip in settings.skip_k_conv:
                    values = {k: v for k, v in base.to_dict().items()
                              if k not in ("bias_mode", "bias_bits")}
                    values.update(activation_method=method, weight_granularity=granularity,
                                  bias=bias, skip_k_conv=skip)
                    out.append(options_from_values(values))
    unique = list(dict.fromkeys(out))
    return sorted(unique, key=lambda o: cost(o))  # stable: ties keep the order asked


class _BudgetSpent(Exception):
    pass


def pareto_front(entries: list) -> list:
    """Indices of ``entries`` (dicts with 'cost' and 'top1') that no other entry beats: none has
    top-1 at least as high at a cost nowhere higher, better in one of them."""
    front = []
    for i, e in enumerate(entries):
        beaten = any(o["top1"] >= e["top1"] and all(x <= y for x, y in zip(o["cost"], e["cost"]))
                     and (o["top1"] > e["top1"] or o["cost"] != e["cost"])
                     for j, o in enumerate(entries) if j != i)
        if not beaten:
            front.append(i)
    return front


def search_identity(config, settings: SearchSettings) -> dict:
    """What a search folder's results depend on: the model, data and base configuration (as a
    sweep's ``config.json`` records them) and the search's own settings."""
    from qcal.drivers.sweep import config_identity

    identity = config_identity(dataclasses.replace(config, variants=()))
    identity["search"] = {"format": SEARCH_FORMAT, "base": base_options(config).to_dict(),
                          **settings.identity()}
    return json.loads(json.dumps(identity, default=str))


def base_options(config) -> QuantOptions:
    return config.variants[0] if config.variants else QuantOptions()


class Search:
    """One search run into ``output`` (see the module docstring)."""

    def __init__(self, config, settings: SearchSettings, output: Path, session, quiet: bool,
                 command: str, cache_dir, ranking=None):
        self.config, self.settings, self.output = config, settings, Path(output)
        self.session, self.quiet, self.command, self.cache_dir = session, quiet, command, cache_dir
        self.ranking_override = ranking  # a list of layer names: used instead of rank_layers
        self.model = config.models[0]
        self.entries = []  # evaluated configurations, in order
        self.skipped = []  # (label, why) of candidates not evaluated
        self.started = time.time()
        self.stop_reason = ""
        self.ranking = None

    # --- one configuration ----------------------------------------------------------------------
    def _spent(self) -> str | None:
        s = self.settings
        if s.budget_variants is not None and len(self.entries) >= s.budget_variants:
            return f"budget of {s.budget_variants} evaluated configurations spent"
        if s.budget_seconds is not None and time.time() - self.started >= s.budget_seconds:
            return f"budget of {s.budget_seconds:g} s of wall time spent"
        return None

    def evaluate(self, options: QuantOptions, phase: str) -> dict:
        """Run (or reuse from the store) one configuration through the sweep driver and test it."""
        from qcal.drivers.sweep import ResultStore, run_sweep
        from qcal.report.statistics import noninferiority_test

        spent = self._spent()
        if spent:
            raise _BudgetSpent(spent)
        variants = tuple(e["options"] for e in self.entries) + (options,)
        config = dataclasses.replace(self.config, variants=variants, float32=True,
                                     calib_repeats=1)
        run_sweep(config, self.output, quiet=self.quiet, command=self.command,
                  cache_dir=self.cache_dir, sessions={self.model: self.session}, claimed=True,
                  keep_sessions=True)
        summary = json.loads((self.output / "results.json").read_text())
        records = summary["variants"]
        wanted = json.loads(json.dumps(options.to_dict()))
        assert records[-1]["description"]["variant"] == wanted, "sweep order changed"
        store = ResultStore(self.output)
        _, base_pred, labels = store.load(records[0]["key"])
        record, pred, _ = store.load(records[-1]["key"])
        reference, correct = base_pred[:, 0] == labels, pred[:, 0] == labels
        test = noninferiority_test(reference, correct, self.settings.margin, self.settings.alpha)
        entry = {"step": len(self.entries) + 1, "phase": phase, "options": options,
                 "variant": options.label, "key": records[-1]["key"], "cost": cost(options),
                 "top1": 100 * float(correct.mean()), "float32_top1": 100 * float(reference.mean()),
                 "test": test, "wall_seconds": record.get("wall_seconds")}
        self.entries.append(entry)
        log.info("search step %d (%s) %s: top-1 %.2f %% (float32 %.2f %%), lower bound %+.2f "
                 "points, p %.3g: %s", entry["step"], phase, options.label, entry["top1"],
                 entry["float32_top1"], 100 * test["lower_bound"], test["p_value"],
                 "not worse (passes)" if test["non_inferior"] else "not shown not worse")
        return entry

    def _passed(self) -> list:
        return [e for e in self.entries if e["test"]["non_inferior"]]

    def _dominated(self, options) -> str | None:
        mine = cost(options)
        for e in self._passed():
            if strictly_cheaper(e["cost"], mine):
                return f"costlier than {e['variant']}, which passed"
        return None

    # --- the ranking ---------------------------------------------------------------------------
    def _ranking(self, start: QuantOptions) -> list:
        """Layer names, costliest first, for the greedy step from ``start`` (cached on disk)."""
        if self.ranking_override is not None:
            return list(self.ranking_override)
        from qcal.drivers.sensitivity import rank_layers
        from qcal.eval.sensitivity import ranked

        path = self.output / "ranking.json"
        key = {"model": self.session.identity, "start": json.loads(json.dumps(start.to_dict())),
               "images": self.settings.ranking_images,
               "calibration": self.session.plan_description(True)["calibration"]}
        key = json.loads(json.dumps(key, default=str))
        try:
            stored = json.loads(path.read_text())
            if stored.get("key") == key:
                log.info("sensitivity ranking: reusing %s", path)
                return stored["layers"]
        except (OSError, ValueError, AttributeError):
            pass
        t0 = time.time()
        rows, _ = rank_layers(self.session, start, images=self.settings.ranking_images,
                              modes=("float",), blocks=False)
        order = [r for r in ranked(rows, "float", kind="layer") if r["sqnr_cost_db"] > 0]
        layers = [r["unit"] for r in order]
        atomic_write_text(path, json.dumps({"key": key, "layers": layers, "rows": [
            {"unit": r["unit"], "sqnr_cost_db": r["sqnr_cost_db"]} for r in order],
            "seconds": round(time.time() - t0, 2)}, indent=2) + "\n")
        log.info("sensitivity ranking of %d layers from %s in %.1f s", len(layers), start.label,
                 time.time() - t0)
        return layers

    # --- the search ----------------------------------------------------------------------------
    def run(self):
        base = base_options(self.config)
        try:
            for options in grid_candidates(base, self.settings):
                why = self._dominated(options)
                if why:
                    self.skipped.append((options.label, why))
                    continue
                self.evaluate(options, "grid")
            self._greedy()
            self.stop_reason = self.stop_reason or "grid and greedy float layers done"
        except _BudgetSpent as exc:
            self.stop_reason = str(exc)
        log.info("search stopped: %s", self.stop_reason)
        return self.entries

    def _greedy(self):
        starts = [e for e in self.entries if e["cost"][0] == 0]
        if not starts:
            return
        start = max(starts, key=lambda e: (e["test"]["lower_bound"], [-c for c in e["cost"]]))
        if start["test"]["non_inferior"]:
            return  # every float layer added to it is strictly costlier than it
        self.ranking = self._ranking(start["options"])
        layers = [n for n in self.ranking if n not in start["options"].float_layers]
        for k in range(1, min(self.settings.max_float_layers, len(layers)) + 1):
            options = replace(start["options"],
                              float_layers=start["options"].float_layers + tuple(layers[:k]))
            why = self._dominated(options)
            if why:  # so is every later one (more float layers, the rest equal)
                self.skipped.append((options.label, why))
                return
            if self.evaluate(options, f"greedy {k}")["test"]["non_inferior"]:
                self.stop_reason = (f"greedy float layers: the test passed with {k} float "
                                    f"layer(s)")
                return
        self.stop_reason = "greedy float layers: ranking or max_float_layers exhausted"

    def chosen(self):
        passed = self._passed()
        if not passed:
            return None
        return min(passed, key=lambda e: (e["cost"], -e["test"]["lower_bound"], e["step"]))


def chosen_yaml(config, options: QuantOptions, entry: dict, settings: SearchSettings) -> str:
    """A sweep config that reruns float32 and the chosen configuration on the same data."""
    import yaml

    defaults = QuantOptions().to_dict()

    def single(value):  # name lists as one "a,b" value: sweep variant keys take single values
        if not isinstance(value, (tuple, list)):
            return value
        return ",".join("=".join(map(str, v)) if isinstance(v, (tuple, list)) else str(v)
                        for v in value)  # layer_bias_bits: NAME=BITS pairs

    variant = {k: single(v) for k, v in options.to_dict().items() if defaults.get(k) != v}
    body = {"name": f"{Path(config.name).name}-chosen", "models": list(config.models),
            "data": dict(config.data), "batch_size": config.batch_size, "seed": config.seed,
            "verify_images": config.verify_images, "float32": True,
            "variants": [variant or {"activation_method": options.activation_method}]}
    test = entry["test"]
    header = (f"# qcal search's chosen configuration for {config.models[0]}: top-1 "
              f"{entry['top1']:.2f} % against float32 {entry['float32_top1']:.2f} % on "
              f"{test['images']} images;\n# not worse by {100 * settings.margin:g} points: "
              f"p = {test['p_value']:.3g}, one-sided {100 * (1 - settings.alpha):g} % lower "
              f"bound {100 * test['lower_bound']:+.2f} points\n# ({test['test']}).\n"
              f"# Rerun: qcal sweep THIS_FILE --output DIR\n")
    return header + yaml.safe_dump(body, sort_keys=False, default_flow_style=None)


def run_search(config, settings: SearchSettings, output: Path, session, quiet: bool = False,
               command: str = "", cache_dir=None, force: bool = False, wait: bool = False,
               ranking=None):
    """Run (or resume) the search; returns (Search, chosen entry or None)."""
    from qcal.drivers.sweep import CONFIG_FORMAT, CONFIG_NAME, folder_owner
    from qcal.report import search_tables

    if len(config.models) != 1:
        raise UsageProblem(f"{config.source_path}: a search takes one model, not "
                           f"{len(config.models)}")
    if len(config.variants) > 1:
        raise UsageProblem(f"{config.source_path}: a search takes at most one variant (the base "
                           f"configuration), not {len(config.variants)}")
    output = Path(output)
    with folder_lock(output, wait=wait):
        identity = search_identity(config, settings)
        status = folder_owner(output, identity, force)
        if status != "same":
            atomic_write_text(output / CONFIG_NAME, json.dumps(
                {"format": CONFIG_FORMAT, "identity": identity,
                 "config_path": config.source_path, "command": command}, indent=2) + "\n")
        search = Search(config, settings, output, session, quiet, command, cache_dir, ranking)
        search.run()
        chosen = search.chosen()
        search_tables.write_search(summary(search, chosen), output)
        path = output / "chosen.yaml"
        if chosen is not None:
            atomic_write_text(path, chosen_yaml(config, chosen["options"], chosen, settings))
        elif path.exists():
            path.unlink()
        session.close()
    return search, chosen


def entry_row(entry: dict, front: set, chosen) -> dict:
    test = entry["test"]
    return {"step": entry["step"], "phase": entry["phase"], "variant": entry["variant"],
            "float_layers": entry["cost"][0], "per_channel": bool(entry["cost"][1]),
            "bias_bits": entry["cost"][2], "top1": entry["top1"],
            "delta_top1": entry["top1"] - entry["float32_top1"], "lost": test["lost"],
            "gained": test["gained"], "lower_bound": 100 * test["lower_bound"], "z": test["z"],
            "p_value": test["p_value"], "non_inferior": test["non_inferior"],
            "pareto": entry["step"] - 1 in front,
            "chosen": chosen is not None and entry["step"] == chosen["step"],
            "key": entry["key"]}


def summary(search: Search, chosen) -> dict:
    front = set(pareto_front(search.entries))
    return {"model": search.session.display_name, "format": SEARCH_FORMAT,
            "test": search.entries[0]["test"]["test"] if search.entries else None,
            "settings": dataclasses.asdict(search.settings),
            "stop_reason": search.stop_reason, "ranking": search.ranking,
            "skipped": [{"variant": v, "why": w} for v, w in search.skipped],
            "rows": [entry_row(e, front, chosen) for e in search.entries],
            "chosen": None if chosen is None else entry_row(chosen, front, chosen),
            "search_seconds_this_run": round(time.time() - search.started, 2),
            "images": search.entries[0]["test"]["images"] if search.entries else 0,
            "float32_top1": search.entries[0]["float32_top1"] if search.entries else np.nan}
