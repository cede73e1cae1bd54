"""The typed client (sync and async) against a real 2-worker server with API keys and an admin
token: every method, typed errors with their codes and request ids, and a load / promote /
unload round trip on a store copy that holds extra versions."""

from __future__ import annotations

import asyncio
import json
import re
import time
from pathlib import Path

import pytest

from mlserve.client import (
    AsyncClient,
    Client,
    Conflict,
    MLServeClientError,
    NotFound,
    Unauthorized,
    ValidationFailed,
)
from mlserve.schemas import (
    AdminChangeResult,
    BatchPredictResponse,
    ConfigResponse,
    ControlStatus,
    DriftReport,
    GpuResponse,
    HealthResponse,
    ModelDetail,
    ModelsResponse,
    PredictResponse,
    ReadyResponse,
    StatsResponse,
    VersionResponse,
)
from tests.integration.conftest import linked_store
from tests.integration.test_model_management import copy_version

pytestmark = pytest.mark.integration

KEY = "client-predict-key-0123456789"
TOKEN = "client-admin-token-0123456789"
REQUEST_ID = re.compile(r"^[0-9a-f]{32}$")
START = {"models": ["sentiment:v1", "topic:v1"], "defaults": {"sentiment": "v1", "topic": "v1"}}


@pytest.fixture(scope="module")
def models_dir(model_home: Path, tmp_path_factory) -> Path:
    """The trained store linked in, plus sentiment:v8 and sentiment:v9 (copies of v1)."""
    models = tmp_path_factory.mktemp("client-store") / "models"
    linked_store(model_home, models)
    v1 = model_home / "models" / "sentiment" / "v1"
    for version in ("v8", "v9"):
        copy_version(models, v1, "sentiment", version)
    return models


@pytest.fixture(scope="module")
def server(start_server, models_dir: Path):
    server = start_server(
        ready=True,
        models_dir=models_dir,
        MLSERVE_MODELS="sentiment:v1,topic:v1",
        MLSERVE_DEFAULT_MODEL="sentiment",
        MLSERVE_WORKERS="2",
        MLSERVE_API_KEYS=KEY,
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_MAX_LOADED_MODELS="4",
    )
    # One worker answering 200 does not make the other ready: ask until several answers in a
    # row say ready (a 503 is a ReadyResponse with ready False, not an error).
    with Client(server.url, timeout=10) as c:
        deadline, streak = time.monotonic() + 90, 0
        while streak < 6 and time.monotonic() < deadline:
            streak = streak + 1 if c.ready().ready else 0
            time.sleep(0.1)
    assert streak >= 6, server.log()
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with Client(server.url, api_key=KEY, admin_token=TOKEN, timeout=120) as c:
        yield c
        desired = c.admin_models().desired
    # Each test leaves the server's models as it found them.
    assert {k: desired[k] for k in START} == START, desired


def _check_prediction(p: PredictResponse, version: str) -> None:
    assert isinstance(p, PredictResponse) and p.model_version == version
    assert p.label in p.probabilities and abs(sum(p.probabilities.values()) - 1) < 1e-4
    assert REQUEST_ID.match(p.request_id)


def _check_gpu(client_gpu) -> None:
    gpu = client_gpu()
    assert isinstance(gpu, GpuResponse) and gpu.device in ("cuda", "cpu")


def test_every_method_sync(client: Client, tmp_path: Path) -> None:
    assert client.health() == HealthResponse(status="ok")
    ready = client.ready()
    assert isinstance(ready, ReadyResponse) and ready.ready
    assert ready.models == {"sentiment:v1": "ready", "topic:v1": "ready"}
    version = client.version()
    assert isinstance(version, VersionResponse) and version.default_model == "sentiment"

    models = client.models()
    assert isinstance(models, ModelsResponse)
    assert sorted(m.tag for m in models.models) == START["models"]
    assert models.defaults == START["defaults"]
    detail = client.model("topic:v1")
    assert isinstance(detail, ModelDetail) and detail.tag == "topic:v1" and detail.metadata
    assert client.model("sentiment", "v1").identity == client.model("sentiment:v1").identity

    _check_prediction(client.predict("This medication worked wonders"), "sentiment:v1")
    _check_prediction(client.predict("Shares fell after the report", "topic:v1"), "topic:v1")
    batch = client.batch_predict(["Great drug", "Made me dizzy", "Awful"], "sentiment")
    assert isinstance(batch, BatchPredictResponse) and len(batch.predictions) == 3
    assert batch.model_version == "sentiment:v1"

    from_bytes = client.predict_file(b"text\nThe striker scored twice\nMarkets fell\n", "t.csv")
    assert len(from_bytes.predictions) == 2 and from_bytes.model_version == "sentiment:v1"
    path = tmp_path / "texts.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in ("goal", "election", "film")))
    from_path = client.predict_file(path, model_version="topic:v1")
    assert len(from_path.predictions) == 3 and from_path.model_version == "topic:v1"
    same = client.batch_predict(["goal", "election", "film"], "topic:v1").predictions
    assert [p.probabilities for p in from_path.predictions] == [p.probabilities for p in same]

    drift = client.drift("sentiment:v1")
    assert isinstance(drift, DriftReport) and drift.method == "psi"
    assert client.drift("topic", "v1").available in (True, False)
    _check_gpu(client.gpu)
    assert "mlserve_requests_total" in client.metrics()

    stats = client.stats()
    assert isinstance(stats, StatsResponse) and stats.requests >= 5
    assert "/predict" in stats.routes and stats.control["desired"]["models"] == START["models"]
    status = client.admin_models()
    assert isinstance(status, ControlStatus) and len(status.workers) == 2
    config = client.config()
    assert isinstance(config, ConfigResponse)
    assert config.values["admin"]["token"] == "***" and KEY not in json.dumps(config.values)


def test_every_method_async(server) -> None:
    async def run() -> None:
        async with AsyncClient(server.url, api_key=KEY, admin_token=TOKEN, timeout=120) as c:
            health, ready, version, models, detail, drift = await asyncio.gather(
                c.health(), c.ready(), c.version(), c.models(), c.model("sentiment:v1"),
                c.drift("sentiment", "v1"),
            )  # fmt: skip
            assert health.status == "ok" and ready.ready and version.service == "mlserve"
            assert sorted(m.tag for m in models.models) == START["models"]
            assert detail.tag == "sentiment:v1" and isinstance(drift, DriftReport)
            predictions = await asyncio.gather(
                *(c.predict(f"text number {i}", "topic:v1") for i in range(8))
            )
            for p in predictions:
                _check_prediction(p, "topic:v1")
            batch = await c.batch_predict(["one", "two"])
            assert batch.model_version == "sentiment:v1" and len(batch.predictions) == 2
            upload = await c.predict_file(b'{"text": "a"}\n{"text": "b"}\n', "t.jsonl")
            assert len(upload.predictions) == 2
            metrics = await c.metrics()
            assert "mlserve_requests_total" in metrics
            gpu = await c.gpu()
            assert isinstance(gpu, GpuResponse)
            stats, status, config = await asyncio.gather(c.stats(), c.admin_models(), c.config())
            assert stats.requests >= 8 and len(status.workers) == 2
            assert config.values["admin"]["token"] == "***"
            with pytest.raises(NotFound) as info:
                await c.model("sentiment:v404")
            assert info.value.code == "model_not_found"

    asyncio.run(run())


def _assert_error(exc: MLServeClientError, status: int, code: str) -> None:
    assert exc.status == status and exc.code == code, repr(exc)
    assert exc.message and REQUEST_ID.match(exc.request_id or ""), repr(exc)
    for text in (str(exc), repr(exc)):
        assert KEY not in text and TOKEN not in text


def test_typed_errors(server, client: Client) -> None:
    with pytest.raises(NotFound) as info:
        client.model("sentiment:v404")
    _assert_error(info.value, 404, "model_not_found")
    with pytest.raises(NotFound) as info:
        client.predict("text", "nosuchmodel")
    _assert_error(info.value, 404, "model_not_found")
    with pytest.raises(NotFound) as info:
        client.drift("topic", "v404")
    _assert_error(info.value, 404, "model_not_found")

    with pytest.raises(ValidationFailed) as info:
        client.predict("   ")
    _assert_error(info.value, 422, "validation_error")
    assert info.value.details == {"index": 0}
    with pytest.raises(ValidationFailed) as info:
        client.batch_predict([])
    _assert_error(info.value, 422, "validation_error")
    with pytest.raises(ValidationFailed) as info:
        client.load("../../etc/passwd")
    _assert_error(info.value, 422, "validation_error")

    with pytest.raises(Conflict) as info:
        client.unload("sentiment:v1")  # the default
    _assert_error(info.value, 409, "model_state_conflict")

    with Client(server.url, timeout=60) as anonymous:
        assert anonymous.health().status == "ok" and anonymous.models().models  # open routes
        with pytest.raises(Unauthorized) as info:
            anonymous.predict("text")
        _assert_error(info.value, 401, "unauthorized")
        with pytest.raises(Unauthorized) as info:
            anonymous.stats()
        _assert_error(info.value, 401, "unauthorized")
    with Client(server.url, api_key="wrong-key-0123456789abc", admin_token=KEY) as wrong:
        with pytest.raises(Unauthorized) as info:
            wrong.drift("sentiment:v1")
        _assert_error(info.value, 401, "unauthorized")
        with pytest.raises(Unauthorized) as info:  # a predict key is no admin token
            wrong.admin_models()
        _assert_error(info.value, 401, "unauthorized")


def test_load_promote_unload_round_trip_sync(client: Client) -> None:
    loaded = client.load("sentiment:v9")
    assert isinstance(loaded, AdminChangeResult) and loaded.complete and loaded.action == "load"
    assert loaded.models == ["sentiment:v1", "sentiment:v9", "topic:v1"]
    assert loaded.defaults["sentiment"] == "v1" and len(loaded.workers) == 2
    _check_prediction(client.predict("some text", "sentiment:v9"), "sentiment:v9")

    promoted = client.promote("sentiment:v9")  # loaded: only the default changes
    assert promoted.action == "default" and promoted.defaults["sentiment"] == "v9"
    assert promoted.complete
    _check_prediction(client.predict("some text"), "sentiment:v9")
    with pytest.raises(Conflict):
        client.unload("sentiment:v9")

    back = client.set_default("sentiment:v1")
    assert back.complete and back.defaults["sentiment"] == "v1"
    unloaded = client.unload("sentiment:v9")
    assert unloaded.complete and unloaded.models == START["models"]
    with pytest.raises(NotFound) as info:
        client.predict("some text", "sentiment:v9")
    assert info.value.code == "model_not_found"


def test_load_promote_unload_round_trip_async(server, client: Client) -> None:
    async def run() -> None:
        async with AsyncClient(server.url, api_key=KEY, admin_token=TOKEN, timeout=120) as c:
            promoted = await c.promote("sentiment:v8")  # not loaded: loaded as the default
            assert promoted.action == "load" and promoted.complete
            assert promoted.defaults["sentiment"] == "v8"
            assert "sentiment:v8" in promoted.models
            _check_prediction(await c.predict("some text"), "sentiment:v8")
            with pytest.raises(NotFound) as info:
                await c.promote("sentiment:v404")  # in no store: the load's 404
            assert info.value.code == "model_not_found"
            assert (await c.promote("sentiment:v1")).action == "default"
            unloaded = await c.unload("sentiment:v8")
            assert unloaded.complete and unloaded.models == START["models"]
            assert (await c.models()).defaults == START["defaults"]

    asyncio.run(run())
