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
- With ``calib_repeats`` R > 1 every int8 variant runs once per calibration subset
  (``qcal.data.calib_subsets``; each subset in its key, its statistics pass run once for all
  variants): the table's row is subset 0, with the spread across subsets beside it, and
  ``calibration_subsets.csv`` lists every subset's top-1 and agreement.
- ``.qcal-lock``: one sweep writes into a folder at a time (``qcal.files.folder_lock``); a second
  one stops naming the folder and the holder's pid, or waits for it (``wait``).
- ``config.json``: the config the folder belongs to (what its results depend on: models, weights,
  data, batch size, seed, variants). A run with another config is refused, naming the first
  difference, unless it only adds models or variants (then it resumes and the file records the
  larger config) or ``force`` is given; a folder holding files qcal did not write is refused too.

Work is shared across variants through ``qcal.drivers.session.ModelSession``: float32 evaluated once
per model, statistics collected once per model, each image decoded once (on-disk batch cache).
One variant's run (``run_variant``) is the unit that ``qcal.drivers.cluster`` runs on Dask workers
instead of the loop here; its shards (``ResultStore.save_part``) and statistics passes
(``OUTPUT/statistics/``) live in the folder too, and each worker's log in ``OUTPUT/workers/``.

Length: the output folder's whole contract (store, ownership, the unit of work and the loop) in
one module: what a record holds and when it is reused are read in one place.
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
from contextlib import ExitStack
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from qcal import __version__
from qcal.config import DEFAULT_BATCH_CACHE_DIR, QuantOptions
from qcal.errors import QcalError, UsageProblem, stop_if_interrupted
from qcal.eval.verify import VerificationFailed
from qcal.files import (LOCK_NAME, DamagedFile, atomic_write_text, checked_open, checked_path, file_digest,
                        folder_lock, is_temporary, load_checked, verify_checked, write_checked)

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
LOGITS_KIND = "sweep float32 logits"
# float32's logits per selection: the int8 variants' fidelity metrics read them back batch by batch
LOGITS_FILES = {"evaluation": "logits", "fidelity": "fidelity_logits"}
PART_KIND = "sweep variant shard"
RERUN = "running the variant again"


class _closing:
    """A reader as a context manager (``close`` on exit)."""

    def __init__(self, reader):
        self.reader = reader

    def __enter__(self):
        return self.reader

    def __exit__(self, *exc):
        self.reader.close()


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

    def logits_path(self, key: str, selection: str) -> Path:
        return self.variants / f"{key}.{LOGITS_FILES[selection]}.npy"

    def logits_files(self, key: str, selections, stack: ExitStack) -> dict:
        """Temporary paths for float32's logits of each selection, kept as checked files under
        ``logits_path`` when ``stack`` closes without an error (dropped otherwise)."""
        return {name: stack.enter_context(checked_path(self.logits_path(key, name), LOGITS_KIND,
                                                       key, suffix=".npy"))
                for name in selections}

    def references(self, key: str, stack: ExitStack) -> dict:
        """Readers of float32's logits per selection, closed with ``stack``: its logits files
        (checked first), or for a folder written before them the arrays in its ``.npz``."""
        from qcal.eval.logit_rows import ArrayRows, LogitsReader

        readers, arrays = {}, None
        for name, member in LOGITS_FILES.items():
            path = self.logits_path(key, name)
            if path.is_file():
                try:
                    verify_checked(path, LOGITS_KIND, key)
                except DamagedFile as exc:
                    raise QcalError(f"{exc}; delete {self.variants / key}.* and run the sweep "
                                    "again to recompute float32") from None
                readers[name] = stack.enter_context(_closing(LogitsReader(path)))
                continue
            arrays = self.arrays(key) if arrays is None else arrays
            if member in arrays:
                readers[name] = ArrayRows(arrays[member])
        return readers

    def save(self, key: str, record: dict, predictions: np.ndarray, labels: np.ndarray,
             **arrays):
        with checked_open(self.variants / f"{key}.npz", ARRAYS_KIND, key) as f:
            np.savez(f, predictions=predictions, labels=labels, **arrays)
        write_checked(self.variants / f"{key}.json", (json.dumps(record, indent=2) + "\n").encode(),
                      RECORD_KIND, key)

    # shards: one image range of a variant's evaluation, evaluated by a cluster worker
    def part_path(self, key: str, start: int, stop: int) -> Path:
        return self.variants / f"{key}.part-{start}-{stop}.npz"

    def save_part(self, key: str, start: int, stop: int, result):
        with checked_open(self.part_path(key, start, stop), PART_KIND, f"{key}:{start}:{stop}") as f:
            np.savez(f, predictions=result.predictions, labels=result.labels,
                     logits=result.logits, seconds=np.float64(result.seconds))

    def load_part(self, key: str, start: int, stop: int):
        """The EvalResult of a finished shard; None when absent or damaged (then removed)."""
        from qcal.eval.evaluate import merge_results

        arrays = load_checked(self.part_path(key, start, stop), PART_KIND, f"{key}:{start}:{stop}",
                              _parse_npz, RERUN)
        if arrays is None:
            return None
        part = SimpleNamespace(predictions=arrays["predictions"], labels=arrays["labels"],
                               logits=arrays["logits"], seconds=float(arrays["seconds"]))
        return merge_results([part])

    def remove_parts(self, key: str):
        for path in self.variants.glob(f"{key}.part-*.npz"):
            path.unlink(missing_ok=True)


def _fidelity_metrics(result, fidelity_result) -> dict:
    """Label-free agreement with the float32 run of the same images (computed batch by batch
    while the variant ran: ``ResultStore.references``)."""
    metrics = dict(result.fidelity or {})
    if fidelity_result is not None and fidelity_result.fidelity is not None:
        metrics.update(fidelity_result.fidelity)
    return metrics


# --- one variant: the unit of work, run here or on a cluster worker ---------------------------------

def open_session(config, model: str, quiet: bool = False, cache_dir: Path | None = None):
    from qcal.drivers.session import ModelSession

    return ModelSession(model, config.data, config.batch_size, params=config.params,
                        pretrained=config.pretrained, seed=config.seed, quiet=quiet,
                        cache_dir=cache_dir or DEFAULT_BATCH_CACHE_DIR,
                        calibration_file=config.calibration_file,
                        verify_images=config.verify_images, calib_repeats=config.calib_repeats)


def sweep_work(config) -> list:
    """(options, calibration subset) of each model's runs in table order: float32 (options
    None) first when evaluated, then each int8 variant once per calibration subset (subset 0:
    the row of the table)."""
    return ([(None, 0)] if config.float32 else []) + [
        (options, subset) for options in config.variants for subset in range(config.calib_repeats)]


def variant_label(options, subset: int = 0) -> str:
    label = "float32" if options is None else options.label
    return label + (f" [calibration subset {subset}]" if subset else "")


def variant_key(store, session, config, options, subset: int = 0) -> tuple:
    """(key, description): everything the variant's result depends on, and its hash."""
    description = {
        "model": session.identity, "variant": None if options is None else options.to_dict(),
        "data": session.plan_description(options is not None, subset),
        "batch_size": config.batch_size, "qcal": __version__,
        "calibration_file": (file_digest(config.calibration_file, "calibration file")
                             if config.calibration_file else None),
    }
    return store.key(description), description


def add_entry(entries: list, repeats: dict, key: str, subset: int):
    """Record a finished run: a row of the table (subset 0), else a repeat of the last row."""
    if subset:
        repeats[entries[-1]].append(key)
    else:
        entries.append(key)
        repeats[key] = [key]


def reusable(store, key: str, config, model: str, options, subset: int = 0):
    """The finished variant ``key`` in ``store`` if it can be reused (logged either way), else
    None: not finished, damaged, or verified on fewer images than ``config`` asks."""
    label = variant_label(options, subset)
    finished = store.load(key)
    if finished is not None and options is not None \
            and finished[0].get("verify_images_asked", 0) < config.verify_images:
        log.info("%s %s: finished earlier but verified on %d image(s), fewer than %d; "
                 "running again", model, label, finished[0].get("verified_images", 0),
                 config.verify_images)
        finished = None
    if finished is not None and options is not None and config.keep_logits \
            and not store.logits_path(key, "evaluation").is_file():
        log.info("%s %s: finished earlier without its logits file; running again to keep it",
                 model, label)
        finished = None
    if finished is not None:
        log.info("%s %s: finished earlier, reusing %s", model, label, key)
    return finished


def run_variant(session, store, key: str, description: dict, options, subset: int,
                baseline_key, evaluation=None, keep_logits: bool = False) -> dict:
    """Evaluate one variant (float32 when ``options`` is None) on calibration subset ``subset``
    and save it into ``store``; int8 variants are compared with the finished float32 variant
    ``baseline_key`` (if any). ``evaluation``: its result on the evaluation images, merged from
    shards run elsewhere. ``keep_logits``: an int8 variant's logits are written to its own files
    (``ResultStore.logits_path``) as float32's always are."""
    from qcal.report import tables as report

    model, label = session.model.name, variant_label(options, subset)
    log.info("%s %s: running", model, label)
    t0 = time.time()
    # per-image logits never stay in memory: float32's go to files as they come, int8
    # variants compare theirs with those files batch by batch
    with ExitStack() as logits_stack:
        references, logits_files = {}, {}
        if options is None or keep_logits:
            plan = session.plan(options is not None)
            logits_files = store.logits_files(key, [
                name for name, selection in (("evaluation", plan.evaluation),
                                             ("fidelity", plan.fidelity)) if selection is not None],
                logits_stack)
        if options is not None and baseline_key is not None:
            references = store.references(baseline_key, logits_stack)
        try:
            result, fidelity_result, extra = session.evaluate(
                options, subset, evaluation, references=references, logits_files=logits_files,
                keep_logits=False)
        except VerificationFailed as exc:  # the CLI prints it; the log keeps it too
            log.info("stopped, not evaluated: %s", exc)
            raise
    if options is not None and baseline_key is not None:
        extra["metrics"] = {**_fidelity_metrics(result, fidelity_result),
                            **extra.get("metrics", {})}
    record = {**report.result_row(session.display_name, label, result),
              "key": key, "description": description,
              "wall_seconds": round(time.time() - t0, 2), **extra}
    store.save(key, record, result.predictions, result.labels)
    log.info("%s %s: top-1 %.2f %%, top-5 %.2f %% on %d images (%.1f s)", model, label,
             100 * result.top1, 100 * result.top5, result.images, record["wall_seconds"])
    return record


# --- which config a results folder belongs to -----------------------------------------------------

CONFIG_NAME = "config.json"
CONFIG_FORMAT = "qcal-folder-config/1"
# what a sweep writes into its folder: anything else there is someone else's
FOLDER_FILES = frozenset({LOCK_NAME, CONFIG_NAME, "sweep.log", "variants", "results.csv",
                          "results.md", "results.json", "predictions.csv", "layers.csv",
                          "top1.png", "calibration_subsets.csv", "statistics",
                          "workers", "sensitivity.log", "sensitivity.json", "sensitivity.csv",
                          "sensitivity.md", "sensitivity.png"})
# a config may add these and still resume in a folder (everything else must be equal)
GROWING_KEYS = ("models", "variants", "float32")


def config_identity(config) -> dict:
    """What a folder's results depend on, as JSON values (tuples become lists)."""
    identity = {"models": list(config.models), "params": config.params,
                "pretrained": config.pretrained, "calibration_file": config.calibration_file,
                "data": config.data, "batch_size": config.batch_size, "seed": config.seed,
                "float32": config.float32, "variants": [v.to_dict() for v in config.variants]}
    if config.calib_repeats > 1:  # absent otherwise: folders from before it still resume
        identity["calib_repeats"] = config.calib_repeats
    return json.loads(json.dumps(identity, default=str))


def _difference(old: dict, new: dict) -> str | None:
    """The first way ``new`` fails to be ``old`` or a superset of it (None: it is one)."""
    for key in sorted(set(old) | set(new)):
        if key in GROWING_KEYS or old.get(key) == new.get(key):
            continue
        if key == "data" and isinstance(old.get(key), dict):
            sub = next(k for k in sorted(set(old[key]) | set(new[key]))
                       if old[key].get(k) != new[key].get(k))
            return (f"data.{sub} is {old[key].get(sub)!r} there, {new[key].get(sub)!r} here")
        return f"{key} is {old.get(key)!r} there, {new.get(key)!r} here"
    for model in old.get("models", []):
        if model not in new["models"]:
            return f"model {model} is not in this config"
    for variant in old.get("variants", []):
        if variant not in new["variants"]:
            try:
                label = QuantOptions.from_dict(variant).label
            except (QcalError, TypeError):
                label = str(variant)
            return f"variant '{label}' is not in this config"
    if old.get("float32") and not new["float32"]:
        return "float32 is not evaluated by this config"
    return None


def folder_owner(folder: Path, identity: dict, force: bool = False) -> str:
    """Whether a run of the config ``identity`` may write into ``folder``: 'new' (no config
    there yet), 'same', 'superset' (it adds models or variants: resume) or 'forced'; a
    ``UsageProblem`` saying why not otherwise."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not folder.is_dir():
        return "new"
    advice = "pass --force to use it for this config anyway, or choose another output folder"
    try:
        recorded = json.loads(path.read_text())
        old = recorded["identity"]
        if recorded.get("format") != CONFIG_FORMAT or not isinstance(old, dict):
            raise ValueError(recorded.get("format"))
    except FileNotFoundError:
        foreign = sorted(e for e in os.listdir(folder)
                         if e not in FOLDER_FILES and not is_temporary(e))
        if foreign and not force:
            raise UsageProblem(f"output folder {folder} holds files qcal did not write "
                               f"({', '.join(foreign[:3])}{', ...' if len(foreign) > 3 else ''}"
                               f"); {advice}") from None
        return "forced" if foreign else "new"
    except (OSError, ValueError, KeyError, TypeError):
        if force:
            return "forced"
        raise UsageProblem(f"{path} cannot be read, so which config {folder} belongs to is "
                           f"unknown; {advice}") from None
    if old == identity:
        return "same"
    difference = _difference(old, identity)
    if difference is None:
        return "superset"
    if force:
        return "forced"
    raise UsageProblem(f"output folder {folder} holds the results of another config "
                       f"({difference}; see {path}); {advice}")


def claim_folder(folder: Path, config, force: bool = False, command: str = "",
                 identity: dict | None = None) -> str:
    """``folder_owner``, then record this config in ``folder/config.json`` (under the folder's
    lock: two runs never both claim one folder). ``identity``: what another command's results
    depend on (default: the sweep's, ``config_identity``)."""
    identity = config_identity(config) if identity is None else identity
    status = folder_owner(folder, identity, force)
    if status != "same":
        record = {"format": CONFIG_FORMAT, "identity": identity,
                  "config_path": config.source_path, "command": command}
        atomic_write_text(Path(folder) / CONFIG_NAME, json.dumps(record, indent=2) + "\n")
    if status == "superset":
        log.info("%s: this config adds models or variants to the folder's; resuming", folder)
    elif status == "forced":
        log.warning("%s: now belongs to this config (--force); its finished variants that this "
                    "config shares are reused", folder)
    return status


def setup_logging(output: Path, quiet: bool, log_name: str = "sweep.log"):
    """qcal's log lines into ``output/log_name`` and (unless ``quiet``) onto the terminal."""
    output.mkdir(parents=True, exist_ok=True)
    logger = logging.getLogger("qcal")
    logger.setLevel(logging.INFO)
    for handler in list(logger.handlers):
        logger.removeHandler(handler)
    file_handler = logging.FileHandler(output / log_name)
    file_handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger.addHandler(file_handler)
    stream = logging.StreamHandler(sys.stderr)  # quiet: warnings only (a preprocessing that
    stream.setLevel(logging.WARNING if quiet else logging.INFO)  # contradicts the model's own)
    stream.setFormatter(logging.Formatter("%(levelname)s: %(message)s" if quiet else "%(message)s"))
    logger.addHandler(stream)


def run_sweep(config, output: Path, quiet: bool = False, command: str = "",
              cache_dir: Path | None = None, wait: bool = False, force: bool = False,
              sessions: dict | None = None, claimed: bool = False, keep_sessions: bool = False,
              cluster=None):
    """Run (or finish) every variant of ``config``; returns the table written to results.md.

    One sweep writes into ``output`` at a time: while another holds it, this one raises
    ``FolderBusy`` (naming the folder and the other's pid), or waits for it when ``wait``.
    ``output`` belongs to one config (``claim_folder``; ``force`` hands it to this one).
    ``sessions``: {model: ModelSession} already checked (``qcal.drivers.validate``), reused (and
    kept open with ``keep_sessions``: their statistics serve the caller's next sweep). With
    ``claimed`` the caller holds ``output``'s lock and has claimed it (``qcal search``).
    ``cluster``: a ``qcal.drivers.cluster.ClusterSweep`` to run the variants as tasks on its
    Dask cluster instead of one after the other here (the same records, the same tables)."""
    output = Path(output)
    if claimed:
        return _run_sweep(config, output, quiet, command, cache_dir, sessions or {}, keep_sessions,
                          cluster)
    with folder_lock(output, wait=wait):
        claim_folder(output, config, force, command)
        return _run_sweep(config, output, quiet, command, cache_dir, sessions or {}, keep_sessions,
                          cluster)


def _run_sweep(config, output: Path, quiet: bool, command: str, cache_dir: Path | None,
               sessions: dict, keep_sessions: bool = False, cluster=None):
    from qcal.report import sweep_tables as sweep_report

    setup_logging(output, quiet)
    store = ResultStore(output)
    started = time.time()
    np.random.seed(config.seed)
    entries = []
    repeats = {}  # the key of each table row -> the keys of its calibration subsets
    passes = {}  # model -> statistics passes this run
    log.info("sweep %s started: %d model(s) x %d variant(s), command: %s", config.name,
             len(config.models), len(config.variants) + int(config.float32), command)
    if cluster is not None:  # the same work as tasks on a Dask cluster (qcal.drivers.cluster)
        entries, repeats, passes = cluster.run(config, store, sessions, cache_dir)
    for model in config.models if cluster is None else ():
        session = sessions.get(model) or open_session(config, model, quiet, cache_dir)
        session.check_variants(config.variants)
        baseline_key = None
        for options, subset in sweep_work(config):
            stop_if_interrupted()
            key, description = variant_key(store, session, config, options, subset)
            if reusable(store, key, config, model, options, subset) is None:
                run_variant(session, store, key, description, options, subset, baseline_key,
                            keep_logits=config.keep_logits)
            add_entry(entries, repeats, key, subset)
            if options is None:
                baseline_key = key
        passes[session.display_name] = session.statistics_passes
        if not keep_sessions:
            session.close()
    summary = {
        "config": config.raw, "config_path": config.source_path, "command": command,
        "seed": config.seed, **environment(),
        "sweep_seconds_this_run": round(time.time() - started, 2),
        "statistics_passes_this_run": passes,
    }
    return sweep_report.write_results(store, entries, output, summary,
                                      repeats if config.calib_repeats > 1 else None)
