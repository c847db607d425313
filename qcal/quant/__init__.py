"""Quantize stages: annotate (which tensors become integers) and realize (the integer graph).

==================  ============================================================================
module              what it decides
==================  ============================================================================
``annotate``        per tensor: float, int8 or int32; which activation ranges calibration supplies
``fixed_point``     scales, integer constants and exact rescales (pure functions)
``realize``         the integer ``QGraph``: every rounding, shift and overflow proof, once
==================  ============================================================================

``quantize`` composes them for one variant.
"""
from __future__ import annotations

from qcal.config import levels_for_bits
from qcal.quant.annotate import annotate
from qcal.quant.realize import realize


def quantize(graph, ranges, options):
    """The integer graph of ``graph`` under ``options``: annotate -> calibrated ranges -> realize.

    ``ranges(options, tensors, levels) -> {tensor: amax}`` supplies the activation ranges annotate
    asks for, each at its tensor's largest level (``CalibrationResult.ranges``)."""
    annotation = annotate(graph, options)
    levels = {t: levels_for_bits(annotation.activation_bits[t]) for t in annotation.required_amax}
    return realize(graph, ranges(options, annotation.required_amax, levels), options, annotation)
