"""Decoding many images of a source at once: in worker processes, into shared memory, to one shape.

:func:`decode_all` decodes groups of files (one per split) in chunks, in
forked worker processes when there are many; the workers write straight into
a shared memory map when the images' shape is known, so pixels never cross a
pipe.  :func:`choose_shape` and :func:`assemble` then bring every image to
one size and channel count.
"""

from __future__ import annotations

import contextlib
import mmap
import multiprocessing
import sys
from concurrent.futures import (
    Executor,
    ProcessPoolExecutor,
    ThreadPoolExecutor,
    as_completed,
)
from dataclasses import dataclass
from typing import Callable

import numpy as np
from PIL import Image

from imgcls.data.images import (
    BadImageError,
    decode_image,
    decode_jpeg_array,
    decode_png_array,
    is_grayscale_mode,
    resize_image,
    to_array,
)
from imgcls.data.sources import ImageSource
from imgcls.errors import ConfigError, DataError
from imgcls.startup import usable_cores

FALLBACK_SIZE = (64, 64)
"""(height, width) used when images differ in size and none was asked for."""

_CHUNK = 512  # images per task handed to a worker
_PARALLEL_MIN = 2048  # fewer images than this are decoded in this process


@dataclass(frozen=True)
class DecodeOptions:
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


def _decode_one(source: ImageSource, rel: str, opts: DecodeOptions):
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


def _decode_chunk(source: ImageSource, rels: list[str], opts: DecodeOptions) -> _Chunk:
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


def _decode_chunk_in_worker(rels: list[str], opts: DecodeOptions, start: int = 0) -> _Chunk:
    assert _WORKER_SOURCE is not None
    chunk = _decode_chunk(_WORKER_SOURCE, rels, opts)
    if _WORKER_SLOTS is not None and _WORKER_SLOTS.put(start, chunk):
        chunk.arrays, chunk.slot = np.empty((0, *_WORKER_SLOTS.shape), np.uint8), start
    return chunk


def default_workers() -> int:
    """Worker processes used for decoding: the CPUs this process may use."""
    return usable_cores()


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


def _slot_shape(opts: DecodeOptions) -> tuple[int, int, int] | None:
    """The shape most images will decode to, if known before decoding."""
    size, channels = opts.size or opts.ref_size, opts.channels or opts.ref_channels
    return None if size is None or channels is None else (size[0], size[1], channels)


def decode_all(
    source: ImageSource,
    groups: list[list[str]],
    opts: DecodeOptions,
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
    the whole group, which :func:`assemble` passes through without a copy.
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


def first_native_shape(source: ImageSource, rels: list[str]) -> tuple[tuple[int, int] | None, int | None]:
    """(height, width) and channel count (1 or 3) of the first image that opens: a reference for the rest."""
    for rel in rels:
        try:
            img = decode_image(source.read(rel), source.display(rel))
        except (BadImageError, OSError):
            continue
        return (img.height, img.width), 1 if is_grayscale_mode(img) else 3
    return None, None


def choose_shape(chunks: list[_Chunk], channels: int | None, size: tuple[int, int] | None, resize: str):
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


def assemble(chunks: list[_Chunk], channels: int, size: tuple[int, int], resize: str) -> np.ndarray:
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


def check_size(size) -> tuple[int, int] | None:
    if size is None:
        return None
    try:
        h, w = (int(v) for v in size)
    except (TypeError, ValueError):
        raise ConfigError(f"image size must be (height, width), got {size!r}") from None
    if h < 1 or w < 1:
        raise ConfigError(f"image size must be positive, got {h}x{w}")
    return (h, w)
