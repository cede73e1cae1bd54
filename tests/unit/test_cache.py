"""The prediction cache: keys, both backends (Redis for real), the circuit breaker, no stampede."""

from __future__ import annotations

import asyncio
import socket
import time

import pytest

from mlserve.cache import (
    CacheUnavailable,
    MemoryBackend,
    PredictionCache,
    RedisBackend,
    cache_key,
    normalize,
)
from tests.unit.conftest import REDIS_URL


def run(coro):
    return asyncio.run(coro)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there once the socket is closed


def test_keys_ignore_case_and_spacing_but_not_the_model_version() -> None:
    a = cache_key("p", "sentiment:v1", "Great   drug!")
    assert a == cache_key("p", "sentiment:v1", "  great drug! ")
    assert a != cache_key("p", "sentiment:v2", "Great drug!")
    assert a != cache_key("p", "sentiment:v1", "Great drugs!")
    assert "great" not in a.lower().split(":")[-1]  # the text is hashed, never stored
    assert normalize("ＡＢＣ\tdef") == "abc def"


def test_memory_backend_lru_and_ttl() -> None:
    cache = MemoryBackend(max_size=2, ttl_seconds=0.2)

    async def go():
        await cache.set_many({"a": {"i": 1}, "b": {"i": 2}})
        assert await cache.get_many(["a"]) == [{"i": 1}]  # a is now most recent
        await cache.set_many({"c": {"i": 3}})  # evicts b
        assert await cache.get_many(["a", "b", "c"]) == [{"i": 1}, None, {"i": 3}]
        await asyncio.sleep(0.25)
        assert await cache.get_many(["a", "c"]) == [None, None]

    run(go())


def test_redis_backend_round_trip_with_ttl(redis_prefix) -> None:
    import redis

    backend = RedisBackend(REDIS_URL, ttl_seconds=60)
    keys = [f"{redis_prefix}:m:{i}" for i in range(3)]

    async def go():
        await backend.set_many({keys[0]: {"p": [0.25, 0.75], "i": 1}})
        return await backend.get_many(keys)

    assert run(go()) == [{"p": [0.25, 0.75], "i": 1}, None, None]
    client = redis.Redis.from_url(REDIS_URL)
    assert 0 < client.ttl(keys[0]) <= 60
    assert client.get(keys[0]).startswith(b"{")  # JSON, not a pickle
    assert backend.status()["healthy"]


def test_dead_redis_fails_fast_then_opens_the_circuit_then_recovers() -> None:
    backend = RedisBackend(closed_port_url(), ttl_seconds=60, failures_to_open=2, open_seconds=0.3)

    async def go():
        for _ in range(2):
            start = time.perf_counter()
            with pytest.raises(CacheUnavailable):
                await backend.get_many(["k"])
            assert time.perf_counter() - start < 0.5  # short timeouts, no hanging
        assert backend.status()["circuit_open"]
        with pytest.raises(CacheUnavailable, match="circuit open"):
            await backend.get_many(["k"])
        await asyncio.sleep(0.35)
        with pytest.raises(CacheUnavailable) as info:  # half-open: it tries Redis again
            await backend.get_many(["k"])
        assert "circuit" not in str(info.value)

    run(go())


def test_prediction_cache_computes_only_misses_and_counts_events() -> None:
    events: list[tuple[str, int]] = []
    cache = PredictionCache(MemoryBackend(100, 60), "p", lambda kind, n: events.append((kind, n)))
    calls: list[list[str]] = []

    async def compute(texts):
        calls.append(list(texts))
        return [{"p": [len(t)], "i": 0} for t in texts]

    async def go():
        first = await cache.predict("m:v1", ["aa", "bbb"], compute)
        second = await cache.predict("m:v1", ["AA", "cccc", "bbb"], compute)
        return first, second

    (_, cached1), (entries2, cached2) = run(go())
    assert calls == [["aa", "bbb"], ["cccc"]]
    assert cached1 == [False, False] and cached2 == [True, False, True]
    assert [e["p"] for e in entries2] == [[2], [4], [3]]
    assert ("hit", 2) in events and ("miss", 1) in events


def test_identical_concurrent_misses_cause_one_model_call() -> None:
    cache = PredictionCache(MemoryBackend(100, 60), "p")
    calls: list[list[str]] = []

    async def compute(texts):
        calls.append(list(texts))
        await asyncio.sleep(0.05)
        return [{"p": [1.0], "i": 0} for _ in texts]

    async def go():
        results = await asyncio.gather(
            *(cache.predict("m:v1", ["same text", "Same  text"], compute) for _ in range(20))
        )
        return results

    results = run(go())
    assert calls == [["same text"]]
    assert all(entries == [{"p": [1.0], "i": 0}] * 2 for entries, _ in results)


def test_a_failed_computation_reaches_every_waiter_and_nothing_is_cached() -> None:
    cache = PredictionCache(MemoryBackend(100, 60), "p")

    async def boom(texts):
        await asyncio.sleep(0.02)
        raise RuntimeError("model failed")

    async def ok(texts):
        return [{"p": [1.0], "i": 0} for _ in texts]

    async def go():
        results = await asyncio.gather(
            *(cache.predict("m:v1", ["x"], boom) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        return await cache.predict("m:v1", ["x"], ok)

    entries, cached = run(go())
    assert cached == [False] and entries == [{"p": [1.0], "i": 0}]


def test_requests_succeed_without_the_cache_when_redis_is_down() -> None:
    events: list[tuple[str, int]] = []
    backend = RedisBackend(closed_port_url(), ttl_seconds=60)
    cache = PredictionCache(backend, "p", lambda kind, n: events.append((kind, n)))

    async def compute(texts):
        return [{"p": [0.5, 0.5], "i": 1} for _ in texts]

    entries, cached = run(cache.predict("m:v1", ["a", "b"], compute))
    assert entries == [{"p": [0.5, 0.5], "i": 1}] * 2 and cached == [False, False]
    assert ("error", 1) in events
