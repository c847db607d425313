"""Quantize stages: annotate (which tensors become integers) and realize (the integer graph).

==================  ============================================================================
module              what it decides
==================  ============================================================================
``annotate``        per tensor: float, int8 or int32; which activation ranges calibration supplies
``fixed_point``     scales, integer constants and exact rescales (pure functions)
``realize``         the integer ``QGraph``: every rounding, shift and overflow proof, once
``bias_correction`` empirical bias correction: biases re-estimated from the integer model's means
``adaround``        learned weight rounding directions (``weight_rounding='adaround'``)
==================  ============================================================================

``quantize`` composes them for one variant.
"""
from __future__ import annotations

import logging
from dataclasses import replace

from qcal.config import EXACT_INTERMEDIATE_BITS, levels_for_bits
from qcal.errors import QcalError
from qcal.quant.annotate import annotate
from qcal.quant.realize import realize

log = logging.getLogger("qcal.quant")


def quantize(graph, ranges, options, correction=None, images=None):
    """The integer graph of ``graph`` under ``options``: annotate -> calibrated ranges ->
    (AdaRound) -> (bias correction) -> realize.

    ``ranges(options, tensors, levels) -> {tensor: amax}`` supplies the activation ranges annotate
    asks for, each at its tensor's largest level (``CalibrationResult.ranges``). ``correction``
    (a ``bias_correction.CorrectionData``) is what ``bias_correction='empirical'`` measures on.
    ``images``: calibration images, which ``weight_rounding='adaround'`` learns from (its record
    goes to the graph's ``notes['adaround']``); bias correction then measures the model with the
    learned rounding."""
    from qcal.quant.bias_correction import correct_biases, correctable_layers

    annotation = annotate(graph, options)
    levels = {t: levels_for_bits(annotation.activation_bits[t]) for t in annotation.required_amax}
    amax = ranges(options, annotation.required_amax, levels)
    wide_amax = None
    if options.intermediate_bits != EXACT_INTERMEDIATE_BITS:
        # narrowed int32 tensors take their abs-max (Relay's power-of-2 scale of the range),
        # whatever method picks the int8 ranges
        wide_amax = ranges(replace(options, activation_method="max"), annotation.int32_tensors)
    learned = None
    if options.weight_rounding == "adaround":
        from qcal.quant.adaround import learn_rounding

        learned = learn_rounding(graph, amax, options, annotation, images, wide_amax=wide_amax)
    round_up = learned.round_up if learned else None
    if options.bias_correction != "none":
        if correction is None:
            raise QcalError("bias correction needs the calibration images (no CorrectionData)")
        graph, corrections = correct_biases(
            graph, lambda g: realize(g, amax, options, annotation, round_up, wide_amax),
            correctable_layers(graph, annotation), correction)
        for c in corrections:
            log.debug("%s", c.summary())
    qgraph = realize(graph, amax, options, annotation, round_up, wide_amax)
    if learned:
        qgraph.notes["adaround"] = learned.record()
    return qgraph
