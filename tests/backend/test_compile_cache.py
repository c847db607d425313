"""The on-disk compile cache: a repeated compile loads the stored library instead of compiling.

"Compiled or not" is counted, not timed: ``tvm.compile`` is wrapped (the real function still runs)
and every call is counted. Outputs are compared bit for bit.
"""
from __future__ import annotations

import copy

import numpy as np
import pytest

from qcal.backend.tvm import compile as qcompile
from qcal.backend.tvm.compile import compile_model
from qcal.errors import UsageProblem
from tests.fixtures import OPTION_SETS, GraphMaker, classifier_head, images, realized

tvm_adapter = pytest.importorskip("qcal.backend.tvm.emit")

BATCH = 2
SHAPE = (3, 8, 8)


def small_net():
    """conv-relu, a residual conv pair, global pool, dense: few PrimFuncs, so quick compiles."""
    g = GraphMaker(SHAPE, 0, "cache_net")
    x = g.relu(g.conv("data", 8))
    x = g.relu(g.add(g.conv(x, 8), x))
    return classifier_head(g, x, 10)


@pytest.fixture(scope="module")
def qgraph():
    return realized(small_net(), OPTION_SETS["power2-b16"], images(8, SHAPE, seed=1))


@pytest.fixture(scope="module")
def x():
    return images(3, SHAPE, seed=2)  # 3 images at batch 2: the padded last batch is exercised


@pytest.fixture
def compiles(monkeypatch):
    """Counts real ``tvm.compile`` calls made through the adapter."""
    calls = []
    real = tvm_adapter.tvm.compile

    def counting_compile(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)

    monkeypatch.setattr(tvm_adapter.tvm, "compile", counting_compile)
    return calls


def _libraries(folder):
    return sorted(p.name for p in folder.glob("*.so") if not p.name.startswith("."))


def test_second_compile_is_a_cache_hit_with_identical_output(qgraph, x, compiles, tmp_path,
                                                             monkeypatch):
    folder = tmp_path / "compiled"
    monkeypatch.setenv(qcompile.CACHE_ENV, str(folder))  # the default cache_dir reads it
    cold = compile_model(qgraph, BATCH)
    assert len(compiles) == 1 and not cold.build.cache_hit
    assert _libraries(folder) == [cold.build.library.name]

    warm = compile_model(qgraph, BATCH)
    assert len(compiles) == 1, "the second compile of the same qgraph called tvm.compile"
    assert warm.build.cache_hit and warm.build.library == cold.build.library
    cold_out, warm_out = cold.run(x), warm.run(x)
    assert cold_out.dtype == np.float32 and cold_out.shape == (3, 10)
    assert np.array_equal(cold_out, warm_out)
    assert np.array_equal(cold.run_int(x), warm.run_int(x))  # run_int's module is cached too
    assert len(compiles) == 2
    assert len(_libraries(folder)) == 2
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temporary files left


def test_one_changed_weight_misses(qgraph, compiles, tmp_path):
    compile_model(qgraph, BATCH, cache_dir=tmp_path)
    changed = copy.deepcopy(qgraph)
    conv = next(n for n in changed.nodes if n.op == "qconv2d")
    w = conv.params["weight"]
    w.flat[0] = w.flat[0] - 1 if w.flat[0] > -127 else w.flat[0] + 1
    other = compile_model(changed, BATCH, cache_dir=tmp_path)
    assert len(compiles) == 2 and not other.build.cache_hit
    assert len(_libraries(tmp_path)) == 2


def test_another_batch_size_misses(qgraph, x, compiles, tmp_path):
    two = compile_model(qgraph, BATCH, cache_dir=tmp_path)
    three = compile_model(qgraph, 3, cache_dir=tmp_path)
    assert len(compiles) == 2 and not three.build.cache_hit
    assert len(_libraries(tmp_path)) == 2
    assert np.array_equal(two.run(x), three.run(x))


def test_no_cache_dir_compiles_every_time_and_writes_nothing(qgraph, compiles, tmp_path,
                                                             monkeypatch):
    monkeypatch.chdir(tmp_path)  # the default folder would be under the working directory
    monkeypatch.delenv(qcompile.CACHE_ENV, raising=False)
    model = compile_model(qgraph, BATCH, cache_dir=None)
    assert len(compiles) == 1 and model.build.library is None and not model.build.cache_hit
    assert not list(tmp_path.iterdir())


def test_a_damaged_library_is_rebuilt(qgraph, x, compiles, tmp_path):
    good = compile_model(qgraph, BATCH, cache_dir=tmp_path)
    expected = good.run(x)
    good.build.library.write_bytes(b"not a shared library")
    rebuilt = compile_model(qgraph, BATCH, cache_dir=tmp_path)
    assert len(compiles) == 2 and not rebuilt.build.cache_hit
    assert np.array_equal(rebuilt.run(x), expected)
    again = compile_model(qgraph, BATCH, cache_dir=tmp_path)
    assert len(compiles) == 2 and again.build.cache_hit


def test_key_names_target_schedules_and_batch():
    target = tvm_adapter.host_target()
    base = qcompile.cache_key("00ff", target, 4, True)
    assert base == qcompile.cache_key("00ff", target, 4, True)
    assert len({base, qcompile.cache_key("00fe", target, 4, True),
                qcompile.cache_key("00ff", target, 8, True),
                qcompile.cache_key("00ff", target, 4, False),
                qcompile.cache_key("00ff", tvm_adapter.tvm.target.Target("llvm"), 4, True)}) == 5


def test_key_names_emulated_vnni(monkeypatch):
    """$QCAL_VNNI_EMULATE compiles an AVX2 target's convs to another library (emulated
    vpdpbusd): another key, per lane count; a VNNI target, or no schedules, compiles the same."""
    from qcal.backend.tvm import vnni

    targets = {cpu: tvm_adapter.tvm.target.Target({"kind": "llvm", "mcpu": cpu})
               for cpu in ("haswell", "icelake-server")}
    monkeypatch.delenv(vnni.EMULATE_ENV, raising=False)
    real = {(cpu, s): qcompile.cache_key("00ff", t, 4, s) for cpu, t in targets.items()
            for s in (True, False)}
    keys = {}
    for lanes in ("16", "8"):
        monkeypatch.setenv(vnni.EMULATE_ENV, lanes)
        keys[lanes] = qcompile.cache_key("00ff", targets["haswell"], 4, True)
        assert qcompile.cache_key("00ff", targets["haswell"], 4, False) == real["haswell", False]
        assert qcompile.cache_key("00ff", targets["icelake-server"], 4, True) == real[
            "icelake-server", True]
    assert len({keys["16"], keys["8"], real["haswell", True]}) == 3


def test_module_hash_covers_constant_contents(qgraph):
    mod = tvm_adapter.emit_relax(qgraph, BATCH)
    assert tvm_adapter.module_hash(mod) == tvm_adapter.module_hash(
        tvm_adapter.emit_relax(copy.deepcopy(qgraph), BATCH))
    changed = copy.deepcopy(qgraph)
    node = next(n for n in changed.nodes if n.op == "bias_add")
    node.params["bias"] = node.params["bias"].copy()
    node.params["bias"].flat[0] += 1
    assert tvm_adapter.module_hash(tvm_adapter.emit_relax(changed, BATCH)) != \
        tvm_adapter.module_hash(mod)


def test_cache_dir_resolution(monkeypatch, tmp_path):
    monkeypatch.delenv(qcompile.CACHE_ENV, raising=False)
    assert qcompile.resolve_cache_dir() == qcompile.DEFAULT_CACHE_DIR
    monkeypatch.setenv(qcompile.CACHE_ENV, str(tmp_path))
    assert qcompile.resolve_cache_dir() == tmp_path
    assert qcompile.resolve_cache_dir(tmp_path / "x") == tmp_path / "x"
    assert qcompile.resolve_cache_dir(None) is None


def test_least_recently_used_libraries_are_evicted(qgraph, compiles, tmp_path, monkeypatch):
    first = compile_model(qgraph, BATCH, cache_dir=tmp_path)
    size_mb = first.build.library.stat().st_size / 2 ** 20
    monkeypatch.setenv(qcompile.SIZE_ENV, str(size_mb * 1.5))  # room for one library only
    second = compile_model(qgraph, 3, cache_dir=tmp_path)
    assert _libraries(tmp_path) == [second.build.library.name]
    assert not compile_model(qgraph, BATCH, cache_dir=tmp_path).build.cache_hit
    assert len(compiles) == 3
    monkeypatch.setenv(qcompile.SIZE_ENV, "lots")
    with pytest.raises(UsageProblem, match=qcompile.SIZE_ENV):
        qcompile.cache_limit_bytes()


KEEP_COMPILING = """\
import sys
from qcal.backend.tvm.compile import compile_model
from tests.backend.test_compile_cache import small_net
from tests.fixtures import OPTION_SETS, images, realized

qgraph = realized(small_net(), OPTION_SETS["power2-b16"], images(8, (3, 8, 8), seed=1))
for batch in range(1, 40):  # one compile after another: the kill lands in one of them
    compile_model(qgraph, batch, cache_dir=sys.argv[1])
"""


def _temporaries(folder):
    return sorted(p.name for p in folder.iterdir() if qcompile_temporary(p.name))


def qcompile_temporary(name):
    from qcal.files import TEMPORARY_MARK

    return name.startswith(".") and TEMPORARY_MARK in name


@pytest.mark.slow
def test_a_run_killed_mid_compile_leaves_nothing_a_later_run_does_not_remove(qgraph, x, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from qcal.files import verify_checked

    folder = tmp_path / "compiled"
    folder.mkdir()
    proc = subprocess.Popen([sys.executable, "-c", KEEP_COMPILING, str(folder)],
                            env={**os.environ, "PYTHONPATH": os.getcwd()}, start_new_session=True,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 300
    while not _temporaries(folder):  # a library being written (and its linker's scratch folder)
        assert proc.poll() is None, proc.stdout.read()
        assert time.monotonic() < deadline
        time.sleep(0.002)
    os.killpg(proc.pid, signal.SIGKILL)  # the run and its linker, as a killed job dies
    proc.wait()
    left = _temporaries(folder)
    assert left and all(f".qcal-{proc.pid}-" in name for name in left), left
    for library in folder.glob("[!.]*.so"):  # what was renamed into place is whole
        verify_checked(library, qcompile.CHECK_KIND)

    model = compile_model(qgraph, BATCH, cache_dir=folder)  # a later run in another process
    assert _temporaries(folder) == []
    assert np.array_equal(model.run(x), compile_model(qgraph, BATCH, cache_dir=None).run(x))
