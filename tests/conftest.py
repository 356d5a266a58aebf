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


class _Squares:
    """Multi-label test data: 32x32 images holding 0 to 3 coloured squares, labelled with the colours they show."""

    COLOURS = ("red", "green", "blue")

    def images(self, n: int, seed: int = 0):
        """``n`` uint8 (32, 32, 3) images on a dark ground and, for each, the sorted list of colours it shows."""
        import numpy as np

        rng = np.random.default_rng(seed)
        images, labels = [], []
        for _ in range(n):
            img = rng.integers(20, 50, (32, 32, 3), dtype=np.uint8)
            have = sorted(rng.choice(3, size=rng.integers(0, 4), replace=False).tolist())
            for c in have:
                y, x = rng.integers(0, 22, 2)
                img[y:y + 10, x:x + 10] = 40
                img[y:y + 10, x:x + 10, c] = 230
            images.append(img)
            labels.append([self.COLOURS[c] for c in have])
        return images, labels

    def write_folder(self, root, n: int = 240, seed: int = 0, csv_name: str = "labels.csv", prefix: str = "images/"):
        """PNGs under ``root/<prefix>`` and a ``filename,labels`` CSV beside them; returns the label lists."""
        from PIL import Image

        images, labels = self.images(n, seed)
        (root / prefix).mkdir(parents=True, exist_ok=True)
        rows = []
        for i, (img, have) in enumerate(zip(images, labels)):
            Image.fromarray(img).save(root / prefix / f"{i:04d}.png")
            rows.append(f"{prefix}{i:04d}.png,{' '.join(have)}")
        (root / csv_name).write_text("filename,labels\n" + "\n".join(rows) + "\n")
        return labels


@pytest.fixture(scope="session")
def multilabel_squares():
    """Multi-label test data (see :class:`_Squares`): ``.images(n, seed)`` and ``.write_folder(root, n, ...)``."""
    return _Squares()


@pytest.fixture(scope="session")
def ood_entry():
    """Makes a stored out-of-distribution entry for a trained model: ``ood_entry(clf, score, images, bank_images)``
    gives ``meta["ood"]`` for ``score`` (msp, energy or knn; kNN's bank the float16 directions of ``bank_images``'
    pooled features, as training keeps it) with a threshold in the widest gap between the middle half of the scores
    of ``images``: about half of them fall below it, and none within float rounding of it."""

    def make(clf, score: str, images, bank_images=None, k: int = 5) -> dict:
        import numpy as np
        import torch

        from imgcls.inference import predict_logits
        from imgcls.ood import feature_directions
        from imgcls.predictor import TorchPredictor

        entry = {"score": score, "threshold": 0.0, "frr_target": 0.05,
                 "measured": {score: {"auroc": 0.5, "far": 0.5, "frr": 0.05, "threshold": 0.0}}}
        if score == "knn":
            _, pooled = predict_logits(clf.model, bank_images, clf.meta["normalize"], clf.runtime, features=True)
            entry.update(k=k, bank=torch.from_numpy(feature_directions(pooled)).to(torch.float16))
        scores = np.sort(TorchPredictor(clf.model, {**clf.meta, "ood": entry}, clf.runtime).scored_arrays(images)[1])
        middle = scores[len(scores) // 4: 3 * len(scores) // 4 + 1]
        i = int(np.argmax(np.diff(middle)))
        entry["threshold"] = entry["measured"][score]["threshold"] = float((middle[i] + middle[i + 1]) / 2)
        return entry

    return make
