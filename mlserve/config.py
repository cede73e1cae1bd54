"""The effective configuration and the example configuration file.

:func:`effective_config` is what ``mlserve config show`` prints and ``GET /admin/config``
returns: every setting laid out as in the configuration file (top-level fields, then the
sections of :data:`mlserve.settings.SECTIONS`), the source of each value (``init``, ``env``,
``dotenv``, ``file`` or ``default``) and secrets masked: the admin token, each API key and the
password of the Redis URL.

:func:`example_yaml` writes ``config.example.yaml`` from the Settings class: every field in its
section, with its default and its description (a unit test keeps the committed file equal to it;
``mlserve config example > config.example.yaml`` regenerates it).
"""

from __future__ import annotations

import textwrap
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit

import yaml

from mlserve.settings import (
    SECRET_FIELDS,
    SECTIONS,
    TOP_LEVEL,
    Settings,
    section_key,
)

MASK = "***"
WIDTH = 100


def layout() -> list[tuple[str | None, tuple[str, ...]]]:
    """The file's layout: (None, top-level fields), then (section, its fields) in order. A field
    in no section (none today; a unit test checks) is listed at the top level."""
    placed = set(TOP_LEVEL).union(*SECTIONS.values())
    rest = tuple(f for f in Settings.model_fields if f not in placed and f != "config_file")
    return [(None, TOP_LEVEL + rest), *SECTIONS.items()]


def mask_url(url: str) -> str:
    """``url`` with its password (``user:PASSWORD@`` or ``?password=``) replaced by ``***``."""
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        return MASK
    head, sep, rest = url.partition("?")
    if password is not None:
        userinfo, _, hostport = parts.netloc.rpartition("@")
        user = userinfo.partition(":")[0]
        head = head.replace(parts.netloc, f"{user}:{MASK}@{hostport}", 1)
    query, hash_, fragment = rest.partition("#")
    pairs = parse_qsl(query, keep_blank_values=True)
    if any(k.lower() == "password" for k, _ in pairs):
        query = urlencode([(k, MASK if k.lower() == "password" else v) for k, v in pairs], safe="*")
    return head + sep + query + hash_ + fragment


def masked(field: str, value: Any) -> Any:
    """The value as it may be shown: secrets masked, everything else as it is."""
    if value is None or field not in SECRET_FIELDS:
        return value
    if field == "redis_url":
        return mask_url(value)
    if isinstance(value, list):
        return [MASK for _ in value]
    return MASK


def effective_config(settings: Settings) -> dict[str, Any]:
    """The merged configuration of ``settings``, JSON-ready.

    ``{"config_file": path read or None, "values": {...}, "sources": {...}}``: ``values`` has the
    configuration file's shape (secrets masked) and ``sources`` the same shape with each value's
    source.
    """
    values: dict[str, Any] = {}
    sources: dict[str, Any] = {}
    for section, fields in layout():
        value_out = values.setdefault(section, {}) if section else values
        source_out = sources.setdefault(section, {}) if section else sources
        for field in fields:
            key = section_key(section, field) if section else field
            value_out[key] = masked(field, getattr(settings, field))
            source_out[key] = settings.value_source(field)
    return {"config_file": settings.config_file_read, "values": values, "sources": sources}


def _flow(value: Any) -> str:
    """One value as a one-line YAML flow scalar or list."""
    text = yaml.safe_dump(value, default_flow_style=True, width=10**6, sort_keys=False).strip()
    return text.removesuffix("\n...").strip()


def render_yaml(config: dict[str, Any]) -> str:
    """:func:`effective_config` as YAML, each value followed by its source as a comment."""
    lines = [
        "# mlserve effective configuration (secrets masked)",
        f"# configuration file: {config.get('config_file') or 'none'}",
        "# each value's source: init, env, dotenv, file or default",
    ]
    values, sources = config["values"], config["sources"]
    rows: list[tuple[str, str | None]] = []  # (text, source; None for a section line)

    def entries(vals: dict, srcs: dict, indent: str) -> None:
        rows.extend(
            (f"{indent}{key}: {_flow(value)}", srcs.get(key, "?")) for key, value in vals.items()
        )

    entries({k: v for k, v in values.items() if k not in SECTIONS}, sources, "")
    for section in SECTIONS:
        if section in values:
            rows.append((f"{section}:", None))
            entries(values[section], sources.get(section, {}), "  ")
    pad = max((len(text) for text, source in rows if source), default=0)
    lines += [text if source is None else f"{text.ljust(pad)}  # {source}" for text, source in rows]
    return "\n".join(lines) + "\n"


EXAMPLE_HEADER = """\
# mlserve configuration file. Copy it to config.yaml in the working directory (read if it exists)
# or point MLSERVE_CONFIG_FILE at it. Generated from mlserve.settings.Settings by
# `mlserve config example`: every field is listed in its section with its default.
#
# Precedence, highest first: init arguments, environment variables (MLSERVE_*), .env, this file,
# the defaults. So an MLSERVE_* variable always overrides what is written here.
#
# Keys: in a section S the key K is the field S_K (cache.ttl_seconds = MLSERVE_CACHE_TTL_SECONDS)
# or, where no such field exists, the field K (batching.max_batch_size = MLSERVE_MAX_BATCH_SIZE).
# A field's own name also works at the top level (cache_ttl_seconds: 60). Unknown keys, keys set
# twice, wrong types and unsafe values stop the server at start with the file, key and line.
#
# Secrets (admin.token, http.api_keys, a password in cache.redis_url) may be set here, but keep
# them in the environment or a mounted secret instead: this file is easily copied or committed.
"""


def _comment(text: str, indent: str) -> list[str]:
    return textwrap.wrap(
        text,
        width=WIDTH,
        initial_indent=f"{indent}# ",
        subsequent_indent=f"{indent}# ",
        break_on_hyphens=False,
    )


def example_yaml() -> str:
    """The text of ``config.example.yaml``: every field, its default and its description."""
    out = [EXAMPLE_HEADER]
    for section, fields in layout():
        indent = "  " if section else ""
        block: list[str] = [f"{section}:"] if section else []
        for i, field in enumerate(fields):
            info = Settings.model_fields[field]
            default = info.get_default(call_default_factory=True)
            if i:
                block.append("")
            block += _comment(f"{info.description} [MLSERVE_{field.upper()}]", indent)
            key = section_key(section, field) if section else field
            block.append(f"{indent}{key}: {_flow(default)}")
        out.append("\n".join(block) + "\n")
    return "\n".join(out)
