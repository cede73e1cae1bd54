"""The configuration file: its mapping onto the fields, the precedence of every source, and the
errors that name the file, the key and the line."""

from __future__ import annotations

from pathlib import Path

import pydantic
import pytest

from mlserve.settings import (
    SECTIONS,
    TOP_LEVEL,
    ConfigFileError,
    Settings,
    file_key,
    get_settings,
)

pytestmark = pytest.mark.usefixtures("clean_env")

TOKEN = "s3cret-token-0123456789"


def write(text: str, name: str = "config.yaml") -> Path:
    path = Path(name).absolute()
    path.write_text(text)
    return path


# --- the mapping -------------------------------------------------------------------------------


def test_no_file_means_defaults() -> None:
    s = Settings()
    assert s.config_file_read is None
    assert s.max_batch_size == 64
    assert s.value_source("max_batch_size") == "default"


def test_sections_map_to_the_flat_fields() -> None:
    path = write(
        "models: [sentiment:v1, topic:v1]\n"
        "batching:\n"
        "  max_batch_size: 8\n"
        "  max_latency_ms: 2.5\n"
        "cache:\n"
        "  enabled: false\n"
        "  ttl_seconds: 60\n"
        "  max_size: 500\n"
        "  redis_url: redis://cache:6379/0\n"
        "admin:\n"
        "  token: " + TOKEN + "\n"
        "control: {backend: file, timeout_seconds: 5}\n"
        "drift: {window: 50, min_window: 20}\n"
        "http: {cors_origins: [https://a.example], port: 8080}\n"
    )
    s = Settings()
    assert s.config_file_read == str(path)
    assert s.models == ["sentiment:v1", "topic:v1"]
    assert (s.max_batch_size, s.max_latency_ms) == (8, 2.5)
    assert (s.cache_enabled, s.cache_ttl_seconds, s.cache_max_size) == (False, 60, 500)
    assert s.redis_url == "redis://cache:6379/0"
    assert s.admin_token == TOKEN
    assert (s.control_backend, s.control_timeout_seconds) == ("file", 5)
    assert (s.drift_window, s.drift_min_window) == (50, 20)
    assert (s.cors_origins, s.port) == (["https://a.example"], 8080)
    assert s.value_source("cache_ttl_seconds") == "file"
    assert s.file_location("cache_ttl_seconds") == ("cache.ttl_seconds", 7)
    assert s.file_location("models") == ("models", 1)
    assert s.value_source("seed") == "default"


def test_flat_field_names_work_at_the_top_level_and_in_their_section() -> None:
    write("cache_ttl_seconds: 5\nmax_batch_size: 4\nadmin:\n  admin_enabled: false\n")
    s = Settings()
    assert (s.cache_ttl_seconds, s.max_batch_size, s.admin_enabled) == (5, 4, False)


def test_a_comma_separated_string_works_for_lists() -> None:
    write("models: 'topic:v1, sentiment:v2'\n")
    assert Settings().models == ["topic:v1", "sentiment:v2"]


def test_an_empty_file_and_an_empty_section_set_nothing() -> None:
    write("")
    assert Settings().max_batch_size == 64
    write("# only a comment\ncache:\n")
    assert Settings().cache_ttl_seconds == 3600


def test_every_field_has_one_place_in_the_file() -> None:
    placed = list(TOP_LEVEL) + [f for fields in SECTIONS.values() for f in fields]
    assert sorted(placed) == sorted(f for f in Settings.model_fields if f != "config_file")
    assert not set(SECTIONS) & set(Settings.model_fields)  # a section never shadows a field
    keys = [file_key(f) for f in placed]
    assert len(keys) == len(set(keys))


# --- which file ----------------------------------------------------------------------------------


def test_mlserve_config_file_names_another_file(monkeypatch: pytest.MonkeyPatch) -> None:
    write("max_batch_size: 2\n")  # the default file, not read when another one is named
    other = write("max_batch_size: 3\n", "other.yaml")
    monkeypatch.setenv("MLSERVE_CONFIG_FILE", str(other))
    s = Settings()
    assert (s.max_batch_size, s.config_file_read) == (3, str(other))
    assert s.value_source("config_file") == "env"


def test_config_file_from_dotenv_and_init() -> None:
    write("max_batch_size: 3\n", "from-dotenv.yaml")
    write("max_batch_size: 4\n", "from-init.yaml")
    Path(".env").write_text("MLSERVE_CONFIG_FILE=from-dotenv.yaml\n")
    assert Settings().max_batch_size == 3
    assert Settings(config_file="from-init.yaml").max_batch_size == 4


def test_a_named_file_must_exist_but_the_default_need_not(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MLSERVE_CONFIG_FILE", "config.yaml")
    assert Settings().config_file_read is None
    monkeypatch.setenv("MLSERVE_CONFIG_FILE", "/nonexistent/mlserve.yaml")
    with pytest.raises(ConfigFileError, match=r"/nonexistent/mlserve\.yaml: .*not found"):
        Settings()


def test_an_empty_name_reads_no_file(monkeypatch: pytest.MonkeyPatch) -> None:
    write("max_batch_size: 2\n")
    monkeypatch.setenv("MLSERVE_CONFIG_FILE", "")
    assert Settings().max_batch_size == 64


# --- precedence ----------------------------------------------------------------------------------

LEVELS = ["init", "env", "dotenv", "file"]
VALUES = {"init": 32, "env": 24, "dotenv": 16, "file": 8}


@pytest.mark.parametrize("top", range(len(LEVELS) + 1), ids=[*LEVELS, "default"])
def test_precedence_init_env_dotenv_file_default(monkeypatch: pytest.MonkeyPatch, top: int) -> None:
    """Every source from ``top`` down sets max_batch_size (and cache.ttl_seconds); the highest
    one wins."""
    present = LEVELS[top:]
    if "file" in present:
        write("batching: {max_batch_size: 8}\ncache: {ttl_seconds: 8}\n")
    if "dotenv" in present:
        Path(".env").write_text("MLSERVE_MAX_BATCH_SIZE=16\nMLSERVE_CACHE_TTL_SECONDS=16\n")
    if "env" in present:
        monkeypatch.setenv("MLSERVE_MAX_BATCH_SIZE", "24")
        monkeypatch.setenv("MLSERVE_CACHE_TTL_SECONDS", "24")
    init = {"max_batch_size": 32, "cache_ttl_seconds": 32} if "init" in present else {}
    s = Settings(**init)
    winner = LEVELS[top] if top < len(LEVELS) else "default"
    expected = VALUES.get(winner)
    assert s.max_batch_size == (expected or 64)
    assert s.cache_ttl_seconds == (expected or 3600)
    assert s.value_source("max_batch_size") == winner
    assert s.value_source("cache_ttl_seconds") == winner


def test_sources_mix_per_field(monkeypatch: pytest.MonkeyPatch) -> None:
    write("batching: {max_batch_size: 8, max_latency_ms: 1}\ncache: {ttl_seconds: 9}\nseed: 7\n")
    Path(".env").write_text("MLSERVE_CACHE_TTL_SECONDS=16\n")
    monkeypatch.setenv("MLSERVE_MAX_BATCH_SIZE", "24")
    s = Settings(seed=1)
    assert (s.max_batch_size, s.value_source("max_batch_size")) == (24, "env")
    assert (s.max_latency_ms, s.value_source("max_latency_ms")) == (1, "file")
    assert (s.cache_ttl_seconds, s.value_source("cache_ttl_seconds")) == (16, "dotenv")
    assert (s.seed, s.value_source("seed")) == (1, "init")
    assert s.value_source("drift_window") == "default"


def test_env_overrides_a_bad_value_in_the_file_only_if_valid(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Validation runs on the merged values: a value the environment overrides is not used."""
    write("batching: {max_batch_size: 0}\n")
    monkeypatch.setenv("MLSERVE_MAX_BATCH_SIZE", "4")
    assert Settings().max_batch_size == 4


# --- refused files -------------------------------------------------------------------------------


def refused(text: str) -> str:
    path = write(text)
    with pytest.raises(ConfigFileError) as info:
        Settings()
    message = str(info.value)
    assert str(path) in message
    assert info.value.path == str(path)
    return message


def test_unknown_top_level_key() -> None:
    message = refused("models: [sentiment:v1]\nmax_bach_size: 4\n")
    assert "line 2, key max_bach_size: unknown key; did you mean 'max_batch_size'?" in message


def test_unknown_key_in_a_section() -> None:
    message = refused("cache:\n  enabled: true\n  ttl_secs: 5\n")
    assert "line 3, key cache.ttl_secs: unknown key; did you mean 'ttl_seconds'?" in message
    assert "section cache takes redis_url, enabled, max_size, ttl_seconds, prefix" in message


def test_a_field_of_another_section_is_unknown_there() -> None:
    message = refused("batching:\n  ttl_seconds: 5\n")
    assert "line 2, key batching.ttl_seconds: unknown key" in message


def test_wrong_type() -> None:
    message = refused("batching:\n  max_batch_size: 4\ncache:\n  ttl_seconds: soon\n")
    assert "line 4, key cache.ttl_seconds: Input should be a valid integer" in message
    assert "'soon'" in message


def test_wrong_type_in_a_list_names_the_item_line() -> None:
    message = refused("models:\n  - sentiment:v1\n  - [topic, v1]\n")
    assert "line 3, key models[1]: Input should be a valid string" in message


def test_out_of_range_value() -> None:
    message = refused("limits:\n  max_tokens: 4\n")
    assert "line 2, key limits.max_tokens: Input should be greater than or equal to 8" in message


def test_unsafe_tag() -> None:
    message = refused("models: ['../etc:v1']\n")
    assert "line 1, key models: Value error, not a name:version store tag" in message


def test_short_admin_token_is_refused_without_showing_it() -> None:
    import traceback

    message = refused("admin:\n  enabled: true\n  token: tooshort123\n")
    with pytest.raises(ConfigFileError) as info:
        Settings()
    assert "tooshort123" not in "".join(traceback.format_exception(info.value))
    assert "line 3, key admin.token: Value error, MLSERVE_ADMIN_TOKEN must be at least" in message
    assert "tooshort123" not in message


def test_short_api_key_is_refused_without_showing_it() -> None:
    message = refused("http:\n  api_keys: [short-key]\n")
    assert "line 2, key http.api_keys" in message
    assert "short-key" not in message


def test_public_address_without_token_names_the_host_key() -> None:
    message = refused("models: [sentiment:v1]\nhttp:\n  host: 0.0.0.0\n")
    assert "line 3, key http.host: Value error, refusing to bind 0.0.0.0" in message


def test_model_level_error_names_the_key_from_the_file() -> None:
    message = refused("control:\n  backend: redis\n")
    assert "line 2, key control.backend: Value error, MLSERVE_CONTROL_BACKEND=redis" in message


def test_a_key_given_twice() -> None:
    message = refused("cache:\n  ttl_seconds: 5\ncache_ttl_seconds: 6\n")
    assert "line 3, key cache_ttl_seconds: cache_ttl_seconds is already set at line 2" in message
    message = refused("seed: 1\nseed: 2\n")
    assert "line 2, key seed: seed is already set at line 1" in message


def test_the_file_cannot_name_itself() -> None:
    message = refused("config_file: other.yaml\n")
    assert "line 1, key config_file: the file cannot name itself" in message


def test_a_section_must_be_a_mapping() -> None:
    message = refused("cache: 5\n")
    assert "line 1, key cache: a section must be a mapping" in message


def test_the_file_must_be_a_mapping() -> None:
    assert "line 1: the file must be a mapping" in refused("- a\n- b\n")


def test_invalid_yaml_names_the_line() -> None:
    message = refused("models: [sentiment:v1]\ncache:\n  ttl_seconds: 1\n bad: 2\n")
    assert "line 4: not valid YAML: expected <block end>" in message


def test_several_problems_are_reported_together(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_PORT", "0")
    message = refused("batching: {max_batch_size: 0}\ndrift: {threshold: -1}\n")
    lines = message.splitlines()
    assert any("line 1, key batching.max_batch_size" in line for line in lines)
    assert any("line 2, key drift.threshold" in line for line in lines)
    assert "MLSERVE_PORT (from env): Input should be greater than or equal to 1" in lines


def test_errors_from_the_environment_alone_stay_validation_errors(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    write("cache: {ttl_seconds: 5}\n")
    monkeypatch.setenv("MLSERVE_PORT", "0")
    with pytest.raises(pydantic.ValidationError):
        Settings()


def test_get_settings_refuses_too_so_the_service_does_not_start() -> None:
    write("cache: {ttl_seconds: 0}\n")
    with pytest.raises(ConfigFileError, match=r"line 1, key cache\.ttl_seconds"):
        get_settings()
    with pytest.raises(ValueError):  # ConfigFileError is a ValueError, as pydantic's errors are
        get_settings()
