"""Explanations of a model's predictions on uint8 images: maps, overlays, figures, files.

:func:`explain_arrays` is the one entry point that the CLI, the report and the
web app call, so all three normalise images, pick targets and scale maps the
same way; :func:`plot_explanations` and :func:`write_explanations` turn its
:class:`Explanation` into a figure and into files.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from imgcls.checkpoint import is_multilabel
from imgcls.errors import ConfigError, unknown_name
from imgcls.explain.attribution import (
    LAYER_METHODS,
    METHODS,
    attribute,
    normalize_maps,
    resolve_layer,
)
from imgcls.inference import (
    normalization_tensors,
    proba_from_logits,
    resolve_runtime,
    to_input,
)
from imgcls.io import write_atomic, write_npy
from imgcls.plots import draw_image_grid, figure_png, new_figure

CMAP = "turbo"  # perceptually ordered and brighter than jet, same blue-to-red reading
TARGETS = ("predicted", "true")  # the target keywords; anything else is a class name or index


@dataclass
class Explanation:
    """Attribution maps for N images and what the model predicted for them.

    Attributes:
        maps: float32 (N, H, W), each map scaled to [0, 1].
        raw_maps: float32 (N, H, W), as the method returns them (not scaled).
        targets: int64 (N,), the class each map explains.
        target_names: the N target class names.
        predicted: int64 (N,), the predicted classes.
        proba: float64 (N, K), class probabilities at the model's stored temperature (for a multi-label
            model each label's own sigmoid probability, so ``predicted`` is the most probable label).
        method: the attribution method.
        layer: the layer a layer method used (None for pixel methods).
        images: the uint8 (N, H, W, C) inputs.
        names: a name per image (file names), or None.
        classes: the model's class names.
    """

    maps: np.ndarray
    raw_maps: np.ndarray
    targets: np.ndarray
    target_names: list[str]
    predicted: np.ndarray
    proba: np.ndarray
    method: str
    layer: str | None
    images: np.ndarray
    names: list[str] | None = None
    classes: list[str] | None = None
    bad: list = field(default_factory=list)  # inputs that could not be read, as SkippedFile
    multilabel: bool = False  # the model gives several labels per image: a title names the label explained

    def __len__(self) -> int:
        return len(self.maps)

    def plot(self, ncols: int = 4):
        """The overlays as one figure (shows inline in a notebook)."""
        return plot_explanations(self, ncols)

    def title(self, i: int) -> str:
        """Panel title of image ``i``: "pred CLASS (p)", plus the target when it differs."""
        pred = int(self.predicted[i])
        if self.multilabel:  # each label has its own probability: the one explained, with its own
            target = int(self.targets[i])
            return f"{self._class_name(target)} ({self.proba[i, target]:.2f})"
        text = f"pred {self._class_name(pred)} ({self.proba[i, pred]:.2f})"
        if int(self.targets[i]) != pred:
            text += f"\ntarget {self.target_names[i]}"
        return text

    def _class_name(self, index: int) -> str:
        return self.classes[index] if self.classes is not None else str(index)


def explain_arrays(model, meta: dict, images: np.ndarray, method: str = "gradcam", target="predicted",
                   layer: str | None = None, device: str | None = "cpu", batch_size: int = 32,
                   labels: np.ndarray | None = None, names: list[str] | None = None) -> Explanation:
    """Explain the model's predictions on uint8 images.

    Args:
        model: the classifier (an :class:`imgcls.models.ImageClassifier`).
        meta: checkpoint metadata with ``classes``, ``normalize``,
            ``input_shape`` and optionally ``temperature``.
        images: uint8 (N, H, W, C) at the model's input size.
        method: one of :data:`imgcls.explain.METHODS`.
        target: ``"predicted"`` (each image's predicted class; for a
            multi-label model its most probable label), ``"true"``
            (``labels``), a class name, or a class index (an int, or a string
            of digits that is not itself a class name); several class names
            (a list, or comma-separated): one map per image and name, image
            by image (``names`` then say which label each map explains).
        layer: module for ``gradcam``/``gradcam++`` (None or ``"auto"``: the
            model's own); the other methods refuse a layer.
        device: ``"cpu"``, ``"cuda"`` or ``"auto"``; the model is moved there.
            None keeps the model where it is.
        batch_size: images per attribution call; maps do not depend on it.
        labels: int (N,) true classes, needed for ``target="true"``.
        names: a name per image (used for titles and file names).

    Returns:
        An :class:`Explanation`.

    Raises:
        ConfigError: an unknown method, layer, class or device; a layer with a
            method that takes none; ``"true"`` without labels; images of the
            wrong shape or type.
    """
    if method not in METHODS:
        raise unknown_name("method", method, METHODS)
    classes = [str(c) for c in meta["classes"]]
    images = _check_images(images, meta)
    n = len(images)
    if names is not None and len(names) != n:
        raise ConfigError(f"names must hold one name per image ({n}), got {len(names)}")
    several = _target_list(target)
    if several is not None:  # one map per (image, name): the images repeated, each name in turn
        k = len(several)
        images = np.repeat(images, k, axis=0)
        names = [_with_target(name, t) for name in (names or [f"image{i}" for i in range(n)]) for t in several]
        repeated = np.tile([_class_index(t, classes) for t in several], n).astype(np.int64)
        n = len(images)
    if batch_size < 1:
        raise ConfigError(f"batch_size must be at least 1, got {batch_size}")
    if device is None:
        dev = next(model.parameters()).device
    else:
        dev = resolve_runtime(device, "fp32", "off").device
        model.to(dev)
    if method not in LAYER_METHODS and layer not in (None, "auto"):
        raise ConfigError(f"method {method!r} attributes input pixels and takes no layer (got {layer!r}); "
                          f"a layer applies to: {', '.join(LAYER_METHODS)}")
    layer_name = resolve_layer(model, layer)[0] if method in LAYER_METHODS else None
    mean, std = normalization_tensors(meta["normalize"], dev)
    temperature = float(meta.get("temperature", 1.0) or 1.0)
    multilabel = is_multilabel(meta)

    fixed = repeated if several is not None else _fixed_target(target, classes, labels, n)
    raw, proba = [], []
    for start in range(0, n, batch_size):
        x = to_input(torch.from_numpy(images[start:start + batch_size]).to(dev), mean, std, False)
        logits = _logits(model, x)
        proba.append(proba_from_logits(logits.cpu(), temperature, multilabel))
        if fixed is None:  # "predicted"
            batch_target = logits.argmax(1)
        else:
            batch_target = torch.as_tensor(fixed[start:start + len(x)], device=dev)
        raw.append(attribute(model, x, batch_target, method, layer_name).cpu())
    proba_np = np.concatenate(proba) if proba else np.zeros((0, len(classes)))
    raw_t = torch.cat(raw) if raw else torch.zeros((0,) + images.shape[1:3])
    predicted = proba_np.argmax(1).astype(np.int64)
    targets = predicted.copy() if fixed is None else fixed
    maps = normalize_maps(raw_t) if n else raw_t
    return Explanation(
        maps=maps.numpy().astype(np.float32), raw_maps=raw_t.numpy().astype(np.float32),
        targets=targets, target_names=[classes[t] for t in targets], predicted=predicted, proba=proba_np,
        method=method, layer=layer_name, images=images, names=list(names) if names is not None else None,
        classes=classes, multilabel=multilabel)


def _target_list(target) -> list[str] | None:
    """Several class names asked for (a list, or names separated by commas), or None for one target."""
    if isinstance(target, (list, tuple)):
        return [str(t).strip() for t in target]
    if isinstance(target, str) and "," in target:
        return [t.strip() for t in target.split(",") if t.strip()]
    return None


def _with_target(name: str, target: str) -> str:
    """``photo.jpg`` explained for ``rose``: ``photo-rose.jpg``, so that each map gets a file of its own."""
    stem, dot, ext = name.rpartition(".")
    return f"{stem}-{target}.{ext}" if dot and stem else f"{name}-{target}"


@torch.no_grad()
def _logits(model, x: torch.Tensor) -> torch.Tensor:
    """fp32 logits (N, K) in eval mode, the model's training mode left as it was."""
    was_training = model.training
    model.eval()
    try:
        return model(x).float()
    finally:
        model.train(was_training)


def _check_images(images, meta: dict) -> np.ndarray:
    images = np.asarray(images)
    c, h, w = meta["input_shape"]
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ConfigError(f"images must be uint8 (N, H, W, C), got {images.dtype} with shape {images.shape}")
    if images.shape[1:] != (h, w, c):
        raise ConfigError(f"images must be {h}x{w} with {c} channel(s) as the model was trained, got "
                          f"{images.shape[1]}x{images.shape[2]} with {images.shape[3]}; resize them first "
                          "(Classifier.load_inputs does)")
    return images


def _fixed_target(target, classes: list[str], labels, n: int) -> np.ndarray | None:
    """Target classes (n,) int64, or None for "predicted" (known only after the forward pass)."""
    if isinstance(target, str) and target == "predicted":
        return None
    if isinstance(target, str) and target == "true":
        if labels is None:
            raise ConfigError("target 'true' needs the images' labels (labels=...); "
                              "use target='predicted' or a class name for unlabelled images")
        labels = np.asarray(labels, dtype=np.int64).reshape(-1)
        if len(labels) != n:
            raise ConfigError(f"labels must hold one class per image ({n}), got {len(labels)}")
        bad = labels[(labels < 0) | (labels >= len(classes))]
        if len(bad):
            raise ConfigError(f"label {int(bad[0])} is not a class index 0..{len(classes) - 1}")
        return labels
    return np.full(n, _class_index(target, classes), dtype=np.int64)


def _class_index(target, classes: list[str]) -> int:
    if isinstance(target, str) and target in classes:
        return classes.index(target)
    if isinstance(target, str) and target.strip().isdigit():
        target = int(target)
    if isinstance(target, (int, np.integer)) and not isinstance(target, bool) and 0 <= target < len(classes):
        return int(target)
    raise ConfigError(f"target {target!r} is neither {', '.join(repr(t) for t in TARGETS)}, a class name "
                      f"nor a class index 0..{len(classes) - 1}; classes: {', '.join(classes)}")


def overlay(image: np.ndarray, attribution: np.ndarray, alpha: float = 0.5) -> np.ndarray:
    """A heatmap blended over an image.

    Args:
        image: uint8 (H, W, C) with C 1 (shown as gray) or 3, or (H, W).
        attribution: (H, W) map in [0, 1] (values outside are clipped).
        alpha: weight of the heatmap, 0 (image only) to 1 (heatmap only).

    Returns:
        uint8 (H, W, 3).
    """
    from matplotlib import colormaps

    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[-1] not in (1, 3):
        raise ConfigError(f"overlay needs an image (H, W, 1|3), got shape {image.shape}")
    attribution = np.asarray(attribution, dtype=np.float32)
    if attribution.shape != image.shape[:2]:
        raise ConfigError(f"map shape {attribution.shape} does not match image shape {image.shape[:2]}")
    if not 0.0 <= alpha <= 1.0:
        raise ConfigError(f"alpha must be in [0, 1], got {alpha}")
    rgb = np.repeat(image, 3, axis=-1) if image.shape[-1] == 1 else image
    heat = colormaps[CMAP](np.clip(np.nan_to_num(attribution), 0.0, 1.0))[..., :3] * 255.0
    return np.clip((1.0 - alpha) * rgb.astype(np.float32) + alpha * heat, 0, 255).round().astype(np.uint8)


def plot_explanations(exp: Explanation, ncols: int = 4, alpha: float = 0.5):
    """Overlays in a grid, one shared colour bar (0..1); a single image gets one panel.

    Each panel is titled "pred CLASS (p)", with "target T" below when the map
    explains another class than the predicted one.  The panels are one picture,
    the titles the figure's texts (:func:`imgcls.plots.draw_image_grid`).
    """
    from matplotlib.cm import ScalarMappable
    from matplotlib.colors import Normalize

    n = len(exp)
    ncols = max(1, min(ncols, n))
    nrows = max(1, -(-n // ncols))
    titles = [exp.title(i) for i in range(n)]
    lines = max((t.count("\n") + 1 for t in titles), default=1)
    cell = 2.0 if n > 1 else 3.0  # inches per panel; a lone image gets a larger one
    top, right = 0.3, 0.9  # inches: the method's line above, the colour bar beside
    fig = new_figure(ncols * cell + right, nrows * (cell + 0.2 * lines) + top)
    fig.set_layout_engine("none")
    dpi = fig.dpi
    width, height = (round(v * dpi) for v in fig.get_size_inches())
    grid_w, grid_h = round(ncols * cell * dpi), round(nrows * (cell + 0.2 * lines) * dpi)
    overlays = [overlay(exp.images[i], exp.maps[i], alpha) for i in range(n)]
    draw_image_grid(fig, overlays, titles, [False] * n, ncols, (grid_w, grid_h), round(0.2 * lines * dpi), 9,
                    fill=True)
    cax = fig.add_axes(((grid_w + 0.15 * dpi) / width, 0.1 * grid_h / height, 0.15 * dpi / width, 0.8 * grid_h / height))
    bar = fig.colorbar(ScalarMappable(norm=Normalize(0.0, 1.0), cmap=CMAP), cax=cax)
    bar.set_label("attribution (normalised)")
    where = f" at {exp.layer}" if exp.layer else ""
    fig.suptitle(f"{exp.method}{where}", fontsize=10, y=1.0 - 0.5 * top * dpi / height)
    return fig


def write_explanations(exp: Explanation, out_dir: Path, save_maps: bool = False) -> list[Path]:
    """Write ``<stem>_<method>.png`` per image, ``grid_<method>.png`` for several, and maps.

    Args:
        exp: the explanation.
        out_dir: folder (created if needed).
        save_maps: also write each raw map as ``<stem>_<method>.npy`` (float32 (H, W)).

    Returns:
        The paths written, per image its PNG (then its .npy), then the grid.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    written = []
    for i, stem in enumerate(file_stems(exp.names, len(exp))):
        png = out_dir / f"{stem}_{exp.method}.png"
        write_atomic(png, figure_png(plot_explanations(_select(exp, i))), fsync=False)
        written.append(png)
        if save_maps:
            npy = out_dir / f"{stem}_{exp.method}.npy"
            write_npy(npy, exp.raw_maps[i].astype(np.float32), fsync=False)
            written.append(npy)
    if len(exp) > 1:
        grid = out_dir / f"grid_{exp.method}.png"
        write_atomic(grid, figure_png(plot_explanations(exp)), fsync=False)
        written.append(grid)
    return written


def file_stems(names: list[str] | None, n: int) -> list[str]:
    """A safe, unique file stem per image: the name's stem, else ``image_<i>``.

    Characters other than letters, digits, ``.``, ``_`` and ``-`` become
    ``_``; a repeated stem (compared case-insensitively, for case-insensitive
    file systems) gets ``_2``, ``_3``, ...; ``grid`` is kept for the grid figure.
    """
    taken = {"grid"}
    stems = []
    for i in range(n):
        raw = Path(str(names[i])).stem if names is not None else ""
        stem = re.sub(r"[^A-Za-z0-9._-]+", "_", raw).strip("._") or f"image_{i:03d}"
        unique, k = stem, 2
        while unique.lower() in taken:
            unique, k = f"{stem}_{k}", k + 1
        taken.add(unique.lower())
        stems.append(unique)
    return stems


def _select(exp: Explanation, i: int) -> Explanation:
    """The explanation of image ``i`` alone."""
    one = slice(i, i + 1)
    return Explanation(
        maps=exp.maps[one], raw_maps=exp.raw_maps[one], targets=exp.targets[one],
        target_names=exp.target_names[one], predicted=exp.predicted[one], proba=exp.proba[one],
        method=exp.method, layer=exp.layer, images=exp.images[one],
        names=exp.names[one] if exp.names is not None else None, classes=exp.classes, multilabel=exp.multilabel)
