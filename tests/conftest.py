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


@pytest.fixture(scope="module")
def data_dir_env(tmp_path_factory):
    """The same cache folder for module-scoped fixtures (the autouse fixture above is per test)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("IMGCLS_DATA_DIR", str(tmp_path_factory.getbasetemp() / "imgcls-data"))
        yield


@pytest.fixture(scope="session")
def chromium_launch():
    """Keyword arguments for Playwright's chromium.launch with Debian's chromium; skips when either is missing."""
    from pathlib import Path

    pytest.importorskip("playwright.sync_api")
    if not Path("/usr/bin/chromium").is_file():
        pytest.skip("Debian's chromium is not installed (apt-get install chromium); .ci/run installs it")
    # Without the background-networking flags Chromium tries hosts this machine cannot reach.
    return {"executable_path": "/usr/bin/chromium", "headless": True,
            "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking",
                     "--disable-component-update", "--disable-sync", "--no-first-run"]}


@pytest.fixture(scope="module")
def browser(chromium_launch):
    """A headless Chromium (Debian's, through Playwright) shared by a module's tests; skips without either."""
    from playwright import sync_api  # chromium_launch has skipped without Playwright

    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(**chromium_launch)
        yield browser
        browser.close()
