"""Overload: 256 clients flood the transformer, resending at once or honouring Retry-After.

    python -m benchmarks.overload --rounds 2 --duration 15

One server (2 workers, cache off, ``MLSERVE_INFER_TIMEOUT_SECONDS=2``) serves ``sentiment:v2``
and ``topic:v1`` from ``BENTOML_HOME``. Each round floods the transformer three times, the three
kinds of client taking turns:
- **resend**: ``hey -c 256``, every client sends again the moment it has an answer, a refusal
  included (the setting of ``tests/integration/test_overload.py``);
- **honour**: 256 asyncio clients that, refused with 503, wait the ``Retry-After`` seconds before
  they send again, as a client library does when it retries a 503 (urllib3's ``Retry``, for one,
  honours the header by default); every other answer is followed at once by the next request;
- **jitter**: the same, each wait drawn between one and two times Retry-After, so the clients
  refused together do not all come back together.

Meanwhile one client probes the classical ``topic:v1`` without pause (from the flood's second
second on), against its idle latency measured first. Writes ``OUT/overload.json`` and
``OUT/overload.md``: per kind of client, the answers and refusals with their latencies, the
timeouts (504) and the classical probe, medians over the rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import csv
import json
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import httpx

from benchmarks.bench import ROOT, free_port, server

REVIEW = (
    "I have been taking this medication for three months. It helped my migraines a lot, "
    "although I had some nausea during the first week."
)
FLOOD = {"text": REVIEW, "model_version": "sentiment:v2"}
PROBE = {"text": "The striker scored twice in the final", "model_version": "topic:v1"}
CLIENTS = 256


def percentile(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


async def _honouring_clients(
    url: str, duration: float, clients: int, jitter: bool = False
) -> list[tuple[str, float]]:
    """``clients`` clients for ``duration`` s; a 503 makes its client wait Retry-After (with
    ``jitter``, between one and two times Retry-After, drawn uniformly). aiohttp,
    not httpx: httpx's pool with 256 connections cost the client more than the server, and its
    own queueing showed up as latency."""
    import aiohttp

    rows: list[tuple[str, float]] = []
    rng = random.Random(0)
    end = time.perf_counter() + duration
    body = json.dumps(FLOOD).encode()
    headers = {"Content-Type": "application/json"}

    async def one(session: aiohttp.ClientSession) -> None:
        while time.perf_counter() < end:
            start = time.perf_counter()
            retry = None
            try:
                async with session.post(f"{url}/predict", data=body, headers=headers) as r:
                    await r.read()
                    status, retry = str(r.status), r.headers.get("Retry-After")
            except (aiohttp.ClientError, TimeoutError) as e:
                status = type(e).__name__
            rows.append((status, time.perf_counter() - start))
            if status == "503" and retry:
                wait = float(retry) * (1 + rng.random() if jitter else 1)
                await asyncio.sleep(max(0.0, min(wait, end - time.perf_counter())))

    connector = aiohttp.TCPConnector(limit=clients)
    timeout = aiohttp.ClientTimeout(total=30)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(session) for _ in range(clients)))
    return rows


def _flood(kind: str, url: str, duration: int, tmp: Path) -> list[tuple[str, float]]:
    """(status, seconds) of every request of one flood, in a process of its own."""
    if kind == "resend":
        body = tmp / "flood.json"
        body.write_text(json.dumps(FLOOD))
        cmd = ["hey", "-z", f"{duration}s", "-c", str(CLIENTS), "-m", "POST"]
        cmd += ["-T", "application/json", "-D", str(body), "-o", "csv", f"{url}/predict"]
        out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
        return [
            (row["status-code"], float(row["response-time"]))
            for row in csv.DictReader(out.splitlines())
        ]
    result = tmp / "honour.json"
    cmd = [sys.executable, "-m", "benchmarks.overload", "--client", kind, url, str(duration)]
    subprocess.run([*cmd, str(result)], cwd=ROOT, check=True)
    return [tuple(r) for r in json.loads(result.read_text())]


def _probe(url: str, stop: threading.Event, out: list[tuple[int, float]]) -> None:
    with httpx.Client(base_url=url, timeout=30) as c:
        while not stop.is_set():
            start = time.perf_counter()
            out.append((c.post("/predict", json=PROBE).status_code, time.perf_counter() - start))


def _recover(url: str) -> None:
    """Wait until the transformer answers again (its queue drains first)."""
    deadline = time.monotonic() + 60
    with httpx.Client(base_url=url, timeout=30) as c:
        while time.monotonic() < deadline:
            if c.post("/predict", json=FLOOD).status_code == 200:
                break
            time.sleep(0.5)
    time.sleep(2)


def refusals_by_reason(metrics_text: str, tag: str = "sentiment:v2") -> dict[str, float]:
    """``mlserve_overloaded_total`` of ``tag`` by reason, from a /metrics page: deadline and
    queue_full (at arrival), late and expired (from the queue)."""
    from prometheus_client.parser import text_string_to_metric_families

    counts: dict[str, float] = {}
    for family in text_string_to_metric_families(metrics_text):
        if family.name != "mlserve_overloaded":
            continue
        for sample in family.samples:
            if sample.name.endswith("_total") and sample.labels.get("model_version") == tag:
                reason = sample.labels["reason"]
                counts[reason] = counts.get(reason, 0.0) + sample.value
    return counts


def _scrape(url: str) -> dict[str, float]:
    return refusals_by_reason(httpx.get(f"{url}/metrics", timeout=30).text)


def run_round(kind: str, url: str, duration: int, tmp: Path) -> dict:
    stop, probe = threading.Event(), []
    prober = threading.Timer(2.0, _probe, args=(url, stop, probe))
    before = _scrape(url)
    prober.start()
    started = time.perf_counter()
    rows = _flood(kind, url, duration, tmp)
    elapsed = time.perf_counter() - started
    stop.set()
    prober.join()
    _recover(url)
    after = _scrape(url)
    fig = figures(rows, probe, elapsed)
    # The server's count of its refusals, by where they were made (the flood and its drain).
    fig["refused_by_reason"] = {r: int(after[r] - before.get(r, 0.0)) for r in sorted(after)}
    return fig


def figures(rows: list[tuple[str, float]], probe: list[tuple[int, float]], elapsed: float) -> dict:
    """One flood's figures: per status its count and latencies (200, 503 and 504 always, at 0
    when none came), the answers per second, and the classical probe's latencies."""
    by_status: dict[str, list[float]] = {"200": [], "503": [], "504": []}  # counted, even at 0
    for status, seconds in rows:
        by_status.setdefault(status, []).append(seconds)
    fig: dict = {
        "requests": len(rows),
        "answers_per_s": round(len(by_status.get("200", [])) / elapsed, 1),
    }
    for status, times in sorted(by_status.items()):
        fig[status] = {
            "n": len(times),
            "p50_ms": round(percentile(times, 0.5) * 1000, 1),
            "p90_ms": round(percentile(times, 0.9) * 1000, 1),
            "p99_ms": round(percentile(times, 0.99) * 1000, 1),
            "over_50ms": round(sum(t > 0.05 for t in times) / max(1, len(times)), 4),
        }
    times = [t for _, t in probe]
    fig["probe"] = {
        "n": len(probe),
        "non_200": sum(code != 200 for code, _ in probe),
        "p50_ms": round(percentile(times, 0.5) * 1000, 1),
        "p99_ms": round(percentile(times, 0.99) * 1000, 1),
    }
    return fig


def _median(runs: list[dict], path: tuple[str, ...]) -> float:
    values = []
    for run in runs:
        v = run
        for key in path:
            v = v.get(key, {}) if isinstance(v, dict) else {}
        if isinstance(v, int | float) and v == v:  # NaN: a status with no request
            values.append(v)
    return statistics.median(values) if values else 0.0


def report(results: dict[str, list[dict]], idle_p99: float, duration: int, rounds: int) -> str:
    """The Markdown table of ``overload.md``: per kind of client, the medians over its rounds."""
    lines = [
        f"{CLIENTS} clients on sentiment:v2 for {duration} s, 2 workers, 2 s deadline, cache "
        f"off; medians of {rounds} rounds; classical probe idle p99 {idle_p99} ms",
        "",
        "| clients | answered (200) | answers/s | answers p99 ms | refused (503) "
        "| refusals p50 / p90 / p99 ms | refusals over 50 ms | refused from the queue "
        "| 504 | other | probe p50 / p99 ms |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for kind, runs in results.items():
        other = statistics.median(
            sum(
                v["n"]
                for k, v in r.items()
                if k not in ("200", "503", "504", "probe") and isinstance(v, dict) and "n" in v
            )
            for r in runs
        )
        m = {
            name: _median(runs, path)
            for name, path in {
                "n200": ("200", "n"),
                "rate": ("answers_per_s",),
                "p99_200": ("200", "p99_ms"),
                "n503": ("503", "n"),
                "p50_503": ("503", "p50_ms"),
                "p90_503": ("503", "p90_ms"),
                "p99_503": ("503", "p99_ms"),
                "slow_503": ("503", "over_50ms"),
                "n504": ("504", "n"),
                "late": ("refused_by_reason", "late"),
                "expired": ("refused_by_reason", "expired"),
                "p50_probe": ("probe", "p50_ms"),
                "p99_probe": ("probe", "p99_ms"),
            }.items()
        }
        lines.append(
            f"| {kind} | {m['n200']:.0f} | {m['rate']:.1f} | {m['p99_200']:.0f} | {m['n503']:.0f} "
            f"| {m['p50_503']:.0f} / {m['p90_503']:.0f} / {m['p99_503']:.0f} "
            f"| {m['slow_503']:.1%} | {m['late']:.0f} late, {m['expired']:.0f} expired "
            f"| {m['n504']:.0f} | {other:.0f} "
            f"| {m['p50_probe']:.1f} / {m['p99_probe']:.1f} |"
        )
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--duration", type=int, default=15, help="seconds per flood")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    parser.add_argument(
        "--client", nargs=4, metavar=("KIND", "URL", "SECONDS", "OUT"), help=argparse.SUPPRESS
    )
    args = parser.parse_args()
    if args.client:  # the honouring clients, in their own process
        kind, url, seconds, out = args.client
        rows = asyncio.run(_honouring_clients(url, float(seconds), CLIENTS, kind == "jitter"))
        Path(out).write_text(json.dumps(rows))
        return
    args.out.mkdir(parents=True, exist_ok=True)
    env = {
        "MLSERVE_MODELS": "sentiment:v2,topic:v1",
        "MLSERVE_WORKERS": "2",
        "MLSERVE_INFER_TIMEOUT_SECONDS": "2",
        "MLSERVE_CACHE_ENABLED": "false",
        "MLSERVE_CONTROL_BACKEND": "file",
        "HF_HUB_OFFLINE": "1",
    }
    port = free_port()
    bentoml = str(Path(sys.executable).parent / "bentoml")
    cmd = [bentoml, "serve", "service:MLServe", "--working-dir", str(ROOT)]
    cmd += ["--host", "127.0.0.1", "--port", str(port)]
    results: dict[str, list[dict]] = {"resend": [], "honour": [], "jitter": []}
    with (
        tempfile.TemporaryDirectory(prefix="mlserve-overload-") as tmp,
        server(cmd, port, env, "/ready") as url,
    ):
        with httpx.Client(base_url=url, timeout=30) as c:
            for _ in range(20):  # warm both models
                c.post("/predict", json=FLOOD).raise_for_status()
                c.post("/predict", json=PROBE).raise_for_status()
            idle = []
            for _ in range(200):
                start = time.perf_counter()
                c.post("/predict", json=PROBE).raise_for_status()
                idle.append(time.perf_counter() - start)
        idle_p99 = round(percentile(idle, 0.99) * 1000, 1)
        for round_no in range(args.rounds):
            for kind in results:
                fig = run_round(kind, url, args.duration, Path(tmp))
                results[kind].append(fig)
                print(f"round {round_no + 1} {kind}: {json.dumps(fig)}", flush=True)
    (args.out / "overload.json").write_text(
        json.dumps({"idle_probe_p99_ms": idle_p99, "runs": results}, indent=1)
    )
    text = report(results, idle_p99, args.duration, args.rounds)
    (args.out / "overload.md").write_text(text)
    print(text, end="")


if __name__ == "__main__":
    main()
