"""compute_metrics counts with numpy; it must give scikit-learn's figures, edge cases included."""

import numpy as np
import pytest
from sklearn.metrics import confusion_matrix, precision_recall_fscore_support

from imgcls.evaluation.metrics import compute_metrics


def _proba_for(pred: np.ndarray, k: int, rng) -> np.ndarray:
    """Random probabilities whose argmax is ``pred``."""
    proba = rng.random((len(pred), k)) * 0.5
    proba[np.arange(len(pred)), pred] = 1.0
    return proba / proba.sum(1, keepdims=True)


CASES = {
    "balanced": (np.arange(200) % 5, None),
    "a class never predicted": (np.arange(120) % 4, lambda y: np.where(y == 3, 0, y)),
    "a class absent from the labels": (np.arange(90) % 3, lambda y: np.where(y == 0, 3, y)),
    "nothing right": (np.arange(60) % 3, lambda y: (y + 1) % 3),
    "one image": (np.array([2]), None),
}


@pytest.mark.parametrize("case", CASES)
def test_per_class_and_averaged_scores_match_scikit_learn(case):
    rng = np.random.default_rng(len(case))
    labels, make_pred = CASES[case]
    k = 4 if "absent" in case or "never" in case else int(labels.max()) + 1
    pred = make_pred(labels) if make_pred else np.where(rng.random(len(labels)) < 0.7, labels,
                                                       rng.integers(0, k, len(labels)))
    classes = [f"c{i}" for i in range(k)]
    m = compute_metrics(labels, _proba_for(pred, k, rng), classes)
    ids = list(range(k))
    p, r, f, s = precision_recall_fscore_support(labels, pred, labels=ids, zero_division=0)
    got = np.array([[row[key] for key in ("precision", "recall", "f1", "support")] for row in m["per_class"]])
    np.testing.assert_allclose(got, np.stack([p, r, f, s], 1), rtol=0, atol=1e-12)
    for avg in ("macro", "weighted"):
        expected = precision_recall_fscore_support(labels, pred, labels=ids, average=avg, zero_division=0)[:3]
        assert [m[f"{avg}_avg"][key] for key in ("precision", "recall", "f1")] == pytest.approx(expected, abs=1e-12)
    assert m["confusion_matrix"] == confusion_matrix(labels, pred, labels=ids).tolist()
    assert m["accuracy"] == pytest.approx((pred == labels).mean())


def test_no_images_give_zeros_not_errors():
    m = compute_metrics(np.zeros(0, dtype=np.int64), np.zeros((0, 3)), ["a", "b", "c"])
    assert m["n"] == 0 and m["accuracy"] == 0.0 and m["macro_avg"]["f1"] == 0.0 and m["weighted_avg"]["f1"] == 0.0
    assert m["confusion_matrix"] == [[0] * 3] * 3


def test_a_label_outside_the_classes_is_refused_by_name():
    with pytest.raises(ValueError, match=r"labels must be class indices 0\.\.2; got values from 0 to 3"):
        compute_metrics(np.array([0, 3]), np.eye(3)[[0, 1]], ["a", "b", "c"])
