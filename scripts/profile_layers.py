#!/usr/bin/env python
"""Per-layer time of a compiled int8 model: which kernel each PrimFunc got, and GOP/s per conv.

    python scripts/profile_layers.py                         # resnet50_v1, batch 16
    python scripts/profile_layers.py --model resnet18_v1 --batch 16 --no-vnni
    python scripts/profile_layers.py --model weights/efficientnet-lite0/efficientnet_lite0.onnx

A Gluon zoo model gets random weights (seeded; speed does not depend on them), a model with
weights of its own (an ONNX file, the embedded models) keeps them; both get default
``QuantOptions`` ranges from a statistics pass over 4 random images. The int8 module is compiled
with qcal's schedules for the host target (``--no-vnni``: the same target with VNNI switched off,
``qcal.backend.tvm.vnni.without_vnni``). TVM 0.27's Relax VM has no profiler, so every PrimFunc
of the compiled library is called alone on zero-filled buffers of its parameter shapes (speed
does not depend on the values), best of ``--repeat`` calls after a warm-up, times the number of
calls ``main`` makes to it; the whole forward is timed too (it is slower than the sum: alone,
a kernel finds its inputs in cache). Each row is one PrimFunc: the schedule rule that produced
it, its calls, total time, the share of the sum and, for convs written for VNNI or int16 pairs,
GOP/s (2 ops a multiply-accumulate, counted on the channels as the kernel pads them: in channels
to 4 and out channels to whole vectors of v for VNNI (the 24- and 40-channel projections count
32 and 48), 2 for pairs; only the 3-channel stem and those projections differ). The last line
prints the VNNI peak of this CPU as TIR sees it (``scripts/bench_ops.py --peak``) in the same run,
to read the rates against.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
os.environ.setdefault("TVM_BIND_THREADS", "0")


def best_time(fn, repeat: int) -> float:
    fn()
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def conv_macs(func, name: str) -> int | None:
    """Multiply-accumulates of a VNNI or pair conv PrimFunc ``name``, from its buffer shapes (the
    VNNI conv reads (N, C/v, H, W, q) quads and writes channel-blocked (N, O/v, OH, OW, v) int32;
    the shortcut-fused one counts both of its convs, whatever epilogue FuseOps added)."""
    params = list(func.params)
    if len(params) < 3:
        return None
    data, weight = params[0], params[1]
    shape = [int(d) for d in weight.shape]
    if len(shape) != 5 or len(data.shape) not in (4, 5):
        return None
    out = [int(d) for d in params[-1].shape]
    f, cq, kh, kw, lanes = shape
    if str(weight.dtype) == "int32":  # vnni: (O/v, C/4, kh, kw, v) int32, 4 channels a lane
        channels, outs = 4 * cq, f * lanes
    elif str(weight.dtype) == "int16":  # pairs: (O/v, C/2, kh, kw, 2v) int16
        channels, outs = 2 * cq, f * lanes // 2
    else:
        return None
    if len(out) == 5:  # channel-blocked output
        out = [out[0], out[1] * out[4], out[2], out[3]]
    if len(out) != 4 or out[1] != outs:
        return None
    macs = out[0] * outs * out[2] * out[3] * channels * kh * kw
    if "conv2d_vnni_shortcut" in name:  # (x, w, init, xs, ws, ...): the projection conv too
        _, cs, khs, kws, _ = (int(d) for d in params[4].shape)
        macs += out[0] * outs * out[2] * out[3] * 4 * cs * khs * kws
    return macs


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="resnet50_v1")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--no-vnni", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--repeat", type=int, default=3, help="timed calls (the best counts)")
    args = p.parse_args(argv)

    import mxnet as mx
    import numpy as np

    from qcal.backend.tvm import emit, schedules, vnni
    from qcal.calib.collect import collect_statistics
    from qcal.calib.result import CalibrationResult
    from qcal.config import QuantOptions
    from qcal.families import resolve_model
    from qcal.quant import quantize
    from scripts.bench_ops import vnni_peak_gops

    tvm, relax = emit.tvm, emit.relax
    model = resolve_model(args.model)
    if model.weights_file() is None:  # a Gluon zoo network: random weights
        mx.random.seed(args.seed)
        net = model.build_network()
        net.initialize(mx.init.Xavier(magnitude=2.0))
        model = model.use_network(net)
    shape = model.input_shape(model.preprocessing())
    graph = model.import_graph(shape)
    rng = np.random.RandomState(args.seed)
    images = rng.randn(4, *shape).astype(np.float32)
    stats = collect_statistics(graph, [images], progress=False, source=model.tensor_source(graph))
    options = QuantOptions()
    qgraph = quantize(graph, CalibrationResult.from_statistics(stats, options).ranges, options)

    target = schedules.cpu_target()
    target = vnni.without_vnni(target) if args.no_vnni else target
    mod = emit.emit_relax(qgraph, args.batch)
    lowered = schedules.lower(mod, target)
    rules = schedules.scheduled_functions(lowered)
    funcs = {gv.name_hint: f for gv, f in lowered.functions.items()
             if isinstance(f, tvm.tirx.PrimFunc)}
    executable = schedules.build(mod, target)
    main_text = lowered["main"].script()
    rows = {}
    for name, func in funcs.items():
        calls = main_text.count(name + "(")
        if not calls:
            continue
        kernel = executable.mod.get_function(name, query_imports=True)
        buffers = [tvm.runtime.tensor(np.zeros([int(d) for d in b.shape], str(b.dtype)))
                   for b in func.params]
        rows[name] = (calls, 1e6 * best_time(lambda: kernel(*buffers), args.repeat) * calls)
    vm = relax.VirtualMachine(executable, tvm.cpu())["main"]
    x = tvm.runtime.tensor(rng.randn(args.batch, *shape).astype(np.float32))
    whole = best_time(lambda: vm(x), args.repeat)
    forward = sum(total for _, total in rows.values())
    print(f"{args.model} batch {args.batch}, target {target}: the whole forward "
          f"{whole * 1e3:.1f} ms ({args.batch / whole:.1f} images/s), the sum of its PrimFuncs "
          f"each timed alone {forward / 1e3:.1f} ms")
    print(f"{'PrimFunc':<58} {'rule':<22} {'calls':>5} {'ms':>8} {'share':>6} {'GOP/s':>7}")
    for name, (count, total) in sorted(rows.items(), key=lambda kv: -kv[1][1]):
        macs = conv_macs(funcs[name], name)
        rate = f"{2 * macs * count / total / 1e3:>7.1f}" if macs else f"{'-':>7}"
        print(f"{name[:58]:<58} {rules.get(name, '(unscheduled)'):<22} {count:>5} "
              f"{total / 1e3:>8.2f} {total / forward:>6.1%} {rate}")
    if vnni.vnni_lanes(schedules.cpu_target()):
        print(f"VNNI peak (register-only vpdpbusd loop, same run): {vnni_peak_gops():.1f} GOP/s")


if __name__ == "__main__":
    main()
