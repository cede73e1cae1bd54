"""Serving benchmark: mlserve against Seldon MLServer and a plain FastAPI app, one run.

    .venv/bin/python -m benchmarks.bench                      # topic:v1, 3 rounds of 5 s runs
    .venv/bin/python -m benchmarks.bench --rounds 5 --duration 8 --with-naive

Every contender serves the same stored model (``--model``, default ``topic:v1``: TF-IDF word and
character n-grams, logistic regression) with the same number of processes (``--workers``;
default mlserve's own, one per core), single-text requests, one after the other:

- **mlserve**: ``bentoml serve service:MLServe`` (cache off: every request reaches the model);
- **MLServer**: Seldon MLServer 1.7.1, scikit-learn runtime, adaptive batching (32 texts, 2 ms),
  ``parallel_workers`` = the worker count, in its own virtual environment
  (``benchmarks/mlserver/setup.py`` makes it on first use and rebuilds the same fitted
  pipeline from the stored model);
- **FastAPI**: ``benchmarks/fastapi_app.py``, one model call per request, in forked uvicorn
  processes (``benchmarks/multi_uvicorn.py``);
- **mlserve, 1 worker**: the same server with one worker process (1 and 32 clients), for the
  scaling from one worker to two;
- **naive BentoML** (``--with-naive``): ``benchmarks/naive_service.py`` at 32 clients.

All servers are started first and stay up; one at a time is under load, the others idle. The
contenders take turns at each step of a round (A B C at 1 client, A B C at 4, ...; the order
rotates from round to round), so drift in machine speed hits all alike; every figure is the
median over rounds. Each server answers a sweep of concurrencies (1, 4, 16, 32, 64, 128
clients; ``hey``, on the same machine). mlserve also answers ``GET /health`` at 32 clients
(the ceiling: the same server and route handling with no body, no model and no access log
line) and ``/batch-predict`` with 100 texts. The model's in-process throughput comes from
``benchmarks/inprocess.py``, one process that keeps the model loaded: in every round, right after
that batch run, it measures the runner alone, then alternates 60 served batches (one client) with
60 in-process calls on the same texts. The batch target is the median over rounds of that paired
share (in-process time over served time, each the median of its 60): the machine's speed drifts
by a third within minutes here, more than the difference being measured, and one core can run a
third slower than the other for a second or more (BENCHMARK.md, run H: with 20 pairs a round,
the rounds' shares spread from 0.62 to 1.06; with 60, from 0.84 to 1.04).

Writes ``OUT/results.json``, ``OUT/results.md`` (tables and the issue's targets) and a chart of
requests/s and p99 latency against concurrency (``--chart``, default
``benchmarks/scaling.png``, which BENCHMARK.md shows).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from benchmarks.common import TEXT, batch_texts

ROOT = Path(__file__).resolve().parent.parent
CONCURRENCY = (1, 4, 16, 32, 64, 128)
BATCH_TEXTS = 100
LATENCY_KEYS = ("rps", "p50_ms", "p95_ms", "p99_ms", "non_2xx", "responses")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def server(cmd: list[str], port: int, env: dict[str, str], ready_path: str):
    """Start ``cmd`` (environment: this one, updated by ``env``; a value of None removes the
    variable), wait until ``ready_path`` answers 200, and stop the whole process group after."""
    log = tempfile.NamedTemporaryFile("w+", suffix=".log", delete=False)  # noqa: SIM115
    full_env = {**os.environ, **env}
    full_env = {k: v for k, v in full_env.items() if v is not None}
    proc = subprocess.Popen(
        cmd, cwd=ROOT, env=full_env, stdout=log, stderr=log, start_new_session=True
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 180
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
            proc.wait(5)


def parse_hey(out: str) -> dict:
    """Requests/s, latency percentiles (ms), error count and responses from ``hey``'s report."""
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


def hey(url: str, body: dict | None, concurrency: int, duration: int) -> dict:
    """Run hey (POST ``body`` as JSON, or GET without one); return :func:`parse_hey`'s dict."""
    args = ["-c", str(concurrency)]
    if body is not None:
        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
            json.dump(body, f)
        args += ["-m", "POST", "-T", "application/json", "-D", f.name]
    args.append(url)
    # Warm-up pass so first-call costs (thread pools, allocators) are not measured. hey refuses
    # fewer requests than clients, hence at least one per client.
    warm = str(max(200, concurrency))
    subprocess.run(["hey", "-n", warm, *args], capture_output=True, check=True)
    out = subprocess.run(
        ["hey", "-z", f"{duration}s", *args], capture_output=True, text=True, check=True
    ).stdout
    return parse_hey(out)


class InProcess:
    """Texts/s of the runner itself (see benchmarks/inprocess.py): one process that loads the
    model once and measures again each time it is asked."""

    def __init__(self, tag: str, n_texts: int, repeat: int, env: dict[str, str]):
        cmd = [sys.executable, "-m", "benchmarks.inprocess", tag, "--texts", str(n_texts)]
        self._proc = subprocess.Popen(
            [*cmd, "--repeat", str(repeat), "--serve"],
            cwd=ROOT,
            env={**os.environ, **env},
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        self._read()  # {"loaded": tag}

    def _read(self) -> dict:
        line = self._proc.stdout.readline()
        if not line:
            raise SystemExit(f"benchmarks.inprocess exited with status {self._proc.wait()}")
        return json.loads(line)

    def measure(self, paired_url: str, pairs: int = 60) -> dict:
        """The runner alone, then ``pairs`` served batches (``paired_url``) each followed by an
        in-process call on the same texts."""
        self._proc.stdin.write(f"measure\npaired {paired_url} {pairs}\n")
        self._proc.stdin.flush()
        return {**self._read(), "paired": self._read()}

    def close(self) -> None:
        self._proc.stdin.close()
        self._proc.wait(timeout=30)


def in_process_summary(measured: list[dict]) -> dict:
    """The rounds' in-process figures (medians) and each round's paired batch share: the
    in-process time of a batch over its served time, measured alternately."""
    out: dict = {}
    for key in ("unbatched_texts_per_s", "batch_texts_per_s"):
        values = [m[key] for m in measured if m.get(key)]
        if values:
            out[key] = round(statistics.median(values), 1)
    paired = [m["paired"] for m in measured if m.get("paired")]
    if paired:
        out["batch_share_by_round"] = [p["share"] for p in paired]
        out["paired_ms_by_round"] = [[p["served_ms"], p["in_process_ms"]] for p in paired]
    return out


@dataclass
class Load:
    """One load run of a contender: ``key`` names it in the results."""

    key: str
    path: str
    body: dict | None
    concurrency: int


@dataclass
class Contender:
    name: str
    cmd: list[str]
    env: dict[str, str | None]
    ready_path: str
    loads: list[Load] = field(default_factory=list)
    port: int = 0


def median_of_rounds(rounds: list[dict]) -> dict:
    """Each figure's median over rounds (non-2xx: the sum, so no error hides)."""
    out = {}
    for key in rounds[0]:
        values = [r[key] for r in rounds if key in r]
        if key in ("non_2xx", "responses"):
            out[key] = sum(values)
        else:
            out[key] = round(statistics.median(values), 2)
    out["rounds_rps"] = [r.get("rps") for r in rounds]
    return out


def summarize(runs: dict[str, dict[str, list[dict]]]) -> dict[str, dict[str, dict]]:
    return {
        name: {key: median_of_rounds(rounds) for key, rounds in by_key.items()}
        for name, by_key in runs.items()
    }


def sweep_of(results: dict[str, dict]) -> list[tuple[int, dict]]:
    """A contender's ``/predict`` runs by concurrency, in order."""
    found = []
    for key, value in results.items():
        m = re.fullmatch(r"predict c=(\d+)", key)
        if m:
            found.append((int(m.group(1)), value))
    return sorted(found, key=lambda kv: kv[0])


def targets(summary: dict[str, dict[str, dict]], inproc: dict) -> list[dict]:
    """Issue #15's targets, evaluated on the medians: one row per target."""

    def get(name: str, key: str) -> dict | None:
        return summary.get(name, {}).get(key)

    rows = []
    ml32, ms32, fa32 = (get(n, "predict c=32") for n in ("mlserve", "mlserver", "fastapi"))
    if ml32 and ms32:
        ratio = ml32["rps"] / ms32["rps"]
        rows.append(
            {
                "target": "/predict, 32 clients: >= 1.5x MLServer's req/s",
                "measured": f"{ml32['rps']:.0f} / {ms32['rps']:.0f} = {ratio:.2f}x",
                "met": ratio >= 1.5,
            }
        )
    if ml32 and fa32:
        ratio = ml32["rps"] / fa32["rps"]
        rows.append(
            {
                "target": "/predict, 32 clients: >= 2.5x plain FastAPI's req/s",
                "measured": f"{ml32['rps']:.0f} / {fa32['rps']:.0f} = {ratio:.2f}x",
                "met": ratio >= 2.5,
            }
        )
    errors = sum(v.get("non_2xx", 0) for by_key in summary.values() for v in by_key.values())
    rows.append({"target": "0 errors", "measured": f"{errors} non-2xx", "met": errors == 0})
    ml1, fa1 = get("mlserve", "predict c=1"), get("fastapi", "predict c=1")
    if ml1 and fa1:
        rows.append(
            {
                "target": "/predict, 1 client: p50 and p99 no slower than plain FastAPI",
                "measured": f"p50 {ml1['p50_ms']:.2f} vs {fa1['p50_ms']:.2f} ms, "
                f"p99 {ml1['p99_ms']:.2f} vs {fa1['p99_ms']:.2f} ms",
                "met": ml1["p50_ms"] <= fa1["p50_ms"] and ml1["p99_ms"] <= fa1["p99_ms"],
            }
        )
    batch = get("mlserve", f"batch-predict {BATCH_TEXTS} texts c=1")
    if batch and inproc.get("batch_share_by_round"):
        by_round = inproc["batch_share_by_round"]
        share = statistics.median(by_round)
        rows.append(
            {
                "target": f"/batch-predict of {BATCH_TEXTS} texts: >= 85 % of in-process",
                "measured": f"median of the rounds' paired shares {share:.0%} ("
                + ", ".join(f"{s:.0%}" for s in by_round)
                + f"); hey's batch run against the runner alone: "
                f"{batch['rps'] * BATCH_TEXTS:.0f} / {inproc['batch_texts_per_s']:.0f} texts/s",
                "met": share >= 0.85,
            }
        )
    elif batch and inproc.get("batch_texts_per_s"):
        share = batch["rps"] * BATCH_TEXTS / inproc["batch_texts_per_s"]
        rows.append(
            {
                "target": f"/batch-predict of {BATCH_TEXTS} texts: >= 85 % of in-process",
                "measured": f"{batch['rps'] * BATCH_TEXTS:.0f} / "
                f"{inproc['batch_texts_per_s']:.0f} texts/s = {share:.0%}",
                "met": share >= 0.85,
            }
        )
    health = get("mlserve", "health c=32")
    if ml32 and health:
        share = ml32["rps"] / health["rps"]
        rows.append(
            {
                "target": "the ceiling: /predict at 32 clients as a share of a no-op route",
                "measured": f"{ml32['rps']:.0f} / {health['rps']:.0f} = {share:.0%}",
                "met": None,
            }
        )
    one = get("mlserve (1 worker)", "predict c=32")
    if ml32 and one:
        rows.append(
            {
                "target": "scaling: /predict at 32 clients, 2 workers against 1",
                "measured": f"{ml32['rps']:.0f} / {one['rps']:.0f} = "
                f"{ml32['rps'] / one['rps']:.2f}x",
                "met": None,
            }
        )
    return rows


def write_chart(summary: dict[str, dict[str, dict]], path: Path, title: str) -> bool:
    """A PNG of requests/s and p99 latency against concurrency, one line per contender with a
    sweep. False (and no file) when matplotlib is not installed."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, (ax_rps, ax_p99) = plt.subplots(1, 2, figsize=(11, 4.2))
    for name, results in summary.items():
        sweep = sweep_of(results)
        if len(sweep) < 3:
            continue
        xs = [c for c, _ in sweep]
        ax_rps.plot(xs, [v["rps"] for _, v in sweep], marker="o", label=name)
        ax_p99.plot(xs, [v["p99_ms"] for _, v in sweep], marker="o", label=name)
    for ax, ylabel in ((ax_rps, "requests/s"), (ax_p99, "p99 latency (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xticks(list(CONCURRENCY), [str(c) for c in CONCURRENCY])
        ax.set_xlabel("concurrent clients")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
    ax_p99.set_yscale("log")
    ax_rps.legend()
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def markdown(summary: dict[str, dict[str, dict]], rows: list[dict], inproc: dict) -> str:
    lines = [
        "| contender | run | req/s | p50 ms | p95 ms | p99 ms | non-2xx | req/s by round |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, by_key in summary.items():
        for key, v in by_key.items():
            rounds = ", ".join(f"{r:.0f}" for r in v.get("rounds_rps", []))
            lines.append(
                f"| {name} | {key} | {v['rps']:.1f} | {v['p50_ms']:.2f} | {v['p95_ms']:.2f} "
                f"| {v['p99_ms']:.2f} | {v['non_2xx']} | {rounds} |"
            )
    lines += [
        "",
        f"In process: {inproc.get('unbatched_texts_per_s')} texts/s one at a time, "
        f"{inproc.get('batch_texts_per_s')} texts/s in {BATCH_TEXTS}-text batches.",
        "",
        "| target | measured | met |",
        "|---|---|---|",
    ]
    for row in rows:
        met = {True: "yes", False: "**no**", None: ""}[row["met"]]
        lines.append(f"| {row['target']} | {row['measured']} | {met} |")
    return "\n".join(lines) + "\n"


def machine() -> dict:
    cpu = platform.processor()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="minutes"),
    }


def contenders(args: argparse.Namespace, workdir: Path) -> list[Contender]:
    py = sys.executable
    workers = str(args.workers)
    base = {"HF_HUB_OFFLINE": "1", "BENCH_WORKERS": workers, "BENCH_MODEL": args.model}
    body = {"text": TEXT, "model_version": args.model}
    sweep = [Load(f"predict c={c}", "/predict", body, c) for c in args.concurrency]
    mlserve_env = {
        **base,
        "MLSERVE_MODELS": args.model,
        # Every request repeats one text: the cache would answer from memory. The comparison
        # is about serving the model, so the cache is off (BENCHMARK.md measures it apart).
        "MLSERVE_CACHE_ENABLED": "false",
    }
    bento = [py, "-m", "bentoml", "serve", "service:MLServe", "--host", "127.0.0.1"]
    batch_body = {
        "texts": batch_texts(BATCH_TEXTS),
        "model_version": args.model,
    }
    out = [
        Contender(
            "mlserve",
            bento,
            {**mlserve_env, "MLSERVE_WORKERS": workers},
            "/ready",
            [
                *sweep,
                Load("health c=32", "/health", None, 32),
                Load(f"batch-predict {BATCH_TEXTS} texts c=1", "/batch-predict", batch_body, 1),
            ],
        )
    ]
    if not args.skip_mlserver:
        from benchmarks.mlserver import setup as mls

        exe = mls.ensure_venv()
        out.append(
            Contender(
                "mlserver",
                [str(exe), "start", str(workdir / "mlserver")],
                # Its own environment: nothing of this one's Python path.
                {**base, "PYTHONPATH": None, "VIRTUAL_ENV": None},
                f"/v2/models/{mls.MODEL_NAME}/ready",
                [
                    Load(
                        f"predict c={c}",
                        f"/v2/models/{mls.MODEL_NAME}/infer",
                        mls.request_body(TEXT),
                        c,
                    )
                    for c in args.concurrency
                ],
            )
        )
    # Not `uvicorn --workers`: its workers' connections lack TCP_NODELAY (see multi_uvicorn.py).
    out.append(
        Contender(
            "fastapi",
            [py, "-m", "benchmarks.multi_uvicorn", "benchmarks.fastapi_app:app"],
            {**base},
            "/docs",
            list(sweep),
        )
    )
    if args.workers > 1:
        out.append(
            Contender(
                "mlserve (1 worker)",
                bento,
                {**mlserve_env, "MLSERVE_WORKERS": "1"},
                "/ready",
                [ld for ld in sweep if ld.concurrency in (1, 32)],
            )
        )
    if args.with_naive:
        out.append(
            Contender(
                "naive bentoml",
                [py, "-m", "bentoml", "serve", "benchmarks.naive_service:Naive"],
                {**base},
                "/readyz",
                [ld for ld in sweep if ld.concurrency == 32],
            )
        )
    return out


def schedule(todo: list[Contender], round_no: int) -> list[tuple[int, Contender, Load]]:
    """One round's load runs: each contender's n-th run, contender after contender (in an order
    that rotates from round to round), then every (n+1)-th, so the runs that are compared
    (the same concurrency) are minutes apart at most."""
    shift = round_no % len(todo)
    order = todo[shift:] + todo[:shift]
    out = []
    for step in range(max(len(c.loads) for c in todo)):
        out += [(step, c, c.loads[step]) for c in order if step < len(c.loads)]
    return out


def command_for(c: Contender, port: int) -> list[str]:
    if c.name == "mlserver":
        return c.cmd
    if c.name == "fastapi":
        return [*c.cmd, "--port", str(port), "--workers", c.env["BENCH_WORKERS"]]
    return [*c.cmd, "--port", str(port)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="topic:v1", help="a stored classical model")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--duration", type=int, default=5, help="seconds per load run")
    parser.add_argument(
        "--concurrency",
        type=lambda s: tuple(int(c) for c in s.split(",")),
        default=CONCURRENCY,
        help="comma-separated client counts of the sweep",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument("--chart", type=Path, default=ROOT / "benchmarks" / "scaling.png")
    parser.add_argument("--skip-mlserver", action="store_true")
    parser.add_argument("--with-naive", action="store_true", help="add naive BentoML (c=32)")
    parser.add_argument(
        "--workers", type=int, default=0, help="processes of every server (0 = auto)"
    )
    args = parser.parse_args()
    if not args.workers:
        from mlserve.settings import Settings

        args.workers = Settings(_env_file=None).effective_workers
    if not shutil.which("hey"):
        sys.exit("hey is not installed (apt-get install hey)")
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict = {
        "machine": {**machine(), "workers": args.workers},
        "settings": {
            "model": args.model,
            "rounds": args.rounds,
            "duration_s": args.duration,
            "text": TEXT,
        },
    }
    runs: dict[str, dict[str, list[dict]]] = {}
    with tempfile.TemporaryDirectory(prefix="mlserve-bench-") as tmp:
        workdir = Path(tmp)
        todo = contenders(args, workdir)
        for c in todo:
            c.port = free_port()
            if c.name == "mlserver":
                from benchmarks.mlserver import setup as mls

                mls.write_repository(
                    args.model,
                    workdir / "mlserver",
                    workers=args.workers,
                    http_port=c.port,
                    grpc_port=free_port(),
                    metrics_port=free_port(),
                )
        batch_key = f"batch-predict {BATCH_TEXTS} texts c=1"
        measured: list[dict] = []
        with contextlib.ExitStack() as stack:
            reference = InProcess(args.model, BATCH_TEXTS, 5, {"HF_HUB_OFFLINE": "1"})
            stack.callback(reference.close)
            urls = {
                c.name: stack.enter_context(
                    server(command_for(c, c.port), c.port, c.env, c.ready_path)
                )
                for c in todo
            }
            for round_no in range(args.rounds):
                for _step, c, load in schedule(todo, round_no):
                    url = urls[c.name] + load.path
                    r = hey(url, load.body, load.concurrency, args.duration)
                    runs.setdefault(c.name, {}).setdefault(load.key, []).append(r)
                    print(f"round {round_no + 1} {c.name:20s} {load.key:28s} {r}", flush=True)
                    if c.name == "mlserve" and load.key == batch_key:
                        measured.append(reference.measure(url))
                        print(f"round {round_no + 1} in-process {measured[-1]}", flush=True)
    inproc = in_process_summary(measured)
    print(f"in-process {inproc}", flush=True)
    summary = summarize(runs)
    rows = targets(summary, inproc)
    results.update(runs=runs, median=summary, in_process=inproc, targets=rows)
    (args.out / "results.json").write_text(json.dumps(results, indent=1))
    table = markdown(summary, rows, inproc)
    (args.out / "results.md").write_text(table)
    m = results["machine"]
    title = (
        f"{args.model}, {args.workers} processes each, single-text requests; "
        f"{m['cores']} cores: {m['cpu']}; medians of {args.rounds} rounds"
    )
    if write_chart(summary, args.chart, title):
        print(f"chart: {args.chart}")
    print(table)


if __name__ == "__main__":
    main()
