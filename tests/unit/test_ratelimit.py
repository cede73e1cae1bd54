"""The rate limiter: moving windows, several at once, per identity, memory and real Redis
storage, and fail-open when Redis is down."""

from __future__ import annotations

import asyncio
import socket

import pytest

from mlserve.ratelimit import RateLimiter, parse_limits
from tests.unit.conftest import REDIS_URL


def run(coro):
    return asyncio.run(coro)


async def spend(limiter: RateLimiter, n: int, who: str = "addr:1", kind: str = "predict"):
    return [await limiter.check(kind, who) for _ in range(n)]


@pytest.mark.parametrize("spec", ["ten per second", "0/second", "5/fortnight"])
def test_bad_specs_are_refused(spec) -> None:
    with pytest.raises(ValueError):
        parse_limits(spec)


def test_settings_refuse_a_bad_limit(clean_env) -> None:
    from mlserve.settings import Settings

    with pytest.raises(ValueError, match="rate limit"):
        Settings(_env_file=None, rate_limit="lots")
    assert Settings(_env_file=None, rate_limit=" 2/second;30/minute ").rate_limit


def test_exactly_the_limit_passes_and_429_says_when_to_retry() -> None:
    limiter = RateLimiter("3/minute", "")
    decisions = run(spend(limiter, 5))
    assert [d.allowed for d in decisions] == [True, True, True, False, False]
    assert decisions[0].headers["RateLimit-Limit"] == "3"
    assert [d.headers["RateLimit-Remaining"] for d in decisions[:3]] == ["2", "1", "0"]
    refused = decisions[3]
    assert 1 <= refused.retry_after <= 60 and refused.headers["Retry-After"]
    assert 0 < int(refused.headers["RateLimit-Reset"]) <= 60


def test_identities_have_separate_budgets() -> None:
    limiter = RateLimiter("2/minute", "")
    a = limiter.identity("key-aaaaaaaaaaaaaaaa", "10.0.0.1")
    b = limiter.identity("key-bbbbbbbbbbbbbbbb", "10.0.0.1")  # same address, other key
    assert a != b and "key-aaaa" not in a  # keys are hashed
    assert [d.allowed for d in run(spend(limiter, 3, a))] == [True, True, False]
    assert [d.allowed for d in run(spend(limiter, 3, b))] == [True, True, False]
    assert limiter.identity(None, "10.0.0.9") == "addr:10.0.0.9"


def test_several_windows_and_a_refusal_spends_nothing() -> None:
    limiter = RateLimiter("2/second;3/minute", "")

    async def scenario():
        first = await spend(limiter, 3)  # the per-second window refuses the third
        await asyncio.sleep(1.05)
        second = await spend(limiter, 2)  # one left in the minute: the refusal spent none
        return first, second

    first, second = run(scenario())
    assert [d.allowed for d in first] == [True, True, False]
    assert [d.allowed for d in second] == [True, False]
    assert second[1].headers["RateLimit-Limit"] == "3"  # the minute window is now the tightest


def test_the_admin_budget_is_its_own() -> None:
    limiter = RateLimiter("", "1/minute")
    assert [d.allowed for d in run(spend(limiter, 2, kind="admin"))] == [True, False]
    assert all(d.allowed and not d.headers for d in run(spend(limiter, 5)))  # predict: no limit


@pytest.mark.redis
def test_redis_counts_are_shared_between_limiters(redis_prefix) -> None:
    """Two workers (two limiters) on one Redis share one budget: exactly the limit passes."""
    one = RateLimiter("4/minute", "", REDIS_URL, redis_prefix)
    two = RateLimiter("4/minute", "", REDIS_URL, redis_prefix)

    async def scenario():
        results = []
        for i in range(8):
            results.append(await (one if i % 2 else two).check("predict", "key:shared"))
        return results

    assert [d.allowed for d in run(scenario())] == [True] * 4 + [False] * 4
    assert one.status() == {
        "enabled": True,
        "backend": "redis",
        "healthy": True,
        "last_error": None,
    }


def test_a_dead_redis_lets_traffic_through() -> None:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    events: list[str] = []
    limiter = RateLimiter("1/minute", "", f"redis://127.0.0.1:{port}/0", on_event=events.append)
    decisions = run(spend(limiter, 5))
    assert all(d.allowed for d in decisions)
    assert events == ["error"]  # then the breaker skips Redis for a while, without waiting
    assert limiter.status()["healthy"] is False
