"""Runtime settings: one pydantic-settings class, read from ``MLSERVE_*`` variables and ``.env``.

Every field is documented here and in ``.env.example``. Validators refuse unsafe combinations
(for example, admin routes on a public address with no token).
"""

from __future__ import annotations

import ipaddress
import os
import re
from functools import lru_cache
from typing import Annotated, Literal

from pydantic import Field, field_validator, model_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

_PART = r"[a-z0-9](?:[a-z0-9_.-]{0,61}[a-z0-9])?"
NAME_RE = re.compile(rf"^{_PART}\Z")
"""A model name, as BentoML allows: lowercase letters, digits, ``_.-``, at most 63 characters."""
TAG_RE = re.compile(rf"^{_PART}:{_PART}\Z")
"""A ``name:version`` store tag of safe characters (no paths, URLs or escapes can match)."""


def _split_csv(value: object) -> object:
    if isinstance(value, str):
        return [part.strip() for part in value.split(",") if part.strip()]
    return value


class Settings(BaseSettings):
    """All of mlserve's configuration. Environment variables use the ``MLSERVE_`` prefix."""

    model_config = SettingsConfigDict(
        env_prefix="MLSERVE_", env_file=".env", env_file_encoding="utf-8", extra="ignore"
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
    cors_origins: Annotated[list[str], NoDecode] = Field(
        default_factory=list, description="Origins allowed by CORS (comma-separated); empty = off."
    )
    log_io: bool = Field(
        False,
        description="Log request texts and predictions. Off by default: texts may be private.",
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
        description="How long an admin change waits for every worker to apply it before it "
        "answers 202 with the lagging workers.",
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
    def _keys_apart_from_admin(self) -> Settings:
        if self.admin_token and self.admin_token in self.api_keys:
            raise ValueError("the admin token must not also be a predict API key")
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
                f"refusing to bind {self.host} with admin routes on and no MLSERVE_ADMIN_TOKEN; "
                "set a token or MLSERVE_ADMIN_ENABLED=false"
            )
        return self

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
