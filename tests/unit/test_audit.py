"""The admin audit log: durable change entries, denial summaries, size rotation."""

from __future__ import annotations

import json
import threading
from pathlib import Path
from types import SimpleNamespace

from mlserve.admin import AdminAudit, AuditLog


def settings(path: Path, **kw) -> SimpleNamespace:
    base = dict(
        audit_log=str(path),
        audit_max_bytes=10 << 20,
        audit_backups=3,
        audit_denied_interval_seconds=60.0,
    )
    return SimpleNamespace(**{**base, **kw})


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_flood_of_denials_writes_a_few_summary_lines(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    clock = Clock()
    audit = AdminAudit(settings(path), "host:1", clock=clock)
    for i in range(5000):
        audit.denied("/admin/models/load", "unauthorized", "10.0.0.1")
        clock.now += 0.01  # 50 s in all: inside one interval
    assert len(lines(path)) == 1  # the first denial, at once
    clock.now += 60
    audit.denied("/admin/stats", "unauthorized", "10.0.0.1")
    entries = lines(path)
    assert len(entries) == 2 and path.stat().st_size < 64 * 1024
    assert entries[0]["count"] == 1
    assert entries[1]["count"] == 5000  # the 4,999 held back plus this one
    assert entries[1]["routes"] == {"/admin/models/load": 4999, "/admin/stats": 1}
    assert entries[1]["action"] == "denied" and entries[1]["client"] == "10.0.0.1"


def test_many_clients_are_bounded_too(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audit = AdminAudit(settings(path), "host:1", clock=Clock(), max_clients=4)
    for i in range(3000):
        audit.denied("/admin/models/unload", "admin_disabled", f"10.0.{i // 250}.{i % 250}")
    entries = lines(path)
    assert len(entries) == 5  # four clients, then everyone else under "*"
    assert entries[-1]["client"] == "*"
    audit.flush()  # at shutdown the held-back counts are written
    total = sum(e["count"] for e in lines(path))
    assert total == 3000


def test_every_authorized_change_is_written_by_concurrent_writers(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    audits = [AdminAudit(settings(path), f"host:{w}") for w in range(4)]

    def write(audit: AdminAudit) -> None:
        for i in range(50):
            audit.record({"action": "load", "worker": audit.worker_id, "n": i, "pad": "x" * 200})

    threads = [threading.Thread(target=write, args=(a,)) for a in audits]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    entries = lines(path)
    assert len(entries) == 200  # no line lost or torn
    assert {(e["worker"], e["n"]) for e in entries} == {
        (f"host:{w}", i) for w in range(4) for i in range(50)
    }


def test_rotation_keeps_the_configured_number_of_files(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    log = AuditLog(path, max_bytes=2048, backups=3)
    for i in range(200):
        log.write({"n": i, "pad": "x" * 100})
    rotated = log.rotated()
    assert [p.name for p in rotated] == ["audit.jsonl.1", "audit.jsonl.2", "audit.jsonl.3"]
    for p in [path, *rotated]:
        assert p.stat().st_size <= 2048
    # The newest entries are in the live file and .1, in order, with nothing lost in between.
    kept = [e["n"] for p in [*reversed(rotated), path] for e in lines(p)]
    assert kept == list(range(kept[0], 200))
    # A smaller setting later removes the surplus files at the next rotation.
    small = AuditLog(path, max_bytes=2048, backups=1)
    for i in range(30):
        small.write({"n": 1000 + i, "pad": "x" * 100})
    assert [p.name for p in small.rotated()] == ["audit.jsonl.1"]
