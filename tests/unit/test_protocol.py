"""The header timeout (mlserve.protocol) on a real uvicorn server with uvicorn's protocol."""

from __future__ import annotations

import socket
import threading
import time

import pytest
import uvicorn

from mlserve import protocol


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.fixture
def port(monkeypatch) -> int:
    monkeypatch.setattr(protocol.HeaderTimeoutMixin, "header_timeout", 0.5)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        free = s.getsockname()[1]
    config = uvicorn.Config(
        _app,
        host="127.0.0.1",
        port=free,
        log_level="warning",
        http=protocol.HeaderTimeoutAutoProtocol,
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    yield free
    server.should_exit = True
    thread.join(10)


def _until_closed(port: int, first: bytes) -> tuple[bytes, float]:
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(first)
        got = b""
        while chunk := sock.recv(4096):
            got += chunk
    return got, time.monotonic() - start


def test_slow_headers_get_408_and_the_connection_is_closed(port: int) -> None:
    got, took = _until_closed(port, b"POST /predict HTTP/1.1\r\nHost: x\r\n")
    assert got.startswith(b"HTTP/1.1 408 ") and b"request_timeout" in got
    assert 0.4 < took < 3.0


def test_the_next_request_on_a_kept_alive_connection_is_bounded_too(port: int) -> None:
    got, took = _until_closed(port, b"GET / HTTP/1.1\r\nHost: x\r\n\r\nGET /")
    assert got.startswith(b"HTTP/1.1 200 ") and b"HTTP/1.1 408 " in got
    assert took < 3.0


def test_complete_requests_are_not_affected(port: int) -> None:
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(3):
            sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n")
            got = b""
            while not got.endswith(b"0\r\n\r\n"):  # the end of the chunked answer
                chunk = sock.recv(4096)
                assert chunk, got
                got += chunk
            assert got.startswith(b"HTTP/1.1 200 ")
            time.sleep(0.3)  # under the timeout between requests
