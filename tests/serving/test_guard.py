"""The server's guard, on real sockets: the key is checked before the body is read, the whole request is capped,
a client that stops sending is dropped, every answer carries the security headers, and a good request still
succeeds after every bad one."""

from __future__ import annotations

import contextlib
import socket
import time

import httpx
import numpy as np
import pytest
from fastapi.testclient import TestClient
from PIL import Image

from imgcls.cli import main
from imgcls.serving.app import PAGE_CSP, create_app

pytest.importorskip("uvicorn")
from live_server import LOOPBACK, ServerThread  # after the skip

KEY = "s3cret-key"


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir_env, one_thread):
    import imgcls

    return imgcls.train(out=str(tmp_path_factory.mktemp("runs")), name="guard", epochs=1,
                        model_option={"widths": [8, 16, 16]}, quiet=True, report=False).path


def png(side: int = 8) -> bytes:
    import io

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (side, side), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def raw_request(port: int, head: str, body: bytes = b"", wait: float = 10.0) -> tuple[str, float]:
    """Send ``head`` (and ``body``) on a fresh connection; the status line of the answer and the seconds it took."""
    started = time.monotonic()
    with socket.create_connection((LOOPBACK, port), timeout=wait) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n" + body)
        answer = sock.recv(4096).decode(errors="replace")
    return answer.split("\r\n", 1)[0], time.monotonic() - started


def multipart_head(path: str, length: int, key: str | None = None) -> str:
    lines = [f"POST {path} HTTP/1.1", f"Host: {LOOPBACK}", "Content-Type: multipart/form-data; boundary=b",
             f"Content-Length: {length}"]
    return "\r\n".join(lines + ([f"X-API-Key: {key}"] if key else []))


def good_predict(url: str) -> int:
    return httpx.post(f"{url}/v1/predict", files=[("files", ("d.png", png(), "image/png"))],
                      headers={"X-API-Key": KEY}, timeout=30).status_code


def test_a_keyed_server_refuses_from_the_headers_and_drops_clients_that_stall(run):
    app = create_app(run, api_key=KEY, client_timeout=1.0)
    with ServerThread(app) as server:
        # 300 MB announced and not one byte sent: a server that read (or waited for) the body before checking the
        # key would hang here until the socket timed out; this one answers 401 at once.
        for key in (None, "wrong"):
            status, seconds = raw_request(server.port, multipart_head("/v1/predict", 300_000_000, key))
            assert status.endswith("401 Unauthorized") and seconds < 5, (status, seconds)
        # With the key, 300 MB is over the total cap, refused from the Content-Length alone.
        status, seconds = raw_request(server.port, multipart_head("/v1/predict", 300_000_000, KEY))
        assert status.endswith("413 Request Entity Too Large") and seconds < 5, (status, seconds)
        # A client that announces 1,000 bytes and sends 10 is dropped after the 1 s timeout, not kept open.
        status, seconds = raw_request(server.port, multipart_head("/v1/predict", 1000, KEY), b"--b\r\nContent")
        assert status.endswith("408 Request Timeout") and seconds < 8, (status, seconds)
        assert good_predict(server.url) == 200  # the server is unharmed


def _push_after_answer(port: int, head: str, total: int) -> tuple[bytes, int]:
    """Announce ``total`` bytes and send them as fast as the server takes them: (the answer, bytes sent)."""
    sent, answer = 0, b""
    chunk = bytes(64 * 1024)
    with socket.create_connection((LOOPBACK, port), timeout=10) as sock:
        sock.sendall(head.encode() + b"\r\n\r\n")
        sock.settimeout(0.5)
        try:
            while sent < total:
                sent += sock.send(chunk)
                with contextlib.suppress(TimeoutError, BlockingIOError):
                    sock.setblocking(False)
                    answer += sock.recv(65536)
                sock.setblocking(True)
                sock.settimeout(0.5)
        except OSError:  # the server closed the connection: what it had read is all it will read
            pass
        with contextlib.suppress(OSError):
            sock.settimeout(2)
            answer += sock.recv(65536)
    return answer, sent


def test_a_refused_body_is_not_drained_the_connection_closes_with_the_answer(run):
    app = create_app(run, api_key=KEY, client_timeout=5.0)
    with ServerThread(app) as server:
        for head, status in ((multipart_head("/v1/predict", 2_000_000_000), b"401"),
                             (multipart_head("/v1/predict", 2_000_000_000, KEY), b"413")):
            answer, sent = _push_after_answer(server.port, head, 200_000_000)
            assert answer.startswith(b"HTTP/1.1 " + status), answer[:60]
            assert b"connection: close" in answer.lower()
            # The kernel's socket buffers take a few MB without the server reading them; draining took all 200 MB.
            assert sent < 20_000_000, f"{sent:,} bytes sent after a {status.decode()}"
        assert good_predict(server.url) == 200


def trickle(sock: socket.socket, data: bytes, every: float, until: float) -> bytes:
    """Send ``data`` a byte every ``every`` s until the server answers (its first bytes) or ``until`` s pass."""
    sock.settimeout(every)
    started = time.monotonic()
    for byte in data:
        if time.monotonic() - started > until:
            break
        try:
            sock.sendall(bytes([byte]))
            answer = sock.recv(4096)
            return answer or b"<closed>"
        except TimeoutError:
            continue
        except OSError:
            return b"<closed>"
    return b""


def test_a_client_that_trickles_its_headers_is_answered_408_and_dropped(run):
    app = create_app(run, client_timeout=1.0)
    head = f"GET /healthz HTTP/1.1\r\nHost: {LOOPBACK}\r\n" + "X-Slow: " + "a" * 200 + "\r\n\r\n"
    with ServerThread(app) as server:
        with socket.create_connection((LOOPBACK, server.port)) as sock:  # a byte every 0.2 s: never finishes
            started = time.monotonic()
            answer = trickle(sock, head.encode(), 0.2, until=10)
            seconds = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and 0.9 < seconds < 5, (answer[:40], seconds)
        # A kept-alive connection gets the same deadline for its next request's headers.
        with socket.create_connection((LOOPBACK, server.port)) as sock:
            sock.sendall(f"GET /healthz HTTP/1.1\r\nHost: {LOOPBACK}\r\n\r\n".encode())
            first = b""
            while not first.endswith(b'{"status":"ok"}'):  # the whole answer, which may come in two packets
                first += sock.recv(4096)
            assert first.startswith(b"HTTP/1.1 200")
            started = time.monotonic()
            answer = trickle(sock, head.encode(), 0.2, until=10)
            seconds = time.monotonic() - started
        assert answer.startswith(b"HTTP/1.1 408") and seconds < 5, (answer[:40], seconds)
        # Headers that come at once, with a body that takes a moment, are unaffected.
        assert good_predict_unkeyed(server.url) == 200


def good_predict_unkeyed(url: str) -> int:
    return httpx.post(f"{url}/v1/predict", files=[("files", ("d.png", png(), "image/png"))], timeout=30).status_code


def test_the_whole_request_is_capped_whatever_each_file_is(run):
    with TestClient(create_app(run, max_request_bytes=5000)) as c:
        files = [("files", (f"{i}.png", b"\x89PNG" + bytes(2000), "image/png")) for i in range(3)]  # 3 x 2 KB
        answer = c.post("/v1/predict", files=files)
        assert answer.status_code == 413 and "5,000 bytes" in answer.json()["error"]["message"]
        assert c.post("/v1/predict", files=[("files", ("d.png", png(), "image/png"))]).status_code == 200


def test_every_answer_carries_the_security_headers_and_the_docs_need_the_key(run):
    with TestClient(create_app(run, api_key=KEY)) as c:
        for path in ("/healthz", "/v1/model", "/static/app.js", "/nowhere"):
            answer = c.get(path)
            assert answer.headers["x-content-type-options"] == "nosniff", path
            assert "frame-ancestors 'none'" in answer.headers["content-security-policy"], path
        assert c.get("/").headers["content-security-policy"] == PAGE_CSP  # the page's full policy, once
        for path in ("/docs", "/redoc", "/openapi.json"):
            assert c.get(path).status_code == 401
            assert c.get(path, headers={"X-API-Key": KEY}).status_code == 200
        assert c.get("/").status_code == 200 and c.get("/readyz").status_code == 200


def test_create_app_refuses_bad_limits(run):
    from imgcls.errors import ConfigError

    for options in ({"max_request_bytes": 0}, {"client_timeout": 0}, {"client_timeout": float("nan")}):
        with pytest.raises(ConfigError, match=next(iter(options))):
            create_app(run, **options)


def test_serve_takes_the_key_from_a_file_or_the_environment_and_refuses_bad_ports(run, tmp_path, monkeypatch, capsys):
    import imgcls.serving.app as app_module

    seen = {}
    monkeypatch.setattr(app_module, "serve", lambda run_path, **kw: seen.update(kw))
    key_file = tmp_path / "key.txt"
    key_file.write_text(f"{KEY}\n")
    assert main(["serve", str(run), "--api-key-file", str(key_file)]) == 0 and seen["api_key"] == KEY
    monkeypatch.setenv("IMGCLS_API_KEY", "from-env")
    assert main(["serve", str(run)]) == 0 and seen["api_key"] == "from-env"
    capsys.readouterr()
    for argv, words in ((["--port", "99999"], "--port must be between 0 and 65535"),
                        (["--api-key-file", str(tmp_path / "none.txt")], "cannot read it"),
                        (["--api-key", "a", "--api-key-file", str(key_file)], "not both")):
        assert main(["serve", str(run), *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err


def test_a_model_that_cannot_be_served_is_one_line_before_any_server_starts(run, tmp_path, capsys):
    assert main(["serve", str(run), "--runtime", "onnx", "--port", "0"]) == 2  # no export/model.onnx
    err = capsys.readouterr().err
    assert "export/model.onnx does not exist" in err and "Traceback" not in err and "uvicorn" not in err.lower()
    assert len(err.strip().splitlines()) == 1


def test_predictions_go_on_while_every_explanation_slot_is_taken(run, monkeypatch):
    """Explanations hold their model for as long as they run (an occlusion map takes seconds to minutes): here
    they block until released.  Predictions must not wait for them; a ninth is refused 503 busy, and /readyz says
    the server is saturated until they end."""
    import threading

    import imgcls.serving.state as state_module  # where ServingState.explain finds explain_image

    release = threading.Event()
    started = threading.Semaphore(0)

    def held_explanation(state, image, name, method):
        clf, lock = state.explainer()
        with lock:  # as explain_image holds it
            started.release()
            release.wait(60)
        return state_module.explain_arrays(clf.model, clf.meta, image[None], method="gradcam", device=None,
                                           names=[name])

    monkeypatch.setattr(state_module, "explain_image", held_explanation)
    app = create_app(run)
    with ServerThread(app) as server:
        answers = []

        def explain():
            answers.append(httpx.post(f"{server.url}/v1/explain", files=[("file", ("d.png", png(), "image/png"))],
                                      timeout=60).status_code)

        threads = [threading.Thread(target=explain) for _ in range(state_module.EXPLAIN_QUEUE)]
        for t in threads:
            t.start()
        assert started.acquire(timeout=30), "no explanation started"
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and httpx.get(f"{server.url}/readyz").status_code == 200:
            time.sleep(0.05)
        ready = httpx.get(f"{server.url}/readyz")
        assert ready.status_code == 503 and ready.json()["saturated"] is True, ready.text
        assert httpx.head(f"{server.url}/healthz").status_code == 200
        for _ in range(3):  # the prediction model is free: answered while every explanation is held
            assert good_predict_unkeyed(server.url) == 200
        busy = httpx.post(f"{server.url}/v1/explain", files=[("file", ("d.png", png(), "image/png"))], timeout=30)
        assert busy.status_code == 503 and busy.json()["error"]["code"] == "busy", busy.text
        assert busy.headers["retry-after"] == "5"
        release.set()
        for t in threads:
            t.join(60)
        assert answers == [200] * state_module.EXPLAIN_QUEUE
        assert httpx.get(f"{server.url}/readyz").json() == {"ready": True}
