"""The prediction cache: keys, both backends (Redis for real), the circuit breaker, foreign
values, no stampede, and waiters that outlive the request computing for them."""

from __future__ import annotations

import asyncio
import json
import socket
import time

import pytest

from mlserve.cache import (
    CacheUnavailable,
    MemoryBackend,
    PredictionCache,
    RedisBackend,
    cache_key,
    decode,
    encode,
)
from tests.unit.conftest import REDIS_URL

ENTRY = {"p": [0.25, 0.75], "i": 1}


def run(coro):
    return asyncio.run(coro)


def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"redis://127.0.0.1:{port}/0"  # nothing listens there once the socket is closed


def test_keys_name_the_model_identity_and_the_exact_text() -> None:
    a = cache_key("p", "identity-a", "great drug")
    assert a == cache_key("p", "identity-a", "great drug")
    assert a != cache_key("p", "identity-b", "great drug")  # another model's content
    # No normalisation of its own: the text is already what the model sees, so "US" and "us"
    # (a cased model) and "ß" and "ss" are different inputs.
    assert cache_key("p", "m", "US") != cache_key("p", "m", "us")
    assert cache_key("p", "m", "straße") != cache_key("p", "m", "strasse")
    assert "great" not in a.split(":")[-1]  # the text is hashed, never stored
    assert a.startswith("p:identity-a:")


@pytest.mark.parametrize(
    "raw",
    [
        "{not json",
        b"\xff\xfe",
        "[]",
        "null",
        '{"p": [0.5, 0.5]}',
        '{"p": [0.5, 0.5], "i": 2}',
        '{"p": [0.5, 0.5], "i": true}',
        '{"p": [1.0], "i": 0}',
        '{"p": [0.5, 0.5, 0.0], "i": 0}',
        '{"p": [1.5, -0.5], "i": 0}',
        '{"p": [NaN, 0.5], "i": 0}',
        '{"p": ["0.5", "0.5"], "i": 0}',
        '{"p": [0.2, 0.2], "i": 0}',
    ],
)
def test_a_value_that_is_not_an_entry_of_the_model_decodes_to_nothing(raw) -> None:
    assert decode(raw, n_labels=2) is None


def test_entries_round_trip() -> None:
    assert decode(encode(ENTRY), 2) == ENTRY
    assert decode(encode({"p": [1, 0], "i": 0}), 2) == {"p": [1, 0], "i": 0}


def test_memory_backend_lru_and_ttl() -> None:
    cache = MemoryBackend(max_size=2, ttl_seconds=0.2)

    async def go():
        await cache.set_many({"a": "1", "b": "2"})
        assert await cache.get_many(["a"]) == ["1"]  # a is now most recent
        await cache.set_many({"c": "3"})  # evicts b
        assert await cache.get_many(["a", "b", "c"]) == ["1", None, "3"]
        await asyncio.sleep(0.25)
        assert await cache.get_many(["a", "c"]) == [None, None]

    run(go())


def test_redis_backend_round_trip_with_ttl(redis_prefix) -> None:
    import redis

    backend = RedisBackend(REDIS_URL, ttl_seconds=60)
    keys = [f"{redis_prefix}:m:{i}" for i in range(3)]

    async def go():
        await backend.set_many({keys[0]: encode(ENTRY)})
        return await backend.get_many(keys)

    found = run(go())
    assert decode(found[0], 2) == ENTRY and found[1:] == [None, None]
    client = redis.Redis.from_url(REDIS_URL)
    assert 0 < client.ttl(keys[0]) <= 60
    assert client.get(keys[0]).startswith(b"{")  # JSON, not a pickle
    assert backend.status()["healthy"]


def test_dead_redis_fails_fast_then_opens_the_circuit_then_recovers() -> None:
    circuit: list[bool] = []
    backend = RedisBackend(
        closed_port_url(),
        ttl_seconds=60,
        failures_to_open=2,
        open_seconds=0.3,
        on_circuit=circuit.append,
    )

    async def go():
        for _ in range(2):
            start = time.perf_counter()
            with pytest.raises(CacheUnavailable):
                await backend.get_many(["k"])
            assert time.perf_counter() - start < 0.5  # short timeouts, no hanging
        assert backend.status()["circuit_open"]
        assert circuit == [True]
        with pytest.raises(CacheUnavailable, match="circuit open"):
            await backend.get_many(["k"])
        await asyncio.sleep(0.35)
        with pytest.raises(CacheUnavailable) as info:  # half-open: it tries Redis again
            await backend.get_many(["k"])
        assert "circuit" not in str(info.value)
        assert circuit == [True, False]

    run(go())


def entries_for(texts):
    return [{"p": [0.5, 0.5], "i": len(t) % 2} for t in texts]


def test_prediction_cache_computes_only_misses_and_counts_events() -> None:
    events: list[tuple[str, int]] = []
    cache = PredictionCache(MemoryBackend(100, 60), "p", lambda kind, n: events.append((kind, n)))
    calls: list[list[str]] = []

    async def compute(texts):
        calls.append(list(texts))
        return entries_for(texts)

    async def go():
        first = await cache.predict("m1", ["aa", "bbb"], 2, compute)
        second = await cache.predict("m1", ["AA", "cccc", "bbb"], 2, compute)
        third = await cache.predict("m2", ["aa"], 2, compute)  # another model: no hit
        return first, second, third

    (_, cached1), (entries2, cached2), (_, cached3) = run(go())
    assert calls == [["aa", "bbb"], ["AA", "cccc"], ["aa"]]
    assert cached1 == [False, False] and cached2 == [False, False, True] and cached3 == [False]
    assert [e["i"] for e in entries2] == [0, 0, 1]
    assert ("hit", 1) in events and ("miss", 2) in events


@pytest.mark.parametrize("foreign", ["{not json", '{"p": [1.0], "i": 0}', '"text"'])
def test_a_foreign_value_is_a_counted_miss_and_is_overwritten(foreign) -> None:
    events: list[tuple[str, int]] = []
    backend = MemoryBackend(100, 60)
    cache = PredictionCache(backend, "p", lambda kind, n: events.append((kind, n)))

    async def compute(texts):
        return [ENTRY for _ in texts]

    async def go():
        key = cache_key("p", "m1", "hello")
        await backend.set_many({key: foreign})
        entries, cached = await cache.predict("m1", ["hello"], 2, compute)
        return entries, cached, (await backend.get_many([key]))[0]

    entries, cached, stored = run(go())
    assert entries == [ENTRY] and cached == [False]
    assert ("error", 1) in events and ("miss", 1) in events and ("hit", 1) not in events
    assert json.loads(stored) == ENTRY  # overwritten with the model's own answer


def test_identical_concurrent_misses_cause_one_model_call() -> None:
    cache = PredictionCache(MemoryBackend(100, 60), "p")
    calls: list[list[str]] = []

    async def compute(texts):
        calls.append(list(texts))
        await asyncio.sleep(0.05)
        return [ENTRY for _ in texts]

    async def go():
        return await asyncio.gather(
            *(cache.predict("m1", ["same text", "same text"], 2, compute) for _ in range(20))
        )

    results = run(go())
    assert calls == [["same text"]]
    assert all(entries == [ENTRY] * 2 for entries, _ in results)


def test_a_failed_computation_is_retried_by_each_waiter_and_nothing_is_cached() -> None:
    cache = PredictionCache(MemoryBackend(100, 60), "p")
    calls = 0

    async def boom(texts):
        nonlocal calls
        calls += 1
        await asyncio.sleep(0.02)
        raise RuntimeError("model failed")

    async def ok(texts):
        return [ENTRY for _ in texts]

    async def go():
        results = await asyncio.gather(
            *(cache.predict("m1", ["x"], 2, boom) for _ in range(3)), return_exceptions=True
        )
        assert all(isinstance(r, RuntimeError) for r in results)
        return await cache.predict("m1", ["x"], 2, ok)

    entries, cached = run(go())
    assert calls == 3  # the owner's failure is not handed to the waiters: each tried itself
    assert cached == [False] and entries == [ENTRY]


def test_a_cancelled_owner_does_not_fail_its_waiters() -> None:
    """The request computing an entry is cancelled (its client left) while another request
    waits for the same text: the waiter computes the answer itself. Deterministic: the owner
    blocks on an event until the waiter is waiting, then is cancelled."""
    cache = PredictionCache(MemoryBackend(100, 60), "p")
    owner_started, release = asyncio.Event, asyncio.Event  # created inside the loop below
    calls: list[str] = []

    async def go():
        started, never = owner_started(), release()

        async def owner_compute(texts):
            calls.append("owner")
            started.set()
            await never.wait()  # blocks until cancelled
            return [ENTRY for _ in texts]

        async def waiter_compute(texts):
            calls.append("waiter")
            return [{"p": [0.9, 0.1], "i": 0} for _ in texts]

        owner = asyncio.create_task(cache.predict("m1", ["shared", "own"], 2, owner_compute))
        await started.wait()
        waiter = asyncio.create_task(cache.predict("m1", ["shared"], 2, waiter_compute))
        for _ in range(5):  # let the waiter reach its await on the owner's entry
            await asyncio.sleep(0)
        assert cache._inflight and not waiter.done()
        owner.cancel()
        with pytest.raises(asyncio.CancelledError):
            await owner
        return await waiter

    entries, cached = run(go())
    assert calls == ["owner", "waiter"]
    assert entries == [{"p": [0.9, 0.1], "i": 0}] and cached == [False]


def test_a_timed_out_owner_does_not_fail_its_waiters() -> None:
    from mlserve.errors import InferenceTimeoutError

    cache = PredictionCache(MemoryBackend(100, 60), "p")

    async def go():
        started = asyncio.Event()

        async def slow(texts):
            started.set()
            await asyncio.sleep(0.05)
            raise InferenceTimeoutError("inference did not finish within 0.05 s")

        async def fine(texts):
            return [ENTRY for _ in texts]

        owner = asyncio.create_task(cache.predict("m1", ["t"], 2, slow))
        await started.wait()
        waiter = asyncio.create_task(cache.predict("m1", ["t"], 2, fine))
        with pytest.raises(InferenceTimeoutError):
            await owner
        return await waiter

    entries, cached = run(go())
    assert entries == [ENTRY] and cached == [False]


def test_requests_succeed_without_the_cache_when_redis_is_down() -> None:
    events: list[tuple[str, int]] = []
    backend = RedisBackend(closed_port_url(), ttl_seconds=60)
    cache = PredictionCache(backend, "p", lambda kind, n: events.append((kind, n)))

    async def compute(texts):
        return [ENTRY for _ in texts]

    entries, cached = run(cache.predict("m1", ["a", "b"], 2, compute))
    assert entries == [ENTRY] * 2 and cached == [False, False]
    assert ("error", 1) in events
