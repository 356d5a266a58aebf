"""Per-label thresholds tune on indicator matrices and decide label sets."""

from __future__ import annotations

import numpy as np
import pytest
from sklearn.metrics import precision_score, recall_score

from imgcls.evaluation.thresholds import label_sets, tune_thresholds


def random_case(seed: int, n: int = 120, n_labels: int = 6, ties: bool = False, empty_labels: int = 0):
    """Targets (N, L) uint8 and informative sigmoid outputs; the last ``empty_labels`` labels have no positive."""
    rng = np.random.default_rng(seed)
    targets = (rng.random((n, n_labels)) < rng.uniform(0.1, 0.6, n_labels)).astype(np.uint8)
    if empty_labels:
        targets[:, -empty_labels:] = 0
    proba = 1 / (1 + np.exp(-(2.0 * targets - 1.0 + rng.normal(0.0, 1.2, targets.shape))))
    if ties:  # few distinct scores, and many exactly at the 0.5 threshold
        proba = np.round(proba, 1)
    return targets, proba.astype(np.float32)


def test_tuned_thresholds_on_an_indicator_matrix_meet_a_precision_target():
    targets, proba = random_case(5, n=600, n_labels=4)
    labels = ["a", "b", "c", "d"]
    out = tune_thresholds(proba, targets, labels, "precision=0.9")
    for j, entry in enumerate(out["per_class"]):
        assert entry["met"] is True and entry["support"] == int(targets[:, j].sum())
        predicted = proba[:, j] >= entry["threshold"]
        assert precision_score(targets[:, j], predicted) >= 0.9
        assert entry["precision"] == pytest.approx(precision_score(targets[:, j], predicted))
        assert entry["recall"] == pytest.approx(recall_score(targets[:, j], predicted))
        lower = proba[:, j][proba[:, j] < entry["threshold"]]  # the next lower candidate breaks the floor
        assert precision_score(targets[:, j], proba[:, j] >= lower.max()) < 0.9


def test_indicator_matrix_thresholds_equal_class_index_thresholds_for_one_hot_labels():
    rng = np.random.default_rng(6)
    classes = rng.integers(0, 3, 200)
    proba = np.round(rng.random((200, 3)), 2)
    one_hot = np.eye(3, dtype=np.uint8)[classes]
    for objective in ("f1", "recall=0.8"):
        assert tune_thresholds(proba, one_hot, list("abc"), objective) == tune_thresholds(proba, classes, list("abc"),
                                                                                          objective)


def test_bad_indicator_matrix_is_refused():
    with pytest.raises(ValueError, match="only 0 and 1"):
        tune_thresholds(np.full((2, 2), 0.5), np.array([[0, 3], [1, 0]]), ["a", "b"])
    with pytest.raises(ValueError, match="one column per class"):
        tune_thresholds(np.full((2, 2), 0.5), np.array([[0, 1, 0], [1, 0, 0]]), ["a", "b"])


def test_label_sets_order_thresholds_and_probabilities():
    proba = np.array([[0.2, 0.9, 0.6],
                      [0.5, 0.1, 0.5],   # 0.5 clears the default threshold; equal probabilities keep label order
                      [0.1, 0.2, 0.3]])  # nothing clears
    got = label_sets(proba, ["cat", "dog", "sky"])
    assert [g["labels"] for g in got] == [["dog", "sky"], ["cat", "sky"], []]
    assert list(got[0]["probabilities"]) == ["cat", "dog", "sky"]
    assert got[0]["probabilities"] == pytest.approx({"cat": 0.2, "dog": 0.9, "sky": 0.6})
    tuned = label_sets(proba, ["cat", "dog", "sky"], [0.15, 0.95, 0.25])
    assert [g["labels"] for g in tuned] == [["sky", "cat"], ["cat", "sky"], ["sky"]]
    with pytest.raises(ValueError, match="one threshold per label"):
        label_sets(proba, ["cat", "dog", "sky"], [0.5, 0.5])
