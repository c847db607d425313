#!/usr/bin/env python
"""Per-op CPU speed of qcal's schedules against TVM 0.27's unscheduled default lowering.

    python scripts/bench_ops.py                      # all ops, batch 1 and 16
    python scripts/bench_ops.py --batch 1 --repeat 5 --ops notes_3x3,r50_stem_7x7 --no-mxnet

Each op is a small Relax module of the shape the TVM adapter emits (int8 x int8 -> int32 conv or
dense, then the requantize epilogue: + bias, rounding right shift in int64, clip, cast int8),
compiled four times: with the host-CPU LLVM target through the CPU pipeline without
``ApplyCpuSchedules`` ("default"), with it ("s_tir"), with the int8 conv rewrite in front of it
(what ``qcal.backend.tvm.schedules.build`` does by default: "vnni", the u8 x s8 ``vpdpbusd``
kernel, when the CPU has AVX-512 VNNI or AVX-VNNI), and with the same target with VNNI switched
off ("pairs", the int16-pair ``vpmaddwd`` kernel). Rates count 2 ops per multiply-accumulate of
the conv/dense only; "GOP/s" is the fastest column's, "vnni GOP/s" the vnni column's. Every
scheduled output is checked bit-exact against
the default one on every row (with ``--dtype float32``: allclose, and the epilogue is + bias, ReLU).
MXNet 1.9.1 float32 (oneDNN) on the same shape is the reference column (GFLOP/s), when MXNet
imports.

Times are the minimum over --repeat runs after one warm-up run; the machine is shared, so read
ratios, not absolutes, and rerun when a row looks off.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import tvm  # noqa: E402
from tvm import relax  # noqa: E402

from qcal.backend.tvm import schedules, vnni  # noqa: E402


@dataclass(frozen=True)
class ConvCase:
    """NCHW conv: input (C, H, W) per image, out channels, kernel, stride, pad, groups."""

    chw: tuple
    out_channels: int
    kernel: int
    stride: int
    pad: int
    groups: int = 1

    def macs(self, batch):
        c, h, w = self.chw
        oh = (h + 2 * self.pad - self.kernel) // self.stride + 1
        ow = (w + 2 * self.pad - self.kernel) // self.stride + 1
        return batch * self.out_channels * oh * ow * (c // self.groups) * self.kernel ** 2

    def weight_shape(self):
        return (self.out_channels, self.chw[0] // self.groups, self.kernel, self.kernel)


@dataclass(frozen=True)
class DenseCase:
    in_features: int
    out_features: int

    def macs(self, batch):
        return batch * self.in_features * self.out_features


CASES = {
    "notes_3x3": ConvCase((64, 56, 56), 64, 3, 1, 1),            # a ResNet stage-1 3x3 conv
    "r50_1x1_256to64": ConvCase((256, 56, 56), 64, 1, 1, 0),     # ResNet-50 stage 1 reduce
    "r50_1x1_64to256": ConvCase((64, 56, 56), 256, 1, 1, 0),     # ResNet-50 stage 1 expand
    "r50_3x3_14": ConvCase((256, 14, 14), 256, 3, 1, 1),         # ResNet-50 stage 3 3x3
    "r50_1x1_7_512to2048": ConvCase((512, 7, 7), 2048, 1, 1, 0),  # ResNet-50 stage 4 expand
    "r50_3x3_s2": ConvCase((128, 56, 56), 128, 3, 2, 1),         # ResNet-50 stage 2 entry (v1b)
    "r50_stem_7x7": ConvCase((3, 224, 224), 64, 7, 2, 3),        # ResNet stem
    "mbv2_dw_3x3": ConvCase((96, 56, 56), 96, 3, 1, 1, 96),      # MobileNet-style depthwise
    "mbv2_dw_3x3_s2": ConvCase((96, 112, 112), 96, 3, 2, 1, 96),  # strided depthwise
    # EfficientNet-Lite0's heaviest int8 layers at 224 (profile_layers.py): depthwise 3x3 / 5x5,
    # plain and strided, and the 1x1 projections to 24 and 40 channels (not a multiple of 16)
    "lite0_dw_3x3_112": ConvCase((32, 112, 112), 32, 3, 1, 1, 32),
    "lite0_dw_3x3_s2": ConvCase((96, 112, 112), 96, 3, 2, 1, 96),
    "lite0_dw_5x5_28": ConvCase((240, 28, 28), 240, 5, 1, 2, 240),
    "lite0_dw_5x5_s2": ConvCase((144, 56, 56), 144, 5, 2, 2, 144),
    "lite0_dw_5x5_7": ConvCase((1152, 7, 7), 1152, 5, 1, 2, 1152),
    "lite0_dw_5x5_14": ConvCase((672, 14, 14), 672, 5, 1, 2, 672),
    "lite0_1x1_144to24": ConvCase((144, 56, 56), 24, 1, 1, 0),
    "lite0_1x1_240to40": ConvCase((240, 28, 28), 40, 1, 1, 0),
    "r50_fc": DenseCase(2048, 1000),                             # ResNet-50 classifier
}


def _const(array):
    return relax.const(array, str(array.dtype))


def _requantize(bb, acc, channels, rng, axis_shape):
    bias = rng.integers(-5000, 5000, axis_shape).astype("int32")
    shift = np.full(axis_shape, 9, "int64")
    y = bb.emit(relax.op.add(acc, _const(bias)))
    y = bb.emit(relax.op.astype(y, "int64"))
    y = bb.emit(relax.op.add(y, _const(np.left_shift(1, shift - 1))))
    y = bb.emit(relax.op.right_shift(y, _const(shift)))
    y = bb.emit(relax.op.clip(y, -128, 127))
    return bb.emit(relax.op.astype(y, "int8"))


def build_module(case, batch, rng, dtype="int8"):
    bb = relax.BlockBuilder()
    if isinstance(case, ConvCase):
        shape = (batch, *case.chw)
        weight = rng.integers(-128, 128, case.weight_shape()).astype(dtype)
    else:
        shape = (batch, case.in_features)
        weight = rng.integers(-128, 128, (case.in_features, case.out_features)).astype(dtype)
    x = relax.Var("x", relax.TensorType(shape, dtype))
    acc_dtype = "int32" if dtype == "int8" else dtype
    with bb.function("main", [x]):
        with bb.dataflow():
            if isinstance(case, ConvCase):
                acc = bb.emit(relax.op.nn.conv2d(
                    x, _const(weight), strides=case.stride, padding=case.pad, groups=case.groups,
                    out_dtype=acc_dtype))
                axis_shape = (1, case.out_channels, 1, 1)
            else:
                acc = bb.emit(relax.op.matmul(x, _const(weight), out_dtype=acc_dtype))
                axis_shape = (case.out_features,)
            if dtype == "int8":
                out = _requantize(bb, acc, axis_shape[1 if len(axis_shape) > 1 else 0], rng,
                                  axis_shape)
            else:  # the float path: conv + bias + ReLU
                bias = rng.standard_normal(axis_shape).astype(dtype)
                out = bb.emit(relax.op.nn.relu(bb.emit(relax.op.add(acc, _const(bias)))))
            out = bb.emit_output(out)
        bb.emit_func_output(out)
    return bb.get(), shape, weight


def time_module(mod, target, x, repeat, schedule, pair_convs=True):
    t0 = time.perf_counter()
    ex = schedules.build(mod, target, schedule=schedule, pair_convs=pair_convs)
    compile_s = time.perf_counter() - t0
    vm = relax.VirtualMachine(ex, tvm.cpu())
    xt = tvm.runtime.tensor(x)
    out = vm["main"](xt).numpy()  # warm-up
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        vm["main"](xt)
        times.append(time.perf_counter() - t0)
    return out, min(times), compile_s


def vnni_peak_gops(iterations: int = 1 << 21, chains: int = 16, repeat: int = 5) -> float:
    """GOP/s of a register-only loop of AVX-512 ``vpdpbusd`` (``chains`` independent
    accumulators, operands loop-invariant): the VNNI peak of this core as qcal's TIR reaches it,
    2 ops a multiply-accumulate. Needs AVX-512 VNNI."""
    from tvm.script import tirx as T

    n_iter, n_chains = T.int32(iterations), T.int32(chains)
    vpdpbusd = "llvm.x86.avx512.vpdpbusd.512"

    @T.prim_func(s_tir=True)
    def vnni_peak(a: T.Buffer((4,), "int32"), w: T.Buffer((16,), "int32"),  # noqa: F821
                  out: T.Buffer((chains, 16), "int32")):  # noqa: F821
        T.func_attr({"tirx.noalias": True, "global_symbol": "vnni_peak"})
        acc = T.sblock_alloc_buffer((chains, 16), "int32", scope="local")
        for k in T.unroll(n_chains):
            with T.sblock("init"):
                vk = T.axis.remap("S", [k])
                acc[vk, T.ramp(0, 1, 16)] = T.broadcast(T.int32(0), 16)
        for i in T.serial(n_iter):
            for k in T.unroll(n_chains):
                with T.sblock("dot"):
                    vi, vk = T.axis.remap("RS", [i, k])
                    acc[vk, T.ramp(0, 1, 16)] = T.call_llvm_pure_intrin(
                        "int32x16", T.llvm_lookup_intrinsic_id(vpdpbusd), acc[vk, T.ramp(0, 1, 16)],
                        T.reinterpret("int8x64", T.broadcast(a[vk % 4], 16)),
                        T.reinterpret("int8x64", w[T.ramp(0, 1, 16)]))
        for k in T.unroll(n_chains):
            with T.sblock("store"):
                vk = T.axis.remap("S", [k])
                out[vk, T.ramp(0, 1, 16)] = acc[vk, T.ramp(0, 1, 16)]

    lib = tvm.compile(tvm.IRModule({"vnni_peak": vnni_peak}), schedules.cpu_target())
    args = [tvm.runtime.tensor(np.ones(4, "int32")), tvm.runtime.tensor(np.ones(16, "int32")),
            tvm.runtime.tensor(np.zeros((chains, 16), "int32"))]
    lib["vnni_peak"](*args)
    if int(args[2].numpy()[0, 0]) != iterations:  # one 1 x 1 byte product a step
        raise RuntimeError("vnni_peak computed a wrong sum")
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        lib["vnni_peak"](*args)
        times.append(time.perf_counter() - t0)
    return 2 * 64 * iterations * chains / min(times) / 1e9


def time_mxnet(case, batch, weight, repeat):
    """MXNet float32 (oneDNN) on the same shape; None if MXNet is unavailable."""
    try:
        import mxnet as mx
    except Exception:  # noqa: BLE001 -- the reference column is optional
        return None
    rng = np.random.default_rng(0)
    if isinstance(case, ConvCase):
        x = mx.nd.array(rng.standard_normal((batch, *case.chw)).astype("float32"))
        w = mx.nd.array(weight.astype("float32"))
        k = case.kernel

        def run():
            return mx.nd.Convolution(x, w, kernel=(k, k), stride=(case.stride,) * 2,
                                     pad=(case.pad,) * 2, num_filter=case.out_channels,
                                     num_group=case.groups, no_bias=True)
    else:
        x = mx.nd.array(rng.standard_normal((batch, case.in_features)).astype("float32"))
        w = mx.nd.array(weight.T.astype("float32"))

        def run():
            return mx.nd.FullyConnected(x, w, num_hidden=case.out_features, no_bias=True)
    run().wait_to_read()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        run().wait_to_read()
        times.append(time.perf_counter() - t0)
    return min(times)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16])
    parser.add_argument("--ops", default=",".join(CASES),
                        help="comma-separated subset of: " + ", ".join(CASES))
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per measurement")
    parser.add_argument("--no-default", action="store_true",
                        help="skip the slow unscheduled baseline (no exactness check then)")
    parser.add_argument("--no-mxnet", action="store_true", help="skip the MXNet float32 column")
    parser.add_argument("--peak", action="store_true",
                        help="also print the VNNI peak (register-only vpdpbusd loop) before "
                             "and after the table, and each row's vnni GOP/s against it")
    parser.add_argument("--dtype", choices=["int8", "float32"], default="int8",
                        help="int8 (qcal's integer path, bit-exact check) or float32 (TVM float path)")
    args = parser.parse_args(argv)
    names = [n.strip() for n in args.ops.split(",") if n.strip()]
    unknown = [n for n in names if n not in CASES]
    if unknown:
        parser.error(f"unknown op(s) {', '.join(unknown)}; choose from {', '.join(CASES)}")

    target = schedules.cpu_target()
    print(f"target: {target}  (vector width {schedules.vector_bits(target)} bits, "
          f"pmaddwd lanes {schedules.pair_lanes(target)}, "
          f"vpdpbusd lanes {vnni.vnni_lanes(target)})")
    print("default = unscheduled; s_tir = ApplyCpuSchedules only; pairs = the int16-pair conv "
          "rewrite + schedules (target without VNNI); vnni = qcal's build default for this target")
    header = (f"{'op':<19} {'batch':>5} {'default ms':>10} {'s_tir ms':>9} {'pairs ms':>9} "
              f"{'vnni ms':>8} {'GOP/s':>6} {'vnni GOP/s':>10} {'speedup':>7} {'exact':>5} "
              f"{'mxnet fp32 ms':>13} {'GFLOP/s':>7} {'vs mxnet':>8} {'compile s':>9}")
    peaks = [vnni_peak_gops()] if args.peak and vnni.vnni_lanes(target) == 16 else []
    if peaks:
        print(f"VNNI peak before: {peaks[0]:.1f} GOP/s (register-only vpdpbusd loop)")
    print(header)
    print("-" * len(header))
    for name in names:
        case = CASES[name]
        for batch in args.batch:
            rng = np.random.default_rng(0)
            mod, shape, weight = build_module(case, batch, rng, args.dtype)
            x = rng.integers(-128, 128, shape).astype(args.dtype)
            gop = 2 * case.macs(batch) / 1e9
            out_s, t_stir, _ = time_module(mod, target, x, args.repeat, True, pair_convs=False)
            no_vnni = vnni.without_vnni(target)
            out_p, t_pairs, _ = time_module(mod, no_vnni, x, args.repeat, True)
            out_v, t_vnni, compile_s = time_module(mod, target, x, args.repeat, True)
            best = min(t_stir, t_pairs, t_vnni)
            t_def, exact = None, "-"
            if not args.no_default:
                ref, t_def, _ = time_module(mod, target, x, 1, schedule=False)
                if args.dtype == "int8":
                    same = all(np.array_equal(o, ref) for o in (out_s, out_p, out_v))
                else:
                    same = all(np.allclose(o, ref, rtol=1e-4, atol=1e-2)
                               for o in (out_s, out_p, out_v))
                exact = "yes" if same else "NO"
            t_mx = None if args.no_mxnet else time_mxnet(case, batch, weight, args.repeat)
            mx_cols = (f"{t_mx * 1e3:>13.2f} {gop / t_mx:>7.1f} {t_mx / best:>7.2f}x"
                       if t_mx else f"{'-':>13} {'-':>7} {'-':>8}")
            def_col = f"{'-':>10}" if t_def is None else f"{t_def * 1e3:>10.2f}"
            speedup = f"{'-':>7}" if t_def is None else f"{t_def / best:>6.1f}x"
            print(f"{name:<19} {batch:>5} {def_col} {t_stir * 1e3:>9.2f} {t_pairs * 1e3:>9.2f} "
                  f"{t_vnni * 1e3:>8.2f} {gop / best:>6.1f} {gop / t_vnni:>10.1f} {speedup} "
                  f"{exact:>5} {mx_cols} {compile_s:>9.2f}"
                  + (f" {gop / t_vnni / peaks[0]:>7.0%} of peak" if peaks else ""), flush=True)
    if peaks:
        print(f"VNNI peak after: {vnni_peak_gops():.1f} GOP/s (rows use the one before)")


if __name__ == "__main__":
    main()
