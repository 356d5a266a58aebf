"""Users' own images: a folder of class folders, or a zip of one, loaded as a dataset.

Which files make which split and class is worked out by
:mod:`imgcls.data.layout` (``<class>/<image>``, or train, val and test
folders under any of their usual names); the files are listed by
:mod:`imgcls.data.sources` and decoded by :mod:`imgcls.data.decode`.

Every file is accounted for: images kept are in ``Split.paths``, undecodable
ones in ``ImageDataset.bad``, non-images, hidden files and passed-over links
in ``ImageDataset.skipped``.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np

from imgcls.data.base import ImageDataset, SkippedFile, Split
from imgcls.data.decode import (
    DecodeOptions,
    assemble,
    check_size,
    choose_shape,
    decode_all,
    first_native_shape,
)
from imgcls.data.images import check_channels, check_resize
from imgcls.data.layout import (
    Layout,
    candidate_images,
    check_not_empty,
    describe_layout,
    detect_layout,
    multilabel_layout,
    visible_dir,
)
from imgcls.data.multilabel import (
    find_label_file,
    find_split_label_files,
    label_counts_line,
    match_rows,
    merge_tables,
    read_label_csv,
)
from imgcls.data.sources import open_source
from imgcls.errors import ConfigError, DataError

BAD_IMAGE_POLICIES = ("skip", "error")
"""Accepted values of ``on_bad_image``."""


def load_folder(
    path: str | os.PathLike,
    image_size: tuple[int, int] | None = None,
    channels: int | None = None,
    on_bad_image: str = "skip",
    resize: str = "stretch",
    progress: bool = False,
    *,
    workers: int | None = None,
    follow_links: bool = False,
    labels: str | None = None,
    min_classes: int = 2,
) -> ImageDataset:
    """Decode a folder (or zip) of class folders into an :class:`ImageDataset`.

    Args:
        path: a folder, or a zip file read in place.
        image_size: (height, width) of every image; None keeps the images'
            common size, or uses 64x64 (with a note) when sizes vary.
        channels: 1 or 3; None gives 1 when every image is grayscale, else 3.
        on_bad_image: ``"skip"`` lists undecodable images in ``dataset.bad``;
            ``"error"`` raises :class:`DataError` listing them.
        resize: ``"stretch"``, ``"crop"`` or ``"pad"`` (see
            :func:`imgcls.data.images.to_array`).
        progress: show a progress bar.
        workers: decoding processes; None uses every CPU available.
        follow_links: read links that lead out of the folder (refused
            otherwise; see :class:`FolderSource`).
        labels: a CSV of several labels per image (see
            :mod:`imgcls.data.multilabel`); None uses one found beside the
            images, else the class folders.
        min_classes: the fewest class folders accepted (1 for a folder that adds photos to a run).

    Returns:
        The splits ``all`` (class-folder layout) or ``train`` and any of
        ``val`` and ``test`` (split layout), images uint8 (N, H, W, C);
        ``layout`` says which folders became which split and how many
        images each kept (:func:`imgcls.data.layout.describe_layout`).
    """
    if on_bad_image not in BAD_IMAGE_POLICIES:
        raise ConfigError(f"unknown on_bad_image {on_bad_image!r}; choose one of: {', '.join(BAD_IMAGE_POLICIES)}")
    check_resize(resize)
    if channels is not None:
        check_channels(channels)
    image_size = check_size(image_size)
    with open_source(path, follow_links) as source:
        where = str(source.path)
        layout = read_layout(source, labels, min_classes)
        groups = [[rel for rel, _ in items] for items in layout.items.values()]
        ref_size, ref_channels = first_native_shape(source, [r for g in groups for r in g])
        opts = DecodeOptions(channels, image_size, resize, None if image_size is not None else ref_size, ref_channels)
        chunks = decode_all(source, groups, opts, workers=workers, progress=progress)
        skipped = [SkippedFile(source.display(s.path), s.reason) for s in layout.skipped + source.skipped()]
        bad, kept, sizes = [], {}, {}
        for (name, items), group in zip(layout.items.items(), chunks):
            errors = [e for chunk in group for e in chunk.errors]
            natives = [n for chunk in group for n in chunk.native]
            bad += [SkippedFile(source.display(rel), e) for (rel, _), e in zip(items, errors) if e is not None]
            kept[name] = [(source.display(rel), label) for (rel, label), e in zip(items, errors) if e is None]
            sizes[name] = [n for n, e in zip(natives, errors) if e is None]  # each image's own (H, W)
    if bad and on_bad_image == "error":
        listed = "\n".join(f"  {b.path}: {b.reason}" for b in bad)
        raise DataError(f"{where}: {len(bad)} image(s) could not be decoded (on_bad_image='error'):\n{listed}")
    check_not_empty(Layout(layout.classes, kept, layout.folders), where, bad)
    channels, size, notes = choose_shape([c for group in chunks for c in group], channels, image_size, resize)
    if layout.targets is not None:
        notes.insert(0, label_counts_line(np.concatenate([layout.labels_of(items) for items in kept.values()]),
                                          layout.classes))
    splits = {}
    for (name, items), group in zip(kept.items(), chunks):
        splits[name] = Split(assemble(group, channels, size, resize), layout.labels_of(items), [p for p, _ in items],
                             sizes[name])
    line = describe_layout(layout, {name: len(items) for name, items in kept.items()})
    return ImageDataset(where, layout.classes, splits, skipped, bad, layout.notes + notes, layout=line)


def read_layout(source, labels: str | None = None, min_classes: int = 2) -> Layout:
    """The layout of an opened source (:mod:`imgcls.data.sources`): multi-label when ``labels`` names a CSV,
    else from the folder names (:func:`imgcls.data.layout.detect_layout`), else from a CSV found beside the
    images (:func:`imgcls.data.multilabel.find_label_file`).

    Class folders win over a CSV found on its own, so that a folder of class folders with a stray CSV (a
    Kaggle download's ``train.csv``) trains as it always did; a note names the CSV and ``--labels``.

    Raises:
        DataError: as ``detect_layout`` when there is no CSV; for a CSV, as
            :func:`imgcls.data.multilabel.read_label_csv`, :func:`~imgcls.data.multilabel.match_rows` and
            :func:`imgcls.data.layout.multilabel_layout`.
    """
    files, where = source.files(), str(source.path)
    if labels is not None:
        table, csvs = _given_table(labels), set()
    else:
        try:
            return _class_folders(source, files, where, min_classes)
        except DataError as refused:
            table, csvs = _found_table(source, files, refused)
    images, skipped = candidate_images(files)
    skipped = [f for f in skipped if f.path not in csvs]  # the labels CSVs themselves
    rows = match_rows(table, images, where)
    return multilabel_layout(images, skipped, {d for d in source.dirs() if visible_dir(d)}, where, table, rows)


def _given_table(labels: str):
    """The label table of the CSV ``--labels`` names."""
    path = Path(labels).expanduser()
    if not path.is_file():
        raise DataError(f"--labels {labels}: no such file; give the CSV of labels (filename,labels or one 0/1 "
                        f"column per label), or leave --labels out to use a labels.csv beside the images")
    return read_label_csv(path.read_bytes(), str(path))


def _found_table(source, files: list[str], refused: DataError):
    """(the label table of the CSV beside the images, or of one CSV per split folder merged; the CSVs' paths);
    ``refused`` (why the folder names give no layout) raised again when there is no CSV."""
    found = find_label_file(files)
    if found is not None:
        return read_label_csv(source.read(found), source.display(found)), {found}
    per_split = find_split_label_files(files)
    if not per_split:
        raise refused
    return merge_tables({prefix: read_label_csv(source.read(rel), source.display(rel))
                         for prefix, rel in per_split.items()}), set(per_split.values())


def _class_folders(source, files: list[str], where: str, min_classes: int = 2) -> Layout:
    """:func:`detect_layout`, with a note naming a labels CSV beside the class folders, which is not read."""
    layout = detect_layout(files, source.dirs(), where, min_classes)
    try:
        found = find_label_file(files)
    except DataError:  # several CSVs: none is taken for labels on its own
        found = None
    if found is not None:
        layout.notes.append(f"{source.display(found)} was not read: the class folders give each image its class "
                            f"(--labels {source.display(found)} trains on its labels instead)")
    return layout
