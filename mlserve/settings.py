"""Runtime settings: one pydantic-settings class, read from ``MLSERVE_*`` variables, ``.env`` and
a YAML configuration file.

Precedence, highest first:

1. init arguments (``Settings(port=8000)``; ``mlserve serve --port`` uses these);
2. environment variables (``MLSERVE_PORT=8000``);
3. ``.env`` in the working directory;
4. the configuration file: ``MLSERVE_CONFIG_FILE`` (default ``config.yaml`` in the working
   directory, read only if it exists; any other file named must exist; empty = none);
5. the defaults below.

The configuration file maps onto the same flat fields. A top-level key is a field name
(``max_batch_size: 32``) or a section from :data:`SECTIONS`; inside section ``S`` the key ``K``
is the field ``S_K`` (``cache: {ttl_seconds: 60}`` sets ``cache_ttl_seconds``) or, where no such
field exists, the field ``K`` of that section (``batching: {max_batch_size: 32}``). Unknown
keys, keys given twice, wrong types and unsafe values are refused at start with the file, the
key and the line (:class:`ConfigFileError`); every validator applies to the file's values too.
``config.example.yaml`` lists every field in its section with its default; ``.env.example``
lists the same fields as variables (unit tests keep both in sync).

Validators refuse unsafe combinations (for example, admin routes on a public address with no
token).
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import re
from contextvars import ContextVar
from functools import lru_cache
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import Field, PrivateAttr, ValidationError, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    YamlConfigSettingsSource,
)

_PART = r"[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?"
NAME_RE = re.compile(rf"^{_PART}\Z")
"""A model name, as BentoML allows: lowercase letters, digits, ``_.-``, at most 63 characters."""
TAG_RE = re.compile(rf"^{_PART}:{_PART}\Z")
"""A ``name:version`` store tag of safe characters (no paths, URLs or escapes can match)."""


DEFAULT_CONFIG_FILE = "config.yaml"

TOP_LEVEL: tuple[str, ...] = ("models", "default_model", "max_loaded_models")
"""Fields written at the top level of the configuration file (they belong to no section)."""

SECTIONS: dict[str, tuple[str, ...]] = {
    "batching": ("max_batch_size", "max_latency_ms"),
    "limits": (
        "max_text_chars",
        "max_batch_texts",
        "max_upload_mb",
        "max_request_kb",
        "body_timeout_seconds",
        "header_timeout_seconds",
        "max_header_kb",
        "max_queue",
        "infer_timeout_seconds",
        "max_tokens",
    ),
    "compute": ("device", "torch_threads", "blas_threads", "workers", "balance_connections"),
    "http": (
        "host",
        "port",
        "drain_seconds",
        "cors_origins",
        "log_io",
        "tracing_enabled",
        "api_keys",
        "rate_limit",
        "admin_rate_limit",
        "docs_enabled",
        "ssl_certfile",
        "ssl_keyfile",
    ),
    "admin": (
        "admin_enabled",
        "admin_token",
        "audit_log",
        "audit_max_bytes",
        "audit_backups",
        "audit_denied_interval_seconds",
    ),
    "control": (
        "control_backend",
        "control_namespace",
        "control_dir",
        "control_timeout_seconds",
    ),
    "cache": ("redis_url", "cache_enabled", "cache_max_size", "cache_ttl_seconds", "cache_prefix"),
    "drift": ("drift_window", "drift_min_window", "drift_threshold", "drift_interval_seconds"),
    "training": ("seed", "reports_dir"),
}
"""The configuration file's sections and the fields each holds. In section ``S`` a field ``F``
is written as ``F`` without its ``S_`` prefix (``cache.ttl_seconds`` = ``cache_ttl_seconds``)
or, when it has no such prefix, as ``F`` itself (``batching.max_batch_size``)."""

SECRET_FIELDS: tuple[str, ...] = ("admin_token", "api_keys", "redis_url")
"""Fields whose values are never shown: masked in the effective configuration and left out of
error messages."""

_SOURCE_LABELS = {
    "InitSettingsSource": "init",
    "EnvSettingsSource": "env",
    "DotEnvSettingsSource": "dotenv",
    "ConfigFileSource": "file",
    "SecretsSettingsSource": "secrets",
}
"""pydantic-settings' source classes, in priority order, and the label each value gets."""

_BUILDING: ContextVar[list[ConfigFileSource] | None] = ContextVar("_BUILDING", default=None)


def section_key(section: str, field: str) -> str:
    """The key of ``field`` in ``section``: (cache, cache_ttl_seconds) -> ``ttl_seconds``."""
    prefix = f"{section}_"
    return field[len(prefix) :] if field.startswith(prefix) else field


def file_key(field: str) -> str:
    """Where ``field`` is written in the configuration file: ``cache.ttl_seconds``, ``models``."""
    for section, members in SECTIONS.items():
        if field in members:
            return f"{section}.{section_key(section, field)}"
    return field


def _section_field(section: str, key: str) -> str | None:
    members = SECTIONS[section]
    for candidate in (f"{section}_{key}", key):
        if candidate in members:
            return candidate
    return None


class ConfigFileError(ValueError):
    """The configuration cannot be used. Each problem is one line naming the file, the line and
    the key (or, for a value from elsewhere, its field and source)."""

    def __init__(self, path: Path | str, problems: list[str]) -> None:
        self.path = str(path)
        self.problems = problems
        super().__init__("\n".join(problems))


class ConfigFileSource(YamlConfigSettingsSource):
    """pydantic-settings' YAML source, read with line numbers, sections mapped to flat fields.

    ``path`` None reads nothing. Unknown keys, keys given twice and YAML errors raise
    :class:`ConfigFileError` when the source is built, before any value is validated.
    """

    def __init__(self, settings_cls: type[BaseSettings], path: Path | None) -> None:
        self.file = path
        self._fields = settings_cls.model_fields  # read before the base class sets settings_cls
        self.locations: dict[str | tuple[str, int], tuple[str, int]] = {}
        """field (or (field, list index)) -> (key as written, line)"""
        super().__init__(settings_cls, yaml_file=path)

    def _where(self, line: int, key: str | None = None) -> str:
        return f"{self.file}, line {line}" + (f", key {key}" if key else "")

    def _read_file(self, file_path: Any) -> dict[str, Any]:
        try:
            text = Path(file_path).read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            raise ConfigFileError(
                self.file or "", [f"{self.file}: cannot read it: {exc}"]
            ) from None
        try:
            root = yaml.compose(text, Loader=yaml.SafeLoader)
        except yaml.MarkedYAMLError as exc:
            line = exc.problem_mark.line + 1 if exc.problem_mark else 1
            problem = exc.problem or exc.context or "syntax error"
            raise ConfigFileError(
                self.file or "", [f"{self._where(line)}: not valid YAML: {problem}"]
            ) from None
        except yaml.YAMLError as exc:
            raise ConfigFileError(
                self.file or "", [f"{self.file}: not valid YAML: {exc}"]
            ) from None
        if root is None or _is_null(root):
            return {}
        return self._flatten(root)

    def _flatten(self, root: yaml.Node) -> dict[str, Any]:
        if not isinstance(root, yaml.MappingNode):
            where = self._where(root.start_mark.line + 1)
            raise ConfigFileError(
                self.file or "", [f"{where}: the file must be a mapping of keys to values"]
            )
        fields = self._fields
        out: dict[str, Any] = {}
        problems: list[str] = []

        def put(field: str, key: str, key_node: yaml.Node, value_node: yaml.Node) -> None:
            line = key_node.start_mark.line + 1
            if field in out:
                first, first_line = self.locations[field]
                problems.append(
                    f"{self._where(line, key)}: {field} is already set at line {first_line}"
                    + (f" (as {first})" if first != key else "")
                )
                return
            try:
                out[field] = _construct(value_node)
            except yaml.MarkedYAMLError as exc:
                problems.append(f"{self._where(line, key)}: {exc.problem or exc}")
                return
            self.locations[field] = (key, line)
            if isinstance(value_node, yaml.SequenceNode):
                for i, item in enumerate(value_node.value):
                    self.locations[(field, i)] = (f"{key}[{i}]", item.start_mark.line + 1)

        def unknown(key: str, line: int, choices: list[str], hint: str = "") -> None:
            close = difflib.get_close_matches(key.rpartition(".")[2], choices, n=1)
            text = f"{self._where(line, key)}: unknown key"
            if close:
                text += f"; did you mean {close[0]!r}?"
            problems.append(text + hint)

        for key_node, value_node in root.value:
            line = key_node.start_mark.line + 1
            if not isinstance(key_node, yaml.ScalarNode):
                problems.append(f"{self._where(line)}: a key must be a name")
                continue
            key = key_node.value
            if key == "config_file":
                problems.append(
                    f"{self._where(line, key)}: the file cannot name itself; "
                    "set MLSERVE_CONFIG_FILE instead"
                )
            elif key in fields:
                put(key, key, key_node, value_node)
            elif key in SECTIONS:
                if _is_null(value_node):
                    continue  # an empty section: nothing set
                if not isinstance(value_node, yaml.MappingNode):
                    problems.append(
                        f"{self._where(line, key)}: a section must be a mapping of its keys ("
                        + ", ".join(section_key(key, f) for f in SECTIONS[key])
                        + ")"
                    )
                    continue
                keys = [section_key(key, f) for f in SECTIONS[key]]
                for sub_node, sub_value in value_node.value:
                    sub_line = sub_node.start_mark.line + 1
                    if not isinstance(sub_node, yaml.ScalarNode):
                        problems.append(f"{self._where(sub_line)}: a key must be a name")
                        continue
                    path = f"{key}.{sub_node.value}"
                    field = _section_field(key, sub_node.value)
                    if field is None:
                        unknown(path, sub_line, keys, f" (section {key} takes {', '.join(keys)})")
                    else:
                        put(field, path, sub_node, sub_value)
            else:
                top = [f for f in fields if f != "config_file"] + list(SECTIONS)
                unknown(key, line, top)
        if problems:
            raise ConfigFileError(self.file or "", problems)
        return out

    def sources(self) -> dict[str, str]:
        """Each field's source after the settings were built: init, env, dotenv, file, secrets or
        default (the first source, by priority, that provided it)."""
        states = self.settings_sources_data
        out = {}
        for field in self.settings_cls.model_fields:
            out[field] = next(
                (label for name, label in _SOURCE_LABELS.items() if field in states.get(name, {})),
                "default",
            )
        return out

    def explain(self, exc: ValidationError) -> ConfigFileError | None:
        """The validation errors with the file, line and key of each value that came from the
        file; None when no value of the file is involved (the error is raised as it is)."""
        sources = self.sources()
        problems: list[str] = []
        involved = False
        for err in exc.errors(include_url=False):
            loc, msg = err["loc"], err["msg"]
            field = loc[0] if loc and isinstance(loc[0], str) else None
            if field is None:
                named = [m.lower() for m in re.findall(r"MLSERVE_([A-Z0-9_]+)", msg)]
                from_file = [f for f in named if sources.get(f) == "file"]
                if from_file:
                    involved = True
                    key, line = self.locations[from_file[0]]
                    problems.append(f"{self._where(line, key)}: {msg}")
                else:
                    problems.append(msg)
            elif sources.get(field) == "file":
                involved = True
                where = self.locations.get((field, loc[1])) if len(loc) > 1 else None
                key, line = where or self.locations[field]
                shown = "" if field in SECRET_FIELDS else f" (got {_short(err.get('input'))})"
                problems.append(f"{self._where(line, key)}: {msg}{shown}")
            else:
                env = f"MLSERVE_{field.upper()}"
                problems.append(f"{env} (from {sources.get(field, 'default')}): {msg}")
        return ConfigFileError(self.file or "", problems) if involved else None


def _is_null(node: yaml.Node) -> bool:
    return isinstance(node, yaml.ScalarNode) and node.tag == "tag:yaml.org,2002:null"


def _construct(node: yaml.Node) -> Any:
    loader = yaml.SafeLoader("")
    try:
        return loader.construct_document(node)
    finally:
        loader.dispose()


def _short(value: object, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _config_file_path(*sources: PydanticBaseSettingsSource) -> Path | None:
    """The configuration file to read: ``config_file`` from the init arguments, the environment
    or ``.env`` (in that order), else ``config.yaml``. ``config.yaml`` is read only if it exists,
    any other file must exist, and an empty name reads none."""
    init, env, dotenv = sources
    named = DEFAULT_CONFIG_FILE
    kwargs = getattr(init, "init_kwargs", {})
    if "config_file" in kwargs:
        named = str(kwargs["config_file"] or "")
    else:
        for source in (env, dotenv):
            value = getattr(source, "env_vars", {}).get("mlserve_config_file")
            if value is not None:
                named = value
                break
    if not named.strip():
        return None
    path = Path(named).expanduser().absolute()
    if path.is_file():
        return path
    if named == DEFAULT_CONFIG_FILE:
        return None
    raise ConfigFileError(path, [f"{path}: configuration file not found (config_file={named})"])


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All of mlserve's configuration. Environment variables use the ``MLSERVE_`` prefix."""

    model_config = SettingsConfigDict(
        env_prefix="MLSERVE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
    )

    # --- configuration file -------------------------------------------------------------------
    config_file: str = Field(
        DEFAULT_CONFIG_FILE,
        description="YAML configuration file, read beneath the environment and .env (see "
        "config.example.yaml), relative to the working directory. config.yaml is read only if it "
        "exists; any other file named here must exist; empty = none. Set it in the environment, "
        "not in the file.",
    )

    # --- models -------------------------------------------------------------------------------
    models: Annotated[list[str], NoDecode] = Field(
        default_factory=lambda: ["sentiment:v1", "sentiment:v2", "topic:v1"],
        description="Store tags loaded at startup (comma-separated). The first tag of each name "
        "is that name's default version.",
    )
    default_model: str = Field(
        "sentiment",
        description="Model used when a request names none: a name (its default version) or a tag.",
    )
    max_loaded_models: int = Field(8, ge=1, le=64, description="Most model versions kept loaded.")

    # --- batching and limits ------------------------------------------------------------------
    max_batch_size: int = Field(64, ge=1, le=1024, description="Largest adaptive batch.")
    max_latency_ms: float = Field(
        5.0,
        ge=0,
        le=1000,
        description="How long the batcher may hold an idle model waiting for a fuller batch.",
    )
    max_text_chars: int = Field(10_000, ge=1, description="Longest accepted text, in characters.")
    max_batch_texts: int = Field(100, ge=1, le=10_000, description="Most texts in one batch call.")
    max_upload_mb: float = Field(5.0, gt=0, description="Largest accepted file upload, in MiB.")
    max_request_kb: int = Field(
        2048, ge=1, description="Largest accepted JSON request body, in KiB."
    )
    body_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="A request body that has not fully arrived within this many seconds (a slow "
        "client, or a body shorter than its Content-Length) gets 408.",
    )
    header_timeout_seconds: float = Field(
        10.0,
        gt=0,
        le=600,
        description="A connection whose request headers have not fully arrived within this many "
        "seconds (from the connection, or from the previous response) gets 408 and is closed.",
    )
    max_header_kb: int = Field(
        64, ge=8, le=1024, description="Largest accepted request header block, in KiB (431)."
    )
    max_queue: int = Field(
        1024,
        ge=1,
        le=1_000_000,
        description="Most texts queued per model version per worker; a request past it gets 503 "
        "overloaded with Retry-After (so does one that could not be served within its deadline).",
    )
    infer_timeout_seconds: float = Field(
        10.0, gt=0, description="A request waiting longer than this for inference gets 504."
    )
    max_tokens: int = Field(
        128, ge=8, le=512, description="Transformer inputs are truncated to this many tokens."
    )

    # --- compute ------------------------------------------------------------------------------
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Torch device: auto picks cuda, then mps, then cpu."
    )
    torch_threads: int = Field(
        0,
        ge=0,
        description="Torch intra-op threads per worker; 0 = auto: the worker's share of the "
        "cores minus one, left for the event loop (at least 1).",
    )
    blas_threads: int = Field(1, ge=1, description="BLAS/OpenMP threads per worker process.")
    workers: int = Field(
        0,
        ge=0,
        le=64,
        description="Server worker processes; 0 = auto: one per CPU core (at most 8) on a CPU "
        "machine, one when a GPU is used.",
    )
    balance_connections: bool = Field(
        True,
        description="With several workers, close a worker's surplus keep-alive connections "
        "(after a full response) so clients reconnect and spread evenly over the workers.",
    )

    # --- HTTP ---------------------------------------------------------------------------------
    host: str = Field("127.0.0.1", description="Address `mlserve serve` binds.")
    port: int = Field(3000, ge=1, le=65535, description="Port `mlserve serve` binds.")
    drain_seconds: float = Field(
        20.0,
        ge=1,
        le=600,
        description="On SIGTERM: /ready turns 503, no new connection is taken, and requests in "
        "flight and queued finish; the server exits within this many seconds, then forces the "
        "rest. Keep it under Kubernetes' terminationGracePeriodSeconds less the preStop delay.",
    )
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); empty = off."
    )
    docs_enabled: bool = Field(
        True,
        description="Serve the OpenAPI description (/openapi.json) and the interactive docs "
        "(/docs, assets served locally, no CDN).",
    )
    ssl_certfile: str | None = Field(
        None,
        description="PEM certificate (chain) to serve HTTPS; needs MLSERVE_SSL_KEYFILE. Unset = "
        "plain HTTP (terminate TLS at a proxy instead, see DEPLOYMENT.md).",
    )
    ssl_keyfile: str | None = Field(None, description="PEM private key for MLSERVE_SSL_CERTFILE.")
    log_io: bool = Field(
        False,
        description="Log request texts and predictions. Off by default: texts may be private.",
    )
    tracing_enabled: bool = Field(
        False,
        description="BentoML's OpenTelemetry span for every request. Turn it on together with "
        "an exporter in BentoML's configuration (tracing.exporter_type); off, no span is made "
        "(without an exporter they go nowhere and cost about a fifth of a request's time).",
    )
    admin_token: str | None = Field(
        None, description="Bearer token for /admin routes. Unset = admin routes are off (403)."
    )
    admin_enabled: bool = Field(True, description="Serve the /admin routes at all.")
    audit_log: str = Field(
        "logs/audit.jsonl",
        description="Append-only JSON-lines log of every authenticated admin call (who, what, "
        "when, result), synced to disk; denied calls appear as rate-limited summaries.",
    )
    audit_max_bytes: int = Field(
        10 * 1024 * 1024,
        ge=1024,
        description="Size at which the audit log is rotated (audit.jsonl -> audit.jsonl.1 ...).",
    )
    audit_backups: int = Field(5, ge=1, le=1000, description="Rotated audit log files kept.")
    audit_denied_interval_seconds: float = Field(
        60.0,
        gt=0,
        le=86400,
        description="Denied admin calls are written as at most one summary line per client per "
        "this many seconds (every denial is counted in mlserve_admin_denied_total).",
    )
    control_backend: Literal["auto", "redis", "file"] = Field(
        "auto",
        description="Where workers share the desired model state: redis (across hosts; needs "
        "MLSERVE_REDIS_URL), file (one host) or auto (redis when a Redis URL is set).",
    )
    control_namespace: str = Field(
        "default",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Name of this deployment's shared model state in Redis "
        "(mlserve:control:<namespace>:*). Deployments sharing a Redis must use different "
        "namespaces, or a change on one applies to the other.",
    )
    control_dir: str = Field(
        "",
        description="Directory of the file control store; empty = a temporary directory "
        "private to each server run.",
    )
    control_timeout_seconds: float = Field(
        30.0,
        gt=0,
        le=600,
        description="How long an admin change waits, from its arrival, for every worker to "
        "apply it before it answers 202 with the lagging workers.",
    )
    rate_limit: str = Field(
        "",
        description="Request rate limit per API key (per client address when no keys are set), "
        "one or more windows, e.g. '20/second;600/minute'. Empty = no limit. Exact across "
        "workers and replicas with MLSERVE_REDIS_URL; otherwise counted per worker.",
    )
    admin_rate_limit: str = Field(
        "",
        description="The admin API's own (stricter) limit per client address, counted before "
        "the token is checked, e.g. '5/second;60/minute'. Empty = no limit.",
    )
    api_keys: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="Optional API keys for predict routes (comma-separated). Empty = open.",
    )

    # --- cache --------------------------------------------------------------------------------
    redis_url: str | None = Field(None, description="Redis URL for the prediction cache.")
    cache_enabled: bool = Field(True, description="Cache predictions at all.")
    cache_max_size: int = Field(10_000, ge=1, description="In-memory cache entries.")
    cache_ttl_seconds: int = Field(3600, ge=1, description="Cache entry time to live.")
    cache_prefix: str = Field(
        "mlserve",
        pattern=r"^[A-Za-z0-9_.-]{1,64}$",
        description="Prefix of every cache key. Keys also name the model's content, so "
        "deployments can share cache entries safely.",
    )

    # --- drift --------------------------------------------------------------------------------
    drift_window: int = Field(1000, ge=10, description="Recent inputs kept per model for drift.")
    drift_min_window: int = Field(
        100, ge=1, description="Inputs needed before drift can be flagged."
    )
    drift_threshold: float = Field(
        0.2, gt=0, description="PSI above which a feature counts as drifted (0.2 = significant)."
    )
    drift_interval_seconds: float = Field(
        15.0,
        ge=0.5,
        le=3600,
        description="How often each worker recomputes drift (off the event loop) for "
        "mlserve_drift_score and the drift route.",
    )

    # --- training -----------------------------------------------------------------------------
    seed: int = Field(42, description="Seed for splits and models.")
    reports_dir: str = Field("reports", description="Where training writes plots and model cards.")

    _sources: dict[str, str] = PrivateAttr(default_factory=dict)
    _file: str | None = PrivateAttr(default=None)
    _file_keys: dict[str, tuple[str, int]] = PrivateAttr(default_factory=dict)

    def __init__(self, **values: Any) -> None:
        built: list[ConfigFileSource] = []
        token = _BUILDING.set(built)
        try:
            super().__init__(**values)
        except ValidationError as exc:
            explained = built[-1].explain(exc) if built else None
            if explained is not None:
                # Not chained: pydantic's message would repeat the input, secrets included.
                raise explained from None
            raise
        finally:
            _BUILDING.reset(token)
        if built:
            source = built[-1]
            self._sources = source.sources()
            self._file = str(source.file) if source.file else None
            self._file_keys = {k: v for k, v in source.locations.items() if isinstance(k, str)}

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """init > environment > .env > the configuration file (> the defaults)."""
        path = _config_file_path(init_settings, env_settings, dotenv_settings)
        file_settings = ConfigFileSource(settings_cls, path)
        building = _BUILDING.get()
        if building is not None:
            building.append(file_settings)
        return init_settings, env_settings, dotenv_settings, file_settings, file_secret_settings

    def value_source(self, field: str) -> str:
        """Where ``field``'s value came from: init, env, dotenv, file, secrets or default."""
        return self._sources.get(field, "default")

    def file_location(self, field: str) -> tuple[str, int] | None:
        """(key, line) of ``field`` in the configuration file, if the file sets it."""
        return self._file_keys.get(field)

    @property
    def config_file_read(self) -> str | None:
        """The configuration file these settings read (absolute path), or None."""
        return self._file

    @field_validator("models", "cors_origins", "api_keys", mode="before")
    @classmethod
    def _csv(cls, value: object) -> object:
        return _split_csv(value)

    @field_validator("models")
    @classmethod
    def _valid_tags(cls, value: list[str]) -> list[str]:
        for tag in value:
            if not TAG_RE.match(tag):
                raise ValueError(f"not a name:version store tag: {tag!r}")
        return value

    @field_validator("rate_limit", "admin_rate_limit")
    @classmethod
    def _valid_rate_limit(cls, value: str) -> str:
        from mlserve.ratelimit import parse_limits

        parse_limits(value)
        return value.strip()

    @field_validator("api_keys")
    @classmethod
    def _strong_keys(cls, value: list[str]) -> list[str]:
        if any(len(k) < 16 for k in value):
            raise ValueError("every MLSERVE_API_KEYS entry must be at least 16 characters")
        return value

    @model_validator(mode="after")
    def _consistent(self) -> Settings:
        if len(self.models) > self.max_loaded_models:
            raise ValueError(
                f"MLSERVE_MODELS lists {len(self.models)} tags, more than "
                f"MLSERVE_MAX_LOADED_MODELS={self.max_loaded_models}"
            )
        if self.control_backend == "redis" and not self.redis_url:
            raise ValueError("MLSERVE_CONTROL_BACKEND=redis needs MLSERVE_REDIS_URL")
        return self

    @model_validator(mode="after")
    def _tls_files(self) -> Settings:
        given = [f for f in (self.ssl_certfile, self.ssl_keyfile) if f]
        if len(given) == 1:
            raise ValueError("MLSERVE_SSL_CERTFILE and MLSERVE_SSL_KEYFILE go together")
        for path in given:
            if not os.access(path, os.R_OK):
                raise ValueError(f"TLS file {path!r} (MLSERVE_SSL_*) cannot be read")
        return self

    @property
    def tls(self) -> bool:
        return bool(self.ssl_certfile and self.ssl_keyfile)

    @model_validator(mode="after")
    def _keys_apart_from_admin(self) -> Settings:
        if self.admin_token and self.admin_token in self.api_keys:
            raise ValueError(
                "MLSERVE_ADMIN_TOKEN must not also be a predict API key (MLSERVE_API_KEYS)"
            )
        return self

    @field_validator("admin_token")
    @classmethod
    def _strong_token(cls, value: str | None) -> str | None:
        if value is not None and value != "" and len(value) < 16:
            raise ValueError("MLSERVE_ADMIN_TOKEN must be at least 16 characters")
        return value or None

    @model_validator(mode="after")
    def _no_public_admin_without_token(self) -> Settings:
        if self.admin_enabled and self.admin_token is None and not is_loopback(self.host):
            raise ValueError(
                f"refusing to bind {self.host} (MLSERVE_HOST) with admin routes on and no "
                "MLSERVE_ADMIN_TOKEN; "
                "set a token or MLSERVE_ADMIN_ENABLED=false"
            )
        return self

    @property
    def request_timeout_seconds(self) -> float:
        """BentoML's limit on one request (its ``traffic.timeout``: past it, BentoML answers 504
        and cancels the handler). A backstop above mlserve's own bounds, never below them: an
        inference answers within ``infer_timeout_seconds``; an admin change within
        ``control_timeout_seconds`` of its arrival (202 with the workers that lag), unless this
        worker's own load of the model runs past that, which the 30 s margin allows for."""
        return max(self.infer_timeout_seconds + 5, self.control_timeout_seconds + 30)

    @property
    def effective_workers(self) -> int:
        """Worker processes to run. On CPU one per core: each worker's model then has a core,
        and its event loop shares it (BENCHMARK.md: 2 workers on 2 cores served the
        transformer 1.9x and the classical model 1.4x faster than 1). On a GPU one process
        batches best and holds one copy of the weights."""
        if self.workers:
            return self.workers
        if self.device in ("cuda", "mps") or (self.device == "auto" and gpu_present()):
            return 1
        return max(1, min(8, os.cpu_count() or 1))

    @property
    def effective_torch_threads(self) -> int:
        if self.torch_threads:
            return self.torch_threads
        share = (os.cpu_count() or 1) // self.effective_workers
        return max(1, share - 1)

    @property
    def max_body_bytes(self) -> int:
        return self.max_request_kb * 1024

    @property
    def max_upload_bytes(self) -> int:
        return int(self.max_upload_mb * 1024 * 1024)

    @property
    def default_versions(self) -> dict[str, str]:
        """The first configured version of each model name is its default."""
        out: dict[str, str] = {}
        for tag in self.models:
            name, version = tag.split(":", 1)
            out.setdefault(name, version)
        return out


def gpu_present() -> bool:
    """A cheap check (no torch import): an NVIDIA device node, or Apple silicon (mps)."""
    import platform
    from pathlib import Path

    if Path("/dev/nvidia0").exists():
        return True
    return platform.system() == "Darwin" and platform.machine() == "arm64"


def is_loopback(host: str) -> bool:
    """True for localhost and loopback addresses."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


@lru_cache(maxsize=1)
def get_settings() -> Settings:
    """The process-wide settings (cached; tests call ``get_settings.cache_clear()``)."""
    return Settings()
