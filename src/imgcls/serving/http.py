"""The HTTP connection: uvicorn's h11 protocol, with a deadline on a request's headers.

uvicorn times out an idle keep-alive connection, but not one that sends its
request line and headers a byte at a time: such a client holds a connection
(and a file descriptor) for as long as it likes, and a few hundred of them
exhaust the server.  Here every request's headers must be complete within
``header_timeout`` seconds of the connection opening, or of the previous
answer on a kept-alive connection; otherwise the client is answered 408 and
dropped.  A body that stalls is the business of the app (``Guard`` in
:mod:`imgcls.serving.guard`); headers come before any app code runs, so they
are timed here.  h11 already caps the size of the headers (16 KiB).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol

_TIMEOUT_BODY = b"the request headers took too long to send; send the whole request at once"
_TIMEOUT_ANSWER = (b"HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\nconnection: close\r\n"
                   b"content-length: %d\r\n\r\n%s" % (len(_TIMEOUT_BODY), _TIMEOUT_BODY))


class HeaderDeadlineProtocol(H11Protocol):
    """H11Protocol that answers 408 and closes when a request's headers take longer than ``header_timeout`` s."""

    header_timeout: float = 20.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._deadline: asyncio.TimerHandle | None = None
        self._arm()

    def handle_events(self) -> None:
        before = self.cycle
        super().handle_events()
        if self.cycle is not before:  # a request's headers are in: its body is the app's to time
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
            self._arm()  # the next request on this connection gets its own deadline

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._deadline = self.loop.call_later(self.header_timeout, self._expire)

    def _disarm(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None

    def _expire(self) -> None:
        self._deadline = None
        if not self.transport.is_closing():
            self.transport.write(_TIMEOUT_ANSWER)
            self.transport.close()


def protocol_with_deadline(header_timeout: float) -> type[HeaderDeadlineProtocol]:
    """A :class:`HeaderDeadlineProtocol` class (what ``uvicorn.Config(http=...)`` takes) with this deadline."""
    return type("HeaderDeadlineProtocol", (HeaderDeadlineProtocol,), {"header_timeout": float(header_timeout)})
