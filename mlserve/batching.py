"""Adaptive batching inside the serving process.

Requests for one model version are queued; a single consumer takes everything waiting (up to
``max_batch_size`` texts) whenever the model is free, runs it as one batch in a worker thread
and hands each request back its own rows. Under light load a request runs at once, alone; under
heavy load batches grow by themselves while the previous batch computes. When the last batch held
several requests, the consumer may hold an idle model for up to ``max_latency_ms`` to fill the
next one.

Why not BentoML's ``batchable=True``: it batches only at the HTTP entry of a list-shaped API, or
across services through ``bentoml.depends()``, whose client fails under concurrency in bentoml
1.4.30+ (bentoml/BentoML#5540); and its dispatcher sheds load with 503s when ``max_latency_ms``
is tight. Batching here never crosses a process and never drops a request: a request waits
until it is served or until its own deadline (then 504).
"""

from __future__ import annotations

import asyncio
import collections
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mlserve.errors import InferenceTimeoutError, ServiceUnavailableError
from runners.base import BatchResult


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future
    enqueued: float = field(default_factory=time.perf_counter)


@dataclass
class BatchSlice:
    """One request's share of a batch."""

    probabilities: np.ndarray
    predicted_index: np.ndarray
    labels: list[str]
    timing_ms: dict[str, float]
    batch_size: int


class AdaptiveBatcher:
    """Queue + single consumer for one model version (one per worker process)."""

    def __init__(
        self,
        predict: Callable[[list[str]], BatchResult],
        max_batch_size: int,
        max_latency_ms: float,
        on_batch: Callable[[int, float, dict[str, float]], None] | None = None,
        on_error: Callable[[str], None] | None = None,
    ):
        self._predict = predict
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self._on_batch = on_batch
        self._on_error = on_error or (lambda kind: None)
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mlserve-model")
        self._last_batch_jobs = 1
        self._inflight: list[_Job] = []
        self._closed = False

    async def submit(self, texts: list[str], timeout: float) -> BatchSlice:
        """Queue ``texts`` (one request) and wait for its rows, at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            if self._task is not None and not self._closed:
                self._on_error("restart")  # the consumer ended: start another
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._consume())
        job = _Job(list(texts), loop.create_future())
        self._queue.append(job)
        self._wake.set()
        try:
            return await asyncio.wait_for(asyncio.shield(job.future), timeout)
        except TimeoutError as exc:
            job.future.cancel()  # a job still queued is skipped; a running one is discarded
            raise InferenceTimeoutError(f"inference did not finish within {timeout:g} s") from exc

    def _take(self) -> list[_Job]:
        jobs, n = [], 0
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # timed out while queued
                self._queue.popleft()
                continue
            if jobs and n + len(job.texts) > self.max_batch_size:
                break
            jobs.append(self._queue.popleft())
            n += len(job.texts)
        return jobs

    def _pending_texts(self) -> int:
        return sum(len(j.texts) for j in self._queue)

    async def _consume(self) -> None:
        while not self._closed:
            try:
                await self._step()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a fault in the bookkeeping: fail its batch, keep serving
                self._on_error("deliver")
                self._fail(self._inflight, exc)
            finally:
                self._inflight = []

    async def _step(self) -> None:
        """Wait for work, run one batch and hand every request its rows."""
        if not self._queue:
            self._wake.clear()
            await self._wake.wait()
            return
        if self.max_latency > 0 and self._last_batch_jobs > 1:
            # Traffic is concurrent: give the batch a moment to fill.
            deadline = self._queue[0].enqueued + self.max_latency
            while (
                self._pending_texts() < self.max_batch_size
                and (wait := deadline - time.perf_counter()) > 0
            ):
                self._wake.clear()
                try:
                    await asyncio.wait_for(self._wake.wait(), wait)
                except TimeoutError:
                    break
        jobs = self._take()
        if not jobs:
            return
        self._last_batch_jobs = len(jobs)
        start = time.perf_counter()
        texts = [t for job in jobs for t in job.texts]
        self._inflight = jobs
        loop = asyncio.get_running_loop()
        try:
            result = await loop.run_in_executor(self._executor, self._predict, texts)
        except Exception as exc:  # every request of the batch gets the model's error
            self._fail(jobs, exc)
            return
        queue_ms = [(start - job.enqueued) * 1000.0 for job in jobs]
        offset = 0
        for job, waited in zip(jobs, queue_ms, strict=True):
            n = len(job.texts)
            if not job.future.done():
                job.future.set_result(
                    BatchSlice(
                        probabilities=result.probabilities[offset : offset + n],
                        predicted_index=result.predicted_index[offset : offset + n],
                        labels=result.labels,
                        timing_ms={"queue_ms": waited, **result.timing_ms},
                        batch_size=len(texts),
                    )
                )
            offset += n
        if self._on_batch:
            try:
                self._on_batch(len(texts), max(queue_ms), result.timing_ms)
            except Exception:  # metrics must never fail requests or the consumer
                self._on_error("hook")

    @staticmethod
    def _fail(jobs: list[_Job], exc: Exception) -> None:
        for job in jobs:
            if not job.future.done():
                job.future.set_exception(exc)

    async def aclose(self) -> None:
        """Stop the consumer; requests queued or running get a 503 error."""
        self._closed = True
        if self._task is not None:
            self._task.cancel()
        for job in [*self._inflight, *self._queue]:
            if not job.future.done():
                job.future.set_exception(ServiceUnavailableError("the model was unloaded"))
        self._queue.clear()
        self._executor.shutdown(wait=False)
