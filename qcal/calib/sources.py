"""Calibrate stage, tensor sources: where the statistics pass gets every graph tensor's float values.

A tensor source has one method, ``run(batch, observe)``, which calls ``observe(tensor name, float32
array)`` once per graph tensor, in graph order (the array is only valid during the call), and a
``description`` recorded in calibration files. ``GraphInterpreter`` here works for every model qcal
imports; a model family may offer a faster source of the same values (Gluon models: MXNet's own
executor, ``qcal.families.mxnet_internals``), tested against this one.
"""
from __future__ import annotations

import numpy as np

from qcal.reference.float_interpreter import run_float


class GraphInterpreter:
    """The numpy float interpreter of the imported graph."""

    description = "qcal numpy float interpreter"

    def __init__(self, graph):
        self.graph = graph

    def run(self, batch: np.ndarray, observe):
        run_float(self.graph, batch, observe=observe)
