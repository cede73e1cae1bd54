"""The control path: shared desired state, per-worker reconcile, admin changes and refusals.

Two controllers on one store stand for two worker processes; their registries are real, and
their "models" are tiny stand-ins (the real load path is covered by the integration tests).
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from mlserve.balance import ConnectionBalancer
from mlserve.batching import AdaptiveBatcher
from mlserve.control import Controller, FileControlStore, RedisControlStore
from mlserve.errors import (
    ModelIntegrityError,
    ModelNotFoundError,
    ModelStateError,
    ValidationError,
)
from mlserve.registry import LoadedModel, ModelRegistry
from mlserve.store import StoredModel, parse_tag
from tests.unit.conftest import REDIS_URL

STORE = {"sentiment:v1", "sentiment:v2", "sentiment:v3", "topic:v1"}


class Core:
    """A ModelHost (what a Controller drives): a registry, a loader, build, serve, retire."""

    def __init__(self, models: list[str], max_loaded: int = 3):
        self.settings = SimpleNamespace(
            max_loaded_models=max_loaded,
            default_model="sentiment",
            control_timeout_seconds=2.0,
            effective_workers=2,
        )
        self.registry = ModelRegistry("sentiment")
        self.balancer = ConnectionBalancer()
        self.loader = SimpleNamespace(done=True, ready=True, status={})
        self.built: list[str] = []
        self.closed: list[str] = []
        for tag in models:
            self.serve(self.build(tag))

    def build(self, tag: str) -> LoadedModel:
        if tag == "sentiment:bad":
            raise ModelIntegrityError("sentiment:bad failed verification")
        if tag not in STORE:
            raise ModelNotFoundError(f"model {tag} is not in the store")
        self.built.append(tag)
        name, version = tag.split(":")
        runner = SimpleNamespace(model=StoredModel(tag, name, version, Path("."), {}, ""))
        batcher = AdaptiveBatcher(lambda texts: None, 8, 0)  # never called: no request here
        return LoadedModel(name, version, runner, batcher=batcher)

    def serve(self, model: LoadedModel) -> None:
        self.registry.add(model)

    async def retire(self, tag: str) -> None:
        self.registry.remove(*tag.split(":"))
        self.closed.append(tag)


def workers(store, n: int = 2, models=("sentiment:v1", "topic:v1"), **kw) -> list[Controller]:
    out = []
    for i in range(n):
        c = Controller(Core(list(models), **kw), store, poll_seconds=0.01, heartbeat_seconds=0.05)
        c.worker_id = f"host:{i}"
        out.append(c)
    return out


async def started(ctrls: list[Controller]) -> None:
    for c in ctrls:
        c.start()
    while any(c.applied < 0 for c in ctrls):
        await asyncio.sleep(0.01)


async def closed(ctrls: list[Controller]) -> None:
    for c in ctrls:
        await c.aclose()


def report_stuck_worker(store, worker: str) -> None:
    """A live worker that never applies anything (stuck in a long load, say)."""
    record = {"worker": worker, "ts": time.time() + 60, "generation": 0}
    store.report(worker, {**record, "loaded": [], "defaults": {}, "errors": {}})


@pytest.fixture
def store(tmp_path: Path) -> FileControlStore:
    return FileControlStore(tmp_path / "control")


def test_file_store_bumps_the_generation_atomically(store) -> None:
    assert store.read() is None
    first = store.update(lambda cur: {"models": ["a:v1"], "defaults": {"a": "v1"}})
    second = store.update(lambda cur: {**cur, "models": [*cur["models"], "a:v2"]})
    assert (first["generation"], second["generation"]) == (1, 2)
    assert store.read() == second
    store.report("h:1", {"worker": "h:1", "ts": 1.0})
    assert store.workers() == {"h:1": {"worker": "h:1", "ts": 1.0}}


def test_a_change_through_one_worker_reaches_the_other(store) -> None:
    async def scenario():
        a, b = workers(store)
        await started([a, b])
        result = await a.load("sentiment:v2", make_default=True)
        await closed([a, b])
        return a, b, result

    a, b, result = asyncio.run(scenario())
    assert (
        result["complete"]
        and result["lagging"] == []
        and set(result["workers"])
        == {
            "host:0",
            "host:1",
        }
    )
    for ctrl in (a, b):
        assert ctrl.core.registry.tags() == ["sentiment:v1", "sentiment:v2", "topic:v1"]
        assert ctrl.core.registry.resolve("sentiment").tag == "sentiment:v2"
        assert ctrl.applied == result["generation"]


def test_swap_then_unload_the_old_default(store) -> None:
    async def scenario():
        a, b = workers(store)
        await started([a, b])
        await a.load("sentiment:v2", make_default=True)
        result = await b.unload("sentiment:v1")
        await closed([a, b])
        return a, b, result

    a, b, result = asyncio.run(scenario())
    assert result["models"] == ["sentiment:v2", "topic:v1"]
    assert a.core.closed == b.core.closed == ["sentiment:v1"]
    assert b.core.registry.defaults() == {"sentiment": "v2", "topic": "v1"}


@pytest.mark.parametrize(
    "models,action,error,words",
    [
        (["sentiment:v1"], ("unload", "sentiment:v1"), ModelStateError, "last loaded"),
        (["sentiment:v1", "topic:v1"], ("unload", "sentiment:v1"), ModelStateError, "default"),
        (["sentiment:v1", "topic:v1"], ("unload", "sentiment:v2"), ModelNotFoundError, "not"),
        (["sentiment:v1", "topic:v1"], ("default", "sentiment:v3"), ModelNotFoundError, "load"),
        (
            ["sentiment:v1", "sentiment:v2", "topic:v1"],
            ("load", "sentiment:v3"),
            ModelStateError,
            "MLSERVE_MAX_LOADED_MODELS",
        ),
        (["sentiment:v1"], ("load", "sentiment:v9"), ModelNotFoundError, "store"),
        (["sentiment:v1"], ("load", "sentiment:bad"), ModelIntegrityError, "verification"),
        (["sentiment:v1"], ("load", "../x"), ValidationError, "store tag"),
    ],
)
def test_refused_changes_change_nothing(store, models, action, error, words) -> None:
    async def scenario():
        (a,) = workers(store, 1, models)
        await started([a])
        kind, tag = action
        with pytest.raises(error) as caught:
            if kind == "load":
                await a.load(tag, make_default=True)
            elif kind == "unload":
                await a.unload(tag)
            else:
                await a.set_default(*tag.split(":"))
        await closed([a])
        return a, caught.value

    a, exc = asyncio.run(scenario())
    assert words in exc.message
    assert store.read() is None  # nothing was published
    assert a.core.registry.tags() == sorted(models)
    assert a.core.built == models  # a refused load did not even start building


def test_a_lagging_worker_is_reported(store) -> None:
    async def scenario():
        (a,) = workers(store, 1)
        await started([a])
        report_stuck_worker(store, "slow:1")
        a.core.settings.control_timeout_seconds = 0.3
        result = await a.load("sentiment:v2", make_default=False)
        await closed([a])
        return result

    result = asyncio.run(scenario())
    assert not result["complete"] and result["lagging"] == ["slow:1"]


def test_the_wait_counts_from_the_change_s_arrival(store) -> None:
    """MLSERVE_CONTROL_TIMEOUT_SECONDS bounds the whole change, this worker's own load included,
    so the answer comes within the HTTP request timeout above it (Settings.
    request_timeout_seconds). Here the local load alone outlasts the timeout: the answer comes
    as soon as it is done, with the worker that lags, not a full timeout later."""

    class SlowCore(Core):
        def build(self, tag: str) -> LoadedModel:
            if tag == "sentiment:v2":
                time.sleep(1.5)
            return super().build(tag)

    async def scenario():
        a = Controller(SlowCore(["sentiment:v1", "topic:v1"]), store, poll_seconds=0.01)
        a.worker_id = "host:0"
        await started([a])
        report_stuck_worker(store, "slow:1")
        a.core.settings.control_timeout_seconds = 1.0
        t0 = time.monotonic()
        result = await a.load("sentiment:v2", make_default=False)
        took = time.monotonic() - t0
        await closed([a])
        return result, took

    result, took = asyncio.run(scenario())
    assert not result["complete"] and result["lagging"] == ["slow:1"]
    assert result["workers"]["host:0"]["loaded"] == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    # 1.5 s of load, then one look at the workers; measured from after the load it was >= 2.5 s.
    assert 1.5 <= took < 2.4, took


def test_a_new_worker_adopts_the_published_state(store) -> None:
    async def scenario():
        (a,) = workers(store, 1)
        await started([a])
        await a.load("sentiment:v2", make_default=True)
        # A worker that starts later (restart, new replica) begins with the configured models
        # and converges on the published state.
        (late,) = workers(store, 1)
        late.worker_id = "host:late"
        await started([late])
        await closed([a, late])
        return late

    late = asyncio.run(scenario())
    assert late.core.registry.tags() == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    assert late.core.registry.defaults()["sentiment"] == "v2"


@pytest.mark.redis
def test_redis_store_spans_hosts(redis_prefix) -> None:
    async def scenario():
        store_a = RedisControlStore(REDIS_URL, redis_prefix)
        store_b = RedisControlStore(REDIS_URL, redis_prefix)  # another host's connection
        (a,) = workers(store_a, 1)
        (b,) = workers(store_b, 1)
        b.worker_id = "other-host:7"
        await started([a, b])
        result = await b.load("sentiment:v2", make_default=True)
        await closed([a, b])
        return a, result, store_a

    a, result, store_a = asyncio.run(scenario())
    assert result["complete"] and set(result["workers"]) == {"host:0", "other-host:7"}
    assert a.core.registry.resolve("sentiment").tag == "sentiment:v2"
    assert store_a.read()["generation"] == result["generation"] == 1


@pytest.mark.parametrize("tag", ["../x", "/etc/passwd", "http://h/x", "%2e%2e", "a:b:c", "A:v1"])
def test_parse_tag_refuses_paths_and_urls(tag) -> None:
    with pytest.raises(ValidationError):
        parse_tag(tag)


def test_concurrent_reports_of_one_worker_never_collide(store) -> None:
    # The heartbeat thread and the reconcile task of one worker report at the same moment.
    import threading

    errors: list[BaseException] = []

    def hammer() -> None:
        try:
            for i in range(200):
                store.report("h:1", {"worker": "h:1", "ts": float(i)})
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=hammer) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == [] and store.workers()["h:1"]["worker"] == "h:1"


def test_a_stopped_worker_leaves_the_record(store) -> None:
    async def scenario():
        a, b = workers(store)
        await started([a, b])
        await a.load("sentiment:v2", make_default=False)
        seen = set(store.workers())
        await closed([a])
        left = set(store.workers())
        await closed([b])
        return seen, left

    seen, left = asyncio.run(scenario())
    assert seen == {"host:0", "host:1"} and left == {"host:1"}
    assert store.workers() == {}


def test_a_server_is_ready_only_when_all_its_workers_are(store) -> None:
    async def scenario():
        a, b = workers(store)
        a.start()
        while a.applied < 0:
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.2)  # a few heartbeats: b has not joined yet
        alone = a.server_ready
        b.start()
        deadline = time.monotonic() + 30  # generous: CI machines can be loaded
        while not (a.server_ready and b.server_ready) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        both = a.server_ready, b.server_ready
        await closed([a, b])
        return alone, *both

    alone, a_ready, b_ready = asyncio.run(scenario())
    assert alone is False  # effective_workers=2 and only one has reported ready
    assert a_ready and b_ready


def test_heartbeats_share_connection_counts_and_set_the_surplus_to_close(store) -> None:
    async def scenario():
        a, b = workers(store)
        for i in range(20):
            a.core.balancer.seen(("10.0.0.1", 30000 + i))
        for i in range(4):
            b.core.balancer.seen(("10.0.0.1", 31000 + i))
        await started([a, b])
        deadline = time.monotonic() + 30  # generous: CI machines can be loaded
        while a.core.balancer.budget == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        reported = {w: r["connections"] for w, r in store.workers().items()}
        budgets = a.core.balancer.budget, b.core.balancer.budget
        await closed([a, b])
        return reported, budgets

    reported, (a_budget, b_budget) = asyncio.run(scenario())
    assert reported == {"host:0": 20, "host:1": 4}
    assert (a_budget, b_budget) == (8, 0)  # fair share 12: a closes 8, b none


def test_a_stale_read_never_undoes_a_newer_generation(store) -> None:
    """The reconcile loop reads generation N (slowly, outside the lock) while an admin call on
    the same worker publishes and applies N+1; the loop must not then apply N (which would
    unload the version that was just loaded). Deterministic: the loop's read is held open with
    events until the admin call has finished."""

    class HeldStore(FileControlStore):
        def __init__(self, directory):
            super().__init__(directory)
            self.hold = False
            import threading

            self.read_done, self.release = threading.Event(), threading.Event()

        def read(self):
            state = super().read()
            if self.hold:
                self.hold = False
                self.read_done.set()
                self.release.wait(5)
            return state

    async def scenario(held: HeldStore):
        (a,) = workers(held, 1)
        a.poll = 3600  # no background polls: this test drives poll_once itself
        await started([a])
        await a.load("sentiment:v2", make_default=False)  # generation 1, applied
        held.hold = True
        poll = asyncio.create_task(a.poll_once())  # reads generation 1 ... and waits
        await asyncio.to_thread(held.read_done.wait, 5)
        # Generation 2, published and applied by this worker while the poll holds a stale read.
        await a.unload("sentiment:v2")
        newer = a.applied
        held.release.set()
        await poll
        applied_after, tags = a.applied, a.core.registry.tags()
        await closed([a])
        return newer, applied_after, tags, a.core.built

    held = HeldStore(store.dir)
    newer, applied_after, tags, built = asyncio.run(scenario(held))
    assert newer == 2 and applied_after == 2
    assert tags == ["sentiment:v1", "topic:v1"]
    assert built.count("sentiment:v2") == 1  # generation 1 was not applied (reloaded) again


def test_a_generation_never_goes_back_after_the_record_is_lost(store) -> None:
    async def scenario():
        (a,) = workers(store, 1)
        await started([a])
        await a.load("sentiment:v2", make_default=False)
        await a.set_default("sentiment", "v2")  # generation 2
        (store.dir / "state.json").unlink()  # the record is lost (a flushed Redis, say)
        result = await a.unload("sentiment:v1")
        await closed([a])
        return result

    result = asyncio.run(scenario())
    assert result["generation"] == 3 and result["complete"]


@pytest.mark.redis
def test_two_namespaces_on_one_redis_stay_independent(redis_prefix) -> None:
    async def scenario():
        staging = RedisControlStore(REDIS_URL, f"{redis_prefix}-staging")
        production = RedisControlStore(REDIS_URL, f"{redis_prefix}-production")
        (s,) = workers(staging, 1)
        (p,) = workers(production, 1)
        p.worker_id = "prod-host:1"
        await started([s, p])
        await p.load("sentiment:v2", make_default=True)
        await s.load("sentiment:v3", make_default=True)
        await s.unload("sentiment:v1")
        await asyncio.sleep(0.1)  # several polls
        await closed([s, p])
        return s, p, staging, production

    s, p, staging, production = asyncio.run(scenario())
    assert p.core.registry.tags() == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    assert p.core.registry.defaults()["sentiment"] == "v2"
    assert s.core.registry.tags() == ["sentiment:v3", "topic:v1"]
    assert production.read()["models"] == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    assert staging.where != production.where
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    for namespace in (f"{redis_prefix}-staging", f"{redis_prefix}-production"):
        client.delete(f"mlserve:control:{namespace}:state", f"mlserve:control:{namespace}:workers")


@pytest.mark.redis
def test_an_allkeys_eviction_policy_is_warned_about(redis_prefix) -> None:
    import redis

    client = redis.Redis.from_url(REDIS_URL)
    before = client.config_get("maxmemory-policy")["maxmemory-policy"]
    store = RedisControlStore(REDIS_URL, redis_prefix)
    try:
        client.config_set("maxmemory-policy", "allkeys-lru")
        warning = store.eviction_warning()
        client.config_set("maxmemory-policy", "volatile-lru")
        quiet = store.eviction_warning()
    finally:
        client.config_set("maxmemory-policy", before)
    assert warning and "allkeys-lru" in warning and "volatile-lru" in warning
    assert quiet is None


class DownStore(FileControlStore):
    """A shared store that cannot be reached (Redis down)."""

    def __init__(self, directory: Path):
        super().__init__(directory)
        self.where = "redis:down"

    def read(self):
        raise ConnectionError("down")

    def update(self, change, floor: int = 0):
        raise ConnectionError("down")

    def report(self, worker_id, record) -> None:
        raise ConnectionError("down")

    def workers(self):
        raise ConnectionError("down")

    def forget(self, worker_id) -> None:
        raise ConnectionError("down")


def test_a_shared_store_outage_never_makes_a_loading_server_ready(tmp_path: Path) -> None:
    """Measured (issue #12): with Redis unreachable at start, one worker answered /ready 200
    while its sibling was still loading. Readiness now comes from server-local records."""
    local = FileControlStore(tmp_path / "server")

    async def scenario():
        a, b = workers(DownStore(tmp_path / "shared"))
        for c in (a, b):
            c.local = local
        b.core.loader.ready = False  # b is still loading its models
        await started([a, b])
        await asyncio.sleep(0.3)  # several heartbeats
        loading = a.server_ready, b.server_ready
        b.core.loader.ready = True
        deadline = time.monotonic() + 30
        while not (a.server_ready and b.server_ready) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        loaded = a.server_ready, b.server_ready
        await closed([a, b])
        return loading, loaded

    loading, loaded = asyncio.run(scenario())
    assert loading == (False, False)
    assert loaded == (True, True)  # and the outage itself never holds readiness back


def test_a_killed_worker_counts_as_not_ready_at_once(store) -> None:
    """A SIGKILLed worker's record stays fresh for a few seconds; its process is gone, so it
    no longer counts (the server is unready until the restarted worker has loaded)."""

    async def scenario():
        a, b = workers(store)
        await started([a, b])
        deadline = time.monotonic() + 30
        while not a.server_ready and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        both = a.server_ready
        b._stop.set()  # b stops beating; its record says ready, from a pid that has exited
        record = store.workers()["host:1"]
        store.report("host:1", {**record, "pid": 2**22 + 1, "ts": time.time()})
        gone = a.server_ready
        await closed([a, b])
        return both, gone

    both, gone = asyncio.run(scenario())
    assert both is True and gone is False
