"""The one visible driver: load -> import -> annotate -> calibrate -> realize -> compile -> evaluate.

``ModelSession`` holds what every variant of one model shares, each computed at most once and only
when first needed: the loaded network, its data plan, the imported float graph, the calibration
statistics (one pass over the calibration images) and the float32 result.
"""
from __future__ import annotations

import dataclasses
import functools
import logging
import time
from pathlib import Path

import numpy as np

from .datasets import IMAGENET_PREPROCESSING, BatchCache, iter_batches, plan_data, sha256_file
from .errors import QcalError
from .evaluate import MXNetFloatRunner, evaluate
from .models import get_spec, load_model, onnx_preprocessing

log = logging.getLogger("qcal.pipeline")

DEFAULT_CACHE_DIR = Path(".qcal-cache/batches")
SQNR_IMAGES = 16  # per-layer SQNR runs the numpy references: a few images say enough


def file_digest(path: Path, what: str = "weights file") -> str:
    if not Path(path).is_file():
        raise QcalError(f"{what} not found: {path}")
    return sha256_file(path)[:16]


class ModelSession:
    def __init__(self, model: str, data: dict | None = None, batch_size: int = 64,
                 params=None, pretrained: bool = False, seed: int = 0, quiet: bool = False,
                 cache_dir: Path = DEFAULT_CACHE_DIR, calibration_file=None):
        self.model = model
        self.spec = get_spec(model)
        self.data = dict(data or {})
        self.batch_size = batch_size
        self.params = params
        self.pretrained = pretrained
        self.seed = seed
        self.quiet = quiet
        self.cache = BatchCache(cache_dir)
        self.calibration_file = calibration_file
        self._net = None
        self._plans = {}
        self._graph = None
        self._calibration = None

    # --- load -------------------------------------------------------------------------------
    @property
    def net(self):
        """The Gluon network (None for ONNX models, which qcal runs through its own graph)."""
        if self._net is None and self.spec.family != "onnx":
            self._net = load_model(self.model, params=self.params, pretrained=self.pretrained)
        return self._net

    @functools.cached_property
    def identity(self) -> dict:
        """What the weights are, read once: a file replaced mid-sweep cannot mislabel results."""
        weights = self.params or self.spec.embedded_params or (
            self.model if self.spec.family == "onnx" else None)
        return {"name": self.model,
                "weights_sha256": file_digest(weights) if weights else "model-store",
                "pretrained": self.pretrained}

    @property
    def display_name(self) -> str:
        """The model's name in tables: registry name, or an ONNX file's stem."""
        return Path(self.model).stem if self.spec.family == "onnx" else self.model

    @property
    def input_shape(self) -> tuple:
        """(C, H, W) the imported graph takes: ImageNet models follow --input-size."""
        if self.spec.family != "imagenet-zoo":
            return tuple(self.spec.input_shape)
        size = self.preprocessing.input_size
        return (self.spec.input_shape[0], size, size)

    @property
    def preprocessing(self):
        base = (onnx_preprocessing(self.model) if self.spec.family == "onnx"
                else IMAGENET_PREPROCESSING)
        overrides = {k: self.data[k] for k in ("input_size", "crop_ratio", "mean", "std")
                     if self.data.get(k) is not None}
        return dataclasses.replace(base, **overrides)

    def plan(self, needs_calibration: bool):
        if needs_calibration not in self._plans:
            d = self.data
            preprocessing = self.preprocessing
            self._plans[needs_calibration] = plan_data(
                self.spec.family, data=d.get("data"), num_images=d.get("num_images"),
                calib_data=d.get("calib_data"), calib_range=d.get("calib_range"),
                calib_images=d.get("calib_images"), preprocessing=preprocessing,
                calibrate=needs_calibration, fidelity_data=d.get("fidelity_data"),
                fidelity_crops=d.get("fidelity_crops"), fidelity_seed=self.seed,
                calib_crops=d.get("calib_crops"))
        return self._plans[needs_calibration]

    def plan_description(self, needs_calibration: bool) -> dict:
        return self.plan(needs_calibration).describe()

    # --- evaluate ---------------------------------------------------------------------------
    def _progress(self, total, label):
        from .report import progress_bar

        return progress_bar(total, f"{self.model} {label}", self.quiet)

    # --- import, calibrate --------------------------------------------------------------------
    @property
    def graph(self):
        """qcal's float graph of the model, BatchNorm folded (imported once)."""
        if self._graph is None:
            from .importer import import_gluon, import_onnx

            if self.spec.family == "onnx":
                self._graph = import_onnx(self.model)
            else:
                self._graph = import_gluon(self.net, self.input_shape, name=self.spec.name)
        return self._graph

    def collect_statistics(self, bins: int | None = None):
        """One pass over the calibration images (MXNet's executor for Gluon models, the numpy
        interpreter for ONNX): the statistics and the image selection they came from."""
        from .calibrate import DEFAULT_HISTOGRAM_BINS, collect_statistics
        from .tensor_sources import tensor_source

        selection = self.plan(True).calibration
        batches = [x for x, _ in iter_batches(selection, self.batch_size, self.cache)]
        start = time.perf_counter()
        source = tensor_source(self.graph, self.net)
        statistics = collect_statistics(self.graph, batches, progress=not self.quiet,
                                        bins=DEFAULT_HISTOGRAM_BINS if bins is None else bins,
                                        source=source)
        log.info("%s: statistics over %d calibration images in %.1f s (%s)", self.model,
                 len(selection), time.perf_counter() - start, source.description)
        return statistics, selection

    @property
    def calibration(self):
        """Every method's ranges: from ``calibration_file``, or one statistics pass."""
        if self._calibration is None:
            from .calibrate import CalibrationResult

            if self.calibration_file is not None:
                self._calibration = CalibrationResult.load(self.calibration_file, graph=self.graph)
            else:
                self._calibration = CalibrationResult.from_statistics(
                    self.collect_statistics()[0])
        return self._calibration

    def check_calibration_file(self, variants):
        """Refuse a calibration file for another model, or one lacking a method's statistics,
        before any work starts."""
        if self.calibration_file is None:
            return
        for options in variants:
            self.calibration.require(options.activation_method)

    # --- realize, compile, evaluate -----------------------------------------------------------
    def quantize(self, options):
        """The integer graph for one variant (realized, not yet compiled)."""
        from .annotate import annotate
        from .realize import realize

        annotation = annotate(self.graph, options)
        if annotation.required_amax:
            self.calibration.require(options.activation_method)
        amax = self.calibration.ranges(options, annotation.required_amax)
        return realize(self.graph, amax, options, annotation)

    def _run_selections(self, runner, label, plan):
        """(evaluation result, fidelity result or None) for one runner."""
        outcomes = []
        for selection in (plan.evaluation, plan.fidelity):
            if selection is None:
                outcomes.append(None)
                continue
            with self._progress(len(selection), label) as bar:
                outcomes.append(evaluate(runner, selection, self.batch_size, self.cache, bar))
        return outcomes

    def evaluate(self, options=None):
        """(EvalResult, fidelity EvalResult or None, extra record fields) for float32 (options
        None) or one int8 variant."""
        if options is not None:
            return self.evaluate_int8(options)
        if self.net is not None:
            runner = MXNetFloatRunner(self.net)
        else:  # ONNX: the imported float graph through TVM
            from .compile import compile_model

            runner = compile_model(self.graph, self.batch_size).run
        result, fidelity = self._run_selections(runner, "float32", self.plan(False))
        return result, fidelity, {}

    def layer_sqnr(self, qgraph, images: int = SQNR_IMAGES) -> list:
        """Per quantized tensor: SQNR of the integer model's value against float (numpy
        references), on the first ``images`` fidelity (else evaluation) images."""
        from .int_reference import layer_errors

        plan = self.plan(True)
        selection = plan.fidelity or plan.evaluation
        batches, count = [], 0
        for x, _ in iter_batches(selection, self.batch_size, self.cache):  # cached batches
            batches.append(x)
            count += len(x)
            if count >= images:
                break
        x = np.concatenate(batches)[:images]
        return layer_errors(qgraph, self.graph, x)

    def evaluate_int8(self, options):
        from .compile import compile_model

        qgraph = self.quantize(options)
        for line in qgraph.report():
            log.info("%s", line)
        start = time.perf_counter()
        compiled = compile_model(qgraph, self.batch_size)
        compile_seconds = time.perf_counter() - start
        result, fidelity = self._run_selections(compiled.run, options.label, self.plan(True))
        layers = self.layer_sqnr(qgraph)
        worst = min(layers, key=lambda r: r["sqnr_db"]) if layers else None
        extra = {"compile_seconds": round(compile_seconds, 2),
                 "compile_cache_hit": compiled.build.cache_hit, "counts": qgraph.counts(),
                 "overflow_adjustments": [str(a) for a in qgraph.adjustments],
                 "calibration": {"source": self.calibration.source,
                                 "images": self.calibration.num_images},
                 "layers": layers,
                 "metrics": {"sqnr_min_db": worst["sqnr_db"] if worst else float("nan"),
                             "sqnr_min_layer": worst["tensor"] if worst else ""}}
        return result, fidelity, extra

    def close(self):
        self._net = None
        self._graph = None
        self._calibration = None
