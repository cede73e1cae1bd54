"""`mlserve serve` stops with every process it started: SIGTERM to the mlserve process alone
(not its process group) ends BentoML's arbiter and its workers, which run in sessions of their
own, and mlserve exits only when none is left."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import (
    HEALTH_TIMEOUT_S,
    _tail,
    process_alive,
    spawn_mlserve_serve,
    wait_until_answers,
)

pytestmark = pytest.mark.integration


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_mlserve_serve_leaves_no_process_behind(
    model_home: Path, tmp_path: Path, sig: signal.Signals
) -> None:
    proc, port, log = spawn_mlserve_serve(
        model_home,
        tmp_path,
        MLSERVE_MODELS="topic:v1",
        MLSERVE_DEFAULT_MODEL="topic",
        MLSERVE_WORKERS="2",
        MLSERVE_DRAIN_SECONDS="5",
    )
    family: list[psutil.Process] = []
    try:
        wait_until_answers(proc, port, "/health", log, HEALTH_TIMEOUT_S)
        family = psutil.Process(proc.pid).children(recursive=True)
        workers = [p for p in family if "_bentoml_impl.worker" in " ".join(p.cmdline())]
        assert len(workers) == 2, [p.cmdline() for p in family]
        assert all(os.getsid(p.pid) == p.pid for p in workers)  # sessions of their own

        proc.send_signal(sig)  # the mlserve process only, as a terminal or a process manager does
        assert proc.wait(timeout=20) == 0, _tail(log)
        left = [(p.pid, p.cmdline()) for p in family if process_alive(p)]
        assert not left, f"left after mlserve exited: {left}\n{_tail(log)}"
        with pytest.raises(httpx.HTTPError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=2)
    finally:
        for p in family:
            with contextlib.suppress(psutil.Error):
                p.kill()
        if proc.poll() is None:
            proc.kill()
            proc.wait(timeout=10)
