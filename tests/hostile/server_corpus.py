"""Bad HTTP requests for a keyed ``imgcls serve``, sent on raw sockets, and what each must get back.

Every request gets a 4xx (never a 500), an answer rather than a dropped connection (except where the guard
answers before reading a body the client is still sending, and then closes), and no stack trace or server
path in the body.  ``tests/hostile/test_server_corpus.py`` sends them to a live server in a thread;
``benchmarks/hostile_inputs.py`` to an ``imgcls serve`` process, with an unauthenticated flood on top.

The server is expected to run with the defaults of :func:`imgcls.serving.app.create_app` (10 MB a file,
40 million pixels, 32 files, a 64 MB request) and the key :data:`KEY`.
"""

from __future__ import annotations

import io
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

KEY = "hostile-corpus-key"
HOST = "127.0.0.1"
BOUNDARY = "hostileboundary"
MAX_FILE_BYTES = 10_000_000  # create_app's max_bytes
MAX_REQUEST_BYTES = 64_000_000  # create_app's (and serve's) default request cap
LEAKS = ("Traceback", 'File "/', ".py\"", "site-packages", "/src/imgcls")  # a stack trace or a server path


@dataclass(frozen=True)
class Request:
    """One raw HTTP request and the statuses it may get.

    ``filler``, ``repeat``, ``trailer``: after ``body``, ``filler`` is sent ``repeat`` times, then ``trailer``
    (a body of many MB, streamed);
    ``send_body``: False sends the headers only (a large Content-Length announced, nothing sent);
    ``may_drop``: the server may close the connection once it has answered early, while the client is still
    sending; a close without any answer is then accepted too (the guard is designed so).
    """

    kind: str
    name: str
    head: str
    body: bytes = b""
    filler: bytes = b""
    repeat: int = 0
    trailer: bytes = b""
    send_body: bool = True
    expect: tuple[int, ...] = (400,)
    may_drop: bool = False
    timeout: float = 20.0

    @property
    def id(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass
class Answer:
    status: int | None
    body: bytes = b""
    dropped: bool = False  # the connection closed (or reset) before a status line came
    sent: int = 0  # body bytes the client got to send
    seconds: float = 0.0
    error: str = ""


# ---------------------------------------------------------------- bodies


def png(width: int = 8, height: int = 8) -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (height, width), dtype=np.uint8)).save(buf, "PNG")
    return buf.getvalue()


def jpeg() -> bytes:
    import numpy as np
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(1).integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def png_header(width: int, height: int) -> bytes:
    """A PNG whose header announces ``width`` x ``height`` pixels, with one tiny IDAT (a decompression bomb's face)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0))
            + chunk(b"IDAT", zlib.compress(bytes(width + 1))) + chunk(b"IEND", b""))


def multipart(files: list[tuple[str, str, str, bytes]]) -> bytes:
    """A multipart/form-data body of (field, filename, content type, data) parts, boundary :data:`BOUNDARY`."""
    out = bytearray()
    for name, filename, ctype, data in files:
        out += (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"{name}\"; filename=\"{filename}\"\r\n"
                f"Content-Type: {ctype}\r\n\r\n").encode("utf-8", "surrogateescape") + data + b"\r\n"
    return bytes(out + f"--{BOUNDARY}--\r\n".encode())


def head(method: str, path: str, headers: dict[str, str] | None = None, length: int | None = None,
         key: str | None = KEY, ctype: str | None = f"multipart/form-data; boundary={BOUNDARY}") -> str:
    lines = [f"{method} {path} HTTP/1.1", f"Host: {HOST}", "Connection: close"]
    if ctype is not None:
        lines.append(f"Content-Type: {ctype}")
    if length is not None:
        lines.append(f"Content-Length: {length}")
    if key is not None:
        lines.append(f"X-API-Key: {key}")
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    return "\r\n".join(lines)


def upload(name: str, data: bytes, kind: str = "upload", filename: str = "x.png", expect=(400,),
           path: str = "/v1/predict", ctype: str = "image/png", **options) -> Request:
    body = multipart([("files" if path == "/v1/predict" else "file", filename, ctype, data)])
    return Request(kind, name, head("POST", path, length=len(body)), body, expect=expect, **options)


def good_request() -> Request:
    return upload("good", png(), kind="good", expect=(200,))


# ---------------------------------------------------------------- the battery


def battery() -> list[Request]:
    """Every bad request, in the order sent."""
    small = multipart([("files", "d.png", "image/png", png())])
    big_file = multipart([("files", "big.png", "image/png", bytes(MAX_FILE_BYTES + 500_000))])
    two_big = multipart([("files", f"{i}.png", "image/png", bytes(9_900_000)) for i in range(2)])
    jpg = jpeg()
    chunked_head = head("POST", "/v1/predict", {"Transfer-Encoding": "chunked"})
    part_head = (f"--{BOUNDARY}\r\nContent-Disposition: form-data; name=\"files\"; filename=\"big.png\"\r\n"
                 f"Content-Type: image/png\r\n\r\n").encode()
    reqs = [
        # the key, checked from the headers
        Request("auth", "no-key", head("POST", "/v1/predict", length=len(small), key=None), small, expect=(401,)),
        Request("auth", "wrong-key", head("POST", "/v1/predict", length=len(small), key="nope"), small,
                expect=(401,)),
        Request("auth", "empty-key", head("POST", "/v1/predict", length=len(small), key=""), small, expect=(401,)),
        Request("auth", "key-prefix", head("POST", "/v1/predict", length=len(small), key=KEY[:-1]), small,
                expect=(401,)),
        Request("auth", "key-plus-one", head("POST", "/v1/predict", length=len(small), key=KEY + "x"), small,
                expect=(401,)),
        Request("auth", "wrong-then-right-key", head("POST", "/v1/predict", {"X-API-Key": KEY}, len(small),
                                                     key="nope"), small, expect=(401,)),
        Request("auth", "right-then-wrong-key", head("POST", "/v1/predict", {"X-API-Key": "nope"}, len(small)),
                small, expect=(401,)),
        Request("auth", "wrong-key-20MB-body", head("POST", "/v1/predict", length=len(two_big), key="nope"),
                two_big, expect=(401,), may_drop=True),
        Request("auth", "wrong-key-300MB-announced", head("POST", "/v1/predict", length=300_000_000, key="nope"),
                send_body=False, expect=(401,)),
        Request("auth", "no-key-explain", head("POST", "/v1/explain", length=len(small), key=None), small,
                expect=(401,)),
        *[Request("auth", f"no-key-get-{p.strip('/').replace('/', '-')}", head("GET", p, key=None, ctype=None),
                  expect=(401,)) for p in ("/v1/model", "/metrics", "/docs", "/redoc", "/openapi.json")],
        # sizes
        Request("size", "300MB-announced", head("POST", "/v1/predict", length=300_000_000), send_body=False,
                expect=(413,)),
        Request("size", "content-length-words", head("POST", "/v1/predict", {"Content-Length": "abc"}), small),
        Request("size", "content-length-negative", head("POST", "/v1/predict", {"Content-Length": "-5"}), small),
        Request("size", "content-length-and-chunked", head("POST", "/v1/predict", {"Transfer-Encoding": "chunked"},
                                                           length=len(small)), small),
        Request("size", "chunked-70MB", chunked_head, _chunk(part_head), _chunk(bytes(1 << 20)), repeat=70,
                trailer=_chunk(f"\r\n--{BOUNDARY}--\r\n".encode()) + b"0\r\n\r\n", expect=(413,), may_drop=True),
        Request("size", "file-over-10MB", head("POST", "/v1/predict", length=len(big_file)), big_file, expect=(413,)),
        Request("size", "33-files", *_body(multipart([("files", f"{i}.png", "image/png", png()) for i in range(33)])),
                expect=(413,)),
        # malformed multipart and content types
        Request("multipart", "garbage-body", *_body(bytes(range(256)) * 8), expect=(400, 422)),
        Request("multipart", "no-boundary", *_body(small, ctype="multipart/form-data"), expect=(400, 422)),
        Request("multipart", "unterminated", *_body(small[:-(len(BOUNDARY) + 6)] + b"more"), expect=(400, 422)),
        Request("multipart", "no-files-field", *_body(multipart([("image", "d.png", "image/png", png())])),
                expect=(422,)),
        Request("multipart", "empty-body", *_body(b""), expect=(400, 422)),
        Request("multipart", "json-content-type", *_body(b'{"files": []}', ctype="application/json"),
                expect=(415,)),
        Request("multipart", "text-content-type", *_body(small, ctype="text/plain"), expect=(415,)),
        Request("multipart", "urlencoded", *_body(b"files=abc", ctype="application/x-www-form-urlencoded"),
                expect=(415,)),
        # the files themselves
        upload("text-file", b"hello, not an image\n"),
        upload("html-file", b"<html><script>alert(1)</script></html>", filename="x.html", ctype="text/html"),
        upload("svg-file", b'<svg xmlns="http://www.w3.org/2000/svg" width="9" height="9"/>', filename="x.svg"),
        upload("truncated-jpeg", jpg[:len(jpg) // 2], filename="cut.jpg", ctype="image/jpeg"),
        upload("jpeg-header-only", jpg[:20], filename="head.jpg", ctype="image/jpeg"),
        upload("truncated-png", png()[:40]),
        upload("zero-byte-file", b""),
        upload("png-50000x50000", png_header(50_000, 50_000), expect=(413,)),
        upload("png-7000x7000", png_header(7_000, 7_000), expect=(413,)),  # 49 M pixels: over the 40 M limit
        upload("png-1x1000000", png_header(1, 1_000_000), expect=(200, 400, 413)),  # PIL fills a short IDAT
        upload("explain-text-file", b"not an image", path="/v1/explain"),
        # names and paths
        upload("filename-traversal-image", png(), kind="paths", filename="../../../../tmp/imgcls-hostile.png",
               expect=(200,)),
        upload("filename-traversal-text", b"root:x:0:0:root:/root:/bin/bash\n", kind="paths",
               filename="../../../../etc/passwd"),
        upload("filename-10k-chars", png(), kind="paths", filename="n" * 10_000 + ".png", expect=(200, 400, 413)),
        upload("filename-control-chars", png(), kind="paths", filename="a\tb\x1b[31mred.png", expect=(200, 400)),
        Request("paths", "static-dot-dot", head("GET", "/static/../../../../etc/passwd", key=None, ctype=None),
                expect=(404,)),
        Request("paths", "static-encoded-dot-dot", head("GET", "/static/%2e%2e/%2e%2e/serving/app.py", key=None,
                                                        ctype=None), expect=(404,)),
        Request("paths", "unknown-route", head("GET", "/v1/nothing", ctype=None), expect=(404,)),
        # parameters and methods
        Request("params", "top-k-negative", *_body(small, path="/v1/predict?top_k=-1")),
        Request("params", "top-k-words", *_body(small, path="/v1/predict?top_k=many")),
        Request("params", "top-k-1e999", *_body(small, path="/v1/predict?top_k=1e999")),
        Request("params", "explain-method-unknown",
                *_body(multipart([("file", "d.png", "image/png", png())]), path="/v1/explain?method=magic")),
        Request("params", "explain-format-unknown",
                *_body(multipart([("file", "d.png", "image/png", png())]), path="/v1/explain?format=exe")),
        Request("params", "get-predict", head("GET", "/v1/predict", ctype=None), expect=(405,)),
        Request("params", "delete-model", head("DELETE", "/v1/model", ctype=None), expect=(405,)),
        Request("params", "not-http", "\x00\x01 garbage request line", expect=(400,)),
        Request("params", "header-without-colon", head("GET", "/healthz", {"Broken header line": ""}, ctype=None)
                .replace("Broken header line: ", "Broken header line"), expect=(400,)),
    ]
    ids = [r.id for r in reqs]
    assert len(ids) == len(set(ids)), sorted({i for i in ids if ids.count(i) > 1})
    return reqs


def _body(body: bytes, ctype: str = f"multipart/form-data; boundary={BOUNDARY}",
          path: str = "/v1/predict") -> tuple[str, bytes]:
    return head("POST", path, length=len(body), ctype=ctype), body


def _chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


# ---------------------------------------------------------------- sending and judging


def body_chunks(req: Request, size: int = 1 << 16) -> Iterator[bytes]:
    for data in (req.body, *[req.filler] * req.repeat, req.trailer):
        for i in range(0, len(data), size):
            yield data[i:i + size]


def send(port: int, req: Request) -> Answer:
    """Send ``req`` on a fresh connection while a thread reads the answer; what came back."""
    started = time.monotonic()
    received = bytearray()
    errors: list[str] = []
    sent = 0
    try:
        sock = socket.create_connection((HOST, port), timeout=req.timeout)
    except OSError as exc:
        return Answer(None, dropped=True, error=f"cannot connect: {exc}")

    def read() -> None:
        try:
            while chunk := sock.recv(1 << 16):
                received.extend(chunk)
        except OSError as exc:  # a reset after the answer, or a timeout
            errors.append(f"recv: {exc.__class__.__name__}")

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        sock.sendall(req.head.encode("latin-1") + b"\r\n\r\n")
        if req.send_body:
            for piece in body_chunks(req):
                sock.sendall(piece)
                sent += len(piece)
    except OSError as exc:  # the server answered early and closed: what the guard does without the key
        errors.append(f"send: {exc.__class__.__name__}")
    reader.join(req.timeout)
    sock.close()
    status = None
    text = bytes(received)
    if text.startswith(b"HTTP/"):
        try:
            status = int(text.split(b" ", 2)[1])
        except (IndexError, ValueError):
            status = None
    body = text.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in text else b""
    return Answer(status, body, dropped=status is None, sent=sent, seconds=time.monotonic() - started,
                  error="; ".join(errors))


def judge_answer(req: Request, answer: Answer, secrets: tuple[str, ...] = ()) -> list[tuple[str, str]]:
    """Problems of an answer, as (kind, detail): "server error", "dropped", "wrong status", "leak"."""
    found = []
    if answer.status is not None and answer.status >= 500 and 500 not in req.expect:
        found.append(("server error", f"{answer.status}: {answer.body[:300]!r}"))
    elif answer.dropped and not req.may_drop:
        found.append(("dropped", f"no answer ({answer.error or 'closed'}) after sending {answer.sent:,} bytes"))
    elif answer.status is not None and answer.status not in req.expect:
        found.append(("wrong status", f"{answer.status}, expected {req.expect}: {answer.body[:300]!r}"))
    text = answer.body.decode("utf-8", "replace")
    if leaked := [w for w in (*LEAKS, *secrets) if w and w in text]:
        found.append(("leak", f"the answer holds {leaked}: {text[:300]!r}"))
    return found
