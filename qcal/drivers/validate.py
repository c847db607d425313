"""Check a whole run before any work: every problem a configuration has, found before the first
image is decoded, each naming where it was given.

``check_run`` takes a ``SweepConfig`` (from a sweep file or built from the command line) and the
paths the run will write, and checks, for every model: that its name resolves, that its weights
load and fit the architecture, that its preprocessing is sane (std > 0, one value or one per
channel, finite), that its data sources open and hold the images asked for, that the calibration images
are valid and disjoint from the evaluated ones, and that a calibration file fits it. Then every
output location is created and probed with a real write (root ignores permission bits, so asking
``os.access`` proves nothing), and the results folder must belong to this config
(``qcal.drivers.sweep.folder_owner``). All problems are raised together (``qcal.errors.Problems``);
folders the probe created are removed again, so a refused run leaves nothing behind.

A problem's place is the sweep file's ``FILE:LINE`` of the value at fault, or the command-line
option that gave it (``SweepConfig.locations``).
"""
from __future__ import annotations

import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from qcal.config import DEFAULT_BATCH_CACHE_DIR
from qcal.data.plan import DataProblem
from qcal.errors import QcalError, UsageProblem, raise_problems
from qcal.files import temporary_name

# the command-line option of each data key (what evaluate/calibrate record as its location);
# every other key's option is its name with dashes (--input-size, --mean, ...)
DATA_FLAGS = {"data": "--data", "num_images": "--num-images", "calib_data": "--calib-data",
              "calib_range": "--calib-range", "calib_images": "--calib-images"}


@dataclass(frozen=True)
class OutputPath:
    """A place the run writes: a file or a folder, and the option (or words) that named it."""

    path: Path
    kind: str  # "file" or "folder"
    option: str

    def describe(self) -> str:
        return f"{self.option} {self.path}"


def cli_locations(models, data: dict) -> dict:
    """``SweepConfig.locations`` for a config built from command-line options."""
    locations = {f"models[{i}]": "--model" for i in range(len(models))}
    locations.update({f"data.{key}": DATA_FLAGS.get(key, f"--{key.replace('_', '-')}")
                      for key in data})
    return locations


def _located(where: str, exc: QcalError) -> QcalError:
    """``exc`` with the sweep file's FILE:LINE in front (an option's messages name it already)."""
    if not where or where.startswith("--"):
        return exc
    cls = UsageProblem if isinstance(exc, UsageProblem) else QcalError
    return cls(f"{where}: {exc}")


def _data_problem(config, exc: DataProblem) -> UsageProblem:
    where = config.where(f"data.{exc.key}")
    if where.startswith("--"):
        return UsageProblem(f"{where} {exc.value}: {exc.reason}")
    if where:
        return UsageProblem(f"{where}: data.{exc.key} {exc.value}: {exc.reason}")
    if config.source_path:
        return UsageProblem(f"{config.source_path}: {exc.key} {exc.value}: {exc.reason}")
    return exc


def _preprocessing_problems(config, session, model_where: str) -> list:
    """The preprocessing the model would get (its own over the options given), refused when it
    makes no sense (std 0, a mean of the wrong length, nan ...), named where it was given."""
    from qcal.data.preprocessing import PREPROCESSING_KEYS

    try:
        session.preprocessing
    except UsageProblem as exc:
        message = str(exc)
        key = next((k for k in PREPROCESSING_KEYS if message.startswith(k + " ")), None)
        where = config.where(f"data.{key}") if key else ""
        if where.startswith("--"):
            return [UsageProblem(f"{where}: {message}")]
        if where:
            return [UsageProblem(f"{where}: data.{message}")]
        return [_located(model_where, UsageProblem(
            f"the preprocessing of {session.model.display_name}: {message}"))]
    return []


def _check_model(config, index: int, model: str, cache_dir, calibrate: bool, quiet: bool,
                 check_data: bool = True):
    """(session or None, problems) for one model of ``config``."""
    from qcal.drivers.session import ModelSession

    where = config.where(f"models[{index}]")
    try:
        session = ModelSession(model, config.data, config.batch_size, params=config.params,
                               pretrained=config.pretrained, seed=config.seed, quiet=quiet,
                               cache_dir=cache_dir, calibration_file=config.calibration_file,
                               verify_images=config.verify_images,
                               calib_repeats=config.calib_repeats)
    except QcalError as exc:
        return None, [_located(where, exc)]
    problems = []
    try:
        session.model.check_weights()
    except QcalError as exc:
        problems.append(_located(where, exc))
    if not check_data:
        session.close()
        return None, problems
    found = _preprocessing_problems(config, session, where)
    if found:  # no image can be prepared: the data plan would only say so again
        session.close()
        return None, problems + found
    needs_calibration = calibrate or bool(config.variants)
    try:
        session.plan(False)
        if needs_calibration:
            session.plan(True)
            if config.calib_repeats > 1:
                _check_repeats(config, session)
    except DataProblem as exc:
        problems.append(_data_problem(config, exc))
    except QcalError as exc:
        problems.append(_located(where, exc))
    if config.variants and not problems:
        try:
            session.check_variants(config.variants)
        except QcalError as exc:
            problems.append(exc)
    session.close()  # the weights are loaded again when the model runs; the plans are kept
    return (None if problems else session), problems


def _check_repeats(config, session):
    """Calibration subsets need calibration images to draw them from."""
    if config.calibration_file is not None:
        raise UsageProblem(f"{config.where('calib_repeats', '--calib-repeats')} "
                           f"{config.calib_repeats}: calibration subsets need calibration "
                           f"images, not a calibration file (--calib)")
    session.calibration_subsets  # noqa: B018 (drawn now: a problem stops the run here)


def probe_output(output: OutputPath) -> list:
    """Create ``output``'s folder (and missing parents) and write a probe file there; returns the
    folders it created. A ``QcalError`` names the path and why it cannot be written."""
    path = Path(os.path.abspath(output.path))  # "results/.." must not be made before "results"
    folder = path if output.kind == "folder" else path.parent
    if output.kind == "folder" and path.exists() and not path.is_dir():
        raise QcalError(f"{output.describe()} is a file, not a folder")
    if output.kind == "file" and path.is_dir():
        raise QcalError(f"{output.describe()} is a folder, not a file")
    missing = []
    existing = folder
    while not existing.exists():
        if existing.is_symlink():
            raise QcalError(f"{output.describe()}: {existing} is a broken symbolic link")
        missing.append(existing)
        existing = existing.parent
    if not existing.is_dir():
        raise QcalError(f"{output.describe()}: {existing} is a file, not a folder")
    created = []
    try:
        for each in reversed(missing):
            each.mkdir()
            created.append(each)
        prefix, suffix = temporary_name(folder / "probe")
        fd, probe = tempfile.mkstemp(dir=folder, prefix=prefix, suffix=suffix)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        remove_created(created)
        blame = exc.filename if exc.filename and not str(exc.filename).startswith(
            str(folder / ".")) else folder
        raise QcalError(f"{output.describe()}: cannot write into {blame} "
                        f"({exc.strerror or exc})") from None
    return created


def remove_created(folders):
    for folder in reversed(list(folders)):
        try:
            folder.rmdir()
        except OSError:  # something else wrote into it meanwhile: leave it
            pass


@dataclass
class CheckedRun:
    """What ``check_run`` found in order: {model: ModelSession} for the run to reuse (plans made,
    weights checked, nothing held in memory), and the folders its probe created."""

    sessions: dict
    created: list

    @contextmanager
    def undo_on_failure(self):
        """Run the block; if it fails (Ctrl-C included), remove the folders the probe created
        that are still empty, so that a failed run leaves no empty folders behind."""
        try:
            yield self
        except BaseException:
            remove_created(self.created)
            raise


def check_run(config, outputs=(), results_folder: Path | None = None, force: bool = False,
              cache_dir: Path | None = None, calibrate: bool = False, quiet: bool = True,
              problems=(), identity: dict | None = None) -> CheckedRun:
    """Every check above: a ``CheckedRun``, or every problem found raised at once.

    ``identity``: what the results in ``results_folder`` depend on, when another command than
    a sweep writes them (default: the sweep's, ``config_identity``).

    ``problems``: those found already (a sweep file's own); when there are any, the data checks
    are left out (the config is incomplete, they would report what its fix changes)."""
    problems = list(problems)
    complete = not problems
    cache_dir = Path(cache_dir or DEFAULT_BATCH_CACHE_DIR)
    sessions = {}
    for index, model in enumerate(config.models if config is not None else ()):
        session, found = _check_model(config, index, model, cache_dir, calibrate, quiet,
                                      check_data=complete)
        problems.extend(found)
        if session is not None:
            sessions[model] = session
    if results_folder is not None and complete:
        from qcal.drivers.sweep import config_identity, folder_owner

        try:
            folder_owner(Path(results_folder),
                         config_identity(config) if identity is None else identity, force)
        except QcalError as exc:
            problems.append(exc)
    created = []
    for output in [*outputs, OutputPath(cache_dir, "folder", "--cache-dir")]:
        try:
            created.extend(probe_output(output))
        except QcalError as exc:
            problems.append(exc)
    if problems:
        remove_created(created)
        raise_problems(problems)
    return CheckedRun(sessions, created)
