"""Calibrate stage, result: the statistics of one pass, every method's ranges, and their file.

``CalibrationResult`` turns a pass's ``TensorStatistics`` into each activation method's amax
(``qcal.calib.methods``), and is saved to / loaded from one ``.npz`` file so that compile and
evaluate never touch the calibration data again (``qcal calibrate``, then ``--calib FILE``).

The file is a checked file (``qcal.files``: an ``.npz`` followed by one check line that numpy and
zip readers ignore). A calibration file is something the user hands qcal, with nothing to
recompute it from, so one that fails its check is refused with one line naming it (exit 1), never
removed. A file from before qcal checked its files (format ``qcal-calibration/1``, no check line)
is read with a warning: its zip members still carry CRC-32s that numpy verifies, so damage there
is still refused, and refusing it outright would strand every existing calibration; a
checked-format file without its check line has lost its end and is refused.

``qcal-calibration/3`` adds each tensor's reference histogram (``KL_REFERENCE_BINS`` bins over
[0, abs-max], stored as its counts and float32 bin factor), which ``kl`` and ``kl-mxnet`` read.
Files of formats /1 and /2 are still read for every other method; their stored ``kl`` ranges
came from the old grouping and resolution and are dropped, and asking them for a KL method is
refused with one line saying to write the file again.
"""
from __future__ import annotations

import io
import json
import logging
import struct
import zipfile
import zlib
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np

from qcal.calib.collect import TensorStatistics, collect_statistics
from qcal.calib.methods import (CALIBRATION_METHODS, HISTOGRAM_METHODS, INT8_LEVELS, KL_REFERENCE_BINS,
                                LEVEL_METHODS, REFERENCE_METHODS, TensorStats, choose_amax, method_options,
                                reference_edges)
from qcal.config import DEFAULT_HISTOGRAM_BINS, QuantOptions
from qcal.errors import QcalError
from qcal.files import DamagedFile, checked_open, has_check_record, read_checked

log = logging.getLogger("qcal.calib.result")

FILE_FORMAT = "qcal-calibration/3"  # /2: a checked file; /3: with reference histograms
NO_REFERENCE_FORMAT = "qcal-calibration/2"  # checked, without reference histograms; still read
UNCHECKED_FORMAT = "qcal-calibration/1"  # written before qcal checked its files; still read
READ_FORMATS = (FILE_FORMAT, NO_REFERENCE_FORMAT, UNCHECKED_FORMAT)
CHECK_KIND = "calibration file"


@dataclass
class CalibrationResult(TensorStatistics):
    """A statistics pass's ``TensorStatistics`` plus every activation method's chosen amax.

    ``chosen[method][tensor]`` holds the amax of each method at the options in
    ``chosen_options[method]`` (the QuantOptions given when it was made); ``amax`` recomputes
    from the stored histograms when asked for other options.
    """

    chosen: dict = field(default_factory=dict)  # method -> {tensor -> amax}
    chosen_options: dict = field(default_factory=dict)  # method -> {option -> value}
    source: str = "<memory>"  # the file it was read from
    file_format: str = FILE_FORMAT  # the format of the file it was read from
    # amax chosen on request beyond ``chosen`` (other options or levels, methods not chosen ahead)
    _computed: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_statistics(cls, statistics: TensorStatistics, options: QuantOptions | None = None,
                        methods=None) -> "CalibrationResult":
        options = options or QuantOptions()
        result = cls(**{f.name: getattr(statistics, f.name) for f in fields(TensorStatistics)})
        for method in result.methods if methods is None else methods:
            opts = method_options(method, options)
            result.chosen[method] = {name: choose_amax(method, stats, **opts)
                                     for name, stats in statistics.tensors.items()}
            result.chosen_options[method] = opts
        return result

    @property
    def has_reference(self) -> bool:
        return bool(self.bins) and all(t.has_reference for t in self.tensors.values())

    @property
    def methods(self) -> tuple:
        """The methods this result can answer."""
        if not self.bins:
            return tuple(m for m in CALIBRATION_METHODS if m not in HISTOGRAM_METHODS)
        if not self.has_reference:
            return tuple(m for m in CALIBRATION_METHODS if m not in REFERENCE_METHODS)
        return tuple(CALIBRATION_METHODS)

    def require(self, method: str):
        if method not in CALIBRATION_METHODS:
            raise QcalError(f"unknown calibration method '{method}' "
                            f"(known: {', '.join(CALIBRATION_METHODS)})")
        if method in self.methods:
            return
        if not self.bins:
            raise QcalError(f"calibration file {self.source} holds abs-max statistics only; "
                            f"method '{method}' needs histograms: recalibrate with histograms")
        raise QcalError(f"calibration file {self.source} ({self.file_format}) has no reference "
                        f"histograms, which method '{method}' reads since "
                        f"{FILE_FORMAT}: write it again with qcal calibrate")

    def amax(self, tensor: str, method: str, levels: int = INT8_LEVELS, **opts) -> float:
        """The amax ``method`` (with its options, e.g. percentile=99.9) picks for ``tensor`` at
        ``levels`` integer levels (the stored choices are for int8's 127)."""
        self.require(method)
        if tensor not in self.tensors:
            raise QcalError(f"calibration file {self.source} has no statistics for tensor "
                            f"'{tensor}' of model '{self.model}'")
        stored = levels == INT8_LEVELS or method not in LEVEL_METHODS
        if stored and self.chosen_options.get(method) == opts and tensor in self.chosen.get(method, {}):
            return self.chosen[method][tensor]
        key = (tensor, method, levels, tuple(sorted(opts.items())))
        if key not in self._computed:  # chosen once, as every variant asks again (kl: ~80 ms)
            self._computed[key] = choose_amax(method, self.tensors[tensor], levels, **opts)
        return self._computed[key]

    def amax_for(self, tensor: str, options: QuantOptions, levels: int = INT8_LEVELS) -> float:
        """The amax ``options.activation_method`` picks, with that method's options."""
        method = options.activation_method
        return self.amax(tensor, method, levels, **method_options(method, options))

    def ranges(self, options: QuantOptions, tensors=None, levels=None) -> dict:
        """{tensor: amax} under ``options`` for ``tensors`` (default: every tensor), as the
        realizer takes them; ``levels`` ({tensor: largest level}) for tensors narrower than
        int8."""
        names = self.tensors if tensors is None else tensors
        levels = levels or {}
        return {t: self.amax_for(t, options, levels.get(t, INT8_LEVELS)) for t in names}

    def check_model(self, graph):
        if graph.fingerprint() != self.fingerprint:
            raise QcalError(f"calibration file {self.source} was made for model '{self.model}' "
                            f"(fingerprint {self.fingerprint}), not for '{graph.name}' "
                            f"(fingerprint {graph.fingerprint()})")

    # --- file --------------------------------------------------------------------------------

    def save(self, path):
        """Write one .npz file atomically (a temporary file in the same folder, then rename)."""
        path = Path(path)
        names = list(self.tensors)
        meta = {"format": FILE_FORMAT, "fingerprint": self.fingerprint, "model": self.model,
                "num_images": self.num_images, "bins": self.bins, "tensors": names,
                "summaries": self.summaries, "chosen": self.chosen,
                "chosen_options": self.chosen_options, "engine": self.engine}
        arrays = {"meta": np.array(json.dumps(meta))}
        if self.bins:
            arrays["counts"] = np.stack([self.tensors[n].counts for n in names])
            arrays["ranges"] = np.array([self.tensors[n].edges[-1] for n in names])
        if self.has_reference:
            arrays["ref_counts"] = np.stack([self.tensors[n].ref_counts for n in names])
            # bin factor (qcal.calib.methods.reference_factor); 0 for an all-zero tensor
            arrays["ref_factors"] = np.array(
                [KL_REFERENCE_BINS / self.tensors[n].ref_edges[-1]
                 if self.tensors[n].amax > 0 else 0.0 for n in names], dtype=np.float32)
        with checked_open(path, CHECK_KIND, self.fingerprint) as f:
            np.savez_compressed(f, **arrays)

    @classmethod
    def load(cls, path, graph=None, methods=()) -> "CalibrationResult":
        """Read a file written by ``save``; refuse it for another model or a missing method."""
        path = Path(path)
        try:
            checked = has_check_record(path) or path.stat().st_size == 0  # empty: fails its check
            contents = io.BytesIO(read_checked(path, CHECK_KIND)[0]) if checked else path
            with np.load(contents, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                counts = f["counts"] if "counts" in f.files else None
                ranges = f["ranges"] if "ranges" in f.files else None
                ref_counts = f["ref_counts"] if "ref_counts" in f.files else None
                ref_factors = f["ref_factors"] if "ref_factors" in f.files else None
        except FileNotFoundError:
            raise QcalError(f"calibration file {path} does not exist") from None
        except DamagedFile as exc:
            raise QcalError(f"calibration file {exc}; write it again with qcal calibrate") from None
        except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile, zlib.error,
                struct.error) as exc:
            reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise QcalError(f"{path} is not a qcal calibration file, or is damaged "
                            f"({reason})") from None
        if not isinstance(meta, dict) or meta.get("format") not in READ_FORMATS:
            found = meta.get("format") if isinstance(meta, dict) else None
            raise QcalError(f"{path} is a '{found}' file; qcal reads '{FILE_FORMAT}' (and "
                            f"'{NO_REFERENCE_FORMAT}', '{UNCHECKED_FORMAT}')")
        if not checked:
            if meta["format"] != UNCHECKED_FORMAT:
                raise QcalError(f"calibration file {path} has lost its check record (truncated?); "
                                "write it again with qcal calibrate")
            log.warning("calibration file %s was written by an older qcal without a checksum: "
                        "read unchecked (qcal calibrate writes a checked one)", path)
        try:
            chosen, chosen_options = meta["chosen"], meta["chosen_options"]
            if meta["format"] != FILE_FORMAT:  # KL ranges of the old grouping and resolution
                chosen = {m: v for m, v in chosen.items() if m not in REFERENCE_METHODS}
                chosen_options = {m: v for m, v in chosen_options.items() if m not in REFERENCE_METHODS}
            tensors = {}
            for i, name in enumerate(meta["tensors"]):
                summary = meta["summaries"][name]
                if counts is None:
                    tensors[name] = TensorStats(summary["amax"], zeros=summary["zeros"])
                    continue
                edges = np.linspace(0.0, float(ranges[i]), meta["bins"] + 1)
                reference = {}
                if ref_counts is not None:
                    factor = ref_factors[i]
                    reference = {"ref_counts": ref_counts[i],
                                 "ref_edges": reference_edges(factor) if factor > 0
                                 else np.linspace(0.0, 1.0, KL_REFERENCE_BINS + 1)}
                tensors[name] = TensorStats(summary["amax"], counts[i], edges, summary["zeros"],
                                            **reference)
            result = cls(meta["fingerprint"], meta["model"], meta["num_images"], meta["bins"],
                         tensors, meta["summaries"], meta.get("engine", "unrecorded"), chosen,
                         chosen_options, source=str(path), file_format=meta["format"])
        except (KeyError, IndexError, TypeError, ValueError) as exc:  # a field missing or mistyped
            raise QcalError(f"{path} is not a qcal calibration file, or is damaged (its metadata "
                            f"lacks {exc})") from None
        if graph is not None:
            result.check_model(graph)
        for method in methods:
            result.require(method)
        return result


def calibrate(graph, batches, options: QuantOptions | None = None, progress: bool = True,
              bins: int = DEFAULT_HISTOGRAM_BINS, source=None) -> CalibrationResult:
    """Collect statistics in one pass and choose every method's amax for every tensor."""
    return CalibrationResult.from_statistics(
        collect_statistics(graph, batches, progress, bins, source), options)
