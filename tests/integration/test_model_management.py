"""Runtime model management against a real 2-worker server: load, default, unload, hot swaps
under load, refusals, failed loads, path attacks, auth on every admin route and the audit log."""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import yaml

from mlserve.admin import token_id
from mlserve.store import hash_directory
from tests.integration.conftest import linked_store

pytestmark = pytest.mark.integration

TOKEN = "model-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 32
SWAPS = 10
ADMIN_ROUTES = [
    ("GET", "/admin/stats", None),
    ("GET", "/admin/models", None),
    ("POST", "/admin/models/load", {"tag": "sentiment:v2"}),
    ("POST", "/admin/models/default", {"name": "sentiment", "version": "v1"}),
    ("POST", "/admin/models/unload", {"tag": "sentiment:v2"}),
]


def copy_version(models: Path, source: Path, name: str, version: str) -> Path:
    """A real copy of a stored model under another version (BentoML's model.yaml updated)."""
    target = models / name / version
    shutil.copytree(source, target, symlinks=False)
    info = yaml.safe_load((target / "model.yaml").read_text())
    info["version"] = version
    info["metadata"]["tag"] = f"{name}:{version}"
    (target / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    return target


@pytest.fixture(scope="module")
def models_dir(model_home: Path, tmp_path_factory) -> Path:
    """This module's store: the trained versions linked in, plus broken copies added here."""
    models = tmp_path_factory.mktemp("mm-store") / "models"
    linked_store(model_home, models)
    v1 = model_home / "models" / "sentiment" / "v1"
    # A byte changed after the checksums were recorded.
    tampered = copy_version(models, v1, "sentiment", "tampered")
    with (tampered / "calibration.json").open("a") as fh:
        fh.write(" ")
    # Checksums that match, but an estimator file that is not a model at all.
    corrupt = copy_version(models, v1, "sentiment", "corrupt")
    (corrupt / "estimator.skops").write_bytes(b"this is not a zip archive")
    info = yaml.safe_load((corrupt / "model.yaml").read_text())
    info["metadata"]["files"] = hash_directory(corrupt)
    (corrupt / "model.yaml").write_text(yaml.safe_dump(info, sort_keys=False))
    # A healthy extra version, to reach MLSERVE_MAX_LOADED_MODELS.
    copy_version(models, v1, "sentiment", "v1copy")
    return models


@pytest.fixture(scope="module")
def audit_path(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("audit") / "audit.jsonl"


@pytest.fixture(scope="module")
def server(start_server, models_dir: Path, audit_path: Path):
    server = start_server(
        ready=True,
        models_dir=models_dir,
        MLSERVE_MODELS="sentiment:v1,topic:v1",
        MLSERVE_WORKERS="2",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_AUDIT_LOG=str(audit_path),
        MLSERVE_MAX_LOADED_MODELS="3",
        # Every answer is computed by a model, so each one shows which model made it.
        MLSERVE_CACHE_ENABLED="false",
    )
    yield server
    server.stop()


@pytest.fixture
def client(server):
    with server.client() as c:
        yield c
        state = c.get("/admin/models", headers=AUTH).json()["desired"]
    # Each test leaves the server as it found it.
    assert state["models"] == ["sentiment:v1", "topic:v1"], state
    assert state["defaults"] == {"sentiment": "v1", "topic": "v1"}, state


def admin(client: httpx.Client, route: str, body: dict) -> httpx.Response:
    return client.post(f"/admin/models/{route}", json=body, headers=AUTH)


def assert_applied_everywhere(response: httpx.Response) -> dict:
    assert response.status_code == 200, response.text
    result = response.json()
    assert result["complete"] and not result["lagging"] and not result["failed"], result
    assert len(result["workers"]) == 2, result
    for worker in result["workers"].values():
        assert worker["generation"] == result["generation"]
        assert worker["loaded"] == result["models"]
        assert worker["defaults"] == result["defaults"]
    return result


def predict(client: httpx.Client, text: str, version: str | None = None) -> dict:
    response = client.post("/predict", json={"text": text, "model_version": version})
    assert response.status_code == 200, response.text
    return response.json()


# --- authentication -------------------------------------------------------------------------
@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
@pytest.mark.parametrize("header", [None, "Bearer wrong-token-wrong-token", f"Basic {TOKEN}"])
def test_every_admin_route_needs_the_token(client, method, path, body, header) -> None:
    headers = {"Authorization": header} if header else {}
    response = client.request(method, path, json=body, headers=headers)
    assert response.status_code == 401, response.text
    assert response.json()["error"] == "unauthorized"
    assert TOKEN not in response.text


@pytest.mark.parametrize("method,path,body", ADMIN_ROUTES)
def test_admin_routes_are_off_without_a_configured_token(default_server, method, path, body):
    with default_server.client() as c:
        response = c.request(method, path, json=body, headers=AUTH)
    assert response.status_code == 403
    assert response.json()["error"] == "admin_disabled"


ATTACKS = [
    "../x",
    "/etc/passwd",
    "http://evil.example/model.bentomodel",
    "file:///etc/passwd",
    "%2e%2e",
    "%2e%2e:v1",
    "sentiment:../v1",
    "sentiment:v1/../../x",
    "..:..",
    "Sentiment:V1",
    "sentiment:v1\n",
    "",
]


@pytest.mark.parametrize("tag", ATTACKS)
def test_loading_names_a_store_tag_only(client, tag) -> None:
    for route, body in (
        ("load", {"tag": tag, "make_default": True}),
        ("unload", {"tag": tag}),
        ("default", {"name": tag, "version": "v1"}),
        ("default", {"name": "sentiment", "version": tag}),
    ):
        response = admin(client, route, body)
        assert response.status_code == 422, (route, body, response.text)
        assert response.json()["error"] == "validation_error"
        assert "Traceback" not in response.text
    assert predict(client, "works fine")["model_version"] == "sentiment:v1"


def test_a_model_file_cannot_be_uploaded(client) -> None:
    response = client.post(
        "/admin/models/load",
        files={"file": ("evil.bentomodel", b"payload")},
        headers=AUTH,
    )
    assert response.status_code == 415


# --- load, default, unload ------------------------------------------------------------------
def test_load_make_default_and_unload_reach_every_worker(client) -> None:
    loaded = assert_applied_everywhere(admin(client, "load", {"tag": "sentiment:v2"}))
    assert loaded["models"] == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    assert loaded["defaults"]["sentiment"] == "v1"  # loaded, not yet the default
    # Both versions answer when named; the bare name still means v1.
    assert predict(client, "it helped", "sentiment:v2")["model_version"] == "sentiment:v2"
    assert predict(client, "it helped", "sentiment")["model_version"] == "sentiment:v1"

    promoted = assert_applied_everywhere(
        admin(client, "default", {"name": "sentiment", "version": "v2"})
    )
    assert promoted["generation"] > loaded["generation"]
    # Every worker now answers the bare name (and no name) with v2.
    for _ in range(10):
        assert predict(client, "it helped", "sentiment")["model_version"] == "sentiment:v2"
        assert predict(client, "it helped")["model_version"] == "sentiment:v2"

    assert_applied_everywhere(admin(client, "default", {"name": "sentiment", "version": "v1"}))
    assert_applied_everywhere(admin(client, "unload", {"tag": "sentiment:v2"}))
    response = client.post("/predict", json={"text": "x", "model_version": "sentiment:v2"})
    assert response.status_code == 404
    assert response.json()["error"] == "model_not_found"


def test_unload_refusals(client) -> None:
    default = admin(client, "unload", {"tag": "sentiment:v1"})
    assert default.status_code == 409 and default.json()["error"] == "model_state_conflict"
    assert "default" in default.json()["message"]
    only = admin(client, "unload", {"tag": "topic:v1"})  # topic's only, so default, version
    assert only.status_code == 409
    absent = admin(client, "unload", {"tag": "sentiment:v2"})
    assert absent.status_code == 404 and absent.json()["error"] == "model_not_found"
    # MLSERVE_MAX_LOADED_MODELS=3: a third version loads, a fourth is refused.
    assert_applied_everywhere(admin(client, "load", {"tag": "sentiment:v1copy"}))
    full = admin(client, "load", {"tag": "sentiment:v2"})
    assert full.status_code == 409 and "MLSERVE_MAX_LOADED_MODELS" in full.json()["message"]
    assert_applied_everywhere(admin(client, "unload", {"tag": "sentiment:v1copy"}))


@pytest.mark.parametrize(
    "tag,status,error",
    [
        ("sentiment:v9", 404, "model_not_found"),
        ("sentiment:tampered", 422, "model_integrity"),
        ("sentiment:corrupt", 422, "model_load_failed"),
    ],
)
def test_a_failed_load_keeps_the_old_version_serving(client, tag, status, error) -> None:
    before = client.get("/admin/models", headers=AUTH).json()
    response = admin(client, "load", {"tag": tag, "make_default": True})
    assert response.status_code == status, response.text
    body = response.json()
    assert body["error"] == error and tag in body["message"]
    assert "Traceback" not in response.text and "/models/" not in response.text
    after = client.get("/admin/models", headers=AUTH).json()
    assert after["desired"] == before["desired"]  # nothing was published
    for _ in range(6):
        assert predict(client, "no side effects at all")["model_version"] == "sentiment:v1"
    assert client.get("/ready").status_code == 200


# --- hot swaps under load -------------------------------------------------------------------
@pytest.fixture(scope="module")
def texts(drugscom) -> list[str]:
    reviews = [t for t in dict.fromkeys(drugscom.texts) if 40 <= len(t) <= 300]
    return reviews[:64]


def test_ten_swaps_under_load_fail_no_request(server, texts) -> None:
    with server.client() as c:
        assert_applied_everywhere(admin(c, "load", {"tag": "sentiment:v2"}))
        expected = {
            tag: {t: predict(c, t, tag) for t in texts} for tag in ("sentiment:v1", "sentiment:v2")
        }
        assert_applied_everywhere(admin(c, "unload", {"tag": "sentiment:v2"}))
    # The check has teeth: the two versions disagree on every text.
    for t in texts:
        p1 = expected["sentiment:v1"][t]["probabilities"]
        p2 = expected["sentiment:v2"][t]["probabilities"]
        assert max(abs(p1[k] - p2[k]) for k in p1) > 1e-3

    results, swaps = asyncio.run(swap_under_load(server.url, texts))

    failures = [r for r in results if r[0] != 200]
    assert not failures, f"{len(failures)} of {len(results)} requests failed: {failures[:5]}"
    by_version: dict[str, int] = {}
    for _, text, body in results:
        version = body["model_version"]
        by_version[version] = by_version.get(version, 0) + 1
        want = expected[version][text]
        got = np.array([body["probabilities"][k] for k in sorted(want["probabilities"])])
        ref = np.array([want["probabilities"][k] for k in sorted(want["probabilities"])])
        # The answer is the named version's own: the other version's would be far off.
        np.testing.assert_allclose(got, ref, atol=2e-4, err_msg=f"{version}: {text[:60]}")
        assert body["label"] == want["label"]
    assert by_version.get("sentiment:v1", 0) > 50 and by_version.get("sentiment:v2", 0) > 50
    assert len(swaps) == SWAPS
    assert all(s["complete"] for s in swaps)


async def swap_under_load(url: str, texts: list[str]) -> tuple[list, list]:
    """32 clients ask for the bare name 'sentiment' while v1 and v2 are swapped ten times."""
    results: list[tuple[int, str, dict | str]] = []
    done = asyncio.Event()
    limits = httpx.Limits(
        max_connections=CLIENTS + 2, max_keepalive_connections=CLIENTS, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as http:

        async def user(k: int) -> None:
            i = k
            while not done.is_set() and i < 40_000:
                text = texts[i % len(texts)]
                i += CLIENTS
                try:
                    r = await http.post(
                        "/predict", json={"text": text, "model_version": "sentiment"}
                    )
                except httpx.HTTPError as exc:
                    results.append((-1, text, repr(exc)))
                    continue
                results.append((r.status_code, text, r.json() if r.status_code == 200 else r.text))

        async def swapper() -> list[dict]:
            swaps, current = [], "v1"
            await asyncio.sleep(1.0)
            for _ in range(SWAPS):
                new = "v2" if current == "v1" else "v1"
                body = {"tag": f"sentiment:{new}", "make_default": True}
                r = await http.post("/admin/models/load", json=body, headers=AUTH)
                assert r.status_code == 200, r.text
                r = await http.post(
                    "/admin/models/unload", json={"tag": f"sentiment:{current}"}, headers=AUTH
                )
                assert r.status_code == 200, r.text
                swaps.append(r.json())
                current = new
                await asyncio.sleep(0.5)  # let traffic reach the new default
            return swaps

        users = [asyncio.create_task(user(k)) for k in range(CLIENTS)]
        try:
            swaps = await swapper()
        finally:
            done.set()
            await asyncio.gather(*users)
        # Ten swaps from v1 end on v1: the server is back as it started.
        state = (await http.get("/admin/models", headers=AUTH)).json()["desired"]
        assert state["defaults"]["sentiment"] == "v1" and "sentiment:v2" not in state["models"]
    return results, swaps


# --- observability and audit ----------------------------------------------------------------
def test_stats_show_each_workers_models(client) -> None:
    stats = client.get("/admin/stats", headers=AUTH).json()
    workers = stats["control"]["workers"]
    assert len(workers) == 2
    for record in workers.values():
        assert record["loaded"] == ["sentiment:v1", "topic:v1"]
        assert record["defaults"] == {"sentiment": "v1", "topic": "v1"}
        assert record["generation"] == stats["control"]["desired"]["generation"]


def test_the_audit_log_records_every_admin_action(client, audit_path: Path) -> None:
    admin(client, "load", {"tag": "sentiment:v9"})  # an error
    client.post("/admin/models/unload", json={"tag": "x:y"}, headers={"Authorization": "Bearer no"})
    assert_applied_everywhere(admin(client, "default", {"name": "sentiment", "version": "v1"}))
    raw = audit_path.read_text()
    assert TOKEN not in raw  # the token itself is never written
    entries = [json.loads(line) for line in raw.splitlines()]
    changes = [e for e in entries if e["action"] != "denied"]
    for entry in changes:
        assert {"ts", "actor", "action", "target", "result", "status", "worker"} <= set(entry)
        assert entry["actor"] == token_id(TOKEN)  # only authenticated calls are written in full
    last2 = changes[-2:]
    assert [(e["action"], e["result"], e["status"]) for e in last2] == [
        ("load", "error", 404),
        ("default", "ok", 200),
    ]
    assert last2[0]["target"] == {"tag": "sentiment:v9"} and last2[0]["error"] == "model_not_found"
    assert last2[1]["generation"] >= 1
    # Denied calls (this module's auth tests sent many) are summarised, never one line each.
    denials = [e for e in entries if e["action"] == "denied"]
    assert denials and all(e["client"] == "127.0.0.1" and e["count"] >= 1 for e in denials)
    # This module made 16+ denied calls within a few minutes; each worker writes at most one
    # line per client per minute.
    assert len(denials) < 16
    metrics = client.get("/metrics").text
    assert 'mlserve_admin_denied_total{reason="unauthorized",route="/admin/models/unload"}' in (
        metrics
    )
    # Every successful change so far was recorded, by both workers into the one file.
    assert {e["worker"] for e in changes if e["result"] == "ok"} and len(changes) >= 20


# --- the CLI against the running server -----------------------------------------------------
def test_cli_load_list_promote_unload_and_stats(server, client, models_dir, tmp_path) -> None:
    import subprocess

    from tests.integration.conftest import BENTOML, MLSERVE, clean_env

    home = tmp_path / "cli-home"
    home.mkdir()
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    env = clean_env(BENTOML_HOME=str(home), COLUMNS="250")

    def cli(*args: str, token: str | None = TOKEN, exe: str = MLSERVE):
        run_env = {**env, "MLSERVE_ADMIN_TOKEN": token} if token else env
        return subprocess.run(
            [exe, *args], env=run_env, capture_output=True, text=True, timeout=300, check=False
        )

    archive = tmp_path / "sentiment-v1.bentomodel"
    exported = cli("models", "export", "sentiment:v1", str(archive), exe=BENTOML)
    assert exported.returncode == 0, exported.stderr

    loaded = cli(
        "load", str(archive), "--tag", "sentiment:cli", "--server", server.url, "--make-default"
    )
    assert loaded.returncode == 0, loaded.stdout + loaded.stderr
    assert "stored sentiment:cli" in loaded.stdout and "applied on all 2 workers" in loaded.stdout
    assert predict(client, "some text")["model_version"] == "sentiment:cli"

    listed = cli("list", "--server", server.url)
    assert listed.returncode == 0, listed.stderr
    assert "workers" in listed.stdout and listed.stdout.count("sentiment:cli") >= 2

    promoted = cli("promote", "sentiment:v1", "--server", server.url)
    assert promoted.returncode == 0 and "applied on all 2 workers" in promoted.stdout
    assert predict(client, "some text")["model_version"] == "sentiment:v1"

    refused = cli("unload", "sentiment:v1", "--server", server.url)
    assert refused.returncode == 1 and "409" in refused.stderr and "default" in refused.stderr

    unloaded = cli("unload", "sentiment:cli", "--server", server.url)
    assert unloaded.returncode == 0, unloaded.stderr

    stats = cli("stats", "--server", server.url)
    assert stats.returncode == 0 and "workers" in stats.stdout

    no_token = cli("promote", "sentiment:v1", "--server", server.url, token=None)
    assert no_token.returncode == 1 and "MLSERVE_ADMIN_TOKEN" in no_token.stderr

    pickled = tmp_path / "model.pkl"
    pickled.write_bytes(b"\x80\x04K\x01.")  # pickle.dumps(1)
    refused_pickle = cli("load", str(pickled), "--tag", "sentiment:pkl")
    assert refused_pickle.returncode == 1 and "--trust-pickle" in refused_pickle.stderr


# --- connections ----------------------------------------------------------------------------
def test_keep_alive_connections_spread_over_both_workers(server, client) -> None:
    """24 keep-alive connections opened at once: asyncio lets one worker accept most of such a
    burst, so the busier worker closes its surplus (after full responses) until the two hold
    about half each. No request fails on the way. The load runs until the workers' heartbeats
    show the spread (at least 4 s, at most 40 s: each round of shedding waits for a heartbeat,
    and a loaded CI machine is slow)."""
    n_clients = 24

    def balanced(counts: list[int]) -> bool:
        return len(counts) == 2 and sum(counts) >= n_clients - 2 and counts[1] - counts[0] <= 4

    async def run() -> tuple[list[int], list[int], dict]:
        limits = httpx.Limits(max_connections=1, keepalive_expiry=2.0)
        clients = [
            httpx.AsyncClient(base_url=server.url, limits=limits, timeout=30.0)
            for _ in range(n_clients)
        ]
        statuses: list[int] = []
        stop = asyncio.Event()

        async def keep_asking(c: httpx.AsyncClient) -> None:
            while not stop.is_set():
                response = await c.post("/predict", json={"text": "It helped my migraines."})
                statuses.append(response.status_code)

        async def watch() -> tuple[list[int], dict]:
            # Heartbeats are read while the connections are active (they count for 2 s).
            async with httpx.AsyncClient(base_url=server.url, timeout=30.0) as admin:
                await asyncio.sleep(4.0)
                end = time.monotonic() + 36.0
                while True:
                    workers = (await admin.get("/admin/models", headers=AUTH)).json()["workers"]
                    counts = sorted(record["connections"] for record in workers.values())
                    if balanced(counts) or time.monotonic() > end:
                        stop.set()
                        return counts, workers
                    await asyncio.sleep(0.5)

        try:
            *_, (counts, workers) = await asyncio.gather(
                *(keep_asking(c) for c in clients), watch()
            )
        finally:
            for c in clients:
                await c.aclose()
        return statuses, counts, workers

    statuses, counts, workers = asyncio.run(run())
    assert statuses and set(statuses) == {200}
    assert balanced(counts), (counts, workers)
