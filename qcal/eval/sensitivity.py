"""Evaluate stage, per-layer sensitivity: which layer (or residual block) costs the int8 model its
fidelity to float32.

Each *unit* (a quantizable layer, i.e. a conv2d / dense / channel_affine, or a residual block
found from the graph's structure, ``qcal.ir.graph.residual_blocks``) is measured under variants
of one base configuration, all from the same calibrated ranges (one statistics pass):

==========  ======================================================================================
mode        the variant
==========  ======================================================================================
``float``   the base with only this unit kept in float32 (``float_layers`` + the unit): what the
            network regains when it is not quantized; ``sqnr_cost_db`` = its logit SQNR minus
            the base's, the dB this unit costs
``only``    only this unit quantized, every other layer float32 (its weights, bias and int8
            input); ``noise_share`` = its logit noise energy as a fraction of the base's
``bias``    the base with only this layer's bias at ``bias_bits`` (``layer_bias_bits``);
            ``bias_cost_db`` = the base's logit SQNR minus this one's
==========  ======================================================================================

Every variant is scored label-free against float32 logits of the same images (top-1 agreement,
mean KL, logit SQNR: ``qcal.eval.fidelity.compare``). The variants run on numpy, nothing
compiled: ``engine='integer'`` is the integer reference, which the compiled TVM model equals bit
for bit (``qcal.eval.verify`` checks it for every compiled variant), so its figures are the
integer model's; ``engine='simulated'`` is the fake-quantized float model, which equals it only
when every rescale is an exact shift (power-of-2 scales) and no layer is kept float (float layers
run in float64 there, float32 in the integer model) and is measured here to be about half as fast
as the integer reference (docs/search.md), so the integer reference is the default.

The library entry point for other drivers (``qcal search`` picks float layers from it)::

    rows = layer_sensitivity(graph, ranges, base, images, reference_logits, modes=("float",))
    order = [row["unit"] for row in ranked(rows)]   # the costliest unit first
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from qcal.config import DEFAULT_SENSITIVITY_BIAS_BITS, QuantOptions
from qcal.eval.fidelity import compare
from qcal.ir.graph import Graph, residual_blocks
from qcal.quant import quantize
from qcal.quant.annotate import WEIGHTED_OPS, annotate, has_bias
from qcal.reference.int_interpreter import run_integer, run_sharing_prefix, run_simulated, shared_prefix

MODES = ("float", "only", "bias")
ENGINES = ("integer", "simulated")
DEFAULT_BIAS_BITS = DEFAULT_SENSITIVITY_BIAS_BITS  # what ``bias`` gives one layer at a time
# what each mode's ranking reads, and whether a larger value means a costlier unit
RANK_KEYS = {"float": ("sqnr_cost_db", True), "only": ("noise_share", True),
             "bias": ("bias_cost_db", True)}
METRICS = ("sqnr_logits_db", "agree_top1", "kl")


@dataclass(frozen=True)
class Unit:
    """A layer or a residual block: what one sensitivity row is about."""

    name: str  # the layer's name, or the block's add
    kind: str  # "layer" or "block"
    op: str  # the layer's op, "block" for a block
    position: int  # network order: the index of the unit's last node in the graph
    nodes: tuple  # the graph nodes the unit covers


@dataclass(frozen=True)
class Probe:
    """One variant of the base configuration: which unit, which mode, the options."""

    unit: Unit
    mode: str
    options: QuantOptions


def sensitivity_units(graph: Graph, blocks: bool = True) -> list:
    """The quantizable layers (``WEIGHTED_OPS``) and, with ``blocks``, the residual blocks, in
    network order (a block after the layers it ends with)."""
    index = {n.name: i for i, n in enumerate(graph.nodes)}
    units = [Unit(n.name, "layer", n.op, index[n.name], (n.name,))
             for n in graph.nodes if n.op in WEIGHTED_OPS]
    if blocks:
        units += [Unit(add, "block", "block", index[add], members)
                  for add, members in residual_blocks(graph)]
    return sorted(units, key=lambda u: (u.position, u.kind != "layer"))


def probes(graph: Graph, base: QuantOptions, units, modes=MODES,
           bias_bits: int = DEFAULT_BIAS_BITS) -> list:
    """The variants that measure ``units`` under ``modes``. ``only`` is left out for a unit of
    which nothing would be integer on its own (a channel_affine needs an integer input), and
    ``bias`` for blocks and layers without a bias."""
    unknown = [m for m in modes if m not in MODES]
    if unknown:
        raise ValueError(f"unknown sensitivity mode(s) {unknown} (known: {', '.join(MODES)})")
    every = [n.name for n in graph.nodes[1:]]
    out = []
    for unit in units:
        for mode in modes:
            if mode == "float":
                options = replace(base, float_layers=base.float_layers + unit.nodes)
            elif mode == "only":
                members = set(unit.nodes)
                options = replace(base, float_layers=tuple(
                    n for n in every if n not in members or n in base.float_layers))
                if not set(annotate(graph, options).decisions) & members:
                    continue
            else:
                node = graph.node(unit.name)
                if unit.kind != "layer" or not has_bias(node) or unit.name in base.float_layers:
                    continue
                kept = tuple(p for p in base.layer_bias_bits if p[0] != unit.name)
                options = replace(base, layer_bias_bits=kept + ((unit.name, bias_bits),))
            out.append(Probe(unit, mode, options))
    return out


def simulation_is_exact(qgraph) -> bool:
    """Whether ``run_simulated`` computes the integer model's values exactly: every rescale is a
    shift (power-of-2 scale ratios) and no float op but a dequantize runs after an integer op
    (the float ops before the first one are the ones the tests find equal as well)."""
    rescales_exact = all(n.attrs.get("kind") == "shift" for n in qgraph.nodes
                         if n.op == "requantize")
    seen_int = False
    for node in qgraph.nodes[1:]:
        if node.is_int:
            seen_int = True
        elif seen_int and node.op != "dequantize":  # float64 here, float32 in the integer model
            return False
    return rescales_exact


def run_variant(graph: Graph, ranges, options: QuantOptions, images: np.ndarray,
                engine: str = "integer", batch_size: int = 64, progress=None) -> tuple:
    """(logits float32, exact) of one variant on ``images``; ``exact`` says whether they are the
    integer model's (always for the integer engine)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    qgraph = quantize(graph, ranges, options)
    run = run_integer if engine == "integer" else run_simulated
    logits = []
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        logits.append(np.asarray(run(qgraph, batch), dtype=np.float32))
        if progress is not None:
            progress.update(len(batch))
    exact = engine == "integer" or simulation_is_exact(qgraph)
    return np.concatenate(logits), exact


def measure(graph: Graph, ranges, options: QuantOptions, images: np.ndarray,
            reference_logits: np.ndarray, engine: str = "integer", batch_size: int = 64,
            progress=None) -> dict:
    """Label-free fidelity of one variant against ``reference_logits`` (float32 on the same
    images): ``agree_top1`` (%), ``kl``, ``sqnr_logits_db``, and ``exact`` (see ``run_variant``)."""
    logits, exact = run_variant(graph, ranges, options, images, engine, batch_size, progress)
    return {**compare(reference_logits, logits), "exact": exact}


def every_layer_float(graph: Graph, base: QuantOptions) -> QuantOptions:
    """``base`` with every layer kept float32: where the ``only`` variants begin alike."""
    return replace(base, float_layers=tuple(n.name for n in graph.nodes[1:]))


def run_variants(graph: Graph, ranges, variants, images: np.ndarray, engine: str = "integer",
                 batch_size: int = 64, references=(), progress=None) -> list:
    """``run_variant`` for several variants at once, the same logits: each variant continues
    from whichever of ``references`` (options, e.g. the base and ``every_layer_float``) shares
    the longest start with it, so what variants have in common with a reference is computed
    once per batch (a variant that keeps a late layer float repeats almost nothing)."""
    if engine not in ENGINES:
        raise ValueError(f"engine must be one of {', '.join(ENGINES)}, not {engine!r}")
    qgraphs = [quantize(graph, ranges, options) for options in variants]
    refs = [quantize(graph, ranges, options) for options in references] or qgraphs[:1]
    chosen = [max(range(len(refs)), key=lambda r: shared_prefix(refs[r], q)) for q in qgraphs]
    logits = [[] for _ in qgraphs]
    for start in range(0, len(images), batch_size):
        batch = images[start:start + batch_size]
        for r, ref in enumerate(refs):
            members = [i for i, c in enumerate(chosen) if c == r]
            if not members:
                continue
            outs = run_sharing_prefix(ref, [qgraphs[i] for i in members], batch, engine)
            for i, out in zip(members, outs):
                logits[i].append(np.asarray(out, dtype=np.float32))
        if progress is not None:
            progress.update(len(batch))
    return [(np.concatenate(parts), engine == "integer" or simulation_is_exact(q))
            for parts, q in zip(logits, qgraphs)]


def sensitivity_rows(units, measured: dict, base_metrics: dict) -> list:
    """One row per unit (network order) from ``measured`` ({(unit name, mode): metrics}): the
    unit, then per mode its metrics (``float_sqnr_logits_db``, ...) and the mode's cost."""
    base_db = base_metrics["sqnr_logits_db"]
    rows = []
    for position, unit in enumerate(units):
        row = {"order": position, "unit": unit.name, "kind": unit.kind, "op": unit.op,
               "nodes": len(unit.nodes)}
        for mode in MODES:
            metrics = measured.get((unit.name, mode))
            for key in METRICS:
                row[f"{mode}_{key}"] = np.nan if metrics is None else metrics[key]
            db = row[f"{mode}_sqnr_logits_db"]
            if mode == "float":
                row["sqnr_cost_db"] = db - base_db
            elif mode == "only":
                row["noise_share"] = 10.0 ** ((base_db - db) / 10.0)
            else:
                row["bias_cost_db"] = base_db - db
        rows.append(row)
    return rows


def ranked(rows, mode: str = "float", kind: str | None = None) -> list:
    """``rows`` ordered costliest first by ``mode``'s cost (``RANK_KEYS``), units that mode did
    not measure left out; ``kind`` 'layer' or 'block' keeps only those."""
    key, descending = RANK_KEYS[mode]
    kept = [r for r in rows if not np.isnan(r[key]) and (kind is None or r["kind"] == kind)]
    return sorted(kept, key=lambda r: (-r[key] if descending else r[key], r["order"]))


def layer_sensitivity(graph: Graph, ranges, base: QuantOptions, images: np.ndarray,
                      reference_logits: np.ndarray, modes=MODES,
                      bias_bits: int = DEFAULT_BIAS_BITS, engine: str = "integer",
                      blocks: bool = True, batch_size: int = 64) -> tuple:
    """(rows in network order, base metrics): every unit of ``graph`` measured under ``modes``
    (see the module docstring). ``ranges`` is ``CalibrationResult.ranges`` (one statistics pass
    serves every variant), ``images`` float32 NCHW, ``reference_logits`` float32's logits of
    them. Drivers that store and resume each variant use ``probes`` and ``measure`` directly."""
    units = sensitivity_units(graph, blocks)
    made = probes(graph, base, units, modes, bias_bits)
    runs = run_variants(graph, ranges, [base] + [p.options for p in made], images, engine,
                        batch_size, references=(base, every_layer_float(graph, base)))
    scored = [{**compare(reference_logits, logits), "exact": exact} for logits, exact in runs]
    measured = {(p.unit.name, p.mode): metrics for p, metrics in zip(made, scored[1:])}
    return sensitivity_rows(units, measured, scored[0]), scored[0]
