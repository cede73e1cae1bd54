"""Baseline: a naive one-service BentoML app, one model call per request, no batching.

BENTOML_HOME=... BENCH_MODEL=sentiment:v1 bentoml serve benchmarks.naive_service:Naive
"""

from __future__ import annotations

import os

import bentoml


@bentoml.service(name="naive", workers=1, logging={"access": {"enabled": False}})
class Naive:
    def __init__(self) -> None:
        from runners import load_runner

        self.runner = load_runner(os.environ.get("BENCH_MODEL", "sentiment:v1"))

    @bentoml.api
    def predict(self, text: str, model_version: str | None = None) -> dict:
        result = self.runner.predict([text])
        idx = int(result.predicted_index[0])
        probs = result.probabilities[0]
        return {
            "label": result.labels[idx],
            "confidence": float(probs[idx]),
            "probabilities": dict(zip(result.labels, map(float, probs), strict=True)),
            "model_version": self.runner.tag,
        }
