"""Evaluate a trained model on a split of a dataset."""

from __future__ import annotations

import numpy as np

from imgcls.checkpoint import is_multilabel
from imgcls.data.base import Split
from imgcls.errors import DataError
from imgcls.evaluation.metrics import compute_metrics
from imgcls.evaluation.multilabel import multilabel_metrics
from imgcls.inference import Runtime, predict_logits, proba_from_logits


def remap_labels(labels: np.ndarray, data_classes: list[str], model_classes: list[str]) -> np.ndarray:
    """Express a dataset's labels in the model's class order (names must be known to the model).

    Multi-label (a 0/1 (N, L) matrix): its columns are reordered, and a label of the model's that the data
    never names is a column of zeros.
    """
    if list(data_classes) == list(model_classes):
        return labels
    unknown = sorted(set(data_classes) - set(model_classes))
    if unknown:
        kind = "labels" if labels.ndim == 2 else "classes"
        raise DataError(f"the data has {kind} the model was not trained on: {', '.join(unknown)}; "
                        f"the model knows: {', '.join(model_classes)}")
    table = np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)
    if labels.ndim == 2:
        out = np.zeros((len(labels), len(model_classes)), dtype=np.uint8)
        out[:, table] = labels
        return out
    return table[labels]


def evaluate_model(model, meta: dict, split: Split, data_classes: list[str], runtime: Runtime,
                   batch_size: int = 512, top_k: int = 5, logits=None) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on ``split`` and the logits (N, K) they came from, float32 before any temperature.

    ``logits``: the model's own on ``split``, already computed (a float32 tensor), so none are computed here.
    """
    labels = remap_labels(split.labels, data_classes, meta["classes"])
    if logits is None:
        logits = predict_logits(model, split.images, meta["normalize"], runtime, batch_size, meta.get("tta", "none"))
    if is_multilabel(meta):
        if labels.ndim != 2:
            raise DataError(f"{meta['arch']} gives several labels per image, and this data has one class per image; "
                            "evaluate it on data with a CSV of labels (see imgcls train --help, --labels)")
        proba = proba_from_logits(logits, meta.get("temperature", 1.0), multilabel=True)
        return multilabel_metrics(labels, proba, meta["classes"], meta.get("thresholds")), logits.numpy()
    if labels.ndim == 2:
        raise DataError(f"{meta['arch']} gives one class per image, and this data has several labels per image")
    proba = proba_from_logits(logits, meta.get("temperature", 1.0))
    return compute_metrics(labels, proba, meta["classes"], top_k), logits.numpy()
