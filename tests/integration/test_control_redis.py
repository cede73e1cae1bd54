"""The control path across servers (as on several hosts): two `bentoml serve` processes share one
desired-state record in a real Redis. A server that starts later adopts it, a change through
either reaches both, and a Redis outage never stops predictions."""

from __future__ import annotations

import uuid

import pytest

from tests.integration.test_cache_redis import _free_port, start_redis

pytestmark = pytest.mark.integration

TOKEN = "fleet-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def test_two_servers_follow_one_record_in_redis(start_server) -> None:
    port = _free_port()
    redis_proc = start_redis(port)
    env = {
        "MLSERVE_MODELS": "sentiment:v1,topic:v1",
        "MLSERVE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "MLSERVE_CACHE_PREFIX": f"fleet-{uuid.uuid4().hex[:8]}",
        "MLSERVE_ADMIN_TOKEN": TOKEN,
        "MLSERVE_WORKERS": "1",  # one worker per server: two "hosts" of one worker each
    }
    a = start_server(ready=True, **env)
    b = None
    try:
        with a.client() as ca:
            loaded = ca.post(
                "/admin/models/load",
                json={"tag": "sentiment:v2", "make_default": True},
                headers=AUTH,
            )
            assert loaded.status_code == 200 and loaded.json()["complete"], loaded.text
            assert loaded.json()["generation"] == 1

            # A replica that starts after the change serves the record, not MLSERVE_MODELS.
            b = start_server(ready=True, **env)
            with b.client() as cb:
                body = cb.post("/predict", json={"text": "it worked", "model_version": "sentiment"})
                assert body.json()["model_version"] == "sentiment:v2"

                # A change through the second server reaches the first.
                promoted = cb.post(
                    "/admin/models/default",
                    json={"name": "sentiment", "version": "v1"},
                    headers=AUTH,
                )
                result = promoted.json()
                assert promoted.status_code == 200 and result["complete"], promoted.text
                assert len(result["workers"]) == 2  # one worker per server
                unloaded = cb.post(
                    "/admin/models/unload", json={"tag": "sentiment:v2"}, headers=AUTH
                )
                assert unloaded.status_code == 200 and unloaded.json()["complete"]
            for _ in range(5):
                body = ca.post("/predict", json={"text": "it worked"}).json()
                assert body["model_version"] == "sentiment:v1"
            assert (
                ca.post("/predict", json={"text": "x", "model_version": "sentiment:v2"}).status_code
                == 404
            )

            # Redis goes away: predictions go on; changes are refused, not half-made.
            redis_proc.kill()
            redis_proc.wait()
            for i in range(5):
                assert ca.post("/predict", json={"text": f"still up {i}"}).status_code == 200
            refused = ca.post("/admin/models/load", json={"tag": "sentiment:v2"}, headers=AUTH)
            assert refused.status_code == 503, refused.text
            assert "control store unavailable" in refused.json()["message"]
            assert ca.get("/ready").status_code == 200
            assert "sentiment:v2" not in ca.get("/models").text
    finally:
        if redis_proc.poll() is None:
            redis_proc.kill()
        a.stop()
        if b is not None:
            b.stop()
