"""Argument types of qcal's command line, and the one boundary where qcal's errors become click's.

Domain errors become one line and an exit code (click's convention: 2 for a bad invocation, 1 for a
runtime failure); no traceback reaches the user. Ctrl-C ends with one line and exit 130 (128 +
SIGINT, the shell's convention); what was finished stays finished (every file is written
atomically and a sweep resumes from its finished variants). Anything else that escapes is a bug in
qcal: one line names it and the file where its full traceback was written.
"""
from __future__ import annotations

import datetime
import functools
import os
import signal
import sys
import tempfile
import threading
import traceback
from pathlib import Path

import click

from qcal.errors import Problems, QcalError, UsageProblem, interrupt_seen, note_interrupt

INTERRUPTED_EXIT = 130
CRASH_LOG_ENV = "QCAL_CRASH_DIR"  # where crash logs go (default: the system's temporary folder)


def one_line(text: str, limit: int = 300) -> str:
    """The first informative line of a message from another library (MXNet's and TVM's messages
    carry their own stack traces after it)."""
    for line in str(text).splitlines():
        line = line.strip()
        if line and not line.startswith(("Traceback", "Stack trace", "File \"")):
            return line if len(line) <= limit else line[:limit - 3] + "..."
    return ""


def write_crash_log(exc: BaseException) -> Path | None:
    """The full traceback of ``exc`` in a new file; None when not even that can be written."""
    folder = Path(os.environ.get(CRASH_LOG_ENV) or tempfile.gettempdir())
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, name = tempfile.mkstemp(dir=folder, prefix=f"qcal-crash-{stamp}-", suffix=".log")
        with os.fdopen(fd, "w") as f:
            ctx = click.get_current_context(silent=True)
            f.write(f"command: {' '.join(ctx.command_path.split()) if ctx else '?'}\n"
                    f"params: {ctx.params if ctx else '?'}\n\n")
            f.write("".join(traceback.format_exception(type(exc), exc, exc.__traceback__)))
        return Path(name)
    except OSError:
        return None


class _Interrupts:
    """Ctrl-C during the command: noted (``qcal.errors.note_interrupt``), then raised as usual. A
    KeyboardInterrupt raised in Python code that TVM called from C++ comes back out of TVM as a
    bare RuntimeError, or not at all, so the boundary asks whether SIGINT arrived rather than
    trusting the exception's type, and qcal's loops stop at their next step."""

    def __init__(self):
        self._previous = None

    @staticmethod
    def _handler(signum, frame):
        note_interrupt()
        raise KeyboardInterrupt

    @property
    def seen(self) -> bool:
        return interrupt_seen()

    def __enter__(self):
        note_interrupt(False)
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handler)
        return self

    def __exit__(self, *exc):
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None


def _interrupted():
    click.echo("Interrupted: finished work is kept; run the same command again to resume.",
               err=True)
    _quiet_stderr_from_here()
    return click.exceptions.Exit(INTERRUPTED_EXIT)


def _quiet_stderr_from_here():
    """Send what is still written to the terminal's stderr to /dev/null: the process only exits
    now, and TVM's C++ objects left mid-build print warnings as they are destroyed
    ("BlockBuilder destroyed with remaining blocks!"). Only for the real stderr (fd 2), never
    for a caller that captures it."""
    try:
        if sys.stderr.fileno() != 2:
            return
        sys.stderr.flush()
        devnull = os.open(os.devnull, os.O_WRONLY)
    except (AttributeError, OSError, ValueError):  # a captured stream has no descriptor
        return
    os.dup2(devnull, 2)
    os.close(devnull)


def translate_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        with _Interrupts() as interrupts:
            try:
                result = _translated(func, interrupts, *args, **kwargs)
            except KeyboardInterrupt:  # a second Ctrl-C while the first was being handled
                raise _interrupted() from None
            if interrupts.seen:  # swallowed by a library, and the work finished regardless
                raise _interrupted()
            return result
    return wrapper


def _translated(func, interrupts, *args, **kwargs):
    try:
        return func(*args, **kwargs)
    except (click.ClickException, click.exceptions.Exit, click.Abort):
        raise
    except KeyboardInterrupt:
        raise _interrupted() from None
    except Exception as exc:
        if interrupts.seen:  # Ctrl-C, surfacing as another library's (or qcal's) error
            raise _interrupted() from None
        raise _click_error(exc) from None


def _click_error(exc: Exception) -> click.ClickException:
    if isinstance(exc, Problems):
        return click.UsageError(str(exc)) if exc.usage else click.ClickException(str(exc))
    if isinstance(exc, UsageProblem):
        return click.UsageError(str(exc))
    if isinstance(exc, QcalError):
        return click.ClickException(str(exc))
    if isinstance(exc, OSError):  # a file qcal was asked to read or write: name it
        return click.ClickException(f"{exc.filename or ''}: {exc.strerror or one_line(exc)}")
    # a bug in qcal: one line here, the traceback in a file
    log = write_crash_log(exc)
    where = f"; full traceback in {log}" if log else ""
    return click.ClickException(f"internal error {type(exc).__name__}: {one_line(exc)} (a bug in "
                                f"qcal, not in the input{where})")


class ImageRangeType(click.ParamType):
    name = "START:STOP"

    def convert(self, value, param, ctx):
        from qcal.data.plan import parse_range

        if isinstance(value, tuple):
            return value
        try:
            start, stop = parse_range(value)
        except UsageProblem as exc:
            self.fail(str(exc), param, ctx)
        if not 0 <= start < stop:
            self.fail(f"need 0 <= START < STOP, got {value}", param, ctx)
        return start, stop


class ModelType(click.ParamType):
    """A name `qcal models` lists, or a model file a family takes (an ONNX classifier)."""

    name = "MODEL"

    def convert(self, value, param, ctx):
        from qcal.families import canonical_model_name

        try:
            return canonical_model_name(value)
        except UsageProblem as exc:
            self.fail(str(exc), param, ctx)


class BiasType(click.ParamType):
    """Bias precision: a bit count 2..32 (own power-of-2 scale) or int32-acc."""

    name = "BITS|int32-acc"

    def convert(self, value, param, ctx):
        if value == "int32-acc" or isinstance(value, int):
            return value
        try:
            bits = int(value)
        except ValueError:
            self.fail(f"'{value}' is neither a bit count nor int32-acc", param, ctx)
        if not 2 <= bits <= 32:
            self.fail(f"bias bits must be from 2 to 32, not {bits}", param, ctx)
        return bits


class PreprocessingValueType(click.ParamType):
    """One preprocessing key's value, checked by the rule sweep files and preprocessing files
    share (``qcal.data.preprocessing.coerce``)."""

    def __init__(self, key: str):
        from qcal.data.preprocessing import PREPROCESSING_FIELDS

        spec = next(f for f in PREPROCESSING_FIELDS if f.key == key)
        self.key = key
        self.name = {"int": "INTEGER", "float": "NUMBER", "channels": "R,G,B"}.get(
            spec.kind, "|".join(map(str, spec.choices)))

    def convert(self, value, param, ctx):
        from qcal.data.preprocessing import coerce

        try:
            return coerce(self.key, value)
        except UsageProblem as exc:
            self.fail(str(exc), param, ctx)
