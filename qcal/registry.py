"""One registry helper for every extension point: op handlers, calibration methods, schedule rules.

A ``Registry`` maps names to handlers, filled by a decorator at import time. A failed lookup is a
``QcalError`` that names what was looked for and, where the caller says, the layer it was for, so
an op qcal cannot handle surfaces as "layer 'conv3': MXNet op 'Deconvolution' is not one qcal can
quantize", never a bare ``KeyError``. Registering the same name twice is a programming error.
"""
from __future__ import annotations

from typing import Callable, Iterator

from qcal.errors import QcalError


class Registry:
    def __init__(self, what: str, missing: str = "is not known"):
        self.what = what  # e.g. "MXNet op"
        self.missing = missing  # how a failed lookup ends: "is not one qcal can quantize"
        self._handlers: dict = {}

    def register(self, *names: str) -> Callable:
        """Decorator: register the function under each of ``names``."""
        def decorate(handler):
            for name in names:
                if name in self._handlers:
                    raise ValueError(f"{self.what} '{name}' is registered twice")
                self._handlers[name] = handler
            return handler
        return decorate

    def lookup(self, name: str, layer: str | None = None):
        try:
            return self._handlers[name]
        except KeyError:
            where = f"layer '{layer}': " if layer else ""
            raise QcalError(f"{where}{self.what} '{name}' {self.missing}") from None

    def get(self, name: str, default=None):
        return self._handlers.get(name, default)

    def __contains__(self, name) -> bool:
        return name in self._handlers

    def __iter__(self) -> Iterator[str]:
        return iter(self._handlers)

    def __len__(self) -> int:
        return len(self._handlers)

    def keys(self):
        return self._handlers.keys()

    def items(self):
        return self._handlers.items()
