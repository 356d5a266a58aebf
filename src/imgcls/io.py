"""Files written whole or not at all, and JSON read back: the package's only helpers for both.

A file under its final name is always complete: it is written to a
temporary file in the same folder (so the rename cannot cross file systems),
flushed to disk, and renamed over the final name.  A failure on the way,
Ctrl-C included, removes the temporary file and leaves whatever was under the
final name before.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike, *, fsync: bool = True) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed over ``path`` when the ``with`` block ends normally.

    ``fsync``: flush the file to disk before the rename, so that a crash
    cannot leave a final name over bytes that never reached the disk (a
    cache entry that can be rebuilt may skip it).
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        if fsync:
            with open(tmp, "rb+") as fh:
                os.fsync(fh.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_atomic(path: str | os.PathLike, data: str | bytes, *, fsync: bool = True) -> Path:
    """Write ``data`` (text as UTF-8, or bytes) to ``path`` whole or not at all; returns ``path``."""
    with atomic_path(path, fsync=fsync) as tmp:
        if isinstance(data, bytes):
            tmp.write_bytes(data)
        else:
            tmp.write_text(data, encoding="utf-8")
    return Path(path)


def write_npy(path: str | os.PathLike, array, *, fsync: bool = True) -> Path:
    """Write one numpy array as ``.npy`` (no pickles), whole or not at all; returns ``path``."""
    import numpy as np  # start-up time: the JSON and text writers need no numpy

    with atomic_path(path, fsync=fsync) as tmp, open(tmp, "wb") as fh:
        np.save(fh, np.ascontiguousarray(array), allow_pickle=False)
    return Path(path)


def write_npz(path: str | os.PathLike, arrays: dict) -> Path:
    """Write ``arrays`` (name -> numpy array) as one compressed ``.npz``, whole or not at all; returns ``path``."""
    import numpy as np  # start-up time: the JSON and text writers need no numpy

    with atomic_path(path) as tmp, open(tmp, "wb") as fh:
        np.savez_compressed(fh, **arrays)
    return Path(path)


def write_json(path: str | os.PathLike, obj: Any) -> Path:
    """Write ``obj`` as indented JSON with a final newline, atomically; returns ``path``."""
    return write_atomic(path, json.dumps(obj, indent=2) + "\n")


def read_json(path: str | os.PathLike, default: Any = None) -> Any:
    """The JSON document at ``path``, or ``default`` when there is no such file.

    A file that is there but is not JSON raises ``json.JSONDecodeError``
    (a ``ValueError``), so damage is never mistaken for absence.
    """
    path = Path(path)
    if not path.is_file():
        return default
    return json.loads(path.read_text(encoding="utf-8"))
