"""What predicts: a model rebuilt from its checkpoint alone, with its classes and input shape.

    clf = load("runs/digits-...")          # a run folder, or a checkpoint file
    clf.predict(["cat.jpg", pil_image, array])
    clf.predict_proba(...)                 # (N, num_classes)

:class:`Predictor` is what every predictor shares (the ONNX one of
:mod:`imgcls.export` too); :class:`TorchPredictor` is the PyTorch one, and
:class:`imgcls.api.Classifier`, the face of the package, adds evaluation and explanations on top.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from imgcls.checkpoint import is_multilabel, load_model
from imgcls.config import apply_overrides, config_from_dict, read_config_values
from imgcls.data.inputs import load_image_inputs
from imgcls.data.registry import build_dataset
from imgcls.errors import DataError
from imgcls.inference import (
    predict_logits,
    predict_proba,
    proba_from_logits,
    scoring_runtime,
)
from imgcls.ood import score_of
from imgcls.rundir import CONFIG, fold_dataset_of_run


def label_sets(proba: np.ndarray, labels: list[str], thresholds=None) -> list[dict]:
    """What a multi-label model answers, per image: ``labels``, the names whose probability clears their
    threshold (0.5 each without ``thresholds``), most probable first, and ``probabilities``, every label's.

    Args:
        proba: per-label probabilities, float (N, L).
        labels: the L label names.
        thresholds: L thresholds, or None.
    """
    proba = np.asarray(proba, dtype=np.float64).reshape(-1, len(labels))
    t = np.full(len(labels), 0.5) if thresholds is None else np.asarray(thresholds, dtype=np.float64)
    if t.shape != (len(labels),):
        raise ValueError(f"need one threshold per label: {len(labels)} labels, thresholds of shape {t.shape}")
    out = []
    for p in proba:
        order = [j for j in np.argsort(-p, kind="stable") if p[j] >= t[j]]
        out.append({"labels": [labels[j] for j in order],
                    "probabilities": {name: float(v) for name, v in zip(labels, p)}})
    return out


class Predictor:
    """What every predictor shares: class names, input shape, reading inputs, predict and predict_proba.

    Subclasses set ``meta`` (classes, input_shape, resize, ...) and implement ``proba_of_arrays``.
    """

    meta: dict

    @property
    def classes(self) -> list[str]:
        return list(self.meta["classes"])

    @property
    def input_shape(self) -> tuple[int, int, int]:
        return tuple(self.meta["input_shape"])

    @property
    def multilabel(self) -> bool:
        """Whether the model gives several labels per image (a sigmoid per label) rather than one class."""
        return is_multilabel(self.meta)

    def load_inputs(self, inputs) -> tuple[list[str], np.ndarray, list]:
        """Decode and resize inputs: (names, uint8 (N, H, W, C), files that could not be read)."""
        if not isinstance(inputs, (list, tuple)):
            inputs = [inputs]
        c, h, w = self.input_shape
        return load_image_inputs(list(inputs), channels=c, size=(h, w), resize=self.meta.get("resize", "stretch"))

    def readable_arrays(self, inputs) -> np.ndarray:
        """The inputs decoded and resized (uint8 (N, H, W, C)); raises DataError if any cannot be read."""
        _, images, bad = self.load_inputs(inputs)
        if bad:
            raise DataError("cannot read: " + "; ".join(f"{b.path}: {b.reason}" for b in bad))
        return images

    def predict_proba(self, inputs) -> np.ndarray:
        """Probabilities (N, num_classes); raises DataError if any input cannot be read."""
        return self.proba_of_arrays(self.readable_arrays(inputs))

    def proba_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) for uint8 (N, H, W, C) images already at the model's size."""
        raise NotImplementedError

    def scored_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        """(probabilities (N, num_classes), out-of-distribution scores (N,) or None when the model stores no
        score) for uint8 images already at the model's size; see :attr:`ood`.  None here: a predictor that
        computes a stored score overrides this."""
        return self.proba_of_arrays(images), None

    @property
    def ood(self) -> dict | None:
        """The stored out-of-distribution score (``score``, ``threshold``, ...), or None: an image scoring below
        the threshold is none of the classes ("unknown")."""
        return self.meta.get("ood")

    def predict(self, inputs, unknown: bool = False) -> np.ndarray:
        """Predicted class names, shape (N,); for a multi-label model, each image's list of the labels whose
        probability clears their stored threshold (0.5 without one).

        ``unknown``: an image the stored out-of-distribution score rejects (see :attr:`ood`) is ``"unknown"``
        (multi-label: no label); without a stored score nothing is rejected.
        """
        if unknown and self.ood is not None:
            proba, scores = self.scored_arrays(self.readable_arrays(inputs))
            known = scores >= self.ood["threshold"]
        else:
            proba = self.predict_proba(inputs)
            known = np.ones(len(proba), bool)
        if self.multilabel:
            sets = label_sets(proba, self.classes, self.meta.get("thresholds"))
            out = np.empty(len(sets), dtype=object)
            out[:] = [s["labels"] if ok else [] for s, ok in zip(sets, known)]
            return out
        names = np.array(self.classes, dtype=object)[proba.argmax(1)]
        names[~known] = "unknown"
        return names


class TorchPredictor(Predictor):
    """A trained model, rebuilt from its checkpoint alone.

    Inputs to ``predict``/``predict_proba`` may be file paths (images, folders,
    zips), PIL images, or uint8 arrays (H, W), (H, W, C) or (N, H, W, C); a
    single input or a list of them.  Images are converted and resized as the
    model's training data was.
    """

    def __init__(self, model, meta: dict, runtime, run_dir: Path | None = None, batch_size: int = 256):
        self.model, self.meta, self.runtime = model, meta, runtime
        self.run_dir = run_dir
        self.batch_size = batch_size

    def proba_of_arrays(self, images: np.ndarray) -> np.ndarray:
        """Probabilities for uint8 (N, H, W, C) images already at the model's size."""
        return predict_proba(self.model, images, self.meta["normalize"], self.runtime, self.batch_size,
                             temperature=self.meta.get("temperature", 1.0), tta=self.meta.get("tta", "none"),
                             multilabel=self.multilabel)

    def scored_arrays(self, images: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
        if self.ood is None:
            return self.proba_of_arrays(images), None
        logits, pooled = predict_logits(self.model, images, self.meta["normalize"], self.runtime, self.batch_size,
                                        self.meta.get("tta", "none"), features=True)
        proba = proba_from_logits(logits, self.meta.get("temperature", 1.0), self.multilabel)
        return proba, score_of(self.ood, logits.numpy(), pooled, self.multilabel)

    def dataset(self, data=None):
        """The run's own data with its seeded splits, or ``data`` read at the model's image size."""
        if self.run_dir is None and data is None:
            raise DataError("this classifier was loaded from a checkpoint file; pass data= to evaluate it")
        # The run's config.yaml is resolved already (recipe and auto choices written out): read as it is.
        values = read_config_values(self.run_dir / CONFIG) if self.run_dir is not None else {}
        c, h, w = self.input_shape
        cfg = config_from_dict(apply_overrides(values, {"image_size": [h, w], "channels": c,
                                                        "data": None if data is None else str(data)}))
        ds = build_dataset(cfg.data, seed=cfg.train.seed)
        if data is None and self.run_dir is not None:
            return fold_dataset_of_run(self.run_dir, ds) or ds
        return ds

    def __repr__(self) -> str:
        c, h, w = self.input_shape
        return f"{type(self).__name__}({self.meta['arch']}, {len(self.classes)} classes, input {c}x{h}x{w})"


def load(path: str | Path, which: str | None = None, device: str = "auto") -> TorchPredictor:
    """Load a run folder (its final checkpoint) or a checkpoint file as a :class:`TorchPredictor`."""
    path = Path(path)
    run_dir = path if path.is_dir() else None
    runtime = scoring_runtime(device)  # fp32: the figures training reported
    model, meta = load_model(path, which, runtime.device)
    return TorchPredictor(model, meta, runtime, run_dir)
