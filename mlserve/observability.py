"""Prometheus metrics, JSON request logs and per-worker thread pinning.

Metrics are created on first use, inside the worker: BentoML sets ``PROMETHEUS_MULTIPROC_DIR``
only after the service module is imported, and prometheus_client must see it to aggregate
across worker processes on ``/metrics``.
"""

from __future__ import annotations

import collections
import json
import logging
import os
import sys
import time
from functools import cache, lru_cache
from typing import Any

LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
CONFIDENCE_BUCKETS = (0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 0.95, 0.99, 1.0)


class _Metrics:
    def __init__(self) -> None:
        from prometheus_client import Counter, Gauge, Histogram

        self.requests = Counter(
            "mlserve_requests", "HTTP requests by route and status code.", ["route", "status"]
        )
        self.request_latency = Histogram(
            "mlserve_request_latency_seconds",
            "End-to-end request latency by route.",
            ["route"],
            buckets=LATENCY_BUCKETS,
        )
        self.inference_latency = Histogram(
            "mlserve_inference_latency_seconds",
            "Inference latency by model version and stage (queue, preprocess, model, postprocess).",
            ["model_version", "stage"],
            buckets=LATENCY_BUCKETS,
        )
        self.batch_size = Histogram(
            "mlserve_batch_size",
            "Texts per adaptive batch, by model version.",
            ["model_version"],
            buckets=BATCH_BUCKETS,
        )
        self.predictions = Counter(
            "mlserve_predictions", "Predicted labels by model version.", ["model_version", "label"]
        )
        self.confidence = Histogram(
            "mlserve_prediction_confidence",
            "Confidence (probability of the predicted label) by model version.",
            ["model_version"],
            buckets=CONFIDENCE_BUCKETS,
        )
        self.errors = Counter("mlserve_errors", "Errors by type.", ["type"])
        self.connections_shed = Counter(
            "mlserve_connections_shed",
            "Keep-alive connections closed after a response to spread clients over the workers.",
        )
        self.cache = Counter(
            "mlserve_cache",
            "Prediction cache lookups by event: hit, miss, error (an unreachable backend, or a "
            "stored value that is not an entry of the model: counted as a miss too).",
            ["event"],
        )
        self.cache_circuit_open = Gauge(
            "mlserve_cache_circuit_open",
            "1 while a worker's Redis cache circuit breaker is open (requests skip the cache).",
            multiprocess_mode="max",
        )
        self.batcher_errors = Counter(
            "mlserve_batcher_errors",
            "Batch consumer faults by model version and kind: hook (a batch hook raised), "
            "deliver (a batch's results could not be handed out), restart (a consumer restarted).",
            ["model_version", "kind"],
        )
        self.overloaded = Counter(
            "mlserve_overloaded",
            "Requests refused with 503 overloaded, by model version and reason: at arrival, "
            "deadline (the estimated wait is over the deadline) or queue_full (MLSERVE_MAX_QUEUE); "
            "after admission, from the queue: late (refused before its deadline, when the batches "
            "ahead of it would keep it past it) or expired (its deadline passed in the queue). "
            "The answer's reason is deadline for all but queue_full.",
            ["model_version", "reason"],
        )
        self.rate_limited = Counter(
            "mlserve_rate_limited",
            "Requests refused with 429 by the rate limiter, by route template.",
            ["route"],
        )
        self.rate_limit_errors = Counter(
            "mlserve_rate_limit_errors",
            "Rate limiter storage failures (the request was let through: fail open).",
        )
        self.admin_denied = Counter(
            "mlserve_admin_denied",
            "Admin calls refused before any change, by route template and reason.",
            ["route", "reason"],
        )
        self.drift = Gauge(
            "mlserve_drift_score",
            "Largest feature PSI of recent traffic against the training reference.",
            ["model_version"],
            multiprocess_mode="max",
        )
        self.ready = Gauge(
            "mlserve_ready",
            "1 when every worker of the replica is ready (the lowest over live workers; /ready "
            "answers 503 while it is 0). Updated every second.",
            multiprocess_mode="livemin",
        )
        self.draining = Gauge(
            "mlserve_draining",
            "1 while a worker drains on SIGTERM (/ready is 503, no new connections are taken).",
            multiprocess_mode="livemax",
        )
        pair = ["primary", "shadow"]
        self.shadow_runs = Counter(
            "mlserve_shadow_runs",
            "Requests offered to a shadow version, by primary and shadow version and outcome: "
            "compared, dropped (the shadow queue or the shadow's batcher was full, or the "
            "shadow was cleared) or error (counted and logged, never shown to the client).",
            [*pair, "outcome"],
        )
        self.shadow_comparisons = Counter(
            "mlserve_shadow_comparisons",
            "Texts answered by both the primary and the shadow version.",
            pair,
        )
        self.shadow_agreements = Counter(
            "mlserve_shadow_agreements",
            "Compared texts on which the primary and the shadow predicted the same label.",
            pair,
        )
        self.shadow_probability_difference = Counter(
            "mlserve_shadow_probability_difference",
            "Sum over compared texts of the mean absolute difference of the two versions' "
            "probabilities (divide by mlserve_shadow_comparisons_total for the mean).",
            pair,
        )
        self.shadow_labels = Counter(
            "mlserve_shadow_labels",
            "Predicted labels of compared texts, by pair and role (primary or shadow).",
            [*pair, "role", "label"],
        )
        self.shadow_latency = Histogram(
            "mlserve_shadow_latency_seconds",
            "Latency of compared requests by pair and role: the primary's request, and the "
            "shadow's run of the same texts.",
            [*pair, "role"],
            buckets=LATENCY_BUCKETS,
        )
        self.loaded = Gauge(
            "mlserve_model_loaded",
            "1 while a model version is loaded in a worker.",
            ["model_version"],
            multiprocess_mode="livemax",
        )


@lru_cache(maxsize=1)
def metrics() -> _Metrics:
    return _Metrics()


class _LazyGauge:
    def labels(self, **kw: str) -> Any:
        return metrics().loaded.labels(**kw)


MODEL_LOADED = _LazyGauge()


# Each request updates a handful of labelled series. Looking a child up by its label values
# (``.labels(...)``) costs about as much as updating it, so the children of the per-request and
# per-batch series are kept, per label values (a bounded set: route templates, status codes,
# loaded versions and their labels). Series are never removed, so a kept child stays exported.


@lru_cache(maxsize=1024)
def _batch_series(tag: str) -> tuple[Any, ...]:
    m = metrics()
    stages = ("queue", "preprocess", "model", "postprocess")
    return (
        m.batch_size.labels(model_version=tag),
        *(m.inference_latency.labels(model_version=tag, stage=s) for s in stages),
    )


@lru_cache(maxsize=1024)
def _request_series(route: str, status: int) -> tuple[Any, Any]:
    m = metrics()
    return m.requests.labels(route=route, status=str(status)), m.request_latency.labels(route=route)


@lru_cache(maxsize=4096)
def _prediction_series(tag: str, label: str) -> Any:
    return metrics().predictions.labels(model_version=tag, label=label)


@lru_cache(maxsize=1024)
def _confidence_series(tag: str) -> Any:
    return metrics().confidence.labels(model_version=tag)


def observe_batch(tag: str, n: int, queue_ms: float, timing: dict[str, float]) -> None:
    size, queue, preprocess, model, postprocess = _batch_series(tag)
    size.observe(n)
    queue.observe(queue_ms / 1000.0)
    preprocess.observe(timing.get("preprocess_ms", 0.0) / 1000.0)
    model.observe(timing.get("model_ms", 0.0) / 1000.0)
    postprocess.observe(timing.get("postprocess_ms", 0.0) / 1000.0)


def observe_request(route: str, status: int, seconds: float) -> None:
    requests, latency = _request_series(route, status)
    requests.inc()
    latency.observe(seconds)


def observe_predictions(tag: str, labels: list[str], confidence: Any) -> None:
    if len(labels) == 1:
        _prediction_series(tag, labels[0]).inc()
    else:
        for label, count in collections.Counter(labels).items():
            _prediction_series(tag, label).inc(count)
    observe_many(_confidence_series(tag), confidence)


def observe_many(histogram: Any, values: Any) -> None:
    """``histogram.observe(v)`` for every ``v`` of ``values``, with one update per bucket
    that got values instead of one per value: a 100-text batch observed its confidences one by
    one in 0.4 ms of the event loop. Same counts; the sum is added once (it may differ from
    the one-by-one sum in the last bit). Falls back to one by one if prometheus_client's
    histogram internals ever change."""
    bounds = getattr(histogram, "_upper_bounds", None)
    buckets = getattr(histogram, "_buckets", None)
    total = getattr(histogram, "_sum", None)
    if len(values) < 2 or bounds is None or buckets is None or total is None:
        for v in values:
            histogram.observe(float(v))
        return
    import numpy as np

    values = np.asarray(values, dtype=float).ravel()
    # The bucket of v is the first bound >= v, as in Histogram.observe; a NaN has none.
    index = np.searchsorted(np.asarray(bounds, dtype=float), values, side="left")
    counts = np.bincount(index, minlength=len(bounds) + 1)[: len(bounds)]
    total.inc(float(sum(values.tolist())))
    for i in np.flatnonzero(counts).tolist():
        buckets[i].inc(int(counts[i]))


def observe_connection_shed() -> None:
    metrics().connections_shed.inc()


def observe_cache(event: str, n: int) -> None:
    if n:
        metrics().cache.labels(event=event).inc(n)


def observe_ready(ready: bool) -> None:
    metrics().ready.set(1 if ready else 0)


def observe_draining(on: bool) -> None:
    metrics().draining.set(1 if on else 0)


def observe_cache_circuit(is_open: bool) -> None:
    metrics().cache_circuit_open.set(1 if is_open else 0)


BATCHER_ERROR_KINDS = ("hook", "deliver", "restart")
OVERLOAD_REASONS = ("deadline", "queue_full", "late", "expired")


def init_batcher_errors(tag: str) -> None:
    """Expose ``mlserve_batcher_errors_total`` and ``mlserve_overloaded_total`` at 0 for a newly
    loaded version, so alerts on their increase read real series while nothing has gone
    wrong."""
    for reason in OVERLOAD_REASONS:
        metrics().overloaded.labels(model_version=tag, reason=reason)
    for kind in BATCHER_ERROR_KINDS:
        metrics().batcher_errors.labels(model_version=tag, kind=kind)


def observe_batcher_error(tag: str, kind: str) -> None:
    metrics().batcher_errors.labels(model_version=tag, kind=kind).inc()


def observe_overloaded(tag: str, reason: str) -> None:
    metrics().overloaded.labels(model_version=tag, reason=reason).inc()


def init_rate_limited(routes: list[str]) -> None:
    """Expose ``mlserve_rate_limited_total`` at 0 for every limited route (a bounded set), so
    the alert on its rate reads a real series while nothing is refused."""
    for route in routes:
        metrics().rate_limited.labels(route=route)


def observe_rate_limited(route: str) -> None:
    metrics().rate_limited.labels(route=route).inc()


def observe_rate_limit_event(kind: str) -> None:
    if kind == "error":
        metrics().rate_limit_errors.inc()


def observe_admin_denied(route: str, reason: str) -> None:
    metrics().admin_denied.labels(route=route, reason=reason).inc()


def collector_registry() -> Any:
    """Every worker's metrics, merged when BentoML runs several (multiprocess mode)."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
        return registry
    return REGISTRY


def render_metrics() -> tuple[bytes, str]:
    """The Prometheus exposition served on /metrics."""
    from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

    metrics()  # every family exists before the first request
    return generate_latest(collector_registry()), CONTENT_TYPE_LATEST


SHADOW_OUTCOMES = ("compared", "dropped", "error")


class ShadowMetrics:
    """The :class:`mlserve.delivery.ShadowObserver` of a worker: Prometheus. Every label value
    is a loaded version's tag, a fixed role or outcome, or one of a loaded model's labels."""

    def init(self, primary: str, shadow: str) -> None:
        m = metrics()
        for outcome in SHADOW_OUTCOMES:
            m.shadow_runs.labels(primary=primary, shadow=shadow, outcome=outcome)

    def compared(
        self, primary: str, shadow: str, result: Any, primary_s: float, shadow_s: float
    ) -> None:
        m, pair = metrics(), {"primary": primary, "shadow": shadow}
        self.init(primary, shadow)
        m.shadow_runs.labels(**pair, outcome="compared").inc()
        m.shadow_comparisons.labels(**pair).inc(result.texts)
        m.shadow_agreements.labels(**pair).inc(result.agreements)
        m.shadow_probability_difference.labels(**pair).inc(result.probability_difference)
        for role, labels in (("primary", result.primary_labels), ("shadow", result.shadow_labels)):
            for label, count in collections.Counter(labels).items():
                m.shadow_labels.labels(**pair, role=role, label=label).inc(count)
        m.shadow_latency.labels(**pair, role="primary").observe(primary_s)
        m.shadow_latency.labels(**pair, role="shadow").observe(shadow_s)

    def dropped(self, primary: str, shadow: str) -> None:
        self.init(primary, shadow)
        metrics().shadow_runs.labels(primary=primary, shadow=shadow, outcome="dropped").inc()

    def errored(self, primary: str, shadow: str) -> None:
        self.init(primary, shadow)
        metrics().shadow_runs.labels(primary=primary, shadow=shadow, outcome="error").inc()


def observe_drift(tag: str, score: float) -> None:
    metrics().drift.labels(model_version=tag).set(score)


def observe_error(kind: str) -> None:
    metrics().errors.labels(type=kind).inc()


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time, level, logger, message and any ``extra`` fields."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, Any] = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        payload.update(getattr(record, "fields", {}))
        if record.exc_info:  # for operators, in the log only: never in a response
            payload["exception"] = self.formatException(record.exc_info)
        return json.dumps(payload, ensure_ascii=False)


@cache
def json_logger(name: str) -> logging.Logger:
    """A logger that writes JSON lines to stderr and does not propagate to BentoML's."""
    logger = logging.getLogger(name)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    logger.handlers = [handler]
    logger.setLevel(logging.INFO)
    logger.propagate = False
    return logger


def configure_threads(settings: Any) -> None:
    """Pin BLAS threads for this worker (torch's own threads are set by its runner)."""
    for var in ("OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(settings.blas_threads)
    try:
        from threadpoolctl import threadpool_limits

        threadpool_limits(settings.blas_threads, user_api="blas")
    except ImportError:  # pragma: no cover - scikit-learn always brings threadpoolctl
        pass
