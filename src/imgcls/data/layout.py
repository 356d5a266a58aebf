"""Which files of a folder or zip make which split and class, from folder names alone.

Two layouts are understood:

* ``<class>/<image>``: one split, named ``all``;
* ``<split>/<class>/<image>``: a train folder with optional val and test
  folders beside it.

A CSV of labels beside the images (``labels.csv``, or the file ``--labels``
names) makes a multi-label dataset instead: the images may sit in any folders
(split folders still make the splits), and each image's labels come from its
row (:mod:`imgcls.data.multilabel`).  Split folders are known by name in any case and with
  ``_``, ``-``, a space or nothing between the words: ``Training``,
  ``training_set``, ``train-data``, ``TEST SET``, ``holdout``, ``dev``
  (:data:`SPLIT_ALIASES` lists them all).

Single folders wrapping everything (a zip of ``mydata/``) are looked through,
and so are single folders inside a split folder (Kaggle's
``training_set/training_set/cats/``).  Folder names can still mislead: a
folder about to become a class that holds class-like or split folders of its
own is refused with the tree that was found, rather than trained on as a class.
"""

from __future__ import annotations

import os
from collections import Counter
from dataclasses import dataclass, field

import numpy as np

from imgcls.data.base import SkippedFile
from imgcls.data.images import has_image_extension
from imgcls.errors import DataError

_SPLIT_STEMS = {
    "train": ("train", "training"),
    "val": ("val", "valid", "validation", "dev"),
    "test": ("test", "testing", "eval", "evaluation", "holdout"),
}
_SPLIT_SUFFIXES = ("", "set", "data", "images", "split")  # train, train_set, train_data, ...

SPLIT_ALIASES = {
    stem + suffix: split for split, stems in _SPLIT_STEMS.items() for stem in stems for suffix in _SPLIT_SUFFIXES
}
"""Split folder names, normalised by :func:`split_of` (``trainingset``), and the split each means."""

_SEPARATORS = str.maketrans("", "", "_- .")

_LAYOUT_HELP = (
    "expected one folder per class, <class>/<image> (for example cats/001.jpg, dogs/001.jpg), "
    "or train/<class>/<image> with optional val/ and test/ folders beside train/"
)
_SHOWN_FOLDERS = 6  # top folders listed in a refusal
_SHOWN_SUBFOLDERS = 3  # subfolders listed per top folder


@dataclass
class Layout:
    """Which files make which split, found from folder names alone.

    Attributes:
        classes: sorted class names; label ``i`` is ``classes[i]``.
        items: split name to (relative path, label) of every candidate image.
        folders: split name to class name to that class folder's relative path.
        skipped: hidden and non-image files.
        notes: lines for the user (for example an empty split folder).
        roots: split name to the folder holding its class folders, relative
            with a trailing ``/`` (``training_set/training_set/``), or ``""``
            for the top of the source.
        targets: multi-label only: uint8 0/1 (R, L), one row per row of the
            labels CSV; an item's label is then its row in ``targets``, and
            ``classes`` are the L labels.
        label_file: multi-label only: the CSV the labels came from.
    """

    classes: list[str]
    items: dict[str, list[tuple[str, int]]]
    folders: dict[str, dict[str, str]]
    skipped: list[SkippedFile] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    roots: dict[str, str] = field(default_factory=dict)
    targets: np.ndarray | None = None
    label_file: str = ""

    def labels_of(self, items: list[tuple[str, int]]) -> np.ndarray:
        """The labels of ``items`` (a list of (path, label) like ``items[split]``): int64 (N,) class indices,
        or uint8 (N, L) rows of ``targets``."""
        index = np.array([label for _, label in items], dtype=np.int64)
        return index if self.targets is None else self.targets[index]


def split_of(name: str) -> str | None:
    """The split (``train``, ``val`` or ``test``) a folder name means, or None.

    The name is lower-cased and stripped of ``_``, ``-``, spaces and dots, so
    ``Training_Set``, ``training-set`` and ``Training Set`` all mean train.
    """
    return SPLIT_ALIASES.get(name.lower().translate(_SEPARATORS))


def split_names(split: str) -> str:
    """The accepted folder names of ``split``, listed for a message."""
    names = [stem + (f"_{suffix}" if suffix else "") for stem in _SPLIT_STEMS[split] for suffix in _SPLIT_SUFFIXES]
    return ", ".join(names)


def skip_reason(rel: str) -> str | None:
    """Why the file at ``rel`` is not a candidate image, or None if it is one."""
    if rel.startswith(".") or "/." in rel or "__MACOSX" in rel:  # rare: only then split it into its parts
        parts = rel.split("/")
        if "__MACOSX" in parts:
            return "macOS metadata (__MACOSX)"
        if any(p.startswith(".") for p in parts):
            return "hidden file" if parts[-1].startswith(".") else "inside a hidden folder"
    if not has_image_extension(rel.rpartition("/")[2]):
        return "not an image (extension)"
    return None


def visible_dir(rel: str) -> bool:
    """Whether no part of the folder path ``rel`` is hidden (``.name``) or macOS metadata (``__MACOSX``)."""
    return not any(p.startswith(".") or p == "__MACOSX" for p in rel.split("/"))


def detect_layout(files: list[str], dirs: set[str], where: str, min_classes: int = 2) -> Layout:
    """Work out classes and splits from relative file and folder paths.

    Args:
        files: relative POSIX paths of every file.
        dirs: relative POSIX paths of every folder.
        where: the folder or zip, for error messages.
        min_classes: the fewest classes accepted: 2 for a dataset, 1 for a folder that adds photos to a run
            (``imgcls train --update``), whose classes join the run's.

    Raises:
        DataError: the layout is not one of the two understood, there are
            fewer than ``min_classes`` classes, a class folder holds no image or holds
            class-like or split folders of its own, split folders lack a train
            folder, or val/test name a class that train lacks.
    """
    images, skipped = candidate_images(files)
    dirs = {d for d in dirs if visible_dir(d)}
    root = _unwrap(images, dirs, "", stop_at_splits=True)
    _refuse_loose_images(images, root, where)
    tops = _children(dirs, root)
    split_tops = [t for t in tops if split_of(t)]
    if split_tops:
        layout = _split_layout(images, dirs, root, tops, split_tops, where, min_classes)
    else:
        layout = _class_layout(images, dirs, root, where, min_classes)
    layout.skipped = skipped
    check_not_empty(layout, where)
    return layout


def candidate_images(files: list[str]) -> tuple[list[str], list[SkippedFile]]:
    """(the files that are candidate images, the others with why they are passed over)."""
    images, skipped = [], []
    for rel in files:
        reason = skip_reason(rel)
        if reason is None:
            images.append(rel)
        else:
            skipped.append(SkippedFile(rel, reason))
    return images, skipped


def multilabel_layout(images: list[str], skipped: list[SkippedFile], dirs: set[str], where: str, table,
                      rows: np.ndarray) -> Layout:
    """The layout of a multi-label dataset: the candidate ``images``, each matched to its row (``rows``) of
    ``table`` (a :class:`imgcls.data.multilabel.LabelTable`), the splits from split folders where there are any.

    Raises:
        DataError: images outside the split folders; a label that val or test has and train lacks; fewer
            than 2 labels.
    """
    if len(table.labels) < 2:
        raise DataError(f"{table.source}: names only {table.labels} as labels; at least 2 labels are needed")
    root = _unwrap(images, dirs, "", stop_at_splits=True)
    split_tops = [t for t in _children(dirs, root) if split_of(t)]
    layout = Layout(list(table.labels), {}, {}, skipped, targets=table.targets, label_file=table.source)
    if not split_tops:
        layout.items["all"] = list(zip(images, rows.tolist()))
        layout.roots["all"] = root
    else:
        by_split = _split_folders(root, split_tops, split_tops, where)
        placed = set()
        for split in ("train", "val", "test"):
            if split in by_split:
                prefix = f"{root}{by_split[split]}/"
                layout.items[split] = [(r, int(i)) for r, i in zip(images, rows) if r.startswith(prefix)]
                layout.roots[split] = prefix
                placed.update(r for r, _ in layout.items[split])
        outside = [r for r in images if r not in placed]
        if outside:
            raise DataError(f"{where}: {len(outside):,} images lie outside the split folders "
                            f"({', '.join(t + '/' for t in split_tops)}), for example {outside[0]!r}; put every "
                            f"image in a split folder, or none")
        _refuse_labels_only_held_out(layout, table)
    return layout


def _refuse_labels_only_held_out(layout: Layout, table) -> None:
    """Refuse a label that the val or test folder has and the train folder lacks: no model can learn it."""
    train = layout.labels_of(layout.items["train"]).sum(0)
    for split in ("val", "test"):
        if split not in layout.items:
            continue
        there = layout.labels_of(layout.items[split]).sum(0)
        missing = np.flatnonzero((there > 0) & (train == 0))
        if len(missing):
            rel, row = next((r, i) for r, i in layout.items[split] if table.targets[i, missing[0]])
            names = ", ".join(table.labels[k] for k in missing[:5])
            raise DataError(f"{table.source}: label(s) {names} appear only in {split} (for example line "
                            f"{table.rows[row]}, {rel}), never in train: no model can learn them; move some of those "
                            f"images to train, or remove the label")


def describe_layout(layout: Layout, counts: dict[str, int]) -> str:
    """One line saying how the folders were read.

    ``training/ -> train (1,877 images), testing/ -> test (470)`` for split
    folders, ``one folder per class (5 classes, 4,317 images) under flowers/``
    for class folders (``under ...`` only where a wrapping folder was looked
    through).

    Args:
        layout: from :func:`detect_layout`.
        counts: images kept per split of ``layout.items`` (decodable ones).
    """
    if layout.targets is not None and "all" in layout.items:
        return f"labels from {layout.label_file} ({len(layout.classes)} labels, {_count(counts['all'], 'image')})"
    if "all" in layout.items:
        under = f" under {layout.roots['all']}" if layout.roots.get("all") else ""
        kinds = "1 class" if len(layout.classes) == 1 else f"{len(layout.classes)} classes"
        return f"one folder per class ({kinds}, {_count(counts['all'], 'image')}){under}"
    parts = [
        f"{layout.roots[split]} -> {split} ({_count(counts[split], 'image') if i == 0 else f'{counts[split]:,}'})"
        for i, split in enumerate(layout.items)
    ]
    return ", ".join(parts)


def check_not_empty(layout: Layout, where: str, bad: list[SkippedFile] | None = None) -> None:
    """Raise if a class folder present in a split holds no (decodable) image."""
    for split, folders in layout.folders.items():
        counts = np.bincount([label for _, label in layout.items[split]], minlength=len(layout.classes))
        for name, folder in folders.items():
            if counts[layout.classes.index(name)] == 0:
                why = "holds no decodable image" if bad else "holds no image"
                inside = [b for b in bad or [] if f"/{folder}/" in f"/{b.path}"]
                listed = "".join(f"\n  {b.path}: {b.reason}" for b in inside)
                raise DataError(f"{where}: class folder {folder}/ {why}{listed}")


# ----------------------------------------------------------------------------
# The two layouts


def _class_layout(images: list[str], dirs: set[str], root: str, where: str, min_classes: int = 2) -> Layout:
    classes = _children(dirs, root)
    _check_class_count(classes, root, where, min_classes)
    _refuse_nested_classes(images, root, classes, where, in_split=False)
    label = {c: i for i, c in enumerate(classes)}
    items = [(r, label[r[len(root) :].split("/", 1)[0]]) for r in images]
    return Layout(classes, {"all": items}, {"all": {c: root + c for c in classes}}, roots={"all": root})


def _split_layout(
    images: list[str], dirs: set[str], root: str, tops: list[str], split_tops: list[str], where: str,
    min_classes: int = 2,
) -> Layout:
    by_split = _split_folders(root, tops, split_tops, where)
    class_roots = {split: _unwrap(images, dirs, f"{root}{top}/") for split, top in by_split.items()}
    class_dirs = {split: _children(dirs, prefix) for split, prefix in class_roots.items()}
    for split, prefix in class_roots.items():
        _refuse_loose_images(images, prefix, where)
        _refuse_nested_classes(images, prefix, class_dirs[split], where, in_split=True)
    classes = class_dirs["train"]
    _check_class_count(classes, class_roots["train"], where, min_classes)
    for split, prefix in class_roots.items():
        unknown = sorted(set(class_dirs[split]) - set(classes))
        if unknown:
            raise DataError(
                f"{where}: {prefix} has class folder(s) {unknown} that {class_roots['train']} lacks; "
                f"train classes are {classes}"
            )
    label = {c: i for i, c in enumerate(classes)}
    layout = Layout(classes, {}, {})
    for split in ("train", "val", "test"):
        if split not in by_split:
            continue
        prefix = class_roots[split]
        members = [r for r in images if r.startswith(prefix)]
        if not members and not class_dirs[split]:
            layout.notes.append(f"{root}{by_split[split]}/ is empty and was left out")
            continue
        layout.items[split] = [(r, label[r[len(prefix) :].split("/", 1)[0]]) for r in members]
        layout.folders[split] = {c: prefix + c for c in class_dirs[split]}
        layout.roots[split] = prefix
    return layout


def _split_folders(root: str, tops: list[str], split_tops: list[str], where: str) -> dict[str, str]:
    """Split name to its folder among ``tops``, checked: split folders only, one per split, train among them."""
    others = [t for t in tops if t not in split_tops]
    if others:
        raise DataError(
            f"{where}: found split folders {split_tops} beside other folders {others} in {root or 'the top folder'}; "
            "in the split layout that level holds only train, val and test folders (if some of these folders "
            "are classes, rename them)"
        )
    by_split: dict[str, str] = {}
    for top in split_tops:
        split = split_of(top)
        if split in by_split:
            raise DataError(f"{where}: both {by_split[split]}/ and {top}/ are {split} folders; keep only one")
        by_split[split] = top
    if "train" not in by_split:
        found = ", ".join(t + "/" for t in split_tops)
        raise DataError(
            f"{where}: found {found} but no train/ folder; {_LAYOUT_HELP}; a train folder may be named "
            f"{split_names('train')} (any case, with _, -, a space or nothing between the words)"
        )
    return by_split


# ----------------------------------------------------------------------------
# Folders


def _children(dirs: set[str], prefix: str) -> list[str]:
    """Sorted names of the folders directly inside ``prefix`` ('' or ending in '/')."""
    n = len(prefix)
    return sorted({d[n:].split("/", 1)[0] for d in dirs if d.startswith(prefix) and len(d) > n})


def _loose(images: list[str], prefix: str) -> list[str]:
    """Images directly inside ``prefix``."""
    n = len(prefix)
    return [r for r in images if r.startswith(prefix) and "/" not in r[n:]]


def _unwrap(images: list[str], dirs: set[str], prefix: str, stop_at_splits: bool = False) -> str:
    """``prefix`` followed down through single wrapping folders.

    A wrapping folder is the only folder at its level, beside no image, and
    holds folders of its own (so a lone class folder of images is kept).  With
    ``stop_at_splits`` a split-named folder is never looked through.
    """
    while True:
        tops = _children(dirs, prefix)
        if len(tops) != 1 or _loose(images, prefix):
            return prefix
        inner = prefix + tops[0] + "/"
        if (stop_at_splits and split_of(tops[0])) or not _children(dirs, inner) or _loose(images, inner):
            return prefix
        prefix = inner


def _refuse_loose_images(images: list[str], prefix: str, where: str) -> None:
    loose = _loose(images, prefix)
    if loose:
        raise DataError(
            f"{where}: found images directly in {prefix or 'the top folder'} (for example {loose[0]!r}); {_LAYOUT_HELP}"
        )


@dataclass
class _Contents:
    """The images inside a folder: directly, and under each of its subfolders."""

    direct: int = 0
    below: Counter = field(default_factory=Counter)  # subfolder name -> images anywhere inside it


def _census(images: list[str], prefix: str) -> dict[str, _Contents]:
    """The contents of every folder directly inside ``prefix`` that holds images."""
    out: dict[str, _Contents] = {}
    n = len(prefix)
    for r in images:
        if r.startswith(prefix):
            parts = r[n:].split("/", 2)
            if len(parts) > 1:
                contents = out.setdefault(parts[0], _Contents())
                if len(parts) == 2:
                    contents.direct += 1
                else:
                    contents.below[parts[1]] += 1
    return out


# ----------------------------------------------------------------------------
# Class folders that are not classes


def _check_class_count(classes: list[str], prefix: str, where: str, min_classes: int = 2) -> None:
    if len(classes) < min_classes:
        found = f"only {classes}" if classes else "no class folders"
        needed = "at least 2 classes are needed" if min_classes == 2 else f"at least {min_classes} needed"
        raise DataError(f"{where}: found {found} in {prefix or 'the top folder'}; {needed}; " + _LAYOUT_HELP)


def _refuse_nested_classes(images: list[str], prefix: str, classes: list[str], where: str, in_split: bool) -> None:
    """Refuse class folders that look like a level above the classes.

    Such a folder holds split folders (``cats/train/``), or it is one of two or
    more folders that hold no image directly but image folders sharing names
    with each other (``part1/cats/``, ``part2/cats/``; two shared names at
    least, as a dataset one level down has two classes).  A class of the
    user's own sorted into a few folders (``dogs/2019/``, ``dogs/2020/``,
    ``cats/holiday/``) does not look so.  ``in_split``: ``prefix`` is inside
    a split folder, where the fix is another arrangement, not another --data.
    """
    census = _census(images, prefix)
    holding_splits = [c for c in classes if c in census and any(split_of(s) for s in census[c].below)]
    if holding_splits:
        raise DataError(
            f"{where}: class folders hold split folders, which would be trained on as parts of a class:\n"
            f"{_tree(census, prefix, holding_splits)}\n"
            "put the split folders at the top, one folder per class inside each "
            "(train/cats/, train/dogs/, test/cats/, test/dogs/)"
        )
    nested = [c for c in classes if c in census and not census[c].direct and len(census[c].below) >= 2]
    names = Counter(s for c in nested for s in census[c].below)
    shared = sorted(s for s, k in names.items() if k >= 2)
    if len(nested) < 2 or len(shared) < 2:
        return
    folders = [s + "/" for s in shared[:_SHOWN_SUBFOLDERS]]
    if in_split:
        fix = f"put one folder per class directly in {prefix} ({', '.join(prefix + f for f in folders)})"
    else:
        fix = (
            f"point at the level with one folder per class ({_point_at(where, prefix + nested[0])}), "
            f"or, if {' and '.join(c + '/' for c in nested[:2])} are splits, rename them to train/ and test/"
        )
    raise DataError(
        f"{where}: the folders in {prefix or 'the top folder'} hold folders of images with the same names "
        f"({', '.join(folders)}), so they look like splits or groups of classes, not classes:\n"
        f"{_tree(census, prefix, nested)}\n{fix}"
    )


def _tree(census: dict[str, _Contents], prefix: str, tops: list[str]) -> str:
    """Lines ``  part1/ (cats/ 120 images, dogs/ 118 images)``: a few of ``tops`` with their contents."""
    lines = []
    for top in tops[:_SHOWN_FOLDERS]:
        contents = census[top]
        parts = [f"{_count(contents.direct, 'image')} directly"] if contents.direct else []
        subs = sorted(contents.below.items())
        parts += [f"{name}/ {_count(n, 'image')}" for name, n in subs[:_SHOWN_SUBFOLDERS]]
        if len(subs) > _SHOWN_SUBFOLDERS:
            parts.append(_count(len(subs) - _SHOWN_SUBFOLDERS, "more folder"))
        lines.append(f"  {prefix}{top}/ ({', '.join(parts)})")
    if len(tops) > _SHOWN_FOLDERS:
        lines.append(f"  ... and {len(tops) - _SHOWN_FOLDERS} more folders like these")
    return "\n".join(lines)


def _point_at(where: str, rel: str) -> str:
    """How to give ``--data`` the folder ``rel`` of the source ``where``."""
    if os.path.isdir(where):
        return f"--data {where}/{rel}"
    return f"unzip {where} and give --data <the unzipped folder>/{rel}"


def _count(n: int, noun: str) -> str:
    """``1 image``, ``1,877 images``."""
    return f"{n:,} {noun}" if n == 1 else f"{n:,} {noun}s"
