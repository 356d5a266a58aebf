"""Per-class decision thresholds, one-vs-rest.

For each class c, the images are split into "c" (label == c, or for multi-label data
``labels[:, c] == 1``) and "not c", scored by ``proba[:, c]``, and an image is predicted
positive for c when ``proba[:, c] >= t_c``.
The threshold t_c is chosen among the distinct scores of class c to meet an
objective: the best F1, a precision floor (most recall that keeps it), or a recall
floor (most conservative threshold that keeps it).  Tune on the validation split;
the precision and recall reported are those on the data the thresholds were tuned on.
"""

from __future__ import annotations

import math

import numpy as np

from imgcls.checkpoint import is_multilabel
from imgcls.errors import ConfigError
from imgcls.predictor import label_sets

_ACCEPTED = "f1, precision=<target>, recall=<target> (target in (0, 1], e.g. precision=0.95)"


def parse_objective(text: str) -> tuple[str, float | None]:
    """``"f1"`` -> ("f1", None); ``"precision=0.95"`` -> ("precision", 0.95); same for recall.

    Raises:
        ConfigError: for anything else, naming the value and the accepted forms.
    """
    raw = str(text).strip().lower()
    if raw == "f1":
        return "f1", None
    name, sep, value = (part.strip() for part in raw.partition("="))
    if sep and name in ("precision", "recall"):
        try:
            target = float(value)
        except ValueError:
            target = math.nan
        if 0.0 < target <= 1.0:
            return name, target
    raise ConfigError(f"unknown threshold objective {text!r}; accepted: {_ACCEPTED}")


def tune_thresholds(proba: np.ndarray, labels: np.ndarray, classes: list[str], objective: str = "f1") -> dict:
    """One threshold per class, one-vs-rest, chosen to meet ``objective``.

    Candidates for class c are the distinct values of ``proba[:, c]``.

    * ``f1``: the threshold with the highest F1.
    * ``precision=x``: the lowest threshold whose precision >= x (the most recall under the constraint).
    * ``recall=x``: the highest threshold whose recall >= x.

    If no candidate reaches the target, the threshold with the best precision is used
    (the lowest one on ties) and the class's entry says ``"met": False``.  A class with
    no images in ``labels`` gets threshold 1.0 and ``"met": False``.

    Args:
        proba: class probabilities, float (N, K); for multi-label data independent per-label
            probabilities (sigmoid), one column per label.
        labels: true labels, int (N,) class indices, or a 0/1 indicator matrix (N, K) for
            multi-label data (the positives of class c are ``labels[:, c] == 1``).
        classes: the K class names.
        objective: see :func:`parse_objective`.

    Returns:
        ``objective`` (canonical text), ``thresholds`` (K floats) and ``per_class``: for each
        class its name, threshold, the precision / recall / F1 that threshold achieves on
        this data, its support and ``met``.
    """
    kind, target = parse_objective(objective)
    proba = np.asarray(proba)
    positives = _positives(labels, len(classes))
    if proba.ndim != 2 or proba.shape != positives.shape:
        raise ValueError(f"proba must be (N, K) = ({len(labels)}, {len(classes)}) for {len(labels)} labels "
                         f"and {len(classes)} classes; got {proba.shape}")
    per_class = []
    for c, name in enumerate(classes):
        positive = positives[:, c]
        scores = proba[:, c]
        if positive.any():
            threshold, met = _pick(positive, scores, kind, target)
        else:
            threshold, met = 1.0, False
        p, r, f = scores_at(positive, scores, threshold)
        per_class.append({"class": name, "threshold": threshold, "precision": p, "recall": r, "f1": f,
                          "support": int(positive.sum()), "met": met})
    text = kind if target is None else f"{kind}={target:g}"
    return {"objective": text, "thresholds": [e["threshold"] for e in per_class], "per_class": per_class}


def _positives(labels, k: int) -> np.ndarray:
    """bool (N, k): image i is a positive of class c; from class indices (N,) or a 0/1 indicator matrix (N, k)."""
    labels = np.asarray(labels)
    if labels.ndim == 2:
        if labels.shape[1] != k:
            raise ValueError(f"an indicator matrix of labels needs one column per class: {k} classes, "
                             f"labels of shape {labels.shape}")
        if not np.isin(labels, (0, 1)).all():
            raise ValueError(f"an indicator matrix of labels holds only 0 and 1; got values {np.unique(labels)[:10]}")
        return labels == 1
    if labels.ndim != 1:
        raise ValueError(f"labels must be class indices (N,) or a 0/1 indicator matrix (N, K); got shape {labels.shape}")
    return labels.astype(np.int64)[:, None] == np.arange(k)


def precision_recall_curve(positive: np.ndarray, scores: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(precision, recall, thresholds) of "positive when score >= t", as scikit-learn's function of that name gives.

    ``thresholds``: the distinct scores, ascending; ``precision`` and
    ``recall`` have one more entry, the end point (1, 0).  Written here in
    numpy because importing scikit-learn's metrics (with SciPy) took 0.8 s of
    every run's report.
    """
    order = np.argsort(scores, kind="mergesort")[::-1]  # descending, ties in a stable order
    ranked = np.asarray(scores)[order]
    last = np.r_[np.flatnonzero(np.diff(ranked)), len(ranked) - 1]  # the last image of each distinct score
    tps = np.cumsum(np.asarray(positive, dtype=np.float64)[order])[last]
    precision = tps / (last + 1)
    recall = tps / tps[-1] if tps[-1] else np.ones_like(tps)
    return np.r_[precision[::-1], 1.0], np.r_[recall[::-1], 0.0], ranked[last][::-1]


def average_precision(positive: np.ndarray, scores: np.ndarray) -> float:
    """Average precision: the precision-recall step function's integral, as scikit-learn's average_precision_score."""
    precision, recall, _ = precision_recall_curve(positive, scores)
    return float(max(0.0, -np.sum(np.diff(recall) * precision[:-1])))


def _pick(positive: np.ndarray, scores: np.ndarray, kind: str, target: float | None) -> tuple[float, bool]:
    """(threshold, met) for one class; candidates ascending, as precision_recall_curve gives them."""
    precision, recall, candidates = precision_recall_curve(positive, scores)
    precision, recall = precision[:-1], recall[:-1]  # drop the (1, 0) end point, which has no threshold
    if kind == "f1":
        denom = precision + recall
        f1 = np.divide(2 * precision * recall, denom, out=np.zeros_like(denom), where=denom > 0)
        return float(candidates[int(np.argmax(f1))]), True
    ok = np.flatnonzero((precision if kind == "precision" else recall) >= target)
    if len(ok):
        # precision: lowest such threshold (recall only falls as t rises); recall: highest such threshold.
        return float(candidates[ok[0] if kind == "precision" else ok[-1]]), True
    return float(candidates[int(np.argmax(precision))]), False


def scores_at(positive: np.ndarray, scores: np.ndarray, threshold: float) -> tuple[float, float, float]:
    """One-vs-rest (precision, recall, F1) when "predicted positive" is ``scores >= threshold``."""
    predicted = scores >= threshold
    tp = int((predicted & positive).sum())
    p = tp / int(predicted.sum()) if predicted.any() else 0.0
    r = tp / int(positive.sum()) if positive.any() else 0.0
    f = 2 * p * r / (p + r) if p + r > 0 else 0.0
    return float(p), float(r), float(f)


def apply_thresholds(proba: np.ndarray, thresholds) -> np.ndarray:
    """Decisions (N,) int64 under per-class thresholds.

    Among the classes whose probability clears their threshold (``proba[:, c] >= t_c``),
    the one with the highest probability; -1 ("unknown") when no class clears its threshold.

    Args:
        proba: class probabilities, float (N, K).
        thresholds: K thresholds, as in ``tune_thresholds(...)["thresholds"]``.
    """
    proba = np.asarray(proba)
    t = np.asarray(thresholds, dtype=np.float64)
    if proba.ndim != 2 or t.shape != (proba.shape[1],):
        raise ValueError(f"need one threshold per class: proba has shape {proba.shape}, thresholds {t.shape}")
    clears = proba >= t[None, :]
    pred = np.where(clears, proba, -np.inf).argmax(axis=1).astype(np.int64)
    pred[~clears.any(axis=1)] = -1
    return pred


def rank_classes(proba: np.ndarray, classes: list[str], top_k: int, thresholds=None) -> list[dict]:
    """What a prediction answers, per image: its ``top_k`` classes with probabilities, and with per-class
    ``thresholds`` the ``answer`` (a class, or ``"unknown"`` when none clears its threshold).

    Args:
        proba: class probabilities, float (N, K).
        classes: the K class names.
        top_k: classes listed per image (at most K); equal probabilities keep the classes' order.
        thresholds: K thresholds (see :func:`apply_thresholds`), or None for no answer.

    Returns:
        Per image ``{"top": [{"class", "probability"}, ...]}``, plus ``"answer"`` with thresholds.
    """
    proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(classes))
    answers = None if thresholds is None else apply_thresholds(proba, thresholds)
    out = []
    for i, p in enumerate(proba):
        order = np.argsort(-p, kind="stable")[:min(top_k, len(classes))]
        item = {"top": [{"class": classes[j], "probability": float(p[j])} for j in order]}
        if answers is not None:
            item["answer"] = "unknown" if answers[i] < 0 else classes[answers[i]]
        out.append(item)
    return out


DEFAULT_LABEL_THRESHOLD = 0.5  # probability: a sigmoid output's even odds


def label_thresholds(thresholds, n_labels: int) -> list[float]:
    """The per-label thresholds of a multi-label decision: ``thresholds`` as L floats, or 0.5 each for None.

    Raises:
        ValueError: when ``thresholds`` is not one number per label.
    """
    if thresholds is None:
        return [DEFAULT_LABEL_THRESHOLD] * n_labels
    t = np.asarray(thresholds, dtype=np.float64)
    if t.shape != (n_labels,):
        raise ValueError(f"need one threshold per label: {n_labels} labels, thresholds of shape {t.shape}")
    return [float(v) for v in t]


def prediction_rows(meta: dict, proba: np.ndarray, scores: np.ndarray | None, top_k: int,
                    thresholds=None) -> list[dict]:
    """What ``imgcls predict`` and serving answer per image, from probabilities (N, K) and out-of-distribution
    scores (N,) (None when the model stores no score).

    Each row has ``top`` (:func:`rank_classes`); a multi-label model adds ``labels``, those over their stored
    thresholds; per-class ``thresholds`` (one label per image) add ``answer``.  With a stored score a row adds
    ``ood_score`` and an ``answer``: ``"unknown"`` for an image below the score's threshold (a multi-label one
    then has no labels), else the class (or the thresholded answer; multi-label: its labels, joined by spaces).
    """
    classes, multilabel, ood = list(meta["classes"]), is_multilabel(meta), meta.get("ood")
    rows = rank_classes(proba, classes, top_k, None if multilabel else thresholds)
    if multilabel:
        for row, found in zip(rows, label_sets(proba, classes, meta.get("thresholds"))):
            row["labels"] = found["labels"]
    if scores is None or ood is None:
        return rows
    for row, score in zip(rows, scores):
        row["ood_score"] = round(float(score), 6)
        if score < ood["threshold"]:
            row["answer"] = "unknown"
            if multilabel:
                row["labels"] = []
        elif multilabel:
            row["answer"] = " ".join(row["labels"])
        else:
            row.setdefault("answer", row["top"][0]["class"])
    return rows
