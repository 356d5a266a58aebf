"""Download files with a known checksum, safely and with errors a person can act on.

A file is streamed to a temporary name next to its destination and only
renamed to the final name once its checksum matches, so a file under the final
name is always complete.  When every URL fails (offline machine, dead link),
the error says where to put the file by hand and what its checksum must be.

A checksum (:class:`Checksum`) is an md5, as the datasets publish them, or a
SHA-256 in full or as a prefix of at least 8 hex digits, as torch.hub's file
names carry one (``resnet18-f37072fd.pth``).  As text: ``"<md5>"``,
``"md5:<md5>"`` or ``"sha256:<hex>"``.

Mirrors: a ``mirror`` argument or the caller's environment variable
(``$IMGCLS_DATASET_MIRROR`` for datasets, ``$IMGCLS_WEIGHTS_MIRROR`` for
pretrained weights) is a base URL that is tried before the official URLs,
with the file name appended.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import string
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from imgcls.errors import DownloadError
from imgcls.io import atomic_path

MIRROR_ENV = "IMGCLS_DATASET_MIRROR"
WEIGHTS_MIRROR_ENV = "IMGCLS_WEIGHTS_MIRROR"  # the same, for pretrained weights' original files
DATA_DIR_ENV = "IMGCLS_DATA_DIR"
TIMEOUT_S = 30.0  # seconds without a byte before a URL is given up
CHUNK_BYTES = 1 << 20  # read size while streaming and hashing
USER_AGENT = "imgcls (dataset download; +https://pypi.org/project/imgcls/)"

logger = logging.getLogger(__name__)


def data_dir() -> Path:
    """Return the folder datasets are downloaded to.

    ``$IMGCLS_DATA_DIR`` if set, else ``$XDG_CACHE_HOME/imgcls``, else
    ``~/.cache/imgcls``.  The folder is not created here.
    """
    explicit = os.environ.get(DATA_DIR_ENV)
    if explicit:
        return Path(explicit).expanduser()
    cache = os.environ.get("XDG_CACHE_HOME")
    base = Path(cache).expanduser() if cache else Path.home() / ".cache"
    return base / "imgcls"


def resolve_mirror(mirror: str | None = None, env: str = MIRROR_ENV) -> str | None:
    """Return the mirror base URL: ``mirror`` if given, else the environment variable ``env``."""
    return mirror or os.environ.get(env) or None


def join_url(base: str, name: str) -> str:
    """Append ``name`` to the base URL ``base`` with exactly one slash."""
    return base.rstrip("/") + "/" + name


# Hex digits of a full digest, per algorithm a checksum may use.
DIGEST_DIGITS = {"md5": 32, "sha256": 64}
MIN_PREFIX_DIGITS = 8  # a SHA-256 prefix shorter than torch.hub's 8 hex digits is refused


@dataclass(frozen=True)
class Checksum:
    """An expected digest: an md5 in full, or a SHA-256 in full or as a prefix.

    Attributes:
        algorithm: ``"md5"`` or ``"sha256"`` (a :mod:`hashlib` name).
        digest: lower-case hex; for SHA-256 the first 8 to 64 digits.
    """

    algorithm: str
    digest: str

    def __post_init__(self) -> None:
        full = DIGEST_DIGITS.get(self.algorithm)
        if full is None:
            raise ValueError(f"unknown checksum algorithm {self.algorithm!r}; use one of {', '.join(DIGEST_DIGITS)}")
        shortest = full if self.algorithm == "md5" else MIN_PREFIX_DIGITS
        if not (shortest <= len(self.digest) <= full and set(self.digest) <= set(string.hexdigits.lower())):
            accepted = f"{full}" if shortest == full else f"{shortest} to {full}"
            raise ValueError(f"bad {self.algorithm} checksum {self.digest!r}: give {accepted} lower-case hex digits")

    @classmethod
    def parse(cls, text: str | Checksum) -> Checksum:
        """``"<32 hex>"`` or ``"md5:<32 hex>"``: an md5; ``"sha256:<8 to 64 hex>"``: a SHA-256 or its prefix."""
        if isinstance(text, Checksum):
            return text
        algorithm, _, digest = text.strip().lower().rpartition(":")
        return cls(algorithm or "md5", digest)

    def matches(self, actual: str) -> bool:
        """Whether the full hex digest ``actual`` (of :attr:`algorithm`) has this checksum."""
        return len(actual) == DIGEST_DIGITS[self.algorithm] and actual.startswith(self.digest)

    def __str__(self) -> str:
        if len(self.digest) == DIGEST_DIGITS[self.algorithm]:
            return f"{self.algorithm} {self.digest}"
        return f"{self.algorithm} starting {self.digest}"


def compute_digest(path: Path, algorithm: str = "md5") -> str:
    """Return the hex digest (``algorithm``, a :mod:`hashlib` name) of the file at ``path``."""
    digest = hashlib.new(algorithm)
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def compute_md5(path: Path) -> str:
    """Return the hex md5 of the file at ``path``."""
    return compute_digest(path, "md5")


def fetch_file(
    name: str,
    urls: list[str],
    dest: Path,
    checksum: str | Checksum,
    mirror: str | None = None,
    timeout: float = TIMEOUT_S,
    mirror_env: str = MIRROR_ENV,
) -> Path:
    """Make sure ``dest`` holds the file with ``checksum``, downloading it if needed.

    Args:
        name: the file's name, used in messages and appended to the mirror URL.
        urls: full URLs of the file, tried in order after the mirror.
        dest: where the file must end up.
        checksum: its expected checksum: a hex md5, ``"sha256:<hex>"`` (full
            or a prefix of at least 8 digits), or a :class:`Checksum`.
        mirror: a base URL tried first; defaults to ``$<mirror_env>``.
        timeout: seconds to wait on a silent connection.
        mirror_env: the environment variable that names a mirror
            (``IMGCLS_DATASET_MIRROR`` or ``IMGCLS_WEIGHTS_MIRROR``).

    Returns:
        ``dest``.

    Raises:
        DownloadError: no URL gave a file with the right checksum.
    """
    dest = Path(dest)
    checksum = Checksum.parse(checksum)
    corrupt = None
    if dest.exists():
        actual = compute_digest(dest, checksum.algorithm)
        if checksum.matches(actual):
            return dest
        corrupt = f"{checksum.algorithm} {actual}"
        logger.warning("%s at %s has %s, expected %s; downloading it again", name, dest, corrupt, checksum)
    base = resolve_mirror(mirror, mirror_env)
    candidates = ([join_url(base, name)] if base else []) + list(urls)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in candidates:
        try:
            download_verified(url, dest, checksum, timeout)
            return dest
        except DownloadError as error:
            failures.append((url, str(error)))
    raise DownloadError(describe_failure(name, dest, checksum, failures, corrupt, mirror_env))


def describe_failure(
    name: str, dest: Path, checksum: str | Checksum, failures: list[tuple[str, str]], corrupt: str | None,
    mirror_env: str = MIRROR_ENV,
) -> str:
    """Build the message for a file no URL could supply: what failed and how to fix it by hand.

    ``corrupt`` is the checksum of the file already at ``dest`` (``"md5 <hex>"``), if one is there.
    """
    checksum = Checksum.parse(checksum)
    lines = [f"could not download {name}"]
    if corrupt is not None:
        lines.append(f"the existing file at {dest} is corrupt ({corrupt}, expected {checksum})")
    if failures:
        lines.append("tried:")
        lines.extend(f"  {url}: {reason}" for url, reason in failures)
    else:
        lines.append("no URL to try (no official URL and no mirror set)")
    lines.append(f"to install it by hand, put the file at {dest} (expected {checksum})")
    lines.append(f"or set ${mirror_env} to a base URL that serves it")
    return "\n".join(lines)


def download_verified(url: str, dest: Path, checksum: str | Checksum, timeout: float) -> None:
    """Stream ``url`` to a temporary file next to ``dest``; rename it to ``dest`` if its checksum matches.

    The temporary file (:func:`imgcls.io.atomic_path`) is removed on every
    path that does not end in the rename, including KeyboardInterrupt, so no
    partial file is left behind.

    Raises:
        DownloadError: the URL could not be read or gave a different checksum.
    """
    checksum = Checksum.parse(checksum)
    with atomic_path(dest) as temp:
        actual = stream_to(url, temp, timeout, checksum.algorithm, label=dest.name)
        if not checksum.matches(actual):
            raise DownloadError(f"checksum mismatch for {dest.name} from {url}: expected {checksum}, "
                                f"got {checksum.algorithm} {actual}")


def stream_to(url: str, path: Path, timeout: float, algorithm: str = "md5", label: str | None = None) -> str:
    """Write the body of ``url`` to ``path`` and return its hex digest (``algorithm``); ``label`` names the
    progress bar (default: the file's name)."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.new(algorithm)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with show_progress(label or path.name, total) as advance:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
    except urllib.error.HTTPError as error:
        raise DownloadError(f"HTTP {error.code} {error.reason}") from error
    except urllib.error.URLError as error:
        raise DownloadError(str(error.reason)) from error
    except (OSError, http.client.HTTPException, ValueError) as error:
        raise DownloadError(f"{type(error).__name__}: {error}") from error
    return digest.hexdigest()


@contextlib.contextmanager
def show_progress(label: str, total: int | None) -> Iterator[Callable[[int], None]]:
    """Yield a callable that advances a progress bar by a byte count.

    The bar is drawn with rich only when stderr is a terminal, so logs and
    test output stay clean.
    """
    if not sys.stderr.isatty():
        yield lambda n: None
        return
    from rich.progress import (  # only needed for a terminal
        DownloadColumn,
        Progress,
        TransferSpeedColumn,
    )

    columns = (*Progress.get_default_columns(), DownloadColumn(), TransferSpeedColumn())
    with Progress(*columns, transient=True) as progress:
        task = progress.add_task(f"downloading {label}", total=total)
        yield lambda n: progress.advance(task, n)
