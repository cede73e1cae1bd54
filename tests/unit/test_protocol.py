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


def test_headers_over_the_byte_cap_get_431_and_the_connection_is_closed(
    port: int, monkeypatch
) -> None:
    """httptools reads headers however large they grow (h11 stops at 16 KB): the protocol caps
    the bytes of incomplete headers and answers 431 past the cap, long before the timeout."""
    if protocol.HeaderTimeoutHttpToolsProtocol is None:
        pytest.skip("httptools is not installed")
    monkeypatch.setattr(protocol.HeaderBytesMixin, "max_header_bytes", 64 * 1024)
    start = time.monotonic()
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        sock.sendall(b"GET / HTTP/1.1\r\nHost: x\r\nX-Big: ")
        got = b""
        try:
            for _ in range(64):  # up to 4 MB of one header, never completed
                sock.sendall(b"a" * 65536)
        except OSError:  # the server closed the connection: the cap worked
            pass
        while chunk := sock.recv(4096):
            got += chunk
    assert got.startswith(b"HTTP/1.1 431 "), got[:200]
    assert b'"error":"headers_too_large"' in got
    assert time.monotonic() - start < 0.5  # not the header timeout (0.5 s here)


def test_a_request_with_ordinary_headers_and_a_body_passes_the_cap(port: int, monkeypatch) -> None:
    if protocol.HeaderTimeoutHttpToolsProtocol is None:
        pytest.skip("httptools is not installed")
    monkeypatch.setattr(protocol.HeaderBytesMixin, "max_header_bytes", 64 * 1024)
    body = b"x" * (512 * 1024)  # the body does not count towards the cap
    request = b"POST / HTTP/1.1\r\nHost: x\r\nContent-Length: %d\r\n\r\n" % len(body)
    with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
        for _ in range(2):  # and the next request on the same connection too
            sock.sendall(request + body)
            got = b""
            while b"ok" not in got:
                got += sock.recv(4096)
            assert got.startswith(b"HTTP/1.1 200 "), got[:200]
