"""The sweep driver: every variant of a config, resumable, into one output folder.

Layout of ``OUTPUT/``:

- ``variants/KEY.json`` + ``variants/KEY.npz``: one finished variant (metrics, timings, per-image
  top-5 predictions). KEY hashes everything the result depends on (model, weights, options, data
  selection, batch size, qcal version), so a changed config recomputes only what it changes. The
  ``.npz`` is renamed into place before the ``.json``: a variant counts as finished only when its
  ``.json`` exists, and a sweep killed at any point loses at most the variant in flight.
- ``results.csv``, ``results.md``, ``results.json`` (config, seeds, versions, machine, command,
  timings), ``predictions.csv`` (per image), ``top1.png``, ``sweep.log``.

Work is shared across variants through ``qcal.drivers.session.ModelSession``: float32 evaluated once
per model, statistics collected once per model, each image decoded once (on-disk batch cache).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

from qcal import __version__
from qcal.config import DEFAULT_BATCH_CACHE_DIR
from qcal.files import atomic_open, atomic_write_text, file_digest

log = logging.getLogger("qcal.drivers.sweep")


def environment() -> dict:
    import importlib.metadata as md

    versions = {"qcal": __version__, "python": platform.python_version()}
    for package in ("apache-tvm", "mxnet", "gluoncv", "numpy", "onnx", "pandas", "scipy"):
        try:
            versions[package] = md.version(package)
        except md.PackageNotFoundError:
            versions[package] = None
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"versions": versions, "machine": {"cpu": cpu, "cores": os.cpu_count(),
                                              "platform": platform.platform()}}


class ResultStore:
    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.variants = self.directory / "variants"

    @staticmethod
    def key(description: dict) -> str:
        payload = json.dumps(description, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def load(self, key: str):
        record_path = self.variants / f"{key}.json"
        if not record_path.is_file():
            return None
        record = json.loads(record_path.read_text())
        with np.load(self.variants / f"{key}.npz") as arrays:
            return record, arrays["predictions"], arrays["labels"]

    def arrays(self, key: str) -> dict:
        with np.load(self.variants / f"{key}.npz") as arrays:
            return {name: arrays[name] for name in arrays.files}

    def save(self, key: str, record: dict, predictions: np.ndarray, labels: np.ndarray,
             **arrays):
        with atomic_open(self.variants / f"{key}.npz") as f:
            np.savez(f, predictions=predictions, labels=labels, **arrays)
        atomic_write_text(self.variants / f"{key}.json", json.dumps(record, indent=2) + "\n")


def _fidelity_metrics(store, baseline_key, result, fidelity_result) -> dict:
    """Label-free agreement with the float32 run of the same images."""
    from qcal.eval.fidelity import compare

    baseline = store.arrays(baseline_key)
    metrics = compare(baseline["logits"], result.logits)
    if fidelity_result is not None and "fidelity_logits" in baseline:
        metrics.update(compare(baseline["fidelity_logits"], fidelity_result.logits, "_crops"))
    return metrics


def _setup_logging(output: Path, quiet: bool):
    output.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("qcal")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    file_handler = logging.FileHandler(output / "sweep.log")
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    if not quiet:
        stream = logging.StreamHandler(sys.stderr)
        stream.setFormatter(logging.Formatter("%(message)s"))
        logger.addHandler(stream)


def run_sweep(config, output: Path, quiet: bool = False, command: str = "",
              cache_dir: Path | None = None):
    """Run (or finish) every variant of ``config``; returns the table written to results.md."""
    from qcal.drivers.session import ModelSession
    from qcal.report import sweep_tables as sweep_report
    from qcal.report import tables as report

    output = Path(output)
    _setup_logging(output, quiet)
    store = ResultStore(output)
    started = time.time()
    np.random.seed(config.seed)
    entries = []
    log.info("sweep %s started: %d model(s) x %d variant(s), command: %s", config.name,
             len(config.models), len(config.variants) + int(config.float32), command)
    for model in config.models:
        session = ModelSession(model, config.data, config.batch_size,
                               params=config.params, pretrained=config.pretrained,
                               seed=config.seed, quiet=quiet,
                               cache_dir=cache_dir or DEFAULT_BATCH_CACHE_DIR,
                               calibration_file=config.calibration_file)
        session.check_calibration_file(config.variants)
        variants = ([None] if config.float32 else []) + list(config.variants)
        baseline_key = None
        for options in variants:
            label = "float32" if options is None else options.label
            description = {
                "model": session.identity, "variant": None if options is None else options.to_dict(),
                "data": session.plan_description(needs_calibration=options is not None),
                "batch_size": config.batch_size, "qcal": __version__,
                "calibration_file": (file_digest(config.calibration_file, "calibration file")
                                     if config.calibration_file else None),
            }
            key = store.key(description)
            if store.load(key) is not None:
                log.info("%s %s: finished earlier, reusing %s", model, label, key)
            else:
                log.info("%s %s: running", model, label)
                t0 = time.time()
                result, fidelity_result, extra = session.evaluate(options)
                if options is not None and baseline_key is not None:
                    extra["metrics"] = {**_fidelity_metrics(store, baseline_key, result,
                                                            fidelity_result),
                                        **extra.get("metrics", {})}
                record = {**report.result_row(session.display_name, label, result),
                          "key": key, "description": description,
                          "wall_seconds": round(time.time() - t0, 2), **extra}
                arrays = {}
                if options is None:  # int8 variants are compared against these
                    arrays["logits"] = result.logits
                    if fidelity_result is not None:
                        arrays["fidelity_logits"] = fidelity_result.logits
                store.save(key, record, result.predictions, result.labels, **arrays)
                log.info("%s %s: top-1 %.2f %%, top-5 %.2f %% on %d images (%.1f s)", model, label,
                         100 * result.top1, 100 * result.top5, result.images,
                         record["wall_seconds"])
            entries.append(key)
            if options is None:
                baseline_key = key
        session.close()
    summary = {
        "config": config.raw, "config_path": config.source_path, "command": command,
        "seed": config.seed, **environment(),
        "sweep_seconds_this_run": round(time.time() - started, 2),
    }
    return sweep_report.write_results(store, entries, output, summary)
