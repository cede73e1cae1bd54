"""Run a server and make sure that, when it stops, every process it started stops too.

BentoML's arbiter starts its workers in sessions of their own: a signal to the arbiter's
process group never reaches them, and when the arbiter dies they live on, holding the port.
This supervisor is the container's entrypoint (``python supervisor.py -- CMD...``) and what
``mlserve serve`` runs in process. It

* starts CMD (the arbiter) and marks itself a *child subreaper*, so orphaned workers are
  re-parented to it rather than to init, and it reaps every child (it may be PID 1);
* tracks the arbiter's descendants (re-read every 2 s, and every 0.2 s while stopping; psutil,
  with start times, so a reused pid is never signalled);
* forwards SIGTERM, SIGINT, SIGHUP and SIGQUIT to the arbiter (which sends SIGTERM to its
  workers: they drain, see mlserve.drain); once the arbiter has exited, or when the drain time
  (``MLSERVE_DRAIN_SECONDS``, default 20; the image sets 8, under Docker's 10 s stop timeout)
  has passed, it sends SIGTERM to every descendant still alive, then SIGKILL after 2 s more;
* exits only when none of them is left, with the arbiter's exit status (128 + signal number
  when a signal ended it, 0 when our own forwarded SIGTERM or SIGINT did).

It reaps *every* child of its process (it may be PID 1), so call :func:`run` only from a process
that has no other children to wait for (``mlserve serve`` has none).

Only the standard library and psutil (a BentoML dependency): the image runs this file directly.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import os
import signal
import sys
import time
from collections.abc import Sequence

import psutil

FORWARDED = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT)
DEFAULT_DRAIN_SECONDS = 20.0  # the default of Settings.drain_seconds
KILL_AFTER_SECONDS = 2.0
POLL_SECONDS = 0.2
# Scanning the process table costs a few ms: every 2 s while serving, every poll when stopping.
REFRESH_SECONDS = 2.0
PR_SET_CHILD_SUBREAPER = 36


def _log(message: str) -> None:
    print(f"[mlserve-supervisor {os.getpid()}] {message}", file=sys.stderr, flush=True)


def set_child_subreaper() -> bool:
    """Make orphaned descendants ours (Linux >= 3.4); False where unsupported."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def drain_seconds(default: float = DEFAULT_DRAIN_SECONDS) -> float:
    raw = os.environ.get("MLSERVE_DRAIN_SECONDS", "")
    try:
        return max(0.0, float(raw)) if raw else default
    except ValueError:
        _log(f"ignoring MLSERVE_DRAIN_SECONDS={raw!r}: not a number")
        return default


class Supervisor:
    def __init__(self, cmd: Sequence[str], env: dict[str, str] | None = None, drain=None):
        self.cmd = list(cmd)
        self.env = dict(os.environ if env is None else env)
        self.drain = drain_seconds() if drain is None else drain
        self.pid = 0
        self.status: int | None = None  # the arbiter's exit code, or -signal
        self.signals: list[int] = []
        self.tracked: dict[int, psutil.Process] = {}
        self.me = psutil.Process()

    # --- processes ---------------------------------------------------------------------------
    def _refresh(self) -> None:
        """Add every live descendant (of the arbiter and, once re-parented, of us)."""
        roots = [self.me]
        if self.pid and self.status is None:
            with contextlib.suppress(psutil.Error):
                roots.append(psutil.Process(self.pid))
        for root in roots:
            try:
                children = root.children(recursive=True)
            except psutil.Error:
                continue
            for proc in children:
                self.tracked.setdefault(proc.pid, proc)

    def alive(self) -> list[psutil.Process]:
        """Tracked processes still running (same pid *and* start time; zombies count as gone)."""
        live = []
        for pid, proc in list(self.tracked.items()):
            try:
                if proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE:
                    live.append(proc)
                    continue
            except psutil.Error:
                pass
            del self.tracked[pid]
        return live

    def _reap(self) -> None:
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.pid and self.status is None:
                self.status = (
                    -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
                )
                _log(f"server (pid {pid}) exited with {self._describe(self.status)}")

    @staticmethod
    def _describe(status: int) -> str:
        if status < 0:
            with contextlib.suppress(ValueError):
                return f"signal {signal.Signals(-status).name}"
            return f"signal {-status}"
        return f"status {status}"

    def _signal_all(self, sig: int, procs: list[psutil.Process]) -> None:
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    # --- main loop ---------------------------------------------------------------------------
    def _on_signal(self, signum: int, _frame) -> None:
        self.signals.append(signum)

    def run(self) -> int:
        set_child_subreaper()
        previous = {sig: signal.signal(sig, self._on_signal) for sig in FORWARDED}
        try:
            self.pid = os.posix_spawnp(self.cmd[0], self.cmd, self.env)
            return self._loop()
        finally:
            for sig, handler in previous.items():
                signal.signal(sig, handler)

    def _loop(self) -> int:
        stop_sig = 0
        drain_deadline = kill_deadline = None
        next_refresh = 0.0
        while True:
            self._reap()
            if stop_sig or self.status is not None or time.monotonic() >= next_refresh:
                self._refresh()
                next_refresh = time.monotonic() + REFRESH_SECONDS
            while self.signals:
                sig = self.signals.pop(0)
                if not stop_sig:
                    stop_sig = sig
                    self._refresh()  # everything alive now, before the arbiter can go
                    drain_deadline = time.monotonic() + self.drain
                    _log(
                        f"got {signal.Signals(sig).name}: stopping the server "
                        f"(drain {self.drain:g} s)"
                    )
                if self.status is None:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(self.pid, sig)
            now = time.monotonic()
            live = self.alive()
            if self.status is not None and not live:
                break
            if kill_deadline is None and (
                self.status is not None or (drain_deadline is not None and now >= drain_deadline)
            ):
                # The arbiter is gone (or too slow): its workers get SIGTERM now, SIGKILL soon.
                if live:
                    _log(f"sending SIGTERM to {len(live)} process(es) left: {_pids(live)}")
                    self._signal_all(signal.SIGTERM, live)
                kill_deadline = now + KILL_AFTER_SECONDS
            elif kill_deadline is not None and now >= kill_deadline and live:
                _log(f"sending SIGKILL to {len(live)} process(es) left: {_pids(live)}")
                self._signal_all(signal.SIGKILL, live)
                kill_deadline = now + KILL_AFTER_SECONDS
            time.sleep(POLL_SECONDS)
        status = self.status or 0
        if status < 0:
            # Ended by the signal we forwarded: a clean stop. Any other signal: 128 + n.
            clean = -status == stop_sig and stop_sig in (signal.SIGTERM, signal.SIGINT)
            return 0 if clean else 128 - status
        return status


def _pids(procs: list[psutil.Process]) -> str:
    return ", ".join(str(p.pid) for p in procs)


def run(cmd: Sequence[str], env: dict[str, str] | None = None, drain: float | None = None) -> int:
    """Run ``cmd`` under the supervisor; return its exit status once no descendant is left."""
    return Supervisor(cmd, env, drain).run()


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if args and args[0] == "--":
        args = args[1:]
    if not args:
        print("usage: supervisor.py [--] COMMAND [ARG...]", file=sys.stderr)
        return 2
    return run(args)


if __name__ == "__main__":
    sys.exit(main())
