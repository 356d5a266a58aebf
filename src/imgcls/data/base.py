"""The in-memory dataset every source is turned into.

A dataset is a set of named splits, each a pair of arrays: uint8 images of
shape (N, H, W, C), and labels: int64 class indices of shape (N,), or, for a
multi-label dataset, a uint8 0/1 matrix of shape (N, L) (image i carries label
j where ``labels[i, j] == 1``).  NHWC is the layout the images are decoded in,
and it becomes a channels_last tensor without a copy.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

import numpy as np

SPLITS = ("train", "val", "test")
SHOWN_BAD = 20  # undecodable images listed one by one in a summary; the rest are counted


def printable(name: str) -> str:
    """``name`` as text every JSON, CSV, HTML and log writer takes: bytes that are not UTF-8 (a file system
    allows them; Python reads them as surrogates) become ``\\xNN`` escapes, so no two names merge."""
    try:
        name.encode("utf-8")
        return name
    except UnicodeEncodeError:
        return name.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")


@dataclass
class Split:
    """One split of a dataset.

    Attributes:
        images: uint8 array, shape (N, H, W, C).
        labels: int64 array, shape (N,), values in [0, num_classes); or, multi-label, uint8 0/1 (N, L).
        paths: optional source path of each image (for reports), length N.
        sizes: optional int32 (N, 2): each image's own (height, width) before it was resized (own images).
    """

    images: np.ndarray
    labels: np.ndarray
    paths: list[str] | None = None
    sizes: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.images.dtype != np.uint8 or self.images.ndim != 4:
            raise ValueError(f"images must be uint8 (N, H, W, C), got {self.images.dtype} {self.images.shape}")
        labels = np.asarray(self.labels)
        self.labels = labels.astype(np.uint8, copy=False) if labels.ndim == 2 else labels.astype(np.int64, copy=False)
        if self.labels.shape[:1] != (len(self.images),) or self.labels.ndim > 2:
            raise ValueError(f"labels shape {self.labels.shape} does not match {len(self.images)} images")
        if self.paths is not None and len(self.paths) != len(self.images):
            raise ValueError(f"{len(self.paths)} paths for {len(self.images)} images")
        if self.paths is not None:
            self.paths = [printable(p) for p in self.paths]  # for reports and CSVs: never reopened
        if self.sizes is not None:
            self.sizes = np.asarray(self.sizes, dtype=np.int32).reshape(-1, 2)
            if len(self.sizes) != len(self.images):
                raise ValueError(f"{len(self.sizes)} sizes for {len(self.images)} images")

    def __len__(self) -> int:
        return len(self.labels)

    @property
    def multilabel(self) -> bool:
        """Whether the labels are a 0/1 matrix (N, L): several labels per image."""
        return self.labels.ndim == 2

    def subset(self, index: np.ndarray) -> "Split":
        """Return the split restricted to ``index`` (an integer array)."""
        paths = [self.paths[i] for i in index] if self.paths is not None else None
        return Split(self.images[index], self.labels[index], paths, None if self.sizes is None else self.sizes[index])


@dataclass
class SkippedFile:
    """A file that was found but not used, and why."""

    path: str
    reason: str

    def __post_init__(self) -> None:
        self.path, self.reason = printable(self.path), printable(self.reason)


@dataclass
class ImageDataset:
    """A labelled image dataset held in memory.

    Attributes:
        name: where it came from (a registry name or a path).
        classes: class names; label ``i`` is ``classes[i]``.
        splits: split name (``train``, ``val``, ``test``) to :class:`Split`.
        skipped: non-image files and hidden files that were passed over.
        bad: images that could not be decoded (corrupt, truncated).
        notes: lines for the user about how the dataset was prepared.
        layout: one line saying how the source was read: which folders became
            which split and how many images each kept, then what was carved
            out (``training/ -> train (1,877 images), testing/ -> test (470);
            val carved from train``); ``built-in`` for a registry dataset.
    """

    name: str
    classes: list[str]
    splits: dict[str, Split]
    skipped: list[SkippedFile] = field(default_factory=list)
    bad: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.classes = [printable(c) for c in self.classes]  # a folder name may hold any bytes
        self.notes = [printable(n) for n in self.notes]
    layout: str = ""
    excluded: list[dict] = field(default_factory=list)  # --exclude: {file, split, reason} of each image left out

    @property
    def num_classes(self) -> int:
        return len(self.classes)

    @property
    def multilabel(self) -> bool:
        """Whether an image may carry several labels (``classes`` are then the labels)."""
        return next(iter(self.splits.values())).multilabel

    def counts(self, split: str) -> np.ndarray:
        """Images per class of ``split`` (multi-label: images carrying each label), int64 (K,)."""
        return label_counts(self.splits[split].labels, self.num_classes)

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W) of every image, the shape a model is built for."""
        # Every split shares one shape; "all" stands alone before the train/test split is made.
        _, h, w, c = next(iter(self.splits.values())).images.shape
        return (c, h, w)

    def summary_lines(self) -> list[str]:
        """Human-readable lines: the layout, split sizes, skipped and bad files."""
        c, h, w = self.image_shape
        kinds = f"{self.num_classes} labels (multi-label)" if self.multilabel else f"{self.num_classes} classes"
        lines = [f"dataset {self.name}: {kinds}, images {c}x{h}x{w}"]
        if self.layout:
            lines.append(f"  layout: {self.layout}")
        for name, split in self.splits.items():
            lines.append(f"  {name}: {len(split)} images")
        lines.extend(f"  {n}" if n.startswith("warning: ") else f"  note: {n}" for n in self.notes)
        if self.skipped:
            lines.append(f"  skipped {len(self.skipped)} non-image or hidden files")
        if self.bad:
            lines.append(f"  {len(self.bad):,} images could not be decoded and were left out:")
            lines.extend(f"    {b.path}: {b.reason}" for b in self.bad[:SHOWN_BAD])
            if len(self.bad) > SHOWN_BAD:
                reasons = Counter(b.reason for b in self.bad[SHOWN_BAD:]).most_common(3)
                common = "; ".join(f"{n:,} {reason}" for reason, n in reasons)
                lines.append(f"    ... and {len(self.bad) - SHOWN_BAD:,} more ({common}); a run lists them all "
                             f"under \"bad\" in its dataset.json")
        return lines

    def record(self) -> dict:
        """A JSON-serialisable description: classes, layout, split sizes per class, skipped and bad files, notes."""
        return {
            "name": self.name, "classes": self.classes, "image_shape": list(self.image_shape), "layout": self.layout,
            **({"task": "multilabel"} if self.multilabel else {}),
            "splits": {k: {"images": len(v), "per_class": self.counts(k).tolist()} for k, v in self.splits.items()},
            "skipped": [vars(f) for f in self.skipped], "bad": [vars(f) for f in self.bad], "notes": self.notes,
            **({"excluded": self.excluded} if self.excluded else {}),
        }


def label_counts(labels: np.ndarray, num_classes: int) -> np.ndarray:
    """Images per class of ``labels`` (N,) class indices, or images carrying each label of a 0/1 (N, L) matrix."""
    if labels.ndim == 2:
        return labels.sum(0, dtype=np.int64)
    return np.bincount(labels, minlength=num_classes).astype(np.int64)


def pool_splits(ds: ImageDataset) -> Split:
    """The train and val splits of ``ds`` as one split (train first); test is not included."""
    parts = [ds.splits[name] for name in ("train", "val") if name in ds.splits]
    paths = None
    if all(p.paths is not None for p in parts):
        paths = [path for p in parts for path in p.paths]
    sizes = np.concatenate([p.sizes for p in parts]) if all(p.sizes is not None for p in parts) else None
    return Split(np.concatenate([p.images for p in parts]), np.concatenate([p.labels for p in parts]), paths, sizes)
