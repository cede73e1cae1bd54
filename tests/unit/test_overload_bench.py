"""benchmarks/overload.py's well-behaved clients, against a real HTTP server on a free port: a
client refused with 503 waits the Retry-After seconds before it sends again, and otherwise sends
again at once."""

from __future__ import annotations

import asyncio
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import ClassVar

from benchmarks.overload import _honouring_clients, _median, figures, percentile


class _RefuseFirst(BaseHTTPRequestHandler):
    """Refuses the first request (503, Retry-After: 1), answers every later one (200)."""

    protocol_version = "HTTP/1.1"
    arrivals: ClassVar[list[float]] = []

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["Content-Length"]))
        self.arrivals.append(time.perf_counter())
        refuse = len(self.arrivals) == 1
        body = b'{"error": "overloaded"}' if refuse else b'{"label": "ok"}'
        self.send_response(503 if refuse else 200)
        if refuse:
            self.send_header("Retry-After", "1")
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_a_refused_client_waits_retry_after_then_sends_back_to_back() -> None:
    _RefuseFirst.arrivals = []
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _RefuseFirst)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        url = f"http://127.0.0.1:{httpd.server_address[1]}"
        rows = asyncio.run(_honouring_clients(url, 3.0, clients=1))
    finally:
        httpd.shutdown()
        httpd.server_close()
    arrivals = _RefuseFirst.arrivals
    assert [status for status, _ in rows[:2]] == ["503", "200"]
    assert {status for status, _ in rows[1:]} == {"200"}
    assert len(rows) == len(arrivals)
    assert arrivals[1] - arrivals[0] >= 1.0  # the Retry-After second
    # After the wait, one request follows another at once: a client that also waited after each
    # answer would fit at most two more into the last two seconds.
    assert len(arrivals) >= 4


def test_percentile_takes_the_value_at_the_rank() -> None:
    values = [float(v) for v in range(1, 101)]
    assert percentile(values, 0.5) == 51.0
    assert percentile(values, 0.99) == 100.0
    assert percentile([], 0.5) != percentile([], 0.5)  # NaN for no values


def test_a_status_that_never_came_counts_zero_in_the_medians() -> None:
    rows_a = [("200", 1.2), ("503", 0.01), ("503", 0.2)]
    rows_b = [("200", 1.0), ("503", 0.02), ("504", 2.1)]
    runs = [figures(rows, [(200, 0.01)], 10.0) for rows in (rows_a, rows_a, rows_b)]
    assert runs[0]["504"]["n"] == 0
    assert _median(runs, ("504", "n")) == 0  # not the median of the one run that had a 504
    assert _median(runs, ("504", "p99_ms")) == 2100.0  # latencies only where there were some
    assert runs[0]["503"]["over_50ms"] == 0.5
    assert runs[0]["answers_per_s"] == 0.1


def test_refusals_are_read_by_reason_from_the_metrics_page() -> None:
    """The benchmark splits the server's refusals by reason from a real exposition of
    ``mlserve_overloaded_total`` (prometheus_client's), for the flooded version only."""
    from prometheus_client import CollectorRegistry, Counter, generate_latest

    from benchmarks.overload import refusals_by_reason

    registry = CollectorRegistry()
    c = Counter("mlserve_overloaded", "refusals", ["model_version", "reason"], registry=registry)
    c.labels(model_version="sentiment:v2", reason="deadline").inc(7)
    c.labels(model_version="sentiment:v2", reason="late").inc(3)
    c.labels(model_version="sentiment:v2", reason="expired")
    c.labels(model_version="topic:v1", reason="late").inc(5)
    text = generate_latest(registry).decode()
    assert refusals_by_reason(text) == {"deadline": 7.0, "late": 3.0, "expired": 0.0}
    assert refusals_by_reason(text, "topic:v1") == {"late": 5.0}


def test_the_report_counts_other_statuses_but_not_the_probe_or_the_reasons() -> None:
    """A round's figures as run_round makes them (a connection error among the statuses, the
    server's refusals by reason): the table's medians, 'other' counting only the client's
    statuses beyond 200, 503 and 504."""
    from benchmarks.overload import report

    rows = [("200", 0.5)] * 10 + [("503", 0.01)] * 4 + [("ClientOSError", 0.1)] * 2
    fig = figures(rows, [(200, 0.004)] * 5, elapsed=2.0)
    fig["refused_by_reason"] = {"deadline": 3, "expired": 0, "late": 1, "queue_full": 0}
    text = report({"honour": [fig]}, idle_p99=4.0, duration=15, rounds=1)
    row = text.splitlines()[-1].split(" | ")
    assert row[0] == "| honour" and row[1] == "10" and row[4] == "4"
    assert row[7] == "1 late, 0 expired" and row[8] == "0" and row[9] == "2"
