"""Temperature scaling recovers a known over-confidence; ECE matches a hand computation."""

from __future__ import annotations

import numpy as np
import pytest

from imgcls.evaluation.calibration import (
    expected_calibration_error,
    fit_temperature,
    reliability_bins,
    softmax,
)


def calibrated_logits(n: int = 20000, k: int = 5, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Logits whose softmax is the true class distribution: labels are sampled from it."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(0.0, 2.0, size=(n, k))
    p = softmax(logits)
    labels = (rng.random(n)[:, None] > np.cumsum(p, axis=1)).sum(axis=1)
    return logits.astype(np.float32), np.minimum(labels, k - 1)


def test_recovers_overconfidence_factor():
    logits, labels = calibrated_logits()
    t = fit_temperature(4.0 * logits, labels)
    assert t == pytest.approx(4.0, rel=0.10)
    before = expected_calibration_error(softmax(4.0 * logits), labels)
    after = expected_calibration_error(softmax(4.0 * logits, t), labels)
    assert before > 0.10
    assert after < 0.03
    assert before - after > 0.08


def test_calibrated_logits_keep_temperature_one():
    logits, labels = calibrated_logits(seed=1)
    assert fit_temperature(logits, labels) == pytest.approx(1.0, abs=0.06)
    assert expected_calibration_error(softmax(logits), labels) < 0.02


def test_underconfidence_gives_temperature_below_one():
    logits, labels = calibrated_logits(seed=2)
    assert fit_temperature(0.5 * logits, labels) == pytest.approx(0.5, rel=0.10)


def test_fit_is_deterministic():
    logits, labels = calibrated_logits(n=2000, seed=3)
    assert fit_temperature(3 * logits, labels) == fit_temperature(3 * logits, labels)


def test_degenerate_inputs_give_one():
    assert fit_temperature(np.zeros((0, 3), np.float32), np.zeros(0, np.int64)) == 1.0
    rng = np.random.default_rng(0)
    assert fit_temperature(rng.normal(size=(50, 3)), np.full(50, 2)) == 1.0


# Four images, four classes; top probabilities 0.9 (right), 0.7 (wrong), 0.4 (right), 0.35 (wrong).
PROBA = np.array([
    [0.90, 0.05, 0.03, 0.02],
    [0.70, 0.10, 0.10, 0.10],
    [0.40, 0.30, 0.20, 0.10],
    [0.10, 0.35, 0.30, 0.25],
])
LABELS = np.array([0, 1, 0, 2])


def test_ece_by_hand():
    # bins (0, .5] and (.5, 1]: low bin conf .375 acc .5, high bin conf .8 acc .5; half the images each
    assert expected_calibration_error(PROBA, LABELS, bins=2) == pytest.approx(0.5 * 0.125 + 0.5 * 0.3, abs=1e-12)


def test_reliability_bins_by_hand():
    rel = reliability_bins(PROBA, LABELS, bins=4)
    assert rel["count"] == [0, 2, 1, 1]
    assert rel["confidence"][0] is None and rel["accuracy"][0] is None
    assert rel["confidence"][1:] == pytest.approx([0.375, 0.7, 0.9])
    assert rel["accuracy"][1:] == [0.5, 0.0, 1.0]
    assert rel["edges"] == pytest.approx([0, 0.25, 0.5, 0.75, 1.0])


def test_confidence_on_a_bin_edge_goes_to_the_lower_bin():
    rel = reliability_bins(np.array([[0.5, 0.5], [1.0, 0.0]]), np.array([0, 0]), bins=2)
    assert rel["count"] == [1, 1]


def test_ece_of_empty_input_is_zero():
    assert expected_calibration_error(np.zeros((0, 3)), np.zeros(0, np.int64)) == 0.0


def test_bad_shapes_are_named():
    with pytest.raises(ValueError, match="labels"):
        expected_calibration_error(PROBA, LABELS[:3])


@pytest.mark.parametrize("scale", [0.3, 1.0, 2.5, 40.0])
def test_fitted_temperature_is_scipy_bounded_minimum(scale):
    """The golden-section search lands where SciPy's bounded Brent does (to the 4 decimals kept)."""
    from scipy.optimize import minimize_scalar

    from imgcls.evaluation.calibration import _nll

    logits, labels = calibrated_logits(n=3000, seed=1)
    logits = (scale * logits).astype(np.float64)
    res = minimize_scalar(lambda log_t: _nll(logits, labels, float(np.exp(log_t))), bounds=(-3.0, 3.0),
                          method="bounded", options={"xatol": 1e-6})
    assert fit_temperature(logits, labels) == pytest.approx(float(np.exp(res.x)), abs=2e-4)
