"""The BentoML configuration service.py derives from the settings, as a worker applies it:
per-request OpenTelemetry spans (off unless MLSERVE_TRACING_ENABLED is set) and the request
timeout (above every mlserve deadline)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PROBE = """
import json, service
from bentoml._internal.container import BentoMLContainer
service.MLServe.to_asgi(is_main=True)  # applies the service's configuration, as a worker does
excluded = BentoMLContainer.tracing_excluded_urls.get()
print(json.dumps({
    "config": service.MLServe.config.get("tracing"),
    "predict_traced": not excluded.url_disabled("http://127.0.0.1:3000/predict"),
    "health_traced": not excluded.url_disabled("http://127.0.0.1:3000/health"),
    "timeout": service.MLServe.config["traffic"]["timeout"],
}))
"""


def _probe(tmp_path: Path, **env: str) -> dict:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("MLSERVE_")}
    clean.update(env, BENTOML_HOME=str(tmp_path), PYTHONPATH=str(ROOT))
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=tmp_path, env=clean, capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-2000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_no_span_is_made_by_default(tmp_path: Path) -> None:
    seen = _probe(tmp_path)
    assert seen["config"] == {"excluded_urls": ["."]}
    assert not seen["predict_traced"] and not seen["health_traced"]


def test_tracing_enabled_leaves_bentoml_tracing_as_configured(tmp_path: Path) -> None:
    seen = _probe(tmp_path, MLSERVE_TRACING_ENABLED="true")
    assert seen["config"] is None
    assert seen["predict_traced"] and seen["health_traced"]


def test_the_request_timeout_outlasts_inference_and_the_admin_wait(tmp_path: Path) -> None:
    """BentoML answers 504 and cancels the handler at traffic.timeout. It once was the inference
    timeout + 5 s (15 s), under the admin API's 30 s wait for every worker: on a slow machine a
    model load answered 504 half done. Now it is above both, whichever is longer."""
    assert _probe(tmp_path)["timeout"] == 60  # defaults: control 30 s + 30, inference 10 s + 5
    assert _probe(tmp_path, MLSERVE_CONTROL_TIMEOUT_SECONDS="90")["timeout"] == 120
    assert _probe(tmp_path, MLSERVE_INFER_TIMEOUT_SECONDS="120")["timeout"] == 125
