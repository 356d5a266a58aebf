"""Figures and rankings of a run's predictions, for the report and for notebooks, and the figures of
the analyses (reliability diagrams, precision-recall curves, layer probes) whose numbers evaluation/ computes.

Every ``plot_*`` function returns a matplotlib ``Figure`` made with
:func:`imgcls.plots.new_figure` (no pyplot, no display), so it renders
inline in Jupyter and can be saved with ``figure_png``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from imgcls.evaluation.calibration import (
    expected_calibration_error,
    reliability_bins,
    softmax,
)
from imgcls.evaluation.predictions import SplitPredictions
from imgcls.evaluation.thresholds import (
    average_precision,
    precision_recall_curve,
    scores_at,
)
from imgcls.plots import draw_image_grid, new_figure, plain

_WRONG = "#c0392b"  # red for wrong predictions
_RIGHT = "#1e6e3a"  # dark green for right ones
_CELL_TEXT_MAX_CLASSES = 20  # above this a confusion matrix drops its cell text


def best_epoch_of(history: list[dict], monitor: str = "val_loss") -> int | None:
    """The epoch with the best ``monitor`` value (lowest loss, highest accuracy), or None."""
    values = [(r["epoch"], r[monitor]) for r in history if r.get(monitor) is not None]
    if not values:
        return None
    pick = min if "loss" in monitor else max
    return pick(values, key=lambda ev: ev[1])[0]


def plot_learning_curves(history: list[dict], best_epoch: int | None = None):
    """Loss, accuracy and learning rate per epoch, in three panels.

    Args:
        history: per-epoch records of ``metrics.jsonl`` (epoch, train_loss,
            train_accuracy, val_loss, val_accuracy, lr).
        best_epoch: the epoch to mark; default: the lowest val_loss.
    """
    fig = new_figure(12, 3.6)
    axes = fig.subplots(1, 3)
    if not history:
        for ax in axes:
            ax.text(0.5, 0.5, "no epochs recorded", ha="center", va="center", transform=ax.transAxes)
            ax.set_axis_off()
        return fig
    best_epoch = best_epoch if best_epoch is not None else best_epoch_of(history)
    epochs = [r["epoch"] for r in history]
    panels = [(axes[0], "loss", "cross-entropy loss"), (axes[1], "accuracy", "accuracy")]
    for ax, key, ylabel in panels:
        for split, style in (("train", "-o"), ("val", "-s")):
            ys = [r.get(f"{split}_{key}") for r in history]
            if any(y is not None for y in ys):
                ax.plot(epochs, [np.nan if y is None else y for y in ys], style, ms=3, label=split)
        ax.set_ylabel(ylabel)
        ax.set_title(ylabel.capitalize())
    axes[1].set_ylim(top=min(1.0, axes[1].get_ylim()[1]) + 0.01)
    lrs = [r.get("lr", np.nan) for r in history]
    axes[2].plot(epochs, lrs, "-o", ms=3, color="0.3")
    axes[2].set_title("Learning rate")
    axes[2].set_ylabel("learning rate (end of epoch)")
    positive = [v for v in lrs if v is not None and v > 0]
    if positive and max(positive) / min(positive) > 20:
        axes[2].set_yscale("log")
    else:
        if positive and max(positive) == min(positive):  # a constant rate: show it against zero
            axes[2].set_ylim(0, 1.5 * positive[0])
        axes[2].ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
        ax.xaxis.get_major_locator().set_params(integer=True)
        if best_epoch is not None:
            ax.axvline(best_epoch, color=_RIGHT, ls=":", lw=1.5, label=f"best (epoch {best_epoch})")
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    return fig


def _tick_fontsize(num_classes: int) -> float:
    return 9 if num_classes <= 15 else max(4.0, 9 - (num_classes - 15) * 0.06)


def plot_confusion(cm, classes: list[str], normalize: bool = False):
    """A confusion matrix: rows true class, columns predicted class.

    Args:
        cm: int (K, K) counts.
        classes: K class names.
        normalize: show each row as fractions of its true class (rows with no
            images stay 0) instead of counts.
    """
    cm = np.asarray(cm)
    if normalize:
        support = cm.sum(1, keepdims=True)
        values = np.divide(cm, support, out=np.zeros(cm.shape, dtype=float), where=support > 0)
    else:
        values = cm
    return _plot_matrix(values, classes, normalize, "predicted class", "true class",
                        "Confusion matrix, row-normalised" if normalize else "Confusion matrix, counts",
                        "fraction of true class" if normalize else "images")


def plot_cooccurrence(counts, labels: list[str], title: str, xlabel: str = "label", ylabel: str = "label"):
    """A label-by-label matrix of image counts as a heatmap, the counts in the cells up to 20 labels.

    Args:
        counts: int (L, L), e.g. ``multilabel_metrics(...)["cooccurrence"]`` (images carrying both labels) or
            ``["error_cooccurrence"]`` (images where the row label was missed and the column label predicted).
        labels: the L label names.
        title, xlabel, ylabel: what the matrix and its axes count.
    """
    return _plot_matrix(np.asarray(counts), labels, False, xlabel, ylabel, title, "images")


def _plot_matrix(values: np.ndarray, classes: list[str], fractions: bool, xlabel: str, ylabel: str, title: str,
                 bar_label: str):
    """A (K, K) heatmap of counts (or of fractions in [0, 1]) with the K names on both axes."""
    k = len(classes)
    side = float(np.clip(0.45 * k + 2.5, 4.0, 14))
    fig = new_figure(side + 1.2, side)
    ax = fig.subplots()
    image = ax.imshow(values, cmap="Blues", vmin=0, vmax=1 if fractions else max(int(values.max()), 1))
    fig.colorbar(image, ax=ax, shrink=0.8, label=bar_label)
    ticks = np.arange(k)
    names = [plain(c) for c in classes]
    size = _tick_fontsize(k)
    ax.set_xticks(ticks, names, rotation=45 if max(map(len, names), default=0) > 2 else 0,
                  ha="right" if max(map(len, names), default=0) > 2 else "center", fontsize=size)
    ax.set_yticks(ticks, names, fontsize=size)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    if k <= _CELL_TEXT_MAX_CLASSES:
        threshold = (1 if fractions else max(values.max(), 1)) / 2
        text_size = 9 if k <= 12 else 7
        for i in range(k):
            for j in range(k):
                v = values[i, j]
                label = (f"{v:.2f}" if v else "0") if fractions else f"{int(v)}"
                ax.text(j, i, label, ha="center", va="center", fontsize=text_size,
                        color="white" if v > threshold else "black")
    return fig


_BARS = (("precision", "precision", "#4c72b0"), ("recall", "recall", "#dd8452"), ("f1", "F1", "#55a868"))
_AP_BAR = ("ap", "AP", "#8172b3")
_HORIZONTAL_ABOVE = 30  # classes; more get one row each, so every name stays readable


def plot_per_class(metrics: dict):
    """Precision, recall and F1 of every class as grouped bars.

    Up to 30 classes the bars stand side by side; more classes are drawn as
    horizontal bars, one row per class, in a taller figure.

    Args:
        metrics: a :func:`imgcls.evaluation.metrics.compute_metrics` dict.
    """
    return _plot_scores([r["class"] for r in metrics["per_class"]], metrics["per_class"], _BARS, 0.27,
                        "Per-class precision, recall and F1", "class")


def plot_per_label(metrics: dict):
    """Precision, recall, F1 and average precision of every label as grouped bars, laid out as
    :func:`plot_per_class`; a label with no positive image has no AP bar.

    Args:
        metrics: a :func:`imgcls.evaluation.multilabel.multilabel_metrics` dict.
    """
    return _plot_scores([r["label"] for r in metrics["per_label"]], metrics["per_label"], (*_BARS, _AP_BAR), 0.2,
                        "Per-label precision, recall, F1 and AP", "label")


def _plot_scores(names: list[str], rows: list[dict], bars: tuple, width: float, title: str, what: str):
    """Grouped bars, one group per row of scores in [0, 1] (None drawn as no bar), ``width`` per bar."""
    k = len(rows)
    names = [plain(n) for n in names]
    horizontal = k > _HORIZONTAL_ABOVE
    if horizontal:
        fig = new_figure(9, 1.2 + 0.3 * k)
    else:
        fig = new_figure(float(np.clip(0.55 * k + 3, 7, 18)), 4.0)
    ax = fig.subplots()
    pos = np.arange(k)
    offsets = np.arange(len(bars)) - (len(bars) - 1) / 2
    for offset, (key, label, colour) in zip(offsets, bars):
        values = [np.nan if r[key] is None else r[key] for r in rows]
        if horizontal:
            ax.barh(pos + offset * width, values, width, label=label, color=colour)
        else:
            ax.bar(pos + offset * width, values, width, label=label, color=colour)
    if horizontal:
        ax.set_yticks(pos, names, fontsize=8)
        ax.set_ylim(k - 0.4, -0.6)  # first class at the top, as in the table
        ax.set_xlim(0, 1.0)
        ax.set_xlabel("score")
        ax.grid(axis="x", alpha=0.3)
        ax.xaxis.set_tick_params(labeltop=True)
    else:
        long_names = max(map(len, names), default=0) > 3
        ax.set_xticks(pos, names, rotation=45 if long_names else 0, ha="right" if long_names else "center",
                      fontsize=_tick_fontsize(k))
        ax.set_xlim(-0.6, k - 0.4)
        ax.set_ylim(0, 1.0)
        ax.set_ylabel("score")
        ax.set_xlabel(what)
        ax.grid(axis="y", alpha=0.3)
    ax.set_title(title)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1), fontsize=8, frameon=False)
    return fig


def plot_image_grid(images: np.ndarray, titles: list[str], wrong: list[bool], ncols: int = 8, cell: float = 1.35):
    """Images in a grid with a title each; wrong predictions get a red title and frame.

    The grid is one picture with the titles as the figure's texts (:func:`imgcls.plots.draw_image_grid`).

    Args:
        images: uint8 (N, H, W, C) with C 1 (shown in gray) or 3.
        titles: N titles (may hold line breaks).
        wrong: N flags, True where the prediction is wrong.
        ncols: images per row.
        cell: inches per image: 8 columns of 1.35 in fit the report page's 1100 px at 100 dpi; longer titles
            need wider cells (and fewer columns).
    """
    n = len(images)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    fig = new_figure(ncols * cell, nrows * (cell + 0.19 * lines))
    fig.set_layout_engine("none")
    # Shrink the titles so the longest line fits its cell (about 0.55 em per character), within reason (7 to 9 pt).
    longest = max((len(line) for t in titles for line in t.split("\n")), default=1)
    fontsize = float(np.clip(cell * 72 / (0.55 * longest), 7, 9))
    grid = tuple(round(v * fig.dpi) for v in fig.get_size_inches())  # the whole figure
    draw_image_grid(fig, images, titles, wrong, ncols, grid, round(0.19 * lines * fig.dpi), fontsize, _WRONG)
    return fig


def _log_proba(preds: SplitPredictions) -> np.ndarray:
    """Log-probabilities (N, K) at the stored temperature, exact for tiny probabilities."""
    logits = torch.from_numpy(np.asarray(preds.logits)).double() / preds.temperature
    return torch.log_softmax(logits, dim=1).numpy()


def top_losses(preds: SplitPredictions, k: int = 16) -> list[dict]:
    """The ``k`` wrong predictions with the highest loss, highest first.

    The loss of an image is -log p(true class), at the model's stored
    temperature. Right predictions are left out even when their loss is
    higher (a right answer with p = 0.15 among ten classes).

    Returns:
        Dicts with index (into the split), true and predicted class names,
        p_true, p_pred, loss and path (None for built-in datasets).
    """
    logp = _log_proba(preds)
    labels = np.asarray(preds.labels, dtype=np.int64)
    pred = logp.argmax(1)
    rows = np.arange(len(labels))
    loss = -logp[rows, labels]
    wrong = np.flatnonzero(pred != labels)
    # Highest loss first; equal losses in index order, so the ranking is reproducible.
    order = wrong[np.lexsort((wrong, -loss[wrong]))][:k]
    return [{
        "index": int(i),
        "true": preds.classes[labels[i]],
        "predicted": preds.classes[pred[i]],
        "p_true": float(np.exp(logp[i, labels[i]])),
        "p_pred": float(np.exp(logp[i, pred[i]])),
        "loss": float(loss[i]),
        "path": preds.paths[i] if preds.paths is not None else None,
    } for i in order]


def multilabel_top_losses(preds: SplitPredictions, thresholds, k: int = 16) -> list[dict]:
    """The ``k`` images with the highest loss, highest first, for a multi-label model.

    The loss of an image is the mean over labels of the binary cross-entropy of each label's sigmoid
    probability (at the stored temperature), the training loss.  Unlike :func:`top_losses`, images whose
    predicted set is right stay in: a right set can still be a narrow escape (a label at 0.45 with its
    threshold at 0.4), and the ``wrong`` flag tells them apart.

    Args:
        preds: a split's predictions with ``multilabel`` set: ``labels`` is 0/1 (N, L).
        thresholds: L thresholds; a label is predicted when its probability reaches its threshold.
        k: how many images.

    Returns:
        Dicts with index (into the split), true and predicted (label names in label order), wrong (the
        sets differ), loss, worst (the label with the largest loss) and p_worst (its probability), path
        (None for built-in datasets).
    """
    logits = torch.from_numpy(np.asarray(preds.logits)).double() / preds.temperature
    targets = np.asarray(preds.labels) == 1
    per_label = F.binary_cross_entropy_with_logits(logits, torch.from_numpy(targets).double(),
                                                   reduction="none").numpy()
    loss = per_label.mean(1)
    proba = torch.sigmoid(logits).numpy()
    predicted = proba >= np.asarray(thresholds, dtype=np.float64)
    index = np.arange(len(loss))
    order = np.lexsort((index, -loss))[:k]  # equal losses in index order, so the ranking is reproducible
    names = preds.classes
    rows = []
    for i in order:
        worst = int(per_label[i].argmax())
        rows.append({
            "index": int(i),
            "true": [names[j] for j in np.flatnonzero(targets[i])],
            "predicted": [names[j] for j in np.flatnonzero(predicted[i])],
            "wrong": bool((targets[i] != predicted[i]).any()),
            "loss": float(loss[i]),
            "worst": names[worst],
            "p_worst": float(proba[i, worst]),
            "path": preds.paths[i] if preds.paths is not None else None,
        })
    return rows


def most_confused(cm, classes: list[str], k: int = 10) -> list[tuple[str, str, int]]:
    """The ``k`` largest off-diagonal cells of a confusion matrix as (true, predicted, count).

    Sorted by count, descending; equal counts in row-then-column order. Cells
    with no images are left out.
    """
    cm = np.asarray(cm)
    pairs = [(int(cm[i, j]), i, j) for i in range(cm.shape[0]) for j in range(cm.shape[1])
             if i != j and cm[i, j] > 0]
    pairs.sort(key=lambda p: (-p[0], p[1], p[2]))
    return [(classes[i], classes[j], count) for count, i, j in pairs[:k]]


def plot_reliability(logits: np.ndarray, labels: np.ndarray, temperature: float, bins: int = 15):
    """Reliability diagrams before (T = 1) and after (T = ``temperature``) scaling, side by side.

    Each panel: accuracy per confidence bin (bars), the gap to the bin's mean confidence
    (hatched), the diagonal of perfect calibration, the image count above each bar and
    the ECE in the title.

    Returns:
        A matplotlib Figure with two axes.
    """
    fig = new_figure(10.0, 4.4)
    axes = fig.subplots(1, 2, sharey=True)
    for ax, t, name in zip(axes, (1.0, float(temperature)), ("before scaling", "after scaling")):
        proba = softmax(logits, t)
        rel = reliability_bins(proba, labels, bins)
        ece = expected_calibration_error(proba, labels, bins)
        _draw_reliability(ax, rel)
        ax.set_title(f"{name} (T = {t:.3g}): ECE {ece:.4f}")
        ax.set_xlabel("confidence (top probability)")
    axes[0].set_ylabel("accuracy")
    axes[0].legend(loc="upper left", fontsize=8)
    return fig


def _draw_reliability(ax, rel: dict) -> None:
    edges = np.asarray(rel["edges"])
    width = edges[1] - edges[0]
    centers = edges[:-1] + width / 2
    full = [i for i, n in enumerate(rel["count"]) if n]
    acc = np.array([rel["accuracy"][i] for i in full])
    conf = np.array([rel["confidence"][i] for i in full])
    x = centers[full]
    ax.bar(x, acc, width=width * 0.95, color="tab:blue", edgecolor="black", linewidth=0.5, label="accuracy")
    ax.bar(x, conf - acc, bottom=acc, width=width * 0.95, color="tab:red", alpha=0.3,
           hatch="//", edgecolor="tab:red", linewidth=0.5, label="gap to confidence")
    ax.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfect calibration")
    for xi, top, n in zip(x, np.maximum(acc, conf), (rel["count"][i] for i in full)):
        ax.text(xi, min(top + 0.02, 1.02), str(n), ha="center", va="bottom", fontsize=6, rotation=90)
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.12)


def plot_pr_curves(proba: np.ndarray, labels: np.ndarray, classes: list[str], thresholds):
    """One precision-recall panel per class (one-vs-rest), the chosen threshold marked, AP in the title.

    Args:
        proba: float (N, K), softmax or (multi-label) a sigmoid per label.
        labels: int (N,) class indices, or for multi-label data a 0/1 matrix (N, K) of label sets.
        classes: the K class (or label) names.
        thresholds: K thresholds to mark.

    Returns:
        A matplotlib Figure with one axes per class, in a grid of up to 4 columns.
    """
    proba = np.asarray(proba)
    labels = np.asarray(labels)
    k = len(classes)
    positives = labels == 1 if labels.ndim == 2 else labels.astype(np.int64)[:, None] == np.arange(k)
    ncols = min(4, k)
    nrows = math.ceil(k / ncols)
    fig = new_figure(3.0 * ncols, 2.8 * nrows)
    grid = fig.subplots(nrows, ncols, squeeze=False)
    for i, ax in enumerate(grid.flat):
        if i >= k:
            ax.remove()
            continue
        positive = positives[:, i]
        ax.set_xlim(0, 1.02)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("recall", fontsize=8)
        ax.set_ylabel("precision", fontsize=8)
        ax.tick_params(labelsize=7)
        if not positive.any():
            ax.set_title(f"{classes[i]}: no images", fontsize=9)
            continue
        precision, recall, _ = precision_recall_curve(positive, proba[:, i])
        ap = average_precision(positive, proba[:, i])
        ax.plot(recall, precision, drawstyle="steps-post", linewidth=1.2)
        p, r, _ = scores_at(positive, proba[:, i], float(thresholds[i]))
        ax.plot([r], [p], "o", color="tab:red", markersize=6, label=f"t = {float(thresholds[i]):.3f}")
        ax.legend(loc="lower left", fontsize=7)
        ax.set_title(f"{classes[i]}: AP {ap:.3f}", fontsize=9)
    return fig


def plot_probes(rows: list[dict], chance: float | None = None):
    """Per-stage and cumulative probe accuracy against stage, with the chance level.

    ``chance`` defaults to the rows' own ``chance`` entry, when they have one.
    """
    if chance is None and rows and "chance" in rows[0]:
        chance = rows[0]["chance"]
    fig = new_figure(max(4.8, 1.2 * len(rows) + 2.4), 4.0)
    ax = fig.add_subplot()
    x = np.arange(len(rows))
    ax.plot(x, [r["accuracy"] for r in rows], "o-", label="this stage alone")
    ax.plot(x, [r["cumulative_accuracy"] for r in rows], "s--", label="this and earlier stages")
    if chance is not None:
        ax.axhline(chance, color="grey", linestyle=":", label=f"chance ({chance:.2f})")
    ax.set_xticks(x, [f"{r['stage']}\n({r['channels']} ch)" for r in rows], fontsize=8)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("stage")
    ax.set_ylabel("held-out accuracy of a linear probe")
    ax.set_title("Linear probes on global-average-pooled stage outputs")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    return fig
