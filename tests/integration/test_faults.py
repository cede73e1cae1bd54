"""Faults (issue #12, section 4), each against a real server with at least 16 clients running
through it: a worker killed, Redis away at start or while serving, a broken model store, an
audit log that cannot be written, and slow clients. Each test says what a user sees.

``MLSERVE_IT_REDIS_REPEAT=N`` runs the Redis-outage test N times (as it does the one in
test_cache_redis.py; the flake hunt of #12).
"""

from __future__ import annotations

import collections
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest
import yaml

from mlserve.store import hash_directory

from .test_cache_redis import start_redis

pytestmark = pytest.mark.integration

CLIENTS = 16
TOKEN = "fault-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TEXT = "This medicine cured my headache within an hour"
REPEAT = int(os.environ.get("MLSERVE_IT_REDIS_REPEAT", "1"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Load:
    """``clients`` threads posting /predict in a loop on keep-alive connections, counting
    every answer by status (``"error:<exception>"``: no answer, e.g. a connection reset)."""

    def __init__(self, url: str, clients: int = CLIENTS, body: dict | None = None):
        self.url, self.clients = url, clients
        self.body = body or {"text": TEXT}
        self.statuses: collections.Counter = collections.Counter()
        self.log: list[tuple[float, object]] = []  # (time, status) of every non-200
        self.bodies: list[str] = []  # the first few non-200 bodies, to say why
        self.slowest = 0.0
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(clients)]

    def _run(self) -> None:
        with httpx.Client(base_url=self.url, timeout=30.0) as client:
            while not self._stop.is_set():
                start = time.monotonic()
                body = ""
                try:
                    response = client.post("/predict", json=self.body)
                    status: object = response.status_code
                    body = response.text[:300]
                except httpx.HTTPError as exc:
                    status = f"error:{type(exc).__name__}"
                with self._lock:
                    self.statuses[status] += 1
                    self.slowest = max(self.slowest, time.monotonic() - start)
                    if status != 200:
                        self.log.append((time.monotonic(), status))
                        if len(self.bodies) < 5:
                            self.bodies.append(f"{status}: {body}")

    @property
    def ok(self) -> int:
        return self.statuses[200]

    @property
    def failed(self) -> int:
        return sum(n for s, n in self.statuses.items() if s != 200)

    def __enter__(self) -> Load:
        for t in self._threads:
            t.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(60)


class ReadyPoller:
    """Polls GET /ready every ``interval`` seconds, each time on a new connection (so the
    answers come from every worker), recording ``(time the poll started, status, body)``."""

    def __init__(self, url: str, interval: float = 0.05):
        self.url, self.interval = url, interval
        self.seen: list[tuple[float, int | str, dict]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                with httpx.Client(base_url=self.url, timeout=10.0) as client:
                    r = client.get("/ready", headers={"connection": "close"})
                    self.seen.append((started, r.status_code, r.json()))
            except (httpx.HTTPError, ValueError) as exc:
                self.seen.append((started, type(exc).__name__, {}))
            self._stop.wait(self.interval)

    def statuses(self, since: float = 0.0) -> list[int | str]:
        return [s for t, s, _ in self.seen if t >= since]

    def __enter__(self) -> ReadyPoller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(30)


def _gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def worker_pids(server) -> list[int]:
    """The server's HTTP worker processes (BentoML's ``_bentoml_impl.worker.service``)."""
    children = psutil.Process(server.proc.pid).children(recursive=True)
    out = []
    for child in children:
        with contextlib.suppress(psutil.Error):
            if any("worker.service" in part for part in child.cmdline()):
                out.append(child.pid)
    return sorted(out)


def wait_until(predicate, timeout: float, what: str, interval: float = 0.1):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    pytest.fail(f"{what} did not happen within {timeout:g} s", pytrace=False)


# --- 1. a worker is killed under load ----------------------------------------------------------


def test_a_killed_worker_is_restarted_while_the_other_keeps_serving(start_server) -> None:
    """What a user sees when a worker dies (SIGKILL) under 16 clients: BentoML starts a new
    worker; the other one keeps answering /predict; /ready says 503 while the new worker loads
    and 200 again once it has; the only failed requests are the ones that were on the killed
    worker's connections (at most one per client)."""
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_CACHE_ENABLED="false",
    )
    try:
        before = worker_pids(server)
        assert len(before) == 2, before
        with Load(server.url) as load, ReadyPoller(server.url) as ready:
            time.sleep(2.0)
            served_before = load.ok
            os.kill(before[0], signal.SIGKILL)
            # From here on no connection can reach the killed worker; a poll that was on one
            # at the kill (started before) may get no answer, like the load's requests.
            wait_until(lambda: _gone(before[0]), 10, "the killed worker to be gone")
            killed_at = time.monotonic()
            new = wait_until(
                lambda: [p for p in worker_pids(server) if p not in before],
                60,
                "a new worker",
            )
            # /ready: 503 during the gap, then 200 again once the new worker has loaded.
            wait_until(
                lambda: (
                    503 in ready.statuses(killed_at) and ready.statuses(killed_at)[-5:] == [200] * 5
                ),
                90,
                "/ready 503 then 200 after the kill",
            )
            recovered_at = time.monotonic()
            time.sleep(2.0)
        after = ready.statuses(killed_at)
        gap = [t for t, s, _ in ready.seen if t >= killed_at and s == 503]
        print(f"kill: predictions {dict(load.statuses)}; /ready 503 for {gap[-1] - gap[0]:.1f} s")
        assert after[0] in (200, 503)
        assert 503 in after  # the gap is visible
        assert ready.statuses(recovered_at) and set(ready.statuses(recovered_at)) == {200}
        assert before[1] in worker_pids(server) and new
        assert load.ok > served_before  # the other worker kept serving
        assert load.failed <= CLIENTS, (load.statuses, load.log[:40])
        # Only connection errors (the killed worker's connections), never a 503 to /predict.
        assert all(s == 200 or str(s).startswith("error:") for s in load.statuses), load.statuses
    finally:
        server.stop()


# --- 2. and 3. Redis away ----------------------------------------------------------------------


def test_redis_unreachable_at_start_then_back(start_server, tmp_path: Path) -> None:
    """Redis is down when a 2-worker server starts, and comes back later. What a user sees:
    /ready never says 200 while a worker is still loading its models (sentiment:v2, a
    transformer, takes a moment); predictions work once both have loaded; when Redis returns
    the workers rejoin the shared state without a restart: an admin change made then reaches
    both workers."""
    port = _free_port()  # nothing listens here yet
    server = None
    redis_proc = None
    try:
        server = start_server(
            MLSERVE_MODELS="sentiment:v1,sentiment:v2",
            MLSERVE_DEFAULT_MODEL="sentiment",
            MLSERVE_WORKERS="2",
            MLSERVE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
            MLSERVE_CACHE_ENABLED="false",
            MLSERVE_ADMIN_TOKEN=TOKEN,
            MLSERVE_AUDIT_LOG=str(tmp_path / "audit.jsonl"),
        )
        with ReadyPoller(server.url, interval=0.02) as ready, Load(server.url) as load:
            wait_until(lambda: ready.statuses()[-10:] == [200] * 10, 120, "/ready 200")
            ready_at = time.monotonic()
            time.sleep(1.0)
        seen = ready.seen
        first_ok = next(t for t, s, _ in seen if s == 200)
        loading_after_ok = [
            (round(t - first_ok, 3), s, b.get("models"))
            for t, s, b in seen
            if t >= first_ok and (s != 200 or set(b.get("models", {}).values()) != {"ready"})
        ]
        # Never 200 and then a worker that is still loading.
        assert loading_after_ok == [], loading_after_ok[:10]
        assert 503 in [s for _, s, _ in seen]  # start-up was visible
        # Every ready answer came while the store was unreachable, and said so.
        assert all(b["control"]["store_error"] for t, s, b in seen if s == 200 and t < ready_at)
        assert load.statuses[200] > 0 and set(load.statuses) <= {200, 503}

        redis_proc = start_redis(port)
        with Load(server.url) as load, server.client() as client:
            # The shared heartbeats resume by themselves (once a second).
            def both_workers_in_redis() -> bool:
                state = client.get("/admin/models", headers=AUTH)
                return state.status_code == 200 and len(state.json()["workers"]) == 2

            wait_until(both_workers_in_redis, 30, "both workers back in Redis", 0.5)
            r = client.post(
                "/admin/models/default", json={"name": "sentiment", "version": "v2"}, headers=AUTH
            )
            assert r.status_code == 200, r.text
            result = r.json()
            assert result["complete"] and len(result["workers"]) == 2, result
            assert all(w["defaults"]["sentiment"] == "v2" for w in result["workers"].values())
            for _ in range(20):  # new connections: every worker now answers with v2
                with httpx.Client(base_url=server.url, timeout=30) as fresh:
                    answer = fresh.post("/predict", json={"text": TEXT})
                assert answer.json()["model_version"] == "sentiment:v2"
        assert load.failed == 0, (load.statuses, load.bodies)
    finally:
        if server is not None:
            server.stop()
        if redis_proc is not None:
            redis_proc.kill()
            redis_proc.wait(10)


@pytest.mark.parametrize("run", range(REPEAT))
def test_redis_dying_never_makes_a_ready_server_unready(start_server, run: int) -> None:
    """Redis (cache and control state) dies while a 2-worker server is ready, under 16
    clients, and comes back empty. What a user sees: /ready answers 200 every time, during the
    outage and after; every prediction succeeds (without the cache meanwhile)."""
    port = _free_port()
    redis_proc = start_redis(port)
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
    )
    try:
        with Load(server.url, body=None) as load, ReadyPoller(server.url) as ready:
            time.sleep(1.0)
            redis_proc.terminate()
            redis_proc.wait(10)
            killed_at = time.monotonic()
            time.sleep(8.0)  # past the 6 s after which a worker record counts as stale
            redis_proc = start_redis(port)  # back, and empty
            back_at = time.monotonic()
            time.sleep(3.0)
        during = ready.statuses(killed_at)
        after = ready.statuses(back_at)
        assert len(during) > 20 and len(after) > 5  # polled through the outage and after
        assert set(ready.statuses()) == {200}, collections.Counter(ready.statuses())
        assert load.failed == 0 and load.ok > 0, (load.statuses, load.log[:20])
    finally:
        server.stop()
        redis_proc.kill()
        redis_proc.wait(10)


# --- 4. a broken model store -------------------------------------------------------------------


@pytest.fixture
def broken_store(model_home: Path, tmp_path: Path, request) -> Path:
    """A store with sentiment:v1 intact and topic:v1 missing a file or holding a corrupt one."""
    models = tmp_path / "models"
    for name in ("sentiment", "topic"):
        shutil.copytree(model_home / "models" / name / "v1", models / name / "v1")
        (models / name / "latest").write_text("v1")
    topic = models / "topic" / "v1"
    if request.param == "missing":
        (topic / "tfidf.json").unlink()
    else:  # corrupt, with checksums that match (so the file is read and fails)
        (topic / "estimator.skops").write_bytes(b"this is not a zip archive")
        info = yaml.safe_load((topic / "model.yaml").read_text())
        info["metadata"]["files"] = hash_directory(topic)
        (topic / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    return models


@pytest.mark.parametrize("broken_store", ["missing", "corrupt"], indirect=True)
def test_a_broken_model_at_start_is_reported_and_the_others_serve(
    start_server, broken_store: Path
) -> None:
    """topic:v1 has a missing or corrupt file when the server starts. What a user sees: the
    server starts; /ready answers 503 naming topic:v1 as failed, with its error (the server does
    not serve everything it was configured to); /predict with sentiment (16 clients) answers
    200; asking for topic:v1 answers 404 (not loaded), never 500."""
    server = start_server(
        models_dir=broken_store,
        MLSERVE_MODELS="sentiment:v1,topic:v1",
        MLSERVE_DEFAULT_MODEL="sentiment",
        MLSERVE_WORKERS="2",
    )
    try:
        with server.client() as client:

            def settled():
                # Each answer is one worker's view: ask on 20 new connections in a row, so that
                # both workers have finished loading (CI: the Load met the other worker still
                # loading, 503 "no model is loaded yet").
                answers = [client.get("/ready", headers={"connection": "close"}) for _ in range(20)]
                done = all("loading" not in r.text and "pending" not in r.text for r in answers)
                return answers[-1] if done else None

            ready = wait_until(settled, 90, "the start-up loads to finish", 0.25)
            with Load(server.url) as load:
                time.sleep(3.0)
                answers = [client.get("/ready") for _ in range(10)]
                topic = client.post("/predict", json={"text": TEXT, "model_version": "topic:v1"})
        for r in [ready, *answers]:
            assert r.status_code == 503, r.text
            body = r.json()
            assert body["ready"] is False
            assert body["models"] == {"sentiment:v1": "ready", "topic:v1": "failed"}
            assert "topic:v1" in body["errors"] and body["errors"]["topic:v1"]
        assert load.ok > 0 and load.failed == 0, (load.statuses, load.bodies)
        assert topic.status_code == 404, topic.text
    finally:
        server.stop()


# --- 5. the audit log cannot be written --------------------------------------------------------


@contextlib.contextmanager
def unwritable_dir(kind: str, tmp_path: Path) -> Iterator[Path]:
    """A directory on a full tmpfs or a read-only bind mount (needs root and mount)."""
    target = tmp_path / f"audit-{kind}"
    target.mkdir()
    if kind == "full":
        cmds = [["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(target)]]
    else:
        source = tmp_path / "audit-source"
        source.mkdir()
        cmds = [
            ["mount", "--bind", str(source), str(target)],
            ["mount", "-o", "remount,ro,bind", str(target)],
        ]
    mounted = False
    try:
        for cmd in cmds:
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode != 0:
                message = f"cannot {' '.join(cmd)} here: {done.stderr.strip()}"
                if os.environ.get("CI") == "true":  # CI runs as root, where mounts work
                    pytest.fail(message)
                pytest.skip(message)
            mounted = True
        if kind == "full":
            fd = os.open(target / "filler", os.O_WRONLY | os.O_CREAT)
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * 4096)
            os.close(fd)
        yield target
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(target)], check=False)


@pytest.mark.parametrize("kind", ["full", "read-only"])
def test_an_unwritable_audit_log_refuses_admin_changes_and_predictions_go_on(
    start_server, tmp_path: Path, kind: str
) -> None:
    """The audit log's disk is full, or read-only. What a user sees: every admin change is
    refused with 503 (nothing changes: topic:v1 is not loaded), while 16 clients' predictions
    all succeed."""
    with unwritable_dir(kind, tmp_path) as directory:
        server = start_server(
            ready=True,
            MLSERVE_MODELS="sentiment:v1",
            MLSERVE_WORKERS="2",
            MLSERVE_ADMIN_TOKEN=TOKEN,
            MLSERVE_AUDIT_LOG=str(directory / "audit.jsonl"),
        )
        try:
            with Load(server.url) as load, server.client() as client:
                changes = [
                    client.post("/admin/models/load", json={"tag": "topic:v1"}, headers=AUTH)
                    for _ in range(3)
                ] + [
                    client.post(
                        "/admin/models/default",
                        json={"name": "sentiment", "version": "v1"},
                        headers=AUTH,
                    )
                ]
                time.sleep(2.0)
                state = client.get("/admin/models", headers=AUTH).json()
                topic = client.post("/predict", json={"text": TEXT, "model_version": "topic"})
            for r in changes:
                assert r.status_code == 503, r.text
                body = r.json()
                assert body["error"] == "unavailable" and "audit log" in body["message"], body
                assert (
                    body["details"]["reason"]
                    == ("disk full" if kind == "full" else "read-only file system")
                    or "Read-only" in body["details"]["reason"]
                ), body
            assert all("topic:v1" not in w["loaded"] for w in state["workers"].values())
            assert topic.status_code == 404
            assert load.ok > 0 and load.failed == 0, (load.statuses, load.bodies)
        finally:
            server.stop()


# --- 6. slow clients ---------------------------------------------------------------------------

SLOW = 200


def _slow_client(url: str, body: bool, deadline: float, out: list) -> None:
    """One connection that sends a request one byte a second (the headers, or with ``body``
    complete headers and then the body), until the server closes it; records what it got."""
    host, port = url.removeprefix("http://").split(":")
    payload = b'{"text": "' + b"slow " * 20 + b'"}'
    head = f"POST /predict HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
    start = time.monotonic()
    try:
        sock = socket.create_connection((host, int(port)), timeout=5)
    except OSError as exc:
        out.append(("connect-failed", repr(exc), 0.0))
        return
    with sock:
        sock.settimeout(1.0)
        if body:
            sock.sendall(f"{head}Content-Length: {len(payload)}\r\n\r\n".encode())
            drip = payload
        else:
            drip = head.encode()
        got = b""
        for i in range(10_000):
            if time.monotonic() > deadline:
                out.append(("still-open", got[:40], time.monotonic() - start))
                return
            try:
                sock.send(drip[i % len(drip) : i % len(drip) + 1])
            except OSError:
                break  # closed by the server
            try:
                chunk = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
            if not chunk:
                break
            got += chunk
        with contextlib.suppress(OSError):
            sock.settimeout(2.0)
            got += sock.recv(4096)
        out.append(("closed", got[:40], time.monotonic() - start))


def test_slow_clients_are_dropped_and_the_others_served(start_server) -> None:
    """200 connections send their request one byte a second (100 their headers, 100 their
    body after complete headers), next to 16 normal clients. What a user sees: the normal
    clients keep getting answers (none fails, none waits more than a few seconds); each slow
    connection gets 408 and is closed after MLSERVE_HEADER_TIMEOUT_SECONDS or
    MLSERVE_BODY_TIMEOUT_SECONDS (5 s here), not kept open."""
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_HEADER_TIMEOUT_SECONDS="5",
        MLSERVE_BODY_TIMEOUT_SECONDS="5",
    )
    try:
        out: list = []
        deadline = time.monotonic() + 15.0
        slow = [
            threading.Thread(
                target=_slow_client, args=(server.url, i % 2 == 1, deadline, out), daemon=True
            )
            for i in range(SLOW)
        ]
        with Load(server.url) as load:
            for t in slow:
                t.start()
            for t in slow:
                t.join(30)
        assert len(out) == SLOW
        took = sorted(t for _, _, t in out)
        print(
            f"slow: {dict(load.statuses)}, slowest {load.slowest:.2f} s; closed after "
            f"{took[0]:.1f}-{took[-1]:.1f} s"
        )
        kinds = collections.Counter(kind for kind, _, _ in out)
        assert kinds == {"closed": SLOW}, (kinds, out[:2], out[-2:])
        assert all(got.startswith(b"HTTP/1.1 408") for _, got, _ in out), out[:5]
        assert max(took for _, _, took in out) < 12.0
        assert load.failed == 0 and load.ok > 0, (load.statuses, load.bodies)
        assert load.slowest < 5.0, load.slowest
    finally:
        server.stop()
