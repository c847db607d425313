"""The one visible driver: load -> import -> annotate -> calibrate -> realize -> compile -> evaluate.

``ModelSession`` holds what every variant of one model shares, each computed at most once and only
when first needed: the loaded network, its data plan, the imported float graph, the calibration
statistics (one pass over the calibration images) and the float32 result.

Length: the whole pipeline of one model, the class a newcomer reads first (README); what each
stage does lives in its own package, this only composes them.
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
from qcal.errors import UsageProblem, stop_if_interrupted
from qcal.eval.evaluate import evaluate
from qcal.families import resolve_model

log = logging.getLogger("qcal.session")

SQNR_IMAGES = 16  # per-layer SQNR runs the numpy references: a few images say enough


class ModelSession:
    def __init__(self, model: str, data: dict | None = None, batch_size: int = DEFAULT_BATCH_SIZE,
                 params=None, pretrained: bool = False, seed: int = 0, quiet: bool = False,
                 cache_dir: Path = DEFAULT_BATCH_CACHE_DIR, calibration_file=None,
                 verify_images: int = DEFAULT_VERIFY_IMAGES, calib_repeats: int = 1,
                 progress=None):
        self.model = resolve_model(model, params=params, pretrained=pretrained)
        self.spec = self.model.spec
        self.data = dict(data or {})
        self.batch_size = batch_size
        self.seed = seed
        self.quiet = quiet
        self.cache = BatchCache(cache_dir)
        self.calibration_file = calibration_file
        self.verify_images = verify_images
        self.calib_repeats = calib_repeats  # calibration subsets (qcal.data.calib_subsets)
        self.statistics_passes = 0  # statistics passes run (one per calibration subset used)
        # progress(total, description) -> a context manager with update(n); None: tqdm bars
        self.progress = progress
        self._plans = {}
        self._graph = None
        self._calibration = None
        self._subset_calibrations = {}  # subset index -> CalibrationResult
        self._correction = {}
        self._equalized = None
        self._given_evaluation = None
        self._logits_to = ({}, {}, True)  # see evaluate

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

    def plan_description(self, needs_calibration: bool, subset: int = 0) -> dict:
        """The data plan as results record it, its calibration images those of calibration
        subset ``subset`` when there are several."""
        description = self.plan(needs_calibration).describe()
        # subset 0 of disjoint subsets is the plan's own calibration: the same description
        if needs_calibration and self.calibration_file is None and self.calib_repeats > 1:
            description["calibration"] = self.calibration_subsets.subsets[subset].describe()
        return description

    @functools.cached_property
    def calibration_subsets(self):
        """The ``calib_repeats`` calibration subsets (``qcal.data.calib_subsets``); subset 0 is
        the plan's own calibration images whenever they can be (disjoint, crops)."""
        from qcal.data.calib_subsets import calibration_subsets

        plan = self.plan(True)
        return calibration_subsets(plan.calibration, plan.evaluation, self.calib_repeats,
                                   self.seed)

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

    def collect_statistics(self, bins: int | None = None, graph=None, selection=None):
        """One pass over the calibration images (MXNet's executor for Gluon models, the numpy
        interpreter for ONNX and for a transformed ``graph``): the statistics and the image
        selection they came from. ``selection``: other calibration images than the plan's (a
        calibration subset)."""
        from qcal.calib.collect import collect_statistics
        from qcal.config import DEFAULT_HISTOGRAM_BINS

        graph = self.graph if graph is None else graph
        selection = selection or self.plan(True).calibration
        self.statistics_passes += 1
        batches = ImageBatches(selection, self.batch_size, self.cache)  # one batch in memory
        start = time.perf_counter()
        source = self.model.tensor_source(graph)
        statistics = collect_statistics(graph, batches, progress=not self.quiet,
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
                self._calibration = self.calibration_for(0)
        return self._calibration

    def calibration_for(self, subset: int = 0):
        """Every method's ranges from calibration subset ``subset`` (one statistics pass each,
        the first time it is asked for); subset 0 is ``calibration`` itself."""
        from qcal.calib.result import CalibrationResult

        if self.calibration_file is not None:
            if subset:
                raise UsageProblem("calib_repeats needs calibration images, not a calibration "
                                   "file (--calib)")
            return self.calibration
        if subset not in self._subset_calibrations:  # a method's ranges: when a variant asks
            self._subset_calibrations[subset] = CalibrationResult.from_statistics(
                self.collect_statistics(selection=self._subset_selection(subset))[0], methods=())
        return self._subset_calibrations[subset]

    def _subset_selection(self, subset: int):
        """Calibration subset ``subset``'s images (None: the plan's own, there being one set)."""
        return self.calibration_subsets.subsets[subset] if (
            subset or self.calib_repeats > 1) else None

    def save_statistics(self, path, options, subset: int = 0):
        """The statistics pass of variant ``options`` on calibration subset ``subset``, saved as
        a calibration file at ``path`` (for ``adopt_statistics`` elsewhere: a cluster ships the
        file, not the tensors)."""
        self.float_model(options, subset)[1].save(path)

    def adopt_statistics(self, path, options, subset: int = 0):
        """Take the pass of this run that ``save_statistics`` wrote to ``path`` as the one of
        ``options`` on subset ``subset``: it counts as this session's own pass (the records say
        so, as when it ran here)."""
        from qcal.calib.result import CalibrationResult

        graph = self.equalized_graph if options.equalize else self.graph
        calibration = CalibrationResult.load(path, graph=graph)
        calibration.source = CalibrationResult.source  # not a file the user gave: the pass's
        if options.equalize:
            self._equalized[1][subset] = calibration
        else:
            self._subset_calibrations[subset] = calibration

    def check_variants(self, variants):
        """Before any work starts: refuse a ``float_layers`` or ``layer_bias_bits`` name the
        model lacks, a calibration file for another model, one lacking a method's statistics,
        or one given for an equalized variant."""
        from qcal.errors import UsageProblem
        from qcal.quant.annotate import check_layer_names

        for options in variants:
            if options.float_layers or options.layer_bias_bits:
                check_layer_names(self.graph, options)
        if self.calibration_file is None:
            return
        if any(options.equalize for options in variants):
            raise UsageProblem(f"equalize: {self.calibration_file} holds the ranges of the model "
                               f"as imported; an equalized model needs its own statistics pass "
                               f"(leave out --calib)")
        for options in variants:
            self.calibration.require(options.activation_method)

    # --- realize, compile, evaluate -----------------------------------------------------------
    def quantize(self, options, subset: int = 0):
        """The integer graph for one variant (realized, not yet compiled), calibrated on
        calibration subset ``subset``."""
        from qcal.quant import quantize

        graph, calibration = self.float_model(options, subset)
        correction = self.correction_data(options) if options.bias_correction != "none" else None
        images = None
        if options.weight_rounding == "adaround":  # learns from the subset's first images
            images = self.calibration_images(options.adaround_images, subset)
        return quantize(graph, calibration.ranges, options, correction, images)

    def float_model(self, options, subset: int = 0):
        """(float graph, calibration on calibration subset ``subset``) a variant quantizes: the
        imported graph, or with ``equalize`` the cross-layer-equalized one (computed once) with
        its own statistics pass (its tensors between equalized convs differ from the imported
        graph's)."""
        if not options.equalize:
            return self.graph, self.calibration_for(subset)
        from qcal.calib.result import CalibrationResult

        graph, calibrations = self.equalized_graph, self._equalized[1]
        if subset not in calibrations:
            calibrations[subset] = CalibrationResult.from_statistics(self.collect_statistics(
                graph=graph, selection=self._subset_selection(subset))[0], methods=())
        return graph, calibrations[subset]

    @property
    def equalized_graph(self):
        """The cross-layer-equalized float graph (computed once)."""
        if self._equalized is None:
            from qcal.quant.equalize import equalize

            graph, pairs, sweeps = equalize(self.graph)
            log.info("%s: cross-layer equalization of %d conv pairs in %d sweeps", self.model.name,
                     len(pairs), sweeps)
            self._equalized = graph, {}
        return self._equalized[0]

    def correction_data(self, options):
        """What empirical bias correction measures on (computed once per float model, see
        ``float_model``): the first ``BIAS_CORRECTION_IMAGES`` calibration images and the float
        model's per-channel output mean of every biased layer over them, read by the statistics
        pass's tensor source."""
        graph, key = self.float_model(options)[0], options.equalize
        if key not in self._correction:
            from qcal.config import BIAS_CORRECTION_IMAGES
            from qcal.quant.bias_correction import CorrectionData, biased_layers, float_output_means

            start = time.perf_counter()
            images = self.verification_images(BIAS_CORRECTION_IMAGES)
            batches = (images[i:i + self.batch_size] for i in range(0, len(images), self.batch_size))
            means = float_output_means(graph, biased_layers(graph), batches,
                                       self.model.tensor_source(graph))
            self._correction[key] = CorrectionData(images, means, self.batch_size)
            log.info("%s: float means for bias correction over %d calibration images in %.1f s",
                     self.model.name, len(images), time.perf_counter() - start)
        return self._correction[key]

    def _run_selections(self, runner, label, plan):
        """(evaluation result, fidelity result or None) for one runner; the evaluation images'
        result is not run again when ``evaluate`` was given it (merged shards). Each selection's
        logits go where ``self._logits_to`` says (``evaluate``'s ``references`` /
        ``logits_files``)."""
        from qcal.eval.evaluate import route_logits

        references, files, keep = self._logits_to
        outcomes = []
        for name, selection, given in (("evaluation", plan.evaluation, self._given_evaluation),
                                       ("fidelity", plan.fidelity, None)):
            suffix = "_crops" if name == "fidelity" else ""
            if given is not None:
                outcomes.append(route_logits(given, references.get(name), files.get(name), suffix))
                continue
            if selection is None:
                outcomes.append(None)
                continue
            with self._progress(len(selection), label) as bar:
                outcomes.append(evaluate(
                    runner, selection, self.batch_size, self.cache, bar,
                    reference=references.get(name), logits_file=files.get(name),
                    fidelity_suffix=suffix, keep_logits=keep))
        return outcomes

    def evaluate(self, options=None, subset: int = 0, evaluation=None, references=None,
                 logits_files=None, keep_logits: bool = True):
        """(EvalResult, fidelity EvalResult or None, extra record fields) for float32 (options
        None) or one int8 variant calibrated on calibration subset ``subset``. Nothing the run
        compiled outlives it. ``evaluation``: the result on the evaluation images, computed
        already by ``evaluate_range`` over its shards and merged
        (``qcal.eval.evaluate.merge_results``): everything else is done here.

        ``references`` / ``logits_files``: per selection (``"evaluation"``, ``"fidelity"``),
        float32's logits to compare with batch by batch, or a file to write the logits to (see
        ``qcal.eval.evaluate.evaluate``); a selection in neither keeps its logits in memory
        (``EvalResult.logits``) unless ``keep_logits`` is False."""
        self._given_evaluation = evaluation
        self._logits_to = (references or {}, logits_files or {}, keep_logits)
        try:
            outcome = (self._evaluate_float() if options is None
                       else self._evaluate_int8(options, subset))
        finally:
            self._given_evaluation = None
            self._logits_to = ({}, {}, True)
        # TVMScript's ``T.prim_func`` keeps the ``inspect.stack()`` of its caller in a reference
        # cycle (tvm/tirx/script/parser/entry.py), and a frame keeps its locals after it returns:
        # a compile leaves every frame above it (the compiled model, the variant's results, the
        # statistics pass's batches) to the cyclic collector, whose full collections may come
        # many variants later. Collected here, once the variant's frames have all returned.
        gc.collect()
        return outcome

    def _evaluate_float(self):
        runner = self.model.float_runner(self.graph, self.batch_size)
        result, fidelity = self._run_selections(runner, "float32", self.plan(False))
        return result, fidelity, {}

    def evaluate_range(self, options, start: int, stop: int, subset: int = 0):
        """The EvalResult of float32 (``options`` None) or one int8 variant (calibrated on
        subset ``subset``) on the evaluation images [start, stop) of the fixed order only: one
        shard of a variant. Nothing is verified here (``evaluate`` does that for the variant)."""
        from qcal.data.plan import Selection

        evaluation = self.plan(options is not None).evaluation
        selection = Selection(evaluation.source, evaluation.start + start, evaluation.start + stop)
        label = "float32" if options is None else options.label
        if options is None:
            runner = self.model.float_runner(self.graph, self.batch_size)
        elif options.simulate:
            runner = self._simulated_runner(self.quantize(options, subset))
        else:
            from qcal.backend.tvm.compile import compile_model

            runner = compile_model(self.quantize(options, subset), self.batch_size).run
        with self._progress(len(selection), f"{label} [{start}:{stop}]") as bar:
            result = evaluate(runner, selection, self.batch_size, self.cache, bar)
        del runner
        gc.collect()  # as in ``evaluate``: the compile's frames hold the model in a cycle
        return result

    def layer_sqnr(self, qgraph, images: int = SQNR_IMAGES, graph=None) -> list:
        """Per quantized tensor: SQNR of the integer model's value against float (numpy
        references: ``graph``, else the imported one), on the first ``images`` fidelity (else
        evaluation) images."""
        from qcal.eval.layer_errors import layer_errors

        return layer_errors(qgraph, self.graph if graph is None else graph,
                            self.fidelity_images(images))

    def fidelity_images(self, count: int | None = None) -> np.ndarray:
        """The first ``count`` (None: all) label-free fidelity images (crops), else evaluation
        images, as one float32 NCHW array (from the batch cache)."""
        plan = self.plan(True)
        selection = plan.fidelity or plan.evaluation
        batches, have = [], 0
        for x, _ in iter_batches(selection, self.batch_size, self.cache):  # cached batches
            batches.append(x)
            have += len(x)
            if count is not None and have >= count:
                break
        return np.concatenate(batches)[:count]

    def float_logits(self, x: np.ndarray) -> np.ndarray:
        """float32's logits of images ``x`` (the model's own float runner: MXNet for Gluon)."""
        runner = self.model.float_runner(self.graph, self.batch_size)
        return np.concatenate([np.asarray(runner(x[i:i + self.batch_size]), np.float32)
                               for i in range(0, len(x), self.batch_size)])

    def verification_images(self, count: int) -> np.ndarray:
        """The first ``count`` calibration images (evaluation images when there are none), as
        many as there are."""
        plan = self.plan(True)
        return self._first_images(plan.calibration or plan.evaluation, count)

    def calibration_images(self, count: int, subset: int = 0) -> np.ndarray:
        """The first ``count`` images of calibration subset ``subset``, as many as there are
        (none: an empty array)."""
        return self._first_images(self._subset_selection(subset) or self.plan(True).calibration,
                                  count)

    def _first_images(self, selection, count: int) -> np.ndarray:
        batches, have = [], 0
        for x, _ in iter_batches(selection, self.batch_size, self.cache) if selection else ():
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
                                                self.plan(True))
        return result, fidelity, {"simulated": True, "verify_images_asked": self.verify_images}

    def _evaluate_int8(self, options, subset: int = 0):
        qgraph = self.quantize(options, subset)
        graph, calibration = self.float_model(options, subset)
        for line in qgraph.report():
            log.info("%s", line)
        if options.simulate:
            result, fidelity, extra = self._evaluate_simulated(qgraph, options)
        else:
            result, fidelity, extra = self._evaluate_compiled(qgraph, options)
        layers = self.layer_sqnr(qgraph, graph=graph)
        worst = min(layers, key=lambda r: r["sqnr_db"]) if layers else None
        extra.update({
            "counts": qgraph.counts(), "overflow_adjustments": [str(a) for a in qgraph.adjustments],
            "calibration": {"source": calibration.source, "images": calibration.num_images,
                            **({"subset": subset, **self.calibration_subsets.describe()}
                               if self.calib_repeats > 1 else {})},
            "layers": layers,
            "metrics": {"sqnr_min_db": worst["sqnr_db"] if worst else float("nan"),
                        "sqnr_min_layer": worst["tensor"] if worst else ""}})
        if "adaround" in qgraph.notes:  # its time is a column of the tables
            extra["adaround"] = qgraph.notes["adaround"]
            extra["metrics"]["adaround_s"] = qgraph.notes["adaround"]["seconds"]
        return result, fidelity, extra

    def _evaluate_compiled(self, qgraph, options):
        from qcal.backend.tvm.compile import compile_model

        start = time.perf_counter()
        compiled = compile_model(qgraph, self.batch_size)
        stop_if_interrupted()  # a Ctrl-C inside TVM's build may not have stopped it
        compile_seconds = time.perf_counter() - start
        verification = self.verify(qgraph, compiled, options.label)
        result, fidelity = self._run_selections(compiled.run, options.label, self.plan(True))
        extra = {"compile_seconds": round(compile_seconds, 2), **verification.record(),
                 "verify_images_asked": self.verify_images,
                 "compile_cache_hit": compiled.build.cache_hit}
        return result, fidelity, extra

    def close(self):
        self.model.close()
        self._graph = None
        self._calibration = None
        self._subset_calibrations = {}
        self._correction = {}
        self._equalized = None
