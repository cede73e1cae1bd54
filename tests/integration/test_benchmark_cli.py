"""`mlserve benchmark` in process and against a running server."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from tests.integration.conftest import MLSERVE, REPO

pytestmark = pytest.mark.integration


def run_benchmark(args: list[str], env: dict[str, str], cwd) -> subprocess.CompletedProcess:
    return subprocess.run(
        [MLSERVE, "benchmark", *args], env=env, cwd=cwd, capture_output=True, text=True, timeout=300
    )


def bench(args: list[str], env: dict[str, str], cwd) -> dict:
    proc = run_benchmark([*args, "--json"], env, cwd)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


def test_in_process(model_env, tmp_path) -> None:
    result = bench(
        ["sentiment:v1", "120", "--concurrency", "8", "--repeat-share", "0.5"], model_env, tmp_path
    )
    assert result["target"] == "in-process"
    assert result["requests"] == 120 and result["errors"] == 0
    assert result["requests_per_s"] > 0
    assert 0 < result["p50_ms"] <= result["p95_ms"] <= result["p99_ms"]
    assert result["cache_hit_rate"] >= 0.3  # about half the texts repeat an earlier one


def test_against_a_server(default_server, model_env, tmp_path) -> None:
    args = ["topic:v1", "60", "--concurrency", "4", "--server", default_server.url]
    result = bench(args, model_env, tmp_path)
    assert result["target"] == default_server.url
    assert result["requests"] == 60 and result["errors"] == 0


def test_table_output_and_unknown_model(model_env, tmp_path) -> None:
    proc = run_benchmark(["sentiment:v1", "20"], model_env, tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    for figure in ("requests per s", "p50 ms", "p95 ms", "p99 ms", "errors", "cache hit rate"):
        assert figure in proc.stdout
    missing = run_benchmark(["nosuchmodel", "5"], model_env, tmp_path)
    assert missing.returncode != 0
    assert "Traceback" not in missing.stderr and "nosuchmodel" in missing.stderr


def test_paired_batch_share_against_a_server(default_server, model_env, tmp_path) -> None:
    """benchmarks.inprocess --serve, as benchmarks.bench drives it in each round: the runner
    alone, then served batches alternating with in-process ones on the same texts."""
    proc = subprocess.run(
        [sys.executable, "-m", "benchmarks.inprocess", "topic:v1", "--texts", "10", "--serve"],
        input=f"measure\npaired {default_server.url}/batch-predict 3\n",
        env=model_env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    loaded, alone, paired = (json.loads(line) for line in proc.stdout.strip().splitlines())
    assert loaded == {"loaded": "topic:v1"}
    assert alone["batch_texts_per_s"] > 0 and alone["unbatched_texts_per_s"] > 0
    assert paired["pairs"] == 3 and paired["served_ms"] > 0 and paired["in_process_ms"] > 0
    # The times are rounded to 0.01 ms and the share to 0.001, so they agree only roughly.
    assert paired["share"] == pytest.approx(paired["in_process_ms"] / paired["served_ms"], rel=0.02)
