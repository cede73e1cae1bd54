"""Settings that change what the server does: CORS, input/output logging, JSON request logs."""

from __future__ import annotations

import json

import pytest

pytestmark = pytest.mark.integration

SECRET = "my private diary entry about migraine pills 7f3a"


def _json_lines(text: str) -> list[dict]:
    out = []
    for line in text.splitlines():
        if line.startswith("{"):
            try:
                out.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    return out


def test_request_logs_are_json_and_never_contain_the_text(default_server) -> None:
    with default_server.client() as client:
        response = client.post("/predict", json={"text": SECRET}, headers={"X-Request-ID": "log-1"})
        assert response.status_code == 200
    log = default_server.log(200_000)
    assert SECRET not in log
    lines = [r for r in _json_lines(log) if r.get("request_id") == "log-1"]
    assert len(lines) == 1
    line = lines[0]
    assert line["route"] == "/predict" and line["status"] == 200
    assert line["model_version"] == "sentiment:v1" and line["latency_ms"] > 0


def test_cors_and_io_logging_when_configured(start_server) -> None:
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_CORS_ORIGINS="https://app.example.com",
        MLSERVE_LOG_IO="true",
    )
    try:
        with server.client() as client:
            preflight = client.options(
                "/predict",
                headers={
                    "Origin": "https://app.example.com",
                    "Access-Control-Request-Method": "POST",
                    "Access-Control-Request-Headers": "content-type",
                },
            )
            assert preflight.status_code == 200
            allowed = preflight.headers["access-control-allow-origin"]
            assert allowed == "https://app.example.com"
            other = client.options(
                "/predict",
                headers={"Origin": "https://evil.example", "Access-Control-Request-Method": "POST"},
            )
            assert other.headers.get("access-control-allow-origin") != "https://evil.example"
            response = client.post(
                "/predict",
                json={"text": SECRET},
                headers={"Origin": "https://app.example.com", "X-Request-ID": "io-1"},
            )
            assert response.status_code == 200
            assert response.headers["access-control-allow-origin"] == "https://app.example.com"
        io_lines = [r for r in _json_lines(server.log(200_000)) if r.get("logger") == "mlserve.io"]
        assert io_lines and io_lines[-1]["texts"] == [SECRET]
        assert io_lines[-1]["request_id"] == "io-1"
        assert io_lines[-1]["labels"] == [response.json()["label"]]
    finally:
        server.stop()
