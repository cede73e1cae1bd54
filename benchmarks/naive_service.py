"""Baseline: a naive one-service BentoML app, one model call per request, no batching.

BENTOML_HOME=... BENCH_MODEL=sentiment:v1 bentoml serve benchmarks.naive_service:Naive
"""

from __future__ import annotations

import os

import bentoml

from benchmarks.common import prediction_body


@bentoml.service(
    name="naive",
    workers=int(os.environ.get("BENCH_WORKERS", "1")),
    logging={"access": {"enabled": False}},
)
class Naive:
    def __init__(self) -> None:
        from runners import load_runner

        self.runner = load_runner(os.environ.get("BENCH_MODEL", "sentiment:v1"))

    @bentoml.api
    def predict(self, text: str, model_version: str | None = None) -> dict:
        return prediction_body(self.runner, text)
