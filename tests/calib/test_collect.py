"""Calibrate stage: one statistics pass, every method's ranges, and the calibration file."""
import os

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcal.calib.collect import AbsHistogram, ReferenceHistogram, collect_statistics
from qcal.calib.methods import KL_REFERENCE_BINS, REFERENCE_METHODS, choose_amax, reference_factor
from qcal.calib.result import NO_REFERENCE_FORMAT, CalibrationResult, calibrate
from qcal.config import QuantOptions
from qcal.errors import QcalError, UsageProblem
from qcal.ir.graph import Graph, Node
from qcal.reference.float_interpreter import run_float

METHOD_OPTS = {"global": {"global_scale": 8.0}, "percentile": {"percentile": 99.99}}


def _tiny_graph(weight_scale=1.0, name="tiny"):
    """x(1x4x4) -conv 1x1 (2 filters)- relu -+- add - global_avg_pool - flatten - dense(3)
                   |                         |
                   '-------------------------'  (x doubled by a 2-filter conv, then residual)
    """
    conv_w = np.array([[[[2.0]]], [[[-1.0]]]], dtype=np.float32) * weight_scale
    nodes = [
        Node("x", "input", attrs={"shape": (1, 4, 4)}),
        Node("conv", "conv2d", ("x",), {"strides": (1, 1), "padding": (0, 0, 0, 0),
                                        "dilation": (1, 1), "groups": 1},
             {"weight": conv_w, "bias": np.array([0.5, 0.0], np.float32)}),
        Node("relu", "relu", ("conv",)),
        Node("res", "add", ("relu", "conv")),
        Node("gap", "global_avg_pool2d", ("res",)),
        Node("flat", "flatten", ("gap",)),
        Node("fc", "dense", ("flat",), {}, {"weight": np.arange(6, dtype=np.float32).reshape(3, 2)}),
    ]
    return Graph(nodes, name)


def _batches_8x8():
    rng = np.random.default_rng(3)
    return [rng.standard_normal((n, 1, 8, 8)).astype(np.float32) for n in (3, 2)]


def _batches(seed=0, sizes=(3, 5, 2), spread=(1.0, 4.0, 0.5)):
    """Batches whose range grows and shrinks, so the histogram has to re-bin."""
    rng = np.random.default_rng(seed)
    return [(rng.standard_normal((n, 1, 4, 4)) * s).astype(np.float32)
            for n, s in zip(sizes, spread)]


@pytest.fixture(scope="module")
def statistics():
    return collect_statistics(_tiny_graph(), _batches(), progress=False)


@pytest.fixture(scope="module")
def result(statistics):
    return CalibrationResult.from_statistics(statistics)


class TestAbsHistogram:
    def test_rebinning_is_exact(self):
        rng = np.random.default_rng(1)
        chunks = [rng.standard_normal(1000) * s for s in (0.3, 1.0, 9.0, 2.0)]
        h = AbsHistogram(bins=256)
        for c in chunks:
            h.collect(c)
        a = np.abs(np.concatenate(chunks))
        assert h.amax == a.max()
        assert h.range > h.amax >= h.range / 2 and np.log2(h.range) % 1 == 0
        direct = np.histogram(a, bins=256, range=(0, h.range))[0]
        assert np.array_equal(h.counts, direct)
        assert np.array_equal(h.stats().edges, np.histogram_bin_edges(a, 256, (0, h.range)))

    def test_counts_zeros_and_signed_range(self):
        h = AbsHistogram(bins=64)
        h.collect(np.array([0.0, 0.0, -3.0, 1.0]))
        h.collect(np.array([0.0, 2.0]))
        assert h.summary() == {"amax": 3.0, "min": -3.0, "max": 2.0, "count": 6, "zeros": 3}
        stats = h.stats()
        assert stats.counts.sum() == 6 and stats.counts[0] == 3 and stats.zeros == 3

    def test_all_zero_tensor(self):
        h = AbsHistogram(bins=64)
        h.collect(np.zeros(10))
        assert h.stats().counts[0] == 10
        assert choose_amax("l2", h.stats()) == 1.0

    def test_bins_must_be_a_power_of_two(self):
        with pytest.raises(UsageProblem, match="bins must be a power of two"):
            AbsHistogram(bins=1000)


class TestReferenceHistogram:
    @pytest.mark.parametrize("amax", [1.0, 3.0, 0.1 + 1e-9, 7.7e-5, 6.0e4])
    def test_the_abs_max_lands_in_the_last_bin(self, amax):
        factor = reference_factor(amax)
        assert np.float32(amax) * factor < KL_REFERENCE_BINS
        assert int(np.float32(amax) * factor) == KL_REFERENCE_BINS - 1
        h = ReferenceHistogram(amax)
        assert h.edges()[-1] == pytest.approx(amax, rel=1e-6) and h.edges()[-1] >= np.float32(amax)

    def test_kernel_equals_numpy(self):
        from qcal.backend.tvm.histogram import AbsHistogramKernel

        x = (np.random.default_rng(0).standard_normal(300_001) * 2.7).astype(np.float32)
        x[::5] = 0
        amax = float(np.abs(x).max())
        with_kernel, numpy_only = ReferenceHistogram(amax), ReferenceHistogram(amax)
        with_kernel.collect(x, AbsHistogramKernel(KL_REFERENCE_BINS))
        numpy_only.collect(x)
        want = np.bincount((np.abs(x) * reference_factor(amax)).astype(np.int64),
                           minlength=KL_REFERENCE_BINS)
        assert np.array_equal(with_kernel.counts, want) and np.array_equal(numpy_only.counts, want)
        assert want[-1] >= 1 and with_kernel.beyond == 0

    def test_values_beyond_the_first_pass_go_to_the_last_bin(self):
        h = ReferenceHistogram(2.0)
        h.collect(np.array([0.0, 1.0, -2.0, 2.5, -9.0], np.float32))
        assert h.beyond == 2 and h.counts[-1] == 3 and h.counts.sum() == 5

    def test_all_zero_tensor(self):
        h = ReferenceHistogram(0.0)
        h.collect(np.zeros(7, np.float32))
        assert h.counts[0] == 7 and h.counts.sum() == 7


def _relu_graph():
    """x(1x8x8) - relu"""
    return Graph([Node("x", "input", attrs={"shape": (1, 8, 8)}), Node("relu", "relu", ("x",))],
                 "relu")


class NonRepeatingSource:
    """A source that does not give the same values twice (a non-deterministic engine)."""

    description = "a drifting source"

    def __init__(self):
        self.runs = 0

    def run(self, batch, observe):
        self.runs += 1
        observe("x", batch * (1.0 + 0.5 * (self.runs > 1)))
        observe("relu", np.maximum(batch, 0))


@settings(max_examples=8, deadline=None, derandomize=True)
@given(factor=st.sampled_from([1.4, 2.0, 0.75]) | st.floats(1e-3, 1e3))
def test_scaling_the_data_scales_the_kl_threshold(factor):
    """Through the production path (both passes, the histogram kernel): float32 data scaled by
    any factor gets KL thresholds scaled by the same factor, to float32 rounding of the data
    and of the bin factor (worst seen 1.35e-7 over 41 factors from 1e-3 to 1e3; 1e-6 asserted).
    The fine histogram's octave moves with the factor; the reference histogram does not."""
    rng = np.random.default_rng(7)
    data = [np.concatenate([rng.laplace(size=(20, 1, 8, 8)), rng.normal(0, 2, (4, 1, 8, 8))])
            .astype(np.float32) for _ in range(3)]
    scaled = [(b.astype(np.float64) * factor).astype(np.float32) for b in data]
    a, b = (collect_statistics(_relu_graph(), d, progress=False).tensors for d in (data, scaled))
    for method in REFERENCE_METHODS:
        for tensor in ("x", "relu"):
            ratio = choose_amax(method, b[tensor]) / (choose_amax(method, a[tensor]) * factor)
            assert ratio == pytest.approx(1.0, abs=1e-6), (method, tensor, factor)


class TestCollect:
    def test_reference_histograms(self, statistics):
        for name, t in statistics.tensors.items():
            s = statistics.summaries[name]
            assert t.ref_counts.sum() == s["count"] and len(t.ref_counts) == KL_REFERENCE_BINS
            assert t.ref_edges[-1] == pytest.approx(s["amax"], rel=1e-6)
            assert t.ref_counts[-1] >= 1  # the abs-max
            assert t.ref_counts[0] >= s["zeros"]

    def test_a_second_pass_that_sees_more_is_counted_and_logged(self, caplog):
        source = NonRepeatingSource()
        stats = collect_statistics(_relu_graph(), _batches_8x8(), progress=False, source=source)
        assert source.runs == 4  # two batches, two passes
        x = stats.tensors["x"]
        assert x.ref_counts.sum() == stats.summaries["x"]["count"]
        assert "values above the first pass's abs-max in 1 tensor(s) (e.g. 'x')" in caplog.text

    def test_no_reference_pass_without_histograms(self):
        source = NonRepeatingSource()
        stats = collect_statistics(_relu_graph(), _batches_8x8(), progress=False, bins=0,
                                   source=source)
        assert source.runs == 2 and not stats.tensors["x"].has_reference

    def test_every_tensor_matches_a_direct_run(self, statistics):
        everything = run_float(_tiny_graph(), np.concatenate(_batches()), keep="all")
        assert set(statistics.tensors) == set(everything)  # the input included
        for name, values in everything.items():
            s = statistics.summaries[name]
            assert s["amax"] == np.abs(values).max()
            assert (s["min"], s["max"]) == (values.min(), values.max())
            assert s["count"] == values.size
            assert s["zeros"] == values.size - np.count_nonzero(values)
            assert statistics.tensors[name].counts.sum() == values.size

    def test_records_model_and_images(self, statistics):
        assert statistics.fingerprint == _tiny_graph().fingerprint()
        assert statistics.num_images == 10 and statistics.model == "tiny"

    def test_relu_output_is_non_negative_with_zeros(self, statistics):
        s = statistics.summaries["relu"]
        assert s["min"] == 0 and s["zeros"] > 0

    def test_no_images(self):
        with pytest.raises(QcalError, match="got no images"):
            collect_statistics(_tiny_graph(), [], progress=False)

    def test_non_finite_values(self):
        batches = _batches()
        batches[1][0, 0, 0, 0] = np.inf
        with pytest.raises(QcalError, match="tensor 'x' has non-finite values .* batch 1"):
            collect_statistics(_tiny_graph(), batches, progress=False)

    def test_one_pass_over_a_generator(self):
        stats = collect_statistics(_tiny_graph(), (b for b in _batches()), progress=False)
        assert stats.num_images == 10


class TestResult:
    @pytest.mark.parametrize("method", ["global", "max", "power2", "l2", "kl", "kl-mxnet",
                                        "percentile"])
    def test_every_method_every_tensor(self, result, statistics, method):
        for name, stats in statistics.tensors.items():
            expected = choose_amax(method, stats, **METHOD_OPTS.get(method, {}))
            assert result.amax(name, method, **METHOD_OPTS.get(method, {})) == expected
            assert result.chosen[method][name] == expected

    def test_max_and_power2_known_values(self, result, statistics):
        amax = statistics.summaries["conv"]["amax"]
        assert result.amax("conv", "max") == amax
        assert result.amax("conv", "power2") == 2.0 ** np.ceil(np.log2(amax))

    def test_other_options_are_recomputed(self, result):
        assert result.amax("x", "percentile", percentile=50.0) < result.amax(
            "x", "percentile", percentile=99.99)
        assert result.amax("x", "global", global_scale=2.0) == 2.0

    def test_amax_for_quant_options(self, result):
        options = QuantOptions(activation_method="percentile", percentile=90.0)
        assert result.amax_for("relu", options) == result.amax("relu", "percentile",
                                                               percentile=90.0)
        assert result.ranges(options, ["relu", "conv"]) == {
            "relu": result.amax_for("relu", options), "conv": result.amax_for("conv", options)}

    def test_unknown_tensor(self, result):
        with pytest.raises(QcalError, match="no statistics for tensor 'nope' of model 'tiny'"):
            result.amax("nope", "max")

    def test_bad_options(self, result):
        with pytest.raises(UsageProblem, match="percentile"):
            result.amax("x", "percentile")
        with pytest.raises(QcalError, match="unknown calibration method 'entropy'"):
            result.amax("x", "entropy")


class TestFile:
    def test_round_trip(self, result, tmp_path):
        path = tmp_path / "tiny.calib.npz"
        result.save(path)
        assert os.listdir(tmp_path) == ["tiny.calib.npz"]  # no temporary file left behind
        loaded = CalibrationResult.load(path, _tiny_graph())
        assert loaded.chosen == result.chosen and loaded.chosen_options == result.chosen_options
        assert loaded.summaries == result.summaries and loaded.num_images == 10
        assert loaded.methods == result.methods and "kl" in loaded.methods
        for name, stats in result.tensors.items():
            assert np.array_equal(loaded.tensors[name].counts, stats.counts)
            assert np.array_equal(loaded.tensors[name].edges, stats.edges)
            assert np.array_equal(loaded.tensors[name].ref_counts, stats.ref_counts)
            assert np.array_equal(loaded.tensors[name].ref_edges, stats.ref_edges)
            for method in loaded.methods:
                opts = METHOD_OPTS.get(method, {})
                assert loaded.amax(name, method, **opts) == result.amax(name, method, **opts)
        # recomputation from the stored histogram, not only the stored table
        assert loaded.amax("x", "percentile", percentile=97.0) == result.amax(
            "x", "percentile", percentile=97.0)

    def test_save_replaces_an_old_file(self, result, tmp_path):
        path = tmp_path / "c.npz"
        path.write_bytes(b"old")
        result.save(path)
        assert CalibrationResult.load(path).fingerprint == result.fingerprint

    def test_refuses_another_model(self, result, tmp_path):
        path = tmp_path / "c.npz"
        result.save(path)
        other = _tiny_graph(weight_scale=2.0, name="other")
        with pytest.raises(QcalError, match=f"made for model 'tiny' \\(fingerprint "
                                            f"{result.fingerprint}\\), not for 'other' "
                                            f"\\(fingerprint {other.fingerprint()}\\)"):
            CalibrationResult.load(path, other)

    def test_refuses_a_method_the_file_lacks(self, tmp_path):
        cheap = calibrate(_tiny_graph(), _batches(), progress=False, bins=0)
        path = tmp_path / "cheap.npz"
        cheap.save(path)
        loaded = CalibrationResult.load(path, _tiny_graph(), methods=("max", "power2"))
        assert loaded.amax("conv", "max") == cheap.amax("conv", "max")
        assert set(loaded.methods) == {"global", "max", "power2"}
        with pytest.raises(QcalError, match="holds abs-max statistics only; method 'kl' needs "
                                            "histograms"):
            CalibrationResult.load(path, _tiny_graph(), methods=("kl",))
        with pytest.raises(QcalError, match="method 'l2' needs histograms"):
            loaded.amax("conv", "l2")

    def test_a_file_without_reference_histograms(self, result, tmp_path):
        """A file written before the KL methods read the reference histogram (format /2): read
        for every other method; its old kl ranges dropped; kl and kl-mxnet refused in one line."""
        import io
        import json

        from qcal.files import read_checked, write_checked

        path = tmp_path / "new.npz"
        result.save(path)
        payload, _ = read_checked(path, "calibration file", result.fingerprint)
        with np.load(io.BytesIO(payload)) as f:
            arrays = {n: f[n] for n in f.files if not n.startswith("ref_")}
        meta = json.loads(str(arrays["meta"]))
        arrays["meta"] = np.array(json.dumps({**meta, "format": NO_REFERENCE_FORMAT}))
        old = tmp_path / "old.npz"
        buffer = io.BytesIO()
        np.savez_compressed(buffer, **arrays)
        write_checked(old, buffer.getvalue(), "calibration file", result.fingerprint)
        loaded = CalibrationResult.load(old, _tiny_graph(), methods=("l2", "percentile"))
        assert "kl" not in loaded.chosen and "kl" not in loaded.methods
        assert loaded.amax("conv", "l2") == result.amax("conv", "l2")
        for method in ("kl", "kl-mxnet"):
            with pytest.raises(QcalError, match=f"calibration file {old} "
                                                f"\\(qcal-calibration/2\\) has no reference "
                                                f"histograms, which method '{method}' reads") as e:
                CalibrationResult.load(old, _tiny_graph(), methods=(method,))
            assert "\n" not in str(e.value)

    def test_missing_and_foreign_files(self, tmp_path):
        with pytest.raises(QcalError, match="does not exist"):
            CalibrationResult.load(tmp_path / "none.npz")
        junk = tmp_path / "junk.npz"
        junk.write_bytes(b"not an npz")
        with pytest.raises(QcalError, match="is not a qcal calibration file"):
            CalibrationResult.load(junk)
        other = tmp_path / "other.npz"
        np.savez(other, meta=np.array('{"format": "something-else"}'))
        with pytest.raises(QcalError, match="'something-else' file"):
            CalibrationResult.load(other)


def test_calibrate_an_imported_gluon_model(tmp_path):
    import mxnet as mx

    from qcal.families import resolve_model
    from qcal.importer import import_gluon

    net = resolve_model("fmnist_resnet20_v1").build_network()
    net.initialize(mx.init.Xavier())
    graph = import_gluon(net, (1, 32, 32), "fmnist_resnet20_v1")
    batches = [np.random.default_rng(i).standard_normal((4, 1, 32, 32)).astype(np.float32)
               for i in range(2)]
    result = calibrate(graph, batches, progress=False, bins=1024)
    assert set(result.tensors) == {n.name for n in graph.nodes}
    for name in result.tensors:
        s = result.summaries[name]
        assert result.amax(name, "max") == s["amax"]
        assert 0 < result.amax(name, "kl") <= s["amax"]
        assert 0 < result.amax(name, "l2") <= s["amax"]
    result.save(tmp_path / "r.npz")
    CalibrationResult.load(tmp_path / "r.npz", graph, methods=("kl", "l2", "percentile"))


def test_chunked_collect_matches_whole_tensor_binning():
    rng = np.random.RandomState(0)
    x = (rng.randn(3, 301, 299, 5).astype(np.float32) * 3).transpose(0, 3, 1, 2)  # NHWC strides
    x[0, :, :200] = 0  # memory starts with more than one chunk of zeros
    h = AbsHistogram(bins=8192)
    h.collect(x)
    amax = float(np.abs(x).max())
    top = 2.0 ** (np.floor(np.log2(amax)) + 1)
    want = np.bincount((np.abs(x).ravel() * (8192 / top)).astype(np.int64), minlength=8192)
    assert h.range == top and np.array_equal(h.counts, want)
    assert h.zeros == x.size - np.count_nonzero(x) and h.amax == amax


def test_a_reiterable_batch_source_is_read_twice_and_not_kept():
    """With histograms the pass reads the batches twice: a re-iterable (qcal's ImageBatches,
    one batch in memory) is iterated again, an iterator is kept as a list."""
    class Reiterable:
        def __init__(self):
            self.iterations = 0

        def __iter__(self):
            self.iterations += 1
            return iter(_batches())

    batches = Reiterable()
    stats = collect_statistics(_tiny_graph(), batches, progress=False)
    assert batches.iterations == 2 and stats.num_images == 10
    from_iterator = collect_statistics(_tiny_graph(), iter(_batches()), progress=False)
    for name, t in stats.tensors.items():
        assert np.array_equal(from_iterator.tensors[name].ref_counts, t.ref_counts)
