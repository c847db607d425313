#!/usr/bin/env python
"""An independent fake-quantized model beside qcal's integer model, per activation width and
calibration method: is a low-width result a property of the quantization or a qcal bug?

    python scripts/fakequant_check.py --model fmnist_resnet20_v1 --images 128 \\
        --methods power2,l2,percentile --activation-bits 6,4

The independent model is written here from the float graph alone: every tensor that qcal
quantizes (``annotate``'s ``int8_needed``) is rounded to its grid (scale amax/(L+1) for a
power-of-2 amax, else amax/L, clipped to +-L) for all of its readers, weights are rounded to
nearest at their power-of-2 per-tensor scale, everything else (accumulation, bias, adds) is exact
float64. It shares only qcal's activation ranges. It prints top-1 of both models on the first
``--images`` evaluation images and how often their top-1 agree. Used for docs/bitwidths.md
(the W8A6 / W8A4 ordering under power-of-2 ranges).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcal.config import QuantOptions, levels_for_bits  # noqa: E402
from qcal.data.cache import iter_batches  # noqa: E402
from qcal.drivers.session import ModelSession  # noqa: E402
from qcal.quant.annotate import annotate  # noqa: E402
from qcal.reference.float_interpreter import float_op  # noqa: E402
from qcal.reference.int_interpreter import run_integer  # noqa: E402


def _grid(v, amax, levels):
    power2 = np.log2(amax) == np.round(np.log2(amax))
    scale = amax / (levels + 1) if power2 else amax / levels
    return np.clip(np.rint(v / scale), -levels, levels) * scale


def independent_logits(session, options, x):
    graph = session.graph
    annotation = annotate(graph, options)
    levels = {t: levels_for_bits(annotation.activation_bits[t]) for t in annotation.required_amax}
    amax = session.calibration.ranges(options, annotation.required_amax, levels)
    values = {}
    for node in graph.nodes:
        if node.op == "input":
            value = x.astype(np.float64)
        else:
            if node.op in ("conv2d", "dense"):
                w = node.params["weight"].astype(np.float64)
                top = levels_for_bits(annotation.weight_bits[node.name])
                node = type(node)(node.name, node.op, node.inputs, node.attrs, {
                    **node.params, "weight": _grid(w, 2.0 ** np.ceil(np.log2(np.abs(w).max())), top)})
            value = float_op(node, [values[i] for i in node.inputs], np.float64)
        if node.name in annotation.int8_needed:
            value = _grid(value, amax[node.name], levels[node.name])
        values[node.name] = value
    return values[graph.output.name]


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="fmnist_resnet20_v1")
    parser.add_argument("--images", type=int, default=128)
    parser.add_argument("--calib-images", type=int, default=500)
    parser.add_argument("--methods", default="power2,l2")
    parser.add_argument("--activation-bits", default="8,6,4")
    args = parser.parse_args()
    session = ModelSession(args.model, data={"num_images": args.images,
                                             "calib_images": args.calib_images}, quiet=True)
    batches = list(iter_batches(session.plan(True).evaluation, 64, session.cache))
    x = np.concatenate([b[0] for b in batches])
    labels = np.concatenate([b[1] for b in batches])
    for bits in map(int, args.activation_bits.split(",")):
        for method in args.methods.split(","):
            options = QuantOptions(activation_bits=bits, activation_method=method,
                                   bias_mode="int32-acc", rounding="nearest")
            mine = independent_logits(session, options, x).argmax(1)
            qcal = run_integer(session.quantize(options), x).argmax(1)
            print(f"A{bits} {method:10s} independent {100 * np.mean(mine == labels):6.2f}  "
                  f"qcal integer {100 * np.mean(qcal == labels):6.2f}  "
                  f"top-1 agree {100 * np.mean(mine == qcal):6.2f}", flush=True)


if __name__ == "__main__":
    main()
