"""What keeps a run's first seconds short: Python's cyclic garbage collector is paused while
torch is imported and while a dataset is loaded.

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


def import_paused(name: str) -> ModuleType:
    """Import the module ``name`` with the collector paused (see the module docstring)."""
    with collector_paused():
        return importlib.import_module(name)
