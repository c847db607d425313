"""Gluon models' tensor source for the statistics pass: MXNet's own executor, every tensor an output.

``MXNetInternals`` binds a Gluon network's symbol with every tensor of the graph as an extra output
(``Symbol.get_internals``), so the statistics come from the same oneDNN float32 forward that qcal's
float32 accuracy comes from, at about its speed. The importer records which symbol output holds
each graph tensor's value (``Graph.source_tensors``: a folded conv's value is its BatchNorm's
output). The forward runs asynchronously on MXNet's engine thread while this thread copies out and
histograms the tensors already computed, so on two cores that work hides behind the forward.
Batches run in slices of at most ``MAX_EXECUTOR_BATCH`` images, which bounds the memory the
outputs hold. It has the interface of ``qcal.calib.sources`` (``run(batch, observe)``).

It agrees with the numpy ``GraphInterpreter`` to float32 rounding (the folded conv + bias against
conv then BatchNorm); the tests bound the difference on the embedded models.
"""
from __future__ import annotations

import ctypes
import os
from contextlib import contextmanager

import numpy as np

from qcal.calib.sources import GraphInterpreter
from qcal.errors import QcalError

# ops whose output is the same multiset of values as their input: a tensor the source framework
# does not materialise (the flatten qcal's importer puts before a Dense) reads its input's values
VALUE_PRESERVING_OPS = frozenset({"flatten"})

# images one MXNet forward takes: the executor keeps every tensor of its batch alive (ResNet-50:
# 1.6 GB at 16 images), so larger batches are run in slices of this size
MAX_EXECUTOR_BATCH = 16


class MXNetInternals:
    """MXNet's executor for ``net`` with the graph's tensors as outputs."""

    def __init__(self, graph, net):
        import mxnet as mx

        self.graph = graph
        self.description = f"MXNet {mx.__version__} executor (symbol internals)"
        symbol = net(mx.sym.var(graph.input.name))
        internals = symbol.get_internals()
        available = set(internals.list_outputs())
        self.plan = []  # (symbol output or None for the image batch, [graph tensors])
        outputs = []
        for node in graph.nodes:
            if node.op == "input":
                self.plan.append((None, [node.name]))
                continue
            source = graph.source_tensors.get(node.name)
            if source is None and node.op in VALUE_PRESERVING_OPS:
                for entry in self.plan:  # same values as its input: observed with it
                    if node.inputs[0] in entry[1]:
                        entry[1].append(node.name)
                        break
                continue
            if source not in available:
                raise QcalError(f"model '{graph.name}': tensor '{node.name}' has no MXNet "
                                f"symbol output ({source or 'none recorded'})")
            self.plan.append((len(outputs), [node.name]))
            outputs.append(internals[source])
        self.symbol = mx.sym.Group(outputs)
        params = {name: p.data() for name, p in net.collect_params().items()}
        self.arg_params = {k: params[k] for k in self.symbol.list_arguments() if k in params}
        self.aux_params = {k: params[k] for k in self.symbol.list_auxiliary_states()}
        missing = [k for k in self.symbol.list_arguments()
                   if k not in params and k != graph.input.name]
        missing += [k for k in self.symbol.list_auxiliary_states() if k not in params]
        if missing:
            raise QcalError(f"model '{graph.name}': parameters {', '.join(missing[:3])} are "
                            f"not in the network")
        self._executors = {}
        self._buffer = np.empty(0, np.float32)

    def _executor(self, shape):
        if shape not in self._executors:
            import mxnet as mx

            # MXNet's default oneDNN subgraph pass would fuse conv+BatchNorm+ReLU and so drop
            # outputs asked for here (and refuse the bind); fusion is off for this executor only
            with _environment(MXNET_SUBGRAPH_BACKEND="NONE", MXNET_EXEC_BULK_EXEC_INFERENCE="0"):
                executor = self.symbol.simple_bind(mx.cpu(), grad_req="null",
                                                   **{self.graph.input.name: shape})
            executor.copy_params_from(self.arg_params, self.aux_params)
            self._executors[shape] = executor
        return self._executors[shape]

    def run(self, batch: np.ndarray, observe):
        batch = np.ascontiguousarray(batch, dtype=np.float32)
        expected = tuple(self.graph.input.attrs["shape"])
        if batch.ndim != 4 or tuple(batch.shape[1:]) != expected:
            raise QcalError(f"model '{self.graph.name}' takes N x "
                            f"{' x '.join(map(str, expected))} images, got an array of shape "
                            f"{batch.shape}")
        for start in range(0, len(batch), MAX_EXECUTOR_BATCH):
            self._run_slice(batch[start:start + MAX_EXECUTOR_BATCH], observe)

    def _run_slice(self, batch: np.ndarray, observe):
        executor = self._executor(batch.shape)
        # returns at once: the forward runs on MXNet's engine thread while this one reads the
        # outputs in order, each copy waiting only for its own tensor
        executor.forward(is_train=False, **{self.graph.input.name: batch})
        for index, names in self.plan:
            values = batch if index is None else self._read(executor.outputs[index])
            for name in names:
                observe(name, values)

    def _read(self, array) -> np.ndarray:
        """``array.asnumpy()`` into one reused buffer (no fresh allocation, hence no page faults,
        per tensor: the tensors of a ResNet-50 batch of 16 are 1.5 GB).

        The copy runs on this thread, not MXNet's engine, on purpose: oneDNN keeps conv outputs
        in blocked layouts (nChw16c) and the copy reorders them (about 2 ns an element). Making
        the engine do it (a reshape output, read in place) measured slower: at one MXNet thread
        the engine is the busy side and this thread the idle one (resnet18_v1 1.21-1.31x the
        forward against 1.03-1.06x this way)."""
        from mxnet.base import _LIB, check_call

        if array.dtype != np.float32:
            raise QcalError(f"model '{self.graph.name}': MXNet produced {array.dtype} values; "
                            f"calibration reads float32")
        size = int(np.prod(array.shape))
        if self._buffer.size < size:
            self._buffer = np.empty(size, np.float32)
        out = self._buffer[:size].reshape(array.shape)
        check_call(_LIB.MXNDArraySyncCopyToCPU(array.handle, out.ctypes.data_as(ctypes.c_void_p),
                                               ctypes.c_size_t(size)))
        return out


@contextmanager
def _environment(**values):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def tensor_source(graph, net=None):
    """MXNet's executor for a Gluon network whose graph records its symbol outputs; the numpy
    interpreter otherwise (ONNX models, or a graph built by hand)."""
    if net is not None and graph.source_tensors:
        return MXNetInternals(graph, net)
    return GraphInterpreter(graph)
