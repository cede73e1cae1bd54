"""Admin authentication and live statistics.

Every admin route needs ``Authorization: Bearer <MLSERVE_ADMIN_TOKEN>``, compared in constant
time. With no token configured (or ``MLSERVE_ADMIN_ENABLED=false``) the admin routes answer 403.
Statistics come from the Prometheus metrics, which are aggregated across all worker processes.
"""

from __future__ import annotations

import contextlib
import datetime
import fcntl
import hashlib
import hmac
import json
import logging
import math
import os
import threading
import time
from collections.abc import Callable, Iterator
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
    """Append-only JSON lines, rotated by size.

    Each line is one ``write`` on an ``O_APPEND`` descriptor, synced to disk before the call
    returns, under an exclusive lock on a sidecar file (``<log>.lock``), so the lines of several
    workers never interleave and only one of them rotates. When a line would take the file past
    ``max_bytes``, ``<log>`` becomes ``<log>.1``, ``<log>.1`` becomes ``<log>.2`` and so on;
    ``backups`` old files are kept.
    """

    def __init__(self, path: str | Path, max_bytes: int = 10 << 20, backups: int = 5):
        self.path = Path(path)
        self.max_bytes, self.backups = max_bytes, backups

    def _open(self) -> int:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)

    # Free space below which a change is refused: a line is well under 4 KiB, and a rotation
    # needs no space (renames).
    min_free_bytes = 64 << 10

    def check(self) -> None:
        """Refuse (503) to make a change that could not be recorded: the log cannot be opened
        for writing (missing permission, a read-only file system) or its disk is (nearly) full.
        Opening an existing file on a full disk succeeds, so free space is checked too."""
        try:
            os.close(self._open())
            fs = os.statvfs(self.path.parent)
        except OSError as exc:
            raise ServiceUnavailableError(
                "the admin audit log cannot be written; no change was made",
                reason=f"{type(exc).__name__}: {exc.strerror or exc}",
            ) from exc
        free = fs.f_bavail * fs.f_frsize
        if fs.f_flag & os.ST_RDONLY or free < self.min_free_bytes:
            raise ServiceUnavailableError(
                "the admin audit log cannot be written; no change was made",
                reason="read-only file system" if fs.f_flag & os.ST_RDONLY else "disk full",
                free_bytes=free,
            )

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock = os.open(self.path.with_name(self.path.name + ".lock"), os.O_RDWR | os.O_CREAT, 0o600)
        try:
            fcntl.flock(lock, fcntl.LOCK_EX)
            yield
        finally:
            os.close(lock)

    def write(self, entry: dict[str, Any]) -> None:
        line = (json.dumps(entry, sort_keys=True, default=str) + "\n").encode()
        with self._locked():
            self._rotate_before(len(line))
            fd = self._open()
            try:
                os.write(fd, line)
                os.fsync(fd)
            finally:
                os.close(fd)

    def rotated(self) -> list[Path]:
        """The kept old files, newest first."""
        found = []
        for path in self.path.parent.glob(self.path.name + ".*"):
            suffix = path.name[len(self.path.name) + 1 :]
            if suffix.isdigit():
                found.append((int(suffix), path))
        return [path for _, path in sorted(found)]

    def _rotate_before(self, incoming: int) -> None:
        try:
            size = self.path.stat().st_size
        except FileNotFoundError:
            return
        if size == 0 or size + incoming <= self.max_bytes:
            return
        for path in self.rotated():  # left over from a larger MLSERVE_AUDIT_BACKUPS
            if int(path.name.rsplit(".", 1)[1]) >= self.backups:
                path.unlink(missing_ok=True)
        for i in range(self.backups, 0, -1):
            src = self.path if i == 1 else self.path.with_name(f"{self.path.name}.{i - 1}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i}"))


class AdminAudit:
    """What the admin API writes to the audit log.

    * Every authenticated call's outcome (a change, or an error) is written in full, durably.
    * A denied call (no or a bad token, admin off) is counted in ``mlserve_admin_denied_total``
      by route and reason, and written only as a summary: at most one line per client per
      ``MLSERVE_AUDIT_DENIED_INTERVAL_SECONDS``, carrying the count since the last one, and at
      most ``max_clients`` clients per interval (the rest are summed under ``"*"``). A flood of
      denied calls therefore costs a few lines, never one per call.
    """

    def __init__(
        self,
        settings: Any,
        worker_id: str,
        clock: Callable[[], float] = time.monotonic,
        max_clients: int = 16,
    ):
        self.log = AuditLog(settings.audit_log, settings.audit_max_bytes, settings.audit_backups)
        self.interval = settings.audit_denied_interval_seconds
        self.worker_id = worker_id
        self.max_clients = max_clients
        self._clock = clock
        self._pending: dict[str, dict[str, Any]] = {}  # client -> denials since its last line
        self._written: dict[str, float] = {}  # client -> when its last line was written
        self._lock = threading.Lock()

    def record(self, entry: dict[str, Any]) -> None:
        """Write one authenticated admin call (raises OSError if the log cannot be written)."""
        self.log.write(entry)

    def denied(self, route: str, reason: str, client: str | None) -> None:
        from mlserve import observability as obs

        obs.observe_admin_denied(route, reason)
        now = self._clock()
        with self._lock:
            for key, when in list(self._written.items()):
                if now - when >= self.interval and key not in self._pending:
                    del self._written[key]
            key = client or "unknown"
            known = self._written.keys() | self._pending.keys()
            if key not in known and len(known) >= self.max_clients:
                key = "*"
            pending = self._pending.setdefault(
                key, {"count": 0, "routes": {}, "reasons": {}, "since": _now_iso()}
            )
            pending["count"] += 1
            pending["routes"][route] = pending["routes"].get(route, 0) + 1
            pending["reasons"][reason] = pending["reasons"].get(reason, 0) + 1
            if now - self._written.get(key, -math.inf) < self.interval:
                return
            self._written[key] = now
            summary = self._pending.pop(key)
        self._write_summary(key, summary)

    def flush(self) -> None:
        """Write the summaries still pending (at shutdown)."""
        with self._lock:
            pending, self._pending = self._pending, {}
        for key, summary in pending.items():
            self._write_summary(key, summary)

    def _write_summary(self, client: str, summary: dict[str, Any]) -> None:
        entry = {
            "ts": _now_iso(),
            "action": "denied",
            "result": "denied",
            "client": client,
            "worker": self.worker_id,
            **summary,
        }
        try:
            self.log.write(entry)
        except OSError as exc:
            logging.getLogger("mlserve.admin").error("audit log write failed: %r", exc)


def _now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


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
    from mlserve.observability import collector_registry

    return [s for family in collector_registry().collect() for s in family.samples]


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


def comparisons(samples: list[Any], name: str | None = None) -> list[dict[str, Any]]:
    """The comparison of every (primary, shadow) pair (of model ``name``, or all), from the
    ``mlserve_shadow_*`` metrics merged over this server's workers: agreement rate, mean
    absolute probability difference, each version's label distribution and latency, shadow
    errors and drops, and the number of compared texts and requests."""
    pairs: dict[tuple[str, str], dict[str, Any]] = {}
    buckets: dict[tuple[str, str, str], list[tuple[float, float]]] = {}
    sums: dict[tuple[str, str, str], float] = {}

    def pair_of(labels: dict[str, str]) -> dict[str, Any] | None:
        primary, shadow = labels["primary"], labels["shadow"]
        if name is not None and primary.split(":", 1)[0] != name:
            return None
        return pairs.setdefault(
            (primary, shadow),
            {
                "primary": primary,
                "shadow": shadow,
                "comparisons": 0,
                "requests": {"compared": 0, "dropped": 0, "error": 0},
                "agreements": 0,
                "probability_difference_sum": 0.0,
                "labels": {"primary": {}, "shadow": {}},
            },
        )

    for s in samples:
        if not s.name.startswith("mlserve_shadow_"):
            continue
        pair = pair_of(s.labels)
        if pair is None:
            continue
        key = (s.labels["primary"], s.labels["shadow"], s.labels.get("role", ""))
        if s.name == "mlserve_shadow_runs_total":
            pair["requests"][s.labels["outcome"]] += int(s.value)
        elif s.name == "mlserve_shadow_comparisons_total":
            pair["comparisons"] += int(s.value)
        elif s.name == "mlserve_shadow_agreements_total":
            pair["agreements"] += int(s.value)
        elif s.name == "mlserve_shadow_probability_difference_total":
            pair["probability_difference_sum"] += s.value
        elif s.name == "mlserve_shadow_labels_total":
            role = pair["labels"][s.labels["role"]]
            role[s.labels["label"]] = role.get(s.labels["label"], 0) + int(s.value)
        elif s.name == "mlserve_shadow_latency_seconds_bucket":
            buckets.setdefault(key, []).append((float(s.labels["le"]), s.value))
        elif s.name == "mlserve_shadow_latency_seconds_sum":
            sums[key] = sums.get(key, 0.0) + s.value
    out = []
    for (primary, shadow), pair in sorted(pairs.items()):
        n = pair["comparisons"]
        latency = {}
        for role in ("primary", "shadow"):
            found = buckets.get((primary, shadow, role), [])
            count = max((c for _, c in found), default=0)
            total = sums.get((primary, shadow, role), 0.0)
            latency[role] = {
                **_latency(found),
                "mean_ms": round(total / count * 1000, 3) if count else None,
            }
        out.append(
            {
                "primary": primary,
                "shadow": shadow,
                "comparisons": n,
                "requests": pair["requests"]["compared"],
                "agreement_rate": round(pair["agreements"] / n, 4) if n else None,
                "mean_abs_probability_difference": (
                    round(pair["probability_difference_sum"] / n, 6) if n else None
                ),
                "labels": pair["labels"],
                "latency": latency,
                "shadow_errors": pair["requests"]["error"],
                "shadow_dropped": pair["requests"]["dropped"],
            }
        )
    return out


def collect_stats() -> dict[str, Any]:
    """Requests, errors, latency percentiles, cache and predictions, from the metrics."""
    routes: dict[str, dict[str, Any]] = {}
    route_buckets: dict[str, list[tuple[float, float]]] = {}
    models: dict[str, dict[str, Any]] = {}
    model_buckets: dict[tuple[str, str], list[tuple[float, float]]] = {}
    errors: dict[str, float] = {}
    cache = {"hit": 0.0, "miss": 0.0, "error": 0.0}
    samples = _samples()
    for s in samples:
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
        "comparisons": comparisons(samples),
    }
