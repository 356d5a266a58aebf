"""Classification metrics: accuracy, top-k, per-class precision/recall/F1, confusion matrix."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from imgcls.evaluation.multilabel import format_multilabel_report, multilabel_rows
from imgcls.io import write_atomic, write_json


def cross_entropy(proba: np.ndarray, labels: np.ndarray) -> float:
    """Mean negative log-likelihood of the true labels (0 for no images)."""
    if len(labels) == 0:
        return 0.0
    return float(-np.log(np.clip(proba[np.arange(len(labels)), labels], 1e-12, 1.0)).mean())


def compute_metrics(labels: np.ndarray, proba: np.ndarray, classes: list[str], top_k: int = 5) -> dict:
    """Every metric of ``imgcls evaluate``.

    Args:
        labels: true labels, int (N,).
        proba: class probabilities, float (N, K).
        classes: K class names.
        top_k: k for top-k accuracy (capped at K).

    Returns:
        A JSON-serialisable dict: accuracy, top_k_accuracy, loss (cross-entropy),
        per_class (precision, recall, f1, support), macro_avg, weighted_avg,
        confusion_matrix (rows: true, columns: predicted).
    """
    labels = np.asarray(labels, dtype=np.int64)
    k = len(classes)
    pred = proba.argmax(1)
    top_k = min(top_k, k)
    top = np.argsort(-proba, axis=1)[:, :top_k]
    cm = confusion_matrix(labels, pred, k)
    p, r, f, s = per_class_scores(cm)
    out = {
        "n": len(labels),
        "accuracy": float((pred == labels).mean()) if len(labels) else 0.0,
        "top_k": top_k,
        "top_k_accuracy": float((top == labels[:, None]).any(1).mean()) if len(labels) else 0.0,
        "loss": cross_entropy(proba, labels),
        "per_class": [
            {"class": c, "precision": float(p[i]), "recall": float(r[i]), "f1": float(f[i]), "support": int(s[i])}
            for i, c in enumerate(classes)
        ],
        "confusion_matrix": cm.tolist(),
        "classes": list(classes),
    }
    weights = {"macro": np.full(k, 1.0 / max(k, 1)), "weighted": s / max(s.sum(), 1)}  # no images: all zeros
    for avg, w in weights.items():
        out[f"{avg}_avg"] = {"precision": float(w @ p), "recall": float(w @ r), "f1": float(w @ f),
                             "support": len(labels)}
    return out


def confusion_matrix(labels: np.ndarray, pred: np.ndarray, k: int) -> np.ndarray:
    """int64 (k, k) counts: rows the true class, columns the predicted one (as scikit-learn's, for labels 0..k-1)."""
    labels, pred = np.asarray(labels, dtype=np.int64), np.asarray(pred, dtype=np.int64)
    for name, v in (("labels", labels), ("predictions", pred)):
        if len(v) and (v.min() < 0 or v.max() >= k):
            raise ValueError(f"{name} must be class indices 0..{k - 1}; got values from {v.min()} to {v.max()}")
    return np.bincount(labels * k + pred, minlength=k * k).reshape(k, k)


def per_class_scores(cm: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Precision, recall, F1 and support of each class from a confusion matrix.

    The same values as scikit-learn's ``precision_recall_fscore_support(..., zero_division=0)``: a score
    whose denominator is 0 (a class never predicted, or absent) is 0.  Computed here because importing
    scikit-learn's metrics takes about 0.8 s on a 2-core CPU, which every training run paid at its end.
    """
    tp = np.diag(cm).astype(np.float64)
    support, predicted = cm.sum(1), cm.sum(0)
    # F1 = 2PR / (P + R) = 2tp / (2tp + fp + fn), and support + predicted = 2tp + fp + fn.
    return (_ratio(tp, predicted), _ratio(tp, support), _ratio(2 * tp, support + predicted), support)


def _ratio(num: np.ndarray, den: np.ndarray) -> np.ndarray:
    """num / den elementwise, 0 where den is 0."""
    den = np.asarray(den, dtype=np.float64)
    return np.divide(num, den, out=np.zeros_like(den), where=den > 0)


def format_report(metrics: dict, title: str = "") -> str:
    """A plain-text per-class table like scikit-learn's classification_report (a multi-label run's metrics:
    :func:`imgcls.evaluation.multilabel.format_multilabel_report`)."""
    if metrics.get("task") == "multilabel":
        return format_multilabel_report(metrics, title)
    width = max([len(c["class"]) for c in metrics["per_class"]] + [12])
    lines = [title] if title else []
    lines.append(f"{'class':>{width}}  precision  recall  f1-score  support")
    for row in metrics["per_class"]:
        lines.append(f"{row['class']:>{width}}  {row['precision']:9.4f}  {row['recall']:6.4f}  {row['f1']:8.4f}  {row['support']:7d}")
    lines.append("")
    for avg in ("macro_avg", "weighted_avg"):
        a = metrics[avg]
        lines.append(f"{avg.replace('_', ' '):>{width}}  {a['precision']:9.4f}  {a['recall']:6.4f}  {a['f1']:8.4f}  {a['support']:7d}")
    lines.append(f"{'accuracy':>{width}}  {metrics['accuracy']:.4f}   top-{metrics['top_k']} accuracy {metrics['top_k_accuracy']:.4f}"
                 f"   loss {metrics['loss']:.4f}   ({metrics['n']} images)")
    return "\n".join(lines)


def format_confusion(metrics: dict) -> str:
    """The confusion matrix as text: rows true class, columns predicted class."""
    classes, cm = metrics["classes"], metrics["confusion_matrix"]
    width = max(max(len(c) for c in classes), max(len(str(v)) for row in cm for v in row), 4)
    head = " " * width + "  " + " ".join(f"{c[:width]:>{width}}" for c in classes)
    rows = [f"{c:>{width}}  " + " ".join(f"{v:>{width}}" for v in row) for c, row in zip(classes, cm)]
    return "\n".join(["confusion matrix (rows: true class, columns: predicted)", head] + rows)


def save_metrics(metrics: dict, folder: Path, stem: str) -> tuple[Path, Path]:
    """Write ``<stem>.json`` (everything) and ``<stem>.csv`` (per-class table and averages; for multi-label
    metrics, ``"task": "multilabel"``, the per-label table of :func:`~imgcls.evaluation.multilabel.multilabel_rows`)."""
    folder.mkdir(parents=True, exist_ok=True)
    json_path = folder / f"{stem}.json"
    write_json(json_path, metrics)
    csv_path = folder / f"{stem}.csv"
    if metrics.get("task") == "multilabel":
        write_atomic(csv_path, _csv_text(multilabel_rows(metrics)))
        return json_path, csv_path
    buf = io.StringIO()
    writer = csv.writer(buf)
    writer.writerow(["class", "precision", "recall", "f1", "support"])
    for row in metrics["per_class"]:
        writer.writerow([row["class"], row["precision"], row["recall"], row["f1"], row["support"]])
    for avg in ("macro_avg", "weighted_avg"):
        a = metrics[avg]
        writer.writerow([avg, a["precision"], a["recall"], a["f1"], a["support"]])
    writer.writerow(["accuracy", metrics["accuracy"], "", "", metrics["n"]])
    writer.writerow([f"top_{metrics['top_k']}_accuracy", metrics["top_k_accuracy"], "", "", metrics["n"]])
    write_atomic(csv_path, buf.getvalue())
    return json_path, csv_path


def _csv_text(rows: list[dict]) -> str:
    """CSV of ``rows`` (dicts with the same keys), a header of those keys first; None is written empty."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(rows[0]) if rows else [])
    writer.writeheader()
    writer.writerows(rows)
    return buf.getvalue()
