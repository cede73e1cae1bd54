"""The worker drain (mlserve.drain) against a real uvicorn server in this process."""

from __future__ import annotations

import asyncio
import signal
import socket
import threading
import time

import pytest
import uvicorn

from mlserve import drain
from mlserve.middleware import SecurityHeadersMiddleware


def test_the_listener_filter_refuses_new_handshakes_but_keeps_the_queue() -> None:
    listener = socket.create_server(("127.0.0.1", 0), backlog=16)
    port = listener.getsockname()[1]
    queued = [socket.create_connection(("127.0.0.1", port), timeout=2) for _ in range(2)]
    try:
        time.sleep(0.05)
        assert drain.accept_queue_length(listener) == 2
        assert drain.stop_new_connections(listener) is None
        with pytest.raises(TimeoutError):  # the SYN goes unanswered
            socket.create_connection(("127.0.0.1", port), timeout=0.3)
        accepted = [listener.accept()[0] for _ in queued]  # the queued ones are still there
        assert drain.accept_queue_length(listener) == 0
        queued[0].sendall(b"x")
        assert accepted[0].recv(1) == b"x"
        for sock in accepted:
            sock.close()
    finally:
        for sock in queued:
            sock.close()
        listener.close()
    with pytest.raises(ConnectionRefusedError):  # closed: refused, not reset
        socket.create_connection(("127.0.0.1", port), timeout=0.3)


async def _app(scope, receive, send) -> None:
    if scope["type"] != "http":
        return
    if scope["path"] == "/slow":
        await asyncio.sleep(0.5)
    elif scope["path"] == "/hang":
        await asyncio.sleep(30)
    await send(
        {"type": "http.response.start", "status": 200, "headers": [(b"content-length", b"2")]}
    )
    await send({"type": "http.response.body", "body": b"ok"})


async def _request(reader, writer, path: str) -> tuple[bytes, bytes]:
    writer.write(f"GET {path} HTTP/1.1\r\nhost: x\r\n\r\n".encode())
    await writer.drain()
    head = await reader.readuntil(b"\r\n\r\n")
    body = await reader.readexactly(2)
    return head.lower(), body


def test_a_draining_worker_finishes_open_requests_closes_idle_ones_and_exits(monkeypatch) -> None:
    monkeypatch.setattr(drain, "IDLE_CLOSE_SECONDS", 0.3)
    monkeypatch.setattr(drain, "STATE", drain.DrainState())
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    config = uvicorn.Config(
        SecurityHeadersMiddleware(_app), lifespan="off", log_level="warning", log_config=None
    )
    server = uvicorn.Server(config)

    async def go():
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        idle = await asyncio.open_connection("127.0.0.1", port)
        busy = await asyncio.open_connection("127.0.0.1", port)
        head, _ = await _request(*idle, "/")
        assert b"connection: close" not in head
        slow = asyncio.create_task(_request(*busy, "/slow"))
        await asyncio.sleep(0.1)  # /slow is in progress

        worker = drain.WorkerDrain(server, seconds=10, state=drain.STATE)
        started = time.monotonic()
        worker.start()
        assert drain.STATE.draining
        running = asyncio.create_task(worker.run())
        head, body = await slow  # finished, and told to close
        assert body == b"ok" and b"connection: close" in head
        assert await busy[0].read() == b""  # then closed by the server
        assert await idle[0].read() == b""  # the idle one: closed after IDLE_CLOSE_SECONDS
        assert time.monotonic() - started >= 0.3
        with pytest.raises(TimeoutError):  # no new connection is taken
            await asyncio.wait_for(asyncio.open_connection("127.0.0.1", port), 0.3)
        await running
        assert server.should_exit and not server.force_exit
        await asyncio.wait_for(serving, 5)
        return drain.STATE.closed

    closed = asyncio.run(go())
    assert closed == {"idle": 1, "forced": 0}


def test_a_drain_past_its_time_forces_the_rest(monkeypatch) -> None:
    monkeypatch.setattr(drain, "STATE", drain.DrainState())
    monkeypatch.setattr(drain, "FORCE_MARGIN_SECONDS", 0.0)
    listener = socket.create_server(("127.0.0.1", 0))
    port = listener.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(_app, lifespan="off", log_config=None))

    async def go():
        serving = asyncio.create_task(server.serve(sockets=[listener]))
        while not server.started:
            await asyncio.sleep(0.01)
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        writer.write(b"GET /hang HTTP/1.1\r\nhost: x\r\n\r\n")  # never answered
        await writer.drain()
        await asyncio.sleep(0.1)
        worker = drain.WorkerDrain(server, seconds=0.5)
        worker.start()
        started = time.monotonic()
        await worker.run()
        took = time.monotonic() - started
        assert server.should_exit and server.force_exit
        await asyncio.wait_for(serving, 5)
        writer.close()
        return took

    took = asyncio.run(go())
    assert 0.45 <= took < 2
    assert drain.STATE.closed["forced"] == 1


def test_install_drains_on_the_first_signal_and_forces_on_the_second(monkeypatch) -> None:
    monkeypatch.setattr(drain, "STATE", drain.DrainState())
    original = uvicorn.server.Server.handle_exit
    drain.install(5)
    try:
        assert uvicorn.server.Server.handle_exit._mlserve_original is original
        drain.install(5)  # idempotent: wraps uvicorn's own handler, never itself
        assert uvicorn.server.Server.handle_exit._mlserve_original is original
        server = uvicorn.Server(uvicorn.Config(_app, log_config=None))
        server.servers = []

        async def go():
            server.handle_exit(signal.SIGTERM, None)
            assert drain.STATE.draining and not server.should_exit
            await asyncio.sleep(0)  # the drain task starts in the loop, not in the handler
            await server._mlserve_drain  # nothing open: done at once
            assert server.should_exit and not server.force_exit
            server.handle_exit(signal.SIGTERM, None)
            assert server.force_exit

        asyncio.run(go())
        assert server._captured_signals == [signal.SIGTERM, signal.SIGTERM]
    finally:
        uvicorn.server.Server.handle_exit = original


def test_the_signal_handler_takes_no_lock_the_interrupted_code_may_hold(monkeypatch) -> None:
    """A signal handler runs between two bytecodes of the main thread: if that thread is inside
    a metric update (prometheus_client's value lock, not reentrant) when SIGTERM comes, a
    handler that sets the draining gauge deadlocks the worker (CI: a worker under load froze
    on SIGTERM). The handler only marks the drain; the gauge is set on the event loop."""
    from prometheus_client import REGISTRY

    from mlserve import observability as obs

    monkeypatch.setattr(drain, "STATE", drain.DrainState())
    server = uvicorn.Server(uvicorn.Config(_app, log_config=None))
    server.servers = []
    lock = obs.metrics().draining._value._lock
    original = uvicorn.server.Server.handle_exit

    async def go():
        with lock:  # the interrupted code holds it
            handled = threading.Thread(
                target=drain.handle_exit,
                args=(server, signal.SIGTERM, None),
                kwargs={"seconds": 5, "original": original},
            )
            # Same thread in production; here another thread stands for it, and a handler that
            # waits on the lock shows as a thread still running.
            handled.start()
            handled.join(2)
            assert not handled.is_alive(), "the signal handler waited for a lock"
        assert drain.STATE.draining
        while not hasattr(server, "_mlserve_drain"):
            await asyncio.sleep(0)  # the drain task starts on the loop
        await server._mlserve_drain
        return REGISTRY.get_sample_value("mlserve_draining")

    monkeypatch.setattr(drain.asyncio, "_get_running_loop", lambda: loop)
    loop = asyncio.new_event_loop()
    try:
        assert loop.run_until_complete(go()) == 1.0
    finally:
        loop.close()
        obs.observe_draining(False)
