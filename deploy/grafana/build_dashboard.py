"""Build the mlserve Grafana dashboard (dashboards/mlserve.json) from code.

    python deploy/grafana/build_dashboard.py            # write dashboards/mlserve.json
    python deploy/grafana/build_dashboard.py --check    # exit 1 if the committed file is stale

Plain dicts, no Grafana library. `panel_queries()` lists every panel's PromQL with the Grafana
variables filled in, so tests (and an end-to-end run against a real Prometheus) can use them.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

OUT = Path(__file__).resolve().parent / "dashboards" / "mlserve.json"
UID = "mlserve"
DATASOURCE = {"type": "prometheus", "uid": "${datasource}"}
# The values the Grafana variables take when a query runs outside Grafana.
VARIABLES = {"$__rate_interval": "5m", "$model_version": ".*"}

RATE = "$__rate_interval"
MV = 'model_version=~"$model_version"'
PREDICT_ROUTES = 'route=~"/predict|/batch-predict|/batch-predict/file"'


def quantile(q: float, metric: str, selector: str, by: str) -> str:
    return (
        f"histogram_quantile({q}, sum by (le, {by}) (rate({metric}_bucket{{{selector}}}[{RATE}])))"
    )


def mean(metric: str, selector: str, by: str) -> str:
    return (
        f"sum by ({by}) (rate({metric}_sum{{{selector}}}[{RATE}]))"
        f" / sum by ({by}) (rate({metric}_count{{{selector}}}[{RATE}]))"
    )


def target(expr: str, legend: str) -> dict[str, Any]:
    return {"expr": expr, "legendFormat": legend}


# (title, kind, unit, width, description, targets, extra field config)
PANELS: list[tuple[str, str, str, int, str, list[dict[str, Any]], dict[str, Any]]] = [
    (
        "API replicas up",
        "stat",
        "short",
        6,
        "Replicas Prometheus scrapes successfully (job api).",
        [target('sum(up{job="api"})', "up")],
        {},
    ),
    (
        "Loaded model versions per replica",
        "timeseries",
        "short",
        9,
        "Model versions loaded in each replica (the largest count over its workers).",
        [target("sum by (instance) (mlserve_model_loaded)", "{{instance}}")],
        {},
    ),
    (
        "Cache circuit open",
        "timeseries",
        "short",
        9,
        "1 while a replica's Redis cache circuit breaker is open (Redis down or too slow).",
        [target("max by (instance) (mlserve_cache_circuit_open)", "{{instance}}")],
        {"max": 1, "min": 0},
    ),
    (
        "Request rate by route",
        "timeseries",
        "reqps",
        12,
        "Requests per second by route.",
        [target(f"sum by (route) (rate(mlserve_requests_total[{RATE}]))", "{{route}}")],
        {},
    ),
    (
        "Error ratio by route (5xx)",
        "timeseries",
        "percentunit",
        12,
        "Share of answers that are 5xx, by route (0 for a route without any). The alert fires "
        "over 5 % on the predict routes.",
        [
            target(
                # `or 0 * ...`: a route that never answered 5xx shows 0, not "No data".
                f'(sum by (route) (rate(mlserve_requests_total{{status=~"5.."}}[{RATE}]))'
                f" or 0 * sum by (route) (rate(mlserve_requests_total[{RATE}])))"
                f" / sum by (route) (rate(mlserve_requests_total[{RATE}]))",
                "{{route}}",
            )
        ],
        {"thresholds": [0.05]},
    ),
    (
        "Latency p50 / p95 / p99 (predict routes)",
        "timeseries",
        "s",
        12,
        "End-to-end request latency quantiles. SLO: /predict p99 under 500 ms.",
        [
            target(
                quantile(q, "mlserve_request_latency_seconds", PREDICT_ROUTES, "route"),
                f"p{round(q * 100)} {{{{route}}}}",
            )
            for q in (0.5, 0.95, 0.99)
        ],
        {"thresholds": [0.5]},
    ),
    (
        "Inference time per stage (mean)",
        "timeseries",
        "s",
        12,
        "Mean time per request in each inference stage: queue, preprocess, model, postprocess.",
        [
            target(
                mean("mlserve_inference_latency_seconds", MV, "model_version, stage"),
                "{{model_version}} {{stage}}",
            )
        ],
        {},
    ),
    (
        "Batch size",
        "timeseries",
        "short",
        8,
        "Texts per adaptive batch: mean and p95.",
        [
            target(mean("mlserve_batch_size", MV, "model_version"), "mean {{model_version}}"),
            target(
                quantile(0.95, "mlserve_batch_size", MV, "model_version"), "p95 {{model_version}}"
            ),
        ],
        {},
    ),
    (
        "Batch queue wait p50 / p95",
        "timeseries",
        "s",
        8,
        "How long requests wait for their batch. The alert fires over 100 ms at p95.",
        [
            target(
                quantile(
                    q, "mlserve_inference_latency_seconds", f'stage="queue", {MV}', "model_version"
                ),
                f"p{round(q * 100)} {{{{model_version}}}}",
            )
            for q in (0.5, 0.95)
        ],
        {"thresholds": [0.1]},
    ),
    (
        "Cache hit ratio",
        "timeseries",
        "percentunit",
        8,
        "Share of cache lookups that hit (hits over hits and misses). Redis errors show in the "
        'circuit panel and as mlserve_cache_total{event="error"}.',
        [
            target(
                f'sum(rate(mlserve_cache_total{{event="hit"}}[{RATE}]))'
                f' / sum(rate(mlserve_cache_total{{event=~"hit|miss"}}[{RATE}]))',
                "hit ratio",
            )
        ],
        {"max": 1, "min": 0},
    ),
    (
        "Predictions by label",
        "timeseries",
        "reqps",
        12,
        "Predictions per second by model version and predicted label.",
        [
            target(
                f"sum by (model_version, label) (rate(mlserve_predictions_total{{{MV}}}[{RATE}]))",
                "{{model_version}} {{label}}",
            )
        ],
        {"stack": True},
    ),
    (
        "Prediction confidence",
        "timeseries",
        "percentunit",
        12,
        "Confidence of the predicted label: median and 10th percentile, by model version.",
        [
            target(
                quantile(q, "mlserve_prediction_confidence", MV, "model_version"),
                f"p{round(q * 100)} {{{{model_version}}}}",
            )
            for q in (0.5, 0.1)
        ],
        {"max": 1, "min": 0},
    ),
    (
        "Drift score by model version",
        "timeseries",
        "short",
        12,
        "Largest feature PSI of recent traffic against the training data; over 0.2 is "
        "significant drift.",
        [target(f"max by (model_version) (mlserve_drift_score{{{MV}}})", "{{model_version}}")],
        {"thresholds": [0.2]},
    ),
    (
        "Shadow agreement rate",
        "timeseries",
        "percentunit",
        12,
        "Share of compared texts on which the shadow version predicted the primary's label, "
        "by (primary, shadow) pair (issue #14; see GET /admin/models/{name}/compare).",
        [
            target(
                f"sum by (primary, shadow) (rate(mlserve_shadow_agreements_total[{RATE}]))"
                f" / sum by (primary, shadow) (rate(mlserve_shadow_comparisons_total[{RATE}]))",
                "{{primary}} vs {{shadow}}",
            )
        ],
        {"max": 1, "min": 0},
    ),
    (
        "Shadow mean absolute probability difference",
        "timeseries",
        "short",
        12,
        "Mean over compared texts of the mean absolute difference of the two versions' "
        "probabilities, by (primary, shadow) pair.",
        [
            target(
                "sum by (primary, shadow) "
                f"(rate(mlserve_shadow_probability_difference_total[{RATE}]))"
                f" / sum by (primary, shadow) (rate(mlserve_shadow_comparisons_total[{RATE}]))",
                "{{primary}} vs {{shadow}}",
            )
        ],
        {"min": 0},
    ),
    (
        "Shadow p50 latency by role",
        "timeseries",
        "s",
        12,
        "Median latency of compared requests: the primary's request and the shadow's run of "
        "the same texts.",
        [
            target(
                quantile(0.5, "mlserve_shadow_latency_seconds", "", "primary, shadow, role"),
                "{{role}} {{primary}} vs {{shadow}}",
            )
        ],
        {},
    ),
    (
        "Shadow runs by outcome",
        "timeseries",
        "reqps",
        12,
        "Requests offered to a shadow per second: compared, dropped (queue full, shadow "
        "overloaded or cleared) or error (never shown to clients).",
        [
            target(
                f"sum by (primary, shadow, outcome) (rate(mlserve_shadow_runs_total[{RATE}]))",
                "{{outcome}} {{primary}} vs {{shadow}}",
            )
        ],
        {"stack": True},
    ),
    (
        "Errors by type",
        "timeseries",
        "reqps",
        12,
        "Error answers per second by type (mlserve_errors_total).",
        [target(f"sum by (type) (rate(mlserve_errors_total[{RATE}]))", "{{type}}")],
        {"stack": True},
    ),
]


def field_config(unit: str, extra: dict[str, Any]) -> dict[str, Any]:
    steps: list[dict[str, Any]] = [{"color": "green", "value": None}]
    steps += [{"color": "red", "value": v} for v in extra.get("thresholds", [])]
    defaults: dict[str, Any] = {
        "unit": unit,
        "thresholds": {"mode": "absolute", "steps": steps},
        "custom": {
            "drawStyle": "line",
            "lineWidth": 1,
            "fillOpacity": 10,
            "showPoints": "never",
            "stacking": {"mode": "normal" if extra.get("stack") else "none", "group": "A"},
            "thresholdsStyle": {"mode": "line" if extra.get("thresholds") else "off"},
        },
    }
    for key in ("min", "max"):
        if key in extra:
            defaults[key] = extra[key]
    return {"defaults": defaults, "overrides": []}


def panels() -> list[dict[str, Any]]:
    out, x, y, row_height = [], 0, 0, 8
    for number, (title, kind, unit, width, description, targets, extra) in enumerate(PANELS, 1):
        if x + width > 24:
            x, y = 0, y + row_height
        panel: dict[str, Any] = {
            "id": number,
            "type": kind,
            "title": title,
            "description": description,
            "datasource": DATASOURCE,
            "gridPos": {"h": row_height, "w": width, "x": x, "y": y},
            "fieldConfig": field_config(unit, extra),
            "targets": [
                {"datasource": DATASOURCE, "refId": chr(ord("A") + i), **t}
                for i, t in enumerate(targets)
            ],
        }
        if kind == "timeseries":
            panel["options"] = {
                "legend": {"displayMode": "list", "placement": "bottom", "showLegend": True},
                "tooltip": {"mode": "multi", "sort": "desc"},
            }
        else:
            panel["fieldConfig"]["defaults"].pop("custom")
            panel["options"] = {
                "reduceOptions": {"calcs": ["lastNotNull"], "fields": "", "values": False},
                "colorMode": "value",
                "graphMode": "area",
            }
        out.append(panel)
        x += width
    return out


def dashboard() -> dict[str, Any]:
    return {
        "uid": UID,
        "title": "mlserve",
        "description": "mlserve text-classification serving: traffic, errors, latency, batching, "
        "cache, predictions, drift, shadow comparisons. Generated by "
        "deploy/grafana/build_dashboard.py: edit that.",
        "tags": ["mlserve", "bentoml"],
        "timezone": "utc",
        "editable": False,
        "graphTooltip": 1,
        "schemaVersion": 39,
        "version": 1,
        "refresh": "30s",
        "time": {"from": "now-1h", "to": "now"},
        "annotations": {"list": []},
        "links": [],
        "templating": {
            "list": [
                {
                    "name": "datasource",
                    "label": "Data source",
                    "type": "datasource",
                    "query": "prometheus",
                    "current": {},
                    "hide": 0,
                },
                {
                    "name": "model_version",
                    "label": "Model version",
                    "type": "query",
                    "datasource": DATASOURCE,
                    "query": {
                        "query": "label_values(mlserve_model_loaded, model_version)",
                        "refId": "model_version",
                    },
                    "definition": "label_values(mlserve_model_loaded, model_version)",
                    "refresh": 2,
                    "includeAll": True,
                    "allValue": ".*",
                    "multi": True,
                    "current": {},
                    "sort": 1,
                    "hide": 0,
                },
            ]
        },
        "panels": panels(),
    }


def render() -> str:
    return json.dumps(dashboard(), indent=2) + "\n"


def panel_queries() -> list[tuple[str, str]]:
    """(panel title, PromQL) for every target of every panel, Grafana variables filled in."""
    out = []
    for panel in dashboard()["panels"]:
        for t in panel["targets"]:
            expr = t["expr"]
            for name, value in VARIABLES.items():
                expr = expr.replace(name, value)
            out.append((panel["title"], expr))
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--check", action="store_true", help="fail if the JSON file is stale")
    args = parser.parse_args(argv)
    text = render()
    if args.check:
        if not OUT.exists() or OUT.read_text() != text:
            print(f"{OUT} is stale: run python {Path(__file__).name}", file=sys.stderr)
            return 1
        return 0
    OUT.parent.mkdir(parents=True, exist_ok=True)
    OUT.write_text(text)
    print(f"wrote {OUT} ({len(dashboard()['panels'])} panels)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
