"""The web API against its contract (src/imgcls/serving/CONTRACT.md): every route, every status,
answers equal to the Python API's on the same files, limits, the API key, metrics and batching."""

from __future__ import annotations

import asyncio
import io
import json
import shutil
import struct
import subprocess
import sys
import threading
import time
import zlib
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

import imgcls
from imgcls.checkpoint import find_checkpoint, update_meta
from imgcls.explain.attribution import METHODS
from imgcls.serving.app import STATIC_DIR, create_app
from imgcls.serving.batching import MicroBatcher

SMALL = {"model_option": {"widths": [8, 16, 16]}, "quiet": True, "report": False}
KEY = "s3cret-key"


# ----------------------------------------------------------------------------
# Fixtures: a tiny digits run (gray 8x8) and a tiny colour run (RGB 16x16), images as files


@pytest.fixture(scope="module")
def digits(tmp_path_factory, data_dir_env, one_thread):
    """A 2-epoch digits run and 16 of its test images written as 32x32 PNG files."""
    run = imgcls.train(out=str(tmp_path_factory.mktemp("runs")), name="digits", epochs=2, **SMALL)
    clf = imgcls.load(run.path)
    images = clf.dataset().splits["test"].images[:16]  # uint8 (16, 8, 8, 1)
    folder = tmp_path_factory.mktemp("digit-files")
    paths = []
    for i, img in enumerate(images):
        big = np.repeat(np.repeat(img[..., 0], 4, axis=0), 4, axis=1)  # 32x32, resized back by the server
        path = folder / f"digit{i:02d}.png"
        Image.fromarray(big, "L").save(path)
        paths.append(path)
    return {"run": run.path, "clf": clf, "paths": paths}


@pytest.fixture(scope="module")
def client(digits):
    with TestClient(create_app(digits["run"])) as c:
        yield c


@pytest.fixture(scope="module")
def colour(tmp_path_factory, data_dir_env, one_thread):
    """A 2-epoch run on a folder of red and blue 16x16 RGB images."""
    root = tmp_path_factory.mktemp("colour") / "photos"
    rng = np.random.default_rng(0)
    for name, channel in (("red", 0), ("blue", 2)):
        (root / name).mkdir(parents=True)
        for i in range(24):
            img = rng.integers(0, 80, (16, 16, 3), dtype=np.uint8)
            img[..., channel] = rng.integers(150, 256, (16, 16), dtype=np.uint8)
            Image.fromarray(img, "RGB").save(root / name / f"{i:02d}.png")
    run = imgcls.train(data=str(root), out=str(root.parent / "runs"), name="colour", epochs=2, batch_size=8, **SMALL)
    return {"run": run.path, "clf": imgcls.load(run.path), "root": root}


def upload(field, path_or_bytes, name=None, mime="application/octet-stream"):
    data = path_or_bytes.read_bytes() if hasattr(path_or_bytes, "read_bytes") else path_or_bytes
    return (field, (name or getattr(path_or_bytes, "name", "upload.bin"), data, mime))


def png_bytes(arr: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr, mode).save(buf, format="PNG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG that announces width x height (1-bit gray) and holds no pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b"")


def assert_error(response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert body["error"]["message"]
    if code is not None:
        assert body["error"]["code"] == code, body
    return body["error"]


def metric_value(text: str, name: str, **labels) -> float:
    """The value of one sample of Prometheus text, 0 when absent."""
    want = name + ("{" + ",".join(f'{k}="{v}"' for k, v in labels.items()) + "}" if labels else "")
    for line in text.splitlines():
        if line.startswith(want + " "):
            return float(line.split()[-1])
    return 0.0


# ----------------------------------------------------------------------------
# /v1/predict


def test_predict_one_file_matches_the_python_api(client, digits):
    path = digits["paths"][0]
    r = client.post("/v1/predict", files=[upload("files", path, mime="image/png")], params={"top_k": 10})
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["model"] == "digits"
    (pred,) = body["predictions"]
    assert pred["filename"] == path.name
    # No thresholds stored: the answer is the out-of-distribution check's alone (the top class, or unknown).
    known = pred["ood_score"] >= digits["clf"].ood["threshold"]
    assert pred["answer"] == (pred["top"][0]["class"] if known else "unknown")
    expected = digits["clf"].predict_proba([str(path)])[0]
    got = {t["class"]: t["probability"] for t in pred["top"]}
    assert len(got) == 10
    assert sum(got.values()) == pytest.approx(1.0, abs=1e-6)
    probs = [t["probability"] for t in pred["top"]]
    assert probs == sorted(probs, reverse=True)
    np.testing.assert_allclose([got[c] for c in digits["clf"].classes], expected, atol=1e-6)


def test_predict_many_files_in_order_with_top_k(client, digits):
    paths = digits["paths"][:6]
    r = client.post("/v1/predict", files=[upload("files", p) for p in paths], params={"top_k": 3})
    assert r.status_code == 200, r.text
    preds = r.json()["predictions"]
    assert [p["filename"] for p in preds] == [p.name for p in paths]
    expected = digits["clf"].predict_proba([str(p) for p in paths])
    classes = digits["clf"].classes
    for pred, proba in zip(preds, expected):
        assert len(pred["top"]) == 3
        order = np.argsort(-proba, kind="stable")[:3]
        assert [t["class"] for t in pred["top"]] == [classes[j] for j in order]
        np.testing.assert_allclose([t["probability"] for t in pred["top"]], proba[order], atol=1e-6)


def test_predict_default_top_k_is_five_and_large_top_k_is_capped(client, digits):
    files = [upload("files", digits["paths"][1])]
    assert len(client.post("/v1/predict", files=files).json()["predictions"][0]["top"]) == 5
    assert len(client.post("/v1/predict", files=files, params={"top_k": 1000}).json()["predictions"][0]["top"]) == 10


def test_predict_decodes_by_content_not_by_name(client, digits):
    img = np.asarray(Image.open(digits["paths"][2]))
    buf = io.BytesIO()
    Image.fromarray(img).save(buf, format="BMP")
    r = client.post("/v1/predict", files=[upload("files", buf.getvalue(), "photo.jpg", "image/jpeg")])
    assert r.status_code == 200, r.text
    expected = digits["clf"].predict_proba([str(digits["paths"][2])])[0]  # the same pixels
    assert r.json()["predictions"][0]["top"][0]["probability"] == pytest.approx(expected.max(), abs=1e-6)


def test_answer_present_only_with_stored_thresholds(digits, tmp_path):
    run = tmp_path / "with-thresholds"
    shutil.copytree(digits["run"], run)
    thresholds = [0.2] * 10
    update_meta(find_checkpoint(run, json.loads((run / "run.json").read_text())["final_checkpoint"]),
                {"thresholds": thresholds})
    paths = digits["paths"]
    with TestClient(create_app(run)) as c:
        r = c.post("/v1/predict", files=[upload("files", p) for p in paths], params={"top_k": 2})
        assert r.status_code == 200, r.text
        assert c.get("/v1/model").json()["has_thresholds"] is True
    proba = imgcls.load(run).predict_proba([str(p) for p in paths])
    classes = digits["clf"].classes
    answers = [p["answer"] for p in r.json()["predictions"]]
    expected = []
    for row in proba:  # the most probable class that clears its threshold, else "unknown"
        cleared = [j for j in range(10) if row[j] >= thresholds[j]]
        expected.append(classes[max(cleared, key=lambda j: row[j])] if cleared else "unknown")
    assert answers == expected
    assert "unknown" in answers or len(set(answers)) > 1  # the thresholds decide something


def test_predict_rgb_model_accepts_gray_palette_and_alpha_images(colour, tmp_path):
    rng = np.random.default_rng(1)
    rgba = np.dstack([rng.integers(0, 256, (20, 30, 3), dtype=np.uint8), np.full((20, 30), 128, np.uint8)])
    files = {"gray.png": Image.fromarray(rng.integers(0, 256, (20, 20), dtype=np.uint8), "L"),
             "alpha.png": Image.fromarray(rgba, "RGBA"),
             "palette.gif": Image.fromarray(rng.integers(0, 256, (16, 16, 3), dtype=np.uint8)).convert("P"),
             "photo.jpg": Image.fromarray(rng.integers(0, 256, (40, 24, 3), dtype=np.uint8))}
    paths = []
    for name, img in files.items():
        img.save(tmp_path / name)
        paths.append(tmp_path / name)
    with TestClient(create_app(colour["run"])) as c:
        r = c.post("/v1/predict", files=[upload("files", p) for p in paths])
        card = c.get("/v1/model").json()
    assert r.status_code == 200, r.text
    assert card["input_shape"] == [3, 16, 16] and sorted(card["classes"]) == ["blue", "red"]
    expected = colour["clf"].predict_proba([str(p) for p in paths])
    for pred, proba in zip(r.json()["predictions"], expected):
        got = {t["class"]: t["probability"] for t in pred["top"]}
        np.testing.assert_allclose([got[c] for c in colour["clf"].classes], proba, atol=1e-6)


# ----------------------------------------------------------------------------
# /v1/explain


def test_explain_png_is_a_visible_overlay(client, digits):
    r = client.post("/v1/explain", files=[upload("file", digits["paths"][0])])
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "image/png"
    img = Image.open(io.BytesIO(r.content))
    img.load()
    assert img.format == "PNG" and img.mode == "RGB"
    assert max(img.size) >= 224 and img.size[0] % 8 == 0 and img.size == (img.size[0], img.size[0])
    arr = np.asarray(img)
    assert (arr[..., 0] != arr[..., 2]).any()  # coloured by the heatmap, not the gray digit alone


def test_explain_json_matches_explain_arrays(client, digits):
    from imgcls.explain.explain import explain_arrays

    path = digits["paths"][3]
    r = client.post("/v1/explain", files=[upload("file", path)], params={"format": "json", "method": "saliency"})
    assert r.status_code == 200, r.text
    body = r.json()
    assert set(body) == {"filename", "predicted", "probability", "method", "width", "height", "map"}
    m = np.asarray(body["map"])
    assert (body["height"], body["width"]) == m.shape == (8, 8)
    assert body["filename"] == path.name and body["method"] == "saliency"
    assert m.min() >= 0.0 and m.max() <= 1.0 and m.max() == pytest.approx(1.0)
    clf = digits["clf"]
    _, images, _ = clf.load_inputs([str(path)])
    exp = explain_arrays(clf.model, clf.meta, images, method="saliency", device=None)
    assert body["predicted"] == clf.classes[int(exp.predicted[0])]
    assert body["probability"] == pytest.approx(float(exp.proba[0].max()), abs=1e-6)
    np.testing.assert_allclose(m, exp.maps[0], atol=1e-4)


@pytest.mark.parametrize("method", METHODS)
def test_explain_every_method(client, digits, method):
    r = client.post("/v1/explain", files=[upload("file", digits["paths"][4])], params={"method": method, "format": "json"})
    assert r.status_code == 200, r.text
    assert np.asarray(r.json()["map"]).shape == (8, 8)


def test_explain_rgb_model(colour):
    path = next((colour["root"] / "red").iterdir())
    with TestClient(create_app(colour["run"])) as c:
        png = c.post("/v1/explain", files=[upload("file", path)])
        js = c.post("/v1/explain", files=[upload("file", path)], params={"format": "json"})
    assert png.status_code == 200 and Image.open(io.BytesIO(png.content)).size == (224, 224)
    assert js.status_code == 200 and np.asarray(js.json()["map"]).shape == (16, 16)


def test_explain_bad_parameters(client, digits):
    files = [upload("file", digits["paths"][0])]
    err = assert_error(client.post("/v1/explain", files=files, params={"method": "magic"}), 400, "bad_parameter")
    assert "magic" in err["message"] and all(m in err["message"] for m in METHODS)
    err = assert_error(client.post("/v1/explain", files=files, params={"format": "gif"}), 400, "bad_parameter")
    assert "png" in err["message"] and "json" in err["message"]
    assert_error(client.post("/v1/explain", files=[upload("files", digits["paths"][0])]), 422, "missing_field")
    assert_error(client.post("/v1/explain", files=[upload("file", b"not an image", "x.png")]), 400, "not_an_image")


# ----------------------------------------------------------------------------
# /v1/model, /healthz, /readyz, /, /docs


def test_model_card(client, digits):
    r = client.get("/v1/model")
    assert r.status_code == 200
    card = r.json()
    assert set(card) >= {"name", "arch", "classes", "input_shape", "test_metrics", "trained", "temperature",
                         "has_thresholds", "runtime", "parameters"}
    clf = digits["clf"]
    evaluation = json.loads((digits["run"] / "eval_test.json").read_text())
    assert card["name"] == "digits" and card["runtime"] == "torch"
    assert card["arch"] == clf.meta["arch"] and card["classes"] == clf.classes and card["input_shape"] == [1, 8, 8]
    assert card["test_metrics"]["accuracy"] == pytest.approx(evaluation["accuracy"])
    assert card["test_metrics"]["macro_f1"] == pytest.approx(evaluation["macro_avg"]["f1"])
    assert card["parameters"] == sum(p.numel() for p in clf.model.parameters())
    assert card["temperature"] == 1.0 and card["has_thresholds"] is False
    assert card["trained"].startswith(clf.meta["created"][:10])


def test_health_and_readiness(digits):
    app = create_app(digits["run"])
    idle = TestClient(app)  # without `with`, the lifespan has not run: no model yet
    assert idle.get("/healthz").json() == {"status": "ok"}
    r = idle.get("/readyz")
    assert r.status_code == 503 and r.json() == {"ready": False}
    assert_error(idle.post("/v1/predict", files=[upload("files", digits["paths"][0])]), 503, "not_ready")
    assert_error(idle.get("/v1/model"), 503, "not_ready")
    with TestClient(app) as c:
        r = c.get("/readyz")
        assert r.status_code == 200 and r.json() == {"ready": True}
    assert idle.get("/readyz").status_code == 503  # after shutdown


def test_page_and_static_files(client):
    if not (STATIC_DIR / "index.html").is_file():
        pytest.skip("the page (serving/static/index.html) is not there yet")
    r = client.get("/")
    assert r.status_code == 200 and r.headers["content-type"].startswith("text/html")
    css = sorted(p.name for p in STATIC_DIR.iterdir() if p.suffix in (".css", ".js"))
    for name in css:
        assert client.get(f"/static/{name}").status_code == 200
    assert_error(client.get("/static/no-such-file.js"), 404)


def test_openapi_documents_routes_and_errors(client):
    assert client.get("/docs").status_code == 200
    spec = client.get("/openapi.json").json()
    for path in ("/v1/predict", "/v1/explain", "/v1/model", "/healthz", "/readyz", "/metrics"):
        assert path in spec["paths"], path
    predict = spec["paths"]["/v1/predict"]["post"]
    assert {"400", "401", "413", "415", "422"} <= set(predict["responses"])
    assert "ErrorResponse" in spec["components"]["schemas"]
    assert "image/png" in spec["paths"]["/v1/explain"]["post"]["responses"]["200"]["content"]


def test_unknown_route_and_method_answer_json(client):
    assert_error(client.get("/v1/nothing"), 404, "not_found")
    assert_error(client.delete("/v1/model"), 405, "method_not_allowed")


# ----------------------------------------------------------------------------
# Bad input: always the contract's JSON error, never a 500


def test_missing_field_is_422(client):
    assert_error(client.post("/v1/predict"), 422, "missing_field")
    assert_error(client.post("/v1/predict", files=[upload("other", b"x")]), 422, "missing_field")


def test_not_an_image_and_truncated_images_are_400(client, digits):
    assert_error(client.post("/v1/predict", files=[upload("files", b"hello world", "a.png")]), 400, "not_an_image")
    assert_error(client.post("/v1/predict", files=[upload("files", b"", "empty.png")]), 400, "not_an_image")
    data = digits["paths"][0].read_bytes()
    err = assert_error(client.post("/v1/predict", files=[upload("files", data[: len(data) // 2], "cut.png")]), 400)
    assert "cut.png" in err["message"]
    jpeg = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8)).save(jpeg, "JPEG")
    err = assert_error(client.post("/v1/predict", files=[upload("files", jpeg.getvalue()[:600], "cut.jpg")]), 400)
    # A sentence for a person: the file, what is wrong with it, what is accepted; no decoder's words.
    assert err["message"].startswith("cut.jpg could not be read as an image") and "JPEG" in err["message"]
    assert not any(word in err["message"] for word in ("OSError", "Error:", "bytes not processed", "Truncated"))


def test_one_bad_file_fails_the_request_naming_it(client, digits):
    files = [upload("files", digits["paths"][0]), upload("files", b"GIF89a garbage", "second.gif")]
    err = assert_error(client.post("/v1/predict", files=files), 400)
    assert "second.gif" in err["message"]


def test_bad_parameter_is_400(client, digits):
    files = [upload("files", digits["paths"][0])]
    assert "top_k" in assert_error(client.post("/v1/predict", files=files, params={"top_k": 0}), 400, "bad_parameter")["message"]
    assert_error(client.post("/v1/predict", files=files, params={"top_k": "five"}), 400, "bad_parameter")


def test_not_multipart_is_415(client):
    assert_error(client.post("/v1/predict", json={"files": ["a.png"]}), 415, "unsupported_media_type")
    assert_error(client.post("/v1/explain", content=b"\x89PNG", headers={"content-type": "image/png"}), 415)


def test_file_over_the_byte_limit_is_413(digits):
    noise = png_bytes(np.random.default_rng(0).integers(0, 256, (64, 64), dtype=np.uint8))
    assert len(noise) > 3000
    with TestClient(create_app(digits["run"], max_bytes=3000)) as c:
        ok = c.post("/v1/predict", files=[upload("files", digits["paths"][0])])
        assert ok.status_code == 200, ok.text  # a 32x32 digit PNG is well under 3000 bytes
        err = assert_error(c.post("/v1/predict", files=[upload("files", noise, "noise.png")]), 413, "file_too_large")
        assert "noise.png" in err["message"] and "3,000 bytes" in err["message"]
        assert_error(c.post("/v1/explain", files=[upload("file", noise, "noise.png")]), 413, "file_too_large")
        # A body far over every limit is refused from its Content-Length, before it is read.
        huge = [upload("files", noise * 200, f"{i}.png") for i in range(3)]
        assert_error(c.post("/v1/predict", files=huge), 413, "too_large")


def test_streamed_body_over_the_limit_is_413_and_broken_multipart_400(digits):
    with TestClient(create_app(digits["run"], max_bytes=1000, max_files=1)) as c:
        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            for _ in range(400):
                yield b"x" * 1000

        multipart = {"content-type": "multipart/form-data; boundary=abc"}
        assert_error(c.post("/v1/predict", content=chunks(), headers=multipart), 413, "too_large")
        assert_error(c.post("/v1/predict", content=b"junk", headers={"content-type": "multipart/form-data"}), 400)
        # A text field where a file belongs.
        assert_error(c.post("/v1/predict", data={"files": "cat.jpg"}, files=[upload("x", b"1")]), 422, "invalid_field")


def test_image_over_the_pixel_limit_is_413(client, tmp_path):
    canvas = tmp_path / "canvas.png"
    Image.new("1", (9000, 9000)).save(canvas, optimize=True)  # 81 megapixels, a few kB on disk
    assert canvas.stat().st_size < 100_000
    err = assert_error(client.post("/v1/predict", files=[upload("files", canvas)]), 413, "too_many_pixels")
    assert "9000x9000" in err["message"] and "81,000,000 pixels" in err["message"]
    assert "limit of 40,000,000 pixels" in err["message"]
    # Beyond PIL's own bomb limit too (it refuses to even open it).
    assert_error(client.post("/v1/predict", files=[upload("files", png_header(30000, 30000), "bomb.png")]), 413,
                 "too_many_pixels")
    assert_error(client.post("/v1/explain", files=[upload("file", canvas)]), 413, "too_many_pixels")


def test_pixel_limit_is_configurable(digits):
    with TestClient(create_app(digits["run"], max_pixels=32 * 32)) as c:
        assert c.post("/v1/predict", files=[upload("files", digits["paths"][0])]).status_code == 200  # 32x32
        big = png_bytes(np.zeros((33, 32), np.uint8))
        assert_error(c.post("/v1/predict", files=[upload("files", big, "big.png")]), 413, "too_many_pixels")


def test_too_many_files_is_413(digits):
    with TestClient(create_app(digits["run"], max_files=3)) as c:
        files = [upload("files", p) for p in digits["paths"][:3]]
        assert c.post("/v1/predict", files=files).status_code == 200
        err = assert_error(c.post("/v1/predict", files=files + [upload("files", digits["paths"][3])]), 413,
                           "too_many_files")
        assert "3" in err["message"]


def test_create_app_refuses_bad_options(digits, tmp_path):
    from imgcls.errors import ConfigError

    with pytest.raises(ConfigError, match="runtime"):
        create_app(digits["run"], runtime="tensorflow")
    with pytest.raises(ConfigError, match="max_bytes"):
        create_app(digits["run"], max_bytes=0)
    with pytest.raises(ConfigError, match="does not exist"):
        create_app(tmp_path / "nope")
    with pytest.raises(ConfigError, match="api_key"):
        create_app(digits["run"], api_key="")


@pytest.mark.parametrize("damaged", ["eval_test.json", "run.json"])
def test_a_damaged_run_file_refuses_the_app_naming_it(digits, tmp_path, capsys, damaged):
    """The model card reads the run's eval_test.json and run.json: a damaged one is refused when the app is made,
    in one line that names the file (as `imgcls report` refuses it), not served as a card without figures."""
    from imgcls.cli import main
    from imgcls.errors import CheckpointError

    run = tmp_path / "damaged"
    shutil.copytree(digits["run"], run)
    (run / damaged).write_text('{"accuracy": 0.9')  # cut short
    with pytest.raises(CheckpointError) as refused:
        create_app(run)
    assert str(run / damaged) in str(refused.value) and "is damaged" in str(refused.value)
    assert main(["serve", str(run), "--port", "0"]) == 2  # refused before any socket or server
    err = capsys.readouterr().err
    assert str(run / damaged) in err and "Traceback" not in err and len(err.strip().splitlines()) == 1


def test_a_server_bug_is_a_json_500_and_counted(digits):
    app = create_app(digits["run"])
    with TestClient(app, raise_server_exceptions=False) as c:
        def broken(images):
            raise RuntimeError("a bug")

        app.state.serving.clf.proba_of_arrays = broken
        app.state.serving.clf.scored_arrays = broken  # what predictions call with an out-of-distribution score
        assert_error(c.post("/v1/predict", files=[upload("files", digits["paths"][0])]), 500, "internal_error")
        assert metric_value(c.get("/metrics").text, "requests_total", route="/v1/predict", status="500") == 1


# ----------------------------------------------------------------------------
# API key and metrics


def test_api_key(digits):
    files = [upload("files", digits["paths"][0])]
    with TestClient(create_app(digits["run"], api_key=KEY)) as c:
        for route in ("/v1/model", "/metrics"):
            assert_error(c.get(route), 401, "unauthorized")
            assert_error(c.get(route, headers={"X-API-Key": "wrong"}), 401, "unauthorized")
            assert c.get(route, headers={"X-API-Key": KEY}).status_code == 200
        assert_error(c.post("/v1/predict", files=files), 401, "unauthorized")
        assert_error(c.post("/v1/predict", files=files, headers={"X-API-Key": KEY[:-1]}), 401)
        assert_error(c.post("/v1/predict", headers={"X-API-Key": "wrong"}), 401)  # the key is checked first
        assert c.post("/v1/predict", files=files, headers={"X-API-Key": KEY}).status_code == 200
        assert_error(c.post("/v1/explain", files=[upload("file", digits["paths"][0])]), 401)
        assert c.post("/v1/explain", files=[upload("file", digits["paths"][0])], headers={"X-API-Key": KEY}).status_code == 200
        for open_route in ("/healthz", "/readyz", "/"):
            assert c.get(open_route).status_code == 200
        assert_error(c.get("/docs"), 401, "unauthorized")  # the API's description needs the key too
        spec = c.get("/openapi.json", headers={"X-API-Key": KEY}).json()
        assert any(s.get("name") == "X-API-Key" for s in spec["components"]["securitySchemes"].values())


def test_metrics_count_requests_latency_and_batches(digits):
    with TestClient(create_app(digits["run"])) as c:
        files = [upload("files", p) for p in digits["paths"][:3]]
        for _ in range(2):
            assert c.post("/v1/predict", files=files).status_code == 200
        c.post("/v1/predict", files=[upload("files", b"nope", "x.png")])
        c.get("/healthz")
        r = c.get("/metrics")
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/plain")
        text = r.text
    assert metric_value(text, "requests_total", route="/v1/predict", status="200") == 2
    assert metric_value(text, "requests_total", route="/v1/predict", status="400") == 1
    assert metric_value(text, "requests_total", route="/healthz", status="200") == 1
    assert metric_value(text, "request_latency_seconds_count", route="/v1/predict") == 3
    assert metric_value(text, "batch_size_count") == 2 and metric_value(text, "batch_size_sum") == 6
    # Every app has its own registry: a new one starts from zero.
    with TestClient(create_app(digits["run"])) as c:
        fresh = c.get("/metrics").text
    assert metric_value(fresh, "requests_total", route="/v1/predict", status="200") == 0


# ----------------------------------------------------------------------------
# Batching


def test_concurrent_requests_share_batches_and_match_unbatched(digits):
    paths = digits["paths"][:16]
    app = create_app(digits["run"], max_batch=8, max_wait_ms=50)
    barrier = threading.Barrier(len(paths))
    with TestClient(app) as c:
        def one(path):
            barrier.wait()
            r = c.post("/v1/predict", files=[upload("files", path)], params={"top_k": 10})
            assert r.status_code == 200, r.text
            return {t["class"]: t["probability"] for t in r.json()["predictions"][0]["top"]}

        with ThreadPoolExecutor(len(paths)) as pool:
            results = list(pool.map(one, paths))
        metrics = c.get("/metrics").text
    sizes = list(app.state.serving.batcher.batch_sizes)
    assert sum(sizes) == 16 and max(sizes) > 1 and max(sizes) <= 8, sizes
    assert metric_value(metrics, "batch_size_count") == len(sizes)
    clf = digits["clf"]
    _, images, _ = clf.load_inputs([str(p) for p in paths])
    for path, got, image in zip(paths, results, images):
        alone = clf.proba_of_arrays(image[None])[0]  # one image per forward pass
        np.testing.assert_allclose([got[k] for k in clf.classes], alone, atol=1e-6, err_msg=path.name)


def test_no_batching_means_one_call_per_request(digits):
    for options in ({"max_batch": 1, "max_wait_ms": 50}, {"max_batch": 8, "max_wait_ms": 0}):
        app = create_app(digits["run"], **options)
        with TestClient(app) as c, ThreadPoolExecutor(6) as pool:
            rs = list(pool.map(lambda p: c.post("/v1/predict", files=[upload("files", p)]), digits["paths"][:6]))
        assert all(r.status_code == 200 for r in rs)
        assert list(app.state.serving.batcher.batch_sizes) == [1] * 6, options


def _run_batcher(predict_fn, requests, **options):
    """Run ``requests`` (a list of uint8 arrays) concurrently through a batcher; results or exceptions, and sizes."""
    async def main():
        batcher = MicroBatcher(predict_fn, **options)
        await batcher.start()
        try:
            out = await asyncio.gather(*(batcher.predict(r) for r in requests), return_exceptions=True)
        finally:
            await batcher.stop()
        return out, list(batcher.batch_sizes)

    return asyncio.run(main())


def _fake_model(images):
    """(N, 1) 'probabilities' that identify each image by its first pixel."""
    return images.reshape(len(images), -1)[:, :1].astype(np.float64)


def _images(*values):
    return np.array(values, dtype=np.uint8).reshape(-1, 1, 1, 1)


def test_batcher_gathers_up_to_max_batch_and_never_splits_a_request():
    requests = [_images(i) for i in range(10)] + [_images(20, 21, 22, 23, 24)]
    out, sizes = _run_batcher(_fake_model, requests, max_batch=4, max_wait_ms=100)
    for req, got in zip(requests, out):
        np.testing.assert_array_equal(got[:, 0], req.reshape(-1))
    assert sum(sizes) == 15 and 5 in sizes  # the 5-image request ran alone
    assert all(s <= 4 for s in sizes if s != 5) and max(s for s in sizes if s != 5) > 1


def test_batcher_hands_a_model_error_to_every_waiting_request_then_recovers():
    calls = []

    def flaky(images):
        calls.append(len(images))
        if len(calls) == 1:
            raise ValueError("model exploded")
        return _fake_model(images)

    async def main():
        batcher = MicroBatcher(flaky, max_batch=8, max_wait_ms=50)
        await batcher.start()
        try:
            first = await asyncio.gather(*(batcher.predict(_images(i)) for i in range(4)), return_exceptions=True)
            second = await batcher.predict(_images(7))
        finally:
            await batcher.stop()
        return first, second

    first, second = asyncio.run(main())
    assert calls[0] == 4 and all(isinstance(e, ValueError) and "exploded" in str(e) for e in first)
    assert second[0, 0] == 7


def test_batcher_stop_fails_waiting_requests_instead_of_hanging():
    release = threading.Event()

    def slow(images):
        release.wait(5)
        return _fake_model(images)

    async def main():
        batcher = MicroBatcher(slow, max_batch=2, max_wait_ms=1)
        await batcher.start()
        tasks = [asyncio.create_task(batcher.predict(_images(i))) for i in range(5)]
        await asyncio.sleep(0.1)  # the first batch is in the model, the rest wait
        started = time.perf_counter()
        await batcher.stop()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        release.set()
        return results, time.perf_counter() - started

    results, seconds = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "shutting down" in str(r) for r in results)
    assert seconds < 2


# ----------------------------------------------------------------------------
# Runtimes and layering


def test_onnx_runtime_without_export_fails_start_up_clearly(digits, tmp_path):
    run = tmp_path / "no-export"
    shutil.copytree(digits["run"], run, ignore=shutil.ignore_patterns("export"))
    from imgcls.errors import ConfigError

    with pytest.raises(ConfigError, match="imgcls export .* --format onnx"), TestClient(create_app(run, runtime="onnx")):
        pass


def test_onnx_runtime_serves_the_exported_model(digits, tmp_path):
    export = pytest.importorskip("imgcls.export")
    if not hasattr(export, "export_onnx") or not hasattr(export, "load_onnx"):
        pytest.skip("imgcls.export has no export_onnx/load_onnx yet")
    run = tmp_path / "exported"
    shutil.copytree(digits["run"], run)
    export.export_onnx(run)
    paths = digits["paths"][:4]
    with TestClient(create_app(run, runtime="onnx")) as c:
        r = c.post("/v1/predict", files=[upload("files", p) for p in paths], params={"top_k": 10})
        card = c.get("/v1/model").json()
        explained = c.post("/v1/explain", files=[upload("file", paths[0])], params={"format": "json"})
    assert r.status_code == 200, r.text
    assert card["runtime"] == "onnx" and card["classes"] == digits["clf"].classes
    expected = digits["clf"].predict_proba([str(p) for p in paths])
    for pred, proba in zip(r.json()["predictions"], expected):
        got = {t["class"]: t["probability"] for t in pred["top"]}
        np.testing.assert_allclose([got[k] for k in digits["clf"].classes], proba, atol=1e-4)
    assert explained.status_code == 200 and np.asarray(explained.json()["map"]).shape == (8, 8)


def test_serving_never_imports_training():
    code = "import sys, imgcls.serving.app; print(sorted(m for m in sys.modules if m.startswith('imgcls.training')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_openapi_docs_work_offline(client):
    page = client.get("/docs")
    assert page.status_code == 200
    assert "cdn." not in page.text and "https://" not in page.text.split("<body>")[0]
    assert client.get("/static-offline-docs/swagger-ui-bundle.js").status_code == 200
    spec = client.get("/openapi.json").json()
    assert {"/v1/predict", "/v1/explain", "/v1/model"} <= set(spec["paths"])
