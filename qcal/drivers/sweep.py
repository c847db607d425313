"""The sweep driver: every variant of a config, resumable, into one output folder.

Layout of ``OUTPUT/``:

- ``variants/KEY.json`` + ``variants/KEY.npz``: one finished variant (metrics, timings, per-image
  top-5 predictions). KEY hashes everything the result depends on (model, weights, options, data
  selection, batch size, qcal version), so a changed config recomputes only what it changes. The
  ``.npz`` is renamed into place before the ``.json``: a variant counts as finished only when its
  ``.json`` exists, and a sweep killed at any point loses at most the variant in flight. Both are
  checked files (``qcal.files``; the ``.json`` is JSON followed by one ``#qcal-check`` line): a
  variant whose files fail their check is reported, removed and run again.
- ``results.csv``, ``results.md``, ``results.json`` (config, seeds, versions, machine, command,
  timings), ``predictions.csv`` (per image), ``top1.png``, ``sweep.log``. Each int8 row says on
  how many calibration images its compiled model was verified against its numpy integer reference
  (``qcal.eval.verify``; a variant that fails stops the sweep with that error, and nothing of it
  is saved). A finished variant verified on fewer images than asked runs again.
- ``.qcal-lock``: one sweep writes into a folder at a time (``qcal.files.folder_lock``); a second
  one stops naming the folder and the holder's pid, or waits for it (``wait``).

Work is shared across variants through ``qcal.drivers.session.ModelSession``: float32 evaluated once
per model, statistics collected once per model, each image decoded once (on-disk batch cache).
"""
from __future__ import annotations

import hashlib
import io
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
from qcal.errors import QcalError
from qcal.eval.verify import VerificationFailed
from qcal.files import checked_open, file_digest, folder_lock, load_checked, write_checked

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


RECORD_KIND = "sweep variant record"
ARRAYS_KIND = "sweep variant arrays"
RERUN = "running the variant again"


def _parse_npz(payload) -> dict:
    with np.load(io.BytesIO(payload), allow_pickle=False) as arrays:
        return {name: arrays[name] for name in arrays.files}


class ResultStore:
    """The finished variants of one output folder: ``variants/KEY.json`` + ``KEY.npz``."""

    def __init__(self, directory: Path):
        self.directory = Path(directory)
        self.variants = self.directory / "variants"

    @staticmethod
    def key(description: dict) -> str:
        payload = json.dumps(description, sort_keys=True, default=str)
        return hashlib.sha256(payload.encode()).hexdigest()[:20]

    def _arrays(self, key: str):
        return load_checked(self.variants / f"{key}.npz", ARRAYS_KIND, key, _parse_npz, RERUN)

    def load(self, key: str):
        """(record, predictions, labels) of a finished variant; None when it is not finished or
        its files fail their check (then reported and removed, so that it runs again)."""
        record_path = self.variants / f"{key}.json"
        record = load_checked(record_path, RECORD_KIND, key, lambda p: json.loads(bytes(p)), RERUN)
        if record is None:
            return None
        arrays = self._arrays(key)
        if arrays is None or "predictions" not in arrays or "labels" not in arrays:
            log.warning("%s has no intact arrays beside it; removed, %s", record_path, RERUN)
            record_path.unlink(missing_ok=True)
            return None
        return record, arrays["predictions"], arrays["labels"]

    def arrays(self, key: str) -> dict:
        arrays = self._arrays(key)
        if arrays is None:
            raise QcalError(f"{self.variants / key}.npz is missing or damaged; run the sweep "
                            "again to recompute it")
        return arrays

    def save(self, key: str, record: dict, predictions: np.ndarray, labels: np.ndarray,
             **arrays):
        with checked_open(self.variants / f"{key}.npz", ARRAYS_KIND, key) as f:
            np.savez(f, predictions=predictions, labels=labels, **arrays)
        write_checked(self.variants / f"{key}.json", (json.dumps(record, indent=2) + "\n").encode(),
                      RECORD_KIND, key)


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
    stream = logging.StreamHandler(sys.stderr)  # quiet: warnings only (a preprocessing that
    stream.setLevel(logging.WARNING if quiet else logging.INFO)  # contradicts the model's own)
    stream.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if quiet else "%(message)s"))
    logger.addHandler(stream)


def run_sweep(config, output: Path, quiet: bool = False, command: str = "",
              cache_dir: Path | None = None, wait: bool = False):
    """Run (or finish) every variant of ``config``; returns the table written to results.md.

    One sweep writes into ``output`` at a time: while another holds it, this one raises
    ``FolderBusy`` (naming the folder and the other's pid), or waits for it when ``wait``."""
    output = Path(output)
    with folder_lock(output, wait=wait):
        return _run_sweep(config, output, quiet, command, cache_dir)


def _run_sweep(config, output: Path, quiet: bool, command: str, cache_dir: Path | None):
    from qcal.drivers.session import ModelSession
    from qcal.report import sweep_tables as sweep_report
    from qcal.report import tables as report

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
                               calibration_file=config.calibration_file,
                               verify_images=config.verify_images)
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
            finished = store.load(key)
            if finished is not None and options is not None \
                    and finished[0].get("verify_images_asked", 0) < config.verify_images:
                log.info("%s %s: finished earlier but verified on %d image(s), fewer than %d; "
                         "running again", model, label, finished[0].get("verified_images", 0),
                         config.verify_images)
                finished = None
            if finished is not None:
                log.info("%s %s: finished earlier, reusing %s", model, label, key)
            else:
                log.info("%s %s: running", model, label)
                t0 = time.time()
                try:
                    result, fidelity_result, extra = session.evaluate(options)
                except VerificationFailed as exc:  # the CLI prints it; the log keeps it too
                    log.info("stopped, not evaluated: %s", exc)
                    raise
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
