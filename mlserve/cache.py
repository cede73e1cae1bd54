"""Prediction cache: Redis when ``MLSERVE_REDIS_URL`` is set, else an in-memory LRU with a TTL.

Keys are the exact model version plus a sha256 of the *normalised* text, so a new version never
sees an old answer and no raw text is ever stored. Values are JSON, with a TTL. A slow, dead or
refusing Redis never fails a request: every call has a short timeout, and after a few failures a
circuit breaker skips Redis for a while, then tries again by itself.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
import time
import unicodedata
from typing import Any, Protocol

_SPACES = re.compile(r"\s+")
Entry = dict[str, Any]  # {"p": [probabilities], "i": predicted index}


def normalize(text: str) -> str:
    """The cache's notion of "the same input": NFKC, case-folded, whitespace collapsed."""
    return _SPACES.sub(" ", unicodedata.normalize("NFKC", text).casefold()).strip()


def cache_key(prefix: str, model_tag: str, text: str) -> str:
    digest = hashlib.sha256(normalize(text).encode("utf-8")).hexdigest()
    return f"{prefix}:{model_tag}:{digest}"


class Backend(Protocol):
    name: str

    async def get_many(self, keys: list[str]) -> list[Entry | None]: ...

    async def set_many(self, items: dict[str, Entry]) -> None: ...

    def status(self) -> dict[str, Any]: ...


class MemoryBackend:
    """A bounded LRU with a per-entry TTL, local to one worker process."""

    name = "memory"

    def __init__(self, max_size: int, ttl_seconds: float):
        self.max_size, self.ttl = max_size, ttl_seconds
        self._data: collections.OrderedDict[str, tuple[float, Entry]] = collections.OrderedDict()
        self._lock = threading.Lock()

    async def get_many(self, keys: list[str]) -> list[Entry | None]:
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

    async def set_many(self, items: dict[str, Entry]) -> None:
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
    ):
        import redis.asyncio as aioredis

        self.ttl = ttl_seconds
        self._client = aioredis.Redis.from_url(
            url, socket_timeout=timeout, socket_connect_timeout=timeout, retry_on_timeout=False
        )
        self.failures_to_open, self.open_seconds = failures_to_open, open_seconds
        self._failures = 0
        self._open_until = 0.0
        self.last_error: str | None = None

    def _available(self) -> bool:
        return time.monotonic() >= self._open_until

    def _ok(self) -> None:
        self._failures = 0
        self.last_error = None

    def _failed(self, exc: Exception) -> None:
        self._failures += 1
        self.last_error = type(exc).__name__
        if self._failures >= self.failures_to_open:
            self._open_until = time.monotonic() + self.open_seconds
            self._failures = 0

    async def get_many(self, keys: list[str]) -> list[Entry | None]:
        if not self._available():
            raise CacheUnavailable("circuit open")
        try:
            raw = await self._client.mget(keys)
        except Exception as exc:
            self._failed(exc)
            raise CacheUnavailable(type(exc).__name__) from exc
        self._ok()
        return [json.loads(v) if v is not None else None for v in raw]

    async def set_many(self, items: dict[str, Entry]) -> None:
        if not items or not self._available():
            return
        try:
            async with self._client.pipeline(transaction=False) as pipe:
                for key, value in items.items():
                    pipe.set(key, json.dumps(value), ex=self.ttl)
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


def make_backend(settings: Any) -> Backend | None:
    """The configured backend, or None when caching is off."""
    if not settings.cache_enabled:
        return None
    if settings.redis_url:
        return RedisBackend(settings.redis_url, settings.cache_ttl_seconds)
    return MemoryBackend(settings.cache_max_size, settings.cache_ttl_seconds)


class PredictionCache:
    """Cache lookups around a model call, with one model call per distinct missing input.

    Identical concurrent misses (within one request or across requests of this worker) share a
    single computation instead of stampeding the model.
    """

    def __init__(self, backend: Backend, prefix: str = "mlserve", on_event: Any = None):
        self.backend = backend
        self.prefix = prefix
        self._inflight: dict[str, Any] = {}  # key -> asyncio.Future[Entry]
        self._on_event = on_event or (lambda kind, n: None)

    async def _get(self, keys: list[str]) -> list[Entry | None]:
        try:
            found = await self.backend.get_many(keys)
        except CacheUnavailable:
            self._on_event("error", 1)
            return [None] * len(keys)
        hits = sum(v is not None for v in found)
        self._on_event("hit", hits)
        self._on_event("miss", len(keys) - hits)
        return found

    async def _set(self, items: dict[str, Entry]) -> None:
        try:
            await self.backend.set_many(items)
        except CacheUnavailable:
            self._on_event("error", 1)

    async def predict(
        self, tag: str, texts: list[str], compute: Any
    ) -> tuple[list[Entry], list[bool]]:
        """Entries for ``texts`` in order, and which of them came from the cache.

        ``compute(texts) -> list[Entry]`` runs the model on the texts no one is computing yet.
        """
        import asyncio

        keys = [cache_key(self.prefix, tag, t) for t in texts]
        found = await self._get(keys)
        cached = [v is not None for v in found]
        loop = asyncio.get_running_loop()
        waiting: dict[str, asyncio.Future] = {}  # every missing key -> the future that fills it
        mine: dict[str, int] = {}  # keys this call computes -> index of their first text
        for i, (key, value) in enumerate(zip(keys, found, strict=True)):
            if value is None and key not in waiting:
                if key in self._inflight:
                    waiting[key] = self._inflight[key]
                else:
                    waiting[key] = self._inflight[key] = loop.create_future()
                    mine[key] = i
        try:
            if mine:
                computed = await compute([texts[i] for i in mine.values()])
                fresh = dict(zip(mine, computed, strict=True))
                for key, value in fresh.items():
                    waiting[key].set_result(value)
                await self._set(fresh)
        except BaseException as exc:
            for key in mine:
                if not waiting[key].done():
                    waiting[key].set_exception(exc)
                    waiting[key].exception()  # retrieved: nobody else may be waiting
            raise
        finally:
            for key in mine:
                self._inflight.pop(key, None)
        out = [
            value if value is not None else await asyncio.shield(waiting[key])
            for key, value in zip(keys, found, strict=True)
        ]
        return out, cached
