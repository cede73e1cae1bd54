"""mlserve.supervisor: SIGTERM ends the server and every process it started, even those in
sessions of their own (as BentoML's workers are), and the supervisor exits only then."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import psutil
import pytest

from mlserve import supervisor

SUPERVISOR = Path(supervisor.__file__)

# A stand-in for BentoML's arbiter: starts two "workers" in new sessions, writes their pids,
# then waits. On SIGTERM it exits at once and leaves its workers behind (the case to handle).
ARBITER = textwrap.dedent(
    """
    import signal, subprocess, sys, time
    ignore = sys.argv[2] == "ignore"
    worker = "import os, signal, sys, time\\n"
    if ignore:
        worker += "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    # Ready only once its handler is in place (a busy machine may take seconds to get there).
    worker += "open(f'{sys.argv[1]}.{os.getpid()}.ready', 'w').close()\\n"
    worker += "time.sleep(300)\\n"
    procs = [subprocess.Popen([sys.executable, "-c", worker, sys.argv[1]], start_new_session=True)
             for _ in range(2)]
    open(sys.argv[1], "w").write(" ".join(str(p.pid) for p in procs))
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(int(sys.argv[3])))
    if sys.argv[4] == "crash":
        time.sleep(1)
        sys.exit(3)
    time.sleep(300)
    """
)


def start(tmp_path: Path, ignore: bool = False, term_status: int = 0, crash: bool = False):
    pids_file = tmp_path / "pids"
    env = dict(os.environ, MLSERVE_DRAIN_SECONDS="3")
    cmd = [sys.executable, str(SUPERVISOR), "--", sys.executable, "-c", ARBITER]
    cmd += [str(pids_file), "ignore" if ignore else "-", str(term_status)]
    cmd += ["crash" if crash else "-"]
    proc = subprocess.Popen(cmd, env=env, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (pids_file.exists() and pids_file.read_text().strip()):
        assert time.monotonic() < deadline, "the fake arbiter did not start its workers"
        time.sleep(0.05)
    workers = [int(p) for p in pids_file.read_text().split()]
    while not all(Path(f"{pids_file}.{pid}.ready").exists() for pid in workers):
        assert time.monotonic() < deadline, "the fake workers did not get ready"
        time.sleep(0.05)
    return proc, workers


def gone(pids: list[int]) -> bool:
    for pid in pids:
        try:
            if psutil.Process(pid).status() != psutil.STATUS_ZOMBIE:
                return False
        except psutil.NoSuchProcess:
            pass
    return True


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")
@pytest.mark.parametrize("ignore", [False, True], ids=["workers-obey", "workers-ignore-sigterm"])
def test_sigterm_ends_workers_in_their_own_sessions(tmp_path: Path, ignore: bool) -> None:
    proc, workers = start(tmp_path, ignore=ignore)
    try:
        assert all(psutil.Process(p).pid for p in workers)
        assert all(os.getsid(p) == p for p in workers)  # sessions of their own
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        rc = proc.wait(timeout=20)
        elapsed = time.monotonic() - started
        log = proc.stderr.read()
        assert rc == 0, log
        assert gone(workers), log
        # The arbiter exits at once: its workers get SIGTERM then, SIGKILL 2 s later.
        assert elapsed < (4 if ignore else 2), (elapsed, log)
        assert ("SIGKILL" in log) == ignore, log
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux process semantics")
def test_a_crashed_server_leaves_nothing_and_its_status_is_returned(tmp_path: Path) -> None:
    proc, workers = start(tmp_path, crash=True)
    try:
        rc = proc.wait(timeout=20)
        assert rc == 3, proc.stderr.read()
        assert gone(workers)
    finally:
        for pid in workers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)


def test_exit_status_of_a_server_killed_by_another_signal() -> None:
    # In a subprocess: the supervisor reaps every child of its process and becomes a subreaper.
    script = "import os, signal; os.kill(os.getpid(), signal.SIGKILL)"
    cmd = [sys.executable, str(SUPERVISOR), sys.executable, "-c", script]
    assert subprocess.run(cmd, timeout=30).returncode == 128 + signal.SIGKILL


def test_drain_seconds_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLSERVE_DRAIN_SECONDS", "2.5")
    assert supervisor.drain_seconds() == 2.5
    monkeypatch.setenv("MLSERVE_DRAIN_SECONDS", "soon")
    assert supervisor.drain_seconds() == supervisor.DEFAULT_DRAIN_SECONDS
