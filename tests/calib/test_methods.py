"""Known-answer tests for the range maths of every activation calibration method."""
import numpy as np
import pytest

from qcal.calib.methods import (CALIBRATION_METHODS, TensorStats, choose_amax, choose_amax_kl, choose_amax_l2,
                                choose_amax_max, choose_amax_percentile, choose_amax_power2, kl_divergences,
                                method_options)
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

    @pytest.mark.parametrize("method, opts", [("kl", {}), ("l2", {}),
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


def _naive_kl(hist, k):
    """The entropy method for one candidate, written as the loop TensorRT describes."""
    p = hist[:k].astype(float)
    p[k - 1] += hist[k:].sum()
    q = np.zeros(k)
    width = k // 128
    for j in range(128):
        lo, hi = j * width, (k if j == 127 else (j + 1) * width)
        nonempty = hist[lo:hi] > 0
        if nonempty.any():
            q[lo:hi] = np.where(nonempty, hist[lo:hi].sum() / nonempty.sum(), 0)
    p, q = p / p.sum(), q / q.sum()
    if np.any((p > 0) & (q == 0)):
        return np.inf
    m = p > 0
    return float((p[m] * np.log(p[m] / q[m])).sum())


class TestKL:
    def test_closed_form_equals_the_loop(self):
        rng = np.random.default_rng(2)
        hist = np.histogram(np.abs(rng.standard_normal(20000) * rng.choice([1, 3], 20000)),
                            bins=700)[0]
        kept = np.arange(128, 701)
        fast = kl_divergences(hist.astype(float), kept)
        slow = np.array([_naive_kl(hist, k) for k in kept])
        assert np.array_equal(np.isinf(fast), np.isinf(slow))
        finite = np.isfinite(slow)
        np.testing.assert_allclose(fast[finite], slow[finite], rtol=1e-9, atol=1e-12)

    def test_relu_zeros_do_not_drag_the_threshold(self):
        x = np.maximum(np.random.default_rng(3).standard_normal(200_000), 0)
        stats = TensorStats.from_values(x, bins=8192)
        assert stats.zeros > 90_000
        assert 3.5 < choose_amax_kl(stats) < x.max()

    def test_few_bins_keep_the_max(self):
        assert choose_amax_kl(TensorStats.from_values([0.5, 1.0, 2.0], bins=64)) == 2.0


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

    @pytest.mark.parametrize("method", ["kl", "l2"])
    def test_histogram_needed(self, method):
        with pytest.raises(QcalError, match=f"'{method}' needs a histogram"):
            choose_amax(method, TensorStats(1.0))

    @pytest.mark.parametrize("method", ["max", "power2", "kl", "l2"])
    def test_all_zero_tensor(self, method):
        assert choose_amax(method, TensorStats.from_values(np.zeros(10))) == 1.0

    def test_options_come_from_quant_options(self):
        options = QuantOptions(activation_method="percentile", percentile=99.9, global_scale=4.0)
        assert method_options("percentile", options) == {"percentile": 99.9}
        assert method_options("global", options) == {"global_scale": 4.0}
        assert method_options("kl", options) == {}


@pytest.mark.parametrize("bins", [200, 1024, 8192])
@pytest.mark.parametrize("method, opts", [("kl", {}), ("l2", {}),
                                          ("percentile", {"percentile": 99.99})])
def test_data_driven_methods_never_exceed_the_max(bins, method, opts):
    x = np.random.default_rng(bins).laplace(size=50_000)
    stats = TensorStats.from_values(x, bins=bins)
    assert 0 < choose_amax(method, stats, **opts) <= stats.amax
