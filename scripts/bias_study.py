#!/usr/bin/env python
"""The bias study (docs/bias-study.md): where, and why, short biases lose accuracy, measured layer by layer.

    python scripts/bias_study.py fmnist_vgg11_bn --images 1000 --calib-images 500 --ablate-images 500
    python scripts/bias_study.py weights/efficientnet-lite0/efficientnet_lite0.onnx \\
        --data data/imagenet-samples --images 10 --calib-range 10:20 --batch-size 5 \\
        --ablate-images 4 --ablate-base pc-b32acc

Length: one self-contained study (measure, ablate, render its report); the pieces are only
used together, by this script, so they stay in one file rather than becoming a qcal package.

Pipeline position: a diagnostic on top of the driver (``qcal.drivers.session.ModelSession``: import,
one calibration pass, realize) and the two numpy interpreters (``qcal.reference.float_interpreter.run_float``,
``qcal.reference.int_interpreter.run_integer``). Nothing is compiled with TVM: the numpy integer interpreter
is bit-exact with TVM (tests/backend/test_compile.py), so its numbers are the integer model's.

Variants (``VARIANTS``): activations and weights power-of-2 scaled ("power2"), weights per tensor,
bias with its own power-of-2 scale at 8, 9 and 16 bits, and the int32 bias at the accumulator
scale (``b32acc``); per-channel weights at 8 bits and int32-acc. Everything but the bias is the
same across the per-tensor variants, so their SQNR differences are the bias's doing.

Per layer with a bias (conv, depthwise conv, dense, channel_affine) it reports
- the bias statics: abs-max, spread (max / median of the nonzero |b|), the accumulator scale
  ``s_acc = s_in * s_w``, the bias step ``2**ceil(log2 max|b|) / 2**(B-1)`` at 8/9/16 bits, how
  many channel biases round to zero at 8 bits;
- the alignment the realizer chose ("the smaller scale wins", Relay's AddRealize): ``acc<<k``,
  k > 0 where the bias is the finer operand (the accumulator is shifted left at run time, no
  precision lost), k = 0 where the bias is the coarser one (the bias constant is shifted instead,
  and its rounding error, up to step/2, lands on every output of the channel);
- the bias error as added (max over channels, in accumulator LSBs and relative to the float
  output's standard deviation) and the SQNR that bias error alone would leave at that layer
  (``bias-only SQNR``: mean square of the float output over the mean square bias error; the
  error is a constant per channel, so this needs no second run), and the bias's share of the
  output's energy;
- the SQNR of the integer model's layer output against the float model's on real images, for
  every variant. This is cumulative (upstream errors included); the per-tensor variants differ
  only in their biases, and "excess SQNR" is the SQNR the noise a short bias ADDS over the
  int32-acc variant's would leave on its own;
- the same cumulative SQNR for "float+bB": the float model with only its biases quantized to B
  bits (the bias's own share, without any interaction with int8 rounding);
- with ``--ablate-images N``: the int32-acc model given ONE layer's 8-bit bias at a time
  (``single_bias_variant``), its logit noise and top-1 changes: which layer's bias matters.
Then the top-1 of every variant and of float+bB, and a summary naming the layers that lose most
at 8 bits, with the measured reasons (``reasons``).
"""
from __future__ import annotations

import argparse
import re
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from qcal.config import QuantOptions  # noqa: E402
from qcal.eval.fidelity import sqnr_from_energies  # noqa: E402
from qcal.ir.graph import Graph, Node  # noqa: E402
from qcal.quant import quantize  # noqa: E402
from qcal.quant.fixed_point import bias_scale, quantize_array  # noqa: E402

BIAS_BITS = (8, 9, 16)
BASE_OPTIONS = {"activation_method": "power2", "weight_scale": "power2",
                "weight_granularity": "tensor"}
# label -> the options that differ from BASE_OPTIONS; order is the column order of the tables.
VARIANTS = {
    "b8": {"bias_bits": 8},
    "b9": {"bias_bits": 9},
    "b16": {"bias_bits": 16},
    "b32acc": {"bias_mode": "int32-acc"},
    "pc-b8": {"weight_granularity": "channel", "bias_bits": 8},
    "pc-b32acc": {"weight_granularity": "channel", "bias_mode": "int32-acc"},
}
# Each short-bias variant is judged against the int32-acc variant with the same weights.
REFERENCE_OF = {"b8": "b32acc", "b9": "b32acc", "b16": "b32acc", "pc-b8": "pc-b32acc"}
# The ablation's int32-acc model -> the 8-bit variant with the same weights.
ABLATION_DONOR = {"b32acc": "b8", "pc-b32acc": "pc-b8"}


def variant_options(label: str) -> QuantOptions:
    return QuantOptions.from_dict({**BASE_OPTIONS, **VARIANTS[label]})


# ---------------------------------------------------------------------------------------------
# Pure functions over the float graph, the biases and the integer graph.
# ---------------------------------------------------------------------------------------------

def layer_kind(node: Node) -> str | None:
    """conv / depthwise / dense / channel_affine for a layer that carries a bias, else None."""
    if node.op == "channel_affine":
        return "channel_affine"
    if node.op not in ("conv2d", "dense") or node.params.get("bias") is None:
        return None
    if node.op == "dense":
        return "dense"
    groups = int(node.attrs.get("groups", 1))
    # depthwise: one input channel per group (weight O x 1 x kh x kw)
    return "depthwise" if groups > 1 and node.params["weight"].shape[1] == 1 else "conv"


def layer_bias(node: Node) -> np.ndarray:
    key = "shift" if node.op == "channel_affine" else "bias"
    return np.asarray(node.params[key], dtype=np.float64)


def biased_layers(graph: Graph) -> list:
    return [n for n in graph.nodes if layer_kind(n) is not None]


def bias_step(bias, bits: int) -> float:
    """The B-bit bias's power-of-2 step (the realizer's own ``bias_scale``)."""
    return bias_scale(np.asarray(bias, dtype=np.float64), bits)


def quantized_bias(bias, bits: int) -> np.ndarray:
    """The bias as B bits with its own power-of-2 scale represent it (float64)."""
    bias = np.asarray(bias, dtype=np.float64)
    step = bias_step(bias, bits)
    return quantize_array(bias, step, 2 ** (bits - 1) - 1) * step


def rounded_to_zero(bias, bits: int) -> int:
    """How many nonzero channel biases become 0 at B bits."""
    bias = np.asarray(bias, dtype=np.float64)
    return int(np.sum((bias != 0) & (quantized_bias(bias, bits) == 0)))


def bias_spread(bias) -> float:
    """max |b| / median |b| over the nonzero channels: how much one shared scale must cover."""
    mags = np.abs(np.asarray(bias, dtype=np.float64))
    mags = mags[mags > 0]
    return float(mags.max() / np.median(mags)) if mags.size else float("nan")


def bias_only_sqnr_db(output_mean_square: float, bias_error) -> float:
    """SQNR of a layer output whose only error is the per-channel constant ``bias_error``
    (every channel has as many elements, so the noise power is the mean of the squares)."""
    return sqnr_from_energies(output_mean_square, float(np.mean(np.square(bias_error))))


def bias_share(bias, output_mean_square: float) -> float:
    """mean(b**2) / mean(y**2): how large the bias is next to the output it is part of. Above 1,
    the bias mostly cancels the accumulator's mean (a folded BatchNorm's -gamma*mean/std does),
    so a small relative error in the bias is a large relative error in the output."""
    return float(np.mean(np.square(np.asarray(bias, np.float64))) / output_mean_square)


def excess_sqnr_db(signal_energy: float, noise_energy: float, reference_noise: float) -> float:
    """The SQNR the noise ADDED over a reference variant's would leave on its own (inf when the
    variant is no noisier than the reference)."""
    excess = noise_energy - reference_noise
    return sqnr_from_energies(signal_energy, excess) if excess > 0 else float("inf")


def with_quantized_biases(graph: Graph, bits: int, layers=None) -> Graph:
    """The float graph with the biases of ``layers`` (default: every layer) replaced by their
    B-bit values (nothing else changed)."""
    nodes = []
    for n in graph.nodes:
        params = dict(n.params)
        if layer_kind(n) is not None and (layers is None or n.name in layers):
            params["shift" if n.op == "channel_affine" else "bias"] = (
                quantized_bias(layer_bias(n), bits).astype(np.float32))
        nodes.append(Node(n.name, n.op, n.inputs, dict(n.attrs), params))
    return Graph(nodes, f"{graph.name}+b{bits}" if layers is None else graph.name)


def accumulator_node(qgraph, layer: str):
    """The conv/dense/channel-mul product feeding ``layer``'s bias add (before any alignment)."""
    node = qgraph.node(qgraph.node(layer).inputs[0])
    while node.op == "requantize":
        node = qgraph.node(node.inputs[0])
    return node


@dataclass(frozen=True)
class BiasAsAdded:
    """How one variant's integer graph adds one layer's bias."""

    acc_scale: np.ndarray  # s_in * s_w, () or (C,)
    acc_shift: np.ndarray  # k of acc << k at the add (negative: a right shift), per channel
    error: np.ndarray  # |bias as added - float bias| per channel

    @property
    def error_lsb(self) -> np.ndarray:
        """The error in units of the accumulator LSB (above 0.5: coarser than the accumulator)."""
        return self.error / self.acc_scale


def bias_as_added(qgraph, layer: str, float_bias) -> BiasAsAdded:
    add = qgraph.node(layer)
    acc = accumulator_node(qgraph, layer)
    channels = len(np.atleast_1d(float_bias))
    acc_scale = np.broadcast_to(np.asarray(acc.scale, np.float64), (channels,))
    common = np.broadcast_to(np.asarray(add.scale, np.float64), (channels,))
    added = add.params["bias"].astype(np.float64) * common
    shift = np.rint(np.log2(acc_scale / common)).astype(np.int64)
    return BiasAsAdded(acc_scale, shift, np.abs(added - np.asarray(float_bias, np.float64)))


def single_bias_variant(graph: Graph, ranges, base: str, layer: str, bits: int = 8):
    """The int32-acc variant ``base`` of ``graph`` with ONLY ``layer``'s bias replaced by its
    B-bit value. int32-acc adds that value as ``rint(b_B / common)``, which is exactly what the
    B-bit variant adds (same common scale, same rounding, same overflow fitting), and the
    realizer proves every bound of the result as usual."""
    return quantize(with_quantized_biases(graph, bits, {layer}), ranges, variant_options(base))


# ---------------------------------------------------------------------------------------------
# Measurement over real images.
# ---------------------------------------------------------------------------------------------

@dataclass
class Energies:
    """Running sums for one tensor: the float reference's energy and element count, and the
    noise energy of each variant against it."""

    signal: float = 0.0
    count: int = 0
    noise: dict = field(default_factory=dict)
    total: float = 0.0  # sum of the reference (for its standard deviation)
    error_sums: dict = field(default_factory=dict)  # label -> per-channel sum of the error

    def add_reference(self, ref: np.ndarray):
        self.signal += float(np.sum(np.square(ref, dtype=np.float64)))
        self.total += float(np.sum(ref, dtype=np.float64))
        self.count += ref.size

    def add_noise(self, label: str, ref: np.ndarray, approx: np.ndarray):
        diff = ref.astype(np.float64) - approx
        self.noise[label] = self.noise.get(label, 0.0) + float(np.sum(diff * diff))
        axes = tuple(a for a in range(diff.ndim) if a != 1)
        self.error_sums[label] = self.error_sums.get(label, 0.0) + diff.sum(axis=axes)

    def dc_share(self, label: str) -> float:
        """The share of the noise energy that is a constant per channel (the part a corrected
        bias could remove): sum over channels of n_c * mean_c**2, over the noise energy."""
        sums = np.asarray(self.error_sums[label])
        per_channel = self.count / sums.size
        return float(np.sum(np.square(sums)) / per_channel / self.noise[label])

    @property
    def mean_square(self) -> float:
        return self.signal / self.count

    @property
    def std(self) -> float:
        mean = self.total / self.count
        return float(np.sqrt(max(self.mean_square - mean * mean, 0.0)))

    def sqnr(self, label: str) -> float:
        return sqnr_from_energies(self.signal, self.noise[label])


@dataclass
class Top1:
    correct: int = 0
    agree: int = 0  # same top-1 as the float model
    count: int = 0

    def add(self, logits, labels, float_top1):
        top1 = np.asarray(logits).argmax(axis=1)
        self.correct += int(np.sum(top1 == labels))
        self.agree += int(np.sum(top1 == float_top1))
        self.count += len(labels)

    def text(self) -> str:
        return f"{100.0 * self.correct / self.count:.2f} % ({self.correct}/{self.count})"


@dataclass
class Study:
    model: str
    plan: dict
    layers: list  # float graph nodes with a bias
    qgraphs: dict  # variant label -> QGraph
    energies: dict  # tensor name (each layer, and "logits") -> Energies
    top1: dict  # "float32", variant labels, "float+bN" -> Top1
    seconds: float = 0.0
    ablation: "Ablation | None" = None


@dataclass
class Ablation:
    """The integer ``base`` variant with ONE layer's bias taken from ``donor``, layer by layer:
    how much logit noise and how many top-1 changes each layer's short bias causes by itself."""

    base: str
    donor: str
    images: int = 0
    signal: float = 0.0  # energy of the float logits
    base_noise: float = 0.0  # the base variant's logit noise energy
    donor_noise: float = 0.0  # the donor variant's (every bias swapped)
    noise: dict = field(default_factory=dict)  # layer -> logit noise energy vs float
    changed: dict = field(default_factory=dict)  # layer -> images whose top-1 moved off base's

    def sqnr(self, layer: str) -> float:
        return sqnr_from_energies(self.signal, self.noise[layer])

    def noise_change_db(self, layer: str) -> float:
        """How much this one 8-bit bias raises (+) or lowers (-) the base model's logit noise."""
        return float(10.0 * np.log10(self.noise[layer] / self.base_noise))


def measure(session, labels=tuple(VARIANTS), batch_size: int = 32, progress=print) -> Study:
    from qcal.data.cache import iter_batches
    from qcal.reference.float_interpreter import channel_view, run_float
    from qcal.reference.int_interpreter import run_integer

    start = time.perf_counter()
    graph = session.graph
    layers = biased_layers(graph)
    names = [n.name for n in layers]
    qgraphs = {label: session.quantize(variant_options(label)) for label in labels}
    biased_floats = {f"float+b{b}": with_quantized_biases(graph, b) for b in BIAS_BITS}
    energies = {name: Energies() for name in names + ["logits"]}
    top1 = {name: Top1() for name in ["float32", *labels, *biased_floats]}
    selection = session.plan(True).evaluation
    out = graph.output.name
    for x, y in iter_batches(selection, batch_size, session.cache):
        ref = run_float(graph, x, keep=set(names) | {out})
        float_top1 = ref[out].argmax(axis=1)
        top1["float32"].add(ref[out], y, float_top1)
        for name in names:
            energies[name].add_reference(ref[name])
        energies["logits"].add_reference(ref[out])
        for label, qgraph in qgraphs.items():
            values = run_integer(qgraph, x, keep="all")
            for name in names:
                v = values[name]
                node = qgraph.node(name)
                # a layer this variant keeps in float (ResNet v2's BatchNorm on the image) is
                # already a real value; integer layers are dequantized with their scale
                real = v if node.scale is None else v * channel_view(node.scale, v.ndim)
                energies[name].add_noise(label, ref[name], real)
            logits = values[qgraph.output.name]
            energies["logits"].add_noise(label, ref[out], logits)
            top1[label].add(logits, y, float_top1)
            del values
        for label, fgraph in biased_floats.items():
            values = run_float(fgraph, x, keep=set(names) | {out})
            for name in names:
                energies[name].add_noise(label, ref[name], values[name])
            energies["logits"].add_noise(label, ref[out], values[out])
            top1[label].add(values[out], y, float_top1)
        if progress:
            progress(f"  {top1['float32'].count}/{len(selection)} images, "
                     f"{time.perf_counter() - start:.0f} s")
    return Study(session.model.name, session.plan_description(True), layers, qgraphs, energies, top1,
                 time.perf_counter() - start)


def ablate(session, study: Study, images: int, batch_size: int, base: str = "b32acc",
           progress=print) -> Ablation:
    """Each layer's ``single_bias_variant`` of ``base`` on the first ``images`` evaluated images."""
    from qcal.data.cache import iter_batches
    from qcal.data.plan import Selection
    from qcal.reference.float_interpreter import run_float
    from qcal.reference.int_interpreter import run_integer

    start = time.perf_counter()
    donor = ABLATION_DONOR[base]
    result = Ablation(base, donor)
    graphs = {n.name: single_bias_variant(session.graph, session.calibration.ranges, base, n.name)
              for n in study.layers}
    evaluation = session.plan(True).evaluation
    selection = Selection(evaluation.source, evaluation.start,
                          min(evaluation.start + images, evaluation.stop))
    for x, _ in iter_batches(selection, batch_size, session.cache):
        ref = run_float(session.graph, x).astype(np.float64)
        base_logits = run_integer(study.qgraphs[base], x)
        base_top1 = base_logits.argmax(axis=1)
        result.signal += float(np.sum(ref * ref))
        result.base_noise += float(np.sum(np.square(ref - base_logits)))
        donor_logits = run_integer(study.qgraphs[donor], x)
        result.donor_noise += float(np.sum(np.square(ref - donor_logits)))
        for name, qgraph in graphs.items():
            logits = run_integer(qgraph, x)
            result.noise[name] = result.noise.get(name, 0.0) + float(np.sum(np.square(ref - logits)))
            result.changed[name] = (result.changed.get(name, 0)
                                    + int(np.sum(logits.argmax(axis=1) != base_top1)))
        result.images += len(x)
        if progress:
            progress(f"  ablation {result.images}/{len(selection)} images, "
                     f"{time.perf_counter() - start:.0f} s")
    return result


# ---------------------------------------------------------------------------------------------
# Per-layer rows and the report.
# ---------------------------------------------------------------------------------------------

GLUON_PREFIX = re.compile(r"^(vgg|resnetv|cifarresnetv)\d+_")


def short_name(name: str) -> str:
    """Readable layer names: vgg0_conv3_fwd -> conv3, /_blocks.1/_depthwise_conv/Conv ->
    blocks.1/depthwise_conv."""
    for suffix in ("_fwd", "/Conv", "/Gemm", "/MatMul"):
        if name.endswith(suffix):
            name = name[: -len(suffix)]
    name = name.lstrip("/").replace("/_", "/").lstrip("_")
    return GLUON_PREFIX.sub("", name)


def power_of_two_text(x: float) -> str:
    mantissa, exponent = np.frexp(float(x))
    return f"2^{exponent - 1}" if mantissa == 0.5 else f"{x:.2e}"


def scale_text(scale) -> str:
    scale = np.asarray(scale, dtype=np.float64)
    if scale.ndim == 0 or np.all(scale == scale.flat[0]):
        return power_of_two_text(scale.flat[0])
    return f"{power_of_two_text(scale.min())}..{power_of_two_text(scale.max())}"


def shift_text(shift) -> str:
    lo, hi = int(np.min(shift)), int(np.max(shift))
    return f"{lo}" if lo == hi else f"{lo}..{hi}"


def db_text(x: float) -> str:
    return "inf" if np.isposinf(x) else f"{x:.1f}"


def layer_row(study: Study, node: Node) -> dict:
    """Everything the tables and the summary say about one layer (plain numbers)."""
    bias = layer_bias(node)
    energy = study.energies[node.name]
    row = {"layer": short_name(node.name), "name": node.name, "kind": layer_kind(node),
           "channels": len(bias), "bias_absmax": float(np.abs(bias).max(initial=0.0)),
           "spread": bias_spread(bias), "zeroed8": rounded_to_zero(bias, 8),
           "out_std": energy.std, "bias_share": bias_share(bias, energy.mean_square)}
    for bits in BIAS_BITS:
        row[f"step{bits}"] = bias_step(bias, bits)
        row[f"bias_only_sqnr{bits}"] = bias_only_sqnr_db(
            energy.mean_square, quantized_bias(bias, bits) - bias)
        row[f"float_sqnr{bits}"] = energy.sqnr(f"float+b{bits}")
    for label, qgraph in study.qgraphs.items():
        added = bias_as_added(qgraph, node.name, bias)
        row[f"sqnr:{label}"] = energy.sqnr(label)
        row[f"acc_scale:{label}"] = added.acc_scale
        row[f"shift:{label}"] = added.acc_shift
        row[f"err_lsb:{label}"] = float(added.error_lsb.max())
        row[f"err_std:{label}"] = float(added.error.max() / energy.std) if energy.std else np.inf
        row[f"dc:{label}"] = energy.dc_share(label)
    for label, reference in REFERENCE_OF.items():
        if label in study.qgraphs and reference in study.qgraphs:
            row[f"excess:{label}"] = excess_sqnr_db(energy.signal, energy.noise[label],
                                                    energy.noise[reference])
    ab = study.ablation
    if ab is not None and node.name in ab.noise:
        row["ablation_sqnr"] = ab.sqnr(node.name)
        row["ablation_change"] = ab.noise_change_db(node.name)
        row["ablation_changed"] = ab.changed[node.name]
    return row


def markdown_table(header, rows) -> list:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in r) + " |" for r in rows]
    return lines


def sqnr_table(rows, labels) -> list:
    header = ["layer", "kind", "C", "bias absmax", "step b8", "step b9", "step b16",
              "s_acc (per-tensor w)"] + [f"SQNR {lb}" for lb in labels]
    body = [[r["layer"], r["kind"], r["channels"], f"{r['bias_absmax']:.3g}",
             power_of_two_text(r["step8"]), power_of_two_text(r["step9"]),
             power_of_two_text(r["step16"]), scale_text(r["acc_scale:b8"])]
            + [db_text(r[f"sqnr:{lb}"]) for lb in labels] for r in rows]
    return markdown_table(header, body)


def why_table(rows, labels, ablation) -> list:
    header = ["layer", "kind", "max/med abs(b)", "b=0 at b8", "mean b^2 / mean y^2",
              "acc<<k b8", "acc<<k b16",
              "err b8 (acc LSB)", "err b8 / out std", "bias-only SQNR b8", "b9", "b16",
              "float+b8 SQNR", "int b8 excess SQNR", "DC share of error b32acc", "b8"]
    if ablation is not None:
        header += ["logits SQNR, only this bias b8", "logit noise change (dB)", "top-1 moved"]
    if "pc-b8" in labels:
        header += ["acc<<k pc-b8", "err pc-b8 / out std", "int pc-b8 excess SQNR"]
    body = []
    for r in rows:
        line = [r["layer"], r["kind"], f"{r['spread']:.3g}", f"{r['zeroed8']}/{r['channels']}",
                f"{r['bias_share']:.2f}",
                shift_text(r["shift:b8"]), shift_text(r["shift:b16"]),
                f"{r['err_lsb:b8']:.3g}", f"{r['err_std:b8']:.3g}",
                db_text(r["bias_only_sqnr8"]), db_text(r["bias_only_sqnr9"]),
                db_text(r["bias_only_sqnr16"]), db_text(r["float_sqnr8"]),
                db_text(r["excess:b8"]), f"{r['dc:b32acc']:.2f}", f"{r['dc:b8']:.2f}"]
        if ablation is not None:
            line += ([db_text(r["ablation_sqnr"]), f"{r['ablation_change']:+.2f}",
                      r["ablation_changed"]] if "ablation_sqnr" in r else ["-", "-", "-"])
        if "pc-b8" in labels:
            line += [shift_text(r["shift:pc-b8"]), f"{r['err_std:pc-b8']:.3g}",
                     db_text(r.get("excess:pc-b8", float("nan")))]
        body.append(line)
    return markdown_table(header, body)


def accuracy_table(study: Study) -> list:
    logits = study.energies["logits"]
    body = []
    for label, t in study.top1.items():
        sqnr = "-" if label == "float32" else db_text(logits.sqnr(label))
        adjustments = (len(study.qgraphs[label].adjustments) if label in study.qgraphs else "-")
        body.append([label, t.text(), f"{t.agree}/{t.count}", sqnr, adjustments])
    return markdown_table(["variant", "top-1", "same top-1 as float32", "logits SQNR (dB)",
                           "overflow adjustments"], body)


def reasons(row: dict) -> list:
    """Why a layer's 8-bit bias hurts, from its measured statics (the explanation rules)."""
    why = []
    ratio = row["step8"] / float(np.max(row["acc_scale:b8"]))
    if ratio > 1:
        why.append(f"the 8-bit step {power_of_two_text(row['step8'])} is {ratio:.0f}x the "
                   f"accumulator LSB {scale_text(row['acc_scale:b8'])}: the bias is the coarser "
                   f"operand, so it is the one shifted, and its rounding error (up to "
                   f"{row['err_lsb:b8']:.0f} LSB, {row['err_std:b8']:.3f} output std) lands on "
                   f"every output of its channel")
    if row["zeroed8"]:
        why.append(f"{row['zeroed8']} of {row['channels']} channel biases round to 0 "
                   f"(max/median |b| = {row['spread']:.3g} under one power-of-2 scale)")
    if row["bias_share"] > 0.25:
        why.append(f"the bias is large next to the output (mean b^2 = {row['bias_share']:.2f} x "
                   f"mean y^2{': it cancels the accumulator mean' if row['bias_share'] > 1 else ''})")
    if row["kind"] == "channel_affine":
        why.append("channel_affine (pre-activation BN): its accumulator is a single int8 x int8 "
                   "product, so the shift is added to the coarsest accumulator of any layer kind")
    return why


def ranking_key(row: dict):
    """Most harmful first: by the single-layer ablation when it ran, else the bias-only SQNR."""
    return -row["ablation_change"] if "ablation_change" in row else row["bias_only_sqnr8"]


def summary(study: Study, rows, labels, worst: int = 5) -> list:
    lines = []
    logits, top1 = study.energies["logits"], study.top1
    for short, reference in REFERENCE_OF.items():
        if short.endswith("b8") and {short, reference} <= set(labels):
            excess = excess_sqnr_db(logits.signal, logits.noise[short], logits.noise[reference])
            effect = (f"the 8-bit biases add noise worth {db_text(excess)} dB SQNR at the logits"
                      if np.isfinite(excess) else
                      f"the 8-bit biases add no noise at the logits ({short} is the closer to "
                      f"float32 here)")
            lines.append(
                f"- {short} vs {reference} ({variant_options(short).weight_granularity} weights): "
                f"top-1 {top1[short].text()} vs {top1[reference].text()}; logits SQNR "
                f"{db_text(logits.sqnr(short))} vs {db_text(logits.sqnr(reference))} dB: {effect}.")
    lines.append(f"- The same 8-bit biases in the float model alone (float+b8): top-1 "
                 f"{top1['float+b8'].text()} vs float32 {top1['float32'].text()}, logits SQNR "
                 f"{db_text(logits.sqnr('float+b8'))} dB (9 bits: "
                 f"{db_text(logits.sqnr('float+b9'))} dB, 16 bits: "
                 f"{db_text(logits.sqnr('float+b16'))} dB).")
    ranked = sorted(rows, key=ranking_key)[:worst]
    ab = study.ablation
    basis = (f"single-layer ablation (the {ab.base} model with only that layer's bias from "
             f"{ab.donor}), on the first {ab.images} images" if ab is not None
             else "bias-only SQNR at the layer")
    lines.append(f"- Layers whose 8-bit bias hurts most (worst {len(ranked)} of {len(rows)}, "
                 f"ranked by {basis}):")
    short, reference = (ab.donor, ab.base) if ab is not None else ("b8", "b32acc")
    for r in ranked:
        ablation = (f"alone it moves the logit noise by {r['ablation_change']:+.2f} dB "
                    f"(logits SQNR {db_text(r['ablation_sqnr'])} dB) and "
                    f"{r['ablation_changed']} top-1; " if "ablation_sqnr" in r else "")
        lines.append(
            f"  - {r['layer']} ({r['kind']}, {r['channels']} ch): {ablation}bias-only SQNR "
            f"{db_text(r['bias_only_sqnr8'])} dB at 8 bits ({db_text(r['bias_only_sqnr9'])} at 9, "
            f"{db_text(r['bias_only_sqnr16'])} at 16); layer SQNR {short} "
            f"{db_text(r[f'sqnr:{short}'])} vs {reference} {db_text(r[f'sqnr:{reference}'])} dB. "
            f"Why: " + ("; ".join(reasons(r)) or "-"))
    for bits in BIAS_BITS:
        label = f"b{bits}"
        if label in labels:
            coarse = sum(r[f"step{bits}"] > float(np.max(r[f"acc_scale:{label}"])) for r in rows)
            lines.append(f"- {bits}-bit bias coarser than the accumulator (the bias is shifted and "
                         f"keeps its rounding error) in {coarse} of {len(rows)} layers.")
    by_kind = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    lines.append("- Median over layers by kind, 8-bit bias: " + "; ".join(
        f"{k} ({len(v)}): bias-only SQNR {np.median([r['bias_only_sqnr8'] for r in v]):.1f} dB, "
        f"max/median |b| {np.median([r['spread'] for r in v]):.3g}, "
        f"{np.median([r['zeroed8'] / r['channels'] for r in v]):.1%} of biases at 0, "
        f"mean b^2 / mean y^2 {np.median([r['bias_share'] for r in v]):.2f}, "
        f"error {np.median([r['err_lsb:b8'] for r in v]):.3g} acc LSB, "
        f"{np.median([r['err_std:b8'] for r in v]):.3g} output std"
        for k, v in by_kind.items()))
    lines.append(f"- Share of the b32acc layer error that is a constant per channel (what bias "
                 f"correction could remove): median {np.median([r['dc:b32acc'] for r in rows]):.2f}, "
                 f"max {max(r['dc:b32acc'] for r in rows):.2f}; with 8-bit biases median "
                 f"{np.median([r['dc:b8'] for r in rows]):.2f}.")
    if ab is not None and ab.noise:
        single = sum(ab.noise[n] - ab.base_noise for n in ab.noise)
        lines.append(f"- Ablation images: the {ab.base} model's logit noise rises by "
                     f"{100 * (ab.donor_noise / ab.base_noise - 1):+.1f} % with every bias at 8 bits "
                     f"({ab.donor}), and by {100 * single / ab.base_noise:+.1f} % summed over the "
                     f"single-layer swaps: the layers' bias errors "
                     + ("reinforce each other (they are constant per channel, so they add "
                        "coherently downstream)" if ab.donor_noise - ab.base_noise > single
                        else "partly cancel") + ".")
    return lines


def report(study: Study) -> list:
    labels = list(study.qgraphs)
    # a layer every variant keeps in float (ResNet v2's BatchNorm on the image) has no integer bias
    rows = [layer_row(study, n) for n in study.layers
            if any(q.node(n.name).is_int for q in study.qgraphs.values())]
    lines = [f"## {study.model}", "",
             f"- Evaluation: {study.plan['evaluation']}",
             f"- Calibration: {study.plan['calibration']}",
             "- Variants: " + "; ".join(f"{k} = `{variant_options(k).label}`" for k in labels),
             f"- Measured in {study.seconds:.0f} s.", "", "### Accuracy", ""]
    lines += accuracy_table(study)
    lines += ["", "### Per layer: bias steps, and layer-output SQNR (dB, cumulative, vs float32)",
              ""] + sqnr_table(rows, labels)
    lines += ["", "### Per layer: why (8-bit bias; per-tensor weights unless marked pc; SQNR in dB)",
              ""] + why_table(rows, labels, study.ablation)
    lines += ["", "### Summary", ""] + summary(study, rows, labels)
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("model", help="a qcal model name or an ONNX file")
    parser.add_argument("--images", type=int, default=256, help="evaluated images")
    parser.add_argument("--calib-images", type=int, default=256, help="calibration images")
    parser.add_argument("--calib-range", help="START:STOP calibration images of the --data source")
    parser.add_argument("--data", help="image source for ImageNet/ONNX models")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help=f"comma-separated subset of {', '.join(VARIANTS)}")
    parser.add_argument("--ablate-images", type=int, default=0,
                        help="also run the single-layer bias ablation on this many images "
                             "(one integer run per layer per batch)")
    parser.add_argument("--ablate-base", default="b32acc", choices=sorted(ABLATION_DONOR),
                        help="the ablation's int32-acc model, given one 8-bit bias at a time "
                             "(pc-b32acc where per-tensor weights are too coarse to see the bias)")
    parser.add_argument("--output", type=Path, help="also write the markdown report here")
    args = parser.parse_args(argv)

    from qcal.drivers.session import ModelSession
    from qcal.errors import QcalError, UsageProblem

    labels = [v for v in args.variants.split(",") if v]
    unknown = [v for v in labels if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variant(s) {', '.join(unknown)} (known: {', '.join(VARIANTS)})")
    if not {"b8", "b16", "b32acc"} <= set(labels):
        parser.error("--variants must include b8, b16 and b32acc (the tables compare them)")
    if args.ablate_images and not {args.ablate_base, ABLATION_DONOR[args.ablate_base]} <= set(labels):
        parser.error(f"--ablate-base {args.ablate_base} needs it and "
                     f"{ABLATION_DONOR[args.ablate_base]} among --variants")
    data = {"num_images": args.images, "calib_images": args.calib_images}
    if args.data:
        data["data"] = args.data
    if args.calib_range:
        data["calib_range"] = args.calib_range
    try:
        session = ModelSession(args.model, data, batch_size=args.batch_size, quiet=True)
        print(f"{args.model}: measuring {', '.join(labels)} on {args.images} images", flush=True)
        progress = lambda m: print(m, file=sys.stderr, flush=True)  # noqa: E731
        study = measure(session, labels, args.batch_size, progress=progress)
        if args.ablate_images:
            study.ablation = ablate(session, study, args.ablate_images, args.batch_size,
                                    args.ablate_base, progress=progress)
    except (QcalError, UsageProblem) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    lines = report(study)
    command = " ".join(["python", "scripts/bias_study.py", *(argv if argv is not None else sys.argv[1:])])
    lines.insert(2, f"- Command: `{command}`")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
