"""Quantize stages: annotate (which tensors become integers) and realize (the integer graph).

==================  ============================================================================
module              what it decides
==================  ============================================================================
``annotate``        per tensor: float, int8 or int32; which activation ranges calibration supplies
``fixed_point``     scales, integer constants and exact rescales (pure functions)
``realize``         the integer ``QGraph``: every rounding, shift and overflow proof, once
``adaround``        learned weight rounding directions (``weight_rounding='adaround'``)
==================  ============================================================================

``quantize`` composes them for one variant.
"""
from __future__ import annotations

from qcal.config import levels_for_bits
from qcal.quant.annotate import annotate
from qcal.quant.realize import realize


def quantize(graph, ranges, options, images=None):
    """The integer graph of ``graph`` under ``options``: annotate -> calibrated ranges ->
    [AdaRound] -> realize.

    ``ranges(options, tensors, levels) -> {tensor: amax}`` supplies the activation ranges annotate
    asks for, each at its tensor's largest level (``CalibrationResult.ranges``). ``images``:
    calibration images, needed by ``weight_rounding='adaround'`` only (its record goes to the
    graph's ``notes['adaround']``)."""
    annotation = annotate(graph, options)
    levels = {t: levels_for_bits(annotation.activation_bits[t]) for t in annotation.required_amax}
    amax = ranges(options, annotation.required_amax, levels)
    if options.weight_rounding != "adaround":
        return realize(graph, amax, options, annotation)
    from qcal.quant.adaround import learn_rounding

    learned = learn_rounding(graph, amax, options, annotation, images)
    qgraph = realize(graph, amax, options, annotation, learned.round_up)
    qgraph.notes["adaround"] = learned.record()
    return qgraph
