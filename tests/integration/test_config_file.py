"""A real server configured by a YAML file: the file's batch size and cache TTL take effect,
GET /admin/config shows each value's source with secrets masked, and an environment variable
overrides the file."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

TOKEN = "config-admin-token-0123456789"
MAX_BATCH = 2
TTL_S = 2


def batches(url: str, tag: str) -> tuple[float, float, float]:
    """sentiment:v1's mlserve_batch_size: (batches, texts, batches of at most MAX_BATCH)."""
    count = total = within = 0.0
    for family in text_string_to_metric_families(httpx.get(f"{url}/metrics", timeout=30).text):
        if family.name != "mlserve_batch_size":
            continue
        for sample in family.samples:
            if sample.labels.get("model_version") != tag:
                continue
            if sample.name.endswith("_count"):
                count = sample.value
            elif sample.name.endswith("_sum"):
                total = sample.value
            elif sample.name.endswith("_bucket") and float(sample.labels["le"]) == MAX_BATCH:
                within = sample.value
    return count, total, within


@pytest.fixture(scope="module")
def configured(start_server, tmp_path_factory):
    path = tmp_path_factory.mktemp("config") / "mlserve.yaml"
    path.write_text(
        "# the file's values; MLSERVE_MAX_TEXT_CHARS in the environment overrides limits\n"
        f"batching:\n  max_batch_size: {MAX_BATCH}\n  max_latency_ms: 20\n"
        f"cache:\n  ttl_seconds: {TTL_S}\n"
        "limits:\n  max_text_chars: 50\n"
        "compute:\n  workers: 1\n"
    )
    server = start_server(
        ready=True,
        MLSERVE_CONFIG_FILE=str(path),
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_MAX_TEXT_CHARS="200",
    )
    yield server, path
    server.stop()


def test_admin_config_shows_values_and_their_sources(configured) -> None:
    server, path = configured
    with server.client() as client:
        assert client.get("/admin/config").status_code == 401
        response = client.get("/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200, response.text
    config = response.json()
    values, sources = config["values"], config["sources"]
    assert config["config_file"] == str(path)
    assert (values["batching"]["max_batch_size"], sources["batching"]["max_batch_size"]) == (
        MAX_BATCH,
        "file",
    )
    assert (values["cache"]["ttl_seconds"], sources["cache"]["ttl_seconds"]) == (TTL_S, "file")
    assert (values["compute"]["workers"], sources["compute"]["workers"]) == (1, "file")
    # The environment overrides the file ...
    assert (values["limits"]["max_text_chars"], sources["limits"]["max_text_chars"]) == (
        200,
        "env",
    )
    assert (values["models"], sources["models"]) == (["sentiment:v1"], "env")
    # ... the rest are defaults, and the token is never shown.
    assert (values["drift"]["window"], sources["drift"]["window"]) == (1000, "default")
    assert (values["admin"]["token"], sources["admin"]["token"]) == ("***", "env")
    assert TOKEN not in response.text


def test_the_environment_overrides_the_files_text_limit(configured) -> None:
    server, _ = configured
    with server.client() as client:
        # 120 characters: over the file's 50, within the environment's 200.
        accepted = client.post("/predict", json={"text": "great relief, " * 8 + "works well!"})
        refused = client.post("/predict", json={"text": "x" * 201})
    assert accepted.status_code == 200, accepted.text
    assert refused.status_code == 422, refused.text


def test_the_files_cache_ttl_takes_effect(configured) -> None:
    server, _ = configured
    text = f"the ttl check {time.time_ns()}"
    with server.client() as client:

        def cached() -> bool:
            response = client.post("/predict", json={"text": text})
            assert response.status_code == 200, response.text
            return response.json()["cached"]

        assert cached() is False
        assert cached() is True
        time.sleep(TTL_S + 1.0)  # past the file's TTL (the default is an hour)
        assert cached() is False


def test_the_files_batch_size_caps_every_batch(configured) -> None:
    server, _ = configured
    n = 24

    async def burst() -> list[int]:
        async with httpx.AsyncClient(base_url=server.url, timeout=60.0) as client:
            responses = await asyncio.gather(
                *(client.post("/predict", json={"text": f"batch cap review {i}"}) for i in range(n))
            )
        return [r.status_code for r in responses]

    before = batches(server.url, "sentiment:v1")
    assert asyncio.run(burst()) == [200] * n
    count, total, within = (a - b for a, b in zip(batches(server.url, "sentiment:v1"), before))
    assert total == n  # every text went through exactly one batch
    assert within == count, f"a batch was larger than the file's {MAX_BATCH}"


def test_a_bad_file_stops_the_server_at_start(tmp_path) -> None:
    """Not half-configured: the service's settings raise at import, and the server exits."""
    from tests.integration.conftest import REPO, _free_port, clean_env, launch

    path = tmp_path / "bad.yaml"
    path.write_text("models: [sentiment:v1]\ncache:\n  ttl_seconds: 0\n")
    env = clean_env(BENTOML_HOME=str(tmp_path / "home"), MLSERVE_CONFIG_FILE=str(path))
    target = ["service:MLServe", "--working-dir", str(REPO)]
    server = launch(target, _free_port(), env, tmp_path, tmp_path / "server.log")
    try:
        rc = server.proc.wait(timeout=120)
    finally:
        server.stop()
    log = server.log()
    assert rc != 0, log
    assert f"{path}, line 3, key cache.ttl_seconds: Input should be greater than" in log, log
