"""The adaptive batcher: requests are merged, answered in order, never crossed, never dropped."""

from __future__ import annotations

import asyncio
import threading
import time

import numpy as np
import pytest

from mlserve.batching import AdaptiveBatcher
from mlserve.errors import InferenceTimeoutError, ServiceUnavailableError
from runners.base import BatchResult

LABELS = ["even", "odd"]


class LengthModel:
    """A deterministic model: P(odd) grows with the text's length, so each answer identifies
    its own input. Records every batch it receives."""

    def __init__(self, delay: float = 0.0):
        self.batches: list[list[str]] = []
        self.delay = delay
        self.lock = threading.Lock()

    def __call__(self, texts: list[str]) -> BatchResult:
        with self.lock:
            self.batches.append(list(texts))
        time.sleep(self.delay)
        p_odd = np.array([len(t) / 1000.0 for t in texts])
        probs = np.column_stack([1 - p_odd, p_odd])
        idx = np.array([len(t) % 2 for t in texts])
        return BatchResult(LABELS, probs, idx, {"model_ms": self.delay * 1000})


def run(coro):
    return asyncio.run(coro)


def counted(model, max_batch_size: int, **kwargs) -> tuple[AdaptiveBatcher, list[str]]:
    """A batcher on ``model`` (no fill wait) and the list that its refusals' reasons go to."""
    reasons: list[str] = []
    batcher = AdaptiveBatcher(model, max_batch_size, 0, on_reject=reasons.append, **kwargs)
    return batcher, reasons


def test_single_request_runs_alone_and_at_once() -> None:
    model = LengthModel()
    batcher = AdaptiveBatcher(model, max_batch_size=8, max_latency_ms=50)

    async def go():
        start = time.perf_counter()
        out = await batcher.submit(["abc"], timeout=5)
        return out, time.perf_counter() - start

    out, elapsed = run(go())
    assert model.batches == [["abc"]]
    assert out.labels == LABELS and out.batch_size == 1
    assert out.probabilities.shape == (1, 2)
    assert out.probabilities[0, 1] == pytest.approx(0.003)
    assert elapsed < 0.05  # no batching wait for a lone request
    assert set(out.timing_ms) >= {"queue_ms", "model_ms"}


def test_concurrent_requests_are_batched_and_never_crossed() -> None:
    model = LengthModel(delay=0.02)
    batcher = AdaptiveBatcher(model, max_batch_size=16, max_latency_ms=5)
    texts = ["x" * n for n in range(1, 101)]

    async def go():
        return await asyncio.gather(*(batcher.submit([t], timeout=10) for t in texts))

    outs = run(go())
    for text, out in zip(texts, outs, strict=True):
        assert out.probabilities[0, 1] == pytest.approx(len(text) / 1000.0)
        assert out.predicted_index[0] == len(text) % 2
    sizes = [len(b) for b in model.batches]
    assert sum(sizes) == 100
    assert max(sizes) > 1  # requests were merged
    assert max(sizes) <= 16  # and never beyond the limit


def test_the_fill_wait_ends_once_the_batch_is_as_big_as_the_last() -> None:
    """After a batch of two requests, the next one waits for a second request (they are
    batched together) but not for max_latency_ms (10 s here) to fill up to max_batch_size."""
    model = LengthModel()
    batcher = AdaptiveBatcher(model, max_batch_size=32, max_latency_ms=10_000)

    async def go():
        await asyncio.gather(batcher.submit(["a"], timeout=5), batcher.submit(["bb"], timeout=5))
        first = asyncio.ensure_future(batcher.submit(["ccc"], timeout=5))
        await asyncio.sleep(0.05)
        second = batcher.submit(["dddd"], timeout=5)
        return await asyncio.wait_for(asyncio.gather(first, second), 3)

    run(go())
    assert model.batches == [["a", "bb"], ["ccc", "dddd"]]


def test_multi_text_requests_keep_their_rows_together_in_order() -> None:
    model = LengthModel(delay=0.01)
    batcher = AdaptiveBatcher(model, max_batch_size=10, max_latency_ms=0)
    requests = [["a" * (i * 10 + j + 1) for j in range(3)] for i in range(6)]

    async def go():
        return await asyncio.gather(*(batcher.submit(r, timeout=10) for r in requests))

    for req, out in zip(requests, run(go()), strict=True):
        assert out.probabilities[:, 1] == pytest.approx([len(t) / 1000.0 for t in req])
    for batch in model.batches:
        assert len(batch) <= 10


def test_a_request_larger_than_max_batch_size_still_runs_whole() -> None:
    model = LengthModel()
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=0)
    out = run(batcher.submit(["a", "bb", "ccc", "dddd", "eeeee", "ffffff"], timeout=5))
    assert out.probabilities.shape == (6, 2)
    assert model.batches == [["a", "bb", "ccc", "dddd", "eeeee", "ffffff"]]


def test_model_errors_reach_every_request_of_the_batch_and_the_batcher_recovers() -> None:
    calls = {"n": 0}
    model = LengthModel(delay=0.01)

    def flaky(texts):
        calls["n"] += 1
        if calls["n"] == 1:
            raise RuntimeError("boom")
        return model(texts)

    batcher = AdaptiveBatcher(flaky, max_batch_size=8, max_latency_ms=0)

    async def go():
        first = await asyncio.gather(batcher.submit(["a"], timeout=5), return_exceptions=True)
        second = await batcher.submit(["bb"], timeout=5)
        return first, second

    first, second = run(go())
    assert isinstance(first[0], RuntimeError)
    assert second.probabilities[0, 1] == pytest.approx(0.002)


def test_timeout_raises_504_error_and_later_requests_still_work() -> None:
    model = LengthModel(delay=0.2)
    batcher = AdaptiveBatcher(model, max_batch_size=8, max_latency_ms=0)

    async def go():
        with pytest.raises(InferenceTimeoutError) as info:
            await batcher.submit(["slow"], timeout=0.05)
        assert info.value.status == 504
        return await batcher.submit(["ok"], timeout=5)

    out = run(go())
    assert out.probabilities[0, 1] == pytest.approx(0.002)


def test_on_batch_reports_sizes() -> None:
    seen = []
    model = LengthModel(delay=0.01)
    batcher = AdaptiveBatcher(
        model, 32, 2, on_batch=lambda n, queue_ms, timing: seen.append((n, queue_ms >= 0))
    )

    async def go():
        await asyncio.gather(*(batcher.submit(["t" * i], timeout=5) for i in range(1, 21)))

    run(go())
    assert sum(n for n, _ in seen) == 20
    assert all(ok for _, ok in seen)


def test_aclose_fails_queued_and_running_requests_with_503_at_once() -> None:
    model = LengthModel(delay=0.1)
    batcher = AdaptiveBatcher(model, 1, 0)

    async def go():
        tasks = [asyncio.create_task(batcher.submit([str(i)], timeout=5)) for i in range(3)]
        await asyncio.sleep(0.02)  # the first is running, two are queued
        start = time.perf_counter()
        await batcher.aclose()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return results, time.perf_counter() - start

    results, elapsed = run(go())
    assert all(isinstance(r, ServiceUnavailableError) for r in results)
    assert elapsed < 1.0


def test_a_raising_batch_hook_neither_fails_requests_nor_ends_the_consumer() -> None:
    model = LengthModel()
    errors: list[str] = []

    def hook(n, queue_ms, timing):
        raise RuntimeError("metrics backend broke")

    batcher = AdaptiveBatcher(model, 8, 0, on_batch=hook, on_error=errors.append)

    async def go():
        first = await batcher.submit(["ab"], timeout=2)
        second = await batcher.submit(["abc"], timeout=2)  # the same consumer serves it
        return first, second, batcher._task.done()

    first, second, ended = run(go())
    assert first.predicted_index.tolist() == [0] and second.predicted_index.tolist() == [1]
    assert not ended and errors == ["hook", "hook"]


def test_a_fault_delivering_a_batch_fails_that_batch_only_and_serving_goes_on() -> None:
    """A result that cannot be handed out (a runner bug): the requests of that batch get the
    error at once, not a 504 later, and the next requests are served."""
    errors: list[str] = []
    calls = 0

    def flaky(texts):
        nonlocal calls
        calls += 1
        if calls == 1:
            return None  # not a BatchResult: slicing it raises
        return LengthModel()(texts)

    batcher = AdaptiveBatcher(flaky, 8, 0, on_error=errors.append)

    async def go():
        start = time.perf_counter()
        with pytest.raises(AttributeError):
            await batcher.submit(["ab"], timeout=5)
        failed_after = time.perf_counter() - start
        ok = await batcher.submit(["abc"], timeout=5)
        return failed_after, ok, batcher._task.done()

    failed_after, ok, ended = run(go())
    assert failed_after < 1.0  # not left to the 5 s deadline
    assert ok.predicted_index.tolist() == [1] and not ended
    assert errors == ["deliver"]


def test_a_loaded_version_exposes_its_batcher_fault_counters_at_zero() -> None:
    """The MLServeBatchConsumerRestarting alert reads a real series (0) while nothing failed."""
    from prometheus_client import REGISTRY

    from mlserve import observability as obs

    obs.init_batcher_errors("unit:v0")
    for kind in obs.BATCHER_ERROR_KINDS:
        labels = {"model_version": "unit:v0", "kind": kind}
        assert REGISTRY.get_sample_value("mlserve_batcher_errors_total", labels) == 0.0


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once() -> None:
    from mlserve.errors import OverloadedError

    model = LengthModel(delay=0.05)  # 50 ms a batch of at most 2 texts: 40 texts/s
    batcher, reasons = counted(model, 2)

    async def go():
        await batcher.submit(["warm"], timeout=5)  # learn the throughput
        tasks = [asyncio.create_task(batcher.submit([f"t{i}"], timeout=1.0)) for i in range(60)]
        await asyncio.sleep(0)  # every task has been admitted or refused
        start = time.perf_counter()
        with pytest.raises(OverloadedError):  # refused without waiting: the queue is long
            await batcher.submit(["late"], timeout=1.0)
        refusal_time = time.perf_counter() - start
        return await asyncio.gather(*tasks, return_exceptions=True), refusal_time

    results, refusal_time = run(go())
    served = [r for r in results if not isinstance(r, BaseException)]
    refused = [r for r in results if isinstance(r, BaseException)]
    assert served and refused and not any(isinstance(r, InferenceTimeoutError) for r in refused)
    assert all(r.code == "overloaded" and int(r.headers["Retry-After"]) >= 1 for r in refused)
    assert len(served) <= 40  # about what fits in 0.75 s at 40 texts/s, not all 60
    assert refusal_time < 0.1 and set(reasons) == {"deadline"}


def test_a_full_queue_is_refused() -> None:
    from mlserve.errors import OverloadedError

    model = LengthModel(delay=0.02)
    batcher, reasons = counted(model, 4, max_queue=6)

    async def go():
        tasks = [asyncio.create_task(batcher.submit(["a", "b"], timeout=10)) for _ in range(3)]
        await asyncio.sleep(0)  # all three queued (6 texts): the next one does not fit
        with pytest.raises(OverloadedError) as info:
            await batcher.submit(["c"], timeout=10)
        await asyncio.gather(*tasks)
        return info.value

    error = run(go())
    assert error.details["reason"] == "queue_full" and reasons == ["queue_full"]


def test_a_request_that_times_out_still_queued_is_overload_not_a_504() -> None:
    from mlserve.errors import OverloadedError

    model = LengthModel(delay=0.2)
    batcher, reasons = counted(model, 1)

    async def go():
        running = asyncio.create_task(batcher.submit(["first"], timeout=5))
        await asyncio.sleep(0.01)  # "first" is on the model now
        with pytest.raises(OverloadedError) as info:
            await batcher.submit(["second"], timeout=0.05)  # never reaches the model in time
        await running
        return info.value

    error = run(go())
    assert error.status == 503 and error.code == "overloaded"
    assert int(error.headers["Retry-After"]) >= 1
    assert model.batches == [["first"]]  # the queued one was skipped, never computed
    assert reasons == ["expired"]  # counted apart from the refusals at arrival
    assert batcher._armed_until > 0  # admission plans for a while, as after a late refusal


def test_an_estimate_learnt_while_slow_never_locks_the_model_out() -> None:
    """A model that was slow (a starved CPU) and is fast again must serve again: the estimate
    learnt while slow may not refuse every job, or no batch would ever run to correct it."""
    model = LengthModel(delay=0.6)
    batcher = AdaptiveBatcher(model, max_batch_size=4, max_latency_ms=0)

    async def go():
        await batcher.submit(["slow"], timeout=5)  # learns 0.6 s a batch
        model.delay = 0.0
        return [await batcher.submit([f"fast{i}"], timeout=1.0) for i in range(3)]

    answers = run(go())
    assert [a.batch_size for a in answers] == [1, 1, 1]
    assert model.batches == [["slow"], ["fast0"], ["fast1"], ["fast2"]]


async def _head_and_rest(batcher: AdaptiveBatcher, head: str, timeout: float, rest: int):
    """Submit ``head`` with ``timeout``, then ``rest`` one-text jobs with 5 s each, all queued
    before the consumer runs; their answers."""
    first = asyncio.create_task(batcher.submit([head], timeout=timeout))
    others = [asyncio.create_task(batcher.submit([f"t{i}"], timeout=5)) for i in range(rest)]
    await asyncio.sleep(0)
    return await first, await asyncio.gather(*others)


def test_a_batch_stops_growing_before_it_would_make_its_first_job_late() -> None:
    """The head of the queue has little time left: the batch it heads holds only what can be
    computed before its deadline; the rest wait for the next batch instead of making it late."""
    model = LengthModel()
    batcher = AdaptiveBatcher(model, max_batch_size=64, max_latency_ms=0)
    batcher._learn(1, 0.02)  # the model's recent rate: 50 texts/s (60 ms a text, with SAFETY)

    urgent, others = run(_head_and_rest(batcher, "urgent", 0.25, 40))
    assert all(o.batch_size >= 1 for o in others)  # every other job was answered too
    # 0.25 s at 60 ms a text: the urgent job's batch holds at most 4 texts (fewer when the
    # machine is slow to get there), and the other 40 texts follow in later batches.
    assert 1 <= urgent.batch_size <= 4
    assert model.batches[0][0] == "urgent" and len(model.batches[0]) == urgent.batch_size
    assert sorted(t for b in model.batches for t in b) == sorted(
        ["urgent", *[f"t{i}" for i in range(40)]]
    )


def test_a_background_batcher_computes_under_sched_idle_and_can_come_back() -> None:
    import os

    policies: list[tuple[int, int]] = []

    def model(texts: list[str]) -> BatchResult:
        policies.append((os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, 0)))
        return LengthModel()(texts)

    batcher = AdaptiveBatcher(model, 8, 0)

    async def go():
        await batcher.submit(["normal"], timeout=5)
        batcher.set_background(True)
        await batcher.submit(["shadow"], timeout=5)
        batcher.set_background(False)  # promoted: a fresh thread at the normal priority
        await batcher.submit(["promoted"], timeout=5)

    run(go())
    base = os.getpriority(os.PRIO_PROCESS, 0)
    assert policies[0] == (os.SCHED_OTHER, base)
    assert policies[1][0] == os.SCHED_IDLE
    assert policies[2] == (os.SCHED_OTHER, base)


class ThreadModel(LengthModel):
    """Records the thread each batch ran on."""

    def __init__(self, delay: float = 0.0, fail: bool = False):
        super().__init__(delay)
        self.threads: list[int] = []
        self.fail = fail

    def __call__(self, texts: list[str]) -> BatchResult:
        self.threads.append(threading.get_ident())
        if self.fail and len(self.threads) > 1:
            raise RuntimeError("model failed")
        return super().__call__(texts)


def fast(batcher: AdaptiveBatcher) -> None:
    """What recent 1-text batches took: 0.5 ms (not the hop of a loaded test machine)."""
    batcher._texts_per_s, batcher._batch_s = 2000.0, 0.0005


def test_a_lone_text_on_a_fast_inline_model_runs_in_the_event_loop() -> None:
    model = ThreadModel()
    batches: list[int] = []
    batcher = AdaptiveBatcher(
        model, 8, 5, inline=True, on_batch=lambda n, queue_ms, timing: batches.append(n)
    )

    async def go():
        first = await batcher.submit(["a"], timeout=5)  # nothing learnt yet: the batch thread
        fast(batcher)
        second = await batcher.submit(["bb"], timeout=5)  # inline
        both = await asyncio.gather(batcher.submit(["c"], 5), batcher.submit(["dd", "e"], 5))
        return first, second, both

    _first, second, (_third, fourth) = run(go())
    main = threading.get_ident()
    assert model.threads[0] != main and model.threads[1] == main
    assert second.probabilities[0, 1] == pytest.approx(0.002)
    assert second.batch_size == 1 and second.timing_ms["queue_ms"] == 0.0
    assert batches[:2] == [1, 1]  # the metrics hook sees the inline batch too
    # Two requests arriving together are batched: neither runs inline.
    assert [sorted(b) for b in model.batches[2:]] == [["c", "dd", "e"]]
    assert model.threads[2] != main
    assert fourth.probabilities[:, 1] == pytest.approx([0.002, 0.001])


def test_single_texts_arriving_together_are_batched_not_run_inline_one_by_one() -> None:
    """An inline run blocks the event loop; if each of many concurrent one-text requests found
    the queue empty and ran inline, they would all run one after the other, unbatched."""
    model = ThreadModel()
    batcher = AdaptiveBatcher(model, 32, 5, inline=True)

    async def go():
        await batcher.submit(["warm"], timeout=5)
        fast(batcher)
        texts = ["x" * n for n in range(1, 17)]
        outs = await asyncio.gather(*(batcher.submit([t], timeout=5) for t in texts))
        return texts, outs

    texts, outs = run(go())
    assert threading.get_ident() not in model.threads  # none ran inline
    assert max(len(b) for b in model.batches[1:]) > 1
    for text, out in zip(texts, outs, strict=True):
        assert out.probabilities[0, 1] == pytest.approx(len(text) / 1000.0)


def test_inline_only_for_fast_models_that_allow_it() -> None:
    for model, kwargs in (
        (ThreadModel(delay=0.02), {"inline": True}),  # slower than INLINE_MAX_MS
        (ThreadModel(), {"inline": False}),
    ):
        batcher = AdaptiveBatcher(model, 8, 5, **kwargs)

        async def go(batcher=batcher):
            for text in ("a", "bb", "ccc"):
                await batcher.submit([text], timeout=5)
                if not model.delay:
                    fast(batcher)  # fast enough: only `inline` refuses

        run(go())
        assert threading.get_ident() not in model.threads
    shadow = ThreadModel()
    batcher = AdaptiveBatcher(shadow, 8, 5, inline=True)
    batcher.set_background(True)  # a shadow stays on its idle-priority thread

    async def go_shadow():
        for text in ("a", "bb"):
            await batcher.submit([text], timeout=5)
            fast(batcher)

    run(go_shadow())
    assert threading.get_ident() not in shadow.threads


def test_an_inline_model_error_reaches_the_request() -> None:
    model = ThreadModel(fail=True)
    batcher = AdaptiveBatcher(model, 8, 5, inline=True)

    async def go():
        await batcher.submit(["a"], timeout=5)
        fast(batcher)
        with pytest.raises(RuntimeError, match="model failed"):
            await batcher.submit(["bb"], timeout=5)
        return batcher._running_since

    assert run(go()) is None
    assert model.threads[1] == threading.get_ident()


def test_a_slow_first_batch_does_not_refuse_the_requests_that_follow() -> None:
    """The first batch ran on a starved CPU (0.6 s for one text), then the model is fast. 16
    clients arrive at once with a 2 s deadline: by that one batch, the 16th would wait 8 s, yet
    all 16 fit in the next batch, and a young estimate refuses none of them."""
    model = LengthModel(delay=0.6)
    batcher, reasons = counted(model, 32)

    async def go():
        await batcher.submit(["cold"], timeout=5)
        model.delay = 0.0
        return await asyncio.gather(
            *[batcher.submit([f"t{i}"], timeout=2.0) for i in range(16)], return_exceptions=True
        )

    results = run(go())
    assert not [r for r in results if isinstance(r, BaseException)] and reasons == []
    assert batcher._learnt >= 2 and batcher._texts_per_s > 2 * (1 / 0.6)


def test_jobs_queued_behind_a_slow_first_batch_are_not_shed_by_it() -> None:
    """A freshly loaded version's first batch ran on a starved CPU (0.8 s for one text) while 24
    clients queued behind it with a 5 s deadline. At that batch's rate the last of them would
    wait 19 s, yet the model is fast again and the next batch serves them all: a young estimate
    sheds none of them. (The clean-clone CI of 2026-12-07 had one such 503 among 1,355
    requests of test_ten_swaps_under_load_fail_no_request, retry_after 10, right after a swap.)"""
    model = LengthModel(delay=0.8)
    batcher, reasons = counted(model, 32)

    async def go():
        first = asyncio.create_task(batcher.submit(["cold"], timeout=5))
        await asyncio.sleep(0.05)  # "cold" is on the model now
        model.delay = 0.0
        queued = [asyncio.create_task(batcher.submit([f"q{i}"], timeout=5)) for i in range(24)]
        return await asyncio.gather(first, *queued, return_exceptions=True)

    results = run(go())
    assert not [r for r in results if isinstance(r, BaseException)], results
    assert reasons == []
    assert {f"q{i}" for i in range(24)} <= {t for batch in model.batches for t in batch}


def test_once_warm_the_estimate_refuses_what_fits_in_one_batch_but_not_in_time() -> None:
    """After WARM_BATCHES batches the estimate is trusted: a request whose wait it puts past the
    deadline is refused at once even when the queue is shorter than one batch."""
    from mlserve.batching import WARM_BATCHES
    from mlserve.errors import OverloadedError

    model = LengthModel(delay=0.2)
    batcher, reasons = counted(model, 32)

    async def go():
        for i in range(WARM_BATCHES):
            await batcher.submit([f"w{i}"], timeout=5)  # 5 texts/s, learnt
        running = asyncio.create_task(batcher.submit(["a"], timeout=5))
        await asyncio.sleep(0.01)  # "a" is on the model now
        queued = [asyncio.create_task(batcher.submit([f"q{i}"], timeout=5)) for i in range(3)]
        await asyncio.sleep(0)
        with pytest.raises(OverloadedError):  # ~0.2 + 4/5 s > 0.75 of 1 s
            await batcher.submit(["late"], timeout=1.0)
        await asyncio.gather(running, *queued)

    run(go())
    assert reasons == ["deadline"]


def test_a_request_already_past_its_deadline_is_refused_even_by_a_young_estimate() -> None:
    from mlserve.errors import OverloadedError

    batcher = AdaptiveBatcher(LengthModel(), max_batch_size=32, max_latency_ms=0)

    async def go():
        with pytest.raises(OverloadedError):  # nothing learnt yet, and no time left
            await batcher.submit(["late"], timeout=-0.0005)

    run(go())


def test_an_answer_reaches_its_request_one_turn_of_the_loop_after_the_batch() -> None:
    """Under a flood every turn of the event loop is a full pass over the requests it holds, so
    the hops between a batch's result and the request that waits for it are latency. The
    request awaits its job's future directly (a timer enforces the deadline): one turn, where
    wait_for(shield(...)) took three."""
    ticks = 0
    answered_at: list[int] = []

    def on_batch(n: int, queue_ms: float, timing: dict) -> None:
        answered_at.append(ticks)  # the consumer has just set the batch's results

    batcher = AdaptiveBatcher(LengthModel(), max_batch_size=8, max_latency_ms=0, on_batch=on_batch)

    async def go() -> int:
        nonlocal ticks
        stop = False

        async def ticker() -> None:  # one increment per turn of the loop
            nonlocal ticks
            while not stop:
                ticks += 1
                await asyncio.sleep(0)

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        await batcher.submit(["abc"], timeout=5)
        resumed = ticks
        stop = True
        await task
        return resumed

    resumed = run(go())
    assert len(answered_at) == 1
    assert resumed - answered_at[0] <= 1


def test_queued_jobs_that_cannot_make_their_deadline_are_refused_after_the_batch() -> None:
    """The model slows down after requests were admitted: once a batch has taught the batcher
    the new speed, the jobs queued too far back to finish in time are refused at once (503
    overloaded), not left to wait out their whole deadline."""
    from mlserve.errors import OverloadedError

    model = LengthModel(delay=0.01)
    batcher, rejected = counted(model, 1)

    async def go():
        for i in range(6):
            await batcher.submit([f"warm{i}"], timeout=5)  # learns some 100 texts/s
        model.delay = 1.0
        start = time.perf_counter()

        async def one(i: int):
            try:
                await batcher.submit([f"job{i}"], timeout=2.0)
                return i, "answered", time.perf_counter() - start
            except OverloadedError as exc:
                return i, exc.details["reason"], time.perf_counter() - start
            except InferenceTimeoutError:
                return i, "timeout", time.perf_counter() - start

        return await asyncio.gather(*(one(i) for i in range(60)))

    outcomes = run(go())
    assert outcomes[0][1] == "answered"
    # Shed after the first slow batch (about 1 s in), well before their 2 s deadline.
    early = [(i, t) for i, reason, t in outcomes if reason == "deadline" and t < 1.6]
    assert early, outcomes
    computed = {t for batch in model.batches for t in batch}
    assert not computed & {f"job{i}" for i, _ in early}
    # Counted apart from the refusals at arrival; the client is told "deadline" all the same.
    assert set(rejected) == {"late"}
    assert batcher._armed_until > 0  # and admission plans for a while (test below)


def test_the_loop_reserve_follows_the_hand_over_delay_and_decays() -> None:
    """A busy event loop delays a request before its handler runs and after its answer is ready;
    the batcher keeps three times the delay it sees handing answers over out of each deadline, so
    that what the client waits stays within it. The reserve decays when the loop is quiet and
    never takes more than half a deadline."""
    from mlserve.batching import LAG_HALF_LIFE_S

    batcher = AdaptiveBatcher(LengthModel(), max_batch_size=8, max_latency_ms=0)
    assert batcher.loop_reserve(2.0) == 0.0

    async def go():
        stop = False

        async def hog() -> None:  # holds the loop 50 ms per turn, as a flood's parsing does
            while not stop:
                time.sleep(0.05)
                await asyncio.sleep(0)

        task = asyncio.create_task(hog())
        await asyncio.sleep(0)
        await batcher.submit(["abc"], timeout=5)
        stop = True
        await task

    run(go())
    reserve = batcher.loop_reserve(2.0)
    assert 0.14 <= reserve <= 1.0  # about three 50 ms turns
    batcher._lag_at -= LAG_HALF_LIFE_S  # as if a half-life passed with nothing slower seen
    assert batcher.loop_reserve(2.0) == pytest.approx(reserve / 2, rel=0.05)
    batcher._observe_lag(3.0)
    assert batcher.loop_reserve(2.0) == pytest.approx(1.0, rel=0.01)  # half the deadline at most


def test_admission_keeps_the_loop_reserve_out_of_the_deadline() -> None:
    from mlserve.errors import OverloadedError

    batcher = AdaptiveBatcher(LengthModel(), max_batch_size=8, max_latency_ms=0)
    batcher._texts_per_s, batcher._batch_s, batcher._learnt = 4.0, 0.25, 10  # warm: 4 texts/s
    batcher.admit(4, 2.0)  # 1 s of queue fits in 2 s (under the 75 % headroom: 1.5 s)
    with pytest.raises(OverloadedError) as info:
        batcher.admit(4, 2.0, reserve=0.8)  # with 0.8 s kept for the loop, 0.9 s is left
    assert info.value.details["reason"] == "deadline" and "within 2 s" in info.value.message


def test_the_next_batch_goes_to_the_model_before_the_answers_are_written() -> None:
    """When a batch is done, the queued requests go to the model thread before the answered
    ones resume, so the model computes while the answers are written (throughput at 32
    clients; BENCHMARK.md)."""
    events: list[str] = []
    batcher = AdaptiveBatcher(LengthModel(delay=0.05), max_batch_size=2, max_latency_ms=0)
    submit = batcher._executor.submit

    def logged(fn, *args):
        events.append("model")
        return submit(fn, *args)

    batcher._executor.submit = logged

    async def one(text: str) -> None:
        await batcher.submit([text], timeout=5)
        events.append(text)

    async def go() -> None:
        await asyncio.gather(*(one(t) for t in ("a", "b", "c", "d")))

    run(go())
    assert events == ["model", "model", "a", "b", "c", "d"]


def test_the_batch_cost_separates_a_fixed_cost_from_the_cost_per_text() -> None:
    from mlserve.batching import BatchCost

    cost = BatchCost()
    assert cost.split() is None and cost.seconds(4) is None
    for n in (1, 8, 32, 3, 16, 1, 24):  # 0.1 s a batch plus 10 ms a text
        cost.add(n, 0.1 + 0.01 * n)
    fixed, per_text = cost.split()
    assert fixed == pytest.approx(0.1, rel=1e-6) and per_text == pytest.approx(0.01, rel=1e-6)
    assert cost.seconds(10) == pytest.approx(0.2, rel=1e-6)


def test_the_batch_cost_is_proportional_until_batches_differ_in_size() -> None:
    from mlserve.batching import BatchCost

    cost = BatchCost()
    for _ in range(3):
        cost.add(4, 0.2)
    assert cost.split() == pytest.approx((0.0, 0.05))
    cost = BatchCost()
    cost.add(1, 0.5)  # a slow single text, then a quick batch of 8: the fit's slope is negative
    cost.add(8, 0.1)
    fixed, per_text = cost.split()
    average = (0.7 * 0.5 + 0.1) / (0.7 * 1 + 8)  # the weighted seconds per text
    assert per_text == pytest.approx(0.25 * average)  # never below a quarter of the average
    assert fixed >= 0 and cost.seconds(32) > cost.seconds(8) > cost.seconds(1)


def test_a_fixed_cost_neither_shrinks_batches_to_one_text_nor_lets_a_lone_job_overrun() -> None:
    """A model whose batch costs 100 ms however few texts it holds, plus 5 ms a text (the
    transformer on a CPU shared with busy event loops). Planned at one rate (and twice the time
    it gave), batches of one teach a slow rate and big batches a fast one: a job with 0.9 s left
    headed a batch of at most 17 texts, and a lone job with 80 ms left ran and overran its
    deadline (504). With the fixed cost known, the first heads a batch of up to 40, and the
    second is refused (503) at once."""
    from mlserve.batching import SAFETY, _Job
    from mlserve.errors import OverloadedError

    model = LengthModel()
    batcher = AdaptiveBatcher(model, max_batch_size=64, max_latency_ms=0)
    for n in (1, 16, 1, 16, 1, 16, 1, 16):
        batcher._learn(n, 0.1 + 0.005 * n)
    assert SAFETY == 3 and batcher._needed(1) == pytest.approx(3 * 0.105, rel=1e-6)
    assert 2 / batcher._texts_per_s < 0.08  # what one rate would have allowed a lone text
    assert 0.9 * batcher._texts_per_s / 2 < 18  # and a batch within 0.9 s

    async def tight():
        now = time.perf_counter()
        job = _Job(["late"], asyncio.get_running_loop().create_future(), now + 0.08, now - 1.0)
        return batcher._too_late(job, 1), job.future.exception()

    refused, error = run(tight())
    assert refused and isinstance(error, OverloadedError)
    assert error.details["reason"] == "deadline"

    head, rest = run(_head_and_rest(batcher, "head", 0.9, 63))
    # 3 x (0.1 + 0.005 n) <= 0.9 - (the few ms to get there): n up to 40.
    assert 25 <= head.batch_size <= 40, head.batch_size
    assert len(rest) == 63


def test_after_a_late_refusal_admission_plans_as_the_batcher_does_for_a_while(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A batch costs 100 ms plus 5 ms a text, and 80 texts are queued: a request with a 2 s
    deadline would wait some 1.4 s by the throughput (within 0.75 of its deadline), but planned
    as the batcher plans (three times its wait, then three times its batch) it needs 2.1 s.
    Normally it is admitted: the plan alone refused requests that the next batches served (the
    hot-swap test, 2026-12-07). Once a queued request has been refused as late (admitted, then
    unable to get its batch's margin), the same request is refused at arrival, for
    PLAN_ARMED_S; then admitted again. A request whose deadline is shorter than the margin of a
    batch of its own is never refused by the plan (nothing would be served)."""
    import mlserve.batching as batching
    from mlserve.batching import _Job
    from mlserve.errors import OverloadedError

    monkeypatch.setattr(batching, "PLAN_ARMED_S", 1.0)
    batcher, reasons = counted(LengthModel(), 64)
    for n in (1, 16) * 4 + (16, 16):
        batcher._learn(n, 0.1 + 0.005 * n)
    batcher._queued_texts = 80
    assert batcher.estimate_wait(1) <= 0.75 * 2.0 < 2.0 < batcher.planned_finish(1)

    batcher.admit(1, timeout=2.0)  # not armed: admitted on the expected wait
    assert reasons == []

    async def late():
        now = time.perf_counter()
        job = _Job(["late"], asyncio.get_running_loop().create_future(), now + 0.08, now - 1.0)
        return batcher._too_late(job, 1)

    assert run(late())
    with pytest.raises(OverloadedError) as info:
        batcher.admit(1, timeout=2.0)
    assert "planned" in info.value.message and int(info.value.headers["Retry-After"]) >= 1
    assert reasons == ["late", "deadline"]

    batcher._queued_texts = 0  # armed, and a deadline shorter than a lone batch's margin
    assert batcher._needed(1) > 0.3
    batcher.admit(1, timeout=0.3)

    time.sleep(1.05)  # the plan's refusal renewed it for 1 s; nothing did since
    batcher._queued_texts = 80
    batcher.admit(1, timeout=2.0)
    assert reasons == ["late", "deadline"]
