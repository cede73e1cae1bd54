"""Concurrency proof: 64 concurrent clients, every answer is the answer for its own text.

1800 single-text ``/predict`` requests (1500 for the classical ``sentiment:v1``, 300 for the
transformer ``sentiment:v2``, shuffled together), each with a distinct text made of real
drugsCom reviews, go to one server (the session's default one) through 64 connections at once.
The server's adaptive batcher packs concurrent requests into shared batches; if it ever handed a
request another request's rows, that request's probabilities would not match what the same model
computes for its text in a separate process. ``/metrics`` before and after proves that batches
of more than one request actually ran, and that none was larger than MLSERVE_MAX_BATCH_SIZE.
"""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families

pytestmark = pytest.mark.integration

N_REQUESTS = {"sentiment:v1": 1500, "sentiment:v2": 300}
ATOL = {"sentiment:v1": 1e-5, "sentiment:v2": 1e-4}
CONCURRENCY = 64

EXPECTED_SCRIPT = """
import json, sys
from runners import load_runner

spec = json.loads(open(sys.argv[1], encoding="utf-8").read())
out = {}
for tag, texts in spec.items():
    runner = load_runner(tag, warmup=False)
    probs, labels, predicted = [], None, []
    for start in range(0, len(texts), 64):
        result = runner.predict(texts[start : start + 64])
        labels = result.labels
        probs += result.probabilities.tolist()
        predicted += result.predicted
    out[tag] = {"labels": labels, "probabilities": probs, "predicted": predicted}
open(sys.argv[2], "w", encoding="utf-8").write(json.dumps(out))
"""


@pytest.fixture(scope="module")
def workload(drugscom, model_home: Path) -> list[tuple[str, str]]:
    """(model_version, text) pairs: real reviews, every text distinct, tags interleaved.

    The transformer gets the shorter reviews (at most 400 characters) to keep its CPU time, and
    the run, bounded; the classical model gets the rest, then every review again with a marker.
    """
    reviews = list(dict.fromkeys(drugscom.texts))
    random.Random(1234).shuffle(reviews)
    short = [t for t in reviews if len(t) <= 400][: N_REQUESTS["sentiment:v2"]]
    rest = [t for t in reviews if t not in set(short)]
    assert len(short) == N_REQUESTS["sentiment:v2"] and len(rest) > 500, (len(short), len(rest))
    marked = [f"{t} (#{i})" for i, t in enumerate(reviews)]
    classical = (rest + marked)[: N_REQUESTS["sentiment:v1"]]
    jobs = [("sentiment:v1", t) for t in classical] + [("sentiment:v2", t) for t in short]
    random.Random(5678).shuffle(jobs)
    assert len(jobs) == sum(N_REQUESTS.values())
    assert len({text for _, text in jobs}) == len(jobs)
    return jobs


@pytest.fixture(scope="module")
def expected(
    workload: list[tuple[str, str]], model_env: dict[str, str], tmp_path_factory
) -> dict[str, dict[str, tuple[np.ndarray, str]]]:
    """tag -> text -> (probabilities, label), computed by the runners in a separate process."""
    work = tmp_path_factory.mktemp("expected")
    spec = {tag: [t for g, t in workload if g == tag] for tag in N_REQUESTS}
    (work / "in.json").write_text(json.dumps(spec), encoding="utf-8")
    proc = subprocess.run(
        [sys.executable, "-c", EXPECTED_SCRIPT, str(work / "in.json"), str(work / "out.json")],
        cwd=work,
        env=model_env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    out = json.loads((work / "out.json").read_text(encoding="utf-8"))
    table: dict[str, dict[str, tuple[np.ndarray, str]]] = {}
    for tag, texts in spec.items():
        got = out[tag]
        assert got["labels"] == ["negative", "neutral", "positive"]
        probs = np.asarray(got["probabilities"])
        table[tag] = {t: (probs[k], got["predicted"][k]) for k, t in enumerate(texts)}
        # The check has teeth: almost every text has its own probabilities, so an answer that
        # crossed over to another request would not match.
        distinct = len({tuple(np.round(p, 4)) for p in probs})
        assert distinct >= 0.95 * len(texts), (tag, distinct, len(texts))
    return table


def batch_histogram(url: str, *tags: str) -> dict[str, dict]:
    """mlserve_batch_size by model version: {"count", "sum", "buckets": {le: cumulative}}."""
    response = httpx.get(f"{url}/metrics", timeout=30)
    assert response.status_code == 200
    hist: dict[str, dict] = {}
    for family in text_string_to_metric_families(response.text):
        if family.name != "mlserve_batch_size":
            continue
        for sample in family.samples:
            entry = hist.setdefault(
                sample.labels["model_version"], {"count": 0.0, "sum": 0.0, "buckets": {}}
            )
            if sample.name.endswith("_count"):
                entry["count"] = sample.value
            elif sample.name.endswith("_sum"):
                entry["sum"] = sample.value
            elif sample.name.endswith("_bucket"):
                entry["buckets"][float(sample.labels["le"])] = sample.value
    lines = [ln for ln in response.text.splitlines() if "batch_size" in ln]
    missing = [tag for tag in tags if tag not in hist]
    assert not missing, f"no mlserve_batch_size for {missing} in /metrics:\n" + "\n".join(lines)
    return hist


def delta(after: dict, before: dict, tag: str) -> dict:
    a = after[tag]
    b = before.get(tag, {"count": 0.0, "sum": 0.0, "buckets": {}})
    return {
        "count": a["count"] - b["count"],
        "sum": a["sum"] - b["sum"],
        "buckets": {le: v - b["buckets"].get(le, 0.0) for le, v in a["buckets"].items()},
    }


async def drive(url: str, jobs: list[tuple[str, str]]) -> list[tuple[int, dict | str]]:
    """Send every job as one /predict, CONCURRENCY at a time; results in job order."""
    results: list[tuple[int, dict | str]] = [(0, "not sent")] * len(jobs)
    pending = iter(enumerate(jobs))
    # BentoML's uvicorn closes keep-alive connections idle for 5 s; httpx's default expiry is
    # also 5 s, so a pooled connection could be reused just as the server closes it (a client
    # race on POST, not a server error). Expire idle connections well before the server does.
    limits = httpx.Limits(
        max_connections=CONCURRENCY, max_keepalive_connections=CONCURRENCY, keepalive_expiry=2.0
    )
    async with httpx.AsyncClient(base_url=url, limits=limits, timeout=60.0) as client:

        async def worker() -> None:
            for i, (tag, text) in pending:
                try:
                    response = await client.post(
                        "/predict",
                        json={"text": text, "model_version": tag},
                        headers={"X-Request-ID": f"conc-{i}"},
                    )
                except httpx.HTTPError as exc:
                    results[i] = (-1, repr(exc))
                    continue
                ok = response.status_code == 200
                results[i] = (response.status_code, response.json() if ok else response.text)

        await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return results


def test_concurrent_predictions_are_never_crossed_and_are_batched(
    default_server, workload, expected
) -> None:
    url = default_server.url
    max_batch = int(default_server.env["MLSERVE_MAX_BATCH_SIZE"])
    before = batch_histogram(url)
    start = time.monotonic()
    results = asyncio.run(drive(url, workload))
    elapsed = time.monotonic() - start
    after = batch_histogram(url, *N_REQUESTS)

    failures = [(i, status, body) for i, (status, body) in enumerate(results) if status != 200]
    assert not failures, f"{len(failures)} failed requests, e.g. {failures[:5]}"

    crossed = []
    for i, ((tag, text), (_, body)) in enumerate(zip(workload, results, strict=True)):
        assert body["model_version"] == tag, body
        assert body["request_id"] == f"conc-{i}", body
        want_probs, want_label = expected[tag][text]
        got = np.array([body["probabilities"][k] for k in ("negative", "neutral", "positive")])
        if not np.allclose(got, want_probs, atol=ATOL[tag], rtol=0) or body["label"] != want_label:
            crossed.append((i, tag, text[:60], body["probabilities"], want_probs.tolist()))
    assert not crossed, f"{len(crossed)} answers differ from their own text's, e.g. {crossed[:3]}"

    for tag, n in N_REQUESTS.items():
        d = delta(after, before, tag)
        # Every request's one text went through exactly one batch: no row lost or run twice.
        assert d["sum"] == n, (tag, d)
        # Batching happened: fewer batches than requests, some with more than one text ...
        assert 0 < d["count"] < n, (tag, d)
        assert d["buckets"][1.0] < d["count"], (tag, d)
        assert d["sum"] / d["count"] > 1.0, (tag, d)
        # ... and none larger than MLSERVE_MAX_BATCH_SIZE.
        assert d["buckets"][float(max_batch)] == d["count"], (tag, d)

    total = sum(N_REQUESTS.values())
    print(f"{total} requests in {elapsed:.1f} s ({total / elapsed:.0f}/s); batch sizes {after}")
    assert default_server.proc.poll() is None, default_server.log()
