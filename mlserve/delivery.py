"""Progressive delivery: traffic splits (canary), shadow versions and their comparison.

Everything here works without a server:

* :func:`validate_weights` and :func:`validate_shadow` check an admin change against the desired
  model state (the control path calls them inside its store transaction);
* :func:`pick` chooses a version by weight: by a hash of the routing key (sticky, and a key
  only moves to a version whose weight grew), or at random without one;
* :func:`compare` compares two versions' answers on the same texts;
* :class:`ShadowRunner` runs a sampled share of the primary's requests on the shadow version,
  beside the response, through a bounded queue that drops (and counts) work it cannot take.

The split and the shadow of each name travel in the control state (``traffic`` and ``shadows``,
see :mod:`mlserve.control`); every worker's registry applies them.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import random
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from mlserve.errors import OverloadedError, ValidationError

log = logging.getLogger("mlserve.delivery")

Traffic = dict[str, dict[str, int]]  # name -> {version: weight}, weights summing to 100
Shadows = dict[str, dict[str, Any]]  # name -> {"version": str, "sample": float}

SHADOW_QUEUE = 256
"""Shadow jobs a worker holds at most; an offer beyond it is dropped (counted)."""
SHADOW_CONCURRENCY = 4
"""Shadow jobs a worker runs at once."""


# --- validation (inside the control path's transaction) ---------------------------------------


def _versions_of(name: str, models: list[str]) -> set[str]:
    return {tag.split(":", 1)[1] for tag in models if tag.split(":", 1)[0] == name}


def validate_weights(name: str, weights: Mapping[str, Any], models: list[str]) -> dict[str, int]:
    """The split to store for ``name`` ({} clears it), or a 422 naming what is wrong.

    Weights are whole percentages, none negative, summing to 100, each on a version of ``name``
    that the desired state loads. Versions with weight 0 are kept (they get no traffic)."""
    loaded = _versions_of(name, models)
    if not loaded:
        raise ValidationError(f"no version of model {name!r} is loaded", name=name)
    out: dict[str, int] = {}
    for version, weight in weights.items():
        if isinstance(weight, bool) or not isinstance(weight, int):
            raise ValidationError("weights must be whole numbers", version=version)
        if weight < 0:
            raise ValidationError(f"the weight of {version!r} is negative", version=version)
        if version not in loaded:
            raise ValidationError(
                f"{name}:{version} is not loaded; load it before giving it traffic",
                version=version,
                loaded=sorted(loaded),
            )
        out[version] = weight
    total = sum(out.values())
    if out and total != 100:
        raise ValidationError(f"the weights must sum to 100, not {total}", total=total)
    return dict(sorted(out.items()))


def validate_shadow(
    name: str, version: str, sample: float, models: list[str], defaults: Mapping[str, str]
) -> dict[str, Any]:
    """The shadow setting to store for ``name``, or a 422: the version must be loaded and must
    not be the name's primary (default) version; ``sample`` is a share in (0, 1]."""
    loaded = _versions_of(name, models)
    if not loaded:
        raise ValidationError(f"no version of model {name!r} is loaded", name=name)
    if version not in loaded:
        raise ValidationError(
            f"{name}:{version} is not loaded; load it before shadowing with it",
            version=version,
            loaded=sorted(loaded),
        )
    if defaults.get(name) == version:
        raise ValidationError(
            f"{name}:{version} is the primary (default) version of {name!r}; a shadow must be "
            "another version",
            version=version,
        )
    if not 0.0 < float(sample) <= 1.0:
        raise ValidationError("sample must be a share in (0, 1]", sample=sample)
    return {"version": version, "sample": float(sample)}


# --- routing -----------------------------------------------------------------------------------


def key_point(key: str) -> float:
    """Where a routing key falls on [0, 100): a hash, the same in every process and replica."""
    digest = hashlib.sha256(key.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64 * 100.0


def pick(
    weights: Mapping[str, int],
    key: str | None = None,
    rand: Callable[[], float] = random.random,
) -> str | None:
    """The version for one request: by ``key`` (sticky) or at random; None for no weights.

    Versions are laid out on [0, 100) in sorted order, each over its weight. The key's point
    depends on the key alone, so while the weights stay the same a key always gets the same
    version."""
    point = key_point(key) if key is not None else rand() * 100.0
    chosen, upto = None, 0.0
    for version in sorted(weights):
        weight = weights[version]
        if weight <= 0:
            continue
        chosen = version
        upto += weight
        if point < upto:
            return version
    return chosen  # rounding at the top end: the last version with weight


# --- comparison --------------------------------------------------------------------------------


@dataclass
class Answers:
    """One version's answers to a request's texts."""

    labels: list[str]  # the model's label names, in probability column order
    probabilities: np.ndarray  # (texts, labels)
    predicted_index: np.ndarray  # (texts,)

    def predicted(self) -> list[str]:
        return [self.labels[int(i)] for i in self.predicted_index]


@dataclass
class Comparison:
    texts: int
    agreements: int
    probability_difference: float  # summed over texts: each text's mean |p - q| over labels
    primary_labels: list[str]
    shadow_labels: list[str]


def compare(primary: Answers, shadow: Answers) -> Comparison:
    """How far two versions' answers to the same texts agree: the predicted labels, and the
    mean absolute difference of the probabilities over the union of both label sets (a label
    that one version lacks has probability 0 there)."""
    names = sorted(set(primary.labels) | set(shadow.labels))
    n = len(primary.predicted_index)

    def aligned(answers: Answers) -> np.ndarray:
        out = np.zeros((n, len(names)), dtype=np.float64)
        for j, label in enumerate(answers.labels):
            out[:, names.index(label)] = answers.probabilities[:, j]
        return out

    diff = np.abs(aligned(primary) - aligned(shadow)).mean(axis=1) if names else np.zeros(n)
    p_labels, s_labels = primary.predicted(), shadow.predicted()
    agreements = sum(1 for a, b in zip(p_labels, s_labels, strict=True) if a == b)
    return Comparison(n, agreements, float(diff.sum()), p_labels, s_labels)


# --- shadow runs -------------------------------------------------------------------------------


@dataclass
class _Job:
    primary: str
    shadow: str
    texts: list[str]
    answers: Answers
    primary_seconds: float


class ShadowObserver:
    """Where a shadow runner reports (the worker wires these to Prometheus)."""

    def compared(
        self, primary: str, shadow: str, result: Comparison, primary_s: float, shadow_s: float
    ) -> None:
        """One request compared."""

    def dropped(self, primary: str, shadow: str) -> None:
        """One request's shadow run dropped (queue full, shadow overloaded or cleared)."""

    def errored(self, primary: str, shadow: str) -> None:
        """One request's shadow run failed."""


ShadowInfer = Callable[[str, list[str]], Awaitable[Answers]]


class ShadowRunner:
    """Runs sampled requests again on their name's shadow version, never in the request's way.

    :meth:`offer` only puts a job on a bounded queue (or drops it, counted); a few tasks of the
    worker's event loop take jobs off it and run them through ``infer`` (the shadow version's
    own batcher). Nothing a shadow run does reaches the client: errors are counted and logged
    (at most one line per pair every ``log_every`` seconds).
    """

    def __init__(
        self,
        infer: ShadowInfer,
        observer: ShadowObserver,
        *,
        queue_size: int = SHADOW_QUEUE,
        concurrency: int = SHADOW_CONCURRENCY,
        shadows: Callable[[], Shadows] | None = None,
        rand: Callable[[], float] = random.random,
        clock: Callable[[], float] = time.perf_counter,
        log_every: float = 10.0,
    ):
        self._infer, self._observer = infer, observer
        self._settings = shadows or (lambda: self._shadows)
        self._queue_size, self._concurrency = queue_size, concurrency
        self._queue: asyncio.Queue[_Job] | None = None
        self._tasks: list[asyncio.Task] = []
        self._shadows: Shadows = {}
        self._rand, self._clock, self._log_every = rand, clock, log_every
        self._logged: dict[tuple[str, str], float] = {}
        self.pending = 0  # jobs offered and not finished

    def configure(self, shadows: Shadows) -> None:
        """Take a new set of shadows (name -> {version, sample}), for a runner made without a
        ``shadows`` source; queued jobs of a shadow that is gone are dropped when they come up."""
        self._shadows = {name: dict(s) for name, s in shadows.items()}

    def _setting(self, primary: str) -> dict[str, Any] | None:
        return self._settings().get(primary.split(":", 1)[0])

    def shadow_of(self, primary: str) -> str | None:
        """The shadow tag for requests served by ``primary`` (None: no shadow run)."""
        name = primary.split(":", 1)[0]
        setting = self._setting(primary)
        if not setting:
            return None
        tag = f"{name}:{setting['version']}"
        return None if tag == primary else tag

    def offer(
        self, primary: str, texts: list[str], answers: Answers, primary_seconds: float
    ) -> bool:
        """Queue a shadow run of a request served by ``primary`` if its name has a shadow and the
        request is sampled; True when queued. Call inside the event loop; it never blocks."""
        shadow = self.shadow_of(primary)
        setting = self._setting(primary)
        if shadow is None or setting is None or self._rand() >= setting["sample"]:
            return False
        if self._queue is None:
            self._start()
        assert self._queue is not None
        try:
            self._queue.put_nowait(_Job(primary, shadow, list(texts), answers, primary_seconds))
        except asyncio.QueueFull:
            self._observer.dropped(primary, shadow)
            return False
        self.pending += 1
        return True

    def _start(self) -> None:
        self._queue = asyncio.Queue(maxsize=self._queue_size)
        loop = asyncio.get_running_loop()
        self._tasks = [loop.create_task(self._work()) for _ in range(self._concurrency)]

    async def _work(self) -> None:
        assert self._queue is not None
        while True:
            job = await self._queue.get()
            try:
                await self._run(job)
            except asyncio.CancelledError:
                raise
            except Exception:  # an observer fault: never end the loop
                log.exception("shadow bookkeeping failed")
            finally:
                self.pending -= 1
                self._queue.task_done()

    async def _run(self, job: _Job) -> None:
        if self.shadow_of(job.primary) != job.shadow:  # the shadow was cleared or changed
            self._observer.dropped(job.primary, job.shadow)
            return
        start = self._clock()
        try:
            answers = await self._infer(job.shadow, job.texts)
        except asyncio.CancelledError:
            raise
        except OverloadedError:  # the shadow version's own queue is full: shed, like ours
            self._observer.dropped(job.primary, job.shadow)
            return
        except Exception as exc:
            self._observer.errored(job.primary, job.shadow)
            self._log_error(job, exc)
            return
        seconds = self._clock() - start
        result = compare(job.answers, answers)
        self._observer.compared(job.primary, job.shadow, result, job.primary_seconds, seconds)

    def _log_error(self, job: _Job, exc: Exception) -> None:
        pair, now = (job.primary, job.shadow), time.monotonic()
        if now - self._logged.get(pair, -self._log_every) >= self._log_every:
            self._logged[pair] = now
            message = getattr(exc, "message", None) or type(exc).__name__
            log.warning("shadow run of %s on %s failed: %s", job.primary, job.shadow, message)

    async def drain(self) -> None:
        """Wait until every queued job has finished (tests, shutdown)."""
        if self._queue is not None:
            await self._queue.join()

    async def aclose(self) -> None:
        for task in self._tasks:
            task.cancel()
            with contextlib.suppress(BaseException):
                await task
        self._tasks = []
