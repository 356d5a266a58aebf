"""Per-class thresholds meet their objective on the data they were tuned on."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import f1_score, precision_score, recall_score

from imgcls.errors import ConfigError
from imgcls.evaluation.calibration import softmax
from imgcls.evaluation.thresholds import (
    apply_thresholds,
    parse_objective,
    tune_thresholds,
)

CLASSES = ["cat", "dog", "bird"]


def separable_data(n: int = 900, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A noisy but informative classifier: every class reaches precision 0.95 at some threshold."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, size=n)
    logits = 2.0 * np.eye(3)[labels] + rng.normal(0.0, 1.0, size=(n, 3))
    return softmax(logits).astype(np.float32), labels


@pytest.mark.parametrize("text, expected", [
    ("f1", ("f1", None)), (" F1 ", ("f1", None)),
    ("precision=0.95", ("precision", 0.95)), ("recall=0.9", ("recall", 0.9)), ("recall = 1", ("recall", 1.0)),
])
def test_parse_objective(text, expected):
    assert parse_objective(text) == expected


@pytest.mark.parametrize("text", ["f2", "", "precision", "precision=", "precision=abc", "precision=1.5",
                                  "recall=0", "recall=-0.2", "accuracy=0.9", "precision=nan"])
def test_bad_objective_names_value_and_accepted_forms(text):
    with pytest.raises(ConfigError) as err:
        parse_objective(text)
    msg = str(err.value)
    assert repr(text) in msg
    assert "f1" in msg and "precision=" in msg and "recall=" in msg


def test_precision_objective_meets_target_with_most_recall():
    proba, labels = separable_data()
    out = tune_thresholds(proba, labels, CLASSES, "precision=0.95")
    assert out["objective"] == "precision=0.95"
    assert [e["class"] for e in out["per_class"]] == CLASSES
    for c, entry in enumerate(out["per_class"]):
        assert entry["met"] is True
        predicted = proba[:, c] >= out["thresholds"][c]
        actual = precision_score(labels == c, predicted)
        assert actual >= 0.95
        assert entry["precision"] == pytest.approx(actual)
        assert entry["recall"] == pytest.approx(recall_score(labels == c, predicted))
        assert entry["recall"] > 0.2  # the data allows far more than a single image
        # the next lower candidate would break the floor, else it would have been chosen
        lower = proba[:, c][proba[:, c] < out["thresholds"][c]]
        if len(lower):
            assert precision_score(labels == c, proba[:, c] >= lower.max()) < 0.95


def test_recall_objective_takes_highest_threshold_meeting_target():
    proba, labels = separable_data(seed=1)
    out = tune_thresholds(proba, labels, CLASSES, "recall=0.9")
    for c, entry in enumerate(out["per_class"]):
        assert entry["met"] is True
        assert recall_score(labels == c, proba[:, c] >= entry["threshold"]) >= 0.9
        higher = proba[:, c][proba[:, c] > entry["threshold"]]
        assert recall_score(labels == c, proba[:, c] >= higher.min()) < 0.9


def test_f1_objective_beats_default_half():
    proba, labels = separable_data(seed=2)
    out = tune_thresholds(proba, labels, CLASSES, "f1")
    for c, entry in enumerate(out["per_class"]):
        at_half = f1_score(labels == c, proba[:, c] >= 0.5)
        tuned = f1_score(labels == c, proba[:, c] >= entry["threshold"])
        assert tuned >= at_half
        assert entry["f1"] == pytest.approx(tuned)
        assert entry["met"] is True


def test_unreachable_target_falls_back_to_best_precision():
    # class 0 scored 0.9 (neg), 0.8 (pos), 0.7 (pos), 0.6 (neg), 0.5 (neg): precision peaks at 2/3 at t = 0.7
    p0 = np.array([0.9, 0.8, 0.7, 0.6, 0.5])
    proba = np.stack([p0, 1 - p0], axis=1)
    labels = np.array([1, 0, 0, 1, 1])
    out = tune_thresholds(proba, labels, ["a", "b"], "precision=0.9")
    a, b = out["per_class"]
    assert a["met"] is False
    assert a["threshold"] == pytest.approx(0.7)
    assert (a["precision"], a["recall"]) == pytest.approx((2 / 3, 1.0))
    # class 1 scored .1 (pos) .2 .3 .4 (pos) .5 (pos): the lowest threshold with precision >= .9 is .4
    assert b["met"] is True
    assert b["threshold"] == pytest.approx(0.4)
    assert (b["precision"], b["recall"]) == pytest.approx((1.0, 2 / 3))


def test_class_without_images_is_not_met():
    proba, labels = separable_data(n=60)
    labels[labels == 2] = 0
    out = tune_thresholds(proba, labels, CLASSES, "f1")
    assert out["per_class"][2]["met"] is False and out["per_class"][2]["support"] == 0
    assert all(np.isfinite(out["thresholds"]))


def test_apply_thresholds_unknown_and_argmax_among_clearing():
    proba = np.array([
        [0.50, 0.30, 0.20],  # none clears -> -1
        [0.70, 0.25, 0.05],  # only 0 clears
        [0.45, 0.50, 0.05],  # 0 and 1 clear, 1 higher
        [0.16, 0.40, 0.44],  # 2 is the argmax but misses 0.45; 1 clears -> 1
        [0.05, 0.475, 0.475],  # 1 and 2 clear with equal probability -> the lower index
    ])
    got = apply_thresholds(proba, [0.6, 0.35, 0.45])
    assert got.tolist() == [-1, 0, 1, 1, 1]
    assert got.dtype == np.int64
    assert apply_thresholds(proba, [0.0, 0.0, 0.0]).tolist() == proba.argmax(1).tolist()


def test_apply_thresholds_checks_count():
    with pytest.raises(ValueError, match="one threshold per class"):
        apply_thresholds(np.full((2, 3), 1 / 3), [0.5, 0.5])


def test_tuned_thresholds_round_trip_through_apply():
    proba, labels = separable_data(seed=3)
    out = tune_thresholds(proba, labels, CLASSES, "precision=0.95")
    pred = apply_thresholds(proba, out["thresholds"])
    assert (pred == -1).any()
    decided = pred >= 0
    assert (pred[decided] == labels[decided]).mean() >= 0.9


@pytest.mark.parametrize("seed, ties", [(0, False), (1, True), (2, True)])
def test_precision_recall_curve_and_average_precision_match_scikit_learn(seed, ties):
    from sklearn.metrics import average_precision_score
    from sklearn.metrics import precision_recall_curve as sk_curve

    from imgcls.evaluation.thresholds import average_precision, precision_recall_curve

    rng = np.random.default_rng(seed)
    positive = rng.random(300) < 0.3
    scores = rng.random(300) + 0.4 * positive
    if ties:  # few distinct scores: the curve keeps one point a distinct score
        scores = np.round(scores, 1)
    for ours, theirs in zip(precision_recall_curve(positive, scores), sk_curve(positive, scores)):
        np.testing.assert_allclose(ours, theirs, rtol=0, atol=1e-12)
    assert average_precision(positive, scores) == pytest.approx(average_precision_score(positive, scores), abs=1e-12)
