"""Evaluate a trained model on a split of a dataset."""

from __future__ import annotations

import numpy as np

from imgcls.data.base import Split
from imgcls.errors import DataError
from imgcls.evaluation.metrics import compute_metrics
from imgcls.inference import Runtime, predict_proba


def remap_labels(labels: np.ndarray, data_classes: list[str], model_classes: list[str]) -> np.ndarray:
    """Express a dataset's labels in the model's class order (names must be known to the model)."""
    if list(data_classes) == list(model_classes):
        return labels
    unknown = sorted(set(data_classes) - set(model_classes))
    if unknown:
        raise DataError(f"the data has classes the model was not trained on: {', '.join(unknown)}; "
                        f"the model knows: {', '.join(model_classes)}")
    table = np.array([model_classes.index(c) for c in data_classes], dtype=np.int64)
    return table[labels]


def evaluate_model(model, meta: dict, split: Split, data_classes: list[str], runtime: Runtime,
                   batch_size: int = 512, top_k: int = 5) -> tuple[dict, np.ndarray]:
    """Metrics of ``model`` on ``split`` and the probabilities (N, K) they came from."""
    labels = remap_labels(split.labels, data_classes, meta["classes"])
    proba = predict_proba(model, split.images, meta["normalize"], runtime, batch_size,
                          temperature=meta.get("temperature", 1.0), tta=meta.get("tta", "none"))
    return compute_metrics(labels, proba, meta["classes"], top_k), proba
