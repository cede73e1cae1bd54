"""Adaptive batching inside the serving process.

Requests for one model version are queued; a single consumer takes everything waiting (up to
``max_batch_size`` texts) whenever the model is free, runs it as one batch in a worker thread
and hands each request back its own rows. Under light load a request runs at once, alone; under
heavy load batches grow by themselves while the previous batch computes. When the last batch held
several requests, the consumer may hold an idle model for up to ``max_latency_ms`` to fill the
next one, but only until it is as big as the last one (or ``max_batch_size``): the clients that
batch answered are the ones coming back, and waiting for more than them only adds latency (with
2 clients per worker, every batch used to wait the whole ``max_latency_ms``).

**A lone request on a fast model** (a runner with ``inline``, such as the classical family,
whose batches hold the GIL, so their thread runs nothing in parallel with the event loop) runs
at once in the event loop when it has one text, nothing is queued or running, the last batch
held one request, no other request is arriving with it (it looks again after one turn of the
event loop), and recent batches took at most ``INLINE_MAX_MS``: the same model call, metrics
and moving averages as a batch of one, without the hops to the consumer task and the batch
thread and back. Anything bigger, or arriving with other requests, goes through the queue.

Why not BentoML's ``batchable=True``: it batches only at the HTTP entry of a list-shaped API, or
across services through ``bentoml.depends()``, whose client fails under concurrency in bentoml
1.4.30+ (bentoml/BentoML#5540); and its dispatcher sheds load with 503s when ``max_latency_ms``
is tight. Batching here never crosses a process and never drops a request it has taken.

**Admission control.** A request that cannot be served within its deadline is refused at once
(503 ``overloaded`` with ``Retry-After``) instead of waiting to time out: the batcher keeps a
moving average of its throughput (texts per second of model time) and of its batch time, and
estimates the wait of a new request from the texts queued ahead of it. A request whose estimate
is over ``ADMISSION_HEADROOM`` of its deadline, or that would take the queue past
``max_queue`` texts, is refused. For ``PLAN_ARMED_S`` after a queued request was refused (late,
or its deadline passed in the queue), a request is also refused when its batch could not end
before its deadline with the margin the batches are planned with (below), counted on its wait
too (:meth:`AdaptiveBatcher.planned_finish`). Until ``WARM_BATCHES`` batches have been learnt
from, the estimate is a guess (a server's first batch may have run on a starved CPU): a request
that fits in the next batch is then taken to wait for one batch, not for the queue at that
batch's rate. Once the estimate is warm, after each batch, with the throughput it taught, a
queued request that the texts ahead of it would keep past its deadline is refused too, instead
of waiting out the deadline first.
A batch grows only as far as it can end before the earliest deadline in it, with
:data:`SAFETY` times its expected time to spare; that time is a fixed cost per batch plus a
cost per text (:class:`BatchCost`), fitted to the recent batches. A job at the head of the queue
that cannot get that margin is refused (503): a batch that starts is meant to end in time, so a
504 is left for a model that slows down past three times its recent speed.
Each model version has its own queue and its own model thread, so one model's flood never queues
another's requests.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field

import numpy as np

from mlserve.errors import InferenceTimeoutError, OverloadedError, ServiceUnavailableError
from runners.base import BatchResult


@dataclass
class _Job:
    texts: list[str]
    future: asyncio.Future
    deadline: float = float("inf")  # perf_counter time by which the request must be answered
    enqueued: float = field(default_factory=time.perf_counter)
    answered: float = 0.0  # perf_counter time its rows were set on its future


ADMISSION_HEADROOM = 0.75
"""Admit a request only if its estimated completion is within this share of its deadline (the
rest covers the estimate's error and the HTTP path)."""
_EWMA = 0.2
LAG_HALF_LIFE_S = 2.0
"""The event loop's hand-over delay (see :meth:`AdaptiveBatcher.loop_reserve`) is the highest
recently seen, halved every this many seconds."""
MAX_RESERVE_SHARE = 0.5
"""The loop reserve never takes more than this share of a request's deadline."""
WARM_BATCHES = 5
"""The moving averages are a guess until this many batches were learnt from: meanwhile they
follow every batch by half, faster or slower, and admission takes a request that fits in the next
batch to wait for one batch time at most: a first batch run on a starved CPU, trusted alone and
extrapolated to every queued text, would refuse requests that the next batch serves
(tests/unit/test_batching.py)."""
INLINE_MAX_MS = 5.0
"""A lone request runs inline (see the module docstring) only if recent batches took at most
this many milliseconds: the event loop waits for it meanwhile. The same as CPython's default GIL
switch interval (5 ms): an inline model holds the GIL in its batch thread too, so the event loop
got a turn at most that often while it ran there. (It was 2 ms, measured on a fast core; on a
core four times slower, the benchmark model's 3.4 ms per text sent every lone request through
the thread, 0.7 ms more a request.)"""


PLAN_ARMED_S = 10.0
"""After a queued request was refused (``late``: it could not be computed before its deadline;
``expired``: its deadline passed in the queue), admission also plans each new request as the
batcher would (:meth:`AdaptiveBatcher.planned_finish`) for this many seconds, renewed by every
such refusal and by the plan's own. See :meth:`AdaptiveBatcher.admit`."""

SAFETY = 3.0
"""A batch is planned to take this many times its expected model time (:class:`BatchCost`): a
job joins a batch only if the batch would end before the job's deadline even that much slower.
When a flood's refusals start, the event loops take the cores from the model thread, and a batch
ran 2.6 times slower than planned from the batches before it (32 texts planned for 0.38 s took
0.99 s; BENCHMARK.md, "Overload"): at twice, some batches overran and their requests got 504s.
A job that cannot get this margin is refused (503) instead."""
FORGET = 0.7
"""The batch-time model (:class:`BatchCost`) weighs each batch this much less than the one after
it: the last three or four batches carry most of the weight, so it follows a change of the
machine's load within a few batches."""


class BatchCost:
    """A batch's model time as a fixed cost plus a cost per text, fitted by least squares to the
    recent batches (exponential forgetting, :data:`FORGET`).

    One rate (texts per second) cannot describe a batch: on a CPU shared with busy event loops
    the transformer took a median 75 ms for one text and 0.4 s for 32 (BENCHMARK.md,
    "Overload"), and the model thread waits for the GIL between its operations however few texts
    it holds. Planned at the rate that small batches teach, a batch could hold one text: the
    batcher ran hundreds of single-text batches under a flood, and they overran their deadlines
    (504) more than any other. Until the recent batches differ in size the fit cannot tell the
    two costs apart, and the cost is taken as proportional to the texts."""

    def __init__(self) -> None:
        self._w = self._n = self._t = self._nn = self._nt = 0.0
        self._fit: tuple[float, float] | None = None

    def add(self, texts: int, seconds: float) -> None:
        f = FORGET
        self._w = f * self._w + 1.0
        self._n = f * self._n + texts
        self._t = f * self._t + seconds
        self._nn = f * self._nn + texts * texts
        self._nt = f * self._nt + texts * seconds
        self._fit = self._solve()  # once a batch: the batcher asks for it once a job

    def split(self) -> tuple[float, float] | None:
        """(fixed seconds, seconds per text), or None before the first batch."""
        return self._fit

    def _solve(self) -> tuple[float, float]:
        mean_n, mean_t = self._n / self._w, self._t / self._w
        average = mean_t / mean_n  # seconds per text, the fixed cost spread over the texts
        spread = self._nn / self._w - mean_n * mean_n
        if spread < 0.5:  # the recent batches were (nearly) all of one size
            return 0.0, average
        slope = (self._nt / self._w - mean_n * mean_t) / spread
        # A noisy fit must not make big batches look free: at least a quarter of the average.
        slope = max(slope, 0.25 * average)
        return max(0.0, mean_t - slope * mean_n), slope

    def seconds(self, texts: int) -> float | None:
        """Model seconds for a batch of ``texts`` texts; None before the first batch."""
        if self._fit is None:
            return None
        return self._fit[0] + texts * self._fit[1]


class _Expired(Exception):
    """A queued or running job's deadline passed (set on its future by :func:`_expire`)."""


def _expire(future: asyncio.Future) -> None:
    if not future.done():
        future.set_exception(_Expired())


def _background_priority() -> None:
    """Run the calling (model) thread only on CPU that nothing else wants (Linux SCHED_IDLE)."""
    import os
    import threading

    with contextlib.suppress(OSError, AttributeError):
        os.sched_setscheduler(threading.get_native_id(), os.SCHED_IDLE, os.sched_param(0))


@dataclass
class BatchSlice:
    """One request's share of a batch."""

    probabilities: np.ndarray
    predicted_index: np.ndarray
    labels: list[str]
    timing_ms: dict[str, float]
    batch_size: int


def _slice(result: BatchResult, offset: int, n: int, queue_ms: float, size: int) -> BatchSlice:
    """One request's ``n`` rows, from ``offset``, of the ``result`` of a batch of ``size``."""
    return BatchSlice(
        probabilities=result.probabilities[offset : offset + n],
        predicted_index=result.predicted_index[offset : offset + n],
        labels=result.labels,
        timing_ms={"queue_ms": queue_ms, **result.timing_ms},
        batch_size=size,
    )


class AdaptiveBatcher:
    """Queue + single consumer for one model version (one per worker process)."""

    def __init__(
        self,
        predict: Callable[[list[str]], BatchResult],
        max_batch_size: int,
        max_latency_ms: float,
        on_batch: Callable[[int, float, dict[str, float]], None] | None = None,
        on_error: Callable[[str], None] | None = None,
        max_queue: int = 1 << 30,
        on_reject: Callable[[str], None] | None = None,
        inline: bool = False,
    ):
        self._predict = predict
        self.inline = inline
        self.max_queue = max_queue
        self._on_reject = on_reject or (lambda reason: None)
        self._queued_texts = 0
        self._texts_per_s: float | None = None  # moving average of model throughput
        self._batch_s: float | None = None  # moving average of one batch's model time
        self._learnt = 0  # batches learnt from (the estimate is a guess under WARM_BATCHES)
        self._cost = BatchCost()  # a batch's time by its size (planning batches by deadline)
        self._running_since: float | None = None
        self.max_batch_size = max_batch_size
        self.max_latency = max_latency_ms / 1000.0
        self._on_batch = on_batch
        self._on_error = on_error or (lambda kind: None)
        self._queue: collections.deque[_Job] = collections.deque()
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None
        self.background = False
        self._executor = self._new_executor()
        self._last_batch_jobs = 1
        self._last_batch_texts = 1
        self._deciding = 0  # requests between the inline check and its second look
        self._inflight: list[_Job] = []
        self._closed = False
        self._lag = 0.0  # the highest recent hand-over delay (seconds), as of _lag_at
        self._lag_at = 0.0
        self._armed_until = 0.0  # perf_counter time until which admission plans (PLAN_ARMED_S)

    def _new_executor(self) -> ThreadPoolExecutor:
        if self.background:
            return ThreadPoolExecutor(
                max_workers=1,
                thread_name_prefix="mlserve-model-bg",
                initializer=_background_priority,
            )
        return ThreadPoolExecutor(
            max_workers=1,
            thread_name_prefix="mlserve-model",
        )

    def set_background(self, on: bool) -> None:
        """Run this model's batches only on spare CPU (``on``: a shadow version that serves no
        client), or at its normal priority again. The next batch runs on a new thread with that
        priority (an unprivileged thread cannot leave SCHED_IDLE); a batch running now finishes
        on the old one."""
        if on == self.background or self._closed:
            return
        self.background = on
        old, self._executor = self._executor, self._new_executor()
        old.shutdown(wait=False)

    async def submit(self, texts: list[str], timeout: float) -> BatchSlice:
        """Queue ``texts`` (one request) and wait for its rows, at most ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        if self._task is None or self._task.done():
            if self._task is not None and not self._closed:
                self._on_error("restart")  # the consumer ended: start another
            self._wake = asyncio.Event()
            self._task = loop.create_task(self._consume())
        # The event loop's delays, before this handler ran and after its answer is ready, are
        # part of what the client waits: plan the model's work to end that much earlier.
        reserve = self.loop_reserve(timeout)
        plan = timeout - reserve
        self.admit(len(texts), timeout, reserve)
        if self._can_inline(len(texts), timeout):
            # Alone only if still alone after one turn of the event loop: requests that arrived
            # with this one (their tasks are already scheduled) reach this point meanwhile. An
            # inline run blocks the loop, so without this look the next request always found the
            # queue empty too, and under load every request ran inline, one after the other
            # (measured: 1 worker, 32 clients, a third of the batched throughput).
            self._deciding += 1
            try:
                await asyncio.sleep(0)
            finally:
                self._deciding -= 1
            if self._deciding == 0 and self._can_inline(len(texts), timeout):
                return self._run_inline(list(texts))
        job = _Job(list(texts), loop.create_future(), time.perf_counter() + plan)
        self._queue.append(job)
        self._queued_texts += len(job.texts)
        self._wake.set()
        # The request awaits its job's future itself, with a timer that fails the future at the
        # deadline: one turn of the event loop from the batch's result to this request, where
        # wait_for(shield(...)) took three (shield's copy, wait_for's waiter, then this task),
        # each a full pass of a loop that a flood keeps busy (BENCHMARK.md, "Overload").
        # A done future (answered, expired or cancelled) is skipped by the consumer.
        timer = loop.call_later(timeout, _expire, job.future)
        try:
            rows = await job.future
            self._observe_lag(time.perf_counter() - job.answered)
            return rows
        except _Expired as exc:
            if job not in self._inflight:
                # It never reached the model: the queue was longer than the estimate said.
                # That is overload (503, retry later), not a model too slow for its deadline.
                self._refused_from_queue("expired")
                raise OverloadedError(
                    f"the request waited {timeout:g} s in the model's queue; retry shortly",
                    retry_after=max(1, math.ceil(self.estimate_wait(0))),
                    reason="deadline",
                ) from exc
            raise InferenceTimeoutError(f"inference did not finish within {timeout:g} s") from exc
        finally:
            timer.cancel()

    def loop_reserve(self, timeout: float) -> float:
        """Seconds of a ``timeout`` to keep for the event loop: three times the highest
        hand-over delay seen lately (from an answer set on its future until its request
        resumes: one turn of the loop), for the turns a request waits besides the model: two
        before its handler runs (its bytes are read, then its task starts) and one after its
        answer is ready. Near zero on an idle loop; under a flood that keeps the loop busy, a
        few hundred milliseconds. At most ``MAX_RESERVE_SHARE`` of the timeout."""
        if self._lag <= 0.0:
            return 0.0
        lag = self._lag * 0.5 ** ((time.perf_counter() - self._lag_at) / LAG_HALF_LIFE_S)
        return min(3.0 * lag, MAX_RESERVE_SHARE * timeout)

    def _observe_lag(self, seconds: float) -> None:
        now = time.perf_counter()
        decayed = self._lag * 0.5 ** ((now - self._lag_at) / LAG_HALF_LIFE_S)
        self._lag, self._lag_at = max(decayed, seconds), now

    def _can_inline(self, texts: int, timeout: float) -> bool:
        """One text, nothing queued or running, and recent batches (of one, when traffic is
        that light; bigger ones under load) took at most INLINE_MAX_MS."""
        if texts != 1 or not self.inline or self.background:
            return False
        if self._queue or self._running_since is not None or self._batch_s is None:
            return False  # busy, or nothing learnt yet: through the queue
        if self._last_batch_jobs > 1 or self._deciding > 1:
            return False  # requests are arriving together: batch them
        return self._batch_s <= INLINE_MAX_MS / 1000.0 and self._batch_s * 10 <= timeout

    def _run_inline(self, texts: list[str]) -> BatchSlice:
        """Run one lone request's texts now, in the calling (event loop) thread, as a batch."""
        start = time.perf_counter()
        self._running_since = start
        try:
            result = self._predict(texts)
        finally:
            self._running_since = None
        self._last_batch_jobs, self._last_batch_texts = 1, len(texts)
        self._done(len(texts), time.perf_counter() - start, 0.0, result.timing_ms)
        return _slice(result, 0, len(texts), 0.0, len(texts))

    def estimate_wait(self, texts: int) -> float:
        """Seconds until ``texts`` more texts, queued behind the current queue, are computed:
        what is left of the running batch, then the queue at the recent throughput."""
        if self._texts_per_s is None:
            return 0.0  # no batch has run yet: nothing to go by
        return self._running_left() + (self._queued_texts + texts) / self._texts_per_s

    def _running_left(self) -> float:
        """Seconds the running batch still needs, by the recent batch time (0 when idle)."""
        if self._running_since is None or self._batch_s is None:
            return 0.0
        return max(0.0, self._batch_s - (time.perf_counter() - self._running_since))

    def admit(self, texts: int, timeout: float, reserve: float = 0.0) -> None:
        """Refuse (503 overloaded, with Retry-After) a request that could not be served within
        ``timeout`` seconds, less ``reserve`` (:meth:`loop_reserve`), or that would take the
        queue past ``max_queue`` texts; while armed (:data:`PLAN_ARMED_S`), also one whose plan
        (:meth:`planned_finish`) does not fit."""
        budget = timeout - reserve
        if self._queued_texts + texts > self.max_queue:
            wait = self.estimate_wait(texts)
            self._on_reject("queue_full")
            raise OverloadedError(
                f"the model's queue is full ({self._queued_texts} texts); retry shortly",
                retry_after=max(1, math.ceil(wait - budget * ADMISSION_HEADROOM)),
                reason="queue_full",
            )
        wait = self.estimate_wait(texts)
        if self._learnt < WARM_BATCHES and self._queued_texts + texts <= self.max_batch_size:
            # A young estimate, and the request fits in the next batch: it waits for the rest
            # of the running batch and one more, not for the queue at the rate of a cold batch.
            wait = min(wait, self._running_left() + (self._batch_s or 0.0))
        if wait > budget * ADMISSION_HEADROOM:
            self._on_reject("deadline")
            raise OverloadedError(
                f"the model cannot answer within {timeout:g} s now (estimated {wait:.1f} s); "
                "retry shortly",
                retry_after=max(1, math.ceil(wait - budget * ADMISSION_HEADROOM)),
                reason="deadline",
            )
        if time.perf_counter() >= self._armed_until:
            return
        planned = self.planned_finish(texts)
        if planned is not None and planned > budget and self._needed(texts) <= budget:
            # (A request that could not get the margin even alone, at a deadline shorter than
            # that, is left to the expected wait above, as in _too_late: else nothing is served.)
            self._arm()
            self._on_reject("deadline")
            raise OverloadedError(
                f"the model cannot answer within {timeout:g} s now (planned {planned:.1f} s); "
                "retry shortly",
                retry_after=max(1, math.ceil(planned - budget)),
                reason="deadline",
            )

    def _arm(self) -> None:
        """Plan admissions (:meth:`planned_finish`) for the next :data:`PLAN_ARMED_S` seconds."""
        self._armed_until = time.perf_counter() + PLAN_ARMED_S

    def _refused_from_queue(self, reason: str) -> None:
        """Count a refusal of a request already queued (``late`` or ``expired``): the expected
        wait let it in and was not enough, so admission plans for a while (:meth:`_arm`)."""
        self._on_reject(reason)
        self._arm()

    def planned_finish(self, texts: int) -> float | None:
        """Seconds from now that a request of ``texts`` texts queued now must be allowed, planned
        as :meth:`_take` plans a batch, with :data:`SAFETY` times each expected time: the rest
        of the running batch and the texts queued ahead of its batch (at the recent
        throughput), then the model time of the batch it joins (as many of the queued texts as
        fit, and its own). None while the estimate is young (:data:`WARM_BATCHES`).

        Admission on the expected wait alone lets in requests that are then refused from the
        queue, after waiting up to their whole deadline, when a batch cannot get its margin
        before them. Under a flood of clients that honour Retry-After, those late refusals
        (some 100 a flood) made the refusals' p99 1.6 s; planning every admission cut them to
        some 10 and the p99 to 0.15 s, but also refused requests that would have been served
        (4 of 1,931 in the hot-swap test at a 10 s deadline, beside the unit suite;
        BENCHMARK.md, "Overload"). So admission plans only while refusals from the queue show
        that the expected wait is not enough: for :data:`PLAN_ARMED_S` after one."""
        if self._learnt < WARM_BATCHES or self._texts_per_s is None or self._cost.split() is None:
            return None
        queued = self._queued_texts
        batch = max(texts, min(self.max_batch_size, queued + texts))
        ahead = queued + texts - batch
        return SAFETY * (self._running_left() + ahead / self._texts_per_s) + self._needed(batch)

    def _take(self) -> list[_Job]:
        jobs, n = [], 0
        earliest = float("inf")  # the earliest deadline in the batch so far
        while self._queue:
            job = self._queue[0]
            if job.future.done():  # timed out while queued
                self._queue.popleft()
                self._queued_texts -= len(job.texts)
                continue
            if jobs and n + len(job.texts) > self.max_batch_size:
                break
            if jobs and not self._fits(n + len(job.texts), min(earliest, job.deadline)):
                # A bigger batch would finish after a deadline of a job already in it: run
                # what we have; this job heads the next batch.
                break
            self._queue.popleft()
            self._queued_texts -= len(job.texts)
            if self._too_late(job, n + len(job.texts)):
                continue
            jobs.append(job)
            n += len(job.texts)
            earliest = min(earliest, job.deadline)
        return jobs

    def _needed(self, batch_texts: int) -> float:
        """Seconds to allow for a batch of ``batch_texts`` texts: :data:`SAFETY` times the
        expected time (:class:`BatchCost`), so a batch that starts finishes even when the CPU
        gets contended (the estimate comes from recent batches, which may have had it to
        spare). It grows with the batch's size, so a job near its deadline caps the size of
        the batch it joins."""
        expected = self._cost.seconds(batch_texts)
        assert expected is not None  # only once a batch was learnt (see _fits)
        return SAFETY * expected

    def _fits(self, batch_texts: int, deadline: float) -> bool:
        if self._cost.split() is None:
            return True  # no batch learnt yet: nothing to plan with
        return time.perf_counter() + self._needed(batch_texts) <= deadline

    def _too_late(self, job: _Job, batch_texts: int) -> bool:
        """Refuse (503 overloaded) a queued job that a batch of ``batch_texts`` texts could not
        finish before its deadline: running it would only end in a 504."""
        if self._fits(batch_texts, job.deadline):
            return False
        needed = self._needed(batch_texts)
        if job.enqueued + needed > job.deadline:
            # Not even a job taken the moment it arrived could meet its deadline by this
            # estimate, yet admission let it in: the estimate is stale (learnt while the CPU
            # was starved). Refusing on it would refuse every job and never run a batch that
            # could correct it, so run this one and learn from it.
            return False
        self._refused_from_queue("late")
        job.future.set_exception(
            OverloadedError(
                "the request could not be computed before its deadline; retry shortly",
                retry_after=max(1, math.ceil(self.estimate_wait(0))),
                reason="deadline",
            )
        )
        return True

    def _pending_texts(self) -> int:
        return self._queued_texts

    def _learn(self, texts: int, seconds: float) -> None:
        """Update the moving averages with one batch's model time. Once warm (WARM_BATCHES) they
        follow a slowdown at once and a speed-up slowly: an estimate that is too low lets
        requests in that then time out, one that is too high only refuses a few more."""
        seconds = max(seconds, 1e-6)
        rate = texts / seconds
        self._learnt += 1
        self._cost.add(texts, seconds)
        if self._texts_per_s is None or self._batch_s is None:
            self._texts_per_s, self._batch_s = rate, seconds
            return
        young = self._learnt <= WARM_BATCHES
        slower = rate < self._texts_per_s
        self._texts_per_s += (0.5 if slower or young else _EWMA) * (rate - self._texts_per_s)
        longer = seconds > self._batch_s
        self._batch_s += (0.5 if longer or young else _EWMA) * (seconds - self._batch_s)

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
            # Traffic is concurrent: give the batch a moment to fill, as far as the last one.
            deadline = self._queue[0].enqueued + self.max_latency
            target = min(self.max_batch_size, self._last_batch_texts)
            while self._pending_texts() < target and (wait := deadline - time.perf_counter()) > 0:
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
        self._last_batch_texts = len(texts)
        self._inflight = jobs
        loop = asyncio.get_running_loop()
        self._running_since = start
        finished = loop.create_future()

        def run() -> None:  # on the model thread
            try:
                outcome: tuple[BatchResult | None, Exception | None] = (self._predict(texts), None)
            except Exception as exc:  # every request of the batch gets the model's error
                outcome = (None, exc)
            with contextlib.suppress(RuntimeError):  # the loop closed meanwhile
                loop.call_soon_threadsafe(self._finish, jobs, start, outcome, finished)

        # The model thread hands the batch's rows out itself, in one callback on the loop: the
        # requests resume one turn later. (run_in_executor took a turn to copy the result into
        # an asyncio future and another to wake this task, before the one that woke them.)
        self._executor.submit(run)
        await finished

    def _finish(
        self,
        jobs: list[_Job],
        start: float,
        outcome: tuple[BatchResult | None, Exception | None],
        finished: asyncio.Future,
    ) -> None:
        """On the event loop, when the model thread is done with ``jobs``: answer them (or
        fail them with the model's error), learn from the batch, and let the consumer go on."""
        self._running_since = None
        if not finished.done():
            # The consumer wakes before the requests answered here: it hands the next batch to
            # the model thread first, and the model computes it while these answers are
            # written. (Woken after them, the model thread sat idle through every answer:
            # 15 % fewer requests a second at 32 clients.)
            finished.set_result(None)
        result, error = outcome
        try:
            if error is not None:
                self._fail(jobs, error)
                return
            now = time.perf_counter()
            seconds = now - start
            texts = sum(len(job.texts) for job in jobs)
            queue_ms = [(start - job.enqueued) * 1000.0 for job in jobs]
            offset = 0
            for job, waited in zip(jobs, queue_ms, strict=True):
                n = len(job.texts)
                if not job.future.done():
                    job.answered = now
                    job.future.set_result(_slice(result, offset, n, waited, texts))
                offset += n
            self._done(texts, seconds, max(queue_ms), result.timing_ms)
            self._shed_hopeless()
        except Exception as exc:  # a fault in the bookkeeping: fail its batch, keep serving
            self._on_error("deliver")
            self._fail(jobs, exc)

    def _shed_hopeless(self) -> None:
        """After a batch, with the throughput just learnt: refuse (503 overloaded) each queued
        job that the texts ahead of it would keep past its deadline even at that throughput,
        now rather than when its deadline passes. (A flood's refusals are otherwise fast but
        for these, which waited out the whole deadline.) The estimate is optimistic (one pass
        over the queue at the recent rate), so a job it refuses had no chance; a job that could
        not have met its deadline even alone is left to run, as in :meth:`_too_late`.

        Not while the estimate is young (:data:`WARM_BATCHES`): a freshly loaded version's first
        batch may have run on a starved CPU, and the jobs queued behind it would be refused by
        that one batch's rate although the next batches serve them (the clean-clone CI of
        2026-12-07 refused one request so, with Retry-After 10, right after a hot swap)."""
        rate = self._texts_per_s
        if rate is None or not self._queue or self._learnt < WARM_BATCHES:
            return
        now = time.perf_counter()
        ahead = 0
        kept: collections.deque[_Job] = collections.deque()
        for job in self._queue:
            n = len(job.texts)
            if job.future.done():  # expired or cancelled while queued
                self._queued_texts -= n
                continue
            if now + (ahead + n) / rate > job.deadline and job.enqueued + n / rate <= job.deadline:
                self._queued_texts -= n
                self._refused_from_queue("late")
                job.future.set_exception(
                    OverloadedError(
                        "the request cannot be computed before its deadline; retry shortly",
                        retry_after=max(1, math.ceil(ahead / rate)),
                        reason="deadline",
                    )
                )
                continue
            ahead += n
            kept.append(job)
        self._queue = kept

    def _done(self, n: int, seconds: float, queue_ms: float, timing: dict[str, float]) -> None:
        """After a batch of ``n`` texts (queued or inline): learn its speed, call the hook."""
        self._learn(n, seconds)
        if self._on_batch:
            try:
                self._on_batch(n, queue_ms, timing)
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
        self._queued_texts = 0
        self._executor.shutdown(wait=False)
