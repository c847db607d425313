"""The layout's rules, checked on the source: who may import TVM and the drivers, where model
kinds are told apart, how long a module may grow.

    stages (ir, families, data, importer, calib, quant, reference, eval, report, backend)
        ^ imported by
    drivers (session, sweep, sweep_config)  <-  cli (one module per command)
"""
from __future__ import annotations

import ast

import pytest

from qcal.files import REPO_ROOT

PACKAGE = REPO_ROOT / "qcal"
MODULES = sorted(PACKAGE.rglob("*.py"))
MAX_LINES = 400


def _dotted(path):
    return ".".join(path.relative_to(REPO_ROOT).with_suffix("").parts)


def _imports(path):
    """Every module ``path`` imports, at any depth (lazy imports inside functions included)."""
    tree = ast.parse(path.read_text())
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            yield from (alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against the module's package
                base = _dotted(path).split(".")[:-node.level]
                yield ".".join(base + ([node.module] if node.module else []))
            else:
                yield node.module


def _rel(path):
    return str(path.relative_to(REPO_ROOT))


def test_only_the_tvm_backend_imports_tvm():
    offenders = [f"{_rel(p)} imports {m}" for p in MODULES for m in _imports(p)
                 if (m == "tvm" or m.startswith("tvm.")) and "qcal/backend/tvm/" not in _rel(p)]
    assert not offenders


def test_no_stage_imports_a_driver():
    stage_modules = [p for p in MODULES
                     if p.parent != PACKAGE and p.parent.name not in ("drivers", "cli")]
    offenders = [f"{_rel(p)} imports {m}" for p in stage_modules for m in _imports(p)
                 if m.startswith(("qcal.drivers", "qcal.cli"))]
    assert not offenders


MODEL_KIND_WORDS = (".onnx", "onnx", "fashion-mnist", "imagenet-zoo", "-symbol.json", ".params")


def _is_kind_word(node):
    return isinstance(node, ast.Constant) and node.value in MODEL_KIND_WORDS


def test_kinds_of_model_are_told_apart_only_in_families():
    """Outside ``qcal.families`` code asks its model, never tests a family name or a suffix."""
    offenders = []
    for path in MODULES:
        if "qcal/families/" in _rel(path):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Attribute) and node.attr == "family":
                offenders.append(f"{_rel(path)}:{node.lineno} reads .family")
            compared = isinstance(node, ast.Compare) and any(
                _is_kind_word(n) for n in [node.left, *node.comparators])
            suffix_test = (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                           and node.func.attr in ("endswith", "startswith")
                           and any(_is_kind_word(a) for a in node.args))
            if compared or suffix_test:
                offenders.append(f"{_rel(path)}:{node.lineno} tests a kind of model")
    assert not offenders


@pytest.mark.parametrize("path", MODULES, ids=_rel)
def test_long_modules_say_why(path):
    lines = path.read_text().splitlines()
    if len(lines) <= MAX_LINES:
        return
    doc = ast.get_docstring(ast.parse(path.read_text())) or ""
    assert "Length:" in doc, f"{_rel(path)} has {len(lines)} lines and no 'Length:' reason"
