"""Graceful drain (issue #12 §1): SIGTERM to `mlserve serve` while 32 clients send without pause.

What a client sees: every request it wrote to an open connection gets a complete response (the
last ones carry ``Connection: close``); a *new* connection after the signal is not taken (its
handshake goes unanswered, then is refused once the listener is closed). Never a reset, an EOF
or a truncated body. `/ready`, asked on a connection that was already open, turns 503 at once.
Every process of the server is gone within MLSERVE_DRAIN_SECONDS."""

from __future__ import annotations

import contextlib
import http.client
import json
import signal
import socket
import threading
import time
from collections import Counter
from pathlib import Path

import psutil
import pytest

from tests.integration.conftest import (
    READY_TIMEOUT_S,
    _tail,
    process_alive,
    spawn_mlserve_serve,
    wait_until_answers,
)

pytestmark = pytest.mark.integration

CLIENTS = 32
DRAIN_SECONDS = 15
TEXTS = [
    "The striker scored twice in the final minutes of the cup tie",
    "Shares fell sharply after the bank reported lower quarterly profits",
    "This medication eased my migraines, although the first week brought some nausea",
    "The new album tops the charts in its first week of release",
]


class Tally:
    """What the clients saw, by outcome."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.lost: list[str] = []
        self.statuses: Counter[int] = Counter()

    def add(self, outcome: str, detail: str = "") -> None:
        with self.lock:
            self.counts[outcome] += 1
            if outcome == "lost":
                self.lost.append(detail)


def client_loop(
    port: int, tag: str, n: int, stop: threading.Event, tally: Tally, signalled
) -> None:
    """One client: keep-alive POST /predict without pause; reconnect after `Connection: close`."""
    conn: http.client.HTTPConnection | None = None
    i = 0
    while not stop.is_set():
        if conn is None:
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
            try:
                conn.connect()
            except (ConnectionRefusedError, TimeoutError, OSError) as exc:
                # Not taken: fine once the server is stopping, a failure before.
                tally.add("refused" if signalled() else "lost", f"connect before SIGTERM: {exc!r}")
                conn = None
                time.sleep(0.05)
                continue
        body = json.dumps({"text": f"{TEXTS[(n + i) % len(TEXTS)]} {i}", "model_version": tag})
        i += 1
        try:
            conn.request("POST", "/predict", body, {"Content-Type": "application/json"})
        except OSError as exc:  # could not even write: the peer had closed (that is a loss too)
            tally.add("lost", f"write: {exc!r}")
            conn.close()
            conn = None
            continue
        try:
            response = conn.getresponse()
            payload = response.read()  # IncompleteRead on a truncated body
            closing = (response.getheader("connection") or "").lower() == "close"
        except (OSError, http.client.HTTPException) as exc:
            tally.add("lost", f"{'after' if signalled() else 'before'} SIGTERM: {exc!r}")
            conn.close()
            conn = None
            continue
        with tally.lock:
            tally.statuses[response.status] += 1
        if response.status == 200 and json.loads(payload)["model_version"] != tag:
            tally.add("lost", f"a wrong answer: {payload[:200]!r}")
        tally.add("answered_closing" if closing else "answered")
        if closing or response.will_close:
            conn.close()
            conn = None


@pytest.mark.parametrize("tag", ["topic:v1", "sentiment:v2"], ids=["classical", "transformer"])
def test_sigterm_under_load_answers_every_written_request(
    model_home: Path, tmp_path: Path, tag: str
) -> None:
    proc, port, log = spawn_mlserve_serve(
        model_home,
        tmp_path,
        MLSERVE_MODELS=tag,
        MLSERVE_DEFAULT_MODEL=tag.split(":")[0],
        MLSERVE_WORKERS="2",
        MLSERVE_DRAIN_SECONDS=str(DRAIN_SECONDS),
        MLSERVE_CACHE_ENABLED="false",
        # The probe's connection must stay open until the signal: no rebalancing closes it.
        MLSERVE_BALANCE_CONNECTIONS="false",
    )
    family: list[psutil.Process] = []
    stop = threading.Event()
    threads: list[threading.Thread] = []
    try:
        wait_until_answers(proc, port, "/ready", log, READY_TIMEOUT_S)
        family = psutil.Process(proc.pid).children(recursive=True)

        tally = Tally()
        signalled_at: list[float] = []
        for n in range(CLIENTS):
            args = (port, tag, n, stop, tally, lambda: bool(signalled_at))
            threads.append(threading.Thread(target=client_loop, args=args, daemon=True))
        for t in threads:
            t.start()
        time.sleep(3)
        answered_before = tally.counts["answered"]
        assert answered_before > 0, tally.counts
        # A connection that is open (and just used) when the signal comes.
        probe = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        probe.request("GET", "/ready")
        first = probe.getresponse()
        assert first.status == 200, first.read()
        first.read()
        assert not first.will_close

        proc.send_signal(signal.SIGTERM)  # the mlserve process only, as a supervisor does
        signalled_at.append(time.monotonic())
        # /ready on the connection that was open before: 503 (draining) at once.
        ready_codes = []
        while time.monotonic() - signalled_at[0] < 5:
            probe.request("GET", "/ready")
            response = probe.getresponse()
            body = json.loads(response.read())
            ready_codes.append((response.status, body.get("draining"), time.monotonic()))
            if response.status == 503:
                break
            assert not response.will_close, ready_codes  # still open for the next probe
            time.sleep(0.02)
        probe.close()
        seen = [
            (code, draining, round(t - signalled_at[0], 3)) for code, draining, t in ready_codes
        ]
        assert ready_codes[-1][:2] == (503, True), f"{seen}\n{_tail(log)}"
        assert seen[-1][2] < 1.5, f"{seen}\n{_tail(log)}"

        rc = proc.wait(timeout=DRAIN_SECONDS + 10)
        took = time.monotonic() - signalled_at[0]
        stop.set()
        for t in threads:
            t.join(timeout=35)
        print(f"drain of {tag}: {took:.1f} s, {dict(tally.counts)}, {dict(tally.statuses)}")
        assert rc == 0, _tail(log)
        assert took <= DRAIN_SECONDS, f"took {took:.1f} s\n{_tail(log)}"
        left = [(p.pid, p.cmdline()) for p in family if process_alive(p)]
        assert not left, f"left after mlserve exited: {left}\n{_tail(log)}"

        assert not tally.lost, f"{len(tally.lost)} lost: {tally.lost[:5]}\n{_tail(log)}"
        assert tally.counts["answered_closing"] >= 1, tally.counts  # answered during the drain
        assert set(tally.statuses) <= {200, 503}, tally.statuses
        assert tally.statuses[200] > 0
        with pytest.raises(OSError):  # nothing listens any more
            socket.create_connection(("127.0.0.1", port), timeout=2).close()
    finally:
        stop.set()
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
