"""The compose topology of issue #10, as real processes on one host: a Redis with the shipped
``deploy/redis/redis.conf``, two mlserve replicas sharing it and one control namespace, haproxy
in front of them (round-robin, health-checking ``/ready``) and a Prometheus with the shipped
``prometheus.yml`` (targets rewritten to the replicas) and ``alerts.yml``.

Load runs through the balancer while a new version is promoted through it: no request may fail,
and both replicas must serve the new default. Then every dashboard query and every alert
expression must return data from Prometheus, so a renamed metric or label, a wrong matcher or a
series that only appears after a failure shows up here and not on a blank dashboard.

How alert expressions are checked (they are comparisons, empty while everything is healthy):

1. the **left-hand side**: the expression with its final top-level comparison (``> 0.05``,
   ``== 0``, ``>= 1``) cut off (``lhs()``) must return data;
2. every **selector** in it (``metric{matchers}``, also inside ``or vector(0)`` fallbacks, which
   would hide a missing metric in step 1) must return data on its own, except selectors of
   failures a healthy run has none of (``HEALTHY_EMPTY``: the 5xx matcher); for those the
   selector without that matcher must return data.

``PENDING`` lists the alerts on metrics of issues not built yet (rate limiting); a test fails
as soon as such a metric is declared in ``mlserve/observability.py``, so the exception is
removed then.
"""

from __future__ import annotations

import asyncio
import importlib.util
import re
import subprocess
import time
import uuid
from pathlib import Path

import httpx
import pytest
import yaml

from tests.integration.conftest import Server, _free_port, _tail
from tests.integration.test_model_management import copy_version
from tests.unit.deploy_tools import DEPLOY, PENDING_COUNTERS, _declared, tool

pytestmark = pytest.mark.integration

TOKEN = "topology-admin-token-0123456789"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
CLIENTS = 16
LOAD_SECONDS = 15
PROMOTE_AFTER_S = 5
START_TIMEOUT_S = 30

# Alerts on metrics that cannot exist yet: alert name -> the pending metric it reads.
PENDING: dict[str, str] = {}  # alert -> metric of an issue not built yet (none left)
# Matchers that select failures: a healthy run has no such series (checked without them).
HEALTHY_EMPTY = [re.compile(r',?\s*status=~"5\.\."')]

REPEATED = [
    "This medication worked wonders, no side effects at all",
    "Terrible experience, the headaches got worse every day",
    "The stock market rallied after the central bank cut interest rates",
    "The striker scored twice in the second half to win the cup final",
]
TOPIC_TEXTS = [
    "The government announced a new budget with tax cuts for small firms",
    "The new smartphone has a faster chip and a better camera",
    "The film won three awards at the festival last night",
]


# --- processes ------------------------------------------------------------------------------
def _wait(check, what: str, proc: subprocess.Popen, log: Path, timeout: float = START_TIMEOUT_S):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"{what} exited with {proc.returncode}:\n{_tail(log)}", pytrace=False)
        try:
            if check():
                return
        except Exception:  # not up yet
            pass
        time.sleep(0.2)
    pytest.fail(f"{what} did not start within {timeout} s:\n{_tail(log)}", pytrace=False)


def _spawn(cmd: list[str], log: Path) -> subprocess.Popen:
    with log.open("wb") as out:
        return subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, cwd=log.parent)


def _stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def redis_config(tmp: Path) -> Path:
    """The shipped redis.conf, with its data directory moved into ``tmp``."""
    text = (DEPLOY / "redis" / "redis.conf").read_text()
    assert re.search(r"^dir /data$", text, re.M), "redis.conf no longer sets `dir /data`"
    data = tmp / "redis-data"
    data.mkdir()
    path = tmp / "redis.conf"
    path.write_text(re.sub(r"^dir /data$", f"dir {data}", text, flags=re.M))
    return path


def haproxy_config(port: int, replicas: list[str]) -> str:
    """Round-robin over the replicas; a replica gets traffic only while ``/ready`` is 200.

    ``http-server-close``: one backend connection per request, so haproxy never reuses a
    connection that uvicorn is closing (it drops idle keep-alive connections after 5 s)."""
    servers = "\n".join(
        f"    server r{i} {hostport} check inter 500ms fall 2 rise 1"
        for i, hostport in enumerate(replicas, 1)
    )
    return f"""global
    maxconn 512

defaults
    mode http
    option http-server-close
    timeout connect 2s
    timeout client 60s
    timeout server 60s

frontend api
    bind 127.0.0.1:{port}
    default_backend mlserve

backend mlserve
    balance roundrobin
    option httpchk GET /ready
    http-check expect status 200
{servers}
"""


def prometheus_config(port: int, replicas: list[str]) -> dict:
    """deploy/prometheus/prometheus.yml with 1 s intervals, this Prometheus' own port, the
    replicas as the `api` targets and alerts.yml by absolute path."""
    config = yaml.safe_load((DEPLOY / "prometheus" / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", scrape_timeout="1s", evaluation_interval="1s")
    assert config["rule_files"] == ["alerts.yml"]
    config["rule_files"] = [str(DEPLOY / "prometheus" / "alerts.yml")]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert set(jobs) == {"prometheus", "api"}, jobs
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{port}"]}]
    jobs["api"]["static_configs"] = [{"targets": replicas}]
    return config


def dashboard_queries() -> list[tuple[str, str]]:
    """``panel_queries()`` of deploy/grafana/build_dashboard.py (variables substituted there, as
    its own unit test uses them)."""
    path = DEPLOY / "grafana" / "build_dashboard.py"
    spec = importlib.util.spec_from_file_location("build_dashboard", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    queries = module.panel_queries()
    assert queries and all("$" not in q for _, q in queries), queries
    return queries


def alert_rules() -> dict[str, str]:
    groups = yaml.safe_load((DEPLOY / "prometheus" / "alerts.yml").read_text())["groups"]
    return {rule["alert"]: rule["expr"] for group in groups for rule in group["rules"]}


def lhs(expr: str) -> str:
    """The expression without its final top-level comparison (``X > 0.05`` -> ``X``)."""
    expr = " ".join(expr.split())
    match = re.fullmatch(r"(.+?)\s*(==|!=|>=|<=|>|<)\s*-?[0-9.]+", expr)
    assert match, f"no trailing comparison with a number in: {expr}"
    return match.group(1)


def conditions(expr: str) -> list[str]:
    """The top-level conditions of ``A > 1 and B > 0.1`` (one for a plain comparison)."""
    return re.split(r"\s+and\s+", " ".join(expr.split()))


def selectors(expr: str) -> set[str]:
    """Every instant selector of an mlserve metric or of `up`, with its matchers."""
    return {m.group(0) for m in re.finditer(r"\b(?:mlserve_[a-z_]+|up)\b(?:\{[^}]*\})?", expr)}


def healthy_form(selector: str) -> str:
    for pattern in HEALTHY_EMPTY:
        selector = pattern.sub("", selector)
    return selector.replace("{,", "{").replace("{}", "")


# --- the stack ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def models_dir(model_home: Path, tmp_path_factory) -> Path:
    """sentiment:v1 and topic:v1 linked in from the trained store, plus ``sentiment:v1b``, a real
    copy of v1 under a new version, to promote."""
    models = tmp_path_factory.mktemp("topology-store") / "models"
    for name in ("sentiment", "topic"):
        (models / name).mkdir(parents=True)
        (models / name / "v1").symlink_to(model_home / "models" / name / "v1")
    copy_version(models, model_home / "models" / "sentiment" / "v1", "sentiment", "v1b")
    return models


@pytest.fixture(scope="module")
def stack(start_server, models_dir: Path, tmp_path_factory):
    """Redis, two replicas, haproxy and Prometheus, all up and ready."""
    import redis

    binaries = {
        "redis-server": tool("redis-server"),
        "haproxy": tool("haproxy"),
        "prometheus": tool("prometheus"),
    }
    tmp = tmp_path_factory.mktemp("topology")
    procs: list[subprocess.Popen] = []
    replicas: list[Server] = []
    try:
        redis_port = _free_port()
        redis_log = tmp / "redis.log"
        cmd = [binaries["redis-server"], str(redis_config(tmp))]
        procs.append(_spawn([*cmd, "--port", str(redis_port), "--bind", "127.0.0.1"], redis_log))
        client = redis.Redis(port=redis_port, socket_timeout=1)
        _wait(client.ping, "redis-server", procs[-1], redis_log)
        assert client.config_get("maxmemory-policy")["maxmemory-policy"] == "volatile-lru"
        assert client.config_get("appendonly")["appendonly"] == "yes"

        env = {
            "MLSERVE_MODELS": "sentiment:v1,topic:v1",
            "MLSERVE_DEFAULT_MODEL": "sentiment",
            "MLSERVE_WORKERS": "2",
            "MLSERVE_REDIS_URL": f"redis://127.0.0.1:{redis_port}/0",
            "MLSERVE_CONTROL_BACKEND": "redis",
            "MLSERVE_CONTROL_NAMESPACE": f"topology-{uuid.uuid4().hex[:8]}",
            "MLSERVE_CACHE_PREFIX": f"topology-{uuid.uuid4().hex[:8]}",
            "MLSERVE_ADMIN_TOKEN": TOKEN,
            "MLSERVE_AUDIT_LOG": str(tmp / "audit.jsonl"),
            "MLSERVE_DRIFT_INTERVAL_SECONDS": "1",  # mlserve_drift_score soon after start
            # Generous: nothing is refused, but mlserve_rate_limited_total is exposed.
            "MLSERVE_RATE_LIMIT": "100000/second",
        }
        replicas.append(start_server(models_dir=models_dir, **env))
        replicas.append(start_server(models_dir=models_dir, **env))
        targets = [r.url.removeprefix("http://") for r in replicas]

        lb_port = _free_port()
        lb_cfg = tmp / "haproxy.cfg"
        lb_cfg.write_text(haproxy_config(lb_port, targets))
        subprocess.run([binaries["haproxy"], "-c", "-f", str(lb_cfg)], check=True, timeout=30)
        lb_log = tmp / "haproxy.log"
        procs.append(_spawn([binaries["haproxy"], "-db", "-f", str(lb_cfg)], lb_log))

        prom_port = _free_port()
        prom_cfg = tmp / "prometheus.yml"
        prom_cfg.write_text(yaml.safe_dump(prometheus_config(prom_port, targets)))
        prom_log = tmp / "prometheus.log"
        procs.append(
            _spawn(
                [
                    binaries["prometheus"],
                    f"--config.file={prom_cfg}",
                    f"--storage.tsdb.path={tmp / 'prometheus-data'}",
                    f"--web.listen-address=127.0.0.1:{prom_port}",
                ],
                prom_log,
            )
        )
        prom = f"http://127.0.0.1:{prom_port}"
        _wait(
            lambda: httpx.get(f"{prom}/-/ready", timeout=1).status_code == 200,
            "prometheus",
            procs[-1],
            prom_log,
        )

        # Both replicas ready behind the balancer: /ready through it, and /ready on each.
        balancer = f"http://127.0.0.1:{lb_port}"
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            states = []
            for server in replicas:
                try:
                    states.append(httpx.get(f"{server.url}/ready", timeout=2).status_code)
                except httpx.HTTPError:
                    states.append(None)
            if states == [200, 200]:
                break
            time.sleep(0.25)
        else:
            pytest.fail(f"replicas not ready: {states}\n{replicas[0].log()}", pytrace=False)
        _wait(
            lambda: httpx.get(f"{balancer}/ready", timeout=2).status_code == 200,
            "haproxy",
            procs[1],
            lb_log,
        )
        # haproxy's own health checks (every 500 ms) must see both replicas up.
        time.sleep(1.5)
        yield {"balancer": balancer, "prometheus": prom, "replicas": replicas, "redis": client}
    finally:
        for proc in reversed(procs):
            _stop(proc)
        for server in replicas:
            server.stop()


# --- the traffic ----------------------------------------------------------------------------
async def _client(base: str, n: int, stop_at: float, results: list) -> None:
    limits = httpx.Limits(max_connections=1, keepalive_expiry=2)
    async with httpx.AsyncClient(base_url=base, timeout=30, limits=limits) as http:
        i = 0
        while time.monotonic() < stop_at:
            i += 1
            kind = (n + i) % 4
            # Every other request repeats a text (cache hits); the rest are new (misses).
            text = REPEATED[i % len(REPEATED)] if i % 2 else f"client {n} request {i}: it helped"
            if kind == 0:
                route, body = "/predict", {"text": text}  # the default version of sentiment
            elif kind == 1:
                route, body = "/predict", {"text": TOPIC_TEXTS[i % 3], "model_version": "topic"}
            elif kind == 2:
                route, body = "/batch-predict", {"texts": [text, *REPEATED[:3]]}
            else:
                body = {"texts": [text, *TOPIC_TEXTS], "model_version": "topic:v1"}
                route = "/batch-predict"
            started = time.monotonic()
            try:
                response = await http.post(route, json=body)
                status, payload = response.status_code, response.json()
            except (httpx.HTTPError, ValueError) as exc:
                status, payload = repr(exc), None
            version = payload.get("model_version") if isinstance(payload, dict) else None
            results.append((started, route, body.get("model_version"), status, version))


async def _promote(base: str, at: float) -> tuple[float, httpx.Response, float]:
    await asyncio.sleep(max(0.0, at - time.monotonic()))
    async with httpx.AsyncClient(base_url=base, timeout=60) as http:
        sent = time.monotonic()
        response = await http.post(
            "/admin/models/load",
            json={"tag": "sentiment:v1b", "make_default": True},
            headers=AUTH,
        )
        return sent, response, time.monotonic()


async def _traffic(base: str) -> dict:
    start = time.monotonic()
    stop_at = start + LOAD_SECONDS
    results: list = []
    clients = [_client(base, n, stop_at, results) for n in range(CLIENTS)]
    *_, promotion = await asyncio.gather(*clients, _promote(base, start + PROMOTE_AFTER_S))
    return {"results": results, "promotion": promotion, "seconds": time.monotonic() - start}


@pytest.fixture(scope="module")
def traffic(stack) -> dict:
    """LOAD_SECONDS of load through the balancer with a promotion in the middle, plus a few
    requests that are refused on purpose (4xx: they feed mlserve_errors_total by type)."""
    out = asyncio.run(_traffic(stack["balancer"]))
    with httpx.Client(base_url=stack["balancer"], timeout=30) as http:
        out["refused"] = [
            http.post("/predict", json={"text": "   "}).status_code,
            http.post("/predict", json={"text": "x", "model_version": "nosuch:v1"}).status_code,
        ]
        # The old default shadows the new one for a few scrapes (the comparison panels).
        shadow = {"name": "sentiment", "version": "v1", "sample": 1.0}
        out["shadow"] = http.post("/admin/models/shadow", json=shadow, headers=AUTH).status_code
        until = time.monotonic() + 4
        while time.monotonic() < until:
            http.post("/predict", json={"text": REPEATED[0]})
        cleared = {"name": "sentiment", "version": None}
        out["shadow_cleared"] = http.post(
            "/admin/models/shadow", json=cleared, headers=AUTH
        ).status_code
    time.sleep(3)  # a few more scrapes and rule evaluations after the last request
    return out


def query(stack: dict, promql: str) -> list[dict]:
    response = httpx.get(
        f"{stack['prometheus']}/api/v1/query", params={"query": promql}, timeout=10
    )
    body = response.json()
    assert response.status_code == 200 and body["status"] == "success", (promql, body)
    return body["data"]["result"]


# --- the tests ------------------------------------------------------------------------------
def test_load_through_the_balancer_survives_a_promotion(stack, traffic) -> None:
    results = traffic["results"]
    failed = [r for r in results if r[3] != 200]
    assert not failed, f"{len(failed)} of {len(results)} requests failed: {failed[:10]}"
    assert len(results) > 100, len(results)
    print(f"{len(results)} requests in {traffic['seconds']:.1f} s through the balancer, 0 failed")
    assert traffic["refused"] == [422, 404]
    assert (traffic["shadow"], traffic["shadow_cleared"]) == (200, 200)

    sent, response, done = traffic["promotion"]
    assert response.status_code == 200, response.text
    promoted = response.json()
    assert promoted["complete"] and not promoted["lagging"] and not promoted["failed"], promoted
    assert promoted["defaults"]["sentiment"] == "v1b"
    assert len(promoted["workers"]) == 4, promoted["workers"]  # 2 replicas x 2 workers
    assert all(w["defaults"]["sentiment"] == "v1b" for w in promoted["workers"].values())

    # The bare name resolves to v1 before the change and to v1b once it is complete; topic
    # requests are untouched by it.
    bare = [r for r in results if r[2] is None]
    assert {r[4] for r in bare} <= {"sentiment:v1", "sentiment:v1b"}
    late = [r for r in bare if r[0] > done]
    assert late, "no sentiment request started after the promotion completed"
    assert all(r[4] == "sentiment:v1b" for r in late), [r for r in late if r[4] != "sentiment:v1b"][
        :5
    ]
    assert any(r[4] == "sentiment:v1" for r in bare if r[0] < sent)
    assert {r[4] for r in results if r[2]} == {"topic:v1"}

    # Each replica, asked directly, serves the promoted default on every worker.
    for server in stack["replicas"]:
        with server.client() as c:
            desired = c.get("/admin/models", headers=AUTH).json()["desired"]
            assert desired["defaults"] == {"sentiment": "v1b", "topic": "v1"}, desired
            for i in range(8):
                body = c.post("/predict", json={"text": f"direct {i}"}).json()
                assert body["model_version"] == "sentiment:v1b", body


def test_both_replicas_took_traffic_and_the_cache_hit(stack, traffic) -> None:
    per_replica = query(stack, 'sum by (instance) (mlserve_requests_total{route="/predict"})')
    assert len(per_replica) == 2, per_replica
    counts = [float(s["value"][1]) for s in per_replica]
    assert min(counts) > 0.25 * max(counts), per_replica  # round-robin, roughly even
    hit_ratio = query(
        stack,
        'sum(rate(mlserve_cache_total{event="hit"}[5m]))'
        ' / sum(rate(mlserve_cache_total{event=~"hit|miss"}[5m]))',
    )
    assert hit_ratio and 0 < float(hit_ratio[0]["value"][1]) < 1, hit_ratio
    assert len(query(stack, 'up{job="api"} == 1')) == 2


@pytest.mark.parametrize(
    "title,promql",
    dashboard_queries(),
    ids=[f"{t}:{i}" for i, (t, _) in enumerate(dashboard_queries())],
)
def test_every_dashboard_query_returns_data(stack, traffic, title: str, promql: str) -> None:
    assert query(stack, promql), f"panel {title!r}: no data for {promql}"


def _alerts() -> list[tuple[str, str]]:
    return [(name, expr) for name, expr in alert_rules().items() if name not in PENDING]


@pytest.mark.parametrize("name,expr", _alerts(), ids=[n for n, _ in _alerts()])
def test_every_alert_expression_reads_real_series(stack, traffic, name: str, expr: str) -> None:
    for condition in conditions(expr):
        side = lhs(condition)
        assert query(stack, side), f"{name}: no data for the left-hand side {side}"
    for selector in sorted(selectors(expr)):
        healthy = healthy_form(selector)
        assert query(stack, healthy), f"{name}: no series for {healthy} (from {selector})"


def test_the_rules_load_evaluate_and_none_fires(stack, traffic) -> None:
    body = httpx.get(f"{stack['prometheus']}/api/v1/rules", timeout=10).json()
    rules = {r["name"]: r for g in body["data"]["groups"] for r in g["rules"]}
    assert set(rules) == set(alert_rules()), rules.keys()
    for name, rule in rules.items():
        assert rule["health"] == "ok", (name, rule.get("lastError"))
    firing = query(stack, 'ALERTS{alertstate="firing"}')
    assert not firing, firing


def test_pending_exceptions_are_still_pending() -> None:
    """Remove an alert from PENDING once its metric exists (the test then checks it)."""
    declared = _declared()["counter"] | _declared()["gauge"] | _declared()["histogram"]
    assert set(PENDING.values()) <= PENDING_COUNTERS
    rules = alert_rules()
    for name, metric in PENDING.items():
        assert metric in rules[name], (name, metric)
        assert metric not in declared, (
            f"{metric} now exists in mlserve/observability.py: remove {name} from PENDING in "
            "tests/integration/test_topology.py (and from PENDING_COUNTERS in deploy_tools.py)"
        )


def test_lhs_and_selectors() -> None:
    assert conditions("a > 1\n  and\n b / c > 0.1") == ["a > 1", "b / c > 0.1"]
    assert lhs('up{job="api"} == 0') == 'up{job="api"}'
    assert lhs("max by (x) (mlserve_drift_score) > 0.2") == "max by (x) (mlserve_drift_score)"
    assert selectors("(sum(mlserve_model_loaded) or vector(0)) == 0") == {"mlserve_model_loaded"}
    assert healthy_form('mlserve_requests_total{route=~"/p", status=~"5.."}') == (
        'mlserve_requests_total{route=~"/p"}'
    )
    assert healthy_form('mlserve_requests_total{status=~"5.."}') == "mlserve_requests_total"
