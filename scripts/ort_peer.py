#!/usr/bin/env python
"""ONNX Runtime as a speed peer of ``scripts/bench.py``: fp32 and int8 in a process of its own.

ONNX Runtime's quantizer needs a newer ``onnx`` than MXNet's exporter (``onnx<=1.15``), so it
lives in its own virtual environment (``make ort-venv``: pins in ``requirements-ort.txt``) and
this file runs twice over:

  * in that environment, ``python scripts/ort_peer.py --serve`` is the worker: it reads one JSON
    command a line on stdin and answers one JSON line on stdout. It imports only numpy, onnx and
    onnxruntime (never qcal, which needs TVM and MXNet);
  * in qcal's environment, ``bench.py`` imports ``OrtPeers`` from it, which starts the worker with
    ``--ort-python PATH`` and hands out one runner per ONNX Runtime model, timed in bench.py's
    alternating rounds next to qcal's and MXNet's runners.

Weights listed as graph inputs too (mxnet's exporter does that) are made plain initializers
first, so that ONNX Runtime may fold them. The int8 model is ONNX Runtime's own static
quantization as its documentation describes it:
``quant_pre_process`` (ONNX shape inference and graph optimization), then ``quantize_static`` in
the QDQ format, per-channel signed int8 weights, unsigned int8 activations, MinMax ranges over
the same calibration images qcal's statistics pass reads. Both sessions take every graph
optimization (``ORT_ENABLE_ALL``) and ``--threads`` intra-op threads, one inter-op thread.

The worker times its own loops (``time``: N calls on one input, ``perf_counter`` around them), so
no pipe or copy is in a timed figure; inputs and outputs travel as ``.npy`` files (a format both
numpy versions read the same).
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

RUNNERS = ("ort_fp32", "ort_int8")


# --- the worker (ONNX Runtime's environment) ------------------------------------------------------

class _CalibrationImages:
    """ONNX Runtime's data-reader protocol (``get_next``) over an (N, C, H, W) array."""

    def __init__(self, input_name: str, images, batch: int):
        self.batches = iter([{input_name: images[i:i + batch]}
                             for i in range(0, len(images), batch)])

    def get_next(self):
        return next(self.batches, None)


def _session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _constant_weights(path: Path, work: Path) -> Path:
    """The model with no initializer among its graph inputs. mxnet's exporter lists every weight
    as an input too, and ONNX Runtime then treats the weights as overridable: no constant folding,
    no BatchNorm fused into the conv (it warns "appears in graph inputs")."""
    import onnx

    model = onnx.load(str(path))
    weights = {i.name for i in model.graph.initializer}
    inputs = [i for i in model.graph.input if i.name not in weights]
    if len(inputs) == len(model.graph.input):
        return path
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    fixed = work / f"{path.stem}.constant-weights.onnx"
    onnx.save(model, str(fixed))
    return fixed


def _load(command: dict) -> tuple:
    """(sessions by runner name, the reply): the fp32 session and the int8 model quantized here."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    work = Path(command["work"])
    threads = int(command["threads"])
    model = _constant_weights(Path(command["model"]), work)
    fp32 = _session(model, threads)
    input_name = fp32.get_inputs()[0].name
    images = np.load(command["calib"]).astype(np.float32)
    start = time.perf_counter()
    prepared = work / f"{model.stem}.pre.onnx"
    # symbolic shape inference needs sympy, which the pinned environment leaves out: the graphs
    # bench.py hands over have fixed shapes apart from the batch, which ONNX's own inference keeps
    quant_pre_process(str(model), str(prepared), skip_symbolic_shape=True)
    quantized = work / f"{model.stem}.int8.onnx"
    quantize_static(str(prepared), str(quantized), _CalibrationImages(input_name, images, 16),
                    quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8,
                    calibrate_method=CalibrationMethod.MinMax)
    quantize_s = time.perf_counter() - start
    sessions = {"ort_fp32": (fp32, input_name), "ort_int8": (_session(quantized, threads), input_name)}
    reply = {"quantize_s": quantize_s, "onnxruntime": ort.__version__, "onnx": onnx.__version__,
             "numpy": np.__version__, "int8_model": str(quantized)}
    return sessions, reply


def serve(requests, replies):
    import numpy as np

    sessions, inputs = {}, {}
    for line in requests:
        command = json.loads(line)
        try:
            op = command["op"]
            if op == "quit":
                return
            if op == "load":
                sessions, reply = _load(command)
            else:
                session, input_name = sessions[command["runner"]]
                path = command["input"]
                if path not in inputs:
                    inputs.clear()
                    inputs[path] = {input_name: np.load(path).astype(np.float32)}
                feed = inputs[path]
                if op == "time":
                    start = time.perf_counter()
                    for _ in range(int(command["calls"])):
                        session.run(None, feed)
                    reply = {"seconds": time.perf_counter() - start}
                elif op == "run":
                    np.save(command["output"], session.run(None, feed)[0])
                    reply = {"output": command["output"]}
                else:
                    reply = {"error": f"unknown op {op!r}"}
        except Exception as exc:  # the parent reports it; the worker keeps serving
            reply = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}"}
        replies.write(json.dumps(reply) + "\n")
        replies.flush()


# --- the client (qcal's environment) --------------------------------------------------------------

class OrtPeerError(RuntimeError):
    pass


class OrtPeers:
    """The worker process for one ONNX model: ``runners()`` gives ``{"ort_fp32", "ort_int8"}``."""

    def __init__(self, ort_python: str, model: Path, calibration_images, threads: int, work: Path):
        import numpy as np

        self.work = Path(work)
        self.work.mkdir(parents=True, exist_ok=True)
        calib = self.work / "calibration.npy"
        np.save(calib, np.ascontiguousarray(calibration_images, dtype=np.float32))
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        env.pop("PYTHONPATH", None)  # qcal's environment must not leak into ONNX Runtime's
        self.process = subprocess.Popen([ort_python, str(Path(__file__).resolve()), "--serve"],
                                        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True,
                                        env=env)
        self._inputs = 0
        self._last = (None, None)  # (array given, its file)
        self.info = self.ask({"op": "load", "model": str(model), "calib": str(calib),
                              "threads": threads, "work": str(self.work)})

    def ask(self, command: dict) -> dict:
        try:
            self.process.stdin.write(json.dumps(command) + "\n")
            self.process.stdin.flush()
            line = self.process.stdout.readline()
        except BrokenPipeError:
            line = ""
        if not line:
            raise OrtPeerError(f"the ONNX Runtime worker exited (code {self.process.poll()})")
        reply = json.loads(line)
        if "error" in reply:
            raise OrtPeerError(f"ONNX Runtime worker: {reply['error']}")
        return reply

    def input_file(self, x) -> str:
        import numpy as np

        if self._last[0] is not x:
            self._inputs += 1
            path = self.work / f"input-{self._inputs}.npy"
            np.save(path, np.ascontiguousarray(x, dtype=np.float32))
            self._last = (x, str(path))
        return self._last[1]

    def runners(self) -> dict:
        return {name: _RemoteRunner(self, name) for name in RUNNERS}

    def close(self):
        if self.process.poll() is None:
            try:
                self.ask({"op": "quit"})
            except OrtPeerError:
                pass
            self.process.wait(timeout=30)


class _RemoteRunner:
    """Called like qcal's runners (numpy batch in, logits out); ``timed_calls`` is the worker's
    own time of N calls, which bench.py's rounds use instead of timing calls across the pipe."""

    def __init__(self, peers: OrtPeers, name: str):
        self.peers, self.name = peers, name

    def __call__(self, x):
        import numpy as np

        out = self.peers.work / f"{self.name}-out.npy"
        self.peers.ask({"op": "run", "runner": self.name, "input": self.peers.input_file(x),
                        "output": str(out)})
        return np.load(out)

    def timed_calls(self, x, calls: int) -> float:
        return self.peers.ask({"op": "time", "runner": self.name, "calls": calls,
                               "input": self.peers.input_file(x)})["seconds"]


def export_gluon_onnx(net, input_shape: tuple, prefix: Path) -> Path:
    """A Gluon network as ONNX with a dynamic batch (``mxnet.onnx.export_model``), checked to
    compute what the network computes."""
    import mxnet as mx
    import numpy as np
    from mxnet import onnx as mx_onnx

    net.hybridize()
    x = mx.nd.array(np.random.RandomState(1).randn(2, *input_shape).astype(np.float32))
    net(x)
    mx.nd.waitall()
    net.export(str(prefix))  # PREFIX-symbol.json + PREFIX-0000.params
    path = Path(f"{prefix}.onnx")
    mx_onnx.export_model(f"{prefix}-symbol.json", f"{prefix}-0000.params",
                         in_shapes=[(1, *input_shape)], in_types=[np.float32],
                         onnx_file_path=str(path), dynamic=True,
                         dynamic_input_shapes=[(None, *input_shape)])
    return path


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    if argv != ["--serve"]:
        raise SystemExit("usage: ort_peer.py --serve  (bench.py --ort-python PATH starts it)")
    # stdout is the reply channel: anything a library prints goes to stderr instead
    replies = os.fdopen(os.dup(sys.stdout.fileno()), "w")
    os.dup2(sys.stderr.fileno(), sys.stdout.fileno())
    serve(sys.stdin, replies)


if __name__ == "__main__":
    main()
