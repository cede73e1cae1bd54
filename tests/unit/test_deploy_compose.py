"""deploy/compose.yaml validates against the Compose specification (check-jsonschema's vendored
schema), binds every published port to 127.0.0.1, health-checks every service and waits on
health; deploy/redis/redis.conf keeps the control state (a real redis-server reads it)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from tests.unit.deploy_tools import DEPLOY

COMPOSE = DEPLOY / "compose.yaml"
REDIS_CONF = DEPLOY / "redis" / "redis.conf"


def compose() -> dict:
    return yaml.safe_load(COMPOSE.read_text())


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.compose-spec"]
    return subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60)


def test_compose_file_matches_the_compose_spec(tmp_path: Path) -> None:
    out = check_jsonschema(COMPOSE)
    assert out.returncode == 0, out.stdout + out.stderr
    # The schema is strict: a misspelt key fails.
    bad = compose()
    bad["services"]["api"]["healthchek"] = bad["services"]["api"].pop("healthcheck")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(bad))
    assert check_jsonschema(tmp_path / "compose.yaml").returncode != 0


def test_services() -> None:
    services = compose()["services"]
    assert set(services) == {"api", "redis", "prometheus", "grafana"}
    assert services["api"]["image"].endswith("localhost/mlserve:slim}")
    assert services["grafana"]["image"].startswith("grafana/grafana:")


def test_published_ports_bind_loopback_only() -> None:
    published = 0
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert isinstance(port, str), f"{name}: use the short 'IP:HOST:CONTAINER' form"
            assert port.startswith("127.0.0.1:"), f"{name} publishes {port} on every interface"
            published += 1
    assert published == 3  # api, prometheus, grafana; redis stays on the compose network


def test_every_service_is_health_checked_and_waited_on() -> None:
    services = compose()["services"]
    for name, service in services.items():
        check = service.get("healthcheck")
        assert check and check["test"] and not check.get("disable"), name
        for dependency, condition in service.get("depends_on", {}).items():
            assert dependency in services
            assert condition == {"condition": "service_healthy"}, (name, dependency)
    assert "redis" in services["api"]["depends_on"]
    assert "prometheus" in services["grafana"]["depends_on"]
    assert "/ready" in " ".join(services["api"]["healthcheck"]["test"])


def test_secrets_come_from_the_environment() -> None:
    api = compose()["services"]["api"]
    env = api["environment"]
    assert env["MLSERVE_ADMIN_TOKEN"].startswith("${MLSERVE_ADMIN_TOKEN:?")
    assert env["MLSERVE_API_KEYS"].startswith("${MLSERVE_API_KEYS")
    assert api["env_file"] == [{"path": "../.env", "required": False}]
    grafana = compose()["services"]["grafana"]["environment"]
    assert grafana["GF_SECURITY_ADMIN_PASSWORD"].startswith("${GRAFANA_ADMIN_PASSWORD:?")


def test_api_is_locked_down() -> None:
    api = compose()["services"]["api"]
    assert api["read_only"] is True
    assert api["cap_drop"] == ["ALL"]
    assert "no-new-privileges:true" in api["security_opt"]
    assert "/tmp" in api["tmpfs"]
    assert int(api["stop_grace_period"].rstrip("s")) > 20  # MLSERVE_DRAIN_SECONDS


def test_mounts_point_at_files_that_exist() -> None:
    services = compose()["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (DEPLOY / source).exists(), f"{name}: {source}"
    assert "./redis/redis.conf:/usr/local/etc/redis/redis.conf:ro" in services["redis"]["volumes"]
    assert "./prometheus:/etc/prometheus:ro" in services["prometheus"]["volumes"]


def redis_conf() -> dict[str, str]:
    return dict(
        line.split(None, 1)
        for line in REDIS_CONF.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    )


def test_redis_conf_cannot_evict_or_forget_the_control_state() -> None:
    conf = redis_conf()
    assert conf["maxmemory-policy"] == "volatile-lru"  # only keys with a TTL are evicted
    assert conf["maxmemory"] not in ("0", "")
    assert conf["appendonly"] == "yes"
    assert conf["appendfsync"] in ("everysec", "always")
    assert conf["dir"] == "/data"


def test_a_real_redis_server_runs_the_conf(tmp_path: Path) -> None:
    """redis-server parses the file and applies it (dir and port moved for the test), and a key
    without a TTL (like the control state) survives a restart through the append-only file."""
    server = shutil.which("redis-server")
    if not server:
        if os.environ.get("CI") == "true":
            pytest.fail("no redis-server binary (run_tests.sh needs one)")
        pytest.skip("no redis-server binary")
    import redis

    conf = REDIS_CONF.read_text().replace("dir /data", f"dir {tmp_path}")
    (tmp_path / "redis.conf").write_text(conf)
    sock = tmp_path / "redis.sock"

    def start() -> subprocess.Popen[str]:
        proc = subprocess.Popen(
            [server, str(tmp_path / "redis.conf"), "--port", "0", "--unixsocket", str(sock)],
            cwd=tmp_path,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for _ in range(200):
            if sock.exists() or proc.poll() is not None:
                break
            time.sleep(0.025)
        assert proc.poll() is None, proc.stdout.read()
        return proc

    def stop(proc: subprocess.Popen[str]) -> None:
        proc.terminate()  # SIGTERM: Redis flushes the AOF and exits
        proc.wait(timeout=10)

    proc = start()
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, decode_responses=True)
        assert client.config_get("maxmemory-policy") == {"maxmemory-policy": "volatile-lru"}
        assert client.config_get("appendonly") == {"appendonly": "yes"}
        assert int(client.config_get("maxmemory")["maxmemory"]) == 256 * 1024**2
        client.set("mlserve:control:state", '{"generation": 7}')  # no TTL, as the control state
        client.set("mlserve:sentiment:v1:abc", "{}", ex=3600)  # a cache entry
        client.close()
    finally:
        stop(proc)
    assert (tmp_path / "appendonlydir").is_dir()
    proc = start()
    try:
        client = redis.Redis(unix_socket_path=str(sock), socket_timeout=2, decode_responses=True)
        assert client.get("mlserve:control:state") == '{"generation": 7}'
        assert client.ttl("mlserve:control:state") == -1
        client.close()
    finally:
        stop(proc)


def test_the_api_reads_the_shipped_config_file() -> None:
    compose = yaml.safe_load(COMPOSE.read_text())
    api = compose["services"]["api"]
    (mount,) = api["configs"]
    source = compose["configs"][mount["source"]]["file"]
    assert (COMPOSE.parent / source).resolve() == (DEPLOY / "config" / "config.yaml").resolve()
    assert api["environment"]["MLSERVE_CONFIG_FILE"] == mount["target"]
