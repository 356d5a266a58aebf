"""Multi-label metrics agree with scikit-learn, count co-occurrences and errors exactly, and reach the eval files;
per-label thresholds tune on indicator matrices and decide label sets."""

from __future__ import annotations

import csv
import json

import numpy as np
import pytest
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    f1_score,
    hamming_loss,
    log_loss,
    precision_score,
    recall_score,
)

from imgcls.evaluation.metrics import compute_metrics, save_metrics
from imgcls.evaluation.multilabel import (
    binary_cross_entropy,
    format_multilabel_report,
    multilabel_metrics,
    multilabel_rows,
)
from imgcls.evaluation.thresholds import tune_thresholds
from imgcls.predictor import label_sets

KEYS = {"task", "n", "labels", "thresholds", "map", "micro_f1", "macro_f1", "micro_precision", "micro_recall",
        "macro_precision", "macro_recall", "subset_accuracy", "hamming_loss", "loss", "per_label", "cooccurrence",
        "error_cooccurrence", "missed", "false_alarms", "empty_true", "empty_predicted", "accuracy", "macro_avg"}


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


def assert_matches_scikit_learn(m: dict, targets: np.ndarray, proba: np.ndarray, thresholds) -> None:
    pred = (proba >= np.asarray(thresholds)).astype(np.uint8)
    for avg in ("micro", "macro"):
        for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
            assert m[f"{avg}_{name}"] == pytest.approx(fn(targets, pred, average=avg, zero_division=0), abs=1e-12)
    for name, fn in (("precision", precision_score), ("recall", recall_score), ("f1", f1_score)):
        theirs = fn(targets, pred, average=None, zero_division=0)
        np.testing.assert_allclose([row[name] for row in m["per_label"]], theirs, rtol=0, atol=1e-12)
    assert m["hamming_loss"] == pytest.approx(hamming_loss(targets, pred), abs=1e-12)
    assert m["subset_accuracy"] == pytest.approx(accuracy_score(targets, pred), abs=1e-12)
    assert m["accuracy"] == m["subset_accuracy"]
    assert m["macro_avg"]["f1"] == m["macro_f1"]
    has_positive = targets.any(0)
    ours = [row["ap"] for row in m["per_label"]]
    assert [a is None for a in ours] == (~has_positive).tolist()
    if has_positive.any():
        theirs = average_precision_score(targets[:, has_positive], proba[:, has_positive], average=None)
        np.testing.assert_allclose([a for a in ours if a is not None], theirs, rtol=0, atol=1e-12)
        assert m["map"] == pytest.approx(float(np.mean(theirs)), abs=1e-12)
        if has_positive.all():
            assert m["map"] == pytest.approx(average_precision_score(targets, proba, average="macro"), abs=1e-12)
    clipped = np.clip(proba.astype(np.float64), 1e-12, 1 - 1e-12)  # scikit-learn clips at 2e-16 itself
    bce = np.mean([log_loss(targets[:, j], clipped[:, j], labels=[0, 1]) for j in range(targets.shape[1])])
    assert m["loss"] == pytest.approx(bce, rel=1e-9)
    assert [row["support"] for row in m["per_label"]] == targets.sum(0).tolist()
    assert [row["predicted"] for row in m["per_label"]] == pred.sum(0).tolist()


@pytest.mark.parametrize("seed, ties, empty_labels", [(0, False, 0), (1, True, 0), (2, True, 2), (3, False, 1)])
def test_figures_match_scikit_learn(seed, ties, empty_labels):
    targets, proba = random_case(seed, ties=ties, empty_labels=empty_labels)
    labels = [f"l{j}" for j in range(targets.shape[1])]
    m = multilabel_metrics(targets, proba, labels)
    assert set(m) == KEYS
    assert m["task"] == "multilabel" and m["n"] == len(targets) and m["labels"] == labels
    assert m["thresholds"] == [0.5] * len(labels)
    json.dumps(m, allow_nan=False)
    assert_matches_scikit_learn(m, targets, proba, m["thresholds"])
    if empty_labels:
        # a label never true and (at a threshold above every score) never predicted counts 0 in the macro F1
        thresholds = [0.5] * (len(labels) - 1) + [1.01]
        m = multilabel_metrics(targets, proba, labels, thresholds)
        assert m["per_label"][-1]["f1"] == 0.0 and m["per_label"][-1]["predicted"] == 0
        assert m["thresholds"] == pytest.approx(thresholds)
        assert_matches_scikit_learn(m, targets, proba, thresholds)


def test_per_label_thresholds_and_all_empty_predictions_match_scikit_learn():
    targets, proba = random_case(4, ties=True)
    labels = list("abcdef")
    thresholds = [0.3, 0.5, 0.7, 0.2, 0.9, 0.6]
    m = multilabel_metrics(targets, proba, labels, np.array(thresholds))
    assert m["thresholds"] == pytest.approx(thresholds)
    assert [row["threshold"] for row in m["per_label"]] == m["thresholds"]
    assert_matches_scikit_learn(m, targets, proba, thresholds)
    nothing = multilabel_metrics(targets, proba, labels, [1.5] * 6)
    assert nothing["empty_predicted"] == len(targets)
    assert nothing["micro_f1"] == 0.0 and nothing["macro_precision"] == 0.0
    assert nothing["false_alarms"] == [0] * 6 and nothing["missed"] == targets.sum(0).tolist()
    assert_matches_scikit_learn(nothing, targets, proba, [1.5] * 6)
    with pytest.raises(ValueError, match="one threshold per label"):
        multilabel_metrics(targets, proba, labels, [0.5] * 5)


# cat, dog, sky; 0.9 predicts a label, 0.1 does not (threshold 0.5)
HAND_TARGETS = np.array([[1, 0, 1],   # predicted dog, sky: cat missed, dog falsely predicted
                         [1, 1, 0],   # predicted cat: dog missed, nothing falsely predicted
                         [0, 0, 0],   # predicted sky: a false alarm with nothing missed
                         [0, 1, 0],   # predicted cat, sky: dog mistaken for cat and for sky
                         [1, 1, 1],   # all right
                         [0, 0, 0]],  # all right, empty
                        dtype=np.uint8)
HAND_PRED = np.array([[0, 1, 1], [1, 0, 0], [0, 0, 1], [1, 0, 1], [1, 1, 1], [0, 0, 0]], dtype=bool)


def test_cooccurrence_and_errors_on_a_hand_made_example():
    proba = np.where(HAND_PRED, 0.9, 0.1)
    m = multilabel_metrics(HAND_TARGETS.astype(bool), proba, ["cat", "dog", "sky"])
    assert m["cooccurrence"] == [[3, 2, 2], [2, 3, 1], [2, 1, 2]]
    assert m["error_cooccurrence"] == [[0, 1, 0], [1, 0, 1], [0, 0, 0]]
    assert m["missed"] == [1, 2, 0] and m["false_alarms"] == [1, 1, 2]
    assert (m["empty_true"], m["empty_predicted"]) == (2, 1)
    assert m["subset_accuracy"] == pytest.approx(2 / 6)
    assert m["hamming_loss"] == pytest.approx(7 / 18)
    cat = m["per_label"][0]
    assert (cat["support"], cat["predicted"], cat["precision"], cat["recall"]) == (3, 3, pytest.approx(2 / 3),
                                                                                    pytest.approx(2 / 3))
    assert m["macro_avg"]["support"] == 8
    json.dumps(m, allow_nan=False)


def test_no_images_give_zeros_not_errors():
    m = multilabel_metrics(np.zeros((0, 2), np.uint8), np.zeros((0, 2)), ["a", "b"])
    assert m["n"] == 0 and m["map"] is None and m["loss"] == 0.0
    assert m["subset_accuracy"] == m["hamming_loss"] == m["micro_f1"] == m["macro_f1"] == 0.0
    assert m["cooccurrence"] == [[0, 0], [0, 0]]
    json.dumps(m, allow_nan=False)
    assert "mAP -" in format_multilabel_report(m)


def test_bad_targets_are_refused_by_shape_and_value():
    with pytest.raises(ValueError, match="only 0 and 1"):
        multilabel_metrics(np.array([[0, 2]]), np.array([[0.1, 0.2]]), ["a", "b"])
    with pytest.raises(ValueError, match="L = 3 labels"):
        multilabel_metrics(np.array([[0, 1]]), np.array([[0.1, 0.2]]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="proba must be"):
        multilabel_metrics(np.array([[0, 1]]), np.array([[0.1, 0.2, 0.3]]), ["a", "b"])


def test_binary_cross_entropy_by_hand_and_finite_at_the_ends():
    proba = np.array([[0.8, 0.3]])
    assert binary_cross_entropy(proba, np.array([[1, 0]])) == pytest.approx(-(np.log(0.8) + np.log(0.7)) / 2)
    extreme = binary_cross_entropy(np.array([[0.0, 1.0]], np.float32), np.array([[1, 0]], np.uint8))
    assert extreme == pytest.approx(-np.log(1e-12), rel=1e-6)  # clipped, not inf
    assert binary_cross_entropy(np.zeros((0, 3)), np.zeros((0, 3))) == 0.0


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
    m = multilabel_metrics(targets, proba, labels, out["thresholds"])
    assert min(row["precision"] for row in m["per_label"]) >= 0.9


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


def test_report_shows_the_figures_in_an_aligned_table():
    targets, proba = random_case(7, n_labels=4, empty_labels=1)
    long_a, long_b = "a" * 60 + "_first", "a" * 60 + "_second"
    labels = ["cat", long_a, long_b, "empty"]
    m = multilabel_metrics(targets, proba, labels)
    text = format_multilabel_report(m, title="val split")
    lines = text.splitlines()
    assert lines[0] == "val split"
    for figure in ("map", "micro_f1", "macro_f1", "subset_accuracy", "hamming_loss"):
        assert f"{m[figure]:.4f}" in lines[1]
    assert "exact-set accuracy" in lines[1] and "Hamming loss" in lines[1]
    table = lines[lines.index("") + 1:]
    assert len(table) == 1 + len(labels)
    assert len({len(line) for line in table}) == 1  # aligned, long names included
    assert table[1].split()[0] == "cat"
    names = [line.split()[0] for line in table[2:4]]
    assert names[0] != names[1] and names[0].endswith("_first") and names[1].endswith("_second")
    assert max(len(n) for n in names) <= 40
    row = m["per_label"][0]
    assert table[1].split()[1:] == [f"{row['precision']:.4f}", f"{row['recall']:.4f}", f"{row['f1']:.4f}",
                                    f"{row['ap']:.4f}", str(row["support"]), "0.5000"]
    assert table[4].split()[4] == "-"  # no positive, no AP


def test_save_metrics_round_trip(tmp_path):
    targets, proba = random_case(8, n_labels=3, empty_labels=1)
    m = multilabel_metrics(targets, proba, ["a", "b", "c"], [0.4, 0.5, 0.6])
    json_path, csv_path = save_metrics(m, tmp_path, "eval-val")
    assert json.loads(json_path.read_text()) == m
    with csv_path.open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["label", "precision", "recall", "f1", "ap", "support", "predicted", "threshold"]
    assert [r["label"] for r in rows] == ["a", "b", "c", "micro_avg", "macro_avg"]
    assert float(rows[0]["f1"]) == pytest.approx(m["per_label"][0]["f1"])
    assert float(rows[1]["threshold"]) == 0.5 and rows[2]["ap"] == ""
    assert float(rows[3]["f1"]) == pytest.approx(m["micro_f1"])
    assert float(rows[4]["ap"]) == pytest.approx(m["map"]) and int(rows[4]["support"]) == int(targets.sum())
    assert len(multilabel_rows(m)) == 5


def test_save_metrics_keeps_the_single_label_table(tmp_path):
    proba = np.array([[0.7, 0.3], [0.2, 0.8], [0.6, 0.4]])
    _, csv_path = save_metrics(compute_metrics(np.array([0, 1, 1]), proba, ["x", "y"]), tmp_path, "eval-test")
    lines = csv_path.read_text().splitlines()
    assert lines[0] == "class,precision,recall,f1,support"
    assert [line.split(",")[0] for line in lines[1:]] == ["x", "y", "macro_avg", "weighted_avg", "accuracy",
                                                          "top_2_accuracy"]
