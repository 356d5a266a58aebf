"""Users' own images: a folder of class folders, or a zip of one read in place.

Which files make which split and class is worked out by
:mod:`imgcls.data.layout` (``<class>/<image>``, or train, val and test
folders under any of their usual names); this module lists and decodes them.

Every file is accounted for: images kept are in ``Split.paths``, undecodable
ones in ``ImageDataset.bad``, non-images and hidden files in
``ImageDataset.skipped``.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import os
import struct
import sys
import zipfile
import zlib
from concurrent.futures import (
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, NamedTuple

import numpy as np
from PIL import Image

from imgcls.data.base import ImageDataset, SkippedFile, Split, printable
from imgcls.data.images import (
    BadImageError,
    check_channels,
    check_resize,
    decode_image,
    decode_jpeg_array,
    decode_png_array,
    has_image_extension,
    is_grayscale_mode,
    resize_image,
    to_array,
)
from imgcls.data.layout import (  # detect_layout, Layout, skip_reason, SPLIT_ALIASES: also imported from here
    SPLIT_ALIASES,  # noqa: F401 (re-exported)
    Layout,
    check_not_empty,
    describe_layout,
    detect_layout,
    skip_reason,
)
from imgcls.errors import ConfigError, DataError

BAD_IMAGE_POLICIES = ("skip", "error")
"""Accepted values of ``on_bad_image``."""

FALLBACK_SIZE = (64, 64)
"""(height, width) used when images differ in size and none was asked for."""

_CHUNK = 512  # images per task handed to a worker
_PARALLEL_MIN = 2048  # fewer images than this are decoded in this process


# ----------------------------------------------------------------------------
# Sources: a folder, or a zip read in place


class ImageSource:
    """Files under a root (a folder or a zip), by relative POSIX path."""

    path: Path

    def files(self) -> list[str]:
        """Relative POSIX paths of every file, sorted."""
        raise NotImplementedError

    def dirs(self) -> set[str]:
        """Relative POSIX paths of every folder, explicit or implied by a file."""
        raise NotImplementedError

    def read(self, rel: str) -> bytes:
        """The content of the file at ``rel``."""
        raise NotImplementedError

    def display(self, rel: str) -> str:
        """The path to show a person for the file at ``rel``."""
        return f"{self.path}/{rel}"

    def skipped(self) -> list[SkippedFile]:
        """Entries that are not read, with reasons (links that would hide or double files)."""
        return []

    def close(self) -> None:
        """Release open files."""

    def __enter__(self) -> "ImageSource":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class FolderSource(ImageSource):
    """A folder on disk, walked recursively.

    Symbolic links are read with care, so that a link can neither pull in
    files from elsewhere unasked nor hide or double files of the folder:

    * a link that leads out of the folder is refused unless ``follow_links``
      (a class folder linked to ``/usr/share`` would train on system icons);
    * a link to a file inside the folder is skipped (the file is read under
      its own path, once), and so is a link to a folder above it (a loop);
    * a link to another folder inside it is refused: its images would be read
      twice, as two classes or in two splits.

    Inside hidden folders, which are never read, links are only listed.
    """

    def __init__(self, path: Path, follow_links: bool = False) -> None:
        self.path = Path(path)
        self.follow_links = follow_links
        self._stats: dict[str, tuple[int, int]] = {}
        self._dirs: set[str] = set()
        self._skipped: list[SkippedFile] = []
        self._outside: list[tuple[str, str]] = []  # (link, its target) for links that leave the folder
        self._followed: dict[str, str] = {}  # real folder followed out of the folder -> the link that led there
        try:
            self._real = os.path.realpath(self.path)
            st = os.stat(self._real)
            self._walk(self.path, "", frozenset({(st.st_dev, st.st_ino)}))
        except OSError as exc:
            raise DataError(f"{self.path}: cannot be listed ({exc})") from None
        if self._outside:
            shown = ", ".join(f"{printable(rel)} -> {printable(target)}" for rel, target in self._outside[:3])
            more = f" and {len(self._outside) - 3:,} more" if len(self._outside) > 3 else ""
            raise DataError(
                f"{self.path}: {len(self._outside):,} {'link leads' if len(self._outside) == 1 else 'links lead'} "
                f"out of the folder ({shown}{more}); links out of the data folder are followed only when asked: "
                "give --follow-links (data.follow_links: true in a config), or copy the files in"
            )

    def _walk(self, folder: Path, prefix: str, above: frozenset) -> None:
        """List ``folder``; ``above``: the (device, inode) of every real folder from the top down to it."""
        with os.scandir(folder) as entries:
            for entry in entries:
                rel = prefix + entry.name
                if entry.is_symlink():
                    self._link(entry.path, rel, above)
                elif entry.is_dir(follow_symlinks=False):
                    self._dirs.add(rel)
                    st = entry.stat(follow_symlinks=False)
                    self._walk(Path(entry.path), rel + "/", above | {(st.st_dev, st.st_ino)})
                elif entry.is_file(follow_symlinks=False):
                    s = entry.stat(follow_symlinks=False)
                    self._stats[rel] = (s.st_size, s.st_mtime_ns)

    def _link(self, link: str, rel: str, above: frozenset) -> None:
        target = os.path.realpath(link)
        try:
            st = os.stat(target)
        except OSError:
            self._skipped.append(SkippedFile(rel, f"a broken link (to {printable(target)})"))
            return
        inside = os.path.commonpath([self._real, target]) == self._real
        hidden = skip_reason(rel + "/x.png") is not None  # inside a hidden folder: never read
        if hidden:
            self._skipped.append(SkippedFile(rel, "a link inside a hidden folder"))
        elif not inside and not self.follow_links:
            self._outside.append((rel, target))
        elif os.path.isdir(target):
            if (st.st_dev, st.st_ino) in above:
                self._skipped.append(SkippedFile(rel, "a link to a folder above it (a loop)"))
            elif inside or target in self._followed:
                what = (f"a link to {printable(os.path.relpath(target, self._real))}/, which is read already"
                        if inside else f"a link to the folder {printable(self._followed[target])}/ leads to")
                raise DataError(
                    f"{self.path}: {printable(rel)}/ is {what}: its images would be read twice (as two classes, "
                    "or in two splits); remove the link, or copy the folder"
                )
            else:
                self._followed[target] = rel
                self._dirs.add(rel)
                self._walk(Path(target), rel + "/", above | {(st.st_dev, st.st_ino)})
        elif inside:
            self._skipped.append(
                SkippedFile(rel, f"a link to {printable(os.path.relpath(target, self._real))}, read under its own path"))
        elif os.path.isfile(target):
            self._stats[rel] = (st.st_size, st.st_mtime_ns)

    def skipped(self) -> list[SkippedFile]:
        return list(self._skipped)

    def files(self) -> list[str]:
        return sorted(self._stats)

    def dirs(self) -> set[str]:
        return set(self._dirs)

    def stats(self) -> dict[str, tuple[int, int]]:
        """Relative path to (size in bytes, modification time in ns) of every file."""
        return dict(self._stats)

    def read(self, rel: str) -> bytes:
        return (self.path / rel).read_bytes()


class _Member(NamedTuple):
    """What reading a zip member takes, from its central-directory entry."""

    zip_name: str  # the name as stored (zipfile's name for it)
    flags: int
    method: int  # compression method
    crc: int
    compress_size: int
    file_size: int
    offset: int  # of its local header, from the start of the file


# A central-directory entry's 46 fixed bytes: signature, (versions), flags, method, (time, date), CRC-32,
# compressed and uncompressed sizes, name, extra and comment lengths, (disk, attributes), local header offset.
_CD_ENTRY = struct.Struct("<I4xHH4xIIIHHH8xI")
_CD_SIGNATURE = 0x02014B50
_EOCD_SIZE = 22  # bytes in a zip's end-of-central-directory record, before its comment
_ZIP64_LOCATOR_SIZE = 20


def zip_central_directory(path: Path) -> bytes | None:
    """The raw central directory of a zip file, or None where it cannot be found simply.

    The central directory lists every member's name, CRC32, sizes and place.
    None for data before the archive (a self-extractor) and for a damaged end
    record: :mod:`zipfile` sorts those out.
    """
    with open(path, "rb") as f:
        size = f.seek(0, os.SEEK_END)
        tail_len = min(size, _EOCD_SIZE + 0xFFFF + _ZIP64_LOCATOR_SIZE)  # record, comment, locator
        f.seek(size - tail_len)
        tail = f.read(tail_len)
        pos = tail.rfind(b"PK\x05\x06")
        if pos < 0 or len(tail) - pos < _EOCD_SIZE:
            return None
        cd_size, cd_offset = struct.unpack_from("<II", tail, pos + 12)
        if 0xFFFFFFFF in (cd_size, cd_offset):  # zip64: sizes are in the zip64 record
            loc = pos - _ZIP64_LOCATOR_SIZE
            if loc < 0 or tail[loc : loc + 4] != b"PK\x06\x07":
                return None
            (record_offset,) = struct.unpack_from("<Q", tail, loc + 8)
            f.seek(record_offset)
            record = f.read(56)
            if record[:4] != b"PK\x06\x06" or len(record) < 56:
                return None
            cd_size, cd_offset = struct.unpack_from("<QQ", record, 40)
        f.seek(cd_offset)
        directory = f.read(cd_size)
    if len(directory) != cd_size or (cd_size and directory[:4] != b"PK\x01\x02"):
        return None
    return directory


def _parse_members(directory: bytes) -> list[_Member] | None:
    """The members listed in a raw central directory; None where one needs :mod:`zipfile`.

    About 6x faster than ``zipfile.ZipFile`` (0.03-0.05 s against 0.19-0.3 s for
    CIFAR-10's 60,000 members): only the fields reading needs are unpacked,
    and the names are decoded in one call.  None for zip64 sizes and a
    damaged entry; zipfile then reads the directory, or says what is wrong.
    """
    records, raw_names, pos, end = [], [], 0, len(directory)
    unpack = _CD_ENTRY.unpack_from
    try:
        while pos < end:
            record = unpack(directory, pos)
            name_end = pos + _CD_ENTRY.size + record[6]
            records.append(record)
            raw_names.append(directory[pos + _CD_ENTRY.size : name_end])
            pos = name_end + record[7] + record[8]
    except struct.error:  # an entry cut short
        return None
    if pos != end or any(r[0] != _CD_SIGNATURE or 0xFFFFFFFF in (r[4], r[5], r[9]) for r in records):
        return None
    utf8 = [bool(r[1] & 0x800) for r in records]  # flag bit 11: the name is UTF-8, else code page 437
    try:
        if not any(utf8) or all(utf8):  # one decode for them all: a name cannot hold a NUL (zipfile cuts it there)
            joined = b"\0".join(n.split(b"\0", 1)[0] for n in raw_names)
            names = joined.decode("utf-8" if any(utf8) else "cp437").split("\0")
        else:
            names = [n.split(b"\0", 1)[0].decode("utf-8" if u else "cp437") for n, u in zip(raw_names, utf8)]
    except UnicodeDecodeError:
        return None
    return [_Member(name, r[1], r[2], r[3], r[4], r[5], r[9]) for name, r in zip(names, records)]


MAX_MEMBER_BYTES = 256 * 1024 * 1024  # one zip member, inflated: far above any photo, far below a zip bomb
MAX_RATIO = 100  # inflated / stored size of a member over RATIO_FROM bytes: photos deflate about 1:1, bombs 1000:1
RATIO_FROM = 8 * 1024 * 1024  # below this a member is inflated whatever its ratio (a flat-coloured BMP may be 300:1)


class ZipSource(ImageSource):
    """A zip file read in place: stored members are sliced from a memory map."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self._zip: zipfile.ZipFile | None = None
        self._zip_pid = os.getpid()
        directory = zip_central_directory(self.path)
        members = None if directory is None else _parse_members(directory)
        if members is None:
            members = [_Member(i.filename, i.flag_bits, i.compress_type, i.CRC, i.compress_size, i.file_size,
                               i.header_offset) for i in self._own_zip().infolist()]
        self._members: dict[str, _Member] = {}
        self._dirs: set[str] = set()
        for member in members:
            name = member.zip_name.replace("\\", "/").lstrip("/")
            if member.zip_name.endswith("/"):
                self._dirs.add(name.rstrip("/"))
            elif name:
                self._members[name] = member
        above: set[str] = set()  # every folder above a file, walked up until one already walked
        for name in self._members:
            parent = name.rpartition("/")[0]
            while parent and parent not in above:
                above.add(parent)
                parent = parent.rpartition("/")[0]
        self._dirs |= above
        self._file = open(self.path, "rb")
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_READ)

    def files(self) -> list[str]:
        return sorted(self._members)

    def dirs(self) -> set[str]:
        return set(self._dirs)

    def members(self) -> dict[str, _Member]:
        """Relative path to the member's central-directory fields."""
        return dict(self._members)

    def read(self, rel: str) -> bytes:
        member = self._members[rel]
        if member.file_size > MAX_MEMBER_BYTES:
            raise OSError(f"zip member inflates to {member.file_size:,} bytes, over the limit of "
                          f"{MAX_MEMBER_BYTES:,} for one image (a zip bomb, or not an image)")
        if member.file_size > RATIO_FROM and member.file_size > MAX_RATIO * max(member.compress_size, 1):
            raise OSError(f"zip member inflates {member.file_size / max(member.compress_size, 1):,.0f} times over "
                          f"(to {member.file_size:,} bytes), over the limit of {MAX_RATIO} times for a member of "
                          f"more than {RATIO_FROM // 2**20} MiB (a zip bomb, or not a photo)")
        try:
            if member.method in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED) and not member.flags & 0x1:
                return self._read_mapped(member)
            with self._own_zip().open(member.zip_name) as fh:
                data = fh.read(member.file_size + 1)  # never more than the declared size (+1 to see a lie)
        except (zipfile.BadZipFile, RuntimeError, NotImplementedError, zlib.error, EOFError) as exc:
            raise OSError(f"cannot read the zip member: {exc}") from None
        if len(data) != member.file_size:
            raise OSError("zip member is damaged (its size differs from the size the zip declares)")
        return data

    def _read_mapped(self, member: _Member) -> bytes:
        # Sliced from the memory map: no file position is shared, so threads
        # and forked processes can read at once.  The local header is 30
        # bytes, then a name and an extra field whose lengths may differ from
        # the central directory's copies.
        start = member.offset
        header = self._map[start : start + 30]
        if len(header) < 30 or header[:4] != b"PK\x03\x04":
            raise OSError("zip member has no valid local header")
        name_len, extra_len = struct.unpack("<HH", header[26:30])
        begin = start + 30 + name_len + extra_len
        data = self._map[begin : begin + member.compress_size]
        if member.method == zipfile.ZIP_DEFLATED:
            # Inflate at most the declared size (+1 to see a lie): a member whose header understates its size
            # stops there instead of filling memory.
            data = zlib.decompressobj(-15).decompress(data, member.file_size + 1)
        if len(data) != member.file_size or zlib.crc32(data) != member.crc:
            raise OSError("zip member is damaged (CRC mismatch)")
        return data

    def _own_zip(self) -> zipfile.ZipFile:
        # Opened when first needed (a member that is encrypted or compressed otherwise, or a central
        # directory that _parse_members leaves to zipfile).  A ZipFile's file position is shared with
        # forked children: each process opens its own.
        if self._zip is None or self._zip_pid != os.getpid():
            try:
                self._zip = zipfile.ZipFile(self.path)
            except (zipfile.BadZipFile, OSError) as exc:
                raise DataError(f"{self.path}: cannot be read as a zip file ({exc})") from None
            self._zip_pid = os.getpid()
        return self._zip

    def close(self) -> None:
        self._map.close()
        self._file.close()
        if self._zip is not None:
            self._zip.close()


def open_source(path: str | os.PathLike, follow_links: bool = False) -> ImageSource:
    """Open a folder or a zip file as an :class:`ImageSource`.

    ``follow_links``: follow links that lead out of a folder (see :class:`FolderSource`).

    Raises:
        DataError: the path does not exist, or is a file that is not a zip.
    """
    path = Path(path).expanduser()
    if path.is_dir():
        return FolderSource(path, follow_links)
    if not path.exists():
        raise DataError(f"{path}: no such folder or zip file")
    if path.is_file() and zipfile.is_zipfile(path):
        return ZipSource(path)
    if path.is_file() and path.stat().st_size == 0:
        raise DataError(f"{path}: the file is empty (0 bytes); give a folder of class folders or a .zip of one")
    if path.is_file() and _looks_like_zip(path):
        raise DataError(f"{path}: a zip file whose end (the list of its members) is missing or damaged, so it "
                        "cannot be read: it was probably cut short while downloading or copying; copy or zip it again")
    raise DataError(f"{path}: not a folder or a zip file; give a folder of class folders or a .zip of one")


def _looks_like_zip(path: Path) -> bool:
    """Whether a file that zipfile cannot open is named or begins like a zip (a truncated one, say)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return path.suffix.lower() == ".zip" or head == b"PK\x03\x04"


# ----------------------------------------------------------------------------
# Decoding many images


@dataclass(frozen=True)
class _Options:
    channels: int | None  # None: the image's own (1 if grayscale, else 3)
    size: tuple[int, int] | None  # None: see ref_size
    resize: str
    ref_size: tuple[int, int] | None = None  # with size None: other sizes go to FALLBACK_SIZE
    ref_channels: int | None = None  # with channels None: the first image's own (sizes the shared slots)


@dataclass
class _Chunk:
    """Consecutive files decoded together: the good arrays and a record per file.

    Attributes:
        arrays: the decoded images, in order; one (n, H, W, C) array when
            they share a shape (one array crosses a process boundary far
            faster than hundreds of small ones).
        gray: per file, whether the image had no colour.
        native: per file, (height, width) as decoded.
        errors: per file, why it could not be decoded, or None.
        slot: where a worker wrote ``arrays`` in the shared slots (the index
            of the chunk's first image), in which case it returns them empty.
    """

    arrays: np.ndarray | list[np.ndarray]
    gray: list[bool]
    native: list[tuple[int, int]]
    errors: list[str | None]
    slot: int | None = None


def _decode_one(source: ImageSource, rel: str, opts: _Options):
    """Return (array or None, grayscale, (height, width), error or None)."""
    shown = source.display(rel)
    try:
        data = source.read(rel)
        want = opts.size or opts.ref_size
        fast = decode_jpeg_array(data, opts.channels, want) or decode_png_array(data, opts.channels, want)
        if fast is not None:
            return fast[0], fast[1], fast[0].shape[:2], None
        img = decode_image(data, shown, target=opts.size, resize=opts.resize)
        gray = is_grayscale_mode(img)
        native = (img.height, img.width)
        size = opts.size
        if size is None and opts.ref_size is not None and native != opts.ref_size:
            size = FALLBACK_SIZE  # sizes vary: resized now, the rest at the end
        return to_array(img, opts.channels or (1 if gray else 3), size, opts.resize), gray, native, None
    except BadImageError as exc:
        return None, False, (0, 0), str(exc).removeprefix(f"{shown}: ")
    except (DataError, OSError) as exc:
        return None, False, (0, 0), str(exc)


def _decode_chunk(source: ImageSource, rels: list[str], opts: _Options) -> _Chunk:
    chunk = _Chunk([], [], [], [])
    for rel in rels:
        array, gray, native, error = _decode_one(source, rel, opts)
        if array is not None:
            chunk.arrays.append(array)
        chunk.gray.append(gray)
        chunk.native.append(native)
        chunk.errors.append(error)
    if chunk.arrays and len({a.shape for a in chunk.arrays}) == 1:
        chunk.arrays = np.stack(chunk.arrays)
    return chunk


class _SharedSlots:
    """A shared memory map with a slot per image, made before the decode workers fork.

    A worker copies each chunk it decodes into the chunk's slots when every
    image came out at the slots' shape, and sends back only the per-file
    records.  Pickling CIFAR-10's 184 MB of pixels back through the pool's
    pipes and joining the pieces took about 0.5 s of a 1.6 s decode on 2
    cores; a group whose chunks all landed in their slots is then one view of
    the map, with nothing copied.  Chunks that did not fit (a damaged file, an
    image of another size or channel count) come back as before.
    """

    def __init__(self, count: int, shape: tuple[int, int, int]) -> None:
        self.shape = shape
        self.per_image = shape[0] * shape[1] * shape[2]
        # Anonymous and shared: what the forked workers write, the parent reads.  Untouched slots cost no memory.
        self.buffer = mmap.mmap(-1, max(count * self.per_image, 1))

    def view(self, start: int, count: int) -> np.ndarray:
        return np.frombuffer(self.buffer, np.uint8, count * self.per_image, start * self.per_image).reshape(
            count, *self.shape)

    def put(self, start: int, chunk: _Chunk) -> bool:
        """Copy ``chunk``'s images into their slots if each decoded at the slots' shape."""
        arrays = chunk.arrays
        if not isinstance(arrays, np.ndarray) or arrays.shape != (len(chunk.errors), *self.shape):
            return False
        self.view(start, len(arrays))[:] = arrays
        return True


# A forked worker process keeps the parent's open source and shared slots: its only state.
_WORKER_SOURCE: ImageSource | None = None
_WORKER_SLOTS: _SharedSlots | None = None


def _init_worker(source: ImageSource, slots: _SharedSlots | None = None) -> None:
    global _WORKER_SOURCE, _WORKER_SLOTS
    _WORKER_SOURCE, _WORKER_SLOTS = source, slots


def _decode_chunk_in_worker(rels: list[str], opts: _Options, start: int = 0) -> _Chunk:
    assert _WORKER_SOURCE is not None
    chunk = _decode_chunk(_WORKER_SOURCE, rels, opts)
    if _WORKER_SLOTS is not None and _WORKER_SLOTS.put(start, chunk):
        chunk.arrays, chunk.slot = np.empty((0, *_WORKER_SLOTS.shape), np.uint8), start
    return chunk


def default_workers() -> int:
    """Worker processes used for decoding: the CPUs this process may use."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def _make_executor(source: ImageSource, workers: int, slots: _SharedSlots | None) -> tuple[Executor, Callable, bool]:
    """(pool, task, whether the workers fill ``slots``)."""
    # Worker processes decode in parallel (small images spend most of their
    # time in Python, where threads queue on the GIL; 2 threads were slower
    # than 1 process on CIFAR-10).  fork starts them without re-running the
    # user's script and hands them the open source and the shared slots
    # (initargs are inherited, not pickled); elsewhere use threads.
    if sys.platform.startswith("linux") and "fork" in multiprocessing.get_all_start_methods():
        ctx = multiprocessing.get_context("fork")
        pool = ProcessPoolExecutor(workers, mp_context=ctx, initializer=_init_worker, initargs=(source, slots))
        return pool, _decode_chunk_in_worker, slots is not None
    return ThreadPoolExecutor(workers), lambda rels, opts, start: _decode_chunk(source, rels, opts), False


def _slot_shape(opts: _Options) -> tuple[int, int, int] | None:
    """The shape most images will decode to, if known before decoding."""
    size, channels = opts.size or opts.ref_size, opts.channels or opts.ref_channels
    return None if size is None or channels is None else (size[0], size[1], channels)


def decode_all(
    source: ImageSource,
    groups: list[list[str]],
    opts: _Options,
    *,
    workers: int | None = None,
    progress: bool = False,
) -> list[list[_Chunk]]:
    """Decode each group of files of ``source``, in parallel when there are many.

    A daemonic process (a DataLoader or pool worker) may not start processes
    of its own, so it decodes inline.

    Returns:
        Per group, its chunks in file order.
    """
    workers = default_workers() if workers is None else max(1, workers)
    tasks, start = [], 0  # (group, files, index of the first file over all groups)
    for g, rels in enumerate(groups):
        for i in range(0, len(rels), _CHUNK):
            tasks.append((g, rels[i : i + _CHUNK], start))
            start += len(tasks[-1][1])
    total = start
    done: list[_Chunk | None] = [None] * len(tasks)
    bar = _progress_bar(total) if progress else contextlib.nullcontext()
    slots = None
    if workers == 1 or total < _PARALLEL_MIN or multiprocessing.current_process().daemon:
        with bar:
            for i, (_, rels, _) in enumerate(tasks):
                done[i] = _decode_chunk(source, rels, opts)
                _advance(bar, len(rels))
    else:
        shape = _slot_shape(opts)
        slots = None if shape is None else _SharedSlots(total, shape)
        pool, task, filled = _make_executor(source, workers, slots)
        slots = slots if filled else None
        try:
            futures = {pool.submit(task, rels, opts, first): i for i, (_, rels, first) in enumerate(tasks)}
            with bar:
                for future in as_completed(futures):
                    i = futures[future]
                    done[i] = future.result()
                    _advance(bar, len(tasks[i][1]))
        finally:  # on Ctrl-C or an error, drop the queued chunks instead of decoding them
            pool.shutdown(wait=True, cancel_futures=True)
    out: list[list[_Chunk]] = [[] for _ in groups]
    for (g, _, _), chunk in zip(tasks, done):
        out[g].append(chunk)
    return [_from_slots(group, slots) for group in out] if slots is not None else out


def _from_slots(chunks: list[_Chunk], slots: _SharedSlots) -> list[_Chunk]:
    """Give the chunks written to ``slots`` their images back, as views of the shared map.

    A group whose every chunk is there becomes one chunk holding one view of
    the whole group, which :func:`_assemble` passes through without a copy.
    """
    if chunks and all(c.slot is not None for c in chunks):
        merged = _Chunk(slots.view(chunks[0].slot, sum(len(c.errors) for c in chunks)), [], [], [],
                        slot=chunks[0].slot)
        for c in chunks:
            merged.gray += c.gray
            merged.native += c.native
            merged.errors += c.errors
        return [merged]
    for c in chunks:
        if c.slot is not None:
            c.arrays = slots.view(c.slot, len(c.errors))
    return chunks


def _progress_bar(total: int):
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeRemainingColumn,
    )

    bar = Progress(TextColumn("decoding images"), BarColumn(), MofNCompleteColumn(), TimeRemainingColumn())
    bar.add_task("decode", total=total)
    return bar


def _advance(bar, n: int) -> None:
    if not isinstance(bar, contextlib.nullcontext):
        bar.advance(bar.task_ids[0], n)


def _first_native_shape(source: ImageSource, rels: list[str]) -> tuple[tuple[int, int] | None, int | None]:
    """(height, width) and channel count (1 or 3) of the first image that opens: a reference for the rest."""
    for rel in rels:
        try:
            img = decode_image(source.read(rel), source.display(rel))
        except (BadImageError, OSError):
            continue
        return (img.height, img.width), 1 if is_grayscale_mode(img) else 3
    return None, None


def _choose_shape(chunks: list[_Chunk], channels: int | None, size: tuple[int, int] | None, resize: str):
    """Pick the channels and size every image is brought to.

    Returns:
        (channels, (height, width), notes): what was chosen and why.
    """
    good = [(g, n) for c in chunks for g, n, e in zip(c.gray, c.native, c.errors) if e is None]
    notes = []
    if channels is None:
        channels = 1 if all(g for g, _ in good) else 3
    if size is None:
        natives = {n for _, n in good}
        if len(natives) <= 1:
            size = next(iter(natives), FALLBACK_SIZE)
        else:
            size = FALLBACK_SIZE
            (lo_h, lo_w), (hi_h, hi_w) = min(natives), max(natives)
            notes.append(
                f"image sizes varied ({len(natives)} different, from {lo_h}x{lo_w} to {hi_h}x{hi_w}); "
                f"all were resized to {size[0]}x{size[1]} ({resize}); choose another size with --image-size"
            )
    return channels, size, notes


def _assemble(chunks: list[_Chunk], channels: int, size: tuple[int, int], resize: str) -> np.ndarray:
    """Concatenate the chunks' images, brought to (N, height, width, channels)."""
    shape = (size[0], size[1], channels)
    parts = []
    for chunk in chunks:
        arrays = chunk.arrays
        if isinstance(arrays, list) or arrays.shape[1:3] != size:
            arrays = np.stack([_conform(a, channels, size, resize) for a in arrays]) if len(arrays) else None
        if arrays is None:
            continue
        if arrays.shape[3] != channels:  # grayscale images among colour ones
            arrays = np.repeat(arrays, channels, axis=3)
        parts.append(arrays)
    if len(parts) == 1:
        return parts[0]  # one chunk (or one group from the shared slots): nothing to join
    return np.concatenate(parts) if parts else np.empty((0, *shape), dtype=np.uint8)


def _conform(array: np.ndarray, channels: int, size: tuple[int, int], resize: str) -> np.ndarray:
    """Bring one decoded (H, W, C) uint8 array to ``size`` and ``channels``."""
    if array.shape[:2] != size:
        img = Image.fromarray(array[..., 0] if array.shape[2] == 1 else array)
        array = np.asarray(resize_image(img, size, resize)).reshape(size[0], size[1], -1)
    return array if array.shape[2] == channels else np.repeat(array, channels, axis=2)


def _check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"image size must be positive, got {h}x{w}")
    return (h, w)


# ----------------------------------------------------------------------------
# Public entry points


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
    image_size = _check_size(image_size)
    with open_source(path, follow_links) as source:
        where = str(source.path)
        layout = detect_layout(source.files(), source.dirs(), where)
        groups = [[rel for rel, _ in items] for items in layout.items.values()]
        ref_size, ref_channels = _first_native_shape(source, [r for g in groups for r in g])
        opts = _Options(channels, image_size, resize, None if image_size is not None else ref_size, ref_channels)
        chunks = decode_all(source, groups, opts, workers=workers, progress=progress)
        skipped = [SkippedFile(source.display(s.path), s.reason) for s in layout.skipped + source.skipped()]
        bad, kept = [], {}
        for (name, items), group in zip(layout.items.items(), chunks):
            errors = [e for chunk in group for e in chunk.errors]
            bad += [SkippedFile(source.display(rel), e) for (rel, _), e in zip(items, errors) if e is not None]
            kept[name] = [(source.display(rel), label) for (rel, label), e in zip(items, errors) if e is None]
    if bad and on_bad_image == "error":
        listed = "\n".join(f"  {b.path}: {b.reason}" for b in bad)
        raise DataError(f"{where}: {len(bad)} image(s) could not be decoded (on_bad_image='error'):\n{listed}")
    check_not_empty(Layout(layout.classes, kept, layout.folders), where, bad)
    channels, size, notes = _choose_shape([c for group in chunks for c in group], channels, image_size, resize)
    splits = {}
    for (name, items), group in zip(kept.items(), chunks):
        labels = np.array([label for _, label in items], dtype=np.int64)
        splits[name] = Split(_assemble(group, channels, size, resize), labels, [p for p, _ in items])
    line = describe_layout(layout, {name: len(items) for name, items in kept.items()})
    return ImageDataset(where, layout.classes, splits, skipped, bad, layout.notes + notes, layout=line)


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
    size = _check_size(size)
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
        (group,) = decode_all(source, [rels], _Options(channels, size, resize))
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
