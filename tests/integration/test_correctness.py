"""Issue #18 against real servers with API keys, an admin token and a real Redis configured:
bounded metrics, a bounded audit log, CORS with an API key, drift behind the key, foreign cache
values, retrained tags, the decision rule, and Redis eviction that cannot lose the control
state."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import psutil
import pytest
import redis

from tests.integration.conftest import MLSERVE, REPO, clean_env, forget_redis_keys
from tests.integration.test_cache_redis import _free_port
from tests.integration.test_model_management import copy_version

pytestmark = pytest.mark.integration

TOKEN = "correctness-admin-token-0123"
KEY = "correctness-api-key-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
KEYED = {"X-API-Key": KEY}
ORIGIN = "https://app.example.com"
REDIS_URL = "redis://127.0.0.1:6379/0"
REVIEW = "I have taken this for two months and my skin has never been this clear."


@pytest.fixture(scope="module")
def names() -> dict[str, str]:
    run = uuid.uuid4().hex[:8]
    return {"prefix": f"it-corr-{run}", "namespace": f"it-corr-{run}"}


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("corr-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server(start_server, names, audit_path):
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1,topic:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_API_KEYS=KEY,
        MLSERVE_REDIS_URL=REDIS_URL,
        MLSERVE_CACHE_PREFIX=names["prefix"],
        MLSERVE_CONTROL_NAMESPACE=names["namespace"],
        MLSERVE_CORS_ORIGINS=ORIGIN,
        MLSERVE_AUDIT_LOG=str(audit_path),
        MLSERVE_DRIFT_INTERVAL_SECONDS="1",
    )
    yield server
    server.stop()
    forget_redis_keys(REDIS_URL, names["prefix"], names["namespace"])


@pytest.fixture
def client(server):
    with server.client(headers=KEYED) as c:
        yield c


def worker_rss(server) -> dict[int, int]:
    arbiter = psutil.Process(server.proc.pid)
    return {p.pid: p.memory_info().rss for p in arbiter.children(recursive=True)}


async def flood(url: str, requests: list[tuple[str, str, dict | None]], clients: int = 16):
    """Send every (method, path, json) with ``clients`` concurrent keep-alive connections; the
    statuses. A plain HTTP/1.1 client on asyncio streams: httpx's own cost per request (about
    2 ms of Python on these cores) made it, not the server, the bottleneck of tens of
    thousands of requests. A response with ``Connection: close`` (the connection balancer)
    makes the client reconnect."""
    parsed = httpx.URL(url)
    host, port = parsed.host, parsed.port
    fixed = "".join(f"{k}: {v}\r\n" for k, v in KEYED.items())
    statuses: list[int] = []
    queue = list(reversed(requests))

    async def exchange(reader, writer, method: str, path: str, body: dict | None) -> bool:
        data = json.dumps(body).encode() if body is not None else b""
        kind = "Content-Type: application/json\r\n" if body is not None else ""
        head = f"{method} {path} HTTP/1.1\r\nHost: {host}:{port}\r\n{fixed}{kind}"
        writer.write(f"{head}Content-Length: {len(data)}\r\n\r\n".encode() + data)
        status = int((await reader.readline()).split()[1])
        length, close = 0, False
        while (line := await reader.readline()) not in (b"\r\n", b""):
            name, _, value = line.decode("latin-1").partition(":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection":
                close = value == "close"
            elif name == "transfer-encoding":
                raise AssertionError(f"{path}: a {value} response; the flood reads Content-Length")
        await reader.readexactly(length)
        statuses.append(status)
        return close

    async def worker():
        reader = writer = None
        try:
            while queue:
                if writer is None:
                    reader, writer = await asyncio.open_connection(host, port)
                if await exchange(reader, writer, *queue.pop()):
                    writer.close()
                    reader = writer = None
        finally:
            if writer is not None:
                writer.close()

    await asyncio.gather(*(worker() for _ in range(clients)))
    return statuses


# --- 1. metrics nobody can blow up ----------------------------------------------------------
def test_distinct_unknown_paths_and_versions_leave_metrics_small_and_memory_flat(
    server, client
) -> None:
    # A warm-up of the same kind and size first: the allocator's high-water mark and the
    # series of every route template are then in place, so what grows afterwards is a leak
    # (one series per path grew the workers by 0.5 GB per 20,000 paths), not the heap settling.
    n = 1000
    warm = [("GET", f"/nope/warm{i}", None) for i in range(2 * n)]
    warm += [
        ("POST", "/predict", {"text": REVIEW, "model_version": f"sentiment:w{i}"})
        for i in range(2 * n)
    ]
    warm += [("GET", f"/models/warm/w{i}", None) for i in range(n)]
    warm += [("GET", f"/models/sentiment/w{i}/drift", None) for i in range(2 * n)]
    warm += [("POST", f"/warm/{i}/predict", {"text": "hi"}) for i in range(n)]
    asyncio.run(flood(server.url, warm))
    time.sleep(1.0)
    before_size = len(client.get("/metrics").content)
    before_rss = worker_rss(server)

    run = uuid.uuid4().hex[:6]
    paths = [("GET", f"/nope/{run}{i}", None) for i in range(2500)]
    paths += [("GET", f"/models/{run}x{i}/v{i}", None) for i in range(1250)]
    paths += [("POST", f"/x{run}/{i}/predict", {"text": "hi"}) for i in range(1250)]
    versions = [
        ("POST", "/predict", {"text": REVIEW, "model_version": f"sentiment:u{run}{i}"})
        for i in range(2500)
    ]
    versions += [("GET", f"/models/sentiment/u{run}{i}/drift", None) for i in range(2500)]
    statuses = asyncio.run(flood(server.url, paths + versions))
    assert set(statuses) == {404}, sorted(set(statuses))
    # The same twice more, with other paths. A worker's heap settles at a high-water mark (about
    # 85 MB above idle, measured, then flat: cyclic garbage waits for the rare full collections);
    # what still grows in the last 10,000 requests is a leak.
    for round_no, tag in enumerate(("b", "c")):
        settled_rss = worker_rss(server)
        again = [(m, p.replace(run, run + tag), b) for m, p, b in paths]
        again += [
            ("POST", "/predict", {"text": REVIEW, "model_version": f"sentiment:v{run}{tag}{i}"})
            for i in range(2500)
        ]
        again += [("GET", f"/models/sentiment/v{run}{tag}{i}/drift", None) for i in range(2500)]
        assert set(asyncio.run(flood(server.url, again))) == {404}, round_no

    start = time.perf_counter()
    response = client.get("/metrics")
    elapsed = time.perf_counter() - start
    assert response.status_code == 200 and elapsed < 1.0, elapsed
    growth = len(response.content) - before_size
    assert growth < 4096, f"/metrics grew by {growth} bytes"
    assert run not in response.text  # no label value came from a request
    after_rss = worker_rss(server)
    for pid, rss in after_rss.items():
        if pid in settled_rss and pid in before_rss:
            grown = (rss - settled_rss[pid]) / 2**20
            total = (rss - before_rss[pid]) / 2**20
            assert grown < 50, f"worker {pid} grew by {grown:.1f} MiB (by {total:.1f} in all)"
    # mlserve's own request metrics are exact and templated.
    assert 'mlserve_requests_total{route="/models/{name}/{version}/drift",status="404"}' in (
        response.text
    )
    assert "bentoml_service_request" not in response.text


# --- 4. the audit log -----------------------------------------------------------------------
def test_a_flood_of_denied_admin_calls_leaves_the_audit_log_nearly_unchanged(
    server, client, audit_path
) -> None:
    size_before = audit_path.stat().st_size if audit_path.exists() else 0
    calls = [("POST", "/admin/models/load", {"tag": "sentiment:v2"})] * 3000
    calls += [("GET", "/admin/stats", None)] * 500
    statuses = asyncio.run(flood(server.url, calls))
    assert set(statuses) == {401}
    grown = (audit_path.stat().st_size if audit_path.exists() else 0) - size_before
    assert grown <= 64 * 1024, f"the audit log grew by {grown} bytes"
    metrics = client.get("/metrics").text
    denied = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.splitlines()
        if line.startswith("mlserve_admin_denied_total{")
    )
    assert denied >= 3500
    # An authorized change is written in full, at once.
    response = client.post(
        "/admin/models/default", json={"name": "sentiment", "version": "v1"}, headers=AUTH
    )
    assert response.status_code == 200, response.text
    entries = [json.loads(line) for line in audit_path.read_text().splitlines()]
    last = entries[-1]
    assert (last["action"], last["result"], last["status"]) == ("default", "ok", 200)
    assert last["request_id"] == response.headers["x-request-id"]
    summaries = [e for e in entries if e["action"] == "denied"]
    assert summaries and all(e["client"] == "127.0.0.1" for e in summaries)
    assert TOKEN not in audit_path.read_text()


# --- 5. the HTTP surface --------------------------------------------------------------------
def test_a_cors_preflight_with_an_api_key_succeeds(server) -> None:
    with server.client() as anonymous:
        preflight = anonymous.options(
            "/predict",
            headers={
                "Origin": ORIGIN,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "content-type,x-api-key",
            },
        )
        assert preflight.status_code == 200, preflight.text
        allowed = preflight.headers["access-control-allow-headers"].lower()
        assert "x-api-key" in allowed
        assert preflight.headers["access-control-allow-origin"] == ORIGIN
        actual = anonymous.post(
            "/predict", json={"text": REVIEW}, headers={"Origin": ORIGIN, **KEYED}
        )
        assert actual.status_code == 200, actual.text
        assert actual.headers["access-control-allow-origin"] == ORIGIN


def test_drift_needs_the_api_key_and_reaches_prometheus_without_a_call(server, client) -> None:
    with server.client() as anonymous:
        denied = anonymous.get("/models/sentiment/v1/drift")
        assert denied.status_code == 401 and denied.json()["error"] == "unauthorized"
    for i in range(5):
        client.post("/predict", json={"text": f"{REVIEW} {i}"})
    # The periodic computation (every second here) sets the gauge with nobody reading drift.
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        if 'mlserve_drift_score{model_version="sentiment:v1"}' in client.get("/metrics").text:
            break
        time.sleep(0.3)
    else:
        pytest.fail("mlserve_drift_score never appeared in /metrics")
    report = client.get("/models/sentiment/v1/drift")
    assert report.status_code == 200 and report.json()["available"] is True
    assert report.json()["computed_at"] > 0


def test_the_decision_rule_is_named_and_local_paths_are_not_shown(server, client) -> None:
    detail = client.get("/models/sentiment/v1").json()
    rule = detail["decision_rule"]
    assert rule["rule"] in ("argmax", "prior_corrected_argmax")
    assert set(rule["weights"]) == set(detail["labels"]) and rule["description"]
    answer = client.post("/predict", json={"text": REVIEW}).json()
    assert answer["decision_rule"] == rule["rule"]
    batch = client.post("/batch-predict", json={"texts": [REVIEW]}).json()
    assert batch["decision_rule"] == rule["rule"]
    source = detail["metadata"]["dataset"]["source"]
    assert "/" not in source and "\\" not in source


# --- 2. the cache ---------------------------------------------------------------------------
def test_a_foreign_cache_value_is_a_miss_not_a_500(server, client, names) -> None:
    text = f"{REVIEW} foreign {uuid.uuid4().hex}"
    first = client.post("/predict", json={"text": text})
    assert first.status_code == 200 and first.json()["cached"] is False
    assert client.post("/predict", json={"text": text}).json()["cached"] is True
    r = redis.Redis.from_url(REDIS_URL)
    keys = list(r.scan_iter(f"{names['prefix']}:*"))
    for garbage in (b"{not json", b'{"p": [1.0], "i": 0}', b'{"p": [0.5, 0.5, 0.5], "i": 9}'):
        for key in keys:
            r.set(key, garbage, ex=600)
        again = client.post("/predict", json={"text": text})
        assert again.status_code == 200, again.text
        assert again.json()["cached"] is False
        assert again.json()["probabilities"] == first.json()["probabilities"]
        # ... and the entry was overwritten with the model's own answer.
        assert client.post("/predict", json={"text": text}).json()["cached"] is True
    assert 'mlserve_cache_total{event="error"}' in client.get("/metrics").text


def test_a_retrained_tag_never_serves_an_old_answer(start_server, model_home, tmp_path) -> None:
    """Serve sentiment:v1 with Redis, predict, stop; retrain sentiment:v1 (random forest) with
    --overwrite; serve again: the same review is computed by the new model, not read back."""
    models = tmp_path / "models"
    (models / "sentiment").mkdir(parents=True)
    shutil.copytree(model_home / "models" / "sentiment" / "v1", models / "sentiment" / "v1")
    prefix = f"it-retrain-{uuid.uuid4().hex[:8]}"
    env = dict(
        ready=True,
        models_dir=models,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="1",
        MLSERVE_REDIS_URL=REDIS_URL,
        MLSERVE_CACHE_PREFIX=prefix,
        MLSERVE_CONTROL_NAMESPACE=prefix,
    )
    try:
        server = start_server(**env)
        with server.client() as c:
            old = c.post("/predict", json={"text": REVIEW}).json()
            assert c.post("/predict", json={"text": REVIEW}).json()["cached"] is True
        server.stop()

        home = tmp_path / "train-home"
        home.mkdir()
        (home / "models").symlink_to(models, target_is_directory=True)
        retrain = subprocess.run(
            [
                *(MLSERVE, "train", "--data", "drugscom", "--name", "sentiment"),
                *("--version", "v1", "--candidates", "random_forest", "--overwrite"),
                *("--reports-dir", str(tmp_path)),
            ],
            env=clean_env(BENTOML_HOME=str(home), PYTHONPATH=str(REPO)),
            cwd=tmp_path,
            capture_output=True,
            text=True,
            timeout=600,
            check=False,
        )
        assert retrain.returncode == 0, retrain.stdout[-3000:] + retrain.stderr[-3000:]

        server = start_server(**env)
        with server.client() as c:
            new = c.post("/predict", json={"text": REVIEW}).json()
            detail = c.get("/models/sentiment/v1").json()
        server.stop()
        assert "random_forest" in detail["estimator"]
        assert new["cached"] is False
        assert new["probabilities"] != old["probabilities"]
    finally:
        forget_redis_keys(REDIS_URL, prefix)


# --- 3. eviction cannot lose the control state ----------------------------------------------
def test_a_full_redis_evicts_cache_entries_never_the_promoted_models(
    start_server, model_home, tmp_path
) -> None:
    """The shipped Redis configuration (deploy/redis/redis.conf) with a small maxmemory: fill
    the cache past the limit through the server, then the promoted version is still the one a
    fresh replica serves."""
    models = tmp_path / "models"
    (models / "sentiment").mkdir(parents=True)
    v1 = model_home / "models" / "sentiment" / "v1"
    (models / "sentiment" / "v1").symlink_to(v1, target_is_directory=True)
    copy_version(models, v1, "sentiment", "v1b")
    port = _free_port()
    data = tmp_path / "redis"
    data.mkdir()
    binary = shutil.which("redis-server")
    assert binary, "redis-server is needed (apt-get install redis-server)"
    # The shipped file, with its data directory moved here (compose and Kubernetes mount /data).
    conf = tmp_path / "redis.conf"
    shipped = (REPO / "deploy" / "redis" / "redis.conf").read_text()
    assert "dir /data" in shipped
    conf.write_text(shipped.replace("dir /data", f"dir {data}"))
    redis_proc = subprocess.Popen(
        [
            binary,
            str(conf),
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--dir",
            str(data),
            "--maxmemory",
            "3mb",
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    r = redis.Redis.from_url(url, socket_timeout=1)
    deadline = time.monotonic() + 10
    while True:
        try:
            r.ping()
            break
        except redis.RedisError:
            assert time.monotonic() < deadline, "redis-server did not start"
            time.sleep(0.1)
    env = dict(
        ready=True,
        models_dir=models,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_WORKERS="1",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_REDIS_URL=url,
        MLSERVE_CONTROL_NAMESPACE="evict-test",
        MLSERVE_CACHE_TTL_SECONDS="86400",
    )
    try:
        assert r.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        first = start_server(**env)
        with first.client(timeout=60) as c:
            promoted = c.post(
                "/admin/models/load",
                json={"tag": "sentiment:v1b", "make_default": True},
                headers=AUTH,
            )
            assert promoted.status_code == 200, promoted.text
            batch = 0
            while int(r.info("stats")["evicted_keys"]) < 2000:
                assert batch < 600, f"no eviction after {batch} batches: {r.info('memory')}"
                texts = [f"review {batch}-{i} {uuid.uuid4().hex}" for i in range(100)]
                response = c.post("/batch-predict", json={"texts": texts})
                assert response.status_code == 200, response.text
                batch += 1
            state = json.loads(r.get("mlserve:control:evict-test:state"))
            assert state["defaults"] == {"sentiment": "v1b"}
            assert int(r.info("memory")["used_memory"]) <= 3 * 2**20 * 1.1
        # A replica that starts now adopts the promoted state, not its configured models.
        fresh = start_server(**env)
        with fresh.client() as c:
            answer = c.post("/predict", json={"text": REVIEW})
            assert answer.status_code == 200 and answer.json()["model_version"] == "sentiment:v1b"
            ready = c.get("/ready").json()
            assert ready["control"]["namespace"] == "evict-test"
        fresh.stop()
        first.stop()
    finally:
        redis_proc.kill()
        redis_proc.wait(10)
