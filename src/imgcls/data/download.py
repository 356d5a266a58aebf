"""Download files with a known md5, safely and with errors a person can act on.

A file is streamed to a temporary name next to its destination and only
renamed to the final name once its checksum matches, so a file under the final
name is always complete.  When every URL fails (offline machine, dead link),
the error says where to put the file by hand and what its md5 must be.

Mirrors: ``$IMGCLS_DATASET_MIRROR`` or a ``mirror`` argument is a base URL
that is tried before the official URLs, with the file name appended.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import logging
import os
import secrets
import sys
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path

from imgcls.errors import DownloadError

MIRROR_ENV = "IMGCLS_DATASET_MIRROR"
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


def resolve_mirror(mirror: str | None = None) -> str | None:
    """Return the mirror base URL: ``mirror`` if given, else ``$IMGCLS_DATASET_MIRROR``."""
    return mirror or os.environ.get(MIRROR_ENV) or None


def join_url(base: str, name: str) -> str:
    """Append ``name`` to the base URL ``base`` with exactly one slash."""
    return base.rstrip("/") + "/" + name


def compute_md5(path: Path) -> str:
    """Return the hex md5 of the file at ``path``."""
    digest = hashlib.md5()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(CHUNK_BYTES), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fetch_file(
    name: str,
    urls: list[str],
    dest: Path,
    md5: str,
    mirror: str | None = None,
    timeout: float = TIMEOUT_S,
) -> Path:
    """Make sure ``dest`` holds the file with checksum ``md5``, downloading it if needed.

    Args:
        name: the file's name, used in messages and appended to the mirror URL.
        urls: full URLs of the file, tried in order after the mirror.
        dest: where the file must end up.
        md5: its expected hex md5.
        mirror: a base URL tried first; defaults to ``$IMGCLS_DATASET_MIRROR``.
        timeout: seconds to wait on a silent connection.

    Returns:
        ``dest``.

    Raises:
        DownloadError: no URL gave a file with the right checksum.
    """
    dest = Path(dest)
    md5 = md5.lower()
    corrupt_md5 = None
    if dest.exists():
        actual = compute_md5(dest)
        if actual == md5:
            return dest
        corrupt_md5 = actual
        logger.warning("%s at %s has md5 %s, expected %s; downloading it again", name, dest, actual, md5)
    base = resolve_mirror(mirror)
    candidates = ([join_url(base, name)] if base else []) + list(urls)
    dest.parent.mkdir(parents=True, exist_ok=True)
    failures = []
    for url in candidates:
        try:
            download_verified(url, dest, md5, timeout)
            return dest
        except DownloadError as error:
            failures.append((url, str(error)))
    raise DownloadError(describe_failure(name, dest, md5, failures, corrupt_md5))


def describe_failure(
    name: str, dest: Path, md5: str, failures: list[tuple[str, str]], corrupt_md5: str | None
) -> str:
    """Build the message for a file no URL could supply: what failed and how to fix it by hand."""
    lines = [f"could not download {name}"]
    if corrupt_md5 is not None:
        lines.append(f"the existing file at {dest} is corrupt (md5 {corrupt_md5}, expected {md5})")
    if failures:
        lines.append("tried:")
        lines.extend(f"  {url}: {reason}" for url, reason in failures)
    else:
        lines.append("no URL to try (no official URL and no mirror set)")
    lines.append(f"to install it by hand, put the file at {dest} (expected md5 {md5})")
    lines.append(f"or set ${MIRROR_ENV} to a base URL that serves it")
    return "\n".join(lines)


def download_verified(url: str, dest: Path, md5: str, timeout: float) -> None:
    """Stream ``url`` to a temporary file next to ``dest``; rename it to ``dest`` if its md5 matches.

    The temporary file is removed on every path that does not end in the
    rename, including KeyboardInterrupt, so no partial file is left behind.

    Raises:
        DownloadError: the URL could not be read or gave a different checksum.
    """
    temp = dest.with_name(f"{dest.name}.part-{secrets.token_hex(4)}")
    try:
        actual = stream_to(url, temp, timeout)
        if actual != md5:
            raise DownloadError(f"checksum mismatch for {dest.name} from {url}: expected md5 {md5}, got {actual}")
        os.replace(temp, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            temp.unlink()


def stream_to(url: str, path: Path, timeout: float) -> str:
    """Write the body of ``url`` to the new file ``path``, fsync it, and return its md5."""
    request = urllib.request.Request(url, headers={"User-Agent": USER_AGENT})
    digest = hashlib.md5()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response, open(path, "xb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with show_progress(path.name.split(".part-")[0], total) as advance:
                for chunk in iter(lambda: response.read(CHUNK_BYTES), b""):
                    digest.update(chunk)
                    out.write(chunk)
                    advance(len(chunk))
            out.flush()
            # The rename that follows must not expose a file whose bytes are not on disk yet.
            os.fsync(out.fileno())
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
