"""Shared fixtures: every test session gets its own data cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never read or write the user's real cache.
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "imgcls-data"))

