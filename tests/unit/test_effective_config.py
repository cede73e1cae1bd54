"""mlserve.config: the effective configuration (sources, masking), `mlserve config show` and the
example configuration file kept in sync with the Settings class."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from mlserve.cli import app
from mlserve.config import MASK, effective_config, example_yaml, mask_url, render_yaml
from mlserve.settings import Settings

pytestmark = pytest.mark.usefixtures("clean_env")

EXAMPLE = Path(__file__).resolve().parents[2] / "config.example.yaml"
TOKEN = "s3cret-token-0123456789"
KEY = "api-key-0123456789abc"


# --- the example file ----------------------------------------------------------------------------


def test_the_example_file_is_generated_from_the_settings_class() -> None:
    assert EXAMPLE.read_text() == example_yaml(), (
        "config.example.yaml is out of date: run `mlserve config example > config.example.yaml`"
    )


def test_the_example_lists_every_field_with_its_default(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_CONFIG_FILE", str(EXAMPLE))
    from_example = Settings()
    defaults = Settings(config_file="")
    for field in Settings.model_fields:
        if field == "config_file":
            continue
        assert from_example.value_source(field) == "file", f"{field} missing from the example"
        assert getattr(from_example, field) == getattr(defaults, field), field


def test_every_field_description_is_in_the_example() -> None:
    text = " ".join(line.strip("# ") for line in EXAMPLE.read_text().splitlines())
    for name, field in Settings.model_fields.items():
        if name != "config_file":
            assert f"[MLSERVE_{name.upper()}]" in text
            assert " ".join(field.description.split()[:4]) in text


# --- masking -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("redis://:hunter2@cache:6379/0", "redis://:***@cache:6379/0"),
        ("redis://app:hunter2@cache:6379/0", "redis://app:***@cache:6379/0"),
        ("rediss://app:p%40ss@cache/1", "rediss://app:***@cache/1"),
        ("redis://cache:6379/0?password=hunter2&db=1", "redis://cache:6379/0?password=***&db=1"),
        ("redis://cache:6379/0", "redis://cache:6379/0"),
        ("redis://app@cache:6379/0", "redis://app@cache:6379/0"),
        ("unix:///run/redis.sock", "unix:///run/redis.sock"),
        ("unix:///run/redis.sock?password=hunter2", "unix:///run/redis.sock?password=***"),
    ],
)
def test_mask_url(url: str, shown: str) -> None:
    assert mask_url(url) == shown


def test_effective_config_masks_secrets_and_names_sources(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    path = Path("config.yaml").absolute()
    path.write_text(
        "batching: {max_batch_size: 8}\n"
        f"admin: {{token: {TOKEN}}}\n"
        "cache: {redis_url: 'redis://:hunter2@cache:6379/0', ttl_seconds: 60}\n"
    )
    Path(".env").write_text("MLSERVE_CACHE_TTL_SECONDS=90\n")
    monkeypatch.setenv("MLSERVE_API_KEYS", f"{KEY},{KEY}x")
    config = effective_config(Settings(seed=5))
    assert config["config_file"] == str(path)
    values, sources = config["values"], config["sources"]
    assert values["batching"]["max_batch_size"] == 8
    assert sources["batching"]["max_batch_size"] == "file"
    assert (values["cache"]["ttl_seconds"], sources["cache"]["ttl_seconds"]) == (90, "dotenv")
    assert (values["training"]["seed"], sources["training"]["seed"]) == (5, "init")
    assert (values["http"]["api_keys"], sources["http"]["api_keys"]) == ([MASK, MASK], "env")
    assert (values["admin"]["token"], sources["admin"]["token"]) == (MASK, "file")
    assert values["cache"]["redis_url"] == "redis://:***@cache:6379/0"
    assert (values["models"], sources["models"]) == (
        ["sentiment:v1", "sentiment:v2", "topic:v1"],
        "default",
    )
    text = json.dumps(config)
    assert TOKEN not in text and KEY not in text and "hunter2" not in text


def test_unset_secrets_stay_null() -> None:
    values = effective_config(Settings())["values"]
    assert values["admin"]["token"] is None
    assert values["cache"]["redis_url"] is None
    assert values["http"]["api_keys"] == []


def test_render_yaml_is_the_same_configuration_with_sources_as_comments() -> None:
    Path("config.yaml").write_text("cache: {ttl_seconds: 60}\n")
    config = effective_config(Settings(admin_token=TOKEN))
    text = render_yaml(config)
    assert yaml.safe_load(text) == config["values"]
    lines = text.splitlines()
    assert any(line.startswith("  ttl_seconds: 60") and line.endswith("# file") for line in lines)
    assert any(line.startswith("  token: '***'") and line.endswith("# init") for line in lines)
    assert f"# configuration file: {Path('config.yaml').absolute()}" in lines


# --- mlserve config ------------------------------------------------------------------------------


def test_cli_config_show(monkeypatch: pytest.MonkeyPatch) -> None:
    Path("config.yaml").write_text(f"batching: {{max_batch_size: 8}}\nadmin: {{token: {TOKEN}}}\n")
    monkeypatch.setenv("MLSERVE_CACHE_TTL_SECONDS", "30")
    result = CliRunner().invoke(app, ["config", "show"])
    assert result.exit_code == 0, result.output
    assert TOKEN not in result.output
    shown = yaml.safe_load(result.output)
    assert shown["batching"]["max_batch_size"] == 8
    assert shown["cache"]["ttl_seconds"] == 30
    assert shown["admin"]["token"] == MASK
    lines = result.output.splitlines()
    assert any("max_batch_size: 8" in line and line.endswith("# file") for line in lines)
    assert any("ttl_seconds: 30" in line and line.endswith("# env") for line in lines)

    result = CliRunner().invoke(app, ["config", "show", "--json"])
    assert result.exit_code == 0, result.output
    assert json.loads(result.output)["sources"]["cache"]["ttl_seconds"] == "env"


def test_cli_config_show_other_file_and_errors() -> None:
    Path("other.yaml").write_text("cache: {ttl_seconds: 0}\n")
    result = CliRunner().invoke(app, ["config", "show", "--file", "other.yaml"])
    assert result.exit_code == 1
    assert "line 1, key cache.ttl_seconds" in result.output


def test_cli_config_example_prints_the_example() -> None:
    result = CliRunner().invoke(app, ["config", "example"])
    assert result.exit_code == 0
    assert result.output == example_yaml()


# --- GET /admin/config ---------------------------------------------------------------------------


def _client(settings: Settings):
    from types import SimpleNamespace

    from starlette.testclient import TestClient

    from mlserve.admin import AdminAudit
    from mlserve.http import create_app
    from mlserve.ratelimit import RateLimiter

    core = SimpleNamespace(
        settings=settings,
        balancer=SimpleNamespace(seen=lambda client: False),
        audit=AdminAudit(settings, "test:1"),
        rate_limiter=RateLimiter("", ""),
    )
    return TestClient(create_app(lambda: core))


def test_admin_config_route() -> None:
    Path("config.yaml").write_text("batching: {max_batch_size: 8}\n")
    client = _client(Settings(admin_token=TOKEN, api_keys=[KEY]))
    assert client.get("/admin/config").status_code == 401
    bad = client.get("/admin/config", headers={"Authorization": f"Bearer {KEY}"})
    assert bad.status_code == 401
    response = client.get("/admin/config", headers={"Authorization": f"Bearer {TOKEN}"})
    assert response.status_code == 200
    body = response.json()
    assert body["values"]["batching"]["max_batch_size"] == 8
    assert body["sources"]["batching"]["max_batch_size"] == "file"
    assert body["values"]["admin"]["token"] == MASK
    assert TOKEN not in response.text and KEY not in response.text


def test_admin_config_route_is_off_without_a_token() -> None:
    response = _client(Settings()).get("/admin/config", headers={"Authorization": "Bearer x"})
    assert response.status_code == 403


def test_cli_serve_hands_the_file_read_here_to_the_workers(monkeypatch: pytest.MonkeyPatch) -> None:
    """The workers import the service from the project folder; they get the file read here."""
    import mlserve.supervisor

    seen: dict = {}
    monkeypatch.setattr(
        mlserve.supervisor, "run", lambda cmd, env, drain: seen.update(env=env, drain=drain) or 0
    )
    path = Path("config.yaml").absolute()
    path.write_text("cache: {ttl_seconds: 5}\nhttp: {drain_seconds: 7}\n")
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    assert seen["env"]["MLSERVE_CONFIG_FILE"] == str(path)
    assert seen["drain"] == 7  # the supervisor forces what is left after the workers' drain
    path.unlink()
    assert CliRunner().invoke(app, ["serve"]).exit_code == 0
    assert seen["env"]["MLSERVE_CONFIG_FILE"] == ""
    path.write_text("cache: {ttl_seconds: 0}\n")
    result = CliRunner().invoke(app, ["serve"])
    assert result.exit_code == 1
    assert "key cache.ttl_seconds" in result.output


def test_cli_config_show_server(monkeypatch: pytest.MonkeyPatch) -> None:
    import functools

    import httpx

    import mlserve.client

    config = effective_config(Settings(admin_token=TOKEN, max_batch_size=4))
    calls = []

    def handler(request: httpx.Request) -> httpx.Response:
        calls.append((str(request.url), request.method, request.headers["authorization"]))
        return httpx.Response(200, json=config)

    client = functools.partial(mlserve.client.Client, transport=httpx.MockTransport(handler))
    monkeypatch.setattr(mlserve.client, "Client", client)
    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", TOKEN)
    result = CliRunner().invoke(app, ["config", "show", "--server", "http://srv:3000"])
    assert result.exit_code == 0, result.output
    assert calls == [("http://srv:3000/admin/config", "GET", f"Bearer {TOKEN}")]
    assert result.output == render_yaml(config)
    assert yaml.safe_load(result.output)["batching"]["max_batch_size"] == 4
