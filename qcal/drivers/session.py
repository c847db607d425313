"""The one visible driver: load -> import -> annotate -> calibrate -> realize -> compile -> evaluate.

``ModelSession`` holds what every variant of one model shares, each computed at most once and only
when first needed: the loaded network, its data plan, the imported float graph, the calibration
statistics (one pass over the calibration images) and the float32 result.
"""
from __future__ import annotations

import functools
import gc
import logging
import time
from pathlib import Path

import numpy as np

from qcal.config import DEFAULT_BATCH_CACHE_DIR, DEFAULT_BATCH_SIZE, DEFAULT_VERIFY_IMAGES
from qcal.data.cache import BatchCache, ImageBatches, iter_batches
from qcal.data.plan import plan_data
from qcal.data.preprocessing import PREPROCESSING_KEYS
from qcal.errors import stop_if_interrupted
from qcal.eval.evaluate import evaluate
from qcal.families import resolve_model

log = logging.getLogger("qcal.session")

SQNR_IMAGES = 16  # per-layer SQNR runs the numpy references: a few images say enough


class ModelSession:
    def __init__(self, model: str, data: dict | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 params=None, pretrained: bool = False, seed: int = 0, quiet: bool = False,
                 cache_dir: Path = DEFAULT_BATCH_CACHE_DIR, calibration_file=None,
                 verify_images: int = DEFAULT_VERIFY_IMAGES, progress=None):
        self.model = resolve_model(model, params=params, pretrained=pretrained)
        self.spec = self.model.spec
        self.data = dict(data or {})
        self.batch_size = batch_size
        self.seed = seed
        self.quiet = quiet
        self.cache = BatchCache(cache_dir)
        self.calibration_file = calibration_file
        self.verify_images = verify_images
        # progress(total, description) -> a context manager with update(n); None: tqdm bars
        self.progress = progress
        self._plans = {}
        self._graph = None
        self._calibration = None
        self._given_evaluation = None

    # --- load -------------------------------------------------------------------------------
    @property
    def identity(self) -> dict:
        return self.model.identity

    @property
    def display_name(self) -> str:
        return self.model.display_name

    @property
    def input_shape(self) -> tuple:
        """(C, H, W) the imported graph takes."""
        return self.model.input_shape(self.preprocessing)

    @functools.cached_property
    def preprocessing(self):
        """The data options' preprocessing keys over what the model declares (warned once when
        they contradict it)."""
        return self.model.preprocessing({k: self.data.get(k) for k in PREPROCESSING_KEYS})

    def plan(self, needs_calibration: bool):
        if needs_calibration not in self._plans:
            d = self.data
            preprocessing = self.preprocessing
            self._plans[needs_calibration] = plan_data(
                self.model.evaluation_source(d.get("data"), preprocessing),
                self.model.default_calibration_source(), num_images=d.get("num_images"),
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
        from qcal.report.tables import progress_bar

        if self.progress is not None:
            return self.progress(total, f"{self.model.name} {label}")
        return progress_bar(total, f"{self.model.name} {label}", self.quiet)

    # --- import, calibrate --------------------------------------------------------------------
    @property
    def graph(self):
        """qcal's float graph of the model, BatchNorm folded (imported once)."""
        if self._graph is None:
            self._graph = self.model.import_graph(self.input_shape)
        return self._graph

    def collect_statistics(self, bins: int | None = None):
        """One pass over the calibration images (MXNet's executor for Gluon models, the numpy
        interpreter for ONNX): the statistics and the image selection they came from."""
        from qcal.calib.collect import collect_statistics
        from qcal.config import DEFAULT_HISTOGRAM_BINS

        selection = self.plan(True).calibration
        batches = ImageBatches(selection, self.batch_size, self.cache)  # one batch in memory
        start = time.perf_counter()
        source = self.model.tensor_source(self.graph)
        statistics = collect_statistics(self.graph, batches, progress=not self.quiet,
                                        bins=DEFAULT_HISTOGRAM_BINS if bins is None else bins,
                                        source=source)
        log.info("%s: statistics over %d calibration images in %.1f s, reading the batches "
                 "included (%s)", self.model.name,
                 len(selection), time.perf_counter() - start, source.description)
        return statistics, selection

    @property
    def calibration(self):
        """Every method's ranges: from ``calibration_file``, or one statistics pass."""
        if self._calibration is None:
            from qcal.calib.result import CalibrationResult

            if self.calibration_file is not None:
                self._calibration = CalibrationResult.load(self.calibration_file, graph=self.graph)
            else:
                self._calibration = CalibrationResult.from_statistics(
                    self.collect_statistics()[0])
        return self._calibration

    def save_statistics(self, path):
        """One statistics pass, saved as a calibration file at ``path`` (for ``adopt_statistics``
        elsewhere: a cluster ships the file, not the tensors)."""
        from qcal.calib.result import CalibrationResult

        CalibrationResult.from_statistics(self.collect_statistics()[0]).save(path)

    def adopt_statistics(self, path):
        """Take the ranges of a pass of this run that ``save_statistics`` wrote to ``path``. It
        counts as this session's own pass (the records say so, as for ``calibration``)."""
        from qcal.calib.result import CalibrationResult

        calibration = CalibrationResult.load(path, graph=self.graph)
        calibration.source = CalibrationResult.source  # not a file the user gave: the pass's
        self._calibration = calibration

    def check_variants(self, variants):
        """Before any work starts: refuse a ``float_layers`` name the model lacks, a calibration
        file for another model, or one lacking a method's statistics."""
        from qcal.quant.annotate import check_float_layers

        for options in variants:
            if options.float_layers:
                check_float_layers(self.graph, options)
        if self.calibration_file is None:
            return
        for options in variants:
            self.calibration.require(options.activation_method)

    # --- realize, compile, evaluate -----------------------------------------------------------
    def quantize(self, options):
        """The integer graph for one variant (realized, not yet compiled)."""
        from qcal.quant import quantize

        return quantize(self.graph, self.calibration.ranges, options)

    def _run_selections(self, runner, label, plan, evaluation=None):
        """(evaluation result, fidelity result or None) for one runner; ``evaluation``: the
        evaluation images' result already computed (merged shards), not run again."""
        outcomes = []
        for selection, given in ((plan.evaluation, evaluation), (plan.fidelity, None)):
            if given is not None:
                outcomes.append(given)
                continue
            if selection is None:
                outcomes.append(None)
                continue
            with self._progress(len(selection), label) as bar:
                outcomes.append(evaluate(runner, selection, self.batch_size, self.cache, bar))
        return outcomes

    def evaluate(self, options=None, evaluation=None):
        """(EvalResult, fidelity EvalResult or None, extra record fields) for float32 (options
        None) or one int8 variant. Nothing the run compiled outlives it. ``evaluation``: the
        result on the evaluation images, already computed by ``evaluate_range`` over its
        shards and merged (``qcal.eval.evaluate.merge_results``): everything else is done here."""
        self._given_evaluation = evaluation
        try:
            outcome = (self._evaluate_float() if options is None
                       else self._evaluate_int8(options))
        finally:
            self._given_evaluation = None
        # TVMScript's ``T.prim_func`` keeps the ``inspect.stack()`` of its caller in a reference
        # cycle (tvm/tirx/script/parser/entry.py), and a frame keeps its locals after it returns:
        # a compile leaves every frame above it (the compiled model, the variant's results, the
        # statistics pass's batches) to the cyclic collector, whose full collections may come
        # many variants later. Collected here, once the variant's frames have all returned.
        gc.collect()
        return outcome

    def _evaluate_float(self):
        runner = self.model.float_runner(self.graph, self.batch_size)
        result, fidelity = self._run_selections(runner, "float32", self.plan(False),
                                                self._given_evaluation)
        return result, fidelity, {}

    def evaluate_range(self, options, start: int, stop: int):
        """The EvalResult of float32 (``options`` None) or one int8 variant on the evaluation
        images [start, stop) of the fixed order only: one shard of a variant. Nothing is verified
        here (``evaluate`` does that once for the variant)."""
        from qcal.data.plan import Selection

        evaluation = self.plan(options is not None).evaluation
        selection = Selection(evaluation.source, evaluation.start + start, evaluation.start + stop)
        label = "float32" if options is None else options.label
        if options is None:
            runner = self.model.float_runner(self.graph, self.batch_size)
        elif options.simulate:
            runner = self._simulated_runner(self.quantize(options))
        else:
            from qcal.backend.tvm.compile import compile_model

            runner = compile_model(self.quantize(options), self.batch_size).run
        with self._progress(len(selection), f"{label} [{start}:{stop}]") as bar:
            result = evaluate(runner, selection, self.batch_size, self.cache, bar)
        del runner
        gc.collect()  # as in ``evaluate``: the compile's frames hold the model in a cycle
        return result

    def layer_sqnr(self, qgraph, images: int = SQNR_IMAGES) -> list:
        """Per quantized tensor: SQNR of the integer model's value against float (numpy
        references), on the first ``images`` fidelity (else evaluation) images."""
        from qcal.eval.layer_errors import layer_errors

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

    def verification_images(self, count: int) -> np.ndarray:
        """The first ``count`` calibration images (evaluation images when there are none), as
        many as there are."""
        plan = self.plan(True)
        selection = plan.calibration or plan.evaluation
        batches, have = [], 0
        for x, _ in iter_batches(selection, self.batch_size, self.cache):
            if have >= count:
                break
            batches.append(x)
            have += len(x)
        if not batches:
            return np.zeros((0,) + tuple(self.input_shape), np.float32)
        return np.concatenate(batches)[:count]

    def verify(self, qgraph, compiled, label: str):
        """Raise ``VerificationFailed`` unless ``compiled`` equals ``qgraph``'s numpy integer
        reference on ``verify_images`` calibration images (``qcal.eval.verify``)."""
        from qcal.eval.verify import verify_compiled

        verification = verify_compiled(qgraph, self.verification_images(self.verify_images),
                                       compiled.run, compiled.run_probe,
                                       f"{self.model.name} {label}")
        log.info("%s %s: %s", self.model.name, label,
                 f"equals its integer reference on {verification.images} calibration image(s) "
                 f"({verification.check}, {verification.seconds:.2f} s)" if verification.images
                 else "not verified (verify_images 0)")
        return verification

    @staticmethod
    def _simulated_runner(qgraph):
        from qcal.reference.int_interpreter import run_simulated

        def runner(x):
            return run_simulated(qgraph, x).astype(np.float32)

        return runner

    def _evaluate_simulated(self, qgraph, options):
        """The fake-quantized float model of ``qgraph`` (``run_simulated``): nothing compiled,
        nothing to verify against."""
        result, fidelity = self._run_selections(self._simulated_runner(qgraph), options.label,
                                                self.plan(True), self._given_evaluation)
        return result, fidelity, {"simulated": True, "verify_images_asked": self.verify_images}

    def _evaluate_int8(self, options):
        qgraph = self.quantize(options)
        for line in qgraph.report():
            log.info("%s", line)
        if options.simulate:
            result, fidelity, extra = self._evaluate_simulated(qgraph, options)
        else:
            result, fidelity, extra = self._evaluate_compiled(qgraph, options)
        layers = self.layer_sqnr(qgraph)
        worst = min(layers, key=lambda r: r["sqnr_db"]) if layers else None
        extra.update({
            "counts": qgraph.counts(), "overflow_adjustments": [str(a) for a in qgraph.adjustments],
            "calibration": {"source": self.calibration.source,
                            "images": self.calibration.num_images},
            "layers": layers,
            "metrics": {"sqnr_min_db": worst["sqnr_db"] if worst else float("nan"),
                        "sqnr_min_layer": worst["tensor"] if worst else ""}})
        return result, fidelity, extra

    def _evaluate_compiled(self, qgraph, options):
        from qcal.backend.tvm.compile import compile_model

        start = time.perf_counter()
        compiled = compile_model(qgraph, self.batch_size)
        stop_if_interrupted()  # a Ctrl-C inside TVM's build may not have stopped it
        compile_seconds = time.perf_counter() - start
        verification = self.verify(qgraph, compiled, options.label)
        result, fidelity = self._run_selections(compiled.run, options.label, self.plan(True),
                                                self._given_evaluation)
        extra = {"compile_seconds": round(compile_seconds, 2), **verification.record(),
                 "verify_images_asked": self.verify_images,
                 "compile_cache_hit": compiled.build.cache_hit}
        return result, fidelity, extra

    def close(self):
        self.model.close()
        self._graph = None
        self._calibration = None
