""".github/workflows/ci.yml validates against the GitHub workflow schema (check-jsonschema's
vendored copy, offline) and does what users of the repository rely on: lint, the tests with a
Redis service container and the tools the deploy tests run, the bento, a Docker image built by
BentoML's default backend, and a smoke test of that image."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[2]
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"


def workflow() -> dict:
    return yaml.safe_load(WORKFLOW.read_text())


def check_jsonschema(path: Path) -> subprocess.CompletedProcess[str]:
    cmd = [sys.executable, "-m", "check_jsonschema", "--builtin-schema", "vendor.github-workflows"]
    return subprocess.run([*cmd, str(path)], capture_output=True, text=True, timeout=60)


def scripts(job: dict) -> str:
    return "\n".join(step.get("run", "") for step in job["steps"])


def test_workflow_matches_the_github_workflow_schema(tmp_path: Path) -> None:
    out = check_jsonschema(WORKFLOW)
    assert out.returncode == 0, out.stdout + out.stderr
    # The schema is strict enough to catch a misspelt key.
    bad = workflow()
    bad["jobs"]["test"]["step"] = bad["jobs"]["test"].pop("steps")
    (tmp_path / "ci.yml").write_text(yaml.safe_dump(bad))
    assert check_jsonschema(tmp_path / "ci.yml").returncode != 0


def test_runs_on_pushes_and_pull_requests_with_ci_true() -> None:
    wf = workflow()
    triggers = wf.get("on", wf.get(True))  # YAML 1.1 reads a bare `on` as true
    assert {"push", "pull_request"} <= set(triggers)
    assert wf["env"]["CI"] == "true"  # run_tests.sh and the deploy tests fail, never skip
    assert wf["permissions"] == {"contents": "read"}


def test_lint_and_the_tests_with_a_redis_service() -> None:
    jobs = workflow()["jobs"]
    assert "ruff check ." in scripts(jobs["lint"])
    assert "ruff format --check ." in scripts(jobs["lint"])
    test = jobs["test"]
    assert test["needs"] == "lint"
    redis = test["services"]["redis"]
    assert redis["image"].startswith("redis:")
    assert "6379:6379" in redis["ports"]  # run_tests.sh looks for Redis on 127.0.0.1:6379
    assert "--health-cmd" in redis["options"]
    run = scripts(test)
    assert "./run_tests.sh" in run
    # Every tool a test runs for real (redis-server, haproxy, prometheus/promtool, kubectl).
    for package in ("redis-server", "haproxy", "prometheus"):
        assert re.search(rf"apt-get install[^\n]*(\\\n[^\n]*)*\b{package}\b", run), package
    assert "kubectl version --client" in run


def test_builds_the_bento_and_a_docker_image_and_smoke_tests_it() -> None:
    jobs = workflow()["jobs"]
    assert "bentoml build" in scripts(jobs["test"])
    # bentoml reads a relative export/import path from `/` (not writable on a runner).
    both = scripts(jobs["test"]) + scripts(jobs["image"])
    moves = re.findall(r"bentoml (?:export|import) [^\n]*", both)
    assert len(moves) == 2 and all('"$PWD/' in m for m in moves), moves
    image = jobs["image"]
    assert image["needs"] == "test"
    run = scripts(image)
    containerize = re.search(r"bentoml containerize [^\n]*", run)
    assert containerize, run
    assert "--backend" not in containerize.group(0)  # BentoML's default: Docker
    assert re.search(r"docker run -d [^\n]*-p 3000:3000", run)
    assert "http://127.0.0.1:3000/ready" in run
    assert re.search(r"curl -fsS http://127\.0\.0\.1:3000/predict [^\n]*content-type", run)
    assert '"label"' in run  # the answer is checked, not only the status
    # Logs and clean-up even when the smoke test fails.
    always = [s for s in image["steps"] if s.get("if") == "always()"]
    assert any("docker logs" in s["run"] for s in always)
    assert any("docker rm -f" in s["run"] for s in always)


def test_actions_are_pinned_to_a_major_version() -> None:
    for name, job in workflow()["jobs"].items():
        for step in job["steps"]:
            if "uses" in step:
                assert re.fullmatch(r"[\w.-]+/[\w.-]+@v\d+", step["uses"]), (name, step["uses"])
