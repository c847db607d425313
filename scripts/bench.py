#!/usr/bin/env python
"""qcal's speed on this machine, one run, same inputs: int8 through TVM against MXNet float32.

    python scripts/bench.py                          # everything (about 6 minutes here)
    python scripts/bench.py --quick                  # resnet18_v1 and the embedded models
    python scripts/bench.py --models resnet50_v1 --batches 16 --json results/bench.json

Per model, in this order, on one set of random inputs (seeded):
  * the statistics pass (``qcal.calib.collect.collect_statistics``: every tensor's abs-max, min/max,
    zero count and 8192-bin |x| histogram) as qcal runs it for these Gluon models (MXNet's
    executor with the graph's tensors as outputs, ``qcal.calib.sources.MXNetInternals``)
    against a plain MXNet float32 forward over the same images (hybridized, static_alloc:
    qcal's float32 reference runner); and, for ONNX models' path, the same pass on the numpy
    interpreter against the interpreter's plain forward (``qcal.reference.float_interpreter.run_float``);
  * the int8 variant (default ``QuantOptions``) realized from those statistics;
  * per batch size: the cold compile (empty compile cache: emit, compile, export the library) and
    the warm one (a cache hit: load the library), then images/s of the compiled int8 model against
    MXNet float32, both called the way qcal's evaluation calls them (numpy batch in, numpy logits
    out), timed in alternating rounds so that a load change on this shared machine hits all of
    them; the median round counts. On a CPU with VNNI the int8 model is also compiled for the
    same target with VNNI switched off (``qcal.backend.tvm.vnni.without_vnni``: the int16-pair
    conv kernel, qcal's int8 before VNNI) and timed in the same rounds (``--no-kernel-compare``
    skips it);
  * MXNet's own int8 in the same rounds (``mxnet.contrib.quantization.quantize_net``, calib_mode
    naive over the statistics images, oneDNN), on a second copy of the network built with the
    same seed (quantize_net re-hybridizes the network it is given); ``--no-mxnet-int8`` skips it;
  * peak resident memory of the process after each phase (``ru_maxrss``);
  * last, the peak resident memory of a real EfficientNet-Lite0 sweep (``scripts/sweep_memory.py``:
    260x260, float32 + ``--sweep-variants`` int8 variants, per variant; floor 4 GB).
ImageNet models (resnet18_v1, resnet50_v1 at 224x224) have random weights (qcal refuses to
evaluate random weights, but speed does not depend on them); the embedded Fashion-MNIST models use
their shipped weights and are skipped, with a note, when those are not there yet.

Every model runs in a child process (this script with ``--child``): peak memory is then per model,
and the thread count (``--threads``, for MXNet's OpenMP and TVM's pool alike) is set before MXNet
and TVM load. Its default is what both pick by themselves on x86: half the logical CPUs (1 on
this machine, although lscpu shows 2 cores with 1 thread each). On a loaded machine 2 OpenMP
threads can be far slower than 1 (a barrier waits for a descheduled thread): fmnist_resnet20_v1
b16 in MXNet went from 21 ms to 700 ms a call at load average 8.
Timing never includes making the inputs; the performance floors (docs/benchmarks.md) are checked at the end.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

IMAGENET_MODELS = ("resnet18_v1", "resnet50_v1")
# ONNX models benchmarked from their file (no MXNet peer; ONNX Runtime's with --ort-python)
ONNX_MODELS = {"efficientnet-lite0": REPO / "weights" / "efficientnet-lite0" / "efficientnet_lite0.onnx"}
EMBEDDED_MODELS = ("fmnist_resnet20_v1", "fmnist_resnet56_v2", "fmnist_vgg11_bn")

# the performance floors (docs/benchmarks.md): (what, model, batch)
FLOOR_INT8_RATIO = 1.0  # int8 images/s over MXNet fp32 images/s, resnet50_v1 at batch 16
FLOOR_STATS_RATIO = 1.5  # statistics pass time over the float forward time
FLOOR_COLD_S = 30.0  # resnet50_v1 compile, empty cache
FLOOR_WARM_S = 1.0  # resnet50_v1 compile, cache hit
FLOOR_MODEL = "resnet50_v1"
FLOOR_LITE0_MODEL = "efficientnet-lite0"  # qcal int8 / ONNX Runtime int8 at batch 16 >= 1.0x
FLOOR_SWEEP_PEAK_MB = 4096.0  # the Lite0 sweep's peak resident memory (scripts/sweep_memory.py)
FLOOR_PEER_RATIO = 1.0  # qcal int8 images/s over the fastest int8 peer's, every model and batch
FLOOR_THREAD_SCALING = 1.8  # qcal int8 images/s at 2 threads over the same at 1 thread


# --- the child: one model ----------------------------------------------------------------------

def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def best_of(fn, min_seconds: float, max_repeats: int = 5) -> float:
    """Minimum time of ``fn()``; repeated while the total stays under ``min_seconds``."""
    times = []
    while not times or (sum(times) < min_seconds and len(times) < max_repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def alternating_rates(runners: dict, x, rounds: int, round_seconds: float) -> dict:
    """Images/s of each runner on batch ``x``: after warm-up, ``rounds`` rounds, each timing every
    runner for about ``round_seconds``; the median round of each counts."""
    calls = {}
    for name, run in runners.items():
        run(x)  # warm-up: first-call allocations, thread pools
        calls[name] = max(1, round(round_seconds / max(timed_calls(run, x, 1), 1e-6)))
    per_call = {name: [] for name in runners}
    for _ in range(rounds):
        for name, run in runners.items():
            per_call[name].append(timed_calls(run, x, calls[name]) / calls[name])
    return {name: {"images_per_s": len(x) / statistics.median(times),
                   "best_images_per_s": len(x) / min(times), "calls_per_round": calls[name]}
            for name, times in per_call.items()}


def timed_calls(run, x, calls: int) -> float:
    """Seconds of ``calls`` calls of ``run(x)``; a runner in another process (ONNX Runtime's,
    ``scripts/ort_peer.py``) times its own loop, so the pipe is never in the figure."""
    own_timer = getattr(run, "timed_calls", None)
    if own_timer is not None:
        return own_timer(x, calls)
    start = time.perf_counter()
    for _ in range(calls):
        run(x)
    return time.perf_counter() - start


def load_net(name: str, seed: int):
    import mxnet as mx

    from qcal.families import resolve_model

    model = resolve_model(name)
    if model.weights_file() is not None:  # shipped weights
        return model
    mx.random.seed(seed)
    net = model.build_network()
    net.initialize(mx.init.Xavier(magnitude=2.0))
    return model.use_network(net)


def mxnet_int8_runner(name: str, seed: int, images):
    """MXNet 1.9.1's own int8 network (``quantize_net``, naive min/max over ``images``, oneDNN),
    called like the float runner: numpy batch in, numpy logits out."""
    import mxnet as mx
    from mxnet.contrib.quantization import quantize_net

    net = load_net(name, seed).net
    net.hybridize()
    calib = mx.io.NDArrayIter(data=mx.nd.array(images), batch_size=min(16, len(images)))
    qnet = quantize_net(net, quantized_dtype="auto", calib_mode="naive", calib_data=calib,
                        num_calib_examples=len(images), ctx=mx.cpu())
    qnet.hybridize(static_alloc=True, static_shape=True)
    return lambda batch: qnet(mx.nd.array(batch, dtype="float32")).asnumpy()


def bench_model(args) -> dict:
    import numpy as np

    from qcal.backend.tvm import emit as tvm_adapter
    from qcal.backend.tvm import vnni
    from qcal.backend.tvm.compile import compile_model
    from qcal.backend.tvm.emit import tvm
    from qcal.calib.collect import collect_statistics
    from qcal.calib.result import CalibrationResult
    from qcal.calib.sources import GraphInterpreter
    from qcal.config import QuantOptions
    from qcal.families.gluon import MXNetFloatRunner
    from qcal.quant import quantize
    from qcal.reference.float_interpreter import run_float

    out = {"model": args.model, "threads": {"tvm": tvm.get_global_func("runtime.NumThreads")(),
                                            "omp_env": os.environ.get("OMP_NUM_THREADS")}}
    model = load_net(args.model, args.seed)
    net, spec = model.net, model.spec
    start = time.perf_counter()
    graph = model.import_graph(spec.input_shape)
    out["import_s"] = time.perf_counter() - start
    mxnet = MXNetFloatRunner(net)  # hybridize(static_alloc=True)
    out["rss_mb"] = {"import": peak_rss_mb()}

    rng = np.random.RandomState(args.seed)
    images = rng.randn(args.stat_images, *spec.input_shape).astype(np.float32)
    batches = [images[i:i + args.stat_batch] for i in range(0, len(images), args.stat_batch)]
    mxnet(batches[0])  # warm-up (graph build, static allocation)
    run_float(graph, batches[0][:1])
    log(f"{args.model}: float forwards and statistics pass over {len(images)} images")
    timings = {"mxnet_forward_s": [], "statistics_pass_s": [], "numpy_forward_s": [],
               "interpreter_statistics_pass_s": []}
    result = {}
    source = model.tensor_source(graph)
    out["statistics_engine"] = source.description
    collect_statistics(graph, batches[:1], progress=False, source=source)  # bind, compile kernel
    interpreter = GraphInterpreter(graph)

    def one_round():
        for key, fn in (("mxnet_forward_s", lambda: [mxnet(b) for b in batches]),
                        ("statistics_pass_s", lambda: result.__setitem__(
                            "stats", collect_statistics(graph, batches, progress=False,
                                                        source=source))),
                        ("numpy_forward_s", lambda: [run_float(graph, b) for b in batches]),
                        ("interpreter_statistics_pass_s", lambda: collect_statistics(
                            graph, batches, progress=False, source=interpreter))):
            start = time.perf_counter()
            fn()
            timings[key].append(time.perf_counter() - start)

    one_round()
    while sum(timings["statistics_pass_s"]) < args.min_stat_seconds and \
            len(timings["statistics_pass_s"]) < 5:
        one_round()
    out["statistics"] = {"images": len(images), "batch": args.stat_batch,
                         "rounds": len(timings["statistics_pass_s"]),
                         **{k: min(v) for k, v in timings.items()}}
    out["rss_mb"]["statistics"] = peak_rss_mb()

    options = QuantOptions()
    start = time.perf_counter()
    calibration = CalibrationResult.from_statistics(result["stats"], options)
    qgraph = quantize(graph, calibration.ranges, options)
    out["quantize_s"] = time.perf_counter() - start
    out["options"] = options.label

    mxnet_int8 = None
    if not args.no_mxnet_int8:
        log(f"{args.model}: MXNet int8 (quantize_net, naive)")
        start = time.perf_counter()
        mxnet_int8 = mxnet_int8_runner(args.model, args.seed, images)
        out["mxnet_quantize_s"] = time.perf_counter() - start
    ort = start_ort_peers(args, out, lambda work: gluon_onnx_file(args, spec, work), images)
    out["batches"] = {}
    host = tvm_adapter.host_target()
    out["int8_conv_kernel"] = "vnni" if vnni.vnni_lanes(host) else "int16 pairs"
    compare_kernels = vnni.vnni_lanes(host) is not None and not args.no_kernel_compare
    with tempfile.TemporaryDirectory(prefix="qcal-bench-cache-") as cache:
        for batch in args.batches:
            log(f"{args.model}: batch {batch}: cold compile")
            start = time.perf_counter()
            cold = compile_model(qgraph, batch, cache_dir=cache)
            cold_s = time.perf_counter() - start
            log(f"{args.model}: batch {batch}: warm compile, timing")
            start = time.perf_counter()
            warm = compile_model(qgraph, batch, cache_dir=cache)
            warm_s = time.perf_counter() - start
            assert not cold.build.cache_hit and warm.build.cache_hit
            del cold
            runners = {"mxnet_fp32": mxnet, "tvm_int8": warm.run}
            if mxnet_int8 is not None:
                runners["mxnet_int8"] = mxnet_int8
            if compare_kernels:
                log(f"{args.model}: batch {batch}: compile without VNNI")
                runners["tvm_int8_no_vnni"] = compile_model(
                    qgraph, batch, target=vnni.without_vnni(host), cache_dir=cache).run
            runners.update(ort.runners() if ort else {})
            x = rng.randn(batch, *spec.input_shape).astype(np.float32)
            rates = alternating_rates(runners, x, args.rounds, args.round_seconds)
            agree = float(np.mean(warm.run(images).argmax(1) == mxnet(images).argmax(1)))
            out["batches"][str(batch)] = {
                "cold_compile_s": cold_s, "warm_compile_s": warm_s,
                "library_mb": warm.build.library.stat().st_size / 2 ** 20,
                **rates, "top1_agreement": agree}
            if ort and batch == args.batches[-1]:
                out["ort"]["fp32_max_abs_vs_reference"] = float(np.abs(
                    ort.runners()["ort_fp32"](images) - mxnet(images)).max())
            out["rss_mb"][f"batch {batch}"] = peak_rss_mb()
    stop_ort_peers(ort)
    return out


# --- peers from ONNX: ONNX Runtime (scripts/ort_peer.py) and ONNX models of their own -------------

def gluon_onnx_file(args, spec, work: Path) -> Path:
    """The benchmarked Gluon network (same seed, so the same weights) exported to ONNX."""
    from ort_peer import export_gluon_onnx

    log(f"{args.model}: export to ONNX (mxnet.onnx.export_model)")
    return export_gluon_onnx(load_net(args.model, args.seed).net, spec.input_shape,
                             work / args.model)


def start_ort_peers(args, out: dict, onnx_file, images):
    """ONNX Runtime fp32 and int8 of the model, calibrated on ``images`` (None without
    ``--ort-python``); ``onnx_file(work)`` gives the model's ONNX file."""
    if not args.ort_python:
        return None
    from ort_peer import OrtPeers

    work = Path(tempfile.mkdtemp(prefix="qcal-bench-ort-"))
    path = onnx_file(work)
    log(f"{args.model}: ONNX Runtime fp32 and int8 (quantize_static, QDQ, per-channel, MinMax)")
    peers = OrtPeers(args.ort_python, path, images, args.threads, work)
    out["ort"] = dict(peers.info)
    return peers


def stop_ort_peers(peers):
    if peers is not None:
        peers.close()
        shutil.rmtree(peers.work, ignore_errors=True)


def bench_onnx_model(args) -> dict:
    """An ONNX model of ``ONNX_MODELS``: qcal int8 (statistics on the numpy interpreter, as qcal
    runs ONNX models) against ONNX Runtime's fp32 and int8 of the same file in the same rounds;
    top-1 agreement against ONNX Runtime fp32 (against qcal's float32 through TVM without it)."""
    import numpy as np

    from qcal.backend.tvm.compile import compile_model
    from qcal.backend.tvm.emit import tvm
    from qcal.calib.collect import collect_statistics
    from qcal.calib.result import CalibrationResult
    from qcal.config import QuantOptions
    from qcal.families import resolve_model
    from qcal.quant import quantize

    out = {"model": args.model, "threads": {"tvm": tvm.get_global_func("runtime.NumThreads")(),
                                            "omp_env": os.environ.get("OMP_NUM_THREADS")}}
    path = ONNX_MODELS[args.model]
    model = resolve_model(str(path))
    shape = model.input_shape(model.preprocessing())
    graph = model.import_graph(shape)
    out["rss_mb"] = {"import": peak_rss_mb()}
    rng = np.random.RandomState(args.seed)
    images = rng.randn(args.stat_images, *shape).astype(np.float32)
    batches = [images[i:i + args.stat_batch] for i in range(0, len(images), args.stat_batch)]
    source = model.tensor_source(graph)
    out["statistics_engine"] = source.description
    log(f"{args.model}: statistics pass over {len(images)} images")
    start = time.perf_counter()
    stats = collect_statistics(graph, batches, progress=False, source=source)
    out["statistics"] = {"images": len(images), "batch": args.stat_batch, "rounds": 1,
                         "interpreter_statistics_pass_s": time.perf_counter() - start}
    out["rss_mb"]["statistics"] = peak_rss_mb()
    options = QuantOptions()
    qgraph = quantize(graph, CalibrationResult.from_statistics(stats, options).ranges, options)
    out["options"] = options.label
    ort = start_ort_peers(args, out, lambda work: path, images)
    out["batches"] = {}
    with tempfile.TemporaryDirectory(prefix="qcal-bench-cache-") as cache:
        for batch in args.batches:
            log(f"{args.model}: batch {batch}: cold compile")
            start = time.perf_counter()
            cold = compile_model(qgraph, batch, cache_dir=cache)
            cold_s = time.perf_counter() - start
            start = time.perf_counter()
            warm = compile_model(qgraph, batch, cache_dir=cache)
            warm_s = time.perf_counter() - start
            del cold
            runners = {"tvm_int8": warm.run, **(ort.runners() if ort else {})}
            reference = runners["ort_fp32"] if ort else model.float_runner(graph, len(images))
            log(f"{args.model}: batch {batch}: timing")
            x = rng.randn(batch, *shape).astype(np.float32)
            rates = alternating_rates(runners, x, args.rounds, args.round_seconds)
            agree = float(np.mean(warm.run(images).argmax(1) == reference(images).argmax(1)))
            out["batches"][str(batch)] = {
                "cold_compile_s": cold_s, "warm_compile_s": warm_s,
                "library_mb": warm.build.library.stat().st_size / 2 ** 20,
                **rates, "top1_agreement": agree}
            out["rss_mb"][f"batch {batch}"] = peak_rss_mb()
    stop_ort_peers(ort)
    return out


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# --- the parent: every model, then the tables ---------------------------------------------------

def machine() -> dict:
    info = {"python": platform.python_version(), "cores": os.cpu_count()}
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        fields = dict(line.split(":", 1) for line in lscpu.splitlines() if ":" in line)
        info["cpu"] = (f"{fields.get('Model name', '?').strip()} (family "
                       f"{fields.get('CPU family', '?').strip()}, model "
                       f"{fields.get('Model', '?').strip()})")
        flags = fields.get("Flags", "").split()
        info["isa"] = [f for f in ("avx2", "avx512f", "avx512bw", "avx512vbmi", "avx512_vnni", "avx_vnni")
                       if f in flags]
    except OSError:
        pass
    return info


def load_average() -> str:
    return " ".join(f"{v:.2f}" for v in os.getloadavg())


def embedded_weights_present(name: str) -> bool:
    return (REPO / "weights" / "fashion-mnist" / f"{name}.params").is_file()


def run_child(model: str, args) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads), TVM_NUM_THREADS=str(args.threads),
               MXNET_CPU_WORKER_NTHREADS="1")
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, __file__, "--child", model, "--child-out", result.name,
               "--batches", *map(str, args.batches), "--stat-images",
               str(args.stat_images_embedded if model in EMBEDDED_MODELS else args.stat_images),
               "--stat-batch", str(args.stat_batch), "--rounds", str(args.rounds),
               "--round-seconds", str(args.round_seconds), "--seed", str(args.seed),
               "--min-stat-seconds", str(args.min_stat_seconds),
               # the environment sets MXNet's and TVM's threads; ONNX Runtime's session takes
               # this (without it the child's default, 1, timed ORT at 1 thread in 2-thread runs)
               "--threads", str(args.threads)]
        cmd += ["--no-kernel-compare"] if args.no_kernel_compare else []
        cmd += ["--no-mxnet-int8"] if args.no_mxnet_int8 else []
        cmd += ["--ort-python", args.ort_python] if args.ort_python else []
        start = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=REPO)
        if done.returncode != 0:
            return {"model": model, "error": f"child exited with {done.returncode}"}
        out = json.loads(Path(result.name).read_text())
        out["wall_s"] = time.perf_counter() - start
        return out


def table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join(" --- " for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return lines


def rate(r: dict) -> str:
    return f"{r['images_per_s']:.1f} ({r['best_images_per_s']:.1f})"


def report(results: list, notes: list, meta: dict) -> list:
    ok = [r for r in results if "error" not in r]
    lines = [f"qcal bench {meta['date']}: {meta['machine'].get('cpu', '?')}, "
             f"{meta['machine']['cores']} cores ({', '.join(meta['machine'].get('isa', []))}), "
             f"threads {meta['threads']} (MXNet OpenMP and TVM), "
             f"load average {meta['load_start']} at start, {meta['load_end']} at end",
             f"versions: {meta['versions']}", f"command: {meta['command']}", ""]
    lines += ["Throughput, images/s (median of alternating rounds; best round in brackets)", ""]
    rows = []
    for r in ok:
        for batch, b in r["batches"].items():
            t, p = b["tvm_int8"], b.get("tvm_int8_no_vnni")
            peer, peer_name = best_int8_peer(b)
            rows.append([r["model"], batch, *[rate(b[k]) if k in b else "-" for k in PEER_COLUMNS],
                         rate(t), f"{t['images_per_s'] / peer['images_per_s']:.2f}x ({peer_name})"
                         if peer else "-", rate(p) if p else "-",
                         f"{t['images_per_s'] / p['images_per_s']:.2f}x" if p else "-",
                         f"{b['top1_agreement']:.0%}"])
    lines += table(["model", "batch", *PEER_COLUMNS.values(), "qcal int8 (TVM)",
                    "qcal int8 / best int8 peer", "qcal int8 without VNNI",
                    "int8 / without VNNI", "top-1 agree"], rows)
    lines += ort_notes(ok)
    lines += ["", "Statistics pass against a plain float forward on the same images (seconds, "
              "best of the rounds). qcal's pass for Gluon models reads the tensors from MXNet's "
              "executor; the numpy-interpreter pass is what ONNX models get", ""]
    rows = []
    for r in ok:
        s = r["statistics"]
        if "mxnet_forward_s" not in s:  # an ONNX model of bench_onnx_model: no MXNet forward
            continue
        rows.append([r["model"], f"{s['images']} (batch {s['batch']})", s["rounds"],
                     f"{s['mxnet_forward_s']:.3f}", f"{s['statistics_pass_s']:.3f}",
                     f"{s['statistics_pass_s'] / s['mxnet_forward_s']:.2f}x",
                     f"{s['numpy_forward_s']:.3f}", f"{s['interpreter_statistics_pass_s']:.3f}",
                     f"{s['interpreter_statistics_pass_s'] / s['numpy_forward_s']:.2f}x"])
    lines += table(["model", "images", "rounds", "MXNet fp32 fwd", "qcal stats pass (MXNet)",
                    "stats / MXNet fwd", "numpy interpreter fwd", "stats pass (interpreter)",
                    "interpreter stats / fwd"], rows)
    lines += ["", "Compile (int8, " + (ok[0]["options"] if ok else "") + "), seconds; peak "
              "resident memory of the model's process, MB", ""]
    rows = []
    for r in ok:
        for batch, b in r["batches"].items():
            rows.append([r["model"], batch, f"{b['cold_compile_s']:.1f}",
                         f"{b['warm_compile_s']:.2f}", f"{b['library_mb']:.1f}",
                         f"{r['rss_mb']['statistics']:.0f}",
                         f"{r['rss_mb'][f'batch {batch}']:.0f}"])
    lines += table(["model", "batch", "cold compile", "warm (cache hit)", "library MB",
                    "peak RSS after stats", "peak RSS after this batch"], rows)
    lines += ["", "Floors (docs/benchmarks.md)", ""]
    lines += floors(ok)
    if notes or any("error" in r for r in results):
        lines += [""] + [f"note: {n}" for n in notes]
        lines += [f"note: {r['model']}: {r['error']}" for r in results if "error" in r]
    return lines


# the peers' columns of the throughput table, in order: runner name -> header
PEER_COLUMNS = {"mxnet_fp32": "MXNet fp32", "mxnet_int8": "MXNet int8 (oneDNN)",
                "ort_fp32": "ORT fp32", "ort_int8": "ORT int8 (QDQ)"}
INT8_PEERS = {"mxnet_int8": "MXNet int8", "ort_int8": "ORT int8"}


def best_int8_peer(batch_figures: dict) -> tuple:
    """(figures, name) of the fastest int8 peer timed for a batch; (None, None) when none was."""
    timed = [(batch_figures[k], name) for k, name in INT8_PEERS.items() if k in batch_figures]
    return max(timed, key=lambda p: p[0]["images_per_s"]) if timed else (None, None)


def ort_notes(results: list) -> list:
    lines = []
    for r in results:
        if "ort" in r:
            o = r["ort"]
            check = (f"; its fp32 output within {o['fp32_max_abs_vs_reference']:.1e} of MXNet's"
                     if "fp32_max_abs_vs_reference" in o else "")
            lines.append(f"{r['model']}: ONNX Runtime {o['onnxruntime']} (onnx {o['onnx']}), "
                         f"int8 quantized in {o['quantize_s']:.1f} s{check}")
    agree = [r["model"] for r in results if r["model"] in ONNX_MODELS]
    if agree:
        lines.append(f"top-1 agree: qcal int8 against ONNX Runtime fp32 for {', '.join(agree)} "
                     "(random inputs), against MXNet fp32 for the others")
    return [""] + lines if lines else []


def floors(results: list) -> list:
    def verdict(value, limit, higher_is_better):
        good = value >= limit if higher_is_better else value <= limit
        return "met" if good else "NOT met"

    lines = []
    by_name = {r["model"]: r for r in results}
    r50 = by_name.get(FLOOR_MODEL)
    if r50 and "16" in r50["batches"]:
        b = r50["batches"]["16"]
        ratio = b["tvm_int8"]["images_per_s"] / b["mxnet_fp32"]["images_per_s"]
        lines.append(f"- {FLOOR_MODEL} b16 int8 / MXNet fp32 images/s: {ratio:.2f}x "
                     f"(floor >= {FLOOR_INT8_RATIO}x): {verdict(ratio, FLOOR_INT8_RATIO, True)}")
    if r50:
        worst_cold = max(b["cold_compile_s"] for b in r50["batches"].values())
        worst_warm = max(b["warm_compile_s"] for b in r50["batches"].values())
        lines.append(f"- {FLOOR_MODEL} cold compile, slowest batch size: {worst_cold:.1f} s "
                     f"(floor <= {FLOOR_COLD_S:g} s): {verdict(worst_cold, FLOOR_COLD_S, False)}")
        lines.append(f"- {FLOOR_MODEL} warm compile, slowest batch size: {worst_warm:.2f} s "
                     f"(floor <= {FLOOR_WARM_S:g} s): {verdict(worst_warm, FLOOR_WARM_S, False)}")
    for r in results:
        if r["model"] == FLOOR_LITE0_MODEL:
            continue  # its floor is against ONNX Runtime, below
        for batch, b in r["batches"].items():
            peer, peer_name = best_int8_peer(b)
            if peer is not None:
                ratio = b["tvm_int8"]["images_per_s"] / peer["images_per_s"]
                lines.append(f"- {r['model']} b{batch} qcal int8 / {peer_name} images/s: "
                             f"{ratio:.2f}x (floor >= {FLOOR_PEER_RATIO}x): "
                             f"{verdict(ratio, FLOOR_PEER_RATIO, True)}")
    lite0 = by_name.get(FLOOR_LITE0_MODEL)
    if lite0 and "ort_int8" in lite0["batches"].get("16", {}):
        b = lite0["batches"]["16"]
        ratio = b["tvm_int8"]["images_per_s"] / b["ort_int8"]["images_per_s"]
        lines.append(f"- {FLOOR_LITE0_MODEL} b16 qcal int8 / ONNX Runtime int8 images/s: "
                     f"{ratio:.2f}x (floor >= 1.0x): {verdict(ratio, 1.0, True)}")
    for r in results:
        s = r["statistics"]
        if "mxnet_forward_s" not in s:
            continue
        ratio = s["statistics_pass_s"] / s["mxnet_forward_s"]
        lines.append(f"- {r['model']} statistics pass ({r['statistics_engine']}) / MXNet fp32 "
                     f"forward: {ratio:.2f}x (floor <= {FLOOR_STATS_RATIO}x): "
                     f"{verdict(ratio, FLOOR_STATS_RATIO, False)}")
    return lines


def scaling_lines(results: list, meta: dict, baseline: dict) -> list:
    """qcal int8 images/s of this run over the same model and batch in ``baseline`` (another
    run's ``--json``, at fewer threads): the thread-scaling floor when this run has 2 threads and
    the baseline 1. Read them only when both ran on the same idle machine."""
    before = {(r["model"], batch): b["tvm_int8"]["images_per_s"]
              for r in baseline["results"] for batch, b in r["batches"].items()}
    threads, base_threads = meta["threads"], baseline["meta"]["threads"]
    lines = ["", f"Thread scaling: qcal int8 images/s at {threads} threads over {base_threads} "
             f"({baseline['meta']['date']}, {baseline['meta']['machine'].get('cpu', '?')})", ""]
    if baseline["meta"]["machine"].get("cpu") != meta["machine"].get("cpu"):
        lines += ["note: the two runs were on different CPUs; the ratios mean nothing", ""]
    for r in results:
        for batch, b in r["batches"].items():
            if (r["model"], batch) not in before:
                continue
            ratio = b["tvm_int8"]["images_per_s"] / before[(r["model"], batch)]
            verdict = ""
            if (threads, base_threads) == (2, 1):
                good = ratio >= FLOOR_THREAD_SCALING
                verdict = f" (floor >= {FLOOR_THREAD_SCALING}x): {'met' if good else 'NOT met'}"
            lines.append(f"- {r['model']} b{batch}: {ratio:.2f}x{verdict}")
    return lines


def run_sweep_memory(args):
    """``scripts/sweep_memory.py``'s figures (a real Lite sweep in a process of its own)."""
    with tempfile.NamedTemporaryFile(suffix=".json") as result:
        cmd = [sys.executable, str(REPO / "scripts" / "sweep_memory.py"), "--json", result.name,
               "--size", str(args.sweep_size), "--variants", str(args.sweep_variants)]
        done = subprocess.run(cmd, cwd=REPO, stdout=subprocess.DEVNULL)
        if done.returncode != 0:
            return {"error": f"scripts/sweep_memory.py exited with {done.returncode}"}
        return json.loads(Path(result.name).read_text())


def sweep_memory_lines(sweep: dict) -> list:
    if "error" in sweep:
        return ["", f"note: Lite sweep memory: {sweep['error']}"]
    lines = ["", f"Peak resident memory of an EfficientNet-Lite0 sweep at {sweep['size']}x"
             f"{sweep['size']} (scripts/sweep_memory.py: float32 + {sweep['variants']} int8 "
             f"variants, {sweep['images']} images + {sweep['fidelity_crops']} label-free crops, "
             f"{sweep['calib_crops']} calibration crops), MB", ""]
    lines += table(["variant", "peak while it ran", "RSS after it"],
                   [[r["variant"], f"{r['peak_mb']:.0f}", f"{r['rss_end_mb']:.0f}"]
                    for r in sweep["per_variant"]])
    good = sweep["peak_mb"] <= FLOOR_SWEEP_PEAK_MB
    lines += ["", f"- Lite0 sweep peak resident memory: {sweep['peak_mb']:.0f} MB (floor <= "
              f"{FLOOR_SWEEP_PEAK_MB:.0f} MB): {'met' if good else 'NOT met'}"]
    return lines


def versions() -> str:
    import importlib.metadata as md

    names = ("apache-tvm", "mxnet", "numpy")
    found = []
    for n in names:
        try:
            found.append(f"{n} {md.version(n)}")
        except md.PackageNotFoundError:
            pass
    from qcal import __version__

    return ", ".join([f"qcal {__version__}", *found, f"python {platform.python_version()}"])


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", default=None,
                   help=f"default: {' '.join(IMAGENET_MODELS + EMBEDDED_MODELS)}")
    p.add_argument("--quick", action="store_true",
                   help="resnet18_v1 and the embedded models, fewer rounds and images")
    p.add_argument("--batches", nargs="+", type=int, default=[1, 16])
    p.add_argument("--stat-images", type=int, default=32,
                   help="images in the statistics pass and the float forwards (ImageNet models)")
    p.add_argument("--stat-images-embedded", type=int, default=512,
                   help="the same for the embedded Fashion-MNIST models")
    p.add_argument("--stat-batch", type=int, default=16)
    p.add_argument("--min-stat-seconds", type=float, default=2.0,
                   help="repeat the statistics rounds (best counts) while they total less")
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--round-seconds", type=float, default=1.5)
    p.add_argument("--threads", type=int, default=max(1, (os.cpu_count() or 2) // 2))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-mxnet-int8", action="store_true",
                   help="skip MXNet's own int8 (quantize_net, oneDNN)")
    p.add_argument("--no-kernel-compare", action="store_true",
                   help="on a VNNI CPU, skip timing qcal int8 compiled without VNNI")
    p.add_argument("--ort-python", metavar="PATH",
                   help="python of an ONNX Runtime environment (make ort-venv): time ONNX Runtime "
                        "fp32 and int8 of each model in the same rounds (scripts/ort_peer.py)")
    p.add_argument("--json", type=Path, help="also write every measurement here")
    p.add_argument("--scaling-from", type=Path, metavar="JSON",
                   help="another run's --json at fewer threads (same machine): print this run's "
                        "qcal int8 throughput over it, and the 2-over-1-thread scaling floor")
    p.add_argument("--sweep-variants", type=int, default=12,
                   help="int8 variants of the Lite0 sweep whose peak memory is measured (0: none)")
    p.add_argument("--sweep-size", type=int, default=260, help="input size of that sweep")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.quick:
        args.models = args.models or ["resnet18_v1", *EMBEDDED_MODELS]
        args.rounds, args.round_seconds, args.stat_images = 3, 1.0, 16
        args.stat_images_embedded = 128
        args.sweep_variants = min(args.sweep_variants, 2)
    args.models = args.models or [*IMAGENET_MODELS, *ONNX_MODELS, *EMBEDDED_MODELS]
    if args.scaling_from and not args.scaling_from.is_file():
        p.error(f"--scaling-from: {args.scaling_from} is not a file (a --json of bench.py)")
    if args.ort_python and not Path(args.ort_python).is_file():
        p.error(f"--ort-python: {args.ort_python} is not a file (make ort-venv builds one)")
    if os.environ.get("QCAL_VNNI_EMULATE", "").strip():
        # vnni.EMULATE_ENV (not imported: TVM must load after the thread settings): the emulated
        # kernel is exact but slow, and its timings would be printed as VNNI's
        p.error("QCAL_VNNI_EMULATE is set: it emulates vpdpbusd for verification only; unset it "
                "to benchmark (qcal/backend/tvm/vnni.py)")
    return args


def main(argv=None):
    args = parse_args(argv)
    if args.child:
        args.model = args.child
        bench = bench_onnx_model if args.model in ONNX_MODELS else bench_model
        Path(args.child_out).write_text(json.dumps(bench(args)))
        return 0
    meta = {"date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "machine": machine(),
            "threads": args.threads, "load_start": load_average(), "versions": versions(),
            "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}
    results, notes = [], []
    for model in args.models:
        if model in EMBEDDED_MODELS and not embedded_weights_present(model):
            notes.append(f"{model} skipped: weights/fashion-mnist/{model}.params is not there "
                         f"(still training?)")
            continue
        log(f"{model} (load average {load_average()})")
        results.append(run_child(model, args))
    sweep = None
    if args.sweep_variants:
        log(f"Lite0 sweep memory (load average {load_average()})")
        sweep = run_sweep_memory(args)
    meta["load_end"] = load_average()
    lines = report(results, notes, meta)
    if sweep is not None:
        lines += sweep_memory_lines(sweep)
    if args.scaling_from:
        lines += scaling_lines(results, meta, json.loads(args.scaling_from.read_text()))
    print("\n".join(lines))
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "results": results, "notes": notes,
                                         "sweep_memory": sweep}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
