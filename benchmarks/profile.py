"""Where the workers' CPU goes under load: py-spy on every mlserve worker, stacks sorted into parts.

    .venv/bin/python -m benchmarks.profile --clients 32 --clients 1 --seconds 10

Serves ``--model`` (default topic:v1) with ``bentoml serve service:MLServe`` (2 workers, cache
off), loads ``/predict`` with ``hey`` at each client count and samples every worker with
``py-spy record --gil`` (``pip install py-spy``, or ``--py-spy PATH``) meanwhile: only samples of
the thread holding the GIL, so every sample is the worker's Python (and GIL-holding C) work, and
threads that wait (the model thread between batches, the heartbeat) are left out. Each sampled
stack is put in the part of the first frame, from the innermost out, that matches one of
:data:`PARTS` (a stack with no match: ``other``). Prints, per client count, each part's share
of the samples and its time per request (all workers' samples over all requests); writes the
raw stacks to ``OUT/profile-c{N}-w{worker}.txt``.
"""

from __future__ import annotations

import argparse
import collections
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.bench import ROOT, free_port, hey, server
from benchmarks.common import TEXT

# (part, pattern on a frame "function (path)"), tried from the innermost frame outwards.
PARTS: list[tuple[str, str]] = [
    ("model: TF-IDF features", r"sklearn/feature_extraction|scipy/sparse|TfidfUnion"),
    ("model: estimator", r"sklearn/linear_model|sklearn/utils|sklearn/base|threadpoolctl"),
    ("model: calibration", r"mlserve/calibration"),
    ("model thread: executor", r"concurrent/futures/thread"),
    ("metrics (prometheus_client)", r"prometheus_client"),
    ("access log (logging)", r"/logging/|JsonFormatter|json_logger"),
    ("JSON encode", r"json/encoder|json/__init__|orjson|JSONResponse|render \("),
    ("request body read + validation", r"_read_body|model_validate_json|pydantic"),
    ("drift window", r"mlserve/drift"),
    ("batcher", r"mlserve/batching"),
    ("mlserve request path (http.py, core.py, balance.py)", r"mlserve/"),
    ("FastAPI / Starlette routing", r"fastapi/|starlette/routing|starlette/requests"),
    ("BentoML middlewares / app", r"bentoml/|_bentoml_impl|starlette/middleware|opentelemetry"),
    ("HTTP parser + protocol (uvicorn h11/httptools)", r"uvicorn/protocols|/h11/|httptools"),
    ("ASGI app wrappers (uvicorn, starlette)", r"uvicorn/|starlette/"),
    ("event loop (asyncio / uvloop)", r"asyncio/|uvloop|selectors"),
]


def part_of(stack: list[str]) -> str:
    """The part of a stack (outermost frame first, as py-spy writes them)."""
    for frame in reversed(stack):
        for name, pattern in PARTS:
            if re.search(pattern, frame):
                return name
    return "other"


def breakdown(raw: str) -> collections.Counter:
    """Samples per part from py-spy's raw (collapsed) output: ``frame;frame;... count``."""
    counts: collections.Counter = collections.Counter()
    for line in raw.splitlines():
        stack, _, n = line.rpartition(" ")
        if not stack or not n.isdigit():
            continue
        counts[part_of(stack.split(";"))] += int(n)
    return counts


def worker_pids(port: int) -> list[int]:
    """The worker processes of the ``bentoml serve`` listening on ``port``."""
    import psutil

    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if "serve" in cmdline and str(port) in cmdline:
            children = proc.children(recursive=True)
            return [c.pid for c in children if "_bentoml_impl.worker.service" in c.cmdline()]
    return []


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="topic:v1")
    parser.add_argument("--clients", type=int, action="append")
    parser.add_argument("--seconds", type=int, default=10)
    parser.add_argument("--rate", type=int, default=250, help="py-spy samples per second")
    parser.add_argument("--workers", type=int, default=2)
    beside = Path(sys.executable).parent / "py-spy"  # the dev extra's, in the venv
    default_spy = str(beside) if beside.exists() else shutil.which("py-spy") or "py-spy"
    parser.add_argument("--py-spy", default=default_spy)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "MLSERVE_MODELS": args.model,
        "MLSERVE_WORKERS": str(args.workers),
        "MLSERVE_CACHE_ENABLED": "false",
        "HF_HUB_OFFLINE": "1",
    }
    body = {"text": TEXT, "model_version": args.model}
    port = free_port()
    cmd = [sys.executable, "-m", "bentoml", "serve", "service:MLServe", "--port", str(port)]
    with server(cmd, port, env, "/ready") as url:
        pids = worker_pids(port)
        for clients in args.clients or [32, 1]:
            raws = [args.out / f"profile-c{clients}-w{i}.txt" for i in range(len(pids))]
            spies = []
            for pid, raw in zip(pids, raws, strict=True):
                spy_cmd = [args.py_spy, "record", "--pid", str(pid), "--gil", "--nolineno"]
                spy_cmd += ["--format", "raw", "--rate", str(args.rate)]
                spies.append(
                    subprocess.Popen(
                        [*spy_cmd, "--output", str(raw)],
                        stdout=subprocess.DEVNULL,
                        stderr=subprocess.DEVNULL,
                    )
                )
            time.sleep(1.0)
            started = time.perf_counter()
            r = hey(url + "/predict", body, clients, args.seconds)
            sampled = time.perf_counter() - started
            for spy in spies:
                spy.send_signal(signal.SIGINT)  # py-spy writes its file and exits
            for spy in spies:
                spy.wait(60)
            counts = sum((breakdown(raw.read_text()) for raw in raws), collections.Counter())
            total = sum(counts.values())
            # Every worker's samples over every request sent while they were taken (hey's
            # warm-up of 200 requests, or one per client, included); the second before the load
            # adds a few idle samples.
            requests = r["responses"] + (max(200, clients) // clients) * clients
            per_request_ms = total / args.rate / requests * 1000 if requests else 0.0
            print(f"\n## {clients} client(s): {r}")
            print(
                f"GIL-holding time per request, all workers: {per_request_ms:.3f} ms "
                f"({total} samples at {args.rate}/s over {sampled:.1f} s)"
            )
            print("| part | share | us per request |\n|---|---|---|")
            for name, n in counts.most_common():
                share = n / total
                print(f"| {name} | {share:.1%} | {share * per_request_ms * 1000:.0f} |")


if __name__ == "__main__":
    main()
