"""Graceful drain of a serving worker on SIGTERM: finish everything that was sent, take nothing new.

BentoML's workers share one listening socket, which the arbiter holds too. uvicorn's own
shutdown (``Server.shutdown``) closes each worker's copy of it and at once closes every
keep-alive connection that is between requests. Under load both lose requests (measured: 48
resets in 5,800 requests at 32 clients):

* the kernel goes on completing handshakes into the shared accept queue until the arbiter,
  the last holder, exits; nobody accepts them, and they are reset then, with the client's
  request already written;
* a continuous client's connection is "between requests" for microseconds only: its next
  request is often on the wire when uvicorn closes it.

:func:`install` replaces ``uvicorn.Server.handle_exit`` (BentoML builds the server after the
service module is imported). On the first SIGTERM or SIGINT a worker:

1. marks itself draining: ``/ready`` (and BentoML's ``/readyz``) answer 503 at once, and every
   response carries ``Connection: close``, so each keep-alive connection closes right after its
   next complete response;
2. stops new connections *at the socket*: a drop-everything BPF filter on the shared listening
   socket means no new handshake completes (a client's SYN goes unanswered and, once the
   listener is closed, is refused), while the connections already in the accept queue are still
   accepted and served;
3. waits until the accept queue is empty (``TCP_INFO``) and every connection has closed: a
   connection idle for ``IDLE_CLOSE_SECONDS`` (no request in progress, nothing received) is
   closed by the server, as uvicorn's keep-alive timeout would;
4. then lets uvicorn shut down (lifespan shutdown: queues flushed, the audit log written).

Requests in flight and queued complete. Past the drain time (``MLSERVE_DRAIN_SECONDS`` less
``FORCE_MARGIN_SECONDS``), or on a second signal, the worker forces the rest. A worker is sent
SIGTERM only when its whole server stops (the arbiter stopping; mlserve never scales workers
down), so the listener filter, which every worker shares, is what we want.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import logging
import signal
import socket
import struct
import sys
import time
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("mlserve.drain")

IDLE_CLOSE_SECONDS = 2.0
"""A keep-alive connection with no request in progress and no byte received for this long is
closed by the draining server (a continuous client sends its next request within
milliseconds of the previous response; uvicorn's own keep-alive timeout is 5 s)."""
FORCE_MARGIN_SECONDS = 1.0
"""The worker forces its remaining connections this long before the drain time, so that it
ends before the supervisor signals what is left."""
POLL_SECONDS = 0.05
SO_ATTACH_FILTER = getattr(socket, "SO_ATTACH_FILTER", 26)
_DROP_ALL = struct.pack("HBBI", 0x06, 0, 0, 0)  # BPF_RET | BPF_K, 0: accept no packet


@dataclass
class DrainState:
    """This worker's drain: read by /ready and by the response headers (event loop only)."""

    draining: bool = False
    started: float | None = None
    closed: dict[str, int] = field(default_factory=lambda: {"idle": 0, "forced": 0})


STATE = DrainState()


def stop_new_connections(sock: Any) -> str | None:
    """Attach a drop-everything filter to listening socket ``sock``: no new handshake completes,
    while the connections already queued stay queued for ``accept``. Returns None, or why it
    could not (it logs nothing: it runs in a signal handler)."""
    if not sys.platform.startswith("linux"):
        return f"not supported on {sys.platform}"
    insn = ctypes.create_string_buffer(_DROP_ALL, len(_DROP_ALL))
    program = struct.pack("HxxxxxxQ", 1, ctypes.addressof(insn))  # struct sock_fprog
    try:
        sock.setsockopt(socket.SOL_SOCKET, SO_ATTACH_FILTER, program)
    except OSError as exc:
        return str(exc)
    return None


def accept_queue_length(sock: Any) -> int:
    """Connections waiting in listening socket ``sock``'s accept queue (Linux ``TCP_INFO``:
    ``tcpi_unacked`` of a listener); 0 where it cannot be read."""
    tcp_info = getattr(socket, "TCP_INFO", None)
    if tcp_info is None:
        return 0
    try:
        info = sock.getsockopt(socket.IPPROTO_TCP, tcp_info, 104)
    except OSError:
        return 0
    # struct tcp_info: 8 one-byte fields, then u32 rto, ato, snd_mss, rcv_mss, unacked, ...
    return struct.unpack_from("I", info, 24)[0] if len(info) >= 28 else 0


def _idle(conn: Any) -> bool:
    cycle = getattr(conn, "cycle", None)
    return cycle is None or bool(getattr(cycle, "response_complete", False))


class WorkerDrain:
    """Drives one uvicorn server's drain (see the module docstring)."""

    def __init__(self, server: Any, seconds: float, state: DrainState | None = None):
        self.server = server
        self.seconds = seconds
        self.state = state or STATE
        self._idle_since: dict[Any, tuple[Any, float]] = {}
        self._unfiltered: list[str] = []  # why a listener could not be closed to new connections

    def listeners(self) -> list[Any]:
        return [sock for srv in getattr(self.server, "servers", []) for sock in srv.sockets]

    def start(self) -> None:
        """The part that runs in the signal handler: plain assignments and a system call only.
        A handler runs between two bytecodes of the main thread, which may hold a lock at that
        moment (prometheus_client's one lock for every multiprocess value, say, in a request's
        counter update): taking it here would deadlock the worker. Metrics wait for :meth:`run`
        (measured: a worker under load froze on SIGTERM and answered nothing more)."""
        self.state.draining = True
        self.state.started = time.monotonic()
        self._unfiltered = [e for e in map(stop_new_connections, self.listeners()) if e]

    def _close_idle(self, now: float) -> None:
        connections = list(self.server.server_state.connections)
        for conn in connections:
            if not _idle(conn):
                self._idle_since.pop(conn, None)
                continue
            cycle = getattr(conn, "cycle", None)
            seen = self._idle_since.get(conn)
            if seen is None or seen[0] is not cycle:
                self._idle_since[conn] = (cycle, now)  # idle from now (a new request ended)
            elif now - seen[1] >= IDLE_CLOSE_SECONDS:
                self.state.closed["idle"] += 1
                conn.shutdown()  # uvicorn: closes an idle connection at once
                self._idle_since.pop(conn, None)
        for conn in [c for c in self._idle_since if c not in connections]:
            del self._idle_since[conn]

    def pending(self) -> tuple[int, int]:
        """(connections still queued for accept, connections open)."""
        queued = sum(accept_queue_length(sock) for sock in self.listeners())
        return queued, len(self.server.server_state.connections)

    async def run(self) -> None:
        _set_draining_metric(True)  # on the event loop, never in the signal handler
        for error in self._unfiltered:
            log.warning("could not stop new connections on the listener: %s", error)
        deadline = self.state.started + max(0.5, self.seconds - FORCE_MARGIN_SECONDS)
        log.warning("draining: /ready is 503, no new connections, finishing open ones")
        forced = False
        while True:
            now = time.monotonic()
            self._close_idle(now)
            queued, open_connections = self.pending()
            if not queued and not open_connections:
                break
            if now >= deadline:
                forced = True
                self.state.closed["forced"] += open_connections
                log.warning(
                    "drain time is up: forcing %d connection(s), %d still queued",
                    open_connections,
                    queued,
                )
                break
            await asyncio.sleep(POLL_SECONDS)
        log.warning(
            "drained in %.2f s (%d idle connection(s) closed)",
            time.monotonic() - self.state.started,
            self.state.closed["idle"],
        )
        self.server.should_exit = True
        if forced:
            self.server.force_exit = True


def _set_draining_metric(on: bool) -> None:
    with contextlib.suppress(Exception):  # metrics never stop a drain
        from mlserve import observability as obs

        obs.observe_draining(on)


def handle_exit(server: Any, sig: int, frame: Any, *, seconds: float, original: Any) -> None:
    """``uvicorn.Server.handle_exit`` with a drain in front: the first SIGTERM/SIGINT starts it;
    a second signal, or one that arrives with no running event loop, is uvicorn's own."""
    loop = asyncio._get_running_loop()
    if STATE.draining or loop is None or sig not in (signal.SIGTERM, signal.SIGINT):
        if STATE.draining:
            server.force_exit = True  # a second signal: stop waiting
        original(server, sig, frame)
        return
    server._captured_signals.append(sig)  # uvicorn re-raises it once shut down
    drain = WorkerDrain(server, seconds)
    drain.start()  # /ready is 503 and the listener takes nothing new from here on

    def _run() -> None:
        server._mlserve_drain = loop.create_task(drain.run())

    loop.call_soon_threadsafe(_run)  # a signal handler may interrupt the loop anywhere


def install(seconds: float) -> None:
    """Make every uvicorn server built in this process drain on SIGTERM (see the module)."""
    import uvicorn.server

    current = uvicorn.server.Server.handle_exit
    original = getattr(current, "_mlserve_original", current)

    def _handle_exit(self: Any, sig: int, frame: Any) -> None:
        handle_exit(self, sig, frame, seconds=seconds, original=original)

    _handle_exit._mlserve_original = original  # type: ignore[attr-defined]
    uvicorn.server.Server.handle_exit = _handle_exit  # type: ignore[method-assign]
