"""How the KL (entropy) thresholds behave on real activation tensors: figures, not a test.

For each embedded Fashion-MNIST model, the float values of every tensor on the first N
calibration images (MXNet's executor) are kept, and printed per model:

1. octave: the same values scaled by s = 2**(j/8), j = 0..7 (every position of the abs-max
   within its power-of-two octave), through the production path (``AbsHistogram`` at 8192 bins,
   then ``ReferenceHistogram``); the deviation |t(s) / (s t(1)) - 1| of ``kl``, ``kl-mxnet`` and of
   qcal's KL before the reference histogram (MXNet's grouping on the fine histogram trimmed to
   its last non-empty bin and merged to 2048-4095 bins: ``threshold_before``);
2. bins: how ``kl``'s threshold moves when the reference histogram has 1024, 4096 or 8192 bins
   instead of 2048 (TensorRT's algorithm itself depends on the bin count);
3. port: how many tensors' ``kl`` equals the port of pytorch-quantization's entropy calibrator in
   ``tests/calib/test_methods.py`` (the same bin);
4. clipping: per tensor, kl / abs-max, kl-mxnet / abs-max, l2 / abs-max and the share of
   non-zero values each clips, for the tensors where kl and kl-mxnet differ most;
5. with ``--accuracy N``: top-1 on the first N test images (500 calibration images, per-channel
   max weights, int32 bias, compiled by TVM) of kl, of kl-mxnet, of kl with only the first
   layer's int8 input (the image, or the output of ResNet v2's input BatchNorm) at its abs-max,
   and of kl with every tensor whose kl threshold is below 0.45 of its abs-max at its abs-max.

    PYTHONPATH=$PWD python scripts/kl_study.py [--images 32] [--models fmnist_resnet20_v1 ...]
                                               [--accuracy 2000]
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
os.environ.setdefault("TVM_BIND_THREADS", "0")

from qcal.calib.collect import AbsHistogram, ReferenceHistogram  # noqa: E402
from qcal.calib.methods import KL_QUANTIZED_BINS, choose_amax, kl_divergences  # noqa: E402
from qcal.data.sources import FashionMNISTSource  # noqa: E402
from qcal.families import resolve_model  # noqa: E402
from qcal.families.mxnet_internals import MXNetInternals  # noqa: E402

MODELS = ["fmnist_resnet20_v1", "fmnist_resnet56_v2", "fmnist_vgg11_bn"]
SCALES = 2.0 ** (np.arange(8) / 8)


def tensor_values(model_name, images):
    model = resolve_model(model_name)
    graph = model.import_graph((1, 32, 32))
    values = {}
    source = MXNetInternals(graph, model.net)
    for start in range(0, len(images), 32):
        source.run(images[start:start + 32],
                   lambda name, v: values.setdefault(name, []).append(np.array(v, np.float32)))
    return {k: np.concatenate([a.ravel() for a in v]) for k, v in values.items()}


def production_stats(x, bins=8192, reference_bins=2048):
    """Both passes of ``collect_statistics`` over one tensor's values."""
    first = AbsHistogram(bins)
    first.collect(x)
    reference = ReferenceHistogram(first.amax, reference_bins)
    reference.collect(x)
    return dataclasses.replace(first.stats(), ref_counts=reference.counts,
                               ref_edges=reference.edges())


def threshold_before(stats):
    """qcal's kl before the reference histogram: MXNet's grouping on the fine histogram, trimmed
    to its last non-empty bin and merged by len // 2048 (2048-4095 bins, by octave position)."""
    counts = stats.counts.copy()
    counts[0] -= stats.zeros
    last = int(np.flatnonzero(counts)[-1]) + 1 if counts.any() else 1
    counts, edges = counts[:last], stats.edges[:last + 1]
    factor = max(1, len(counts) // 2048)
    if factor > 1:
        n = len(counts)
        counts = np.concatenate([counts, np.zeros(-n % factor, counts.dtype)]).reshape(
            -1, factor).sum(axis=1)
        edges = edges[0] + (edges[1] - edges[0]) * factor * np.arange(len(counts) + 1)
    kept = np.arange(KL_QUANTIZED_BINS, len(counts) + 1)
    d = kl_divergences(counts.astype(np.float64), kept, "mxnet")
    return float(min(edges[kept[int(np.argmin(d))]], stats.amax))


def clipped_share(x, t):
    nz = np.abs(x[x != 0])
    return float(np.mean(nz > t)) if len(nz) else 0.0


def study(model_name, images):
    from tests.calib.test_methods import pytorch_quantization_entropy

    values = tensor_values(model_name, images)
    values = {k: v for k, v in values.items() if np.abs(v).max() > 0}
    print(f"\n## {model_name}: {len(values)} tensors, {len(images)} calibration images")
    deviations = {"kl": [], "kl-mxnet": [], "kl before": []}
    bin_moves = {1024: [], 4096: [], 8192: []}
    port_equal, rows = 0, []
    for name, x in values.items():
        base = production_stats(x)
        t0 = {"kl": choose_amax("kl", base), "kl-mxnet": choose_amax("kl-mxnet", base),
              "kl before": threshold_before(base)}
        worst = dict.fromkeys(t0, 0.0)
        for s in SCALES[1:]:
            stats = production_stats((x.astype(np.float64) * s).astype(np.float32))
            got = {"kl": choose_amax("kl", stats), "kl-mxnet": choose_amax("kl-mxnet", stats),
                   "kl before": threshold_before(stats)}
            for m in t0:
                worst[m] = max(worst[m], abs(got[m] / (s * t0[m]) - 1))
        for m in t0:
            deviations[m].append(worst[m])
        for bins in bin_moves:
            t = choose_amax("kl", production_stats(x, reference_bins=bins))
            bin_moves[bins].append(t / t0["kl"] - 1)
        hist = base.ref_counts.copy()
        hist[0] -= base.zeros
        port = min(pytorch_quantization_entropy(hist, base.ref_edges, patch_bin0=False), base.amax)
        port_equal += port == t0["kl"]
        l2 = choose_amax("l2", base)
        rows.append((t0["kl"] / t0["kl-mxnet"], name, base.amax, t0["kl"], t0["kl-mxnet"], l2,
                     clipped_share(x, t0["kl"]), clipped_share(x, t0["kl-mxnet"]),
                     clipped_share(x, l2)))
    print("\n1. threshold against the octave position (worst over s = 2**(j/8), j = 1..7):")
    print("| method | median | 90th pct | worst |\n| --- | --- | --- | --- |")
    for m, d in deviations.items():
        d = np.array(d)
        print(f"| {m} | {np.median(d):.2e} | {np.percentile(d, 90):.2e} | {d.max():.2e} |")
    print("\n2. kl with other reference bin counts (relative to 2048 bins):")
    print("| bins | median abs move | 90th pct | worst | tensors moved > 5 % |\n"
          "| --- | --- | --- | --- | --- |")
    for bins, moves in bin_moves.items():
        a = np.abs(moves)
        print(f"| {bins} | {np.median(a):.1%} | {np.percentile(a, 90):.1%} | {a.max():.1%} | "
              f"{int((a > 0.05).sum())}/{len(a)} |")
    print(f"\n3. kl equals the pytorch-quantization port on {port_equal} of {len(values)} tensors")
    ratios = np.array([r[0] for r in rows])
    print(f"\n4. kl / kl-mxnet: median {np.median(ratios):.3f}, min {ratios.min():.3f}; "
          f"kl below 0.8 x kl-mxnet on {int((ratios < 0.8).sum())} of {len(ratios)} tensors. "
          "Most different:")
    print("| tensor | abs-max | kl | kl-mxnet | l2 | clipped kl | kl-mxnet | l2 |\n"
          "| --- | --- | --- | --- | --- | --- | --- | --- |")
    for r in sorted(rows)[:8]:
        print(f"| {r[1]} | {r[2]:.3g} | {r[3]:.3g} | {r[4]:.3g} | {r[5]:.3g} | {r[6]:.2e} | "
              f"{r[7]:.2e} | {r[8]:.2e} |")


SPIKE_CLIP = 0.45  # kl below this share of the abs-max: the spike trap (figure 4 and the note)


def accuracy(model_name, num_images):
    """Top-1 of kl, of kl with some tensors at their abs-max, and of kl-mxnet (figure 5)."""
    from qcal.backend.tvm.compile import compile_model
    from qcal.config import QuantOptions
    from qcal.drivers.session import ModelSession
    from qcal.eval.evaluate import evaluate
    from qcal.quant import quantize

    session = ModelSession(model_name, {"num_images": num_images, "calib_images": 500}, quiet=True)
    calibration = session.calibration
    graph = session.graph
    # the first layer's int8 input: the image itself, or (ResNet v2) its input BatchNorm's output
    first = next(n for n in graph.nodes if n.op in ("conv2d", "dense"))

    def first_input(name, kl, amax):
        return name == first.inputs[0]

    def spiked(name, kl, amax):
        return kl < SPIKE_CLIP * amax

    print(f"\n5. {model_name}: top-1 on the first {num_images} test images")
    print("| activation ranges | top-1 | tensors at their abs-max |\n| --- | --- | --- |")
    for label, method, at_max in (
            ("kl", "kl", None), ("kl-mxnet", "kl-mxnet", None),
            ("kl, the first layer's input at its abs-max", "kl", first_input),
            (f"kl, tensors where kl < {SPIKE_CLIP} x abs-max at their abs-max", "kl", spiked)):
        options = QuantOptions(activation_method=method, weight_scale="max",
                               weight_granularity="channel", bias_mode="int32-acc")
        replaced = set()

        def ranges(opts, tensors, levels, at_max=at_max, replaced=replaced):
            chosen = calibration.ranges(opts, tensors, levels)
            for name in list(chosen) if at_max else ():
                amax = calibration.amax(name, "max", levels.get(name, 127))
                if at_max(name, chosen[name], amax):
                    chosen[name] = amax
                    replaced.add(name)
            return chosen

        qgraph = quantize(graph, ranges, options)
        compiled = compile_model(qgraph, session.batch_size)
        result = evaluate(compiled.run, session.plan(True).evaluation, session.batch_size,
                          session.cache)
        print(f"| {label} | {100 * result.top1:.2f} % | {', '.join(sorted(replaced)) or '-'} |",
              flush=True)
    session.close()


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--models", nargs="+", default=MODELS)
    parser.add_argument("--accuracy", type=int, default=0, metavar="N",
                        help="also measure top-1 on the first N test images (compiles 3 models)")
    parser.add_argument("--skip-figures", action="store_true", help="only the accuracy table")
    args = parser.parse_args()
    images = FashionMNISTSource("calib").decode(np.arange(args.images))
    for model in args.models:
        if not args.skip_figures:
            study(model, images)
        if args.accuracy:
            accuracy(model, args.accuracy)


if __name__ == "__main__":
    main()
