"""Files qcal writes and reads back: atomic writes and content digests, each defined once.

Every output (tables, calibration files, compiled libraries, cached batches, sweep records) is
written to a temporary file in the destination's own folder and renamed into place, so a reader
never sees half a file and a run killed mid-write leaves the previous version (or nothing) under
the real name. Temporary names start with ``.`` and contain ``.tmp`` so that they are easy to
recognise and clean up.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path

from qcal.errors import QcalError

TEMPORARY_MARK = ".tmp"
# The checkout qcal runs from: the shipped data/ and weights/ folders live here.
REPO_ROOT = Path(__file__).resolve().parent.parent


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


@contextmanager
def atomic_path(path, suffix: str = ""):
    """Yield a temporary path beside ``path``; on success it is renamed to ``path``, on any
    failure removed. ``suffix`` ends the temporary name (writers that pick a format by suffix,
    such as TVM's ``export_library``, need the real one)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.",
                               suffix=f"{TEMPORARY_MARK}{suffix}")
    os.close(fd)
    try:
        yield Path(tmp)
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
