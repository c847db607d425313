"""Compile stage: a float ``Graph`` or an integer ``QGraph`` -> a batched CPU executable.

Pipeline position: realize -> **compile** -> evaluate. The Relax module is emitted for one fixed
batch size (static shapes let TVM plan memory and schedule); ``CompiledModel.run`` feeds any number
of images by padding the last partial batch with zeros and dropping the pad rows from the result,
so every image is computed exactly once and the pad never reaches the caller.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .errors import QcalError, UsageProblem
from .graph import Graph
from .realize import QGraph, qgraph_from_float


@dataclass
class CompiledModel:
    qgraph: QGraph
    batch_size: int
    _main: object  # the compiled Relax VM function, float32 output
    _main_int: object = None  # same graph without the final dequantize (built on demand)
    _target: object = None
    _use_schedules: bool = True

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
        from . import tvm_adapter

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
            from . import tvm_adapter

            mod = tvm_adapter.emit_relax(self.qgraph, self.batch_size, outputs=[out.inputs[0]])
            self._main_int = tvm_adapter.build(mod, self._target, self._use_schedules)
        return self._run_with(self._main_int, x)


def compile_model(model: Graph | QGraph, batch_size: int, target=None,
                  use_schedules: bool = True) -> CompiledModel:
    """Emit ``model`` as Relax for ``batch_size`` images and compile it for the host CPU."""
    from . import tvm_adapter

    if not isinstance(batch_size, int) or batch_size < 1:
        raise UsageProblem(f"batch size must be a positive integer, not {batch_size!r}")
    qgraph = qgraph_from_float(model) if isinstance(model, Graph) else model
    target = tvm_adapter.host_target() if target is None else tvm_adapter.tvm.target.Target(target)
    main = tvm_adapter.build(tvm_adapter.emit_relax(qgraph, batch_size), target, use_schedules)
    return CompiledModel(qgraph, batch_size, main, None, target, use_schedules)
