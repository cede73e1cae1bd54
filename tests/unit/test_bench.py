"""benchmarks.bench's helpers: hey's report, medians over rounds, the schedule, the targets and
the chart (no load is run, nothing is timed)."""

from __future__ import annotations

import pytest

from benchmarks import bench

HEY_REPORT = """
Summary:
  Total:\t5.0031 secs
  Slowest:\t0.0712 secs
  Fastest:\t0.0004 secs
  Average:\t0.0061 secs
  Requests/sec:\t5212.3456

Latency distribution:
  10% in 0.0011 secs
  25% in 0.0021 secs
  50% in 0.0042 secs
  75% in 0.0071 secs
  90% in 0.0102 secs
  95% in 0.0153 secs
  99% in 0.0304 secs

Status code distribution:
  [200]\t26050 responses
  [503]\t12 responses

Error distribution:
  [3]\tPost "http://127.0.0.1:3000/predict": read: connection reset by peer
"""


def test_parse_hey_reads_rate_percentiles_and_every_error():
    r = bench.parse_hey(HEY_REPORT)
    assert r["rps"] == 5212.3
    assert (r["p50_ms"], r["p95_ms"], r["p99_ms"]) == (4.2, 15.3, 30.4)
    assert r["responses"] == 26062
    assert r["non_2xx"] == 12 + 3  # status errors and connection errors


def test_parse_hey_without_errors():
    report = HEY_REPORT.split("Status code distribution:")[0] + (
        "Status code distribution:\n  [200]\t100 responses\n"
    )
    assert bench.parse_hey(report)["non_2xx"] == 0


def _run(rps: float, p99: float = 10.0, errors: int = 0) -> dict:
    return {
        "rps": rps,
        "p50_ms": p99 / 4,
        "p95_ms": p99 / 2,
        "p99_ms": p99,
        "non_2xx": errors,
        "responses": 100,
    }


def test_median_of_rounds_takes_medians_and_sums_errors():
    m = bench.median_of_rounds([_run(100, 8), _run(300, 30, errors=1), _run(200, 20)])
    assert m["rps"] == 200
    assert m["p99_ms"] == 20
    assert m["non_2xx"] == 1  # an error in any round stays visible
    assert m["responses"] == 300
    assert m["rounds_rps"] == [100, 300, 200]


def _contender(name: str, keys: list[str]) -> bench.Contender:
    loads = [bench.Load(k, "/p", None, 1) for k in keys]
    return bench.Contender(name, ["x"], {}, "/ready", loads)


def test_schedule_interleaves_contenders_at_each_step_and_rotates():
    a = _contender("a", ["c=1", "c=32", "extra"])
    b = _contender("b", ["c=1", "c=32"])
    first = [(c.name, load.key) for _, c, load in bench.schedule([a, b], 0)]
    assert first == [("a", "c=1"), ("b", "c=1"), ("a", "c=32"), ("b", "c=32"), ("a", "extra")]
    second = [(c.name, load.key) for _, c, load in bench.schedule([a, b], 1)]
    assert second[:2] == [("b", "c=1"), ("a", "c=1")]
    assert sorted(first) == sorted(second)


def _summary() -> dict:
    sweep = {f"predict c={c}": _run(100.0 * c**0.5, 2.0 * c) for c in bench.CONCURRENCY}
    return {
        "mlserve": {
            **sweep,
            "predict c=1": {**_run(600, 2.0), "p50_ms": 1.0},
            "predict c=32": _run(1500, 40),
            "health c=32": _run(3000, 20),
            "batch-predict 100 texts c=1": _run(70, 20),
        },
        "mlserver": {**sweep, "predict c=32": _run(900, 80)},
        "fastapi": {**sweep, "predict c=1": {**_run(500, 3.0), "p50_ms": 1.5}},
        "mlserve (1 worker)": {"predict c=32": _run(1000, 50)},
    }


def test_targets_from_the_medians():
    summary = _summary()
    summary["fastapi"]["predict c=32"] = _run(500, 90)
    rows = {r["target"]: r for r in bench.targets(summary, {"batch_texts_per_s": 8000})}
    by_start = {t.split(":")[0]: r for t, r in rows.items()}
    mlserver = rows["/predict, 32 clients: >= 1.5x MLServer's req/s"]
    assert mlserver["met"] is True and "1.67x" in mlserver["measured"]
    fastapi = rows["/predict, 32 clients: >= 2.5x plain FastAPI's req/s"]
    assert fastapi["met"] is True and "3.00x" in fastapi["measured"]
    assert rows["0 errors"]["met"] is True
    assert rows["/predict, 1 client: p50 and p99 no slower than plain FastAPI"]["met"] is True
    batch = by_start["/batch-predict of 100 texts"]
    assert batch["met"] is True and "7000 / 8000 texts/s = 88%" in batch["measured"]
    ceiling = by_start["the ceiling"]
    assert ceiling["met"] is None and "50%" in ceiling["measured"]
    assert "1.50x" in by_start["scaling"]["measured"]


def test_targets_not_met_and_errors_counted():
    summary = _summary()
    summary["fastapi"]["predict c=32"] = _run(1000, 90)
    summary["fastapi"]["predict c=1"] = {**_run(700, 1.5), "p50_ms": 0.5}
    summary["mlserver"]["predict c=4"] = _run(10, 10, errors=2)
    rows = {r["target"]: r for r in bench.targets(summary, {})}
    assert rows["/predict, 32 clients: >= 2.5x plain FastAPI's req/s"]["met"] is False
    assert rows["0 errors"] == {"target": "0 errors", "measured": "2 non-2xx", "met": False}
    assert rows["/predict, 1 client: p50 and p99 no slower than plain FastAPI"]["met"] is False
    assert not any(t.startswith("/batch-predict") for t in rows)  # no in-process figure
    summary["mlserve"]["batch-predict 100 texts c=1"] = _run(60, 20)
    rows = bench.targets(summary, {"batch_texts_per_s": 8000})
    assert [r["met"] for r in rows if r["target"].startswith("/batch-predict")] == [False]


def test_markdown_lists_every_run_and_target():
    summary = bench.summarize({"mlserve": {"predict c=32": [_run(1000), _run(1200)]}})
    text = bench.markdown(summary, [{"target": "t", "measured": "m", "met": False}], {})
    assert "| mlserve | predict c=32 | 1100.0 |" in text
    assert "| t | m | **no** |" in text


def test_write_chart_draws_each_sweep(tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "chart" / "scaling.png"
    assert bench.write_chart(_summary(), path, "title")
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_sweep_of_orders_by_concurrency():
    results = {"predict c=32": {"rps": 2}, "health c=32": {}, "predict c=4": {"rps": 1}}
    assert [c for c, _ in bench.sweep_of(results)] == [4, 32]


def test_profile_sorts_stacks_into_parts_from_the_innermost_frame():
    from benchmarks import profile

    raw = "\n".join(
        [
            "process 1:main;run (asyncio/base_events.py);endpoint (mlserve/http.py);"
            "inc (prometheus_client/values.py) 3",
            "thread 2;_worker (concurrent/futures/thread.py);infer (runners/classical.py);"
            "transform (sklearn/feature_extraction/text.py) 5",
            "process 1:main;run (asyncio/base_events.py);_run_once (asyncio/base_events.py) 2",
            "process 1:main;something (elsewhere.py) 1",
            "not a stack line",
        ]
    )
    counts = profile.breakdown(raw)
    assert counts == {
        "metrics (prometheus_client)": 3,
        "model: TF-IDF features": 5,
        "event loop (asyncio / uvloop)": 2,
        "other": 1,
    }


def test_ab_env_options_per_variant():
    from benchmarks import ab

    env = ab.parse_env(["B:PYTHONPATH=/x=y", "A:K=1"], ["A", "B"])
    assert env == {"A": {"K": "1"}, "B": {"PYTHONPATH": "/x=y"}}
    for bad in ("C:K=1", "B:K", "B:=1"):
        with pytest.raises(SystemExit):
            ab.parse_env([bad], ["A", "B"])


def test_batch_share_is_the_median_of_each_rounds_paired_share():
    """Each round alternates served and in-process batches; the target takes the median of the
    rounds' shares, not the share of two medians measured at different moments."""
    measured = [
        {"unbatched_texts_per_s": 900, "batch_texts_per_s": 7500, "paired": _pair(50, 40)},
        {"unbatched_texts_per_s": 1000, "batch_texts_per_s": 8500, "paired": _pair(40, 37.6)},
        {"unbatched_texts_per_s": 950, "batch_texts_per_s": 10000, "paired": _pair(50, 35)},
    ]
    inproc = bench.in_process_summary(measured)
    assert inproc["unbatched_texts_per_s"] == 950 and inproc["batch_texts_per_s"] == 8500
    assert inproc["batch_share_by_round"] == [0.8, 0.94, 0.7]
    assert inproc["paired_ms_by_round"][0] == [50, 40]
    summary = _summary()  # hey's batch run: 7000 texts/s, 82 % of the median 8500
    [batch] = [r for r in bench.targets(summary, inproc) if r["target"].startswith("/batch")]
    assert batch["met"] is False  # the median paired share, 80 %
    assert "median of the rounds' paired shares 80% (80%, 94%, 70%)" in batch["measured"]
    assert "7000 / 8500 texts/s" in batch["measured"]
    inproc["batch_share_by_round"] = [0.86, 0.9, 0.7]
    [batch] = [r for r in bench.targets(summary, inproc) if r["target"].startswith("/batch")]
    assert batch["met"] is True


def _pair(served_ms: float, in_process_ms: float) -> dict:
    return {
        "pairs": 20,
        "served_ms": served_ms,
        "in_process_ms": in_process_ms,
        "share": round(in_process_ms / served_ms, 3),
    }


@pytest.mark.parametrize(("clients", "warm"), [(1, "200"), (32, "200"), (256, "256")])
def test_hey_s_warm_up_sends_at_least_one_request_per_client(monkeypatch, clients, warm):
    """hey exits 1 when asked for fewer requests (-n) than clients (-c): the 256-client flood of
    ``benchmarks.profile`` crashed in its warm-up."""
    calls: list[list[str]] = []

    class Done:
        stdout = HEY_REPORT

    def run(cmd, **kwargs):
        calls.append(cmd)
        return Done()

    monkeypatch.setattr(bench.subprocess, "run", run)
    result = bench.hey("http://127.0.0.1:1/predict", {"text": "x"}, clients, 5)
    warm_up, timed = calls
    assert warm_up[:3] == ["hey", "-n", warm] and int(warm) >= clients
    assert warm_up[warm_up.index("-c") + 1] == str(clients)
    assert timed[:3] == ["hey", "-z", "5s"]
    assert result["rps"] == 5212.3  # the timed run's report
