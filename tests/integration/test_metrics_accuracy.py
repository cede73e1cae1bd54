"""Prometheus counters add up exactly across worker processes."""

from __future__ import annotations

import re
from concurrent.futures import ThreadPoolExecutor

import pytest

pytestmark = pytest.mark.integration


def counter(metrics: str, name: str, **labels: str) -> float:
    total = 0.0
    for line in metrics.splitlines():
        if not line.startswith(name + "{"):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split("}")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
    return total


def test_counters_add_up_across_two_workers(start_server) -> None:
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_CACHE_ENABLED="false",
    )
    n_ok, n_bad = 300, 25
    try:
        with server.client() as client:

            def ok(i: int) -> int:
                return client.post("/predict", json={"text": f"review number {i}"}).status_code

            def bad(i: int) -> int:
                return client.post("/predict", json={"text": " "}).status_code

            with ThreadPoolExecutor(16) as pool:
                assert set(pool.map(ok, range(n_ok))) == {200}
                assert set(pool.map(bad, range(n_bad))) == {422}
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    assert counter(metrics, "mlserve_requests_total", route="/predict", status="200") == n_ok
    assert counter(metrics, "mlserve_requests_total", route="/predict", status="422") == n_bad
    assert counter(metrics, "mlserve_predictions_total", model_version="sentiment:v1") == n_ok
    assert counter(metrics, "mlserve_errors_total", type="validation_error") == n_bad
    assert counter(metrics, "mlserve_batch_size_sum", model_version="sentiment:v1") == n_ok
    confidence = counter(
        metrics, "mlserve_prediction_confidence_count", model_version="sentiment:v1"
    )
    assert confidence == n_ok
    latency_count = counter(metrics, "mlserve_request_latency_seconds_count", route="/predict")
    assert latency_count == n_ok + n_bad
    assert counter(metrics, "mlserve_model_loaded", model_version="sentiment:v1") >= 1


def test_batch_confidences_land_in_their_buckets_across_two_workers(start_server) -> None:
    """A /batch-predict's confidences go into the histogram one bucket update at a time
    (observability.observe_many): each bucket holds exactly the answered confidences at or
    below its bound, summed over both workers."""
    from mlserve.observability import CONFIDENCE_BUCKETS

    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_CACHE_ENABLED="false",
    )
    texts = [
        "great medicine, it worked",
        "terrible side effects, stopped after a week",
        "it is fine I guess",
        "no change at all",
        "helped my pain a lot but made me dizzy",
        "awful, worst drug ever",
        "works well, no complaints",
    ]
    try:
        with server.client() as client:

            def batch(i: int) -> list[float]:
                body = {"texts": [f"{t} {i}" for t in texts]}
                r = client.post("/batch-predict", json=body)
                assert r.status_code == 200, r.text
                return [p["confidence"] for p in r.json()["predictions"]]

            with ThreadPoolExecutor(8) as pool:
                answered = [c for cs in pool.map(batch, range(40)) for c in cs]
            metrics = client.get("/metrics").text
    finally:
        server.stop()
    tag = {"model_version": "sentiment:v1"}
    assert len(answered) == 40 * len(texts)
    assert counter(metrics, "mlserve_prediction_confidence_count", **tag) == len(answered)
    total = counter(metrics, "mlserve_prediction_confidence_sum", **tag)
    assert abs(total - sum(answered)) < 1e-5 * len(answered)  # answers are rounded to 1e-6
    for bound in CONFIDENCE_BUCKETS:
        if any(abs(c - bound) <= 1e-6 for c in answered):
            continue  # the rounded answer cannot tell which side of the bound it was
        le = str(float(bound))
        expected = sum(c <= bound for c in answered)
        got = counter(metrics, "mlserve_prediction_confidence_bucket", le=le, **tag)
        assert got == expected, (bound, got, expected)
