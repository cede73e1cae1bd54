"""Rate limits per API key (or per client address when no keys are set), with the ``limits``
library: moving windows, several at once (``MLSERVE_RATE_LIMIT="20/second;600/minute"``), and a
stricter one of their own for the admin API (``MLSERVE_ADMIN_RATE_LIMIT``, per client address).

With ``MLSERVE_REDIS_URL`` set the counts live in Redis, so a limit is exact across workers and
replicas. Otherwise each worker counts in memory: with N workers a client can get up to N times
the configured rate (connections are spread over the workers). A failing Redis never fails a
request: the limiter lets traffic through (fail open), counts the failure and shows it in
``/ready``, and skips Redis for a few seconds before trying again.
"""

from __future__ import annotations

import hashlib
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from limits import RateLimitItem, parse_many


def parse_limits(spec: str) -> list[RateLimitItem]:
    """``"20/second;600/minute"`` -> rate limit items; ``""`` -> none. Raises ValueError."""
    if not spec.strip():
        return []
    try:
        items = parse_many(spec)
    except Exception as exc:  # limits raises its own ValueError subclass, or others
        raise ValueError(f"not a rate limit: {spec!r} (e.g. '20/second;600/minute')") from exc
    if any(item.amount < 1 for item in items):
        raise ValueError(f"a rate limit must allow at least 1 request: {spec!r}")
    return items


@dataclass
class Decision:
    """Whether a request may go on, and the RateLimit-* headers that describe its budget."""

    allowed: bool
    headers: dict[str, str] = field(default_factory=dict)
    retry_after: int = 0


class RateLimiter:
    """One worker's limiter; ``check`` is awaited once per limited request."""

    def __init__(
        self,
        predict_spec: str,
        admin_spec: str,
        redis_url: str | None = None,
        prefix: str = "mlserve",
        on_event: Callable[[str], None] | None = None,
        open_seconds: float = 5.0,
    ):
        from limits.aio.storage import MemoryStorage, RedisStorage
        from limits.aio.strategies import MovingWindowRateLimiter

        self.items = {"predict": parse_limits(predict_spec), "admin": parse_limits(admin_spec)}
        self.backend = "redis" if redis_url else "memory"
        if redis_url:
            url = redis_url.replace("redis://", "async+redis://", 1).replace(
                "rediss://", "async+rediss://", 1
            )
            storage: Any = RedisStorage(
                url,
                implementation="redispy",
                key_prefix=f"{prefix}:ratelimit",
                wrap_exceptions=True,
                socket_timeout=0.05,
                socket_connect_timeout=0.05,
            )
        else:
            storage = MemoryStorage()
        self._limiter = MovingWindowRateLimiter(storage)
        self._on_event = on_event or (lambda kind: None)
        self.open_seconds = open_seconds
        self._open_until = 0.0
        self.last_error: str | None = None

    @property
    def enabled(self) -> bool:
        return any(self.items.values())

    def status(self) -> dict[str, Any]:
        return {
            "enabled": self.enabled,
            "backend": self.backend,
            "healthy": self.last_error is None,
            "last_error": self.last_error,
        }

    @staticmethod
    def identity(api_key: str | None, client: str | None) -> str:
        """Whose budget a request spends: its API key (hashed), else its client address."""
        if api_key:
            return "key:" + hashlib.sha256(api_key.encode()).hexdigest()[:24]
        return f"addr:{client or 'unknown'}"

    async def check(self, kind: str, who: str) -> Decision:
        """Spend one request of ``who``'s ``kind`` budget ("predict" or "admin")."""
        items = self.items[kind]
        if not items:
            return Decision(True)
        if time.monotonic() < self._open_until:
            return Decision(True)  # Redis failed a moment ago: fail open without waiting
        try:
            # Test every window first, so a refused request spends no window's budget; then
            # spend one in each (a race with another worker is refused by the atomic hit).
            tests = [await self._limiter.test(item, kind, who) for item in items]
            allowed = all(tests) and all([await self._limiter.hit(i, kind, who) for i in items])
            stats = [await self._limiter.get_window_stats(item, kind, who) for item in items]
        except Exception as exc:  # storage down: let the request through
            self.last_error = type(exc).__name__
            self._open_until = time.monotonic() + self.open_seconds
            self._on_event("error")
            return Decision(True)
        self.last_error = None
        now = time.time()
        # Describe the tightest window: the fewest requests left, then the latest reset.
        index = min(range(len(items)), key=lambda i: (stats[i].remaining, -stats[i].reset_time))
        reset = max(0, math.ceil(stats[index].reset_time - now))
        headers = {
            "RateLimit-Limit": str(items[index].amount),
            "RateLimit-Remaining": str(max(0, stats[index].remaining)),
            "RateLimit-Reset": str(reset),
        }
        if allowed:
            return Decision(True, headers)
        self._on_event("limited")
        blocked = [i for i, ok in enumerate(tests) if not ok] or [index]
        retry = max(max(0, math.ceil(stats[i].reset_time - now)) for i in blocked)
        headers["Retry-After"] = str(max(1, retry))
        return Decision(False, headers, max(1, retry))
