"""Shared fixtures: every test session gets its own data cache."""

from __future__ import annotations

import pytest


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory, monkeypatch):
    # Tests never read or write the user's real cache.
    monkeypatch.setenv("IMGCLS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "imgcls-data"))


@pytest.fixture(scope="module")
def one_thread():
    """Small batches gain nothing from intra-op threads; on a busy 2-core machine they contend (~10x slower)."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
