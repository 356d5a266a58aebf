"""What every HTTP request meets before a route reads it: the ASGI middleware of the app.

:class:`Guard` checks the API key from the headers, caps the request body, drops a client that stops sending
it, and adds the security headers to every answer; :class:`RecordMetrics`, outermost, counts and times every
request by route and status, the guard's own refusals included.  :func:`imgcls.serving.app.create_app`
installs both.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Callable

from imgcls.serving.errors import ServingError, error_response

API_KEY_HEADER = "X-API-Key"
MULTIPART_SLACK = 64 * 1024  # bytes of multipart headers allowed per file on top of max_bytes
MAX_REQUEST_BYTES = 64_000_000  # default cap on a whole request body, whatever its number of files
CLIENT_TIMEOUT = 20.0  # seconds a client may pause while sending a request body before it is dropped (408)
# With a key, these need it, checked from the headers before a byte of the body is read.
KEYED_PATHS = ("/v1/", "/metrics", "/openapi.json", "/docs", "/redoc")
# Sent with every answer; the page's own policy (PAGE_CSP in imgcls.serving.app) replaces the bare frame-ancestors one.
SECURITY_HEADERS = ((b"x-content-type-options", b"nosniff"), (b"referrer-policy", b"no-referrer"))
FRAME_CSP = "frame-ancestors 'none'"
ROUTES = ("/", "/v1/predict", "/v1/explain", "/v1/model", "/healthz", "/readyz", "/metrics", "/docs",
          "/openapi.json")  # labels of the requests metric; anything else counts as "other"
CLOSING_STATUSES = (400, 401, 408, 413)  # answers after which the server stops reading the request


class Guard:
    """What every HTTP request meets before a route reads it.

    * With an API key, the routes under ``KEYED_PATHS`` answer 401 from the
      headers alone: no byte of the body of a request without the key is read
      or spooled.
    * The whole body is capped at ``limit`` bytes: 413 from its Content-Length,
      or as soon as a streamed body passes it.
    * A client that sends no part of its body for ``timeout`` seconds is
      answered 408 and dropped.
    * Every answer carries ``SECURITY_HEADERS`` and a Content-Security-Policy
      that forbids framing.
    """

    def __init__(self, app, api_key: str | None, limit: int, timeout: float):
        self.app, self.limit, self.timeout = app, limit, timeout
        self.api_key = None if api_key is None else api_key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def secured_send(msg):
            if msg["type"] == "http.response.start":
                headers = list(msg.get("headers", []))
                if not any(k.lower() == b"content-security-policy" for k, _ in headers):
                    headers.append((b"content-security-policy", FRAME_CSP.encode()))
                if msg["status"] in CLOSING_STATUSES and not any(k.lower() == b"connection" for k, _ in headers):
                    # The body of a refused request is not read: the connection ends with the answer, or
                    # keeping it alive would mean draining whatever the client goes on sending.
                    headers.append((b"connection", b"close"))
                msg = {**msg, "headers": headers + list(SECURITY_HEADERS)}
            await send(msg)

        headers = dict(scope["headers"])
        if self.api_key is not None and scope["path"].startswith(KEYED_PATHS):
            key = headers.get(API_KEY_HEADER.lower().encode())
            if key is None or not hmac.compare_digest(key, self.api_key):  # constant time: no timing oracle
                return await error_response(401, "unauthorized", f"missing or wrong API key: send the server's key "
                                            f"in the {API_KEY_HEADER} header")(scope, receive, secured_send)
        length = headers.get(b"content-length")
        too_large = f"the request body is larger than the limit of {self.limit:,} bytes"
        if length is not None and not length.isdigit():
            return await error_response(400, "bad_request", "the Content-Length header is not a whole number")(
                scope, receive, secured_send)
        if length is not None and int(length) > self.limit:
            return await error_response(413, "too_large", too_large)(scope, receive, secured_send)
        received, done = 0, False

        async def guarded_receive():
            nonlocal received, done
            if done:  # the body is in: waiting for a disconnect may take as long as the answer does
                return await receive()
            try:
                msg = await asyncio.wait_for(receive(), self.timeout)
            except asyncio.TimeoutError:
                raise ServingError(408, "timeout", f"the client sent no part of the request body for "
                                   f"{self.timeout:g} s; send the whole request at once") from None
            if msg["type"] == "http.request":
                received += len(msg.get("body", b""))
                done = not msg.get("more_body", False)
                if received > self.limit:
                    raise ServingError(413, "too_large", too_large)
            return msg

        await self.app(scope, guarded_receive, secured_send)


class RecordMetrics:
    """Count every HTTP request by route and status and time it: ``observe(route, status, seconds)`` for each."""

    def __init__(self, app, observe: Callable[[str, int, float], None]):
        self.app, self.observe = app, observe

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        started, status = time.perf_counter(), 500  # 500 unless a response starts

        async def recording_send(msg):
            nonlocal status
            if msg["type"] == "http.response.start":
                status = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, recording_send)
        finally:
            self.observe(_route_label(scope), status, time.perf_counter() - started)


def _route_label(scope) -> str:
    route = scope.get("route")
    path = getattr(route, "path", None) or scope.get("path", "")
    if path in ROUTES or path == "/static":
        return path
    return "/static" if path.startswith("/static/") else "other"
