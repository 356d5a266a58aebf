"""Fuzzing /v1/predict with corrupted image files: every answer is 200 or a 4xx in the contract's
JSON error shape, never a 500, and the server still answers a good request afterwards."""

from __future__ import annotations

import io
import struct

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image, features

import imgcls
from imgcls.serving.app import create_app

CASES = 300
SEED = 1234
MAGIC = [b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff\xe0", b"\xff\xd8\xff", b"GIF89a", b"GIF87a", b"BM", b"RIFF\x00\x00\x00\x00WEBP",
         b"II*\x00", b"MM\x00*", b"P5\n", b"P6\n", b"\x00\x00\x01\x00", b"\x00\x00\x00\x0cjP  \r\n\x87\n"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir_env, one_thread):
    return imgcls.train(out=str(tmp_path_factory.mktemp("runs")), name="fuzz", epochs=2,
                        model_option={"widths": [8, 16, 16]}, quiet=True, report=False).path


def seed_files() -> dict[str, bytes]:
    """Valid files of several formats and modes, the material the corruptions start from."""
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8), "RGB")
    gray = Image.fromarray(rng.integers(0, 256, (16, 16), dtype=np.uint8), "L")
    rgba = Image.fromarray(rng.integers(0, 256, (12, 18, 4), dtype=np.uint8), "RGBA")
    wide = Image.fromarray(rng.integers(0, 65536, (10, 10), dtype=np.uint16))  # 16-bit gray
    out = {}
    for fmt, img, opts in [("PNG", rgb, {}), ("PNG", gray, {}), ("PNG", rgba, {}), ("PNG", wide, {}),
                           ("PNG", gray, {"interlace": 1}),
                           ("JPEG", rgb, {"quality": 80}), ("JPEG", gray, {}), ("JPEG", rgb, {"progressive": True}),
                           ("GIF", rgb.convert("P"), {}), ("BMP", rgb, {}), ("BMP", gray, {}),
                           ("TIFF", rgb, {}), ("TIFF", gray, {"compression": "tiff_deflate"}), ("PPM", rgb, {}),
                           ("ICO", rgb, {})]:
        buf = io.BytesIO()
        img.save(buf, format=fmt, **opts)
        out[f"{fmt.lower()}-{img.mode}-{len(out)}"] = buf.getvalue()
    if features.check("webp"):
        for lossless in (False, True):
            buf = io.BytesIO()
            rgb.save(buf, format="WEBP", lossless=lossless)
            out[f"webp-{lossless}"] = buf.getvalue()
    return out


def corrupt(data: bytes, others: list[bytes], rng: np.random.Generator) -> tuple[str, bytes]:
    """One randomly damaged version of ``data`` and the name of the damage."""
    kind = rng.choice(["flip", "truncate", "splice", "garbage", "empty", "insert", "header-size", "repeat"],
                      p=[0.3, 0.2, 0.12, 0.1, 0.02, 0.1, 0.1, 0.06])
    b = bytearray(data)
    if kind == "flip":
        for pos in rng.integers(0, len(b), rng.integers(1, 20)):
            b[pos] = rng.integers(0, 256)
    elif kind == "truncate":
        b = b[: rng.integers(0, len(b))]
    elif kind == "splice":  # the header of one file, the body of another
        other = others[rng.integers(len(others))]
        cut = int(rng.integers(1, min(len(b), 64)))
        b = b[:cut] + other[rng.integers(0, len(other)):]
    elif kind == "garbage":  # a magic number, then noise
        b = bytearray(MAGIC[rng.integers(len(MAGIC))]) + bytearray(rng.bytes(int(rng.integers(0, 2000))))
    elif kind == "empty":
        b = bytearray()
    elif kind == "insert":
        pos = int(rng.integers(0, len(b)))
        b = b[:pos] + bytearray(rng.bytes(int(rng.integers(1, 200)))) + b[pos:]
    elif kind == "header-size":  # absurd dimensions where a PNG/BMP/GIF header keeps them
        w, h = (int(v) for v in rng.integers(0, 1 << 16, 2))
        if data.startswith(b"\x89PNG"):
            b[16:24] = struct.pack(">II", w * int(rng.integers(1, 1 << 15)), h)
        elif data.startswith(b"BM"):
            b[18:26] = struct.pack("<ii", w, -h if rng.random() < 0.5 else h)
        elif data.startswith(b"GIF"):
            b[6:10] = struct.pack("<HH", w, h)
        else:
            b[8:16] = rng.bytes(8)
    else:  # repeat a chunk of the file many times
        start = int(rng.integers(0, len(b)))
        piece = b[start:start + int(rng.integers(1, 64))]
        b = b[:start] + piece * int(rng.integers(2, 200)) + b[start:]
    return str(kind), bytes(b)


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")
@pytest.mark.filterwarnings("ignore::UserWarning:PIL.TiffImagePlugin")  # PIL's notes on damaged TIFF tags
def test_corrupted_images_never_cause_a_server_error(run):
    rng = np.random.default_rng(SEED)
    seeds = seed_files()
    names, datas = list(seeds), list(seeds.values())
    statuses: dict[int, int] = {}
    app = create_app(run, max_bytes=200_000, max_files=4)
    # raise_server_exceptions: a bug reached by bad input fails this test with its traceback.
    with TestClient(app, raise_server_exceptions=True) as client:
        for case in range(CASES):
            n_files = 1 if rng.random() < 0.8 else int(rng.integers(2, 4))
            files = []
            for j in range(n_files):
                k = int(rng.integers(len(datas)))
                kind, data = corrupt(datas[k], datas, rng)
                files.append(("files", (f"case{case}-{j}-{names[k]}-{kind}", data, "application/octet-stream")))
            r = client.post("/v1/predict", files=files)
            statuses[r.status_code] = statuses.get(r.status_code, 0) + 1
            if r.status_code == 200:
                assert len(r.json()["predictions"]) == n_files
                continue
            assert 400 <= r.status_code < 500, (case, r.status_code, r.text)
            assert r.headers["content-type"].startswith("application/json"), (case, r.text)
            body = r.json()
            assert set(body) == {"error"} and isinstance(body["error"]["code"], str) and body["error"]["message"]
        # Every seed file is served as it is, and the server still answers after all that.
        for name, data in seeds.items():
            good = client.post("/v1/predict", files=[("files", (name, data, "application/octet-stream"))])
            assert good.status_code == 200, (name, good.text)
        metrics = client.get("/metrics").text
    print("statuses:", statuses)
    assert set(statuses) <= {200, 400, 413}, statuses
    assert statuses.get(400, 0) > CASES // 4 and statuses.get(200, 0) > 0, statuses  # the corruptions bite
    assert 'status="500"' not in metrics
