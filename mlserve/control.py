"""The model control path: which versions every worker serves, changed at run time.

One *desired-state record* ``{generation, models, defaults}`` is shared by every worker of every
replica: in Redis when ``MLSERVE_REDIS_URL`` is set (so it spans hosts), otherwise in a file
private to this server run (single host). Each worker runs a reconcile loop that notices a new
generation, loads and warms the models it lacks, switches defaults, unloads what the record no
longer lists (after the requests using it have finished), and acknowledges the generation in
its own *worker record*. An admin call loads the model in its own worker first, so a failed
load changes nothing anywhere, then publishes the next generation and waits for every live
worker to acknowledge it.

Whether the *server* is ready (every worker of this ``bentoml serve`` has loaded) is decided
from a second copy of the worker records kept in a directory private to the server run, never
from the shared store: a Redis outage must neither make a loading server ready nor a ready one
unready (issue #12).
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import logging
import os
import socket
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from mlserve.delivery import validate_shadow, validate_weights
from mlserve.errors import (
    MLServeError,
    ModelNotFoundError,
    ModelStateError,
    ServiceUnavailableError,
)
from mlserve.store import parse_tag

if TYPE_CHECKING:
    from mlserve.balance import ConnectionBalancer
    from mlserve.registry import LoadedModel, ModelLoader, ModelRegistry

log = logging.getLogger("mlserve.control")
# {"generation": int, "models": [tag], "defaults": {name: version},
#  "traffic": {name: {version: weight}}, "shadows": {name: {"version", "sample"}}}
# (a record written before traffic and shadows existed lacks them: read as empty)
State = dict[str, Any]


class ModelHost(Protocol):
    """What the controller drives: one worker's serving core (``mlserve.core`` implements it).

    The controller never imports the core; the core hands itself in, so the two modules do not
    depend on each other in a cycle.
    """

    settings: Any
    registry: ModelRegistry
    loader: ModelLoader
    balancer: ConnectionBalancer

    def build(self, tag: str) -> LoadedModel:
        """Load, verify and warm ``tag`` (not yet serving)."""

    def serve(self, model: LoadedModel) -> None:
        """Put a built model into this worker's registry."""

    async def retire(self, tag: str) -> None:
        """Take ``tag`` out of this worker's service, wait for its requests, free it."""


class ControlStore(Protocol):
    """Where the desired state and the worker records live."""

    where: str

    def read(self) -> State | None: ...

    def update(self, change: Callable[[State | None], State], floor: int = 0) -> State:
        """Atomically replace the state with ``change(current)``, one generation above both the
        current one and ``floor`` (so a generation never goes back, even after the record was
        lost)."""

    def report(self, worker_id: str, record: dict[str, Any]) -> None: ...

    def workers(self) -> dict[str, dict[str, Any]]: ...

    def forget(self, worker_id: str) -> None: ...


class FileControlStore:
    """Single host: a directory with ``state.json`` (under an flock) and one file per worker."""

    def __init__(self, directory: Path):
        self.dir = Path(directory)
        (self.dir / "workers").mkdir(parents=True, exist_ok=True)
        self.where = f"file:{self.dir}"

    def read(self) -> State | None:
        try:
            return json.loads((self.dir / "state.json").read_text(encoding="utf-8"))
        except FileNotFoundError:
            return None

    def update(self, change: Callable[[State | None], State], floor: int = 0) -> State:
        with (self.dir / ".lock").open("a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = self.read()
            new = {**change(current), "generation": _next_generation(current, floor)}
            _write_atomic(self.dir / "state.json", new)
            return new

    def report(self, worker_id: str, record: dict[str, Any]) -> None:
        _write_atomic(self._worker_file(worker_id), record)

    def _worker_file(self, worker_id: str) -> Path:
        return self.dir / "workers" / f"{worker_id.replace('/', '_')}.json"

    def forget(self, worker_id: str) -> None:
        self._worker_file(worker_id).unlink(missing_ok=True)

    def workers(self) -> dict[str, dict[str, Any]]:
        out = {}
        for path in (self.dir / "workers").glob("*.json"):
            with contextlib.suppress(OSError, ValueError):
                record = json.loads(path.read_text(encoding="utf-8"))
                out[record["worker"]] = record
        return out


def _next_generation(current: State | None, floor: int) -> int:
    return max((current or {}).get("generation", 0), floor) + 1


def _write_atomic(path: Path, data: dict[str, Any]) -> None:
    # Unique per writer: a worker's heartbeat thread and its reconcile task may write at once.
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    tmp.write_text(json.dumps(data), encoding="utf-8")
    os.replace(tmp, path)


class RedisControlStore:
    """Several hosts: the state in one key (changed with WATCH/MULTI), workers in one hash.

    The keys are ``mlserve:control:<namespace>:state`` and ``...:workers``: deployments that
    share a Redis stay apart by namespace. Neither key has a TTL, so a ``volatile-*`` eviction
    policy (cache entries all have one) can never evict them; see deploy/redis/redis.conf.
    """

    def __init__(self, url: str, namespace: str):
        import redis

        self._client = redis.Redis.from_url(url, socket_timeout=2.0, socket_connect_timeout=2.0)
        self._state_key = f"mlserve:control:{namespace}:state"
        self._workers_key = f"mlserve:control:{namespace}:workers"
        self.where = f"redis:{self._state_key}"

    def eviction_warning(self) -> str | None:
        """A warning when Redis may evict or refuse the control keys (None when it cannot, or
        when the server does not let us ask)."""
        try:
            policy = self._client.config_get("maxmemory-policy").get("maxmemory-policy", "")
        except Exception:
            return None
        if str(policy).startswith("allkeys"):
            return (
                f"Redis maxmemory-policy is {policy}: it can evict the model control state; "
                "use volatile-lru (cache entries have a TTL, control keys do not) or a separate "
                "Redis for the cache"
            )
        return None

    def read(self) -> State | None:
        raw = self._client.get(self._state_key)
        return json.loads(raw) if raw else None

    def update(self, change: Callable[[State | None], State], floor: int = 0) -> State:
        def attempt(pipe: Any) -> State:
            raw = pipe.get(self._state_key)
            current = json.loads(raw) if raw else None
            new = {**change(current), "generation": _next_generation(current, floor)}
            pipe.multi()
            pipe.set(self._state_key, json.dumps(new))
            return new

        return self._client.transaction(attempt, self._state_key, value_from_callable=True)

    def report(self, worker_id: str, record: dict[str, Any]) -> None:
        self._client.hset(self._workers_key, worker_id, json.dumps(record))

    def forget(self, worker_id: str) -> None:
        self._client.hdel(self._workers_key, worker_id)

    def workers(self) -> dict[str, dict[str, Any]]:
        raw = self._client.hgetall(self._workers_key)
        now, out = time.time(), {}
        for key, value in raw.items():
            record = json.loads(value)
            if now - record.get("ts", 0) > 300:  # long dead: tidy up
                self._client.hdel(self._workers_key, key)
            else:
                out[record["worker"]] = record
        return out


def default_control_dir() -> Path:
    """A directory private to this server run: keyed by the parent (BentoML arbiter) process,
    including its start time, so a reused PID never inherits an old run's state."""
    ppid = os.getppid()
    started = "0"
    with contextlib.suppress(OSError, IndexError):
        started = Path(f"/proc/{ppid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    return Path(tempfile.gettempdir()) / f"mlserve-control-{os.getuid()}" / f"{ppid}-{started}"


def make_store(settings: Any) -> ControlStore:
    """Redis when configured (or asked for), else the single-host file store."""
    backend = settings.control_backend
    if backend == "redis" or (backend == "auto" and settings.redis_url):
        return RedisControlStore(settings.redis_url, settings.control_namespace)
    return FileControlStore(
        Path(settings.control_dir) if settings.control_dir else default_control_dir()
    )


def _local_of(store: ControlStore) -> FileControlStore:
    """The server-local worker records: the file store itself, or (for a shared store) a
    directory private to this server run (see default_control_dir)."""
    if isinstance(store, FileControlStore):
        return store
    return FileControlStore(default_control_dir() / "server")


def _alive(pid: Any) -> bool:
    """Whether process ``pid`` (on this host) is running (a zombie is not)."""
    if not isinstance(pid, int) or pid <= 0:
        return False
    if not Path("/proc/self/stat").exists():  # no procfs: ask the kernel
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        except OSError:
            pass
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    except OSError:
        return True  # cannot tell: count it
    return stat.rsplit(")", 1)[-1].split()[0] not in ("Z", "X")


def _nonempty(mapping: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in mapping.items() if v}


def _next(
    cur: State, models: list[str], defaults: dict[str, str], promoted: str | None = None
) -> State:
    """The next state with ``models`` and ``defaults``, carrying the traffic splits and shadows
    over: entries on versions no longer loaded go (a weight there is always 0, see ``unload``),
    and so does everything of a name whose default changed or that ``promoted`` names (a
    promotion ends the canary and the shadow)."""
    loaded = set(models)
    ended = {n for n, v in defaults.items() if cur["defaults"].get(n) != v}
    if promoted is not None:
        ended.add(promoted)
    traffic = {
        name: {v: w for v, w in split.items() if f"{name}:{v}" in loaded}
        for name, split in cur.get("traffic", {}).items()
        if name not in ended
    }
    shadows = {
        name: s
        for name, s in cur.get("shadows", {}).items()
        if name not in ended and f"{name}:{s['version']}" in loaded
    }
    return {
        "models": models,
        "defaults": defaults,
        "traffic": _nonempty(traffic),
        "shadows": shadows,
    }


class Controller:
    """One worker's side of the control path: reconcile loop, heartbeat and admin changes."""

    def __init__(
        self,
        core: ModelHost,
        store: ControlStore,
        *,
        poll_seconds: float = 0.2,
        heartbeat_seconds: float = 1.0,
        stale_seconds: float = 6.0,
        local: FileControlStore | None = None,
    ):
        self.core = core
        self.store = store
        # This server's worker records, in a place that does not depend on the shared store
        # (see server_ready); the shared store's records are for cross-replica things only.
        self.local = local if local is not None else _local_of(store)
        self.worker_id = f"{socket.gethostname()}:{os.getpid()}"
        # The workers of one server share the arbiter process (BentoML's) as their parent.
        self.server_id = f"{socket.gethostname()}:{os.getppid()}"
        self.poll, self.heartbeat, self.stale = poll_seconds, heartbeat_seconds, stale_seconds
        self.applied = -1  # generation this worker serves; -1 = not reconciled yet
        self.reported_ready = False  # the last server-local record said ready
        self.errors: dict[str, str] = {}
        self.last_error: str | None = None
        self._lock = asyncio.Lock()
        self._stop = threading.Event()
        self._beat_lock = threading.Lock()
        self._shared_lock = threading.Lock()
        self._task: asyncio.Task | None = None

    # --- the worker loop ----------------------------------------------------------------------
    def initial_state(self) -> State | None:
        """The record at start-up (None if there is none or it cannot be read)."""
        try:
            return self.store.read()
        except Exception as exc:
            self.last_error = f"control store unreadable: {type(exc).__name__}"
            log.warning("control store %s unreadable at start-up: %r", self.store.where, exc)
            return None

    def start(self) -> None:
        """Start the heartbeat thread and the reconcile task (call inside the event loop)."""
        threading.Thread(target=self._beat, name="mlserve-heartbeat", daemon=True).start()
        threading.Thread(target=self._beat_shared, name="mlserve-shared-beat", daemon=True).start()
        self._task = asyncio.get_running_loop().create_task(self._run())

    async def _run(self) -> None:
        while not self.core.loader.done:
            await asyncio.sleep(self.poll)
        while not self._stop.is_set():
            try:
                await self.poll_once()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # the store is down: keep serving what we have
                self.last_error = f"{type(exc).__name__}: {exc}"[:200]
                if self.applied < 0:
                    # Serve the models loaded at start-up (like a cache outage, this never
                    # makes the worker unready); the record is applied once it can be read.
                    self.applied = 0
            if self.reported_ready != (self.core.loader.ready and self.applied >= 0):
                with contextlib.suppress(OSError):  # tell the siblings now, not at the beat
                    await asyncio.to_thread(self._report_local)
            await asyncio.sleep(self.poll)

    async def poll_once(self) -> None:
        """Read the record and apply it if it is newer than what this worker serves.

        The read happens outside the lock (it may be slow), so an admin call on this worker can
        publish and apply a newer generation meanwhile: the comparison is made again under the
        lock, and a generation at or below the applied one is never applied.
        """
        state = await asyncio.to_thread(self.store.read)
        self.last_error = None
        if state is None:
            if self.applied < 0:
                self.applied = 0
                await asyncio.to_thread(self._report)
            return
        if state["generation"] <= self.applied:
            return
        async with self._lock:
            if state["generation"] > self.applied:
                await self._apply(state)

    async def _apply(self, state: State) -> None:
        """Bring this worker to ``state``: load first, then defaults, then unload."""
        registry, errors = self.core.registry, {}
        for tag in state["models"]:
            if tag not in registry.tags():
                try:
                    self.core.serve(await asyncio.to_thread(self.core.build, tag))
                except Exception as exc:
                    errors[tag] = getattr(exc, "message", None) or type(exc).__name__
        loaded = set(registry.tags())
        for name, version in state["defaults"].items():
            if f"{name}:{version}" in loaded:
                registry.set_default(name, version)
        # Before any unload: a version is never routed to or shadowed once it is leaving.
        registry.set_delivery(state.get("traffic", {}), state.get("shadows", {}))
        for tag in sorted(loaded - set(state["models"])):
            try:
                await self.core.retire(tag)
            except MLServeError as exc:
                errors[tag] = exc.message
        self.applied, self.errors = state["generation"], errors
        if errors:
            log.error("generation %s applied with errors: %s", self.applied, errors)
        try:
            await asyncio.to_thread(self._report)
        except Exception as exc:  # the heartbeat reports it a moment later
            log.warning("could not report generation %s: %r", self.applied, exc)

    def record(self) -> dict[str, Any]:
        return {
            "worker": self.worker_id,
            "host": socket.gethostname(),
            "pid": os.getpid(),
            "ts": time.time(),
            "server": self.server_id,
            "ready": self.core.loader.ready and self.applied >= 0,
            "generation": self.applied,
            "loaded": self.core.registry.tags(),
            "defaults": self.core.registry.defaults(),
            "traffic": self.core.registry.traffic(),
            "shadows": self.core.registry.shadows(),
            "errors": self.errors,
            "connections": self.core.balancer.active(),
        }

    def _report(self) -> None:
        record = self.record()
        with contextlib.suppress(OSError):
            self._report_local(record)
        self.store.report(self.worker_id, record)

    def _report_local(self, record: dict[str, Any] | None = None) -> None:
        record = record or self.record()
        self.local.report(self.worker_id, record)
        self.reported_ready = record["ready"]

    def _beat(self) -> None:
        """The server-local heartbeat: this worker's record for its siblings (readiness, the
        connection balance). It never touches the shared store, so a slow or dead Redis (each
        call may retry for seconds) cannot let this worker's record go stale."""
        while not self._stop.wait(self.heartbeat):
            with self._beat_lock:
                if self._stop.is_set():
                    break
                record: dict[str, Any] = {}
                with contextlib.suppress(Exception):
                    record = self.record()
                    self._report_local(record)
                server = self.server_workers().values()  # this worker's record included
                self.core.balancer.rebalance(
                    record.get("connections", 0), (r.get("connections", 0) for r in server)
                )

    def _beat_shared(self) -> None:
        """The shared heartbeat: this worker's record in the shared store, for admin calls and
        other replicas; it resumes by itself when the store comes back."""
        while not self._stop.wait(self.heartbeat):
            with self._shared_lock:
                if self._stop.is_set():
                    break
                with contextlib.suppress(Exception):  # the shared store may be down
                    self.store.report(self.worker_id, self.record())

    def server_workers(self) -> dict[str, dict[str, Any]]:
        """The live workers of this server, from the server-local records: fresh, and their
        process still running (a killed worker drops out at once, not after ``stale``)."""
        try:
            records = self.local.workers()
        except OSError:
            return {}
        now, out = time.time(), {}
        for worker, record in records.items():
            if record.get("server") != self.server_id:
                continue  # MLSERVE_CONTROL_DIR shared by several servers on this host
            if not _alive(record.get("pid")):
                with contextlib.suppress(OSError):
                    self.local.forget(worker)
            elif now - record.get("ts", 0) <= self.stale:
                out[worker] = record
        return out

    @property
    def server_ready(self) -> bool:
        """Whether every worker of this server is ready: connections are spread over all of
        them, so one that is still loading (or being restarted) would answer 503.

        Read from the server-local records (and this worker's own state), never from the shared
        store: a Redis outage can neither make a ready server unready nor a loading one ready.
        """
        # Ready here only once the siblings can read it too, so no two workers disagree.
        if not (self.core.loader.ready and self.applied >= 0 and self.reported_ready):
            return False
        others = [r for w, r in self.server_workers().items() if w != self.worker_id]
        ready = 1 + sum(1 for r in others if r.get("ready"))
        return ready >= self.core.settings.effective_workers

    def _leave(self) -> None:
        # No heartbeat can land after this (each beat writes under its lock).
        with self._beat_lock, contextlib.suppress(OSError):
            self.local.forget(self.worker_id)
        with self._shared_lock:
            self.store.forget(self.worker_id)

    async def aclose(self) -> None:
        """Stop following the record and leave it: a stopped worker is not waited for."""
        self._stop.set()
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(BaseException):
                await self._task
        with contextlib.suppress(Exception):
            await asyncio.to_thread(self._leave)

    # --- admin changes ------------------------------------------------------------------------
    def live_workers(self) -> dict[str, dict[str, Any]]:
        now = time.time()
        return {w: r for w, r in self.store.workers().items() if now - r["ts"] <= self.stale}

    async def _desired(self) -> State:
        try:
            state = await asyncio.to_thread(self.store.read)
        except Exception as exc:
            raise ServiceUnavailableError(
                f"control store unavailable ({type(exc).__name__})"
            ) from exc
        return state or self._local_state()

    def _local_state(self) -> State:
        return {
            "generation": max(self.applied, 0),
            "models": self.core.registry.tags(),
            "defaults": self.core.registry.defaults(),
            "traffic": self.core.registry.traffic(),
            "shadows": self.core.registry.shadows(),
        }

    async def _publish(self, change: Callable[[State], State]) -> State:
        base = self._local_state()
        try:
            return await asyncio.to_thread(
                self.store.update, lambda cur: change(cur or base), max(self.applied, 0)
            )
        except MLServeError:
            raise
        except Exception as exc:
            raise ServiceUnavailableError(
                f"control store unavailable ({type(exc).__name__})"
            ) from exc

    def _begin(self) -> float:
        """Refuse a change before this worker has started; otherwise the monotonic time by
        which the change answers: MLSERVE_CONTROL_TIMEOUT_SECONDS from its arrival, the wait
        for the lock and this worker's own load included (see Settings.request_timeout_seconds,
        the HTTP limit above it)."""
        if not self.core.loader.done or self.applied < 0:
            raise ServiceUnavailableError("this worker is still loading its models; retry shortly")
        return time.monotonic() + self.core.settings.control_timeout_seconds

    async def load(self, tag: str, make_default: bool) -> dict[str, Any]:
        """Load ``tag`` everywhere (optionally as its name's default)."""
        name, version = parse_tag(tag)
        deadline = self._begin()
        limit = self.core.settings.max_loaded_models

        def change(cur: State) -> State:
            models, defaults = list(cur["models"]), dict(cur["defaults"])
            if tag not in models:
                if len(models) >= limit:
                    raise ModelStateError(
                        f"{len(models)} versions are loaded, the MLSERVE_MAX_LOADED_MODELS "
                        f"limit; unload one first",
                        loaded=models,
                    )
                models.append(tag)
            if make_default or name not in defaults:
                defaults[name] = version
            return _next(cur, sorted(models), defaults)

        async with self._lock:
            current = await self._desired()
            change(current)  # refuse early (limit) before spending time on a load
            fresh = None
            if tag not in self.core.registry.tags():
                # A missing tag, bad checksum or corrupt file fails here; nothing has changed.
                fresh = await asyncio.to_thread(self.core.build, tag)
                self.core.serve(fresh)
            try:
                state = await self._publish(change)
            except BaseException:
                if fresh is not None:
                    await self.core.retire(tag)
                raise
            await self._apply(state)
        return await self._result("load", state, deadline)

    async def set_default(self, name: str, version: str) -> dict[str, Any]:
        """Make an already loaded version its name's default everywhere."""
        tag = f"{name}:{version}"
        parse_tag(tag)
        deadline = self._begin()

        def change(cur: State) -> State:
            if tag not in cur["models"]:
                raise ModelNotFoundError(f"{tag} is not loaded; load it first")
            return _next(cur, cur["models"], {**cur["defaults"], name: version}, promoted=name)

        async with self._lock:
            change(await self._desired())
            state = await self._publish(change)
            await self._apply(state)
        return await self._result("default", state, deadline)

    async def unload(self, tag: str) -> dict[str, Any]:
        """Unload a version everywhere; refused for a default or the last loaded version."""
        name, version = parse_tag(tag)
        deadline = self._begin()
        service_default = self.core.settings.default_model

        def change(cur: State) -> State:
            models = list(cur["models"])
            if tag not in models:
                raise ModelNotFoundError(f"{tag} is not loaded")
            if len(models) == 1:
                raise ModelStateError(f"{tag} is the last loaded version; load another first")
            if cur["defaults"].get(name) == version or service_default == tag:
                raise ModelStateError(
                    f"{tag} is the default version of {name!r}; make another version the "
                    "default first"
                )
            weight = cur.get("traffic", {}).get(name, {}).get(version, 0)
            if weight > 0:
                raise ModelStateError(
                    f"{tag} has {weight}% of {name!r}'s traffic; set its weight to 0 (or clear "
                    "the split) first",
                    weight=weight,
                )
            models.remove(tag)
            return _next(cur, models, cur["defaults"])

        async with self._lock:
            change(await self._desired())
            state = await self._publish(change)
            await self._apply(state)
        return await self._result("unload", state, deadline)

    async def set_traffic(self, name: str, weights: dict[str, int]) -> dict[str, Any]:
        """Split the requests for ``name`` over its loaded versions by ``weights`` (percent,
        summing to 100), everywhere; ``{}`` clears the split. A bad split is refused (422)
        before anything changes."""
        deadline = self._begin()

        def change(cur: State) -> State:
            split = validate_weights(name, weights, cur["models"])
            traffic = {**cur.get("traffic", {}), name: split}
            return {**_next(cur, cur["models"], cur["defaults"]), "traffic": _nonempty(traffic)}

        async with self._lock:
            change(await self._desired())
            state = await self._publish(change)
            await self._apply(state)
        return await self._result("traffic", state, deadline)

    async def set_shadow(self, name: str, version: str | None, sample: float) -> dict[str, Any]:
        """Make ``name:version`` the shadow of ``name`` (``sample`` of the requests its primary
        serves also run on it), everywhere; ``version`` None clears it."""
        deadline = self._begin()

        def change(cur: State) -> State:
            shadows = dict(cur.get("shadows", {}))
            if version is None:
                validate_weights(name, {}, cur["models"])  # the name must be loaded
                shadows.pop(name, None)
            else:
                shadows[name] = validate_shadow(
                    name, version, sample, cur["models"], cur["defaults"]
                )
            return {**_next(cur, cur["models"], cur["defaults"]), "shadows": shadows}

        async with self._lock:
            change(await self._desired())
            state = await self._publish(change)
            await self._apply(state)
        return await self._result("shadow", state, deadline)

    async def _result(self, action: str, state: State, deadline: float) -> dict[str, Any]:
        """Wait (until ``deadline``, from :meth:`_begin`) for every live worker to apply
        ``state``; report those that lag or failed."""
        while True:
            workers = await asyncio.to_thread(self.live_workers)
            lagging = sorted(w for w, r in workers.items() if r["generation"] < state["generation"])
            if not lagging or time.monotonic() >= deadline:
                break
            await asyncio.sleep(0.05)
        failed = {w: r["errors"] for w, r in workers.items() if r["errors"] and w not in lagging}
        return {
            "action": action,
            "complete": not lagging and not failed,
            "generation": state["generation"],
            "models": state["models"],
            "defaults": state["defaults"],
            "traffic": state.get("traffic", {}),
            "shadows": state.get("shadows", {}),
            "workers": {
                w: {k: r[k] for k in ("generation", "loaded", "defaults")}
                for w, r in sorted(workers.items())
            },
            "lagging": lagging,
            "failed": failed,
        }

    def status(self) -> dict[str, Any]:
        """The desired state and every live worker's record (for /admin/stats and the CLI)."""
        try:
            state, workers = self.store.read(), self.live_workers()
        except Exception as exc:
            return {"store": self.store.where, "error": type(exc).__name__}
        return {
            "store": self.store.where,
            "desired": state or {**self._local_state(), "source": "configuration"},
            "workers": workers,
        }
