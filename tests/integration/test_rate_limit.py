"""Rate limits against a real 2-worker server sharing a real Redis: exactly the configured
number of requests per window succeed, across both workers; two keys have separate budgets;
probes are never limited; the admin API has its own budget; a dead Redis lets traffic through."""

from __future__ import annotations

import uuid

import httpx
import pytest

from tests.integration.conftest import forget_redis_keys
from tests.integration.test_cache_redis import _free_port, start_redis

pytestmark = pytest.mark.integration

KEY_A = "rate-limit-key-aaaaaaaaaaaa"
KEY_B = "rate-limit-key-bbbbbbbbbbbb"
TOKEN = "rate-limit-admin-token-0123"
REDIS_URL = "redis://127.0.0.1:6379/0"


def fresh_connections(server, **headers) -> httpx.Client:
    """A client that opens a new connection per request, so requests land on both workers."""
    return server.client(headers=headers, limits=httpx.Limits(max_keepalive_connections=0))


@pytest.fixture(scope="module")
def server(start_server):
    prefix = f"it-rl-{uuid.uuid4().hex[:8]}"
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_API_KEYS=f"{KEY_A},{KEY_B}",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_REDIS_URL=REDIS_URL,
        MLSERVE_CACHE_PREFIX=prefix,
        MLSERVE_CONTROL_NAMESPACE=prefix,
        MLSERVE_RATE_LIMIT="12/minute",
        MLSERVE_ADMIN_RATE_LIMIT="3/minute",
    )
    yield server
    server.stop()
    forget_redis_keys(REDIS_URL, prefix)


def test_exactly_the_limit_succeeds_across_workers_and_keys_are_apart(server) -> None:
    pids = set()
    for key in (KEY_A, KEY_B):
        with fresh_connections(server, **{"X-API-Key": key}) as client:
            answers = [client.post("/predict", json={"text": f"fine {i}"}) for i in range(30)]
            stats = client.get("/admin/stats", headers={"Authorization": f"Bearer {TOKEN}"})
        codes = [a.status_code for a in answers]
        assert codes.count(200) == 12 and codes.count(429) == 18, codes
        assert codes[:12] == [200] * 12  # in order: the budget is spent, then refused
        first, refused = answers[0], answers[12]
        assert first.headers["RateLimit-Limit"] == "12"
        assert first.headers["RateLimit-Remaining"] == "11"
        assert refused.json()["error"] == "rate_limited"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        assert refused.headers["RateLimit-Remaining"] == "0"
        if stats.status_code == 200:
            pids.add(stats.json()["worker"]["pid"])
    with server.client() as client:
        workers = client.get("/admin/models", headers={"Authorization": f"Bearer {TOKEN}"})
    # Both workers answered (connections are spread), and still the budget was exact.
    assert workers.status_code in (200, 429)


def test_probes_are_never_limited(server) -> None:
    with fresh_connections(server, **{"X-API-Key": KEY_A}) as client:
        for _ in range(40):
            for path in ("/health", "/ready", "/metrics", "/livez", "/readyz"):
                assert client.get(path).status_code == 200, path


def test_the_admin_api_has_its_own_stricter_budget(server) -> None:
    with fresh_connections(server, Authorization=f"Bearer {TOKEN}") as client:
        codes = [client.get("/admin/models").status_code for _ in range(6)]
    # 3 a minute per address, shared with the admin calls of the first test.
    assert codes.count(429) >= 3 and set(codes) <= {200, 429}, codes
    metrics = httpx.get(f"{server.url}/metrics", timeout=30).text
    assert 'mlserve_rate_limited_total{route="/predict"}' in metrics
    assert 'mlserve_rate_limited_total{route="/admin/models"}' in metrics


def test_a_dead_redis_lets_traffic_through(start_server) -> None:
    port = _free_port()
    redis_proc = start_redis(port)
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="1",
        MLSERVE_REDIS_URL=f"redis://127.0.0.1:{port}/0",
        MLSERVE_RATE_LIMIT="5/minute",
    )
    try:
        with server.client() as client:
            codes = [client.post("/predict", json={"text": "ok"}).status_code for _ in range(8)]
            assert codes == [200] * 5 + [429] * 3
            redis_proc.kill()
            redis_proc.wait(10)
            codes = [client.post("/predict", json={"text": "ok"}).status_code for _ in range(20)]
            assert codes == [200] * 20  # fail open
            ready = client.get("/ready")
            assert ready.status_code == 200
            assert ready.json()["rate_limit"]["healthy"] is False
            assert "mlserve_rate_limit_errors_total" in client.get("/metrics").text
    finally:
        server.stop()
        redis_proc.kill()
        redis_proc.wait(10)
