"""Evaluate stage: run a model over images and measure it against labels and against float32.

==================  ==========================================================================
module              what it measures
==================  ==========================================================================
``evaluate``        top-1 / top-5 of a runner over an image selection (per-image predictions)
``fidelity``        label-free agreement with float32: top-1 agreement, KL, SQNR (defined once)
``layer_errors``    per layer: the integer model's SQNR and bias error against float
==================  ==========================================================================
"""
