#!/usr/bin/env python
"""What verifying a variant costs (``qcal.eval.verify``) against evaluating it, one run, same model.

    python scripts/bench_verify.py                         # resnet50_v1 and fmnist_resnet20_v1, 1,000 images
    python scripts/bench_verify.py --images 256 --models fmnist_resnet20_v1

Per model: the default int8 variant (``QuantOptions()``), realized from a statistics pass over 32
seeded random images, compiled at qcal's evaluation batch size into an empty compile cache. Then:

* ``verify``: ``verify_compiled`` on ``--verify-images`` images, as a sweep runs it before each
  variant (the evaluated executable on one padded batch, the numpy integer reference on those
  images, the comparison); it must pass. Timed first (it is the executable's first call, as in a
  sweep) and again after the evaluation (warm: one batch of compute plus the reference);
* ``evaluate``: the compiled model over ``--images`` images in batches, the compute that
  ``qcal.eval.evaluate`` times (inputs made before the clock starts, as the batch cache does);
* ``diagnose``: what a mismatch would add: compiling the probe (every layer's output) and the
  layer-by-layer comparison (``first_differing_layer``), here on a correct model.

resnet50_v1 has random weights (speed does not depend on them); the embedded model uses its
shipped weights. Inputs are seeded random images for both. Verification and evaluation are
timed one after the other in one process; on a shared machine compare them only as the ratio
printed here.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "scripts"))

from bench import load_net  # noqa: E402  (random-weight zoo nets, shipped embedded weights)

from qcal.config import DEFAULT_BATCH_SIZE, DEFAULT_VERIFY_IMAGES  # noqa: E402


def log(message: str):
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def bench_model(name: str, args) -> dict:
    from qcal.backend.tvm.compile import compile_model
    from qcal.calib.collect import collect_statistics
    from qcal.calib.result import CalibrationResult
    from qcal.config import QuantOptions
    from qcal.eval.verify import first_differing_layer, probe_outputs, verify_compiled
    from qcal.quant import quantize
    from qcal.reference.int_interpreter import run_integer

    model = load_net(name, args.seed)
    shape = model.spec.input_shape
    graph = model.import_graph(shape)
    rng = np.random.RandomState(args.seed)
    calib = rng.randn(32, *shape).astype(np.float32)
    log(f"{name}: statistics, quantize")
    statistics = collect_statistics(graph, [calib[:16], calib[16:]], progress=False,
                                    source=model.tensor_source(graph))
    options = QuantOptions()
    qgraph = quantize(graph, CalibrationResult.from_statistics(statistics, options).ranges, options)
    out = {"model": name, "variant": options.label, "batch": args.batch,
           "verify_images": args.verify_images, "images": args.images}
    with tempfile.TemporaryDirectory(prefix="qcal-bench-verify-") as cache:
        log(f"{name}: compile (batch {args.batch})")
        start = time.perf_counter()
        compiled = compile_model(qgraph, args.batch, cache_dir=cache)
        out["compile_s"] = time.perf_counter() - start

        x = calib[:args.verify_images]
        log(f"{name}: verify on {args.verify_images} image(s)")
        start = time.perf_counter()
        verification = verify_compiled(qgraph, x, compiled.run, compiled.run_probe, name)
        out["verify_s"] = time.perf_counter() - start
        out["verify_check"] = verification.check
        start = time.perf_counter()
        run_integer(qgraph, x)
        out["verify_reference_s"] = time.perf_counter() - start

        log(f"{name}: evaluate {args.images} images")
        seconds = 0.0
        for first in range(0, args.images, args.batch):
            batch = rng.randn(min(args.batch, args.images - first), *shape).astype(np.float32)
            start = time.perf_counter()
            compiled.run(batch)
            seconds += time.perf_counter() - start
        out["evaluate_s"] = seconds
        start = time.perf_counter()  # again, the executable warm: what verify adds to a run
        verify_compiled(qgraph, x, compiled.run, compiled.run_probe, name)
        out["verify_warm_s"] = time.perf_counter() - start

        log(f"{name}: diagnose (probe compile + layer comparison)")
        start = time.perf_counter()
        probed = compiled.run_probe(x, probe_outputs(qgraph))
        out["probe_compile_and_run_s"] = time.perf_counter() - start
        start = time.perf_counter()
        assert first_differing_layer(qgraph, x, probed) is None
        out["layer_comparison_s"] = time.perf_counter() - start
    model.close()
    return out


def report(results: list, args) -> list:
    lines = [f"verify ({args.verify_images} images) against evaluate ({args.images} images), "
             f"batch {args.batch}, default int8 variant",
             "| model | compile s | verify s (first call) | verify s (warm) | (reference s) "
             "| evaluate s | verify / evaluate | on a mismatch: probe s + compare s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in results:
        lines.append(f"| {r['model']} | {r['compile_s']:.1f} | {r['verify_s']:.2f} | "
                     f"{r['verify_warm_s']:.2f} | {r['verify_reference_s']:.2f} | "
                     f"{r['evaluate_s']:.1f} | {100 * r['verify_s'] / r['evaluate_s']:.1f} % "
                     f"({100 * r['verify_warm_s'] / r['evaluate_s']:.1f} % warm) | "
                     f"{r['probe_compile_and_run_s']:.1f} + {r['layer_comparison_s']:.2f} |")
    return lines


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["resnet50_v1", "fmnist_resnet20_v1"])
    parser.add_argument("--images", type=int, default=1000, help="images evaluated (1,000)")
    parser.add_argument("--verify-images", type=int, default=DEFAULT_VERIFY_IMAGES)
    parser.add_argument("--batch", type=int, default=DEFAULT_BATCH_SIZE)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", type=Path, help="also write the figures here")
    return parser.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    results = [bench_model(name, args) for name in args.models]
    print("\n".join(report(results, args)))
    if args.json:
        args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
