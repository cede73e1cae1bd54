"""`mlserve benchmark`: n /predict requests at a given concurrency, against a server or in process.

In process it runs the same serving core (batcher, cache) as the server, without HTTP.
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

FALLBACK_TEXTS = [
    "The treatment worked well and I had no side effects.",
    "Shares fell sharply after the company reported a loss.",
    "The striker scored twice in the second half.",
    "The new phone has a faster chip and a better camera.",
    "I stopped taking it because the headaches got worse.",
]


@dataclass
class Result:
    """What one benchmark run measured."""

    requests: int
    concurrency: int
    seconds: float
    latencies_ms: list[float] = field(default_factory=list)
    errors: int = 0
    cached: int = 0
    target: str = ""

    def summary(self) -> dict[str, float | int | str]:
        lat = sorted(self.latencies_ms) or [float("nan")]

        def pct(p: float) -> float:
            return round(lat[min(len(lat) - 1, int(p * len(lat)))], 2)

        ok = max(1, self.requests - self.errors)
        return {
            "target": self.target,
            "requests": self.requests,
            "concurrency": self.concurrency,
            "requests_per_s": round(self.requests / self.seconds, 1) if self.seconds else 0.0,
            "p50_ms": round(statistics.median(lat), 2),
            "p95_ms": pct(0.95),
            "p99_ms": pct(0.99),
            "errors": self.errors,
            "cache_hit_rate": round(self.cached / ok, 3),
        }


def sample_texts(model: str, n: int, repeat_share: float, seed: int = 0) -> list[str]:
    """Real texts of the model's data set where we know it, with a share of repeats."""
    try:
        from training.data import load_bbc, load_drugscom

        pool = (load_bbc if model.startswith("topic") else load_drugscom)().texts
    except Exception:  # no data (offline, no cache): still benchmark something
        pool = FALLBACK_TEXTS
    rng = random.Random(seed)  # noqa: S311 - sampling, not security
    texts = [rng.choice(pool)[:4000] for _ in range(n)]
    for i in range(n):
        if i and rng.random() < repeat_share:
            texts[i] = texts[rng.randrange(i)]
    return texts


async def _drive(
    send: Callable[[str], Awaitable[tuple[bool, bool]]],
    texts: list[str],
    concurrency: int,
    progress: Callable[[], None],
) -> Result:
    result = Result(len(texts), concurrency, 0.0)
    queue = iter(texts)

    async def worker() -> None:
        for text in queue:
            t0 = time.perf_counter()
            try:
                ok, cached = await send(text)
            except Exception:
                ok, cached = False, False
            result.latencies_ms.append((time.perf_counter() - t0) * 1000)
            result.errors += not ok
            result.cached += cached
            progress()

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(concurrency)))
    result.seconds = time.perf_counter() - start
    return result


async def against_server(
    url: str, model: str, texts: list[str], concurrency: int, progress: Callable[[], None]
) -> Result:
    import httpx

    from mlserve.client import AsyncClient

    limits = httpx.Limits(max_connections=concurrency, keepalive_expiry=2.0)
    async with (
        httpx.AsyncClient(limits=limits, timeout=60) as http,
        AsyncClient(url, httpx_client=http) as client,
    ):

        async def send(text: str) -> tuple[bool, bool]:
            # An error answer raises a typed error, which _drive counts as an error.
            return True, (await client.predict(text, model)).cached

        result = await _drive(send, texts, concurrency, progress)
    result.target = url
    return result


async def in_process(
    model: str, texts: list[str], concurrency: int, progress: Callable[[], None]
) -> Result:
    from mlserve.core import ClassificationService
    from mlserve.settings import Settings

    tag = model
    if ":" not in model:  # a bare name: its newest version in the store
        from mlserve.store import list_models

        versions = list_models(model)
        if not versions:
            raise ValueError(f"no model named {model!r} in the store")
        tag = versions[0].tag
    core = ClassificationService(Settings(models=[tag], default_model=tag))
    core.loader._run()  # load synchronously, before the clock starts
    if core.loader.errors:
        raise ValueError(f"could not load {tag}: {core.loader.errors[tag]}")

    async def send(text: str) -> tuple[bool, bool]:
        outcome = await core.classify([text], model)
        return True, outcome.cached[0]

    try:
        result = await _drive(send, texts, concurrency, progress)
    finally:
        await core.aclose()
    result.target = "in-process"
    return result
