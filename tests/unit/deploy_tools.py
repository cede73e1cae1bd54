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
# _sum and _count), read from mlserve/observability.py itself, plus the metrics of issues not
# built yet that the alert rules already watch.
PENDING_COUNTERS: set[str] = set()  # metrics of issues not built yet (none left)


def _declared() -> dict[str, set[str]]:
    from mlserve.observability import metrics

    kinds: dict[str, set[str]] = {"counter": set(), "histogram": set(), "gauge": set()}
    for metric in vars(metrics()).values():
        kinds[metric._type].add(metric._name)
    return kinds


_KINDS = _declared()
COUNTERS = _KINDS["counter"] | PENDING_COUNTERS
HISTOGRAMS = _KINDS["histogram"]
GAUGES = _KINDS["gauge"]
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
