"""Known-answer tests for the range maths of every activation calibration method."""
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from qcal.calib.methods import (CALIBRATION_METHODS, TensorStats, choose_amax, choose_amax_kl, choose_amax_l2,
                                choose_amax_max, choose_amax_percentile, choose_amax_power2, kl_divergences,
                                method_options, quantized_groups)
from qcal.config import ACTIVATION_METHODS, QuantOptions
from qcal.errors import QcalError, UsageProblem


def _normal_with_outlier(outlier=20.0, n=1_000_000, seed=0):
    x = np.random.default_rng(seed).standard_normal(n)
    return np.concatenate([x, [outlier]])


@pytest.fixture(scope="module")
def outlier_stats():
    return TensorStats.from_values(_normal_with_outlier(), bins=8192)


def _fake_quant_mse(x, amax):
    scale = amax / 127
    return float(np.mean((x - np.clip(np.rint(x / scale), -127, 127) * scale) ** 2))


def test_registry_matches_the_config_vocabulary():
    assert tuple(CALIBRATION_METHODS) == ACTIVATION_METHODS


class TestPercentile:
    def test_arange(self):
        stats = TensorStats.from_values(np.arange(100), bins=1000)
        assert choose_amax_percentile(stats, percentile=90) == pytest.approx(89, abs=0.1)
        assert choose_amax_percentile(stats, percentile=50) == pytest.approx(49, abs=0.1)

    def test_hundred_is_the_max(self):
        stats = TensorStats.from_values(np.arange(100), bins=1000)
        assert choose_amax_percentile(stats, percentile=100) == 99.0

    def test_of_abs_values(self):
        stats = TensorStats.from_values(-np.arange(100), bins=1000)
        assert choose_amax_percentile(stats, percentile=90) == pytest.approx(89, abs=0.1)


class TestMaxAndPower2:
    def test_max_is_the_abs_max(self):
        assert choose_amax_max(TensorStats.from_values([-3.5, 1.0, 2.0])) == 3.5

    @pytest.mark.parametrize("amax, expected", [(3.1, 4.0), (4.0, 4.0), (0.3, 0.5), (1.0, 1.0),
                                                (100.0, 128.0)])
    def test_power2_rounds_up(self, amax, expected):
        assert choose_amax_power2(TensorStats(amax)) == expected

    def test_need_no_histogram(self):
        assert choose_amax("power2", TensorStats(3.1)) == 4.0
        assert choose_amax("max", TensorStats(3.1)) == 3.1


def test_global_ignores_the_data():
    assert choose_amax("global", TensorStats(123.0), global_scale=8.0) == 8.0
    assert choose_amax("global", TensorStats(0.0), global_scale=2.0) == 2.0


class TestOutlier:
    """One value at 20 among a million standard normals: max keeps it, the others clip it."""

    def test_max_keeps_it(self, outlier_stats):
        assert choose_amax("max", outlier_stats) == 20.0

    @pytest.mark.parametrize("method, opts", [("kl", {}), ("kl-mxnet", {}), ("l2", {}),
                                              ("percentile", {"percentile": 99.99})])
    def test_clipped(self, outlier_stats, method, opts):
        amax = choose_amax(method, outlier_stats, **opts)
        assert 3.0 < amax < 6.0, amax


class TestL2:
    def test_beats_max_and_percentile_on_the_true_error(self, outlier_stats):
        x = _normal_with_outlier()
        chosen = _fake_quant_mse(x, choose_amax_l2(outlier_stats))
        for other in (20.0, 3.0, 8.0, choose_amax_percentile(outlier_stats, percentile=99.99)):
            assert chosen <= _fake_quant_mse(x, other) * 1.01

    def test_uniform_data_is_not_clipped(self):
        x = np.random.default_rng(1).uniform(-1, 1, 200_000)
        assert choose_amax_l2(TensorStats.from_values(x, bins=4096)) > 0.97


def _naive_kl(hist, k, grouping):
    """The entropy method for one candidate, written as the loop TensorRT describes."""
    p = hist[:k].astype(float)
    p[k - 1] += hist[k:].sum()
    q = np.zeros(k)
    bounds = (np.ceil(np.arange(129) * k / 128).astype(int) if grouping == "even"
              else [j * (k // 128) for j in range(128)] + [k])
    for j in range(128):
        lo, hi = bounds[j], bounds[j + 1]
        nonempty = hist[lo:hi] > 0
        if nonempty.any():
            q[lo:hi] = np.where(nonempty, hist[lo:hi].sum() / nonempty.sum(), 0)
    p, q = p / p.sum(), q / q.sum()
    if np.any((p > 0) & (q == 0)):
        return np.inf
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


def pytorch_quantization_entropy(hist, edges, patch_bin0=True, num_quantized_bins=128):
    """A port of NVIDIA pytorch-quantization's ``_compute_amax_entropy`` (calib/histogram.py, as
    published): one loop over candidates i, ``np.digitize`` on ``linspace(0, i, 129)`` for the
    groups, scipy's ``entropy`` (which normalises), the last argmin. The per-bin Python loops of
    the original are written as ``bincount``s. ``patch_bin0``: its ``bins[0] = bins[1]``."""
    from scipy.stats import entropy

    bins = np.asarray(hist, dtype=np.int64).copy()
    if patch_bin0:
        bins[0] = bins[1]
    divergences = []
    for i in range(128, len(bins) + 1):
        space = np.linspace(0, i, num=num_quantized_bins + 1)
        digitized = np.digitize(range(i), space) - 1
        digitized[bins[:i] == 0] = -1
        used = digitized != -1
        group_mass = np.bincount(digitized[used], weights=bins[:i][used],
                                 minlength=num_quantized_bins)
        group_size = np.bincount(digitized[used], minlength=num_quantized_bins)
        density = np.zeros(group_mass.shape)
        density[group_size > 0] = group_mass[group_size > 0] / group_size[group_size > 0]
        candidate = np.where(used, density[np.maximum(digitized, 0)], 0.0)
        reference = bins[:i].astype(np.float64)
        reference[-1] += bins[i:].sum()
        divergences.append(entropy(reference, candidate))
    divergences = np.array(divergences)
    last_argmin = len(divergences) - 1 - np.argmin(divergences[::-1])
    return float(edges[last_argmin + 128])


def synthetic(name, n=100_000, seed=0):
    r = np.random.default_rng(seed)
    return {
        "normal": lambda: r.standard_normal(n),
        "rectified normal": lambda: np.maximum(r.standard_normal(n), 0),
        "laplace": lambda: r.laplace(size=n),
        "bimodal with a spike": lambda: np.concatenate(
            [r.normal(-2, 0.5, n // 2), r.normal(3, 1, n // 2 - n // 10), np.full(n // 10, 1.0)]),
        "saturated relu6": lambda: np.clip(r.normal(2, 3, n), 0, 6),
    }[name]().astype(np.float32)


SYNTHETIC = ["normal", "rectified normal", "laplace", "bimodal with a spike", "saturated relu6"]


class TestKL:
    @pytest.mark.parametrize("grouping", ["even", "mxnet"])
    def test_closed_form_equals_the_loop(self, grouping):
        rng = np.random.default_rng(2)
        hist = np.histogram(np.abs(rng.standard_normal(20000) * rng.choice([1, 3], 20000)),
                            bins=700)[0]
        kept = np.arange(128, 701)
        fast = kl_divergences(hist.astype(float), kept, grouping)
        slow = np.array([_naive_kl(hist, k, grouping) for k in kept])
        assert np.array_equal(np.isinf(fast), np.isinf(slow))
        finite = np.isfinite(slow)
        np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)

    def test_even_groups_are_linspace_groups(self):
        kept = np.arange(128, 2049)
        starts, ends = quantized_groups(kept, "even")
        for row, k in enumerate(kept[::97]):
            want = np.digitize(np.arange(k), np.linspace(0, k, 129)) - 1
            got = np.repeat(np.arange(128), ends[row * 97] - starts[row * 97])
            assert np.array_equal(got, want), k

    @pytest.mark.parametrize("name", SYNTHETIC)
    def test_kl_equals_pytorch_quantization(self, name):
        """The same threshold (the same bin) as the port, given qcal's histogram without its
        exact zeros (qcal's one documented difference; pytorch-quantization patches bin 0)."""
        stats = TensorStats.from_values(synthetic(name))
        hist = stats.ref_counts.copy()
        hist[0] -= stats.zeros
        theirs = pytorch_quantization_entropy(hist, stats.ref_edges, patch_bin0=False)
        assert choose_amax_kl(stats) == min(theirs, stats.amax)  # qcal never exceeds the max

    @pytest.mark.parametrize("name", SYNTHETIC)
    def test_kl_mxnet_is_near_mxnet(self, name):
        """MXNet 1.9.1's own ``_get_optimal_threshold`` on its symmetric 8001-bin histogram.
        Within 8 %: MXNet quantizes x (not |x|) into 255 levels, smooths P and Q and counts zeros
        in its centre bin; measured -5.8 % (the bimodal one) to +0.8 % on these distributions."""
        from mxnet.contrib.quantization import _get_optimal_threshold

        x = synthetic(name).astype(np.float64)
        th = float(np.abs(x).max())
        hist, edges = np.histogram(x, bins=8001, range=(-th, th))
        theirs = float(_get_optimal_threshold((hist, edges, x.min(), x.max(), th), "int8", 255)[2])
        ours = choose_amax("kl-mxnet", TensorStats.from_values(x))
        assert ours == pytest.approx(theirs, rel=0.08)

    def test_mxnet_grouping_jumps_at_multiples_of_128(self):
        """Why ``kl`` has even groups: with MXNet's, each k just past a multiple of 128 splits
        the remainder again, and the divergence jumps up there; even groups change smoothly."""
        x = np.abs(synthetic("laplace", n=400_000))
        hist = TensorStats.from_values(x).ref_counts.astype(float)
        kept = np.arange(512, 2048)
        at = np.flatnonzero(kept % 128 == 0)[1:]
        for grouping, lo, hi in (("mxnet", 0.04, np.inf), ("even", -0.02, 0.02)):
            d = kl_divergences(hist, kept, grouping)
            finite = np.isfinite(d[at]) & np.isfinite(d[at - 1])
            jumps = np.median(d[at][finite] / d[at - 1][finite] - 1)
            assert lo < jumps < hi, (grouping, jumps)

    def test_relu_zeros_do_not_drag_the_threshold(self):
        x = np.maximum(np.random.default_rng(3).standard_normal(200_000), 0) * 1.0
        x = np.concatenate([x, [9.0]])  # one outlier to clip
        stats = TensorStats.from_values(x)
        assert stats.zeros > 90_000
        assert 3.5 < choose_amax_kl(stats) < 9.0

    @pytest.mark.parametrize("method", ["kl", "kl-mxnet"])
    @settings(max_examples=25, deadline=None, derandomize=True)
    @given(factor=st.floats(1e-3, 1e3), name=st.sampled_from(SYNTHETIC))
    def test_scaling_the_data_scales_the_threshold(self, method, factor, name):
        """The reference histogram has 2048 bins over [0, amax] wherever amax falls in its
        octave: the same data scaled by any factor gets the same bins, so the threshold scales
        with it, to float32 rounding of the data (worst seen 9.1e-8 over 50 draws)."""
        x = synthetic(name, n=20_000)
        scaled = (x.astype(np.float64) * factor).astype(np.float32)
        a, b = (choose_amax(method, TensorStats.from_values(v)) for v in (x, scaled))
        assert b / (a * factor) == pytest.approx(1.0, abs=1e-6)


class TestDispatch:
    def test_unknown_method(self):
        with pytest.raises(UsageProblem, match="unknown calibration method 'entropy'"):
            choose_amax("entropy", TensorStats(1.0))

    def test_missing_option(self):
        with pytest.raises(UsageProblem, match="percentile"):
            choose_amax("percentile", TensorStats.from_values([1.0, 2.0]))

    def test_stray_option(self):
        with pytest.raises(UsageProblem, match="max"):
            choose_amax("max", TensorStats(1.0), percentile=99.0)

    def test_reference_histogram_needed(self):
        stats = TensorStats.from_values([1.0, 2.0])
        stats = TensorStats(stats.amax, stats.counts, stats.edges)
        with pytest.raises(QcalError, match="'kl' needs the reference histogram"):
            choose_amax("kl", stats)

    @pytest.mark.parametrize("method", ["kl", "l2"])
    def test_histogram_needed(self, method):
        with pytest.raises(QcalError, match=f"'{method}' needs a histogram"):
            choose_amax(method, TensorStats(1.0))

    @pytest.mark.parametrize("method", ["max", "power2", "kl", "kl-mxnet", "l2"])
    def test_all_zero_tensor(self, method):
        assert choose_amax(method, TensorStats.from_values(np.zeros(10))) == 1.0

    def test_options_come_from_quant_options(self):
        options = QuantOptions(activation_method="percentile", percentile=99.9, global_scale=4.0)
        assert method_options("percentile", options) == {"percentile": 99.9}
        assert method_options("global", options) == {"global_scale": 4.0}
        assert method_options("kl", options) == {}


@pytest.mark.parametrize("bins", [200, 1024, 8192])
@pytest.mark.parametrize("method, opts", [("kl", {}), ("kl-mxnet", {}), ("l2", {}),
                                          ("percentile", {"percentile": 99.99})])
def test_data_driven_methods_never_exceed_the_max(bins, method, opts):
    x = np.random.default_rng(bins).laplace(size=50_000)
    stats = TensorStats.from_values(x, bins=bins)
    assert 0 < choose_amax(method, stats, **opts) <= stats.amax
