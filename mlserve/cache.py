"""Prediction cache: Redis when ``MLSERVE_REDIS_URL`` is set, else an in-memory LRU with a TTL.

A key is ``<prefix>:<model identity>:<sha256 of the text the model sees>``:

* the *model identity* is a digest of the model's content (the sha256 of every file, its
  labels, its cleaning and its serving options; see ``runners.base.Runner.identity``), never its
  tag, so an overwritten tag, an import under an old tag or a rollback can never meet an entry
  another model wrote;
* the text is the one the runner receives, after the model's own cleaning, so two inputs share an
  entry exactly when the model cannot tell them apart. No raw text is ever stored.

Values are JSON with a TTL. A value that does not decode, or does not fit the model's labels, is
a miss (counted as a cache error) and is overwritten. A slow, dead or refusing Redis never fails
a request: every call has a short timeout, and after a few failures a circuit breaker skips
Redis for a while, then tries again by itself.
"""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import math
import threading
import time
from collections.abc import Awaitable, Callable
from typing import Any, Protocol

Entry = dict[str, Any]  # {"p": [probabilities], "i": predicted index}
Raw = str | bytes


def cache_key(prefix: str, identity: str, text: str) -> str:
    """The key of ``text`` (as the model sees it) for the model whose identity is ``identity``."""
    digest = hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{prefix}:{identity}:{digest}"


def encode(entry: Entry) -> str:
    return json.dumps(entry, separators=(",", ":"))


def decode(raw: Raw, n_labels: int) -> Entry | None:
    """The entry in ``raw`` if it is one this model could have written, else None."""
    try:
        value = json.loads(raw)
    except (ValueError, TypeError, RecursionError):
        return None
    if not isinstance(value, dict):
        return None
    probs, index = value.get("p"), value.get("i")
    if (
        not isinstance(probs, list)
        or len(probs) != n_labels
        or type(index) is not int
        or not 0 <= index < n_labels
    ):
        return None
    for p in probs:
        if type(p) not in (float, int) or not (0.0 <= p <= 1.0) or math.isnan(p):
            return None
    if abs(sum(probs) - 1.0) > 1e-3:
        return None
    return {"p": probs, "i": index}


class Backend(Protocol):
    """Stores encoded entries; it neither decodes nor checks them (the cache does)."""

    name: str

    async def get_many(self, keys: list[str]) -> list[Raw | None]: ...

    async def set_many(self, items: dict[str, str]) -> None: ...

    def status(self) -> dict[str, Any]: ...


class MemoryBackend:
    """A bounded LRU with a per-entry TTL, local to one worker process."""

    name = "memory"

    def __init__(self, max_size: int, ttl_seconds: float):
        self.max_size, self.ttl = max_size, ttl_seconds
        self._data: collections.OrderedDict[str, tuple[float, str]] = collections.OrderedDict()
        self._lock = threading.Lock()

    async def get_many(self, keys: list[str]) -> list[Raw | None]:
        now, out = time.monotonic(), []
        with self._lock:
            for key in keys:
                item = self._data.get(key)
                if item is None or item[0] < now:
                    if item is not None:
                        del self._data[key]
                    out.append(None)
                else:
                    self._data.move_to_end(key)
                    out.append(item[1])
        return out

    async def set_many(self, items: dict[str, str]) -> None:
        expires = time.monotonic() + self.ttl
        with self._lock:
            for key, value in items.items():
                self._data[key] = (expires, value)
                self._data.move_to_end(key)
            while len(self._data) > self.max_size:
                self._data.popitem(last=False)

    def status(self) -> dict[str, Any]:
        return {"backend": self.name, "entries": len(self._data), "healthy": True}


class RedisBackend:
    """Redis with a short timeout and a circuit breaker; one round trip per batch."""

    name = "redis"

    def __init__(
        self,
        url: str,
        ttl_seconds: int,
        timeout: float = 0.05,
        failures_to_open: int = 3,
        open_seconds: float = 5.0,
        on_circuit: Callable[[bool], None] | None = None,
    ):
        import redis.asyncio as aioredis

        self.ttl = ttl_seconds
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self.failures_to_open, self.open_seconds = failures_to_open, open_seconds
        self._failures = 0
        self._open_until = 0.0
        self._circuit_open = False
        self._on_circuit = on_circuit or (lambda is_open: None)
        self.last_error: str | None = None

    def _available(self) -> bool:
        if time.monotonic() >= self._open_until:
            self._set_circuit(False)
            return True
        return False

    def _set_circuit(self, is_open: bool) -> None:
        if is_open != self._circuit_open:
            self._circuit_open = is_open
            self._on_circuit(is_open)

    def _ok(self) -> None:
        self._failures = 0
        self.last_error = None

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.last_error = type(exc).__name__
        if self._failures >= self.failures_to_open:
            self._open_until = time.monotonic() + self.open_seconds
            self._failures = 0
            self._set_circuit(True)

    async def get_many(self, keys: list[str]) -> list[Raw | None]:
        if not self._available():
            raise CacheUnavailable("circuit open")
        try:
            raw = await self._client.mget(keys)
        except Exception as exc:
            self._failed(exc)
            raise CacheUnavailable(type(exc).__name__) from exc
        self._ok()
        return raw

    async def set_many(self, items: dict[str, str]) -> None:
        if not items or not self._available():
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, value, ex=self.ttl)
                await pipe.execute()
        except Exception as exc:
            self._failed(exc)
            raise CacheUnavailable(type(exc).__name__) from exc
        self._ok()

    def status(self) -> dict[str, Any]:
        return {
            "backend": self.name,
            "healthy": self._available() and self.last_error is None,
            "circuit_open": not self._available(),
            "last_error": self.last_error,
        }


class CacheUnavailable(Exception):
    """The backend could not answer; the caller carries on without the cache."""


def make_backend(settings: Any, on_circuit: Callable[[bool], None] | None = None) -> Backend | None:
    """The configured backend, or None when caching is off."""
    if not settings.cache_enabled:
        return None
    if settings.redis_url:
        return RedisBackend(settings.redis_url, settings.cache_ttl_seconds, on_circuit=on_circuit)
    return MemoryBackend(settings.cache_max_size, settings.cache_ttl_seconds)


class _Handoff(Exception):
    """The request computing a shared entry failed or left: its waiters compute for themselves."""


Compute = Callable[[list[str]], Awaitable[list[Entry]]]


class PredictionCache:
    """Cache lookups around a model call, with one model call per distinct missing input.

    Identical concurrent misses (within one request or across requests of this worker) share a
    single computation instead of stampeding the model. If the request computing a shared entry
    fails, is cancelled or times out, the requests waiting on it compute it themselves: one
    request's fate never becomes another's.
    """

    def __init__(
        self,
        backend: Backend,
        prefix: str = "mlserve",
        on_event: Callable[[str, int], None] | None = None,
    ):
        self.backend = backend
        self.prefix = prefix
        self._inflight: dict[str, asyncio.Future[Entry]] = {}
        self._on_event = on_event or (lambda kind, n: None)

    async def _get(self, keys: list[str], n_labels: int) -> list[Entry | None]:
        try:
            found = await self.backend.get_many(keys)
        except CacheUnavailable:
            self._on_event("error", 1)
            return [None] * len(keys)
        entries = [None if raw is None else decode(raw, n_labels) for raw in found]
        hits = sum(e is not None for e in entries)
        # A value that is there but is not an entry of this model: a miss, counted as an error,
        # and overwritten once computed.
        self._on_event("error", sum(raw is not None for raw in found) - hits)
        self._on_event("hit", hits)
        self._on_event("miss", len(keys) - hits)
        return entries

    async def _set(self, items: dict[str, Entry]) -> None:
        try:
            await self.backend.set_many({k: encode(v) for k, v in items.items()})
        except CacheUnavailable:
            self._on_event("error", 1)

    async def predict(
        self, identity: str, texts: list[str], n_labels: int, compute: Compute
    ) -> tuple[list[Entry], list[bool]]:
        """Entries for ``texts`` (as the model sees them) in order, and which were cached.

        ``identity`` names the model's content; ``compute(texts) -> list[Entry]`` runs the
        model on the texts that no request of this worker is computing yet.
        """
        keys = [cache_key(self.prefix, identity, t) for t in texts]
        found = await self._get(keys, n_labels)
        cached = [v is not None for v in found]
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future[Entry]] = {}  # missing key -> the future filling it
        first: dict[str, int] = {}  # missing key -> index of its first text
        mine: list[str] = []  # keys this call computes
        for i, (key, value) in enumerate(zip(keys, found, strict=True)):
            if value is None and key not in waiting:
                first[key] = i
                if key in self._inflight:
                    waiting[key] = self._inflight[key]
                else:
                    waiting[key] = self._inflight[key] = loop.create_future()
                    mine.append(key)
        results: dict[str, Entry] = {}
        try:
            if mine:
                fresh = await self._compute(mine, first, texts, compute)
                for key, value in fresh.items():
                    waiting[key].set_result(value)
                results.update(fresh)
                await self._set(fresh)
        except BaseException:
            for key in mine:
                future = waiting[key]
                if not future.done():
                    future.set_exception(_Handoff())
                    future.exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            for key in mine:
                if self._inflight.get(key) is waiting[key]:
                    del self._inflight[key]
        orphaned: list[str] = []
        for key, future in waiting.items():
            if key in results:
                continue
            try:
                results[key] = await asyncio.shield(future)
            except _Handoff:
                orphaned.append(key)
        if orphaned:
            fresh = await self._compute(orphaned, first, texts, compute)
            results.update(fresh)
            await self._set(fresh)
        out = [
            value if value is not None else results[key]
            for key, value in zip(keys, found, strict=True)
        ]
        return out, cached

    async def _compute(
        self, keys: list[str], first: dict[str, int], texts: list[str], compute: Compute
    ) -> dict[str, Entry]:
        computed = await compute([texts[first[k]] for k in keys])
        return dict(zip(keys, computed, strict=True))
