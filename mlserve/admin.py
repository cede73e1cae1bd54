"""Admin authentication and live statistics.

Every admin route needs ``Authorization: Bearer <MLSERVE_ADMIN_TOKEN>``, compared in constant
time. With no token configured (or ``MLSERVE_ADMIN_ENABLED=false``) the admin routes answer 403.
Statistics come from the Prometheus metrics, which are aggregated across all worker processes.
"""

from __future__ import annotations

import fcntl
import hashlib
import hmac
import json
import os
from pathlib import Path
from typing import Any

from mlserve.errors import MLServeError, ServiceUnavailableError


class UnauthorizedError(MLServeError):
    status, code = 401, "unauthorized"


class ForbiddenError(MLServeError):
    status, code = 403, "admin_disabled"


def token_id(token: str) -> str:
    """A stable, non-reversible id for a token (for audit logs): never the token itself."""
    return "tok_" + hashlib.sha256(token.encode()).hexdigest()[:12]


def require_admin(authorization: str | None, settings: Any) -> str:
    """Check the bearer token; return its id. 403 when admin is off, 401 when the token is bad."""
    if not settings.admin_enabled or not settings.admin_token:
        raise ForbiddenError("the admin API is disabled: set MLSERVE_ADMIN_TOKEN to enable it")
    scheme, _, given = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not given:
        raise UnauthorizedError("send Authorization: Bearer <admin token>")
    if not hmac.compare_digest(given.encode(), settings.admin_token.encode()):
        raise UnauthorizedError("the admin token is not valid")
    return token_id(given)


class AuditLog:
    """Append-only JSON lines: one per admin action, with who (a token id), what, when and the
    result. Each line is one ``write`` on an ``O_APPEND`` descriptor under an exclusive lock,
    so the lines of several workers never interleave."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    def check(self) -> None:
        """Refuse (503) to make a change that could not be recorded."""
        try:
            os.close(self._open())
        except OSError as exc:
            raise ServiceUnavailableError(
                "the admin audit log cannot be written; no change was made"
            ) from exc

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
        fd = self._open()
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            os.write(fd, line)
        finally:
            os.close(fd)


# The overall request count and error rate cover predictions, not probes such as /ready.
PREDICT_ROUTES = ("/predict", "/batch-predict", "/batch-predict/file")


def require_api_key(headers: Any, settings: Any) -> None:
    """When MLSERVE_API_KEYS is set, predict routes need one of them (``X-API-Key`` or a bearer
    token). The admin token is not one of them, and no API key opens an admin route."""
    if not settings.api_keys:
        return
    given = headers.get("x-api-key", "")
    if not given:
        scheme, _, token = headers.get("authorization", "").partition(" ")
        given = token if scheme.lower() == "bearer" else ""
    # Compare with every key, always, so timing does not tell which key came close.
    matched = False
    for key in settings.api_keys:
        matched |= hmac.compare_digest(given.encode(), key.encode())
    if not given or not matched:
        raise UnauthorizedError("send a valid API key in X-API-Key (or Authorization: Bearer)")


def _samples() -> list[Any]:
    """Every metric sample, merged across worker processes when BentoML runs several."""
    from prometheus_client import REGISTRY, CollectorRegistry
    from prometheus_client.multiprocess import MultiProcessCollector

    if os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        registry = CollectorRegistry()
        MultiProcessCollector(registry)
    else:
        registry = REGISTRY
    return [s for family in registry.collect() for s in family.samples]


def _percentile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """Interpolated percentile (seconds) from cumulative histogram buckets (le, count)."""
    buckets = sorted(buckets)
    total = buckets[-1][1] if buckets else 0
    if not total:
        return None
    rank, prev_le, prev_count = q * total, 0.0, 0.0
    for le, count in buckets:
        if count >= rank:
            if le == float("inf"):
                return prev_le
            span = count - prev_count
            return prev_le + (le - prev_le) * ((rank - prev_count) / span if span else 0.0)
        prev_le, prev_count = le, count
    return prev_le


def _latency(buckets: list[tuple[float, float]]) -> dict[str, float | None]:
    out = {}
    for name, q in (("p50_ms", 0.5), ("p95_ms", 0.95), ("p99_ms", 0.99)):
        value = _percentile(buckets, q)
        out[name] = None if value is None else round(value * 1000, 3)
    return out


def collect_stats() -> dict[str, Any]:
    """Requests, errors, latency percentiles, cache and predictions, from the metrics."""
    routes: dict[str, dict[str, Any]] = {}
    route_buckets: dict[str, list[tuple[float, float]]] = {}
    models: dict[str, dict[str, Any]] = {}
    model_buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    errors: dict[str, float] = {}
    cache = {"hit": 0.0, "miss": 0.0, "error": 0.0}
    for s in _samples():
        labels = s.labels
        if s.name == "mlserve_requests_total":
            r = routes.setdefault(labels["route"], {"requests": 0, "errors": 0})
            r["requests"] += int(s.value)
            if not labels["status"].startswith("2"):
                r["errors"] += int(s.value)
        elif s.name == "mlserve_request_latency_seconds_bucket":
            le = float(labels["le"])
            route_buckets.setdefault(labels["route"], []).append((le, s.value))
        elif s.name == "mlserve_predictions_total":
            m = models.setdefault(labels["model_version"], {"predictions": 0, "labels": {}})
            m["predictions"] += int(s.value)
            m["labels"][labels["label"]] = int(s.value)
        elif s.name == "mlserve_inference_latency_seconds_bucket":
            key = (labels["model_version"], labels["stage"])
            model_buckets.setdefault(key, []).append((float(labels["le"]), s.value))
        elif s.name == "mlserve_errors_total":
            errors[labels["type"]] = errors.get(labels["type"], 0) + s.value
        elif s.name == "mlserve_cache_total":
            cache[labels["event"]] += s.value
    for route, buckets in route_buckets.items():
        r = routes.setdefault(route, {"requests": 0, "errors": 0})
        r["latency"] = _latency(buckets)
        r["error_rate"] = round(r["errors"] / r["requests"], 4) if r["requests"] else 0.0
    for (tag, stage), buckets in model_buckets.items():
        models.setdefault(tag, {"predictions": 0, "labels": {}}).setdefault("latency", {})[
            stage
        ] = _latency(buckets)
    lookups = cache["hit"] + cache["miss"]
    served = [r for route, r in routes.items() if route in PREDICT_ROUTES]
    total_requests = sum(r["requests"] for r in served)
    total_errors = sum(r["errors"] for r in served)
    return {
        "requests": total_requests,  # prediction routes only
        "error_rate": round(total_errors / total_requests, 4) if total_requests else 0.0,
        "routes": routes,
        "models": models,
        "errors": {k: int(v) for k, v in errors.items()},
        "cache": {
            **{k: int(v) for k, v in cache.items()},
            "hit_rate": round(cache["hit"] / lookups, 4) if lookups else 0.0,
        },
    }
