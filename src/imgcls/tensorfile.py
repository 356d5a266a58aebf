"""Safetensors files that carry a checksum of their own data, written atomically.

Used for what imgcls caches and must trust later: converted pretrained
weights and frozen-backbone features.  The SHA-256 of the tensors (names,
dtypes, shapes and bytes, in name order) goes into the file's metadata at
write time; :func:`load_checked` recomputes it and refuses a file whose data
no longer matches, so a damaged cache entry is detected and rebuilt instead of
trusted.  A file is written under a temporary name and renamed into place, so
a crash never leaves a half-written file under the final name.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import torch

from imgcls.io import atomic_path

DIGEST_KEY = "imgcls_tensor_sha256"


class DamagedFile(Exception):
    """A checked file that is missing its checksum, fails it, or cannot be read."""


def tensor_digest(tensors: dict[str, torch.Tensor]) -> str:
    """SHA-256 over every tensor's name, dtype, shape and bytes, in name order."""
    digest = hashlib.sha256()
    for name in sorted(tensors):
        t = tensors[name].detach().cpu().contiguous()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(memoryview(t.reshape(-1).view(torch.uint8).numpy()))
    return digest.hexdigest()


def save_checked(path: str | os.PathLike, tensors: dict[str, torch.Tensor], meta: dict[str, str] | None = None) -> Path:
    """Write ``tensors`` to ``path`` with their checksum in the metadata, atomically."""
    from safetensors.torch import save_file


    path = Path(path)
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={**(meta or {}), DIGEST_KEY: tensor_digest(tensors)})
    return path


def load_checked(path: str | os.PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a file written by :func:`save_checked`.

    Raises:
        DamagedFile: the file cannot be read, has no checksum, or its data no
            longer matches the checksum.
    """
    from safetensors import SafetensorError
    from safetensors.torch import load_file, safe_open

    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError, RuntimeError) as exc:
        raise DamagedFile(f"it cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None
    recorded = meta.get(DIGEST_KEY)
    if not recorded:
        raise DamagedFile("it has no checksum")
    if tensor_digest(tensors) != recorded:
        raise DamagedFile("its data does not match its checksum")
    return tensors, meta
