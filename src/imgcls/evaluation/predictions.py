"""Predictions of a trained run on one split of its data, shared by every analysis.

Everything after training rebuilds what it needs from the run folder alone:
the checkpoint gives the model, ``config.yaml`` the data and its seeded split.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from imgcls.checkpoint import is_multilabel
from imgcls.errors import DataError
from imgcls.evaluation.evaluate import remap_labels
from imgcls.inference import predict_logits, proba_from_logits
from imgcls.predictor import load


@dataclass
class SplitPredictions:
    """Logits and labels of one split, with the images they came from.

    Attributes:
        split: split name (``train``, ``val``, ``test``).
        logits: float32 (N, K), before any temperature.
        labels: int64 (N,), in the model's class order.
        images: uint8 (N, H, W, C), as the model saw them.
        paths: source path of each image, or None for built-in datasets.
        classes: the K class names.
        temperature: the calibration temperature stored with the model (1.0 if none).
        multilabel: the model gives several labels per image: ``labels`` is a 0/1 (N, K) matrix and the
            probabilities are a sigmoid per label.
    """

    split: str
    logits: np.ndarray
    labels: np.ndarray
    images: np.ndarray
    paths: list[str] | None
    classes: list[str]
    temperature: float = 1.0
    multilabel: bool = False

    def proba(self, temperature: float | None = None) -> np.ndarray:
        """Probabilities (N, K) at ``temperature`` (default: the stored one): softmax, or multi-label sigmoid."""
        t = self.temperature if temperature is None else temperature
        return proba_from_logits(torch.from_numpy(self.logits), t, self.multilabel)


def load_run(run_dir: str | Path, which: str | None = None, device: str = "auto"):
    """(TorchPredictor, ImageDataset) of a run folder: the model and its own seeded splits."""
    clf = load(run_dir, which=which, device=device)
    return clf, clf.dataset()


def predict_split(clf, ds, split: str = "test", logits: np.ndarray | None = None) -> SplitPredictions:
    """Run ``clf`` over ``split`` of ``ds`` (as returned by :func:`load_run`).

    ``logits``: what the same weights already gave on the split (training's
    final evaluation hands its own to the report), so the split is not run again.
    """
    if split not in ds.splits:
        raise DataError(f"split {split!r} does not exist; the data has: {', '.join(ds.splits)}")
    part = ds.splits[split]
    labels = remap_labels(part.labels, ds.classes, clf.classes)
    if logits is None:
        logits = predict_logits(clf.model, part.images, clf.meta["normalize"], clf.runtime, clf.batch_size,
                                clf.meta.get("tta", "none")).numpy()
    elif logits.shape != (len(labels), len(clf.classes)):
        raise DataError(f"logits of shape {logits.shape} given for the {split} split; it needs "
                        f"({len(labels)}, {len(clf.classes)})")
    return SplitPredictions(split, logits, labels, part.images, part.paths, clf.classes,
                            float(clf.meta.get("temperature", 1.0)), is_multilabel(clf.meta))
