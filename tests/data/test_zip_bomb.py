"""A zip member that inflates far past any image is reported as a bad file, without inflating it."""

from __future__ import annotations

import json
import subprocess
import sys
import types
import zipfile
import zlib

import numpy as np
import pytest
from PIL import Image


@pytest.mark.slow
@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads the peak RSS from /proc")
def test_a_zip_bomb_member_is_a_bad_file_and_memory_stays_small(tmp_path):
    path = tmp_path / "photos.zip"
    rng = np.random.default_rng(0)
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for cls, base in (("dark", 40), ("light", 200)):
            for i in range(20):
                img = Image.fromarray(rng.normal(base, 20, (12, 12, 3)).clip(0, 255).astype(np.uint8))
                with zf.open(f"{cls}/{i}.png", "w") as fh:
                    img.save(fh, "PNG")
        with zf.open("dark/bomb.png", "w") as fh:  # 1 GiB of zeros: about 1 MB in the zip
            chunk = bytes(1 << 20)
            for _ in range(1024):
                fh.write(chunk)
    assert path.stat().st_size < 3_000_000
    out = tmp_path / "runs"
    # The child's own high-water mark (VmHWM, kB): ru_maxrss would carry over pytest's from fork and exec.
    code = ("import re, sys; from imgcls.cli import main; rc = main(sys.argv[1:]); "
            "print('RSS', re.search(r'VmHWM:\\s*(\\d+)', open('/proc/self/status').read()).group(1)); sys.exit(rc)")
    proc = subprocess.run([sys.executable, "-c", code, "train", "--data", str(path), "--epochs", "1", "--no-report",
                           "--batch-size", "8", "--out", str(out), "--name", "bomb", "--no-cache",
                           "--model-option", "widths=[8,8,8]"], capture_output=True, text=True, timeout=600,
                          check=False)
    assert proc.returncode == 0, proc.stderr[-2000:]
    peak_mib = int(proc.stdout.rsplit("RSS", 1)[1].split()[0]) / 1024
    assert peak_mib < 600, peak_mib  # a run that inflated the member took 2.3-2.4 GB
    bad = json.loads((out / "bomb" / "dataset.json").read_text())["bad"]
    assert any("bomb.png" in b["path"] and "over the limit" in b["reason"] for b in bad), bad
    assert "Traceback" not in proc.stderr


def test_a_member_that_inflates_too_many_times_over_is_refused_before_inflating(tmp_path, monkeypatch):
    from imgcls.data import sources

    path = tmp_path / "ratio.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("a/zeros.bmp", bytes(9 << 20))  # 9 MiB of zeros: about 9 KB stored, 1,000 times over
        zf.writestr("a/noise.bin", np.random.default_rng(0).integers(0, 255, 9 << 20, dtype=np.uint8).tobytes())
    inflated = []
    counting = types.SimpleNamespace(**{k: getattr(zlib, k) for k in dir(zlib) if not k.startswith("__")})
    counting.decompressobj = lambda *a: inflated.append(a) or zlib.decompressobj(*a)
    monkeypatch.setattr(sources, "zlib", counting)
    with sources.ZipSource(path) as source:
        try:
            source.read("a/zeros.bmp")
            raise AssertionError("a 1,000:1 member over 8 MiB was read")
        except OSError as exc:
            assert "inflates 1,0" in str(exc) and "over the limit of 100 times" in str(exc), exc
        assert not inflated  # refused from the central directory alone
        assert len(source.read("a/noise.bin")) == 9 << 20  # incompressible: read in full

