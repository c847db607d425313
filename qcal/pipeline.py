"""The one visible driver: load -> import -> annotate -> calibrate -> realize -> compile -> evaluate.

``ModelSession`` holds what every variant of one model shares, each computed at most once and only
when first needed: the loaded network, its data plan, the imported float graph, the calibration
statistics (one pass over the calibration images) and the float32 result.
"""
from __future__ import annotations

import hashlib
import logging
from pathlib import Path

from .datasets import BatchCache, Preprocessing, plan_data
from .evaluate import MXNetFloatRunner, evaluate
from .models import get_spec, load_model

log = logging.getLogger("qcal.pipeline")

DEFAULT_CACHE_DIR = Path(".qcal-cache/batches")


def _file_digest(path: Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()[:16]


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
        if self._net is None:
            self._net = load_model(self.model, params=self.params, pretrained=self.pretrained)
        return self._net

    @property
    def identity(self) -> dict:
        params = self.params or self.spec.embedded_params
        return {"name": self.model,
                "params_sha256": _file_digest(params) if params else "model-store",
                "pretrained": self.pretrained}

    def plan(self, needs_calibration: bool):
        if needs_calibration not in self._plans:
            d = self.data
            preprocessing = Preprocessing(input_size=d.get("input_size", 224),
                                          crop_ratio=d.get("crop_ratio", 0.875))
            self._plans[needs_calibration] = plan_data(
                self.spec.family, data=d.get("data"), num_images=d.get("num_images"),
                calib_data=d.get("calib_data"), calib_range=d.get("calib_range"),
                calib_images=d.get("calib_images"), preprocessing=preprocessing,
                calibrate=needs_calibration)
        return self._plans[needs_calibration]

    def plan_description(self, needs_calibration: bool) -> dict:
        return self.plan(needs_calibration).describe()

    # --- evaluate ---------------------------------------------------------------------------
    def _progress(self, total, label):
        from .report import progress_bar

        return progress_bar(total, f"{self.model} {label}", self.quiet)

    def evaluate(self, options=None):
        """(EvalResult, extra record fields) for float32 (options None) or one int8 variant."""
        if options is not None:
            return self.evaluate_int8(options)
        selection = self.plan(False).evaluation
        with self._progress(len(selection), "float32") as bar:
            result = evaluate(MXNetFloatRunner(self.net), selection, self.batch_size, self.cache,
                              bar)
        return result, {}

    def evaluate_int8(self, options):
        raise NotImplementedError("int8 evaluation is wired in by the quantizer")

    def close(self):
        self._net = None
        self._graph = None
