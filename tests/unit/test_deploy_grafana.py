"""deploy/grafana: the committed dashboard is the generator's output, every panel has a PromQL
target that promtool parses and that reads only real mlserve metrics, and the provisioning
files point Grafana at Prometheus and at the dashboard folder."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import yaml

from tests.unit.deploy_tools import DEPLOY, KNOWN_SERIES, metric_names, run, tool

GRAFANA = DEPLOY / "grafana"


def generator():
    spec = importlib.util.spec_from_file_location("build_dashboard", GRAFANA / "build_dashboard.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_committed_dashboard_is_the_generators_output() -> None:
    build = generator()
    committed = (GRAFANA / "dashboards" / "mlserve.json").read_text()
    assert committed == build.render(), "run python deploy/grafana/build_dashboard.py"
    assert build.main(["--check"]) == 0


def test_every_panel_has_a_promql_target() -> None:
    dashboard = json.loads((GRAFANA / "dashboards" / "mlserve.json").read_text())
    assert dashboard["uid"] == "mlserve"
    titles = [p["title"] for p in dashboard["panels"]]
    assert len(titles) == len(set(titles))
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        assert panel["targets"], panel["title"]
        for t in panel["targets"]:
            assert t["expr"].strip() and t["refId"], panel["title"]
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}
            # Only the variables the generator can fill in for plain PromQL.
            leftover = set(re.findall(r"\$\w+", t["expr"])) - {"$__rate_interval", "$model_version"}
            assert not leftover, (panel["title"], leftover)
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24


def test_the_required_views_are_there() -> None:
    queries = generator().panel_queries()
    text = "\n".join(q for _, q in queries)
    for needle in (
        "rate(mlserve_requests_total",  # request rate
        'mlserve_requests_total{status=~"5.."}',  # error ratio
        "histogram_quantile(0.5, sum by (le, route) (rate(mlserve_request_latency_seconds_bucket",
        "histogram_quantile(0.95, sum by (le, route) (rate(mlserve_request_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le, route) (rate(mlserve_request_latency_seconds_bucket",
        "by (model_version, stage) (rate(mlserve_inference_latency_seconds_sum",  # per stage
        "mlserve_batch_size_bucket",
        'mlserve_inference_latency_seconds_bucket{stage="queue"',  # queue wait
        'mlserve_cache_total{event="hit"}',  # hit ratio
        "sum by (model_version, label) (rate(mlserve_predictions_total",
        "mlserve_prediction_confidence_bucket",
        "max by (model_version) (mlserve_drift_score",
        "sum by (instance) (mlserve_model_loaded)",  # loaded models per replica
    ):
        assert needle in text, needle
    for title, expr in queries:
        assert "$" not in expr, (title, expr)
        unknown = metric_names(expr) - KNOWN_SERIES
        assert not unknown, f"{title}: unknown series {unknown}"


def test_promtool_parses_every_panel_query(tmp_path: Path) -> None:
    queries = generator().panel_queries()
    rules = {
        "groups": [
            {
                "name": "dashboard_panels",
                "rules": [
                    {"record": f"mlserve_dashboard:panel_{i}", "expr": expr}
                    for i, (_, expr) in enumerate(queries)
                ],
            }
        ]
    }
    path = tmp_path / "panels.yml"
    path.write_text(yaml.safe_dump(rules, sort_keys=False))
    out = run([tool("promtool"), "check", "rules", str(path)])
    assert f"SUCCESS: {len(queries)} rules found" in out.stdout


def test_provisioning() -> None:
    datasources = yaml.safe_load(
        (GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    (source,) = datasources["datasources"]
    assert source["type"] == "prometheus"
    assert source["url"] == "http://prometheus:9090"
    providers = yaml.safe_load(
        (GRAFANA / "provisioning" / "dashboards" / "mlserve.yml").read_text()
    )
    (provider,) = providers["providers"]
    assert provider["type"] == "file"
    # compose.yaml mounts deploy/grafana/dashboards at this path.
    compose = yaml.safe_load((DEPLOY / "compose.yaml").read_text())
    volumes = compose["services"]["grafana"]["volumes"]
    assert f"./grafana/dashboards:{provider['options']['path']}:ro" in volumes
