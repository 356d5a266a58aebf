"""Shared fixtures: an isolated data cache per test session and the real datasets, when present."""

from __future__ import annotations

from pathlib import Path

import pytest

SHARED_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data"


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never read or write the user's real cache.
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "imgcls-data"))


def shared_zip(name: str) -> Path:
    """Path of a real dataset zip in ../shared/data, or skip the test when it is absent."""
    path = SHARED_DATA / name
    if not path.is_file():
        pytest.skip(f"{path} is not present (real datasets live in ../shared/data beside the checkout)")
    return path
