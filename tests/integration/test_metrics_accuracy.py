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
