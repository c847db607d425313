"""Argument types of qcal's command line, and the one boundary where qcal's errors become click's.

Domain errors become one line and an exit code (click's convention: 2 for a bad invocation, 1 for a
runtime failure); no traceback reaches the user.
"""
from __future__ import annotations

import functools

import click

from qcal.errors import QcalError, UsageProblem


def translate_errors(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        try:
            return func(*args, **kwargs)
        except UsageProblem as exc:
            raise click.UsageError(str(exc)) from None
        except QcalError as exc:
            raise click.ClickException(str(exc)) from None
        except OSError as exc:  # a file qcal was asked to read or write: name it, no traceback
            where = exc.filename or ""
            raise click.ClickException(f"{where}: {exc.strerror or exc}") from None
    return wrapper


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
