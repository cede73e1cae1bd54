"""mlserve.settings: environment parsing and the validators that refuse unsafe settings."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from mlserve.settings import NAME_RE, TAG_RE, Settings, get_settings, is_loopback

pytestmark = pytest.mark.usefixtures("clean_env")

TOKEN = "s3cret-token-0123456789"  # 23 characters


def test_defaults() -> None:
    s = Settings(_env_file=None)
    assert s.models == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    assert s.default_versions == {"sentiment": "v1", "topic": "v1"}
    assert s.host == "127.0.0.1"
    assert s.admin_token is None
    assert s.admin_enabled is True
    assert s.cors_origins == []
    assert s.api_keys == []


def test_models_csv_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_MODELS", " sentiment:v2 , topic:v1,,sentiment:v1 ,")
    s = Settings(_env_file=None)
    assert s.models == ["sentiment:v2", "topic:v1", "sentiment:v1"]


def test_single_model_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_MODELS", "topic:2024-01-01_a.b")
    assert Settings(_env_file=None).models == ["topic:2024-01-01_a.b"]


def test_other_csv_fields_from_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_CORS_ORIGINS", "https://a.example, https://b.example")
    monkeypatch.setenv("MLSERVE_API_KEYS", "key-one-0123456789, key-two-0123456789")
    s = Settings(_env_file=None)
    assert s.cors_origins == ["https://a.example", "https://b.example"]
    assert s.api_keys == ["key-one-0123456789", "key-two-0123456789"]


def test_short_api_keys_and_an_admin_token_reused_as_a_key_are_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    with pytest.raises(ValueError, match="at least 16"):
        Settings(_env_file=None, api_keys=["short"])
    token = "admin-token-0123456789"
    with pytest.raises(ValueError, match="must not also be"):
        Settings(_env_file=None, api_keys=[token], admin_token=token)


def test_models_list_passed_directly() -> None:
    s = Settings(_env_file=None, models=["a:1", "b:2"])
    assert s.models == ["a:1", "b:2"]


def test_default_versions_picks_first_version_of_each_name(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLSERVE_MODELS", "topic:v3,sentiment:v2,topic:v1,sentiment:v9,spam:x")
    s = Settings(_env_file=None)
    assert s.default_versions == {"topic": "v3", "sentiment": "v2", "spam": "x"}
    assert list(s.default_versions) == ["topic", "sentiment", "spam"]


BAD_TAGS = [
    "../x",
    "/etc/passwd",
    "http://x",
    "%2e%2e",
    "Sentiment:V1",
    "sentiment:V1",
    "Sentiment:v1",
    "../x:v1",
    "sentiment:../v1",
    "sentiment:..",
    "a/b:v1",
    "sentiment:v1/../../x",
    "sentiment",
    "sentiment:",
    ":v1",
    "sentiment:v1:v2",
    "sentiment:v 1",
    "sentiment:v1?x=1",
    "sentiment:%2e%2e",
    "-sentiment:v1",
    "sentiment:v1-",
    "sentiment\\v1:v1",
    "x" * 64 + ":v1",
]


@pytest.mark.parametrize("tag", BAD_TAGS)
def test_bad_model_tags_from_env_refused(monkeypatch: pytest.MonkeyPatch, tag: str) -> None:
    monkeypatch.setenv("MLSERVE_MODELS", f"sentiment:v1,{tag}")
    with pytest.raises(pydantic.ValidationError) as info:
        Settings(_env_file=None)
    assert "not a name:version store tag" in str(info.value)
    assert TAG_RE.match(tag) is None


@pytest.mark.parametrize("tag", ["a:b", "sentiment:v1", "x" * 63 + ":" + "9" * 63, "a.b-c_d:1.0"])
def test_good_tags_accepted(tag: str) -> None:
    assert Settings(_env_file=None, models=[tag]).models == [tag]
    name = tag.split(":")[0]
    assert NAME_RE.match(name)


@pytest.mark.parametrize("token", ["short", "x" * 15])
def test_short_admin_token_refused(monkeypatch: pytest.MonkeyPatch, token: str) -> None:
    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", token)
    with pytest.raises(pydantic.ValidationError, match="at least 16 characters"):
        Settings(_env_file=None)


def test_sixteen_char_admin_token_accepted(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", "x" * 16)
    assert Settings(_env_file=None).admin_token == "x" * 16


def test_empty_admin_token_means_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", "")
    assert Settings(_env_file=None).admin_token is None


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "192.168.1.10", "example.com"])
def test_public_bind_with_admin_and_no_token_refused(
    monkeypatch: pytest.MonkeyPatch, host: str
) -> None:
    monkeypatch.setenv("MLSERVE_HOST", host)
    with pytest.raises(pydantic.ValidationError, match="MLSERVE_ADMIN_TOKEN") as info:
        Settings(_env_file=None)
    assert f"refusing to bind {host}" in str(info.value)


def test_public_bind_with_empty_token_refused(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", "")
    with pytest.raises(pydantic.ValidationError, match="refusing to bind"):
        Settings(_env_file=None)


def test_public_bind_with_token_allowed(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("MLSERVE_ADMIN_TOKEN", TOKEN)
    s = Settings(_env_file=None)
    assert s.host == "0.0.0.0"
    assert s.admin_token == TOKEN


@pytest.mark.parametrize("value", ["false", "0", "False"])
def test_public_bind_with_admin_disabled_allowed(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    monkeypatch.setenv("MLSERVE_HOST", "0.0.0.0")
    monkeypatch.setenv("MLSERVE_ADMIN_ENABLED", value)
    s = Settings(_env_file=None)
    assert s.admin_enabled is False
    assert s.admin_token is None


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "localhost", "::1"])
def test_loopback_bind_without_token_allowed(monkeypatch: pytest.MonkeyPatch, host: str) -> None:
    monkeypatch.setenv("MLSERVE_HOST", host)
    assert Settings(_env_file=None).host == host


@pytest.mark.parametrize(
    ("host", "expected"),
    [
        ("localhost", True),
        ("127.0.0.1", True),
        ("127.255.255.254", True),
        ("::1", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.1", False),
        ("localhost.evil.com", False),
        ("", False),
    ],
)
def test_is_loopback(host: str, expected: bool) -> None:
    assert is_loopback(host) is expected


def test_dotenv_in_working_directory_is_read(clean_env: Path) -> None:
    (clean_env / ".env").write_text("MLSERVE_PORT=4000\nMLSERVE_MODELS=topic:v2,topic:v1\n")
    s = Settings()
    assert s.port == 4000
    assert s.default_versions == {"topic": "v2"}
    # _env_file=None ignores it.
    assert Settings(_env_file=None).port == 3000


def test_environment_overrides_dotenv(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (clean_env / ".env").write_text("MLSERVE_PORT=4000\n")
    monkeypatch.setenv("MLSERVE_PORT", "5000")
    assert Settings().port == 5000


def test_bad_tag_in_dotenv_refused(clean_env: Path) -> None:
    (clean_env / ".env").write_text("MLSERVE_MODELS=../../etc:passwd\n")
    with pytest.raises(pydantic.ValidationError, match="not a name:version store tag"):
        Settings()


@pytest.mark.parametrize(
    ("var", "value"),
    [
        ("MLSERVE_PORT", "0"),
        ("MLSERVE_PORT", "70000"),
        ("MLSERVE_MAX_BATCH_SIZE", "0"),
        ("MLSERVE_DEVICE", "tpu"),
        ("MLSERVE_MAX_TOKENS", "4"),
    ],
)
def test_out_of_range_values_refused(monkeypatch: pytest.MonkeyPatch, var: str, value: str) -> None:
    monkeypatch.setenv(var, value)
    with pytest.raises(pydantic.ValidationError):
        Settings(_env_file=None)


def test_get_settings_is_cached_until_cleared(monkeypatch: pytest.MonkeyPatch) -> None:
    first = get_settings()
    monkeypatch.setenv("MLSERVE_PORT", "4321")
    assert get_settings() is first
    assert first.port == 3000
    get_settings.cache_clear()
    assert get_settings().port == 4321


def test_more_startup_models_than_the_loaded_limit_refused() -> None:
    with pytest.raises(pydantic.ValidationError, match="MLSERVE_MAX_LOADED_MODELS"):
        Settings(models=["a:v1", "a:v2", "b:v1"], max_loaded_models=2)
    assert Settings(models=["a:v1", "a:v2"], max_loaded_models=2).max_loaded_models == 2


def test_redis_control_backend_needs_a_redis_url() -> None:
    with pytest.raises(pydantic.ValidationError, match="MLSERVE_REDIS_URL"):
        Settings(control_backend="redis")
    assert Settings(control_backend="redis", redis_url="redis://127.0.0.1:6379/0")


def test_auto_workers_one_per_core_on_cpu_and_one_on_gpu(monkeypatch: pytest.MonkeyPatch) -> None:
    import mlserve.settings as settings_module

    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 2)
    monkeypatch.setattr(settings_module, "gpu_present", lambda: False)
    auto = Settings(_env_file=None)
    assert auto.workers == 0 and auto.effective_workers == 2
    assert auto.effective_torch_threads == 1  # its core, shared with its event loop
    assert Settings(_env_file=None, device="cuda").effective_workers == 1
    assert Settings(_env_file=None, workers=3).effective_workers == 3
    monkeypatch.setattr(settings_module.os, "cpu_count", lambda: 64)
    assert Settings(_env_file=None).effective_workers == 8
    monkeypatch.setattr(settings_module, "gpu_present", lambda: True)
    assert Settings(_env_file=None).effective_workers == 1
    assert Settings(_env_file=None, device="cpu").effective_workers == 8
