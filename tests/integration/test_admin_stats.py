"""GET /admin/stats and `mlserve stats`: bearer-token auth and live figures."""

from __future__ import annotations

import json
import subprocess

import pytest

from tests.integration.conftest import MLSERVE

pytestmark = pytest.mark.integration

TOKEN = "test-admin-token-0123456789"


@pytest.fixture(scope="module")
def admin_server(start_server):
    # Two workers, each with its own in-memory cache. The stats test sends everything over one
    # keep-alive connection, so its repeats reach the worker that cached the text; connection
    # balancing is off here, since it may close that connection (after a full response) and
    # the client's reconnect may land on the other worker, where a repeat is a miss.
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1,topic:v1",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_WORKERS="2",
        MLSERVE_BALANCE_CONNECTIONS="false",
    )
    yield server
    server.stop()


def test_admin_routes_are_off_without_a_token(default_server) -> None:
    with default_server.client() as client:
        response = client.get("/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 403
    assert response.json()["error"] == "admin_disabled"


@pytest.mark.parametrize(
    "header", [None, "Bearer", "Bearer wrong-token-wrong-token", f"Basic {TOKEN}", TOKEN]
)
def test_a_missing_or_wrong_token_is_401(admin_server, header) -> None:
    headers = {"Authorization": header} if header else {}
    with admin_server.client() as client:
        response = client.get("/admin/stats", headers=headers)
    assert response.status_code == 401
    assert response.json()["error"] == "unauthorized"
    assert TOKEN not in response.text


def test_stats_count_requests_errors_cache_and_drift(admin_server, tmp_path) -> None:
    auth = {"Authorization": f"Bearer {TOKEN}"}
    with admin_server.client() as client:
        for i in range(20):
            assert client.post("/predict", json={"text": f"stats review {i}"}).status_code == 200
        for _ in range(5):  # repeats: cache hits
            assert client.post("/predict", json={"text": "stats review 0"}).status_code == 200
        for _ in range(3):
            assert client.post("/predict", json={"text": ""}).status_code == 422
        stats = client.get("/admin/stats", headers=auth).json()
    predict = stats["routes"]["/predict"]
    assert predict["requests"] == 28 and predict["errors"] == 3
    assert predict["error_rate"] == pytest.approx(3 / 28, abs=1e-4)
    assert 0 < predict["latency"]["p50_ms"] <= predict["latency"]["p95_ms"]
    assert stats["cache"]["hit"] == 5 and stats["cache"]["miss"] == 20
    assert stats["cache"]["hit_rate"] == pytest.approx(0.2)
    assert stats["models"]["sentiment:v1"]["predictions"] == 25
    assert set(stats["worker"]["loaded"]) == {"sentiment:v1", "topic:v1"}
    assert stats["worker"]["defaults"] == {"sentiment": "v1", "topic": "v1"}
    assert stats["drift"]["sentiment:v1"]["window_size"] == 25
    assert stats["errors"]["validation_error"] == 3

    assert stats["requests"] == 28  # prediction routes only, not the /ready probes
    assert stats["error_rate"] == pytest.approx(3 / 28, abs=1e-4)
    env = {"MLSERVE_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin", "COLUMNS": "200"}
    proc = subprocess.run(
        [MLSERVE, "stats", "--server", admin_server.url], env=env, capture_output=True, text=True
    )
    assert proc.returncode == 0, proc.stderr
    assert "/predict" in proc.stdout and "sentiment:v1" in proc.stdout
    assert "cache hit rate" in proc.stdout
    raw = subprocess.run(
        [MLSERVE, "stats", "--server", admin_server.url, "--json"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert json.loads(raw.stdout)["routes"]["/predict"]["requests"] >= 28
    denied = subprocess.run(
        [MLSERVE, "stats", "--server", admin_server.url],
        env={"PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
    )
    assert denied.returncode != 0 and "MLSERVE_ADMIN_TOKEN" in denied.stderr
    wrong = subprocess.run(
        [MLSERVE, "stats", "--server", admin_server.url],
        env={"PATH": "/usr/bin:/bin", "MLSERVE_ADMIN_TOKEN": "not-the-right-token-at-all"},
        capture_output=True,
        text=True,
    )
    assert wrong.returncode != 0 and "401" in wrong.stderr and "Traceback" not in wrong.stderr


def test_api_keys_guard_predict_routes_and_never_open_admin_routes(start_server) -> None:
    key = "predict-key-0123456789"
    server = start_server(
        ready=True, MLSERVE_MODELS="sentiment:v1", MLSERVE_API_KEYS=key, MLSERVE_ADMIN_TOKEN=TOKEN
    )
    body = {"text": "it helped a lot"}
    try:
        with server.client() as client:
            assert client.post("/predict", json=body).status_code == 401
            wrong = client.post("/predict", json=body, headers={"X-API-Key": "x" * 22})
            assert wrong.status_code == 401 and wrong.json()["error"] == "unauthorized"
            assert client.post("/predict", json=body, headers={"X-API-Key": key}).status_code == 200
            bearer = {"Authorization": f"Bearer {key}"}
            assert client.post("/predict", json=body, headers=bearer).status_code == 200
            batch = client.post("/batch-predict", json={"texts": ["a b"]}, headers=bearer)
            assert batch.status_code == 200
            no_key = client.post("/batch-predict/file", files={"file": ("t.csv", b"text\nok\n")})
            assert no_key.status_code == 401
            # The admin token is not a predict key, and a predict key opens no admin route.
            admin_as_key = {"Authorization": f"Bearer {TOKEN}"}
            assert client.post("/predict", json=body, headers=admin_as_key).status_code == 401
            assert client.get("/admin/stats", headers=bearer).status_code == 401
            assert client.get("/health").status_code == 200  # probes stay open
    finally:
        server.stop()
