"""Compile stage: a float ``Graph`` or an integer ``QGraph`` -> a batched CPU executable.

Pipeline position: realize -> **compile** -> evaluate. The Relax module is emitted for one fixed
batch size (static shapes let TVM plan memory and schedule); ``CompiledModel.run`` feeds any number
of images by padding the last partial batch with zeros and dropping the pad rows from the result,
so every image is computed exactly once and the pad never reaches the caller.

Compile cache: a compiled library is kept on disk (``$QCAL_CACHE_DIR``, else
``.qcal-cache/compiled``) under a key made of the emitted Relax module's structural hash (which
covers the constants' contents, so one changed weight is another module), the target, the batch
size (part of the module's shapes, and in the key explicitly), whether qcal's schedules are used,
and the versions of qcal and TVM with a digest of the code of this whole package (every module of
``qcal.backend.tvm``: a changed schedule must not be served from an old library), and the lanes
of ``vpdpbusd`` when ``$QCAL_VNNI_EMULATE`` emulates it (``qcal.backend.tvm.vnni``).
A hit loads the ``.so`` and skips ``tvm.compile`` altogether; files are written atomically
(a temporary file in the same folder, then ``os.replace``), so a crash or a concurrent compile never
leaves a half-written library under a real key. Each library is a checked file (``qcal.files``:
its key and sha256 in a record after the ELF payload) and is checked before it is loaded: a
damaged library is reported, removed and compiled again, never handed to the dynamic loader
(which maps a truncated library and dies of SIGBUS on the first missing page). The linker's
object files go to a scratch folder beside the library, named like qcal's temporaries, so a run
killed mid-compile leaves nothing there that a later run does not remove. The folder is kept
under ``$QCAL_CACHE_MAX_MB`` (default 4096): after each store the least recently used libraries
(a hit refreshes a file's modification time) are removed until it fits, the one just written
excepted.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import time
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from qcal import __version__
from qcal.errors import QcalError, UsageProblem
from qcal.files import DamagedFile, checked_path, discard_damaged, temporary_folder, verify_checked
from qcal.ir.graph import Graph
from qcal.ir.qgraph import QGraph
from qcal.quant.realize import qgraph_from_float

log = logging.getLogger("qcal.backend.tvm.compile")

CACHE_ENV = "QCAL_CACHE_DIR"
DEFAULT_CACHE_DIR = Path(".qcal-cache/compiled")
FROM_ENVIRONMENT = "from-environment"  # cache_dir default: $QCAL_CACHE_DIR, else DEFAULT_CACHE_DIR
SIZE_ENV = "QCAL_CACHE_MAX_MB"
DEFAULT_MAX_MB = 4096.0  # a ResNet-50 int8 library is ~47 MB
CHECK_KIND = "compiled library"


def resolve_cache_dir(cache_dir=FROM_ENVIRONMENT) -> Path | None:
    """The folder compiled libraries live in; None: no cache."""
    if cache_dir is None:
        return None
    if cache_dir == FROM_ENVIRONMENT:
        return Path(os.environ.get(CACHE_ENV) or DEFAULT_CACHE_DIR)
    return Path(cache_dir)


@lru_cache(maxsize=1)
def _lowering_code_digest() -> str:
    """A digest of every module of this package, the code that turns a QGraph into a library."""
    h = hashlib.sha256()
    for path in sorted(Path(__file__).parent.rglob("*.py")):
        h.update(path.name.encode() + path.read_bytes())
    return h.hexdigest()[:16]


def cache_key(mod_hash: str, target, batch_size: int, use_schedules: bool) -> str:
    from qcal.backend.tvm import emit as tvm_adapter
    from qcal.backend.tvm import vnni

    fields = {"module": mod_hash, "target": str(target), "batch_size": batch_size,
              "use_schedules": bool(use_schedules), "qcal": __version__,
              "tvm": tvm_adapter.tvm.__version__, "lowering_code": _lowering_code_digest()}
    if use_schedules and vnni.vnni_emulated(target):
        # $QCAL_VNNI_EMULATE: the same module and target compile to another library
        fields["vnni_emulated_lanes"] = vnni.vnni_lanes(target)
    return hashlib.sha256(json.dumps(fields, sort_keys=True).encode()).hexdigest()[:32]


@dataclass(frozen=True)
class BuildRecord:
    """How one module came to be runnable: compiled now (``cache_hit`` False) or loaded."""

    library: Path | None  # the cached .so (None without a cache)
    cache_hit: bool
    seconds: float


def _store(executable, path: Path, key: str):
    from qcal.backend.tvm import emit as tvm_adapter

    with temporary_folder(path) as workspace, checked_path(path, CHECK_KIND, key, ".so") as tmp:
        tvm_adapter.export_library(executable, str(tmp), workspace_dir=workspace)


def _load(path: Path, key: str):
    """The VM ``main`` of a cached library, or None (a damaged one is reported and removed)."""
    from qcal.backend.tvm import emit as tvm_adapter

    try:
        verify_checked(path, CHECK_KIND, key)  # before the dynamic loader ever maps it
        return tvm_adapter.vm_main(tvm_adapter.load_library(path))
    except FileNotFoundError:  # evicted by a concurrent process
        return None
    except DamagedFile as exc:
        discard_damaged(exc, "recompiling")
    except Exception as exc:  # checked, yet TVM refuses it: rebuilt, never trusted
        discard_damaged(DamagedFile(path, "TVM cannot load it (" + (
            str(exc).splitlines()[0] if str(exc) else type(exc).__name__) + ")"), "recompiling")
    return None


def cache_limit_bytes() -> float:
    value = os.environ.get(SIZE_ENV)
    try:
        return float(value) * 2 ** 20 if value else DEFAULT_MAX_MB * 2 ** 20
    except ValueError:
        raise UsageProblem(f"{SIZE_ENV} must be a number of megabytes, not {value!r}") from None


def evict(folder: Path, keep: Path):
    """Remove the least recently used libraries until the folder fits the size limit."""
    limit = cache_limit_bytes()
    entries = []
    for p in folder.glob("*.so"):
        if p.name.startswith(".") or p == keep:
            continue  # temporary files of a compile in progress; the library just written
        try:
            st = p.stat()
        except FileNotFoundError:  # removed by a concurrent process
            continue
        entries.append((st.st_mtime, st.st_size, p))
    total = sum(size for _, size, _ in entries) + keep.stat().st_size
    for _, size, p in sorted(entries):
        if total <= limit:
            break
        p.unlink(missing_ok=True)
        total -= size


def build_cached(mod, name: str, target, batch_size: int, use_schedules: bool,
                 cache_dir=FROM_ENVIRONMENT):
    """(VM ``main``, BuildRecord) for a Relax module: loaded from the cache when its key is
    there, else compiled (and stored when there is a cache)."""
    from qcal.backend.tvm import emit as tvm_adapter

    start = time.perf_counter()
    folder = resolve_cache_dir(cache_dir)
    path = None
    if folder is not None:
        key = cache_key(tvm_adapter.module_hash(mod), target, batch_size, use_schedules)
        safe = "".join(c if c.isalnum() or c in "-_" else "_" for c in name)[:60]
        path = folder / f"{safe}-b{batch_size}-{key}.so"
        main = _load(path, key) if path.is_file() else None
        if main is not None:
            os.utime(path)  # recently used: evicted last
            return main, BuildRecord(path, True, time.perf_counter() - start)
    executable = tvm_adapter.compile_executable(mod, target, use_schedules)
    if path is not None:
        try:
            _store(executable, path, key)
            evict(folder, keep=path)
        except Exception as exc:  # the cache only saves time: compiling still succeeded
            log.warning("compile cache: cannot write %s (%s)", path, exc)
            path = None
    return tvm_adapter.vm_main(executable), BuildRecord(path, False, time.perf_counter() - start)


@dataclass
class CompiledModel:
    qgraph: QGraph
    batch_size: int
    _main: object  # the compiled Relax VM function, float32 output
    _main_int: object = None  # same graph without the final dequantize (built on demand)
    _target: object = None
    _use_schedules: bool = True
    _cache_dir: object = FROM_ENVIRONMENT
    build: BuildRecord | None = None  # how ``run``'s library was obtained

    @property
    def input_shape(self) -> tuple:
        return tuple(self.qgraph.input.shape)

    def _batches(self, x: np.ndarray):
        x = np.asarray(x, dtype=np.float32)
        if x.ndim != 4 or tuple(x.shape[1:]) != self.input_shape:
            raise QcalError(f"model '{self.qgraph.name}' expects images of shape "
                            f"{self.input_shape}, got a batch of shape {tuple(x.shape[1:])}")
        for start in range(0, len(x), self.batch_size):
            chunk = x[start:start + self.batch_size]
            rows = len(chunk)
            if rows < self.batch_size:
                pad = np.zeros((self.batch_size - rows,) + chunk.shape[1:], dtype=np.float32)
                chunk = np.concatenate([chunk, pad])
            yield chunk, rows

    def _run_with(self, main, x):
        from qcal.backend.tvm import emit as tvm_adapter

        outs = [tvm_adapter.run(main, chunk)[:rows] for chunk, rows in self._batches(x)]
        return np.concatenate(outs) if outs else np.zeros((0,))

    def run(self, x: np.ndarray) -> np.ndarray:
        """Logits (float32; dequantized for an integer model) for a float32 NCHW batch."""
        return self._run_with(self._main, x)

    def run_int(self, x: np.ndarray) -> np.ndarray:
        """The integer output before the final dequantize (integer models only)."""
        out = self.qgraph.output
        if out.op != "dequantize":
            raise QcalError(f"model '{self.qgraph.name}' has a float output; use run()")
        if self._main_int is None:
            from qcal.backend.tvm import emit as tvm_adapter

            mod = tvm_adapter.emit_relax(self.qgraph, self.batch_size, outputs=[out.inputs[0]])
            self._main_int, _ = build_cached(mod, f"{self.qgraph.name}-int", self._target,
                                             self.batch_size, self._use_schedules,
                                             self._cache_dir)
        return self._run_with(self._main_int, x)

    def run_probe(self, x: np.ndarray, names) -> dict:
        """{name: value} of the nodes ``names`` on a float32 NCHW batch, from the same graph
        compiled (target, schedules, cache as ``run``'s) for ``len(x)`` images to return those
        nodes' values: how ``qcal.eval.verify`` finds the first layer that differs."""
        from qcal.backend.tvm import emit as tvm_adapter

        x = np.ascontiguousarray(x, dtype=np.float32)
        names = list(names)
        mod = tvm_adapter.emit_relax(self.qgraph, len(x), outputs=names + names[:1] * (
            len(names) == 1))  # two names at least: main then always returns a tuple
        main, _ = build_cached(mod, f"{self.qgraph.name}-probe", self._target, len(x),
                               self._use_schedules, self._cache_dir)
        return dict(zip(names, tvm_adapter.run(main, x)))


def compile_model(model: Graph | QGraph, batch_size: int, target=None,
                  use_schedules: bool = True, cache_dir=FROM_ENVIRONMENT) -> CompiledModel:
    """Emit ``model`` as Relax for ``batch_size`` images and compile it for the host CPU.

    ``cache_dir``: folder of the compile cache (default ``$QCAL_CACHE_DIR``, else
    ``.qcal-cache/compiled``); None compiles without reading or writing a cache.
    """
    from qcal.backend.tvm import emit as tvm_adapter

    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageProblem(f"batch size must be a positive integer, not {batch_size!r}")
    qgraph = qgraph_from_float(model) if isinstance(model, Graph) else model
    target = tvm_adapter.host_target() if target is None else tvm_adapter.tvm.target.Target(target)
    main, record = build_cached(tvm_adapter.emit_relax(qgraph, batch_size), qgraph.name, target,
                                batch_size, use_schedules, cache_dir)
    log.info("%s: %s in %.2f s", qgraph.name,
             f"compile cache hit {record.library.name}" if record.cache_hit else "compiled",
             record.seconds)
    return CompiledModel(qgraph, batch_size, main, None, target, use_schedules, cache_dir, record)
