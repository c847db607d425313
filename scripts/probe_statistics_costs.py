#!/usr/bin/env python
"""Where the statistics pass spends its time beyond MXNet's forward, per tensor element.

    python scripts/probe_statistics_costs.py                      # resnet50_v1, batch 16
    OMP_NUM_THREADS=2 python scripts/probe_statistics_costs.py    # the same at 2 MXNet threads
    python scripts/probe_statistics_costs.py --memory 64          # one 64-image pass: time, RSS
    python scripts/probe_statistics_costs.py --memory 64 --unsliced

On one batch of random images (the network built and seeded as ``bench.py`` builds it: random
weights for ImageNet models), with MXNet's executor bound on every graph tensor as
``qcal.calib.sources.MXNetInternals`` binds it, prints:
  * the forward alone (all outputs computed, none read);
  * copying every output out the way the pass does (``MXNDArraySyncCopyToCPU`` into one reused
    buffer: MXNet reorders oneDNN's blocked layouts into a fresh array, then copies);
  * the alternative: the engine reorders straight into a numpy-backed NDArray
    (``mx.nd.from_numpy(zero_copy=True)`` as the ``copyto`` target);
  * qcal's histogram kernel over the same elements, and a warm ``np.copyto`` for scale;
With ``--memory N`` it does only this instead: the wall time and peak resident memory of
``collect_statistics`` over N images in one batch (``--unsliced`` lifts ``MAX_EXECUTOR_BATCH``).
The figures back the limits section of docs/benchmarks.md; this is a probe, not a benchmark
with floors.
"""
from __future__ import annotations

import argparse
import os
import time

import numpy as np
from bench import best_of, load_net, peak_rss_mb  # also puts the repository on sys.path


def seconds(fn) -> float:
    return best_of(fn, min_seconds=float("inf"), max_repeats=3)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="resnet50_v1")
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument("--memory", type=int, metavar="N", help="time one N-image pass instead")
    parser.add_argument("--unsliced", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    import mxnet as mx

    from qcal.backend.tvm.histogram import AbsHistogramKernel
    from qcal.families.mxnet_internals import MXNetInternals

    model = load_net(args.model, args.seed)  # random weights, as bench.py's
    net, spec = model.net, model.spec
    graph = model.import_graph(spec.input_shape)
    rng = np.random.RandomState(args.seed)
    if args.memory:
        return statistics_pass_memory(graph, net, spec, rng, args)
    source = MXNetInternals(graph, net)
    images = rng.randn(args.batch, *spec.input_shape).astype(np.float32)
    executor = source._executor(images.shape)
    outputs = [executor.outputs[index] for index, _ in source.plan if index is not None]
    elements = sum(int(np.prod(o.shape)) for o in outputs)

    def forward():
        executor.forward(is_train=False, **{graph.input.name: images})
        mx.nd.waitall()

    def copy_out():
        for output in outputs:
            source._read(output)

    largest = max(int(np.prod(o.shape)) for o in outputs)
    target = np.zeros(largest, np.float32)
    views = {}

    def reorder_on_engine():
        for output in outputs:
            if output.shape not in views:
                size = int(np.prod(output.shape))
                views[output.shape] = mx.nd.from_numpy(target[:size].reshape(output.shape),
                                                       zero_copy=True)
            output.copyto(views[output.shape])
        mx.nd.waitall()

    kernel = AbsHistogramKernel(8192)
    values = [source._read(o).ravel().copy() for o in outputs[:: max(1, len(outputs) // 8)]]
    sampled = sum(v.size for v in values)

    def histogram():
        for v in values:
            kernel.add(v, 8192 / (float(np.abs(v).max()) * 1.0001 + 1e-30))
            kernel.flush()

    big = np.ones(largest, np.float32)
    warm = np.zeros_like(big)
    print(f"{args.model}, batch {args.batch}, {len(outputs)} tensors, {elements / 1e6:.0f} M "
          f"elements; OMP_NUM_THREADS={os.environ.get('OMP_NUM_THREADS', 'unset')}")
    forward()
    copy_out()
    reorder_on_engine()
    print(f"  forward, every output computed:   {seconds(forward):.3f} s")
    for label, fn, n in (("SyncCopyToCPU on this thread", copy_out, elements),
                         ("engine reorder into numpy view", reorder_on_engine, elements),
                         ("histogram kernel", histogram, sampled),
                         ("np.copyto, warm", lambda: np.copyto(warm, big), largest)):
        t = seconds(fn)
        print(f"  {label + ':':33s} {t:.3f} s, {t / n * 1e9:.2f} ns an element")


def statistics_pass_memory(graph, net, spec, rng, args):
    import qcal.families.mxnet_internals as tensor_sources
    from qcal.calib.collect import collect_statistics

    if args.unsliced:
        tensor_sources.MAX_EXECUTOR_BATCH = 1 << 30
    images = rng.randn(args.memory, *spec.input_shape).astype(np.float32)
    source = tensor_sources.MXNetInternals(graph, net)
    start = time.perf_counter()
    collect_statistics(graph, [images], progress=False, source=source)
    took = time.perf_counter() - start
    how = "unsliced" if args.unsliced else f"slices of {tensor_sources.MAX_EXECUTOR_BATCH}"
    print(f"{args.model}: statistics pass, {args.memory} images in one batch ({how}): "
          f"{took:.1f} s, peak RSS {peak_rss_mb():.0f} MB")


if __name__ == "__main__":
    main()
