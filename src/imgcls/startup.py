"""What keeps a run's first seconds short, and the process-wide settings only entry points make.

Python's cyclic garbage collector is paused while torch is imported and while
a dataset is loaded (:func:`collector_paused`), and :func:`keep_freed_memory`
tunes glibc's malloc for a process that trains or predicts.

Both create hundreds of thousands of objects that live for the whole run
(torch's modules and functions; a zip's member list and a path per image), and
each growth of a quarter makes the collector walk every one of them again, to
free nothing.  Reference counting still frees everything else at once; a
cycle made in the block is collected by the first collection after it.

On the 2-core CPU, the fastest CIFAR-10 run from the zip spent 0.25-0.36 s in
collections before its epoch ended; with the pauses, 0.08-0.12 s, almost all
of it the one pass over the young objects after the import (``gc.callbacks``,
one-off).  Freezing those objects (``gc.freeze``) would save that too, but it
would also freeze whatever the caller had made before, for good.
"""

from __future__ import annotations

import gc
import importlib
import os
from contextlib import contextmanager
from types import ModuleType


@contextmanager
def collector_paused():
    """Run the block with the cyclic garbage collector off; its former state is restored after."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, else the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def import_paused(name: str) -> ModuleType:
    """Import the module ``name`` with the collector paused (see the module docstring)."""
    with collector_paused():
        return importlib.import_module(name)


# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD, _M_MMAP_THRESHOLD = -1, -3
_ALLOCATOR_TUNED = False


def keep_freed_memory() -> bool:
    """Let glibc's malloc reuse freed activation buffers instead of returning them to the system.

    By default glibc serves each allocation over 32 MiB with a fresh ``mmap``
    and unmaps it on free, so every training step page-faults its activations
    and gradients in again (about 270,000 faults a step for fastnet at batch
    1024); that took a fifth of the step time on the 2-core CPU.  Serving them
    from the heap, and keeping the heap's freed top, removes the faults.  The
    cost: memory freed after training stays with the process until it exits.

    Prediction gains as much: the fp32 test pass of a ``cifar10-fast`` model
    (6-view TTA, 10,000 images) took 62 s with glibc's default and 34 s with
    this (one-off, the 2-core CPU).

    It changes the whole process, so no library function calls it: the entry
    points do (every ``imgcls`` command, :func:`imgcls.api.train`,
    :func:`imgcls.api.cross_validate` and :func:`imgcls.serving.app.serve`),
    and a program or notebook that predicts through :func:`imgcls.load` opts
    in by calling it.  Once per process; a no-op off Linux glibc or when
    ``IMGCLS_MALLOC=system``.  Returns whether the setting is in force.
    """
    global _ALLOCATOR_TUNED
    if _ALLOCATOR_TUNED or os.environ.get("IMGCLS_MALLOC", "").lower() == "system":
        return _ALLOCATOR_TUNED
    try:
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        _ALLOCATOR_TUNED = bool(libc.mallopt(_M_MMAP_THRESHOLD, 2**30) and libc.mallopt(_M_TRIM_THRESHOLD, 2**31 - 1))
    except (OSError, AttributeError):
        _ALLOCATOR_TUNED = False
    return _ALLOCATOR_TUNED
