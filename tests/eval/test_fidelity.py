import numpy as np
import pytest

from qcal.eval.fidelity import (compare, mean_kl_divergence, softmax, sqnr_db, sqnr_from_energies,
                                top1_agreement)


def test_identical_outputs_agree_fully_with_zero_divergence():
    logits = np.random.RandomState(0).randn(50, 10).astype(np.float32)
    metrics = compare(logits, logits.copy())
    assert metrics["agree_top1"] == 100.0
    assert metrics["kl"] == pytest.approx(0.0, abs=1e-12)
    assert metrics["sqnr_logits_db"] == float("inf")


def test_kl_matches_the_closed_form_for_two_classes():
    reference = np.array([[0.0, np.log(3.0)]])  # p = (1/4, 3/4)
    other = np.array([[0.0, 0.0]])  # q = (1/2, 1/2)
    expected = 0.25 * np.log(0.25 / 0.5) + 0.75 * np.log(0.75 / 0.5)
    assert mean_kl_divergence(reference, other) == pytest.approx(expected, rel=1e-12)
    assert mean_kl_divergence(other, reference) != pytest.approx(expected)  # not symmetric


def test_kl_is_stable_for_large_logits():
    reference = np.array([[1000.0, 0.0]])
    assert np.isfinite(mean_kl_divergence(reference, np.array([[0.0, 1000.0]])))
    assert softmax(reference)[0, 0] == pytest.approx(1.0)


def test_agreement_counts_top1_matches():
    a = np.eye(4)
    b = np.eye(4)[[0, 1, 3, 2]]
    assert top1_agreement(a, b) == 0.5


def test_sqnr_of_a_known_noise_level():
    x = np.ones(1000)
    assert sqnr_db(x, x + 0.1) == pytest.approx(20.0)


def test_shapes_must_match():
    with pytest.raises(ValueError, match="same images"):
        compare(np.zeros((3, 10)), np.zeros((4, 10)))


def test_sqnr_from_energies_known_values():
    assert sqnr_from_energies(100.0, 1.0) == pytest.approx(20.0)
    assert sqnr_from_energies(1.0, 0.0) == float("inf")
    assert sqnr_from_energies(0.0, 1.0) == float("-inf")


def test_compare_in_passes_gives_the_figures_of_all_rows_at_once():
    rng = np.random.RandomState(3)
    reference = rng.randn(1001, 17).astype(np.float32)  # odd sizes: a short last pass
    logits = (reference + rng.randn(1001, 17) * 0.3).astype(np.float32)
    whole = compare(reference, logits, rows_per_pass=len(reference))
    assert whole == {"agree_top1": 100.0 * top1_agreement(reference, logits),
                     "kl": pytest.approx(mean_kl_divergence(reference, logits), rel=1e-12),
                     "sqnr_logits_db": pytest.approx(sqnr_db(reference, logits), rel=1e-12)}
    in_passes = compare(reference, logits, "_crops", rows_per_pass=64)
    assert in_passes["agree_top1_crops"] == whole["agree_top1"]
    assert in_passes["kl_crops"] == pytest.approx(whole["kl"], rel=1e-12)
    assert in_passes["sqnr_logits_db_crops"] == pytest.approx(whole["sqnr_logits_db"], rel=1e-12)
