"""Files qcal writes and reads back: atomic writes, content digests, self-checking files and
folder locks, each defined once.

Every output (tables, calibration files, compiled libraries, cached batches, sweep records) is
written to a temporary file in the destination's own folder and renamed into place, so a reader
never sees half a file and a run killed mid-write leaves the previous version (or nothing) under
the real name. Temporary names start with ``.``, carry the writer's process id (``.qcal-PID-``)
and contain ``.tmp``: the first write into a folder in a process removes the temporaries whose writer has died
(a run killed mid-write leaves nothing behind that nothing cleans).

**Checked files.** What qcal reads back and would otherwise trust (cached batches, compiled
libraries, sweep variant records, calibration files) ends with a check record, one text line
after the payload::

    PAYLOAD \\n#qcal-check {"kind": ..., "key": ..., "producer": "qcal 0.1.0", "size": N,
                            "sha256": ...}\\n

(the same idea as ccache's cache entries, whose checksum is the entry's epilogue). The payload
is the file exactly as its own format writes it: a shared library with the line appended still
loads (the dynamic loader reads only what the ELF headers point to), and readers parse the
payload bytes that were checked, never the file a second time. A file whose record is missing,
unparsable or disagrees with its payload, kind or key fails its check (``DamagedFile``); a cache
then warns naming the file, removes it and recomputes (``discard_damaged``).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

from qcal import __version__
from qcal.errors import QcalError

log = logging.getLogger("qcal.files")

TEMPORARY_MARK = ".tmp"
# A temporary whose writer's pid is alive is still being written, unless it is this old: the pid
# may have been reused by another process since.
TEMPORARY_MAX_AGE_S = 24 * 3600
# The checkout qcal runs from: the shipped data/ and weights/ folders live here.
REPO_ROOT = Path(__file__).resolve().parent.parent
CHECK_MARK = b"\n#qcal-check "
_CHECK_TAIL = 4096  # the record line is far shorter; the mark is looked for in this tail
PRODUCER = f"qcal {__version__}"


def sha256_file(path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_digest(path, what: str = "weights file") -> str:
    """A short content digest of ``path`` (16 hex digits of its sha256) for cache keys and records."""
    if not Path(path).is_file():
        raise QcalError(f"{what} not found: {path}")
    return sha256_file(path)[:16]


# --- temporaries -------------------------------------------------------------------------------

# .NAME.qcal-PID-RANDOM.tmpSUFFIX: distinctive, so that another program's files never match
_TEMPORARY_NAME = re.compile(r"^\..+\.qcal-(\d+)-[A-Za-z0-9_]+" + re.escape(TEMPORARY_MARK))
_swept_folders: set = set()


def is_temporary(name: str) -> bool:
    """Whether a file name is one of qcal's temporaries (any writer's)."""
    return _TEMPORARY_NAME.match(name) is not None


def temporary_name(path, suffix: str = "") -> str:
    """The prefix and suffix of a temporary beside ``path`` (``.NAME.qcal-PID-`` ...
    ``.tmpSUFFIX``)."""
    return f".{Path(path).name}.qcal-{os.getpid()}-", f"{TEMPORARY_MARK}{suffix}"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


def remove_stale_temporaries(folder) -> list:
    """Remove the temporaries in ``folder`` whose writer is dead (or that are older than any write
    takes); returns the paths removed. Another live process's write in progress is left alone."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMPORARY_NAME.match(entry.name)
        if not match:
            continue
        try:
            age = time.time() - entry.stat(follow_symlinks=False).st_mtime
        except FileNotFoundError:
            continue
        pid = int(match.group(1))
        if age < TEMPORARY_MAX_AGE_S and (pid == os.getpid() or _pid_alive(pid)):
            continue
        if entry.is_dir(follow_symlinks=False):
            shutil.rmtree(entry.path, ignore_errors=True)
        else:
            Path(entry.path).unlink(missing_ok=True)
        removed.append(Path(entry.path))
    if removed:
        log.info("removed %d temporary file(s) left by dead writers in %s", len(removed), folder)
    return removed


def _sweep_once(folder: Path):
    key = os.path.abspath(folder)
    if key not in _swept_folders:
        _swept_folders.add(key)
        remove_stale_temporaries(folder)


@contextmanager
def temporary_folder(path):
    """A scratch folder beside ``path`` (removed afterwards), named like every temporary so that
    one left by a killed process is removed by a later run."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    prefix, suffix = temporary_name(path)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=prefix, suffix=suffix))
    try:
        yield tmp
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


# --- atomic writes -----------------------------------------------------------------------------

@contextmanager
def atomic_path(path, suffix: str = "", finish=None):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any
    failure removed. ``suffix`` ends the temporary name (writers that pick a format by suffix,
    such as TVM's ``export_library``, need the real one). ``finish(tmp)`` runs after the block and
    before the rename (``checked_path`` appends the check record there)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _sweep_once(path.parent)
    prefix, end = temporary_name(path, suffix)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=prefix, suffix=end)
    os.close(fd)
    try:
        yield Path(tmp)
        if finish is not None:
            finish(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


@contextmanager
def atomic_open(path, mode: str = "wb"):
    """An open file object whose contents replace ``path`` only once the block succeeds."""
    with atomic_path(path) as tmp:
        with open(tmp, mode) as f:
            yield f


def atomic_write_text(path, text: str):
    with atomic_open(path, "w") as f:
        f.write(text)


def atomic_write_bytes(path, data: bytes):
    with atomic_open(path, "wb") as f:
        f.write(data)


# --- checked files -----------------------------------------------------------------------------

class DamagedFile(QcalError):
    """A checked file that fails its check; ``path`` names it, the message says how."""

    def __init__(self, path, reason: str):
        self.path = Path(path)
        self.reason = reason
        super().__init__(f"{path} failed its check: {reason}")


def _record_line(kind: str, key, payload_sha256: str, size: int) -> bytes:
    record = {"kind": kind, "key": key, "producer": PRODUCER, "size": size,
              "sha256": payload_sha256}
    return CHECK_MARK + json.dumps(record, sort_keys=True).encode() + b"\n"


def _append_record(tmp: Path, kind: str, key):
    h = hashlib.sha256()
    size = 0
    with open(tmp, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
            size += len(chunk)
    with open(tmp, "ab") as f:
        f.write(_record_line(kind, key, h.hexdigest(), size))


@contextmanager
def checked_path(path, kind: str, key=None, suffix: str = ""):
    """``atomic_path`` for a checked file: the block writes the payload to the yielded path, the
    check record (``kind``, ``key``, producer, size, sha256) is appended, then the file is renamed
    into place."""
    with atomic_path(path, suffix, finish=lambda tmp: _append_record(tmp, kind, key)) as tmp:
        yield tmp


@contextmanager
def checked_open(path, kind: str, key=None):
    """``atomic_open`` for a checked file (binary)."""
    with checked_path(path, kind, key) as tmp:
        with open(tmp, "wb") as f:
            yield f


def write_checked(path, payload: bytes, kind: str, key=None):
    with checked_open(path, kind, key) as f:
        f.write(payload)


def _split_record(path, tail: bytes, total: int):
    """(payload size, record) from the last bytes of a file; DamagedFile when there is none."""
    if total == 0:
        raise DamagedFile(path, "the file is empty")
    at = tail.rfind(CHECK_MARK)
    if at < 0 or not tail.endswith(b"\n"):
        raise DamagedFile(path, "it has no check record (truncated, or not written by qcal)")
    try:
        record = json.loads(tail[at + len(CHECK_MARK):-1].decode())
        payload_size = total - (len(tail) - at)
        if not isinstance(record, dict) or record.get("size") != payload_size:
            raise ValueError(f"{record.get('size')} bytes recorded, {payload_size} present")
    except (ValueError, AttributeError) as exc:
        raise DamagedFile(path, f"its check record is damaged ({exc})") from None
    return payload_size, record


def _compare(path, record: dict, digest: str, kind: str, key):
    if record.get("kind") != kind:
        raise DamagedFile(path, f"it is a {record.get('kind')!r} file, not a {kind!r} file")
    if key is not None and record.get("key") != key:
        raise DamagedFile(path, f"it holds key {record.get('key')!r}, not {key!r}")
    if record.get("sha256") != digest:
        raise DamagedFile(path, "its contents do not match their checksum")


def read_checked(path, kind: str, key=None) -> tuple:
    """(payload bytes, record) of a checked file, after checking them; DamagedFile otherwise.
    ``key`` None accepts any key (the record says which)."""
    with open(path, "rb") as f:
        data = bytearray(os.fstat(f.fileno()).st_size)  # writable: arrays may view it
        if f.readinto(data) != len(data):
            raise DamagedFile(path, "it changed while being read")
    payload_size, record = _split_record(path, bytes(data[-_CHECK_TAIL:]), len(data))
    payload = memoryview(data)[:payload_size]
    _compare(path, record, hashlib.sha256(payload).hexdigest(), kind, key)
    return payload, record


def verify_checked(path, kind: str, key=None) -> dict:
    """Check a file that something else must open by name (a shared library); its record."""
    path = Path(path)
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        f.seek(max(0, total - _CHECK_TAIL))
        payload_size, record = _split_record(path, f.read(), total)
        f.seek(0)
        h = hashlib.sha256()
        left = payload_size
        while left:
            chunk = f.read(min(left, 1 << 20))
            if not chunk:
                raise DamagedFile(path, "it changed while being checked")
            h.update(chunk)
            left -= len(chunk)
    _compare(path, record, h.hexdigest(), kind, key)
    return record


def has_check_record(path) -> bool:
    """Whether ``path`` ends with a check record line (intact or not): files written before qcal
    checked its files have none."""
    with open(path, "rb") as f:
        total = os.fstat(f.fileno()).st_size
        f.seek(max(0, total - _CHECK_TAIL))
        return CHECK_MARK in f.read()


def discard_damaged(error: DamagedFile, what_next: str = "recomputing it"):
    """What every cache does with a file that fails its check: say so naming it, remove it."""
    log.warning("%s; removed, %s", error, what_next)
    error.path.unlink(missing_ok=True)


def load_checked(path, kind: str, key, parse, what_next: str = "recomputing it"):
    """``parse(payload)`` of a checked cache file, or None when the file is absent or damaged
    (then reported and removed: the caller recomputes). A payload that passes its check but does
    not parse counts as damaged too."""
    path = Path(path)
    try:
        payload, _ = read_checked(path, kind, key)
        try:
            return parse(payload)
        except Exception as exc:
            raise DamagedFile(path, f"its payload does not parse ({exc})") from None
    except FileNotFoundError:
        return None
    except DamagedFile as exc:
        discard_damaged(exc, what_next)
        return None


# --- one writer per folder ---------------------------------------------------------------------

LOCK_NAME = ".qcal-lock"


class FolderBusy(QcalError):
    """Another live process holds the folder's lock."""


@contextmanager
def folder_lock(folder, wait: bool = False, what: str = "output folder"):
    """Hold ``folder``'s writer lock for the block: an OS lock (``flock``) on ``FOLDER/.qcal-lock``,
    released by the kernel when the holder exits however it exits, so a crashed run never leaves
    a stale lock. The holder's pid is written into the lock file for the message a second writer
    gets: ``FolderBusy`` at once, or after waiting when ``wait``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_NAME
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                raise
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
            if not wait:
                raise FolderBusy(f"{what} {folder} is in use by another qcal process (pid "
                                 f"{holder}); wait for it to finish or pass --wait") from None
            log.warning("%s %s is in use by another qcal process (pid %s): waiting for it", what,
                        folder, holder)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        yield path
    finally:
        os.close(fd)  # closing the descriptor releases the lock
