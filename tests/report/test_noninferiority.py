"""The search's non-inferiority test (Tango's score test for paired proportions) against values
computed by hand and by an independent route (scipy's optimizer on the restricted likelihood)."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import optimize, stats

from qcal.report.statistics import _tango_z, noninferiority_test, paired_lower_bound


def _pairs(both, lost, gained, neither):
    """(reference correct, variant correct) of a paired table."""
    reference = np.array([1] * both + [1] * lost + [0] * gained + [0] * neither, bool)
    variant = np.array([1] * both + [0] * lost + [1] * gained + [0] * neither, bool)
    return reference, variant


def test_no_discordant_image_closed_form():
    # b = c = 0: the restricted MLE of P(lost) is the margin m itself, so
    # Z = n m / sqrt(n m (1 - m)) = sqrt(n m / (1 - m)); n 3000, m 0.003: sqrt(9.0271) = 3.00451
    assert _tango_z(0, 0, 3000, -0.003) == pytest.approx(3.004510150, abs=1e-9)
    test = noninferiority_test(*_pairs(2700, 0, 0, 300), margin=0.003)
    assert test["z"] == pytest.approx(3.004510150, abs=1e-9)
    assert test["p_value"] == pytest.approx(stats.norm.sf(math.sqrt(3000 * 0.003 / 0.997)),
                                            rel=1e-9)
    assert test["non_inferior"] and test["lost"] == 0 and test["gained"] == 0


def test_at_zero_margin_it_is_mcnemars_statistic():
    # delta0 = 0: q = (b + c) / 2n, so Z = (b - c) / sqrt(b + c)
    for gained, lost in [(40, 20), (3, 11), (1, 0), (250, 251)]:
        assert _tango_z(gained, lost, 1000, 0.0) == pytest.approx(
            (gained - lost) / math.sqrt(gained + lost), rel=1e-12)


@pytest.mark.parametrize("gained, lost, n, margin", [
    (12, 30, 3000, 0.003), (5, 9, 200, 0.03), (0, 4, 500, 0.01), (17, 2, 1000, 0.002)])
def test_matches_the_restricted_likelihood_maximised_numerically(gained, lost, n, margin):
    d0 = -margin
    rest = n - gained - lost

    def negative_log_likelihood(q):  # q = P(lost); P(gained) = q + d0
        return -(gained * math.log(q + d0) + lost * math.log(q)
                 + rest * math.log(1 - 2 * q - d0))

    q = optimize.minimize_scalar(negative_log_likelihood, bounds=(margin + 1e-12,
                                 (1 - d0) / 2 - 1e-12), method="bounded",
                                 options={"xatol": 1e-14}).x
    expected = (gained - lost - n * d0) / math.sqrt(n * (2 * q + d0 * (1 - d0)))
    assert _tango_z(gained, lost, n, d0) == pytest.approx(expected, rel=1e-6)


def test_the_lower_bound_is_where_the_test_turns():
    gained, lost, n = 14, 31, 2000
    lower = paired_lower_bound(gained, lost, n, 0.95)
    assert lower < (gained - lost) / n
    assert _tango_z(gained, lost, n, lower) == pytest.approx(stats.norm.ppf(0.95), abs=1e-6)
    # margins just beyond / within the bound pass / fail, and p crosses alpha there
    reference, variant = _pairs(1700, lost, gained, n - 1700 - lost - gained)
    beyond = noninferiority_test(reference, variant, margin=-lower + 1e-4)
    within = noninferiority_test(reference, variant, margin=-lower - 1e-4)
    assert beyond["non_inferior"] and beyond["p_value"] < 0.05
    assert not within["non_inferior"] and within["p_value"] > 0.05


def test_more_images_with_the_same_rates_give_more_evidence():
    # 0.2 points lost on 1,000 images cannot show non-inferiority at 0.3 points; on 100,000 it can
    small = noninferiority_test(*_pairs(900, 5, 3, 92), margin=0.003)
    large = noninferiority_test(*_pairs(90000, 500, 300, 9200), margin=0.003)
    assert small["difference"] == large["difference"] == pytest.approx(-0.002)
    assert not small["non_inferior"] and large["non_inferior"]


@pytest.mark.parametrize("kwargs, message", [
    ({"margin": 1.5}, "margin must be a fraction"), ({"margin": 0.01, "alpha": 0.7}, "alpha")])
def test_bad_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        noninferiority_test(*_pairs(1, 1, 1, 1), **kwargs)
