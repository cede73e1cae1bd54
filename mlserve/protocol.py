"""A header timeout for uvicorn's HTTP/1.1 protocol (slow clients, "slowloris").

BentoML 1.4 runs each worker's app with ``uvicorn.Config(..., timeout_keep_alive=...)`` and
uvicorn's default HTTP protocol (httptools when installed). uvicorn arms its keep-alive timer
only once a response is complete, and cancels it on every byte received; nothing bounds how long
a request's *headers* may take. A client that opens a connection and sends one header byte a
second holds that connection (and its file descriptor) for as long as it likes; enough of them
exhaust the worker. An ASGI middleware cannot help: the app is called only once the headers are
complete. BentoML exposes no setting for it either (its ``http`` / ``traffic`` options map to
``timeout_keep_alive``, ``timeout_graceful_shutdown`` and the request timeout).

:class:`HeaderTimeoutProtocol` is uvicorn's httptools protocol with one timer: armed when the
connection is made and again when a response completes (waiting for the next request), cancelled
when a request's headers are complete. If it fires while headers are still awaited, the client
gets ``408`` and the connection is closed. The request body has its own limit
(MLSERVE_BODY_TIMEOUT_SECONDS, in ``mlserve.http``). :func:`install` makes uvicorn use it for
``http="auto"`` / ``"httptools"``; the service calls it at import, before BentoML builds the
uvicorn config.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

log = logging.getLogger("mlserve.protocol")

_408 = (
    b"HTTP/1.1 408 Request Timeout\r\ncontent-type: application/json\r\nconnection: close\r\n"
    b"content-length: %d\r\n\r\n%s"
)
_BODY = (
    b'{"error":{"code":"request_timeout","message":"the request headers did not arrive in time"}}'
)

try:  # httptools is uvicorn's default protocol when installed (uvicorn[standard], BentoML)
    from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol
except ImportError:  # pragma: no cover - without httptools, uvicorn's h11 runs unchanged
    HttpToolsProtocol = None  # type: ignore[assignment,misc]


if HttpToolsProtocol is not None:

    class HeaderTimeoutProtocol(HttpToolsProtocol):  # type: ignore[misc,valid-type]
        """uvicorn's httptools protocol with a bound on how long request headers may take."""

        header_timeout: float = 10.0

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._header_timer: asyncio.TimerHandle | None = None

        def _arm_header_timer(self) -> None:
            self._cancel_header_timer()
            self._header_timer = self.loop.call_later(self.header_timeout, self._headers_late)

        def _cancel_header_timer(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm_header_timer()

        def on_headers_complete(self) -> None:
            self._cancel_header_timer()
            super().on_headers_complete()

        def on_response_complete(self) -> None:
            # A pipelined request already has its headers; otherwise wait for the next one's.
            waiting = not self.pipeline
            super().on_response_complete()
            if waiting and not self.transport.is_closing():
                self._arm_header_timer()

        def connection_lost(self, exc: Exception | None) -> None:
            self._cancel_header_timer()
            super().connection_lost(exc)

        def _headers_late(self) -> None:
            self._header_timer = None
            busy = self.cycle is not None and not self.cycle.response_complete
            if busy or self.transport.is_closing():
                return  # a request is being served: its own limits apply
            with_body = _408 % (len(_BODY), _BODY)
            try:
                self.transport.write(with_body)
            finally:
                self.transport.close()

else:  # pragma: no cover
    HeaderTimeoutProtocol = None  # type: ignore[assignment,misc]


def install(header_timeout: float) -> bool:
    """Make uvicorn's ``auto`` and ``httptools`` protocols :class:`HeaderTimeoutProtocol` (with
    ``header_timeout`` seconds). False (and a warning) when httptools is not installed."""
    if HeaderTimeoutProtocol is None:
        log.warning("httptools is not installed: request headers have no time limit")
        return False
    import uvicorn.config

    HeaderTimeoutProtocol.header_timeout = header_timeout
    target = f"{__name__}:HeaderTimeoutProtocol"
    uvicorn.config.HTTP_PROTOCOLS["auto"] = target
    uvicorn.config.HTTP_PROTOCOLS["httptools"] = target
    return True
