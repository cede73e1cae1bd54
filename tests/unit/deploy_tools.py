"""Shared by the deploy/ tests: the external tools they run and the metric names they may use."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"

# Every mlserve metric as Prometheus exposes it (counters gain _total, histograms _bucket,
# _sum and _count). See mlserve/observability.py and the README's metrics table.
COUNTERS = {
    "mlserve_requests",
    "mlserve_predictions",
    "mlserve_errors",
    "mlserve_cache",
    "mlserve_connections_shed",
    "mlserve_admin_denied",  # added by the admin hardening change of issue #10
    "mlserve_batch_consumer_restarts",  # added by the batching hardening change of issue #10
    "mlserve_rate_limited",  # rate limiting, a later issue
}
HISTOGRAMS = {
    "mlserve_request_latency_seconds",
    "mlserve_inference_latency_seconds",
    "mlserve_batch_size",
    "mlserve_prediction_confidence",
}
GAUGES = {
    "mlserve_drift_score",
    "mlserve_model_loaded",
    "mlserve_cache_circuit_open",  # added with the cache hardening of issue #10
    "mlserve_ready",  # per-worker readiness, a later issue
}
KNOWN_SERIES = (
    {f"{c}_total" for c in COUNTERS}
    | {f"{h}_{s}" for h in HISTOGRAMS for s in ("bucket", "sum", "count")}
    | GAUGES
)


def metric_names(expr: str) -> set[str]:
    """The mlserve_* series an expression reads."""
    return set(re.findall(r"\bmlserve_[a-z_]+\b", expr))


def tool(*names: str) -> str:
    """The path of the first installed tool of `names`; a CI run fails without one."""
    for name in names:
        path = shutil.which(name)
        if path:
            return path
    message = f"{' or '.join(names)} is not installed (run_tests.sh installs it)"
    if os.environ.get("CI") == "true":
        pytest.fail(message)
    pytest.skip(message)


def run(cmd: list[str], cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    out = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, f"{' '.join(cmd)}\n{out.stdout}\n{out.stderr}"
    return out
