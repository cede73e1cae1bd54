"""Baseline: the same stored model behind a plain FastAPI + uvicorn app, no batching.

BENTOML_HOME=... BENCH_MODEL=sentiment:v1 uvicorn benchmarks.fastapi_app:app --port 3200
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI
from pydantic import BaseModel

from runners import load_runner

runner = load_runner(os.environ.get("BENCH_MODEL", "sentiment:v1"))
app = FastAPI()


class Body(BaseModel):
    text: str
    model_version: str | None = None


@app.post("/predict")
def predict(body: Body) -> dict:
    start = time.perf_counter()
    result = runner.predict([body.text])
    idx = int(result.predicted_index[0])
    probs = result.probabilities[0]
    return {
        "label": result.labels[idx],
        "confidence": float(probs[idx]),
        "probabilities": dict(zip(result.labels, map(float, probs), strict=True)),
        "latency_ms": (time.perf_counter() - start) * 1000,
        "model_version": runner.tag,
    }
