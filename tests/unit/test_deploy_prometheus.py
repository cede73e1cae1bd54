"""deploy/prometheus: the config and the alert rules pass promtool, and the rules' own unit tests
(alerts_test.yml, `promtool test rules`) show each alert firing on a broken series and quiet on a
healthy one."""

from __future__ import annotations

import re
import shutil
from pathlib import Path

import yaml

from tests.unit.deploy_tools import DEPLOY, KNOWN_SERIES, metric_names, run, tool

PROM = DEPLOY / "prometheus"
ALERTS = {
    "MLServeHighErrorRatio",
    "MLServePredictLatencyHigh",
    "MLServeReplicaDown",
    "MLServeReplicaNotReady",
    "MLServeNoModelLoaded",
    "MLServeDriftHigh",
    "MLServeCacheCircuitOpen",
    "MLServeBatchQueueWaitHigh",
    "MLServeBatchConsumerRestarting",
    "MLServeRateLimitedSpike",
}


def rules() -> list[dict]:
    groups = yaml.safe_load((PROM / "alerts.yml").read_text())["groups"]
    return [rule for group in groups for rule in group["rules"]]


def test_promtool_check_config(tmp_path: Path) -> None:
    # On a copy: promtool resolves rule_files next to the config, as Prometheus does.
    for name in ("prometheus.yml", "alerts.yml"):
        shutil.copy(PROM / name, tmp_path / name)
    out = run([tool("promtool"), "check", "config", str(tmp_path / "prometheus.yml")])
    assert "SUCCESS" in out.stdout + out.stderr
    config = yaml.safe_load((PROM / "prometheus.yml").read_text())
    assert config["rule_files"] == ["alerts.yml"]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    assert jobs["api"]["static_configs"][0]["targets"] == ["api:3000"]
    assert jobs["api"]["metrics_path"] == "/metrics"
    assert "prometheus" in jobs


def test_promtool_check_rules() -> None:
    out = run([tool("promtool"), "check", "rules", str(PROM / "alerts.yml")])
    assert f"SUCCESS: {len(ALERTS)} rules found" in out.stdout


def test_promtool_test_rules() -> None:
    out = run([tool("promtool"), "test", "rules", "alerts_test.yml"], cwd=PROM)
    assert "SUCCESS" in out.stdout


def test_every_alert_is_labelled_annotated_and_uses_real_metrics() -> None:
    readme = (DEPLOY / "README.md").read_text()
    anchors = {
        re.sub(r"[^a-z0-9-]", "", h.lower().replace(" ", "-"))
        for h in re.findall(r"^#+ (.+)$", readme, flags=re.M)
    }
    names = set()
    for rule in rules():
        names.add(rule["alert"])
        assert rule["labels"]["severity"] in ("critical", "warning"), rule["alert"]
        assert set(rule["annotations"]) == {"summary", "description", "runbook_url"}
        page, _, anchor = rule["annotations"]["runbook_url"].partition("#")
        assert page == "deploy/README.md" and anchor in anchors, rule["alert"]
        unknown = metric_names(rule["expr"]) - KNOWN_SERIES
        assert not unknown, f"{rule['alert']}: unknown series {unknown}"
    assert names == ALERTS


def test_every_alert_has_a_firing_and_a_quiet_test() -> None:
    tests = yaml.safe_load((PROM / "alerts_test.yml").read_text())
    assert tests["rule_files"] == ["alerts.yml"]
    fired, quiet = set(), set()
    for case in tests["tests"]:
        for check in case["alert_rule_test"]:
            (fired if check["exp_alerts"] else quiet).add(check["alertname"])
    assert fired == ALERTS
    assert quiet == ALERTS
