"""`.env.example` documents every setting, with a default that Settings accepts."""

from __future__ import annotations

from pathlib import Path

from mlserve.settings import Settings

ENV_EXAMPLE = Path(__file__).resolve().parents[2] / ".env.example"


def _entries() -> dict[str, str]:
    out = {}
    for line in ENV_EXAMPLE.read_text().splitlines():
        if line.startswith("MLSERVE_"):
            key, _, value = line.partition("=")
            out[key] = value
    return out


def test_every_field_is_documented() -> None:
    documented = _entries()
    expected = {f"MLSERVE_{name.upper()}" for name in Settings.model_fields}
    assert expected == set(documented)


def test_every_field_has_a_description() -> None:
    missing = [name for name, f in Settings.model_fields.items() if not f.description]
    assert missing == []


def test_the_example_values_load(monkeypatch, tmp_path) -> None:
    monkeypatch.chdir(tmp_path)
    for key, value in _entries().items():
        monkeypatch.setenv(key, value)
    settings = Settings(_env_file=None)
    assert settings.models == ["sentiment:v1", "sentiment:v2", "topic:v1"]
    assert settings.host == "127.0.0.1"
