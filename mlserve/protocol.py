"""A header timeout for uvicorn's HTTP/1.1 protocol (slow clients, "slowloris").

BentoML 1.4 runs each worker's app with ``uvicorn.Config(..., timeout_keep_alive=...)`` and
uvicorn's default HTTP protocol. uvicorn arms its keep-alive timer
only once a response is complete, and cancels it on every byte received; nothing bounds how long
a request's *headers* may take. A client that opens a connection and sends one header byte a
second holds that connection (and its file descriptor) for as long as it likes; enough of them
exhaust the worker. An ASGI middleware cannot help: the app is called only once the headers are
complete. BentoML exposes no setting for it either (its ``http`` / ``traffic`` options map to
``timeout_keep_alive``, ``timeout_graceful_shutdown`` and the request timeout).

uvicorn's default is httptools when installed (a dependency of mlserve), else h11.
:class:`HeaderTimeoutMixin` adds one timer to either: armed when the connection is made and
again when a response completes (waiting for the next request); if it fires before a new
request's headers are complete, the client gets ``408`` and the connection is closed. The
request body has its own limit (MLSERVE_BODY_TIMEOUT_SECONDS, in ``mlserve.http``).
:func:`install` points uvicorn's ``auto``, ``h11`` and ``httptools`` protocol names at these
classes; the service calls it at import, which in a BentoML worker comes before the uvicorn
config is built.
"""

from __future__ import annotations

import asyncio
import weakref
from typing import Any

_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_BODY = b'{"error":"request_timeout","message":"the request headers did not arrive in time"}'


class HeaderTimeoutMixin:
    """A timer on top of a uvicorn HTTP/1.1 protocol (h11 or httptools).

    Armed when the connection is made and when a response completes; when it fires, the
    connection is still waiting for a request's headers if no new request cycle has started
    since it was armed (both protocols start a cycle once a request's headers are complete).
    """

    header_timeout: float = 10.0
    loop: asyncio.AbstractEventLoop
    transport: asyncio.Transport
    cycle: Any

    def _arm_header_timer(self) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        # A weak reference: a timer holding the finished cycle itself kept every request's
        # scope and response alive for the whole timeout (measured: 60 MB per worker under a
        # flood of 10,000 requests).
        armed = weakref.ref(self.cycle) if self.cycle is not None else None
        self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late, armed)

    def connection_made(self, transport: asyncio.Transport) -> None:
        super().connection_made(transport)  # type: ignore[misc]
        self._arm_header_timer()

    def on_response_complete(self) -> None:
        super().on_response_complete()  # type: ignore[misc]
        if not self.transport.is_closing():
            self._arm_header_timer()  # a pipelined request already started: see _headers_late

    def connection_lost(self, exc: Exception | None) -> None:
        timer = getattr(self, "_header_timer", None)
        if timer is not None:
            timer.cancel()
        super().connection_lost(exc)  # type: ignore[misc]

    def _headers_late(self, armed: weakref.ref | None) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        cycle_when_armed = armed() if armed is not None else None
        if (armed is not None and cycle_when_armed is None) or self.cycle is not cycle_when_armed:
            return  # a request's headers arrived since: its own limits apply
        if self.cycle is not None and not self.cycle.response_complete:
            return  # still answering the request (a pipelined one, say)
        if getattr(self.cycle, "more_body", False):
            self.transport.close()  # answered (408) while its body was still arriving
            return
        try:
            self.transport.write(_408 % (len(_BODY), _BODY))
        finally:
            self.transport.close()


_431 = (
    b"HTTP/1.1 431 Request Header Fields Too Large\r\ncontent-type: application/json\r\n"
    b"connection: close\r\ncontent-length: %d\r\n\r\n%s"
)


class HeaderBytesMixin:
    """A cap on the bytes of a request's headers, for httptools' protocol.

    h11 refuses a header block over 16 KB (400) as it parses; httptools keeps reading however
    large it grows, and :class:`mlserve.middleware.HeaderLimitMiddleware` (431) sees the headers
    only once they are complete. So bytes received while a request's headers are incomplete are
    counted, and past ``max_header_bytes`` the client gets 431 and the connection is closed
    (counting starts with the read after a request's first byte: the cap holds to within one
    read).
    """

    max_header_bytes: int = (64 + 64) * 1024
    transport: asyncio.Transport

    def on_message_begin(self) -> None:
        self._header_bytes, self._reading_headers = 0, True
        super().on_message_begin()  # type: ignore[misc]

    def on_headers_complete(self) -> None:
        self._reading_headers = False
        super().on_headers_complete()  # type: ignore[misc]

    def data_received(self, data: bytes) -> None:
        if getattr(self, "_reading_headers", True):
            self._header_bytes = getattr(self, "_header_bytes", 0) + len(data)
        super().data_received(data)  # type: ignore[misc]
        # Still inside a request's headers after this chunk (a chunk that completes them, body
        # and all, passes): over the cap, refuse.
        if (
            getattr(self, "_reading_headers", True)
            and self._header_bytes > self.max_header_bytes
            and not self.transport.is_closing()
        ):
            body = (
                b'{"error":"headers_too_large","message":"the request headers are over '
                b'the %d byte limit"}' % self.max_header_bytes
            )
            self.transport.write(_431 % (len(body), body))
            self.transport.close()


def _with_header_timeout(base: type, *mixins: type) -> type:
    return type(f"HeaderTimeout{base.__name__}", (*mixins, HeaderTimeoutMixin, base), {})


from uvicorn.protocols.http.h11_impl import H11Protocol  # noqa: E402

HeaderTimeoutH11Protocol = _with_header_timeout(H11Protocol)
try:  # uvicorn's default protocol when installed (uvicorn[standard])
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # only h11 here (BentoML does not require httptools)
    HeaderTimeoutHttpToolsProtocol = None
else:
    HeaderTimeoutHttpToolsProtocol = _with_header_timeout(HttpToolsProtocol, HeaderBytesMixin)
HeaderTimeoutAutoProtocol = HeaderTimeoutHttpToolsProtocol or HeaderTimeoutH11Protocol


def install(header_timeout: float, max_header_bytes: int | None = None) -> None:
    """Make uvicorn's ``auto``, ``h11`` and ``httptools`` protocols bound request headers to
    ``header_timeout`` seconds (and, with httptools, to ``max_header_bytes``)."""
    import uvicorn.config

    HeaderTimeoutMixin.header_timeout = header_timeout
    if max_header_bytes is not None:
        HeaderBytesMixin.max_header_bytes = max_header_bytes
    protocols = {
        "auto": "HeaderTimeoutAutoProtocol",
        "h11": "HeaderTimeoutH11Protocol",
        "httptools": "HeaderTimeoutHttpToolsProtocol",
    }
    for name, cls in protocols.items():
        if globals()[cls] is not None:
            uvicorn.config.HTTP_PROTOCOLS[name] = f"{__name__}:{cls}"
