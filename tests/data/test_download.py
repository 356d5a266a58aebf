"""Tests for imgcls.data.download against a local HTTP server."""

from __future__ import annotations

import contextlib
import hashlib
import socket
from pathlib import Path

import pytest

from imgcls.data import download
from imgcls.data.download import data_dir, fetch_file
from imgcls.errors import DownloadError


@pytest.fixture(autouse=True)
def no_mirror(monkeypatch):
    monkeypatch.delenv(download.MIRROR_ENV, raising=False)


def closed_port_url(name: str) -> str:
    """A URL on a port nothing listens on, so the connection is refused at once."""
    with contextlib.closing(socket.socket()) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}/{name}"


def md5_of(data: bytes) -> str:
    return hashlib.md5(data).hexdigest()


def leftovers(folder: Path) -> list[str]:
    """Temporary files of a download (imgcls.io.atomic_path names them .<name>.<random>.tmp)."""
    return sorted(p.name for p in folder.iterdir() if p.name.endswith(".tmp") or ".part" in p.name)


PAYLOAD = bytes(range(256)) * 50


def test_data_dir_precedence(monkeypatch, tmp_path):
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path / "explicit"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert data_dir() == tmp_path / "explicit"
    monkeypatch.delenv("IMGCLS_DATA_DIR")
    assert data_dir() == tmp_path / "xdg" / "imgcls"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert data_dir() == tmp_path / "home" / ".cache" / "imgcls"


def test_downloads_and_verifies(server, tmp_path):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "cache" / "f.bin"
    assert fetch_file("f.bin", [f"{url}/f.bin"], dest, md5_of(PAYLOAD)) == dest
    assert dest.read_bytes() == PAYLOAD
    assert requests == ["/f.bin"]
    assert leftovers(dest.parent) == []


def test_existing_good_file_is_not_downloaded_again(server, tmp_path):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "f.bin"
    fetch_file("f.bin", [f"{url}/f.bin"], dest, md5_of(PAYLOAD))
    fetch_file("f.bin", [f"{url}/f.bin"], dest, md5_of(PAYLOAD))
    assert len(requests) == 1


def test_checksum_mismatch_leaves_nothing(server, tmp_path):
    url, served, _ = server
    corrupted = bytearray(PAYLOAD)
    corrupted[100] ^= 0xFF
    (served / "f.bin").write_bytes(bytes(corrupted))
    dest = tmp_path / "cache" / "f.bin"
    with pytest.raises(DownloadError) as info:
        fetch_file("f.bin", [f"{url}/f.bin"], dest, md5_of(PAYLOAD))
    message = str(info.value)
    assert "f.bin" in message and f"{url}/f.bin" in message
    assert md5_of(PAYLOAD) in message and md5_of(bytes(corrupted)) in message
    assert not dest.exists()
    assert leftovers(dest.parent) == []


def test_falls_through_to_next_url(server, tmp_path):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "f.bin"
    fetch_file("f.bin", [closed_port_url("f.bin"), f"{url}/missing", f"{url}/f.bin"], dest, md5_of(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD
    assert requests == ["/missing", "/f.bin"]


def test_offline_error_says_where_to_put_the_file(tmp_path):
    dest = tmp_path / "cache" / "f.bin"
    dead = closed_port_url("f.bin")
    with pytest.raises(DownloadError) as info:
        fetch_file("f.bin", [dead], dest, md5_of(PAYLOAD))
    message = str(info.value)
    assert str(dest) in message and md5_of(PAYLOAD) in message and dead in message
    assert not dest.exists() and leftovers(dest.parent) == []


def test_corrupt_local_file_is_replaced(server, tmp_path):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"garbage")
    fetch_file("f.bin", [f"{url}/f.bin"], dest, md5_of(PAYLOAD))
    assert dest.read_bytes() == PAYLOAD and len(requests) == 1


def test_corrupt_local_file_and_offline_says_corrupt(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"garbage")
    with pytest.raises(DownloadError) as info:
        fetch_file("f.bin", [closed_port_url("f.bin")], dest, md5_of(PAYLOAD))
    assert f"existing file at {dest} is corrupt" in str(info.value)


def test_mirror_env_is_tried_first(server, tmp_path, monkeypatch):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, url + "/")
    dest = tmp_path / "f.bin"
    fetch_file("f.bin", [closed_port_url("f.bin")], dest, md5_of(PAYLOAD))
    assert requests == ["/f.bin"]


def test_mirror_argument_overrides_env(server, tmp_path, monkeypatch):
    url, served, requests = server
    (served / "sub").mkdir()
    (served / "sub" / "f.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, closed_port_url(""))
    fetch_file("f.bin", [], tmp_path / "f.bin", md5_of(PAYLOAD), mirror=f"{url}/sub")
    assert requests == ["/sub/f.bin"]


def test_interrupt_leaves_no_partial_file(server, tmp_path, monkeypatch):
    url, served, _ = server
    (served / "f.bin").write_bytes(PAYLOAD)

    @contextlib.contextmanager
    def interrupting_progress(label, total):
        def advance(n):
            raise KeyboardInterrupt

        yield advance

    monkeypatch.setattr(download, "show_progress", interrupting_progress)
    dest = tmp_path / "cache" / "f.bin"
    with pytest.raises(KeyboardInterrupt):
        fetch_file("f.bin", [f"{url}/f.bin"], dest, md5_of(PAYLOAD))
    assert list(dest.parent.iterdir()) == []


# ---------------------------------------------------------------------------
# SHA-256 checksums (full or a prefix, as torch.hub's file names carry one) and the weights mirror.


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.mark.parametrize("digits", [64, 8])
def test_sha256_full_or_prefix_is_verified(server, tmp_path, digits):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    dest = tmp_path / "f.bin"
    checksum = "sha256:" + sha256_of(PAYLOAD)[:digits]
    fetch_file("f.bin", [f"{url}/f.bin"], dest, checksum)
    assert dest.read_bytes() == PAYLOAD
    fetch_file("f.bin", [f"{url}/f.bin"], dest, checksum)  # the file in place passes its check
    assert requests == ["/f.bin"]


def test_sha256_prefix_mismatch_leaves_nothing(server, tmp_path):
    url, served, _ = server
    corrupted = bytearray(PAYLOAD)
    corrupted[7] ^= 0x01
    (served / "f.bin").write_bytes(bytes(corrupted))
    dest = tmp_path / "cache" / "f.bin"
    prefix = sha256_of(PAYLOAD)[:8]
    with pytest.raises(DownloadError) as info:
        fetch_file("f.bin", [f"{url}/f.bin"], dest, f"sha256:{prefix}")
    message = str(info.value)
    assert f"expected sha256 starting {prefix}" in message
    assert f"got sha256 {sha256_of(bytes(corrupted))}" in message
    assert not dest.exists() and leftovers(dest.parent) == []


def test_corrupt_local_file_is_named_with_its_sha256(tmp_path):
    dest = tmp_path / "f.bin"
    dest.write_bytes(b"garbage")
    prefix = sha256_of(PAYLOAD)[:8]
    with pytest.raises(DownloadError) as info:
        fetch_file("f.bin", [closed_port_url("f.bin")], dest, f"sha256:{prefix}")
    assert f"corrupt (sha256 {sha256_of(b'garbage')}, expected sha256 starting {prefix})" in str(info.value)


@pytest.mark.parametrize("text,expected", [
    (md5_of(PAYLOAD), download.Checksum("md5", md5_of(PAYLOAD))),
    ("MD5:" + md5_of(PAYLOAD).upper(), download.Checksum("md5", md5_of(PAYLOAD))),
    ("sha256:" + sha256_of(PAYLOAD)[:12], download.Checksum("sha256", sha256_of(PAYLOAD)[:12])),
])
def test_checksum_parses_md5_and_sha256(text, expected):
    assert download.Checksum.parse(text) == expected


@pytest.mark.parametrize("text,match", [
    ("sha256:abc1234", "give 8 to 64"),  # a 7-digit prefix checks too little
    ("sha256:" + "0" * 65, "give 8 to 64"),
    (md5_of(PAYLOAD)[:16], "give 32"),  # an md5 prefix is not accepted
    ("sha256:f37072fz", "give 8 to 64"),
    ("sha1:" + "0" * 40, "unknown checksum algorithm 'sha1'"),
])
def test_bad_checksum_is_refused(text, match):
    with pytest.raises(ValueError, match=match):
        download.Checksum.parse(text)


def test_prefix_matches_only_a_full_digest_that_starts_with_it():
    checksum = download.Checksum("sha256", "f37072fd")
    assert checksum.matches("f37072fd" + "0" * 56)
    assert not checksum.matches("f37072fe" + "0" * 56)
    assert not checksum.matches("f37072fd")  # not a whole digest


def test_weights_mirror_env_is_used_and_the_dataset_mirror_is_not(server, tmp_path, monkeypatch):
    url, served, requests = server
    (served / "f.bin").write_bytes(PAYLOAD)
    (served / "datasets").mkdir()
    (served / "datasets" / "f.bin").write_bytes(PAYLOAD)
    monkeypatch.setenv(download.MIRROR_ENV, f"{url}/datasets")
    monkeypatch.setenv(download.WEIGHTS_MIRROR_ENV, url)
    checksum = "sha256:" + sha256_of(PAYLOAD)[:8]
    fetch_file("f.bin", [], tmp_path / "f.bin", checksum, mirror_env=download.WEIGHTS_MIRROR_ENV)
    assert requests == ["/f.bin"]
    monkeypatch.delenv(download.WEIGHTS_MIRROR_ENV)
    with pytest.raises(DownloadError, match=r"no URL to try[\s\S]*set \$IMGCLS_WEIGHTS_MIRROR"):
        fetch_file("f.bin", [], tmp_path / "g.bin", checksum, mirror_env=download.WEIGHTS_MIRROR_ENV)
    assert requests == ["/f.bin"]
