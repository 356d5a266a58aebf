"""A cache of decoded datasets, so that a folder or zip is decoded only once.

An entry is a folder named by :func:`cache_key` holding, per split, the images
as a uint8 ``.npy`` file and the labels as an int64 ``.npy`` file, plus a
``meta.json`` with the classes, split names, paths, skipped and bad files,
notes, the layout line and a CRC32 of every array.  Arrays are read back with
``allow_pickle=False``: a cache file can never run code.  Images are mapped
copy-on-write rather than read (see :func:`read_entry`): an entry is never
changed in place, only replaced by a rename, so a mapped file stays whole.

An entry is written into a temporary folder beside it and renamed into place,
so a crash leaves either no entry or a whole one.  An entry that fails to read
back (truncated, edited, from another format version) is removed and rebuilt.
Entries are not fsynced (it made writing the CIFAR-10 entry take 0.15-0.6 s
instead of 0.07 s): what a power cut can leave, files renamed into place whose
data never reached the disk, fails the same read-back checks and is rebuilt.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
import time
import zlib
from pathlib import Path
from typing import Callable

import numpy as np

from imgcls.data.base import ImageDataset, SkippedFile, Split
from imgcls.data.sources import (
    FolderSource,
    ZipSource,
    open_source,
    zip_central_directory,
)
from imgcls.errors import DataError
from imgcls.io import read_json

CACHE_FORMAT = 4
"""Version of the entry layout and of the decoding; bump it when either changes.

It is part of :func:`cache_key` and of ``meta.json``: an entry of another
version is never found under a new key, or fails :func:`read_entry` and is
rebuilt.  2: the layout line (``meta["layout"]``), and split folders found
under more names, which can change what a folder decodes to.  3: meta.json
carries a checksum of itself.
"""

_META = "meta.json"
_STALE_TEMP_S = 3600  # a temporary folder older than this is a crashed write


def source_key(path: str | os.PathLike, follow_links: bool = False) -> str:
    """A key that changes when the content of a folder or zip changes.

    Cheap to compute: for a zip, a hash of its central directory (every
    member's name, CRC32 and size, read from the end of the file; no member
    is read); for a folder, a hash of every file's relative path, size and
    modification time.

    Raises:
        DataError: the path is neither a folder nor a zip file, or holds a
            link that :class:`~imgcls.data.sources.FolderSource` refuses.
    """
    path = Path(path).expanduser()
    if path.is_file():
        directory = zip_central_directory(path)
        if directory is not None:
            return hashlib.sha256(b"zip\n" + directory).hexdigest()
    digest = hashlib.sha256()
    with open_source(path, follow_links) as source:
        if isinstance(source, ZipSource):
            digest.update(b"zip-members\n")
            for name, member in sorted(source.members().items()):
                digest.update(f"{name}\0{member.crc}\0{member.file_size}\n".encode())
        elif isinstance(source, FolderSource):
            digest.update(b"folder\n")
            for rel, (size, mtime_ns) in sorted(source.stats().items()):
                digest.update(f"{rel}\0{size}\0{mtime_ns}\n".encode("utf-8", "surrogateescape"))  # any bytes
            for skipped in source.skipped():  # links passed over: a new one changes what is reported
                digest.update(f"skip\0{skipped.path}\0{skipped.reason}\n".encode("utf-8", "surrogateescape"))
        else:  # pragma: no cover - open_source returns one of the two
            raise DataError(f"{path}: cannot compute a cache key for {type(source).__name__}")
    return digest.hexdigest()


def file_digest(path: str | os.PathLike) -> str:
    """SHA-256 of a file's bytes (a labels CSV given beside the data: small); ``missing`` when it cannot be read,
    so that loading reports why."""
    try:
        return hashlib.sha256(Path(path).expanduser().read_bytes()).hexdigest()
    except OSError:
        return "missing"


def cache_key(path: str | os.PathLike, **options) -> str:
    """The cache entry name for ``path`` decoded with ``options``.

    Combines :func:`source_key`, the decoding options (any JSON-able values),
    :data:`CACHE_FORMAT`, and the absolute path (the entry records the
    images' paths, which name the source's location).
    """
    payload = {
        "format": CACHE_FORMAT,
        "source": source_key(path, bool(options.get("follow_links"))),
        "path": os.path.abspath(os.fspath(path)),
        "options": options,
    }
    text = json.dumps(payload, sort_keys=True, default=repr)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


def load_cached(
    key: str,
    build: Callable[[], ImageDataset],
    cache_dir: Path,
) -> tuple[ImageDataset, bool]:
    """Return the dataset cached under ``key``, or build it and cache it.

    Args:
        key: the entry's name, from :func:`cache_key`.
        build: makes the dataset when no usable entry exists.
        cache_dir: the folder holding entries (created if missing).

    Returns:
        (dataset, from_cache): from_cache is True when nothing was decoded.
        When the entry cannot be written (a full disk, no permission) the
        built dataset is returned with a note saying so.
    """
    cache_dir = Path(cache_dir)
    entry = cache_dir / key
    if entry.is_dir():
        try:
            return read_entry(entry, key), True
        except (OSError, ValueError, KeyError, TypeError, IndexError, EOFError):
            _remove(entry)  # damaged or from another format: rebuild
    dataset = build()
    try:
        write_entry(entry, key, dataset)
    except OSError as exc:
        dataset.notes.append(f"the decoded images could not be cached in {cache_dir} ({exc})")
    return dataset, False


def write_entry(entry: Path, key: str, dataset: ImageDataset) -> None:
    """Write ``dataset`` as the cache entry ``entry``, atomically."""
    entry.parent.mkdir(parents=True, exist_ok=True)
    _remove_stale_temps(entry)
    tmp = Path(tempfile.mkdtemp(prefix=f".{entry.name}.", dir=entry.parent))
    try:
        splits = []
        for i, (name, split) in enumerate(dataset.splits.items()):
            images_file, labels_file = f"{i}-images.npy", f"{i}-labels.npy"
            _save(tmp / images_file, split.images)
            _save(tmp / labels_file, split.labels)
            splits.append({
                "name": name,
                "images": images_file,
                "labels": labels_file,
                "shape": list(split.images.shape),
                "images_crc32": zlib.crc32(np.ascontiguousarray(split.images)),
                "labels_crc32": zlib.crc32(np.ascontiguousarray(split.labels)),
                "paths": split.paths,
                "sizes": None if split.sizes is None else split.sizes.tolist(),
            })  # fmt: skip
        meta = {
            "format": CACHE_FORMAT,
            "key": key,
            "name": dataset.name,
            "classes": dataset.classes,
            "splits": splits,
            "skipped": [[s.path, s.reason] for s in dataset.skipped],
            "bad": [[b.path, b.reason] for b in dataset.bad],
            "notes": dataset.notes,
            "layout": dataset.layout,
        }
        meta["checksum"] = meta_checksum(meta)
        with open(tmp / _META, "w", encoding="utf-8") as f:
            json.dump(meta, f)
        try:
            os.rename(tmp, entry)
        except OSError:
            if not entry.is_dir():  # not a concurrent writer that got there first
                raise
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def read_entry(entry: Path, key: str) -> ImageDataset:
    """Read the cache entry ``entry``.

    Raises:
        ValueError: the entry is damaged or was written for another key or format.
        OSError: a file of the entry cannot be read.
    """
    meta = read_json(entry / _META)
    if not isinstance(meta, dict) or meta.get("format") != CACHE_FORMAT or meta.get("key") != key:
        raise ValueError("cache entry from another format or key")
    if meta.get("checksum") != meta_checksum(meta):
        raise ValueError(f"cache entry {entry} is damaged ({_META} does not match its checksum)")
    splits = {}
    for info in meta["splits"]:
        # Mapped, not read: the pages the entry already has in the page cache become the array, and no
        # fresh memory is touched.  On the 2-core VM a fresh 184 MB array (numpy asks for huge pages)
        # took 0.15-0.4 s to fault in, against 0.01 s for a page-cache hit.  Copy-on-write: writing to
        # the array changes this process's copy, never the entry (which is only ever replaced by rename).
        images = np.load(entry / info["images"], mmap_mode="c", allow_pickle=False)
        labels = np.load(entry / info["labels"], allow_pickle=False)
        if (
            images.dtype != np.uint8
            or list(images.shape) != info["shape"]
            or zlib.crc32(images) != info["images_crc32"]
            or zlib.crc32(labels) != info["labels_crc32"]
        ):
            raise ValueError(f"cache entry {entry} is damaged ({info['images']})")
        splits[info["name"]] = Split(images, labels, info["paths"], info.get("sizes"))
    return ImageDataset(
        name=meta["name"],
        classes=list(meta["classes"]),
        splits=splits,
        skipped=[SkippedFile(p, r) for p, r in meta["skipped"]],
        bad=[SkippedFile(p, r) for p, r in meta["bad"]],
        notes=list(meta["notes"]),
        layout=str(meta["layout"]),
    )


def meta_checksum(meta: dict) -> str:
    """SHA-256 of ``meta`` without its ``checksum`` (JSON, keys sorted): the classes, paths and split names
    are trusted only as written (an edited class list would relabel every prediction)."""
    body = {k: v for k, v in meta.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True, ensure_ascii=True).encode()).hexdigest()


def _save(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:
        np.save(f, np.ascontiguousarray(array), allow_pickle=False)


def _remove(entry: Path) -> None:
    # Renamed aside first, so a reader never sees a half-removed entry.
    aside = entry.with_name(f".{entry.name}.removing-{os.getpid()}")
    try:
        os.rename(entry, aside)
    except OSError:
        return
    shutil.rmtree(aside, ignore_errors=True)


def _remove_stale_temps(entry: Path) -> None:
    """Delete temporary folders left for this entry by writes that crashed."""
    now = time.time()
    for tmp in entry.parent.glob(f".{entry.name}.*"):
        try:
            if now - tmp.stat().st_mtime > _STALE_TEMP_S:
                shutil.rmtree(tmp, ignore_errors=True)
        except OSError:
            continue
