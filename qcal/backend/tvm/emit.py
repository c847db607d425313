"""TVM backend, emission: a ``QGraph`` becomes a Relax module; targets, builds and the VM.

Pipeline position: realize -> **emit Relax** -> compile (LLVM CPU) -> run in the Relax VM.
``qcal.backend.tvm.compile`` drives it; the numpy interpreter ``qcal.reference.int_interpreter`` is
its reference, so every integer op here is emitted exactly as documented in the op table of
``qcal.ir.qgraph``.

TVM 0.27 traps handled here: ``relax.const`` always gets an explicit dtype
(an int64 array would silently become int32); targets are built from the dict form; runtime arrays
are ``tvm.runtime.tensor``.

Compilation: ``qcal.backend.tvm.schedules.build`` (the target and the CPU Relax pipeline are defined there:
int8 convs as int16 channel pairs, the CPU backend's legalization and fusion, qcal's s_tir
schedules, then the backend's lowering). ``tvm.compile``'s own "default" relax pipeline for CPU
skips fusion; fusing lets the requantize epilogue live in the conv's loop.
"""
from __future__ import annotations

import numpy as np
import tvm
from tvm import relax

from qcal.backend.tvm import schedules
from qcal.ir.qgraph import QGraph, QNode, clip_levels, int8_levels, rounding_of
from qcal.registry import Registry

# -- target and compile ------------------------------------------------------------------------

# The target and the compile pipeline are defined once, in ``qcal.backend.tvm.schedules``; these are the names
# the adapter's callers use.
host_target = schedules.cpu_target


def compile_executable(mod: tvm.IRModule, target=None, use_schedules: bool = True):
    """Compile a Relax module to a VM executable (``export_library`` writes it as a .so)."""
    target = host_target() if target is None else tvm.target.Target(target)
    return schedules.build(mod, target, schedule=use_schedules)


def vm_main(executable_or_library):
    """The callable ``main`` of a compiled executable or of a library loaded by ``load_library``."""
    return relax.VirtualMachine(executable_or_library, tvm.cpu())["main"]


def build(mod: tvm.IRModule, target=None, use_schedules: bool = True):
    """Compile a Relax module; returns a callable VM function ``main``."""
    return vm_main(compile_executable(mod, target, use_schedules))


def export_library(executable, path: str, workspace_dir=None):
    """Write a compiled executable as a shared library (links with the system C++ compiler);
    ``workspace_dir`` holds the intermediate object files (default: a folder TVM makes in the
    system's temporary directory)."""
    executable.export_library(str(path), workspace_dir=None if workspace_dir is None
                              else str(workspace_dir))


def load_library(path: str):
    return tvm.runtime.load_module(str(path))


def module_hash(mod: tvm.IRModule) -> str:
    """Structural hash of a module, constants' contents included (one changed weight changes
    it); stable across processes for modules without free variables, as emit_relax makes."""
    import tvm_ffi

    return f"{tvm_ffi.structural_hash(mod):016x}"


def run(main, x: np.ndarray):
    """Call a compiled ``main`` on one batch; returns numpy arrays (a list for tuple outputs)."""
    out = main(tvm.runtime.tensor(np.ascontiguousarray(x)))
    if hasattr(out, "numpy"):
        return out.numpy()
    return [o.numpy() for o in out]


# -- emission ------------------------------------------------------------------------------------

def const(a, dtype: str):
    return relax.const(np.asarray(a).astype(dtype), dtype)


def channel_const(a, rank: int, dtype: str):
    """A () or (C,) array as a constant broadcasting along axis 1."""
    a = np.asarray(a)
    if a.ndim:
        a = a.reshape((1, -1) + (1,) * (rank - 2))
    return const(a, dtype)


EMITTERS = Registry("Relax emitter for op")
emitter = EMITTERS.register


def _rank(node: QNode) -> int:
    return len(node.shape) + 1


@emitter("quantize")
def _quantize(node, x, batch):
    v = relax.op.round(relax.op.multiply(x, const(node.params["inv_scale"], "float32")))
    levels = float(int8_levels(node))
    return relax.op.astype(relax.op.clip(v, -levels, levels), "int8")


@emitter("dequantize")
def _dequantize(node, x, batch):
    return relax.op.multiply(relax.op.astype(x, "float32"),
                             channel_const(node.params["scale"], _rank(node), "float32"))


@emitter("requantize")
def _requantize(node, x, batch):
    p, rank, compute = node.params, _rank(node), node.attrs["compute"]
    v = relax.op.astype(x, compute)
    rshift = np.asarray(p["rshift"], dtype=np.int64)
    if node.attrs["kind"] == "shift":
        lshift = np.asarray(p["lshift"], dtype=np.int64)
        if np.any(lshift):
            v = relax.op.left_shift(v, channel_const(lshift, rank, compute))
        rnd = np.right_shift(np.left_shift(np.int64(1), rshift), 1)
    else:
        v = relax.op.multiply(v, channel_const(p["multiplier"], rank, compute))
        rnd = np.left_shift(np.int64(1), rshift - 1)
    if np.any(rshift):
        shift = channel_const(rshift, rank, compute)
        if rounding_of(node) == "nearest":  # ties to even: half - 1, plus the result's low bit
            shifts = (rshift > 0).astype(np.int64)
            odd = relax.op.bitwise_and(relax.op.right_shift(v, shift),
                                       channel_const(shifts, rank, compute))
            v = relax.op.add(relax.op.add(v, channel_const(rnd - shifts, rank, compute)), odd)
        else:
            v = relax.op.add(v, channel_const(rnd, rank, compute))
        v = relax.op.right_shift(v, shift)
    levels = clip_levels(node)
    if levels is not None:  # in the compute dtype, before the cast: int8, or a B-bit int32
        v = relax.op.minimum(relax.op.maximum(v, const(-levels, compute)), const(levels, compute))
    return relax.op.astype(v, node.dtype)


@emitter("qconv2d")
def _qconv2d(node, x, batch):
    a = node.attrs
    return relax.op.nn.conv2d(x, const(node.params["weight"], "int8"), a["strides"], a["padding"],
                              a["dilation"], a["groups"], out_dtype="int32")


@emitter("qdense")
def _qdense(node, x, batch):
    return relax.op.matmul(x, const(node.params["weight"].T, "int8"), out_dtype="int32")


@emitter("qchannel_mul")
def _qchannel_mul(node, x, batch):
    return relax.op.multiply(relax.op.astype(x, "int32"),
                             channel_const(node.params["multiplier"], _rank(node), "int32"))


@emitter("bias_add")
def _bias_add(node, x, batch):
    return relax.op.add(x, channel_const(node.params["bias"], _rank(node), "int32"))


@emitter("qclip")
def _qclip(node, x, batch):
    rank, dtype = _rank(node), node.dtype
    return relax.op.maximum(relax.op.minimum(x, channel_const(node.params["hi"], rank, dtype)),
                            channel_const(node.params["lo"], rank, dtype))


@emitter("relu")
def _relu(node, x, batch):
    if node.is_int:
        return relax.op.maximum(x, const(0, node.dtype))
    return relax.op.nn.relu(x)


@emitter("max_pool2d")
def _max_pool2d(node, x, batch):
    a = node.attrs
    return relax.op.nn.max_pool2d(x, a["pool_size"], a["strides"], a.get("padding", (0, 0, 0, 0)))


def _window_sums(node, x):
    """Integer window sums as a depthwise int32 conv with a ones kernel (zero padding)."""
    a = node.attrs
    channels = node.shape[0]
    ones = np.ones((channels, 1) + tuple(a["pool_size"]), dtype=np.int32)
    return relax.op.nn.conv2d(relax.op.astype(x, "int32"), const(ones, "int32"), a["strides"],
                              a["padding"], (1, 1), channels, out_dtype="int32")


@emitter("qsum_pool2d")
def _qsum_pool2d(node, x, batch):
    return _window_sums(node, x)


@emitter("qavg_pool2d")
def _qavg_pool2d(node, x, batch):
    counts = node.params["counts"].astype(np.int64)[None, None]
    sums = relax.op.astype(_window_sums(node, x), "int64")
    num = relax.op.add(relax.op.multiply(sums, const(2, "int64")), const(counts, "int64"))
    mean = relax.op.floor_divide(num, const(2 * counts, "int64"))
    if rounding_of(node) == "nearest":  # a tie (num divisible by 2n) made even
        tie = relax.op.astype(relax.op.equal(relax.op.floor_mod(num, const(2 * counts, "int64")),
                                             const(0, "int64")), "int64")
        mean = relax.op.subtract(mean, relax.op.multiply(
            tie, relax.op.bitwise_and(mean, const(1, "int64"))))
    return relax.op.astype(mean, "int32")


@emitter("qglobal_sum_pool2d")
def _qglobal_sum_pool2d(node, x, batch):
    return relax.op.sum(relax.op.astype(x, "int32"), axis=[2, 3], keepdims=True)


@emitter("flatten")
def _flatten(node, x, batch):
    return relax.op.reshape(x, (batch, int(np.prod(node.shape))))


@emitter("qadd", "add")
def _add(node, x, batch, y=None):
    return relax.op.add(x, y)


@emitter("conv2d")
def _conv2d(node, x, batch):
    a, p = node.attrs, node.params
    y = relax.op.nn.conv2d(x, const(p["weight"], "float32"), a.get("strides", (1, 1)),
                           a.get("padding", (0, 0, 0, 0)), a.get("dilation", (1, 1)),
                           a.get("groups", 1))
    return relax.op.add(y, channel_const(p["bias"], 4, "float32")) if "bias" in p else y


@emitter("dense")
def _dense(node, x, batch):
    p = node.params
    y = relax.op.matmul(x, const(p["weight"].T, "float32"))
    return relax.op.add(y, channel_const(p["bias"], 2, "float32")) if "bias" in p else y


@emitter("channel_affine")
def _channel_affine(node, x, batch):
    p = node.params
    return relax.op.add(relax.op.multiply(x, channel_const(p["scale"], 4, "float32")),
                        channel_const(p["shift"], 4, "float32"))


@emitter("clip")
def _clip(node, x, batch):
    lo, hi = (np.asarray(node.attrs[k], np.float32) for k in ("a_min", "a_max"))
    if lo.ndim == 0 and hi.ndim == 0:
        return relax.op.clip(x, float(lo), float(hi))
    rank = _rank(node)  # per-channel bounds (an equalized ReLU6)
    return relax.op.maximum(relax.op.minimum(x, channel_const(hi, rank, "float32")),
                            channel_const(lo, rank, "float32"))


@emitter("avg_pool2d")
def _avg_pool2d(node, x, batch):
    a = node.attrs
    return relax.op.nn.avg_pool2d(x, a["pool_size"], a["strides"], a.get("padding", (0, 0, 0, 0)),
                                  count_include_pad=bool(a.get("count_include_pad", True)))


@emitter("global_avg_pool2d")
def _global_avg_pool2d(node, x, batch):
    return relax.op.mean(x, axis=[2, 3], keepdims=True)


def emit_relax(qgraph: QGraph, batch: int, outputs=None) -> tvm.IRModule:
    """A Relax module ``main(x: float32[batch, C, H, W])`` for ``qgraph``. ``outputs`` (node names)
    makes ``main`` return those values as a tuple instead of the graph output (tests use it to
    compare intermediates; a single name returns that value alone)."""
    bb = relax.BlockBuilder()
    x = relax.Var("x", relax.TensorType((batch,) + tuple(qgraph.input.shape), "float32"))
    wanted = list(outputs) if outputs else [qgraph.output.name]
    with bb.function("main", [x]):
        with bb.dataflow():
            values = {qgraph.input.name: x}
            for node in qgraph.nodes[1:]:
                fn = EMITTERS.lookup(node.op, layer=node.name)
                args = [values[i] for i in node.inputs]
                expr = fn(node, args[0], batch, *args[1:])
                values[node.name] = bb.emit(expr, name_hint=_hint(node.name))
            if len(wanted) > 1:
                result = bb.emit_output(relax.Tuple([values[n] for n in wanted]))
            else:
                result = bb.emit_output(values[wanted[0]])
        bb.emit_func_output(result)
    return bb.get()


def _hint(name: str) -> str:
    return "".join(c if c.isalnum() or c == "_" else "_" for c in name)
