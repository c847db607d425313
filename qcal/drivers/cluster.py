"""A sweep's work as tasks on a Dask cluster (``qcal sweep --cluster ADDRESS`` / ``--workers N``).

The records, the folder and the tables are the single-process sweep's (``qcal.drivers.sweep``):
workers run the same ``run_variant`` and write through the same ``ResultStore`` (atomic, checked
files) into the output folder, which every worker must reach at the same path; the driver holds
the folder's lock, decides what is finished, submits the rest and assembles the tables.

Tasks, per model:

- ``statistics``: a statistics pass, once per model, calibration subset and float model (the
  imported graph, or the equalized one), saved as a calibration file in ``OUTPUT/statistics/``
  (a checked file); every int8 variant that reads it depends on it and receives its path,
  never the tensors.
- ``part``: one image range of a variant's evaluation, when it has more than ``shard_images``
  images (ranges are whole batches, so every image is computed in the batch it has in a
  single-process sweep); saved as ``variants/KEY.part-START-STOP.npz``.
- ``variant``: the rest of a variant (compile, verification, the fidelity images, per-layer
  errors, the record), with its parts merged (``qcal.eval.evaluate.merge_results``). Each int8
  variant waits for the model's float32 variant, its fidelity baseline.

A worker killed mid-task loses that task only: the scheduler runs it again on another worker
(Dask's ``distributed.scheduler.allowed-failures`` times, then the sweep stops naming it); what
it left half-written is a temporary that the next writer into that folder removes. A driver
killed and started again resumes: finished variants, parts and statistics are reused from the
folder. Each worker logs to ``OUTPUT/workers/NAME.log``; the driver logs progress (variants
finished, running, queued; images/s over the cluster) to ``sweep.log`` and the terminal.

Length: both sides of the protocol (the tasks workers run and the driver that submits them and
reads their events) in one module, so each task's arguments are read beside where they are made.
"""
from __future__ import annotations

import json
import logging
import os
import re
import socket
import threading
import time
from collections import deque
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qcal import __version__
from qcal.config import DEFAULT_BATCH_CACHE_DIR
from qcal.errors import QcalError, UsageProblem, stop_if_interrupted
from qcal.eval.verify import VerificationFailed
from qcal.files import DamagedFile, discard_damaged, remove_stale_temporaries, verify_checked

log = logging.getLogger("qcal.drivers.cluster")

TOPIC = "qcal-progress"  # worker -> driver events: a task started / ended, images evaluated
CONNECT_TIMEOUT_S = 10  # an unreachable scheduler is reported after this long, unless Dask's
TIMEOUT_ENV = "DASK_DISTRIBUTED__COMM__TIMEOUTS__CONNECT"  # own setting says otherwise ("2s")
PROGRESS_SECONDS = 10.0  # a progress line at least this often while tasks run
WORKER_SESSIONS = 2  # models a worker keeps loaded between tasks
THREAD_VARIABLES = ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS")


def shard_ranges(images: int, batch_size: int, shard_images: int | None) -> list:
    """[start, stop) ranges of at most ``shard_images`` images (whole batches, so that each image
    is in the batch it is in when the variant runs whole); one range when it needs no shards."""
    if not shard_images or images <= shard_images:
        return [(0, images)]
    size = max(batch_size, shard_images // batch_size * batch_size)
    return [(lo, min(lo + size, images)) for lo in range(0, images, size)]


def statistics_path(store, session, options, subset: int) -> Path:
    """Where the statistics pass that variant ``options`` reads on calibration subset ``subset``
    is kept (one for every variant of the model sharing its subset and float model)."""
    key = store.key({"model": session.identity, "qcal": __version__,
                     "calibration": session.plan_description(True, subset)["calibration"],
                     "equalize": options.equalize})
    return store.directory / "statistics" / f"{key}.npz"


def statistics_needed(options, subset: int) -> list:
    """The (subset, equalize) passes a variant reads: its own subset's, and with bias correction
    also subset 0's (``ModelSession.correction_data`` measures on the float model of subset 0)."""
    needed = [(subset, options.equalize)]
    if options.bias_correction != "none" and subset:
        needed.append((0, options.equalize))
    return needed


@dataclass(frozen=True)
class WorkerJob:
    """What every task of one sweep needs to rebuild its model session on a worker."""

    config: object  # the SweepConfig (its paths are absolute)
    output: str  # the output folder, absolute
    cache_dir: str  # the batch cache, absolute

    @property
    def identity(self) -> str:
        from qcal.drivers.sweep import config_identity

        return json.dumps([config_identity(self.config), self.config.verify_images, self.cache_dir])


# --- on the workers ---------------------------------------------------------------------------------

_worker_state = {"sessions": {}, "adopted": {}, "logs": set()}


class _Reporter:
    """A session's progress bar on a worker: images evaluated become events for the driver."""

    def __init__(self, worker, variant: str):
        self.worker, self.variant = worker, variant

    def __call__(self, total, description):
        return self

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False

    def update(self, images: int):
        self.worker.log_event(TOPIC, {"state": "images", "variant": self.variant,
                                      "images": int(images)})


def _worker_log(job: WorkerJob, worker):
    """``OUTPUT/workers/NAME.log``: this worker's qcal log lines (once per process and folder)."""
    if job.output in _worker_state["logs"]:
        return
    _worker_state["logs"].add(job.output)
    name = re.sub(r"[^A-Za-z0-9_.-]+", "_", str(worker.name)).strip("_") or "worker"
    folder = Path(job.output) / "workers"
    folder.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(folder / f"{name}.log")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(message)s"))
    logger = logging.getLogger("qcal")
    logger.setLevel(logging.INFO)
    logger.propagate = False  # the driver's terminal shows progress, not every worker's lines
    logger.addHandler(handler)
    log.info("worker %s (pid %d on %s, %s) joined the sweep", worker.name, os.getpid(),
             socket.gethostname(), worker.address)


def _session(job: WorkerJob, model: str, options=None, statistics=()):
    """This worker's session of ``model`` (kept between tasks), holding the statistics passes
    ``statistics`` ((subset, path) pairs) as ``options``' own."""
    from qcal.drivers.sweep import open_session

    sessions, adopted = _worker_state["sessions"], _worker_state["adopted"]
    key = (job.identity, model)
    if key not in sessions:
        while len(sessions) >= WORKER_SESSIONS:
            old = next(iter(sessions))
            sessions.pop(old).close()
            adopted.pop(old, None)
        sessions[key] = open_session(job.config, model, quiet=True, cache_dir=Path(job.cache_dir))
    session = sessions[key]
    for subset, path in statistics:
        if path not in adopted.setdefault(key, set()):
            session.adopt_statistics(path, options, subset)
            adopted[key].add(path)
    return session


def _task(job: WorkerJob, variant: str, what: str, work):
    """Run ``work()`` as one task: logged on the worker, reported to the driver, and its
    errors made plain (a QcalError reaches the driver with its message only)."""
    from distributed import get_worker

    worker = get_worker()
    _worker_log(job, worker)
    worker.log_event(TOPIC, {"state": "start", "variant": variant, "worker": str(worker.name)})
    start = time.monotonic()
    try:
        return work(_Reporter(worker, variant))
    except (VerificationFailed, UsageProblem):
        raise
    except QcalError as exc:  # some carry fields that do not travel; the message does
        raise QcalError(str(exc)) from None
    finally:
        log.info("%s: task ended after %.1f s", what, time.monotonic() - start)
        worker.log_event(TOPIC, {"state": "end", "variant": variant})


def statistics_task(job: WorkerJob, model: str, options, subset: int, path: str) -> str:
    """The statistics pass variant ``options`` reads on subset ``subset``, into ``path`` (kept
    when a finished one is there)."""
    def work(reporter):
        try:
            verify_checked(path, "calibration file")
            log.info("%s: statistics pass finished earlier, reusing %s", model, path)
            return path
        except FileNotFoundError:
            pass
        except DamagedFile as exc:
            discard_damaged(exc, "running the statistics pass again")
        log.info("%s: statistics pass into %s", model, path)
        _session(job, model).save_statistics(path, options, subset)
        return path
    return _task(job, f"statistics {path}", f"{model} statistics", work)


def part_task(job: WorkerJob, model: str, options, subset: int, key: str, start: int, stop: int,
              statistics) -> tuple:
    """Images [start, stop) of the variant ``key``, saved as one part in the store."""
    from qcal.drivers.sweep import ResultStore, variant_label

    store = ResultStore(job.output)
    label = f"{model} {variant_label(options, subset)} [{start}:{stop}]"

    def work(reporter):
        if store.load_part(key, start, stop) is not None:
            log.info("%s: finished earlier, reusing", label)
            return start, stop
        session = _session(job, model, options, statistics)
        session.progress = reporter
        log.info("%s: running", label)
        store.save_part(key, start, stop, session.evaluate_range(options, start, stop, subset))
        return start, stop
    return _task(job, key, label, work)


def variant_task(job: WorkerJob, model: str, options, subset: int, key: str, description: dict,
                 statistics, baseline, parts) -> str:
    """One variant whole (its ``parts`` merged when it was sharded), saved into the store."""
    from qcal.drivers.sweep import ResultStore, run_variant, variant_label
    from qcal.eval.evaluate import merge_results

    store = ResultStore(job.output)
    label = f"{model} {variant_label(options, subset)}"

    def work(reporter):
        evaluation = None
        if parts:
            results = [store.load_part(key, lo, hi) for lo, hi in parts]
            if any(r is None for r in results):  # removed since: run the variant again
                raise QcalError(f"{label}: a finished shard of it is missing or damaged in "
                                f"{store.variants}; run the sweep again to recompute it")
            evaluation = merge_results(results)
        session = _session(job, model, options, statistics)
        session.progress = reporter
        run_variant(session, store, key, description, options, subset, baseline, evaluation,
                    keep_logits=job.config.keep_logits)
        store.remove_parts(key)
        return key
    return _task(job, key, label, work)


# --- on the driver ----------------------------------------------------------------------------------

class Progress:
    """What the workers report (``TOPIC`` events), as one line for the log."""

    def __init__(self, total: int, finished: int):
        self.lock = threading.Lock()
        self.total, self.finished_before = total, finished
        self.running = {}  # variant key -> tasks of it running
        self.samples = deque()  # (time, images)
        self.images = 0
        self.started = time.monotonic()

    def event(self, event):
        _, msg = event
        with self.lock:
            if msg["state"] == "start":
                self.running[msg["variant"]] = self.running.get(msg["variant"], 0) + 1
            elif msg["state"] == "end" and msg["variant"] in self.running:
                self.running[msg["variant"]] -= 1
                if not self.running[msg["variant"]]:
                    del self.running[msg["variant"]]
            elif msg["state"] == "images":
                self.images += msg["images"]
                self.samples.append((time.monotonic(), msg["images"]))

    def line(self, finished: int, workers: int) -> str:
        now = time.monotonic()
        with self.lock:
            while self.samples and self.samples[0][0] < now - PROGRESS_SECONDS:
                self.samples.popleft()
            recent = sum(n for _, n in self.samples)
            running = sum(1 for name in self.running if not name.startswith("statistics "))
            passes = len(self.running) - running
            images = self.images
        done = self.finished_before + finished
        queued = max(0, self.total - done - running)
        elapsed = max(now - self.started, 1e-9)
        return (f"cluster: {done}/{self.total} variants finished, {running} running, {queued} "
                f"queued, {passes} statistics pass(es) running, on {workers} worker(s); "
                f"{recent / PROGRESS_SECONDS:.0f} images/s over the last "
                f"{PROGRESS_SECONDS:.0f} s, {images} images at {images / elapsed:.0f} images/s "
                f"since the start")


class ClusterSweep:
    """A connected Dask client and how the sweep's work is cut into tasks."""

    def __init__(self, client, shard_images: int | None = None, description: str = ""):
        self.client, self.shard_images, self.description = client, shard_images, description

    def run(self, config, store, sessions: dict, cache_dir) -> tuple:
        """Every variant of ``config`` as tasks; once all are finished in ``store``, returns
        what the single-process loop does: the table's keys in order, each row's calibration
        subsets' keys, and {model: statistics passes run}."""
        from qcal.drivers.sweep import (add_entry, open_session, reusable, sweep_work, variant_key,
                                        variant_label)

        job = WorkerJob(config, str(Path(store.directory).resolve()),
                        str(Path(cache_dir or DEFAULT_BATCH_CACHE_DIR).resolve()))
        entries, repeats, heads, passes, finished = [], {}, {}, {}, 0
        for model in config.models:
            session = sessions.get(model) or open_session(config, model, True, cache_dir)
            session.check_variants(config.variants)
            statistics, baseline = {}, None  # (subset, equalize) -> future; float32's key/future
            for options, subset in sweep_work(config):
                key, description = variant_key(store, session, config, options, subset)
                add_entry(entries, repeats, key, subset)
                label = f"{model} {variant_label(options, subset)}"
                if reusable(store, key, config, model, options, subset) is not None:
                    finished += 1
                    baseline = key if options is None else baseline
                    continue
                needs = []
                if options is not None and config.calibration_file is None:
                    for pass_subset, equalize in statistics_needed(options, subset):
                        if (pass_subset, equalize) not in statistics:
                            path = str(statistics_path(store, session, options, pass_subset))
                            statistics[pass_subset, equalize] = self.client.submit(
                                statistics_task, job, model, options, pass_subset, path,
                                key=f"qcal-statistics-{Path(path).stem}")
                        needs.append((pass_subset, statistics[pass_subset, equalize]))
                head = self._submit_variant(job, session, model, options, subset, key,
                                            description, needs, baseline, config.batch_size)
                heads[head] = label
                baseline = head if options is None else baseline
            passes[session.display_name] = len(statistics)
            session.close()
        self._wait(heads, len(heads) + finished, finished)
        remove_stale_temporaries(store.variants)  # what workers killed mid-write left
        return entries, repeats, passes

    def _submit_variant(self, job, session, model, options, subset, key, description, needs,
                        baseline, batch_size):
        """The variant's task (after its shards' tasks, if it has more images than a shard)."""
        from qcal.drivers.sweep import variant_label

        submit = self.client.submit
        ranges = shard_ranges(len(session.plan(options is not None).evaluation), batch_size,
                              self.shard_images)
        parts = [] if len(ranges) == 1 else [
            submit(part_task, job, model, options, subset, key, lo, hi, needs,
                   key=f"qcal-part-{key}-{lo}") for lo, hi in ranges]
        log.info("%s %s: submitted (%s)", model, variant_label(options, subset),
                 f"{len(parts)} shards" if parts else "one task")
        return submit(variant_task, job, model, options, subset, key, description, needs,
                      baseline if options is not None else None, parts,
                      key=f"qcal-variant-{key}")

    def _wait(self, heads: dict, total: int, finished: int):
        from distributed import wait

        progress = Progress(total, finished)
        self.client.subscribe_topic(TOPIC, progress.event)
        pending, done_count = set(heads), 0
        try:
            while pending:
                stop_if_interrupted()
                try:
                    with self.client.as_current():
                        done, pending = wait(pending, timeout=PROGRESS_SECONDS,
                                             return_when="FIRST_COMPLETED")
                except TimeoutError:
                    done = set()
                for future in done:
                    if future.status != "finished":
                        raise self._failure(future, heads[future])
                    done_count += 1
                    log.info("%s: finished", heads[future])
                workers = len(self.client.scheduler_info(n_workers=-1)["workers"])
                log.info("%s", progress.line(done_count, workers))
        except BaseException:
            self.client.cancel(list(pending))
            raise
        finally:
            self.client.unsubscribe_topic(TOPIC)

    @staticmethod
    def _failure(future, label: str) -> Exception:
        from distributed import KilledWorker

        exc = future.exception()
        if isinstance(exc, KilledWorker):
            return QcalError(f"{label}: its task ended every worker that ran it, "
                             f"{exc.allowed_failures + 1} in turn (see OUTPUT/workers/*.log); "
                             f"the sweep stopped, what finished is kept")
        return exc


@contextmanager
def connect(address: str | None = None, workers: int | None = None,
            shard_images: int | None = None):
    """A ``ClusterSweep`` on the scheduler at ``address``, or on a local cluster of ``workers``
    processes (one task at a time each); closed afterwards. An unreachable scheduler is a
    ``QcalError`` naming it, raised before anything is written."""
    from distributed import Client, LocalCluster

    local = None
    try:
        if address:
            client = Client(address, set_as_default=False,
                            timeout=os.environ.get(TIMEOUT_ENV) or CONNECT_TIMEOUT_S)
            description = f"the Dask scheduler at {address}"
        else:
            import dask

            # Dask's nanny starts workers with OMP/MKL/OPENBLAS_NUM_THREADS=1; the numpy float
            # references (per-layer SQNR) then sum in another order than this process and differ
            # in their last digits: the workers get this process's settings instead
            environ = {"MALLOC_TRIM_THRESHOLD_": "65536",
                       **{k: os.environ[k] for k in THREAD_VARIABLES if k in os.environ}}
            with dask.config.set({"distributed.nanny.pre-spawn-environ": environ}):
                local = LocalCluster(n_workers=workers, threads_per_worker=1, processes=True,
                                     dashboard_address=None, silence_logs=logging.CRITICAL)
            client = Client(local, set_as_default=False)
            description = f"a local Dask cluster of {workers} worker process(es)"
    except (OSError, TimeoutError, ValueError) as exc:
        if local is not None:
            local.close()
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise QcalError(f"cannot reach the Dask scheduler at {address} ({reason}); start one "
                        f"(dask scheduler, dask worker) or pass --workers N for a local "
                        f"cluster") from None
    try:
        log.debug("connected to %s", description)
        yield ClusterSweep(client, shard_images, description)
    finally:
        client.close()
        if local is not None:
            local.close()
