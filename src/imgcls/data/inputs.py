"""Images to predict on, from anything a person holds: paths, folders, zips, PIL images, arrays."""

from __future__ import annotations

import os
import zipfile
from pathlib import Path

import numpy as np
from PIL import Image

from imgcls.data.base import SkippedFile
from imgcls.data.decode import DecodeOptions, check_size, decode_all
from imgcls.data.images import (
    BadImageError,
    check_channels,
    check_resize,
    decode_image,
    has_image_extension,
    to_array,
)
from imgcls.data.layout import skip_reason
from imgcls.data.sources import open_source
from imgcls.errors import DataError


def load_image_inputs(
    inputs,
    channels: int,
    size: tuple[int, int] | None,
    resize: str = "stretch",
) -> tuple[list[str], np.ndarray, list[SkippedFile]]:
    """Gather images for prediction from paths, folders, zips, PIL images and arrays.

    Args:
        inputs: a list whose items are each an image file path, a folder
            (every image in it, recursively), a zip (every image in it), a
            ``PIL.Image.Image``, or a numpy array: (H, W), (H, W, C) or
            (N, H, W, C), uint8 or float in [0, 1].  A single item is
            accepted too.
        channels: 1 or 3.
        size: (height, width) to resize to; None requires all to share a size.
        resize: ``"stretch"``, ``"crop"`` or ``"pad"``.

    Returns:
        (names, images, skipped): a name per image, uint8 (N, H, W, C), and
        the files left out (not images, hidden, or undecodable) with reasons.
    """
    check_channels(channels)
    check_resize(resize)
    size = check_size(size)
    if isinstance(inputs, (str, os.PathLike, Image.Image, np.ndarray)):
        inputs = [inputs]
    names: list[str] = []
    arrays: list[np.ndarray] = []
    skipped: list[SkippedFile] = []
    for k, item in enumerate(inputs):
        if isinstance(item, Image.Image):
            names.append(f"<image {k}>")
            arrays.append(to_array(item, channels, size, resize))
        elif isinstance(item, np.ndarray):
            for j, img in enumerate(_array_images(item, k)):
                names.append(f"<array {k}>" if item.ndim < 4 else f"<array {k}[{j}]>")
                arrays.append(to_array(img, channels, size, resize))
        elif isinstance(item, (str, os.PathLike)):
            _gather_path(Path(item), channels, size, resize, names, arrays, skipped)
        else:
            raise DataError(
                f"cannot predict on an input of type {type(item).__name__}; give an image path, "
                "a folder, a zip, a PIL image or a numpy array"
            )
    return names, _stack(arrays, channels, size), skipped


def _gather_path(path: Path, channels, size, resize, names, arrays, skipped) -> None:
    path = path.expanduser()
    if path.is_file() and not _is_zip_input(path):
        try:
            img = decode_image(path.read_bytes(), str(path), target=size, resize=resize)
            arrays.append(to_array(img, channels, size, resize))
            names.append(str(path))
        except (BadImageError, OSError) as exc:
            skipped.append(SkippedFile(str(path), str(exc).removeprefix(f"{path}: ")))
        return
    with open_source(path, follow_links=True) as source:  # predict reads what it is pointed at, links too
        skipped += [SkippedFile(source.display(s.path), s.reason) for s in source.skipped()]
        rels = []
        for rel in source.files():
            reason = skip_reason(rel)
            if reason is None:
                rels.append(rel)
            else:
                skipped.append(SkippedFile(source.display(rel), reason))
        (group,) = decode_all(source, [rels], DecodeOptions(channels, size, resize))
        errors = [e for chunk in group for e in chunk.errors]
        skipped += [SkippedFile(source.display(rel), e) for rel, e in zip(rels, errors) if e is not None]
        names += [source.display(rel) for rel, e in zip(rels, errors) if e is None]
        arrays += [a for chunk in group for a in chunk.arrays]


def _is_zip_input(path: Path) -> bool:
    """Whether a file given for prediction is a zip of images rather than an image."""
    if path.suffix.lower() == ".zip":
        return True
    return not has_image_extension(path.name) and zipfile.is_zipfile(path)


def _array_images(arr: np.ndarray, k: int) -> list[Image.Image]:
    """Split an (H, W), (H, W, C) or (N, H, W, C) array into PIL images."""
    if arr.dtype.kind == "f":
        if arr.size and (np.nanmin(arr) < 0.0 or np.nanmax(arr) > 1.0):
            raise DataError(f"input {k}: a float array must hold values in [0, 1], got [{arr.min():g}, {arr.max():g}]")
        arr = np.rint(np.nan_to_num(arr) * 255.0).astype(np.uint8)
    elif arr.dtype != np.uint8:
        raise DataError(f"input {k}: arrays must be uint8 or float in [0, 1], got {arr.dtype}")
    if arr.ndim == 2:
        arr = arr[None, :, :, None]
    elif arr.ndim == 3:
        arr = arr[None]
    if arr.ndim != 4 or arr.shape[3] not in (1, 3, 4):
        raise DataError(f"input {k}: expected an array (H, W), (H, W, C) or (N, H, W, C), C 1, 3 or 4; got {arr.shape}")
    modes = {1: "L", 3: "RGB", 4: "RGBA"}
    return [Image.fromarray(np.ascontiguousarray(a[..., 0] if a.shape[2] == 1 else a), modes[a.shape[2]]) for a in arr]


def _stack(arrays: list[np.ndarray], channels: int, size: tuple[int, int] | None) -> np.ndarray:
    if not arrays:
        h, w = size or (0, 0)
        return np.empty((0, h, w, channels), dtype=np.uint8)
    shapes = {a.shape for a in arrays}
    if len(shapes) > 1:
        listed = ", ".join(f"{h}x{w}" for h, w, _ in sorted(shapes))
        raise DataError(f"the images differ in size ({listed}); give a size to resize them to")
    return np.stack(arrays)
