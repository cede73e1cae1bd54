"""Serving benchmark: mlserve vs a plain FastAPI app vs a naive BentoML service, one run.

    .venv/bin/python -m benchmarks.bench --duration 20 --out benchmarks/results

Each server runs alone, all with the same number of worker processes (``--workers``; default
mlserve's own default, one per core), against the same stored models in BENTOML_HOME; load
comes from ``hey`` (Debian package) on the same machine. Results go to ``OUT/results.json``
and a markdown table to ``OUT/results.md``; BENCHMARK.md quotes them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parent.parent
TEXT = (
    "I have been taking this medication for three months. It helped my migraines a lot, "
    "although I had some nausea during the first week."
)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict[str, str], ready_path: str):
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env={**os.environ, **env}, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url + ready_path, timeout=2).status_code == 200:
                    break
            if proc.poll() is not None:
                raise RuntimeError(f"server exited: {Path(log.name).read_text()[-2000:]}")
            time.sleep(0.5)
        else:
            raise RuntimeError(f"server not ready: {Path(log.name).read_text()[-2000:]}")
        yield url
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


def hey(url: str, body: dict, concurrency: int, duration: int) -> dict:
    """Run hey; return requests/s, latency percentiles (ms) and non-2xx count."""
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(body, f)
    args = ["-c", str(concurrency), "-m", "POST", "-T", "application/json", "-D", f.name, url]
    # Warm-up pass so first-call costs (thread pools, allocators) are not measured.
    subprocess.run(["hey", "-n", "200", *args], capture_output=True, check=True)
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", *args], capture_output=True, text=True, check=True
    ).stdout
    rps = float(re.search(r"Requests/sec:\s+([\d.]+)", out).group(1))
    pct = {
        int(m.group(1)): float(m.group(2)) * 1000
        for m in re.finditer(r"(\d+)%+ in ([\d.]+) secs", out)
    }
    codes = {int(c): int(n) for c, n in re.findall(r"\[(\d+)\]\s+(\d+) responses", out)}
    errors = sum(n for c, n in codes.items() if not 200 <= c < 300)
    if "Error distribution:" in out:  # connection-level errors: "  [count]\tmessage"
        errors += sum(
            int(n) for n in re.findall(r"\[(\d+)\]\s", out.split("Error distribution:")[1])
        )
    return {
        "rps": round(rps, 1),
        "p50_ms": round(pct.get(50, float("nan")), 2),
        "p95_ms": round(pct.get(95, float("nan")), 2),
        "p99_ms": round(pct.get(99, float("nan")), 2),
        "non_2xx": errors,
        "responses": sum(codes.values()),
    }


def in_process(tag: str, n_texts: int, repeat: int) -> dict:
    """Texts/s of the runner itself (see benchmarks/inprocess.py), in a fresh process."""
    cmd = [sys.executable, "-m", "benchmarks.inprocess", tag, "--texts", str(n_texts)]
    out = subprocess.run(
        [*cmd, "--repeat", str(repeat)], cwd=ROOT, capture_output=True, text=True, check=True
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--duration", type=int, default=20, help="seconds per load run")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--skip-transformer", action="store_true")
    parser.add_argument(
        "--workers", type=int, default=0, help="worker processes of every server (0 = auto)"
    )
    args = parser.parse_args()
    if not args.workers:
        from mlserve.settings import Settings

        args.workers = Settings(_env_file=None).effective_workers
    if not shutil.which("hey"):
        sys.exit("hey is not installed (apt-get install hey)")
    args.out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    workers = str(args.workers)
    env = {
        "HF_HUB_OFFLINE": "1",
        "MLSERVE_WORKERS": workers,
        "BENCH_WORKERS": workers,
        "BENCH_MODEL": "sentiment:v1",
    }
    results: dict[str, dict] = {
        "machine": {"cores": os.cpu_count(), "workers": args.workers},
        "runs": {},
    }
    runs = results["runs"]

    def record(name: str, value: dict) -> None:
        runs[name] = value
        print(f"{name:45s} {value}", flush=True)

    body = {"text": TEXT}
    port = free_port()
    # Every request repeats one text: with the cache on, mlserve would answer from it. The
    # comparison is about serving the model, so the cache is off here (BENCHMARK.md measures it
    # separately).
    mlserve_env = {
        **env,
        "MLSERVE_MODELS": "sentiment:v1,sentiment:v2",
        "MLSERVE_CACHE_ENABLED": "false",
    }
    cmd = [py, "-m", "bentoml", "serve", "service:MLServe", "--port", str(port)]
    with server(cmd, port, mlserve_env, "/ready") as url:
        for c in (1, 32, 64):
            record(
                f"mlserve /predict classical c={c}", hey(url + "/predict", body, c, args.duration)
            )
        batch_body = {"texts": [f"{TEXT} ({i})" for i in range(100)]}
        r = hey(url + "/batch-predict", batch_body, 1, args.duration)
        r["texts_per_s"] = round(r["rps"] * 100, 1)
        record("mlserve /batch-predict 100 texts c=1", r)
        if not args.skip_transformer:
            tbody = {"text": TEXT, "model_version": "sentiment:v2"}
            for c in (1, 32):
                record(
                    f"mlserve /predict transformer c={c}",
                    hey(url + "/predict", tbody, c, args.duration),
                )

    port = free_port()
    # Not `uvicorn --workers`: its workers' connections lack TCP_NODELAY (see multi_uvicorn.py).
    app = "benchmarks.fastapi_app:app"
    cmd = [py, "-m", "benchmarks.multi_uvicorn", app, "--port", str(port), "--workers", workers]
    with server(cmd, port, env, "/docs") as url:
        for c in (1, 32, 64):
            record(
                f"fastapi /predict classical c={c}", hey(url + "/predict", body, c, args.duration)
            )

    port = free_port()
    cmd = [py, "-m", "bentoml", "serve", "benchmarks.naive_service:Naive", "--port", str(port)]
    with server(cmd, port, env, "/readyz") as url:
        record(
            "naive bentoml /predict classical c=32", hey(url + "/predict", body, 32, args.duration)
        )

    record("in-process classical", in_process("sentiment:v1", 100, 5))
    if not args.skip_transformer:
        record("in-process transformer", in_process("sentiment:v2", 32, 3))

    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    lines = [
        "| run | req/s | p50 ms | p95 ms | p99 ms | non-2xx | extra |",
        "|---|---|---|---|---|---|---|",
    ]
    for name, v in runs.items():
        extra = {
            k: v[k]
            for k in v
            if k not in ("rps", "p50_ms", "p95_ms", "p99_ms", "non_2xx", "responses")
        }
        lines.append(
            f"| {name} | {v.get('rps', '')} | {v.get('p50_ms', '')} | {v.get('p95_ms', '')} "
            f"| {v.get('p99_ms', '')} | {v.get('non_2xx', '')} | {extra or ''} |"
        )
    (args.out / "results.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
