"""`bentoml build` packs code and models; the bento serves /predict from a store that had nothing.

The bento is exported (as a plain tar, fast) and imported into an empty BENTOML_HOME before it
is served, so the test proves that the models travel with it.
"""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.integration.conftest import (
    BENTOML,
    READY_TIMEOUT_S,
    REPO,
    _free_port,
    clean_env,
    launch,
    wait_for,
)

pytestmark = pytest.mark.integration


def run(cmd: list[str], env: dict[str, str], cwd: Path) -> str:
    proc = subprocess.run(cmd, env=env, cwd=cwd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{cmd} failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return proc.stdout


def test_built_bento_carries_its_models_and_serves(model_home: Path, tmp_path: Path) -> None:
    build_home = tmp_path / "build-home"
    shutil.copytree(model_home / "models", build_home / "models", symlinks=True)
    env = clean_env(BENTOML_HOME=str(build_home))
    out = run([BENTOML, "build", "--output", "tag"], env, REPO)
    tag = out.strip().splitlines()[-1].removeprefix("__tag__:")
    assert tag.startswith("mlserve:"), out
    archive = tmp_path / "mlserve.tar"
    run([BENTOML, "export", tag, str(archive)], env, tmp_path)

    fresh = clean_env(BENTOML_HOME=str(tmp_path / "fresh-home"))
    run([BENTOML, "import", str(archive)], fresh, tmp_path)
    models = run([BENTOML, "models", "list"], fresh, tmp_path)
    for model in ("sentiment", "topic"):
        assert model in models, models

    server = launch([tag], _free_port(), fresh, tmp_path, tmp_path / "bento.log")
    try:
        wait_for(server, "/ready", 200, READY_TIMEOUT_S)
        with server.client() as client:
            body = {"text": "The striker scored twice in the cup final", "model_version": "topic"}
            response = client.post("/predict", json=body)
            assert response.status_code == 200, response.text
            assert response.json()["model_version"] == "topic:v1"
            assert response.json()["label"] == "sports"
            review = {"text": "This medicine changed my life, no side effects at all"}
            answer = client.post("/predict", json=review).json()
            assert answer["model_version"] == "sentiment:v1"
            assert answer["label"] == "positive"
    finally:
        server.stop()
