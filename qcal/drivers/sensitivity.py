"""The sensitivity driver: per layer and residual block of one model, what quantizing it costs.

The measurement itself is ``qcal.eval.sensitivity``; this module feeds it one model's session
(its one statistics pass, its label-free images and float32 logits).
"""
from __future__ import annotations

from qcal.config import QuantOptions
from qcal.eval.sensitivity import DEFAULT_BIAS_BITS, MODES, layer_sensitivity

DEFAULT_SENSITIVITY_IMAGES = 64  # label-free images each variant runs on (numpy, no compile)


def rank_layers(session, base: QuantOptions, images: int = DEFAULT_SENSITIVITY_IMAGES,
                modes=MODES, bias_bits: int = DEFAULT_BIAS_BITS, engine: str = "integer",
                blocks: bool = True) -> tuple:
    """(rows in network order, base metrics) of ``qcal.eval.sensitivity.layer_sensitivity`` for a
    ``ModelSession``: its calibration (one statistics pass) and its first ``images`` fidelity
    (else evaluation) images, scored against the model's own float32 logits of them."""
    x = session.fidelity_images(images)
    return layer_sensitivity(session.graph, session.calibration.ranges, base, x,
                             session.float_logits(x), modes=modes, bias_bits=bias_bits,
                             engine=engine, blocks=blocks, batch_size=session.batch_size)
