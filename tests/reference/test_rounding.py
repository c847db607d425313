"""Rounding modes of the integer graph: ties up (Relay's UPWARD) or to even (TONEAREST), known answers."""
from __future__ import annotations

from fractions import Fraction

import numpy as np
import pytest

from qcal.config import QuantOptions
from qcal.errors import UsageProblem
from qcal.ir.qgraph import rounding_of
from qcal.reference.int_interpreter import rounded_mean, rounding_right_shift, run_integer, run_simulated
from tests.fixtures import every_op, images, realized

VALUES = np.arange(-70, 71, dtype=np.int64)


def _exact(num, den, rounding):
    """Python's round() of a Fraction rounds ties to even; ties up is floor(x + 1/2)."""
    x = Fraction(int(num), int(den))
    return round(x) if rounding == "nearest" else int(np.floor(x + Fraction(1, 2)))


@pytest.mark.parametrize("rounding", ["upward", "nearest"])
@pytest.mark.parametrize("rshift", [1, 2, 3, 5])
def test_rounding_right_shift_matches_exact_division(rounding, rshift):
    got = rounding_right_shift(VALUES, rshift, rounding)
    assert list(got) == [_exact(v, 2 ** rshift, rounding) for v in VALUES]


def test_ties_differ_only_where_the_upper_neighbour_is_odd():
    up, even = rounding_right_shift(VALUES, 1, "upward"), rounding_right_shift(VALUES, 1, "nearest")
    # 2.5 -> 3 up, 2 even; 3.5 -> 4 both; -2.5 -> -2 up, -2 even; -1.5 -> -1 up, -2 even
    assert [int(rounding_right_shift(np.int64(v), 1, "nearest")) for v in (5, 7, -5, -3)] == [2, 4, -2, -2]
    assert [int(rounding_right_shift(np.int64(v), 1, "upward")) for v in (5, 7, -5, -3)] == [3, 4, -2, -1]
    differ = VALUES[up != even]
    assert set(differ % 4) == {1}  # v = 4k + 1: v/2 = 2k + 0.5, up gives the odd 2k + 1


def test_per_channel_zero_shift_leaves_values_alone():
    v = np.array([[5, 5, 5], [-7, -7, -7]], dtype=np.int64)
    for rounding in ("upward", "nearest"):
        out = rounding_right_shift(v, np.array([0, 1, 2]), rounding)
        assert list(out[:, 0]) == [5, -7]
    assert list(rounding_right_shift(v, np.array([0, 1, 2]), "nearest")[0]) == [5, 2, 1]


@pytest.mark.parametrize("rounding", ["upward", "nearest"])
@pytest.mark.parametrize("count", [1, 2, 3, 4, 6, 9])
def test_rounded_mean_matches_exact_division(rounding, count):
    got = rounded_mean(VALUES, np.int64(count), rounding)
    assert list(got) == [_exact(v, count, rounding) for v in VALUES]


def test_rounding_reaches_every_rescale_and_mean():
    q = realized(every_op(), QuantOptions(rounding="nearest"), images(8, (4, 8, 8)))
    rounded = [n for n in q.nodes if n.op in ("requantize", "qavg_pool2d")]
    assert rounded and {rounding_of(n) for n in rounded} == {"nearest"}
    assert QuantOptions(rounding="nearest").label.endswith("round-nearest")


def test_unknown_rounding_is_refused():
    with pytest.raises(UsageProblem, match="rounding must be one of upward, nearest"):
        QuantOptions(rounding="TONEAREST")


@pytest.mark.parametrize("bits", [8, 4])
def test_simulated_model_rounds_as_the_integer_model(bits):
    # power-of-2 scales: every rescale is a shift and the simulation is exact, ties included
    options = QuantOptions(rounding="nearest", weight_bits=bits, activation_bits=bits, bias_bits=8)
    q = realized(every_op(), options, images(8, (4, 8, 8)))
    x = images(6, (4, 8, 8), seed=2, std=1.5)
    assert np.array_equal(run_integer(q, x).astype(np.float64), run_simulated(q, x).astype(np.float32))
