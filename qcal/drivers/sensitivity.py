"""The sensitivity driver: per layer and residual block of a model, what quantizing it costs.

The measurement is ``qcal.eval.sensitivity``; this module runs it for every model x base
configuration of a config (a sweep file's models, data and variants, each variant one base),
resumable like a sweep and into the same kind of result store:

- ``variants/KEY.json`` + ``.npz``: one measured variant (a unit kept float, quantized alone, or
  its bias shortened; the base itself; float32's logits of the images), checked files
  (``qcal.drivers.sweep.ResultStore``). A run killed at any point loses at most the variant in
  flight; run again, it measures only what is missing.
- ``sensitivity.json`` (what was measured, with which engine, on which images, each variant's
  key), then ``sensitivity.csv``, ``sensitivity.md``, ``sensitivity.png`` written from the store
  (``qcal.report.sensitivity_tables``; ``qcal report`` writes them again from the same files).
- ``config.json`` and ``.qcal-lock`` as for a sweep: one writer at a time, one config a folder.

One statistics pass per model serves every variant (``ModelSession.calibration``); the images are
the first ``images`` fidelity crops (else evaluation images), decoded once (the batch cache).
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from qcal import __version__
from qcal.config import DEFAULT_BATCH_CACHE_DIR, DEFAULT_SENSITIVITY_IMAGES, QuantOptions
from qcal.errors import UsageProblem, stop_if_interrupted
from qcal.eval.sensitivity import (DEFAULT_BIAS_BITS, ENGINES, MODES, layer_sensitivity, probes,
                                   sensitivity_units)
from qcal.files import atomic_write_text, file_digest, folder_lock

log = logging.getLogger("qcal.drivers.sensitivity")

SUMMARY_NAME = "sensitivity.json"
SUMMARY_FORMAT = "qcal-sensitivity/1"


@dataclass(frozen=True)
class SensitivitySettings:
    """What ``qcal sensitivity`` measures (a config file's ``sensitivity:`` section, or options)."""

    images: int = DEFAULT_SENSITIVITY_IMAGES
    modes: tuple = MODES
    bias_bits: int = DEFAULT_BIAS_BITS
    engine: str = ENGINES[0]
    blocks: bool = True

    def __post_init__(self):
        modes = self.modes.split(",") if isinstance(self.modes, str) else self.modes
        if not isinstance(modes, (list, tuple)) or not modes:
            raise UsageProblem(f"modes must be a list of {', '.join(MODES)}, not {modes!r}")
        modes = tuple(dict.fromkeys(str(m).strip() for m in modes))
        unknown = [m for m in modes if m not in MODES]
        if unknown:
            raise UsageProblem(f"modes: '{unknown[0]}' is not a sensitivity mode (known: "
                               f"{', '.join(MODES)})")
        object.__setattr__(self, "modes", modes)
        if not _is_int(self.images) or self.images < 1:
            raise UsageProblem(f"images must be an integer >= 1, not {self.images!r}")
        if not _is_int(self.bias_bits) or not 2 <= self.bias_bits <= 32:
            raise UsageProblem(f"bias_bits must be an integer from 2 to 32, not "
                               f"{self.bias_bits!r}")
        if self.engine not in ENGINES:
            raise UsageProblem(f"engine must be one of {', '.join(ENGINES)}, not "
                               f"{self.engine!r}")
        if not isinstance(self.blocks, bool):
            raise UsageProblem(f"blocks must be true or false, not {self.blocks!r}")

    @classmethod
    def from_section(cls, values: dict, where) -> "SensitivitySettings":
        """From a config file's section; ``where(key)`` is the key's FILE:LINE. Every problem is
        a ``UsageProblem`` naming its place."""
        known = cls.__dataclass_fields__
        for key in values:
            if key not in known:
                raise UsageProblem(f"{where(key)}: unknown sensitivity key '{key}' (known: "
                                   f"{', '.join(known)})")
        try:
            return cls(**values)
        except UsageProblem as exc:
            key = next((k for k in values if str(exc).startswith(k)), None)
            raise UsageProblem(f"{where(key) if key else where('')}: sensitivity.{exc}") from None

    def to_dict(self) -> dict:
        return {"images": self.images, "modes": list(self.modes), "bias_bits": self.bias_bits,
                "engine": self.engine, "blocks": self.blocks}


def _is_int(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def sensitivity_identity(config, settings: SensitivitySettings) -> dict:
    """What a sensitivity folder's results depend on (``config.json``)."""
    from qcal.drivers.sweep import config_identity

    identity = config_identity(config)
    identity.pop("float32")
    identity.pop("verify_images", None)
    return {"command": "sensitivity", **identity, "sensitivity": settings.to_dict()}


def rank_layers(session, base: QuantOptions, images: int = DEFAULT_SENSITIVITY_IMAGES,
                modes=MODES, bias_bits: int = DEFAULT_BIAS_BITS, engine: str = "integer",
                blocks: bool = True) -> tuple:
    """(rows in network order, base metrics) of ``qcal.eval.sensitivity.layer_sensitivity`` for a
    ``ModelSession``: its calibration (one statistics pass) and its first ``images`` fidelity
    (else evaluation) images, scored against the model's own float32 logits of them. Nothing
    stored: ``run_sensitivity`` is the resumable run."""
    x = session.fidelity_images(images)
    return layer_sensitivity(session.graph, session.calibration.ranges, base, x,
                             session.float_logits(x), modes=modes, bias_bits=bias_bits,
                             engine=engine, blocks=blocks, batch_size=session.batch_size)


def run_sensitivity(config, settings: SensitivitySettings, output: Path, quiet: bool = False,
                    command: str = "", cache_dir: Path | None = None, wait: bool = False,
                    force: bool = False, sessions: dict | None = None) -> dict:
    """Measure (or finish measuring) every model x base of ``config``; returns the summary
    written to sensitivity.json (the tables are written beside it)."""
    from qcal.drivers.sweep import claim_folder

    output = Path(output)
    with folder_lock(output, wait=wait):
        claim_folder(output, config, force, command, sensitivity_identity(config, settings))
        return _run(config, settings, output, quiet, command, cache_dir, sessions or {})


def _description(session, config, settings, variant) -> dict:
    return {"command": "sensitivity", "model": session.identity, "variant": variant,
            "data": session.plan_description(needs_calibration=True),
            "images": settings.images, "engine": settings.engine, "qcal": __version__,
            "calibration_file": (file_digest(config.calibration_file, "calibration file")
                                 if config.calibration_file else None)}


def _float_reference(store, session, config, settings, x):
    """float32's logits of ``x``: from the store, or computed and stored."""
    description = _description(session, config, settings, None)
    key = store.key(description)
    finished = store.load(key)
    if finished is not None:
        return key, store.arrays(key)["logits"]
    start = time.time()
    logits = session.float_logits(x)
    record = {"model": session.display_name, "variant": "float32", "key": key,
              "description": description, "wall_seconds": round(time.time() - start, 2)}
    store.save(key, record, _top5(logits), np.full(len(x), -1, np.int64), logits=logits)
    return key, logits


def _top5(logits):
    return np.argsort(-logits, axis=1, kind="stable")[:, :5].astype(np.int32)


def _stored(store, session, config, settings, options):
    """(key, description, metrics or None) of one variant: None when it is not stored yet."""
    description = _description(session, config, settings, options.to_dict())
    key = store.key(description)
    finished = store.load(key)
    return key, description, None if finished is None else finished[0]["metrics"]


GROUP = 16  # variants measured together (sharing what they compute alike), then stored


def _run(config, settings, output, quiet, command, cache_dir, sessions) -> dict:
    from qcal.drivers.session import ModelSession
    from qcal.drivers.sweep import ResultStore, environment, setup_logging
    from qcal.eval.fidelity import compare
    from qcal.eval.sensitivity import every_layer_float, run_variants
    from qcal.report.sensitivity_tables import write_sensitivity
    from qcal.report.tables import progress_bar

    setup_logging(output, quiet, "sensitivity.log")
    store = ResultStore(output)
    started = time.time()
    runs = []
    for model in config.models:
        session = sessions.get(model) or ModelSession(
            model, config.data, config.batch_size, params=config.params,
            pretrained=config.pretrained, seed=config.seed, quiet=quiet,
            cache_dir=cache_dir or DEFAULT_BATCH_CACHE_DIR,
            calibration_file=config.calibration_file)
        session.check_variants(config.variants)
        plan = session.plan(True)
        x = session.fidelity_images(settings.images)
        source = "fidelity crops" if plan.fidelity else "evaluation images"
        float_key, reference = _float_reference(store, session, config, settings, x)
        graph = session.graph
        units = sensitivity_units(graph, settings.blocks)
        for base in config.variants:
            made = probes(graph, base, units, settings.modes, settings.bias_bits)
            ranges = session.calibration.ranges  # one statistics pass for every variant
            references = (base, every_layer_float(graph, base))
            work = [(base, f"{base.label} (base)")] + [
                (p.options, f"{p.mode}:{p.unit.name}") for p in made]
            log.info("%s %s: %d units, %d variants on %d %s (%s engine)", model, base.label,
                     len(units), len(work), len(x), source, settings.engine)
            found = [_stored(store, session, config, settings, options) for options, _ in work]
            # by mode, then network order: the ranking (float) first, and a group's variants
            # share the most with one reference
            rank = {mode: i for i, mode in enumerate(MODES)}
            todo = sorted((i for i, (_, _, metrics) in enumerate(found) if metrics is None),
                          key=lambda i: (0, 0, 0) if i == 0 else
                          (1, rank[made[i - 1].mode], made[i - 1].unit.position))
            with progress_bar(len(work), f"{session.model.name} sensitivity", quiet,
                              unit="variant") as bar:
                bar.update(len(work) - len(todo))
                for group in range(0, len(todo), GROUP):
                    stop_if_interrupted()
                    chosen = todo[group:group + GROUP]
                    start = time.time()
                    outcomes = run_variants(graph, ranges, [work[i][0] for i in chosen], x,
                                            settings.engine, session.batch_size, references)
                    seconds = round((time.time() - start) / len(chosen), 2)
                    for i, (logits, exact) in zip(chosen, outcomes):
                        key, description, _ = found[i]
                        metrics = {**compare(reference, logits), "exact": exact}
                        record = {"model": session.display_name, "variant": work[i][1],
                                  "key": key, "description": description, "metrics": metrics,
                                  "engine": settings.engine, "wall_seconds": seconds}
                        store.save(key, record, _top5(logits),
                                   np.full(len(logits), -1, np.int64))
                        found[i] = (key, description, metrics)
                    bar.update(len(chosen))
            base_key, _, base_metrics = found[0]
            log.info("%s %s: base logit SQNR %.2f dB; %d of %d variants finished earlier",
                     model, base.label, base_metrics["sqnr_logits_db"],
                     len(work) - len(todo), len(work))
            entries = [{"key": found[i][0], "unit": p.unit.name, "mode": p.mode}
                       for i, p in enumerate(made, 1)]
            runs.append({
                "model": session.display_name, "base": base.label, "base_options": base.to_dict(),
                "engine": settings.engine, "images": len(x), "image_source": source,
                "calibration": {"source": session.calibration.source,
                                "images": session.calibration.num_images},
                "float32_key": float_key, "base_key": base_key,
                "units": [{"name": u.name, "kind": u.kind, "op": u.op, "position": u.position,
                           "nodes": list(u.nodes)} for u in units],
                "variants": entries})
        session.close()
    summary = {"format": SUMMARY_FORMAT, "command": command, "config": config.raw,
               "config_path": config.source_path, "settings": settings.to_dict(),
               **environment(), "runs": runs,
               "sensitivity_seconds_this_run": round(time.time() - started, 2)}
    atomic_write_text(output / SUMMARY_NAME, json.dumps(summary, indent=2, default=str) + "\n")
    write_sensitivity(store, summary, output)
    return summary
