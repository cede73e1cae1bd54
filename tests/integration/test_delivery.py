"""Progressive delivery against real 2-worker servers: a traffic split (its share, sticky keys, a
change of weights under 32 clients), a shadow version (every answer from the primary, the
comparison grows, unloading the shadow under load), refusals that change nothing, promote
ending both, the audit log, the CLI workflow, and two replicas sharing one split through Redis.

``sentiment:v1canary`` is a copy of the classical ``sentiment:v1`` under another version, so the
canary and the shadow are as fast as the primary and agree with it on every text."""

from __future__ import annotations

import json
import subprocess
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from tests.integration.conftest import MLSERVE, linked_store
from tests.integration.test_cache_redis import _free_port, start_redis
from tests.integration.test_model_management import copy_version

pytestmark = pytest.mark.integration

TOKEN = "delivery-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 32
MODELS = ["sentiment:v1", "sentiment:v1canary", "topic:v1"]
DEFAULTS = {"sentiment": "v1", "topic": "v1"}
TEXTS = [
    "This medication worked wonders, no side effects at all",
    "It made me dizzy and I had to stop after a week",
    "Not sure yet, some days are better than others",
    "Terrible headaches, would not recommend it to anyone",
    "My doctor switched me to this and I feel great",
]


@pytest.fixture(scope="module")
def models_dir(model_home: Path, tmp_path_factory) -> Path:
    models = tmp_path_factory.mktemp("delivery-store") / "models"
    linked_store(model_home, models)
    copy_version(models, model_home / "models" / "sentiment" / "v1", "sentiment", "v1canary")
    return models


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("delivery-audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server(start_server, models_dir: Path, audit_path: Path):
    server = start_server(
        ready=True,
        models_dir=models_dir,
        MLSERVE_MODELS=",".join(MODELS),
        MLSERVE_WORKERS="2",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_AUDIT_LOG=str(audit_path),
        # Every answer is computed by the version it names.
        MLSERVE_CACHE_ENABLED="false",
    )
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
        state = c.get("/admin/models", headers=AUTH).json()["desired"]
    # Each test leaves the server as it found it: no split, no shadow.
    assert state["models"] == MODELS, state
    assert state["defaults"] == DEFAULTS, state
    assert not state.get("traffic") and not state.get("shadows"), state


def admin(client: httpx.Client, route: str, body: dict) -> httpx.Response:
    return client.post(f"/admin/models/{route}", json=body, headers=AUTH)


def applied(response: httpx.Response) -> dict:
    """The result of a change that every worker of the server applied (200)."""
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["complete"] and not result["lagging"] and not result["failed"], result
    assert len(result["workers"]) == 2, result
    assert {w["generation"] for w in result["workers"].values()} == {result["generation"]}
    return result


def predict(client: httpx.Client, i: int = 0, **body) -> dict:
    response = client.post("/predict", json={"text": TEXTS[i % len(TEXTS)], **body})
    assert response.status_code == 200, response.text
    return response.json()


def under_load(
    server, n_per_client: int, body: dict, during: Callable[[], None] | None = None
) -> tuple[list[str], list[str]]:
    """CLIENTS threads sending ``n_per_client`` /predict requests each (``during`` runs in this
    thread meanwhile): the versions that answered, and every failure."""
    versions: list[str] = []
    failures: list[str] = []
    lock = threading.Lock()
    started = threading.Barrier(CLIENTS + 1)

    def one_client(k: int) -> None:
        with server.client() as c:
            started.wait()
            for i in range(n_per_client):
                try:
                    r = c.post("/predict", json={"text": TEXTS[(k + i) % len(TEXTS)], **body})
                except httpx.HTTPError as exc:
                    with lock:
                        failures.append(repr(exc))
                    continue
                with lock:
                    if r.status_code == 200:
                        versions.append(r.json()["model_version"])
                    else:
                        failures.append(f"{r.status_code} {r.text[:200]}")

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [pool.submit(one_client, k) for k in range(CLIENTS)]
        started.wait()
        if during is not None:
            during()
        for f in futures:
            f.result()
    return versions, failures


def compare(client: httpx.Client, name: str = "sentiment") -> dict:
    response = client.get(f"/admin/models/{name}/compare", headers=AUTH)
    assert response.status_code == 200, response.text
    return response.json()


def pair(report: dict, primary: str, shadow: str) -> dict | None:
    found = [p for p in report["pairs"] if (p["primary"], p["shadow"]) == (primary, shadow)]
    return found[0] if found else None


def wait_for_comparisons(client: httpx.Client, at_least: int, timeout: float = 60) -> dict:
    """Poll the comparison until the (v1, v1canary) pair holds ``at_least`` requests (shadow runs
    finish after the answers)."""
    deadline = time.monotonic() + timeout
    while True:
        found = pair(compare(client), "sentiment:v1", "sentiment:v1canary")
        done = found is not None and found["requests"] + found["shadow_dropped"] >= at_least
        if done or time.monotonic() > deadline:
            return found or {}
        time.sleep(0.1)


# --- the split ---------------------------------------------------------------------------------


def test_an_80_20_split_routes_bare_names_by_weight(server, client) -> None:
    result = applied(
        admin(client, "traffic", {"name": "sentiment", "weights": {"v1": 80, "v1canary": 20}})
    )
    assert result["traffic"] == {"sentiment": {"v1": 80, "v1canary": 20}}
    try:
        # 2,000 requests without a key: half name the bare name, half name nothing (the default
        # model is the bare name "sentiment").
        def run(k: int) -> Counter:
            counts: Counter = Counter()
            with server.client() as c:
                for i in range(125):
                    body = {"model_version": "sentiment"} if i % 2 else {}
                    counts[predict(c, k + i, **body)["model_version"]] += 1
            return counts

        with ThreadPoolExecutor(16) as pool:
            counts = sum((f.result() for f in [pool.submit(run, k) for k in range(16)]), Counter())
        assert sum(counts.values()) == 2000
        assert set(counts) == {"sentiment:v1", "sentiment:v1canary"}
        share = counts["sentiment:v1canary"] / 2000
        assert 0.17 <= share <= 0.23, counts

        # An exact version is never re-routed.
        for i in range(40):
            assert predict(client, i, model_version="sentiment:v1")["model_version"] == (
                "sentiment:v1"
            )
            assert predict(client, i, model_version="sentiment:v1canary")["model_version"] == (
                "sentiment:v1canary"
            )
        # Other names are not split.
        assert predict(client, model_version="topic")["model_version"] == "topic:v1"
    finally:
        applied(admin(client, "traffic", {"name": "sentiment", "weights": {}}))
    for i in range(20):
        assert predict(client, i)["model_version"] == "sentiment:v1"


def test_a_routing_key_sticks_to_one_version(client) -> None:
    applied(admin(client, "traffic", {"name": "sentiment", "weights": {"v1": 50, "v1canary": 50}}))
    try:
        by_body = {predict(client, i, routing_key="user-7")["model_version"] for i in range(200)}
        assert len(by_body) == 1
        headers = {"X-Routing-Key": "user-7"}
        by_header = set()
        for i in range(50):
            r = client.post("/predict", json={"text": TEXTS[i % 5]}, headers=headers)
            by_header.add(r.json()["model_version"])
        assert by_header == by_body
        batch = client.post("/batch-predict", json={"texts": TEXTS, "routing_key": "user-7"}).json()
        assert {batch["model_version"]} == by_body
        # Keys spread over both versions.
        spread = {predict(client, routing_key=f"user-{i}")["model_version"] for i in range(40)}
        assert spread == {"sentiment:v1", "sentiment:v1canary"}
        too_long = client.post("/predict", json={"text": "x"}, headers={"X-Routing-Key": "k" * 300})
        assert too_long.status_code == 422
    finally:
        applied(admin(client, "traffic", {"name": "sentiment", "weights": {}}))


def test_changing_the_weights_under_32_clients_fails_no_request(server, client) -> None:
    changes = [
        {"v1": 80, "v1canary": 20},
        {"v1": 50, "v1canary": 50},
        {"v1": 0, "v1canary": 100},
        {"v1": 100, "v1canary": 0},
        {"v1": 20, "v1canary": 80},
        {},
    ]

    def change_weights() -> None:
        for weights in changes:
            applied(admin(client, "traffic", {"name": "sentiment", "weights": weights}))

    versions, failures = under_load(server, 30, {"model_version": "sentiment"}, change_weights)
    assert failures == []
    assert len(versions) == CLIENTS * 30
    assert set(versions) <= {"sentiment:v1", "sentiment:v1canary"}


# --- the shadow --------------------------------------------------------------------------------


def test_a_shadow_is_compared_and_never_answers(server, client) -> None:
    before = pair(compare(client), "sentiment:v1", "sentiment:v1canary") or {"requests": 0}
    result = applied(
        admin(client, "shadow", {"name": "sentiment", "version": "v1canary", "sample": 1.0})
    )
    assert result["shadows"] == {"sentiment": {"version": "v1canary", "sample": 1.0}}
    try:
        versions, failures = under_load(server, 20, {})
        assert failures == []
        assert versions == ["sentiment:v1"] * (CLIENTS * 20)  # every answer from the primary
        sent = CLIENTS * 20
        found = wait_for_comparisons(client, before["requests"] + sent)
        assert found["requests"] > before["requests"]
        # Every request was compared or (under load) dropped; none failed.
        assert found["requests"] + found["shadow_dropped"] >= before["requests"] + sent
        assert found["shadow_errors"] == 0
        # A copy of the primary agrees on every text, with the same probabilities.
        assert found["agreement_rate"] == 1.0
        assert found["mean_abs_probability_difference"] == 0.0
        assert found["labels"]["primary"] == found["labels"]["shadow"]
        assert sum(found["labels"]["primary"].values()) == found["comparisons"]
        assert found["latency"]["primary"]["p50_ms"] is not None
        assert found["latency"]["shadow"]["p50_ms"] is not None
        report = compare(client)
        assert (
            report["shadow"] == {"version": "v1canary", "sample": 1.0} and report["default"] == "v1"
        )
        # The same figures in /admin/stats and Prometheus.
        stats = client.get("/admin/stats", headers=AUTH).json()
        assert pair({"pairs": stats["comparisons"]}, "sentiment:v1", "sentiment:v1canary")
        metrics = client.get("/metrics").text
        labels = 'primary="sentiment:v1",shadow="sentiment:v1canary"'
        for name in ("comparisons_total", "agreements_total", "probability_difference_total"):
            assert f"mlserve_shadow_{name}{{{labels}}}" in metrics, name
        assert f'mlserve_shadow_runs_total{{outcome="error",{labels}}}' in metrics
    finally:
        applied(admin(client, "shadow", {"name": "sentiment", "version": None}))
    assert compare(client)["shadow"] is None


def test_unloading_the_shadow_under_load_fails_no_request(server, client) -> None:
    applied(admin(client, "shadow", {"name": "sentiment", "version": "v1canary", "sample": 1.0}))
    outcome: dict = {}

    def unload() -> None:
        # Let shadow work pile up first (no timing assertion: this only spreads the unload
        # into the load).
        wait_for_comparisons(client, 50)
        outcome["unload"] = applied(admin(client, "unload", {"tag": "sentiment:v1canary"}))

    try:
        versions, failures = under_load(server, 25, {}, unload)
        assert failures == []
        assert versions == ["sentiment:v1"] * (CLIENTS * 25)
        # Unloading the shadow version ends the shadow.
        assert outcome["unload"]["shadows"] == {}
        assert compare(client)["shadow"] is None
    finally:
        applied(admin(client, "load", {"tag": "sentiment:v1canary"}))


def test_promote_ends_the_split_and_the_shadow(client) -> None:
    applied(admin(client, "traffic", {"name": "sentiment", "weights": {"v1": 90, "v1canary": 10}}))
    applied(admin(client, "shadow", {"name": "sentiment", "version": "v1canary", "sample": 0.5}))
    promoted = applied(admin(client, "default", {"name": "sentiment", "version": "v1canary"}))
    assert promoted["traffic"] == {} and promoted["shadows"] == {}
    for i in range(10):
        assert predict(client, i)["model_version"] == "sentiment:v1canary"
    applied(admin(client, "default", {"name": "sentiment", "version": "v1"}))


def test_a_weighted_version_cannot_be_unloaded(client) -> None:
    applied(admin(client, "traffic", {"name": "sentiment", "weights": {"v1": 90, "v1canary": 10}}))
    try:
        refused = admin(client, "unload", {"tag": "sentiment:v1canary"})
        assert refused.status_code == 409, refused.text
        assert refused.json()["error"] == "model_state_conflict"
        assert "10%" in refused.json()["message"]
    finally:
        applied(admin(client, "traffic", {"name": "sentiment", "weights": {}}))


# --- refusals ----------------------------------------------------------------------------------

BAD = [
    ("traffic", {"name": "sentiment", "weights": {"v1": 80, "v1canary": 30}}, "sum to 100"),
    ("traffic", {"name": "sentiment", "weights": {"v1": 50}}, "sum to 100"),
    ("traffic", {"name": "sentiment", "weights": {"v1": 110, "v1canary": -10}}, None),
    ("traffic", {"name": "sentiment", "weights": {"v1": 90, "v2": 10}}, "not loaded"),
    ("traffic", {"name": "sentiment", "weights": {"v1": 90, "v9": 10}}, "not loaded"),
    ("traffic", {"name": "sentiment", "weights": {"v1": 90, "../x": 10}}, "not loaded"),
    ("traffic", {"name": "sentiment", "weights": {"v1": 90.5, "v1canary": 9.5}}, None),
    ("traffic", {"name": "nope", "weights": {"v1": 100}}, "no version"),
    ("traffic", {"name": "sentiment"}, None),
    ("shadow", {"name": "sentiment", "version": "v1"}, "primary"),
    ("shadow", {"name": "sentiment", "version": "v2"}, "not loaded"),
    ("shadow", {"name": "sentiment", "version": "v1canary", "sample": 0}, None),
    ("shadow", {"name": "sentiment", "version": "v1canary", "sample": 1.5}, None),
    ("shadow", {"name": "nope", "version": "v1"}, "no version"),
]


def test_bad_input_is_422_and_changes_nothing(client, audit_path: Path) -> None:
    before = client.get("/admin/models", headers=AUTH).json()["desired"]
    for route, body, words in BAD:
        response = admin(client, route, body)
        assert response.status_code == 422, (route, body, response.text)
        error = response.json()
        assert error["error"] == "validation_error" and "Traceback" not in response.text
        if words:
            assert words in error["message"], (body, error)
    assert client.get("/admin/models", headers=AUTH).json()["desired"] == before
    for i in range(10):
        assert predict(client, i)["model_version"] == "sentiment:v1"
    assert client.get("/admin/models/nope/compare", headers=AUTH).status_code == 404
    assert client.get("/admin/models/Bad%20Name/compare", headers=AUTH).status_code == 422
    assert client.get("/admin/models/sentiment/compare").status_code == 401


def test_changes_are_audited(client, audit_path: Path) -> None:
    applied(admin(client, "traffic", {"name": "sentiment", "weights": {"v1": 70, "v1canary": 30}}))
    applied(admin(client, "traffic", {"name": "sentiment", "weights": {}}))
    applied(admin(client, "shadow", {"name": "sentiment", "version": "v1canary", "sample": 0.25}))
    applied(admin(client, "shadow", {"name": "sentiment", "version": None}))
    entries = [json.loads(line) for line in audit_path.read_text().splitlines()]
    ours = [e for e in entries if e.get("action") in ("traffic", "shadow")][-4:]
    assert [(e["action"], e["result"], e["status"]) for e in ours] == [
        ("traffic", "ok", 200),
        ("traffic", "ok", 200),
        ("shadow", "ok", 200),
        ("shadow", "ok", 200),
    ]
    assert ours[0]["target"] == {"name": "sentiment", "weights": {"v1": 70, "v1canary": 30}}
    assert ours[2]["target"] == {"name": "sentiment", "version": "v1canary", "sample": 0.25}
    assert ours[3]["target"] == {"name": "sentiment", "version": None}
    refused = [e for e in entries if e.get("action") == "traffic" and e["result"] == "error"]
    assert refused and refused[-1]["status"] == 422  # the refusals of the test above


# --- the CLI workflow ----------------------------------------------------------------------------


def test_the_cli_runs_a_canary_and_a_shadow_and_promotes(server, client, model_env) -> None:
    env = {**model_env, "MLSERVE_ADMIN_TOKEN": TOKEN, "COLUMNS": "250"}

    def cli(*args: str) -> str:
        run = subprocess.run(
            [MLSERVE, *args, "--server", server.url],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert run.returncode == 0, run.stdout + run.stderr
        return run.stdout

    out = cli("canary", "sentiment:v1canary", "--weight", "10")
    assert "traffic sentiment: v1 90%, v1canary 10%" in out and "applied on all 2 workers" in out
    out = cli("shadow", "sentiment:v1canary", "--sample", "1")
    assert "shadow sentiment: sentiment:v1canary (sample 1)" in out
    for i in range(40):
        predict(client, i, model_version="sentiment:v1")
    wait_for_comparisons(client, 40)
    out = cli("compare", "sentiment")
    assert "traffic v1 90%, v1canary 10%" in out and "sentiment:v1canary" in out
    assert "100.00%" in out  # agreement of the copy
    assert "shadow comparison" in cli("stats")
    out = cli("canary", "sentiment:v1canary", "--weight", "0")  # roll back
    assert "traffic sentiment" not in out
    cli("shadow", "sentiment", "--off")
    cli("canary", "sentiment:v1canary", "--weight", "50")
    out = cli("promote", "sentiment:v1canary")
    assert "traffic" not in out and "shadow" not in out
    cli("promote", "sentiment:v1")


# --- across replicas ---------------------------------------------------------------------------


def test_two_replicas_sharing_redis_apply_the_same_split(start_server, models_dir: Path) -> None:
    port = _free_port()
    redis_proc = start_redis(port)
    env = {
        "MLSERVE_MODELS": ",".join(MODELS),
        "MLSERVE_REDIS_URL": f"redis://127.0.0.1:{port}/0",
        "MLSERVE_CACHE_ENABLED": "false",
        "MLSERVE_CONTROL_NAMESPACE": f"delivery-{uuid.uuid4().hex[:8]}",
        "MLSERVE_ADMIN_TOKEN": TOKEN,
        "MLSERVE_WORKERS": "1",  # two "hosts" of one worker each
    }
    a = start_server(ready=True, models_dir=models_dir, **env)
    b = start_server(ready=True, models_dir=models_dir, **env)
    try:
        with a.client() as ca, b.client() as cb:
            result = ca.post(
                "/admin/models/traffic",
                json={"name": "sentiment", "weights": {"v1": 50, "v1canary": 50}},
                headers=AUTH,
            )
            assert result.status_code == 200 and result.json()["complete"], result.text
            assert len(result.json()["workers"]) == 2  # one worker per replica
            keys = [f"customer-{i}" for i in range(40)]
            on_a = [predict(ca, i, routing_key=k)["model_version"] for i, k in enumerate(keys)]
            on_b = [predict(cb, i, routing_key=k)["model_version"] for i, k in enumerate(keys)]
            assert on_a == on_b
            assert set(on_a) == {"sentiment:v1", "sentiment:v1canary"}
            # A change through the other replica reaches the first.
            cleared = cb.post(
                "/admin/models/traffic", json={"name": "sentiment", "weights": {}}, headers=AUTH
            )
            assert cleared.status_code == 200 and cleared.json()["complete"], cleared.text
            assert {predict(ca, i, routing_key=k)["model_version"] for i, k in enumerate(keys)} == {
                "sentiment:v1"
            }
    finally:
        a.stop()
        b.stop()
        redis_proc.kill()
        redis_proc.wait()
