"""Multi-label metrics: each image carries any number of L labels, each scored by its own probability (sigmoid).

An image's predicted set is the labels with ``proba[:, l] >= t_l`` (0.5 each by default).  The figures are
scikit-learn's for indicator matrices (``average_precision_score``, ``f1_score(..., zero_division=0)``,
``hamming_loss``, ``accuracy_score``), computed in numpy: importing scikit-learn's metrics costs 0.8 s.
"""

from __future__ import annotations

import numpy as np

from imgcls.evaluation.thresholds import average_precision, label_thresholds

CLIP = 1e-12  # probabilities are clipped to [CLIP, 1 - CLIP] before the log of the loss
MAX_LABEL_WIDTH = 40  # characters: longer label names are shortened in the middle in the report's table


def binary_cross_entropy(proba: np.ndarray, targets: np.ndarray) -> float:
    """Mean over images and labels of each label's binary cross-entropy (0 for no images).

    Args:
        proba: per-label probabilities, float (N, L).
        targets: 0/1 (N, L).
    """
    p = np.clip(np.asarray(proba, dtype=np.float64), CLIP, 1.0 - CLIP)  # float64: 1 - 1e-12 is 1.0 in float32
    y = np.asarray(targets, dtype=np.float64)
    if p.size == 0:
        return 0.0
    return float(-(y * np.log(p) + (1.0 - y) * np.log1p(-p)).mean())


def label_aps(targets: np.ndarray, proba: np.ndarray) -> list[float | None]:
    """Each label's average precision over images (N,): None for a label with no positive."""
    targets = np.asarray(targets) > 0
    return [average_precision(targets[:, j], proba[:, j]) if targets[:, j].any() else None
            for j in range(targets.shape[1])]


def mean_of_aps(aps: list[float | None]) -> float | None:
    """mAP: the mean of the labels' average precisions that exist; None when no label has a positive."""
    scored = [a for a in aps if a is not None]
    return float(np.mean(scored)) if scored else None


def mean_average_precision(targets: np.ndarray, proba: np.ndarray) -> float | None:
    """mAP: the mean over labels with at least one positive of their average precision; None when none has."""
    return mean_of_aps(label_aps(targets, proba))


def multilabel_metrics(targets: np.ndarray, proba: np.ndarray, labels: list[str], thresholds=None) -> dict:
    """Every multi-label figure of a split.

    Args:
        targets: true label sets, 0/1 (uint8 or bool) (N, L).
        proba: independent per-label probabilities (sigmoid), float (N, L).
        labels: the L label names.
        thresholds: L thresholds, or None for 0.5 each.

    Returns:
        A JSON-serialisable dict: ``task`` ("multilabel"), ``n``, ``labels``, ``thresholds``; ``map`` (mean AP
        over the labels with a positive; None when no label has one); micro and macro precision / recall / F1
        (macro over all L labels, a score with a zero denominator counting 0); ``subset_accuracy`` (predicted
        set equals true set), ``hamming_loss`` (fraction of wrong label decisions), ``loss``
        (:func:`binary_cross_entropy`); ``per_label`` (label, precision, recall, f1, ap (None without a
        positive), support, predicted, threshold); ``cooccurrence`` (L, L): images carrying both labels;
        ``error_cooccurrence`` (L, L): images where row label i was missed and column label j falsely predicted;
        ``missed`` and ``false_alarms`` per label; ``empty_true`` and ``empty_predicted`` (images with an empty
        set); and, for readers of single-label metrics, ``accuracy`` (= subset_accuracy) and ``macro_avg``
        (precision, recall, f1, support = all positives).
    """
    y = _indicator(targets, len(labels))
    proba = np.asarray(proba, dtype=np.float64)
    if proba.shape != y.shape:
        raise ValueError(f"proba must be (N, L) = {y.shape} for {len(y)} images and {len(labels)} labels; "
                         f"got {proba.shape}")
    t = label_thresholds(thresholds, len(labels))
    pred = proba >= np.asarray(t, dtype=np.float64)
    missed, false_alarm = y & ~pred, pred & ~y
    tp, fp, fn = (m.sum(0).astype(np.int64) for m in (y & pred, false_alarm, missed))
    support, predicted = tp + fn, tp + fp
    precision, recall, f1 = _ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, support + predicted)
    ap = label_aps(y, proba)
    micro_p, micro_r, micro_f = (float(_ratio(num, den)) for num, den in (
        (tp.sum(), predicted.sum()), (tp.sum(), support.sum()), (2 * tp.sum(), support.sum() + predicted.sum())))
    macro = {name: float(v.mean()) if len(labels) else 0.0
             for name, v in (("precision", precision), ("recall", recall), ("f1", f1))}
    n = len(y)
    subset_accuracy = float((pred == y).all(1).mean()) if n else 0.0
    return {
        "task": "multilabel", "n": int(n), "labels": list(labels), "thresholds": t,
        "map": mean_of_aps(ap),
        "micro_precision": micro_p, "micro_recall": micro_r, "micro_f1": micro_f,
        "macro_precision": macro["precision"], "macro_recall": macro["recall"], "macro_f1": macro["f1"],
        "subset_accuracy": subset_accuracy,
        "hamming_loss": float((pred != y).mean()) if y.size else 0.0,
        "loss": binary_cross_entropy(proba, y),
        "per_label": [{"label": name, "precision": float(precision[j]), "recall": float(recall[j]), "f1": float(f1[j]),
                       "ap": ap[j], "support": int(support[j]), "predicted": int(predicted[j]), "threshold": t[j]}
                      for j, name in enumerate(labels)],
        "cooccurrence": _pairs(y, y),
        "error_cooccurrence": _pairs(missed, false_alarm),
        "missed": fn.tolist(), "false_alarms": fp.tolist(),
        "empty_true": int((~y.any(1)).sum()), "empty_predicted": int((~pred.any(1)).sum()),
        "accuracy": subset_accuracy,
        "macro_avg": {**macro, "support": int(support.sum())},
    }


def _indicator(targets: np.ndarray, n_labels: int) -> np.ndarray:
    """bool (N, L) from a 0/1 matrix; the error names the shape or the values that are wrong."""
    targets = np.asarray(targets)
    if targets.ndim != 2 or targets.shape[1] != n_labels:
        raise ValueError(f"targets must be a 0/1 matrix (N, L) with L = {n_labels} labels; got shape {targets.shape}")
    if not np.isin(targets, (0, 1)).all():
        raise ValueError(f"targets must hold only 0 and 1; got values {np.unique(targets)[:10]}")
    return targets == 1


def _ratio(num, den) -> np.ndarray:
    """num / den elementwise, 0 where den is 0 (scikit-learn's zero_division=0)."""
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(den), where=den > 0)


def _pairs(rows: np.ndarray, columns: np.ndarray) -> list[list[int]]:
    """int (L, L) as lists: entry (i, j) counts the images with ``rows[:, i]`` and ``columns[:, j]`` both true."""
    return (rows.astype(np.int64).T @ columns.astype(np.int64)).tolist()


def format_multilabel_report(metrics: dict, title: str = "") -> str:
    """A plain-text report: the summary figures on one line, then a per-label table."""
    names = [_shorten(row["label"]) for row in metrics["per_label"]]
    width = max([len(name) for name in names] + [12])
    mean_ap = "-" if metrics["map"] is None else f"{metrics['map']:.4f}"
    lines = [title] if title else []
    lines.append(f"mAP {mean_ap}   micro F1 {metrics['micro_f1']:.4f}   macro F1 {metrics['macro_f1']:.4f}"
                 f"   exact-set accuracy {metrics['subset_accuracy']:.4f}   Hamming loss {metrics['hamming_loss']:.4f}")
    lines.append(f"loss {metrics['loss']:.4f}   ({metrics['n']} images, {len(names)} labels; "
                 f"{metrics['empty_true']} with no true label, {metrics['empty_predicted']} with none predicted)")
    lines.append("")
    lines.append(f"{'label':>{width}}  precision  recall  f1-score      AP  support  threshold")
    for name, row in zip(names, metrics["per_label"]):
        ap = "-" if row["ap"] is None else f"{row['ap']:.4f}"
        lines.append(f"{name:>{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:8.4f}  {ap:>6}"
                     f"  {row['support']:7d}  {row['threshold']:9.4f}")
    return "\n".join(lines)


def _shorten(name: str) -> str:
    """``name`` cut in the middle to MAX_LABEL_WIDTH characters, so that names differing at either end stay apart."""
    if len(name) <= MAX_LABEL_WIDTH:
        return name
    head = (MAX_LABEL_WIDTH - 3) // 2
    return name[:head] + "..." + name[-(MAX_LABEL_WIDTH - 3 - head):]


def multilabel_rows(metrics: dict) -> list[dict]:
    """The CSV table of multi-label metrics: one row per label, then the micro and macro averages.

    Columns: label, precision, recall, f1, ap, support, predicted, threshold (the averages' ``ap`` is the
    mAP for macro and empty for micro; their ``support`` and ``predicted`` are totals over the labels).
    """
    rows = [dict(row) for row in metrics["per_label"]]
    support = sum(row["support"] for row in rows)
    predicted = sum(row["predicted"] for row in rows)
    for avg, ap in (("micro", ""), ("macro", metrics["map"])):
        rows.append({"label": f"{avg}_avg", "precision": metrics[f"{avg}_precision"], "recall": metrics[f"{avg}_recall"],
                     "f1": metrics[f"{avg}_f1"], "ap": ap, "support": support, "predicted": predicted, "threshold": ""})
    return rows
