"""Baseline: the same stored model behind a plain FastAPI + uvicorn app, no batching.

BENTOML_HOME=... BENCH_MODEL=sentiment:v1 uvicorn benchmarks.fastapi_app:app --port 3200
"""

from __future__ import annotations

import os
import time

from fastapi import FastAPI
from pydantic import BaseModel

from benchmarks.common import prediction_body
from runners import load_runner

runner = load_runner(os.environ.get("BENCH_MODEL", "sentiment:v1"))
app = FastAPI()


class Body(BaseModel):
    text: str
    model_version: str | None = None


@app.post("/predict")
def predict(body: Body) -> dict:
    start = time.perf_counter()
    body_out = prediction_body(runner, body.text)
    return {**body_out, "latency_ms": (time.perf_counter() - start) * 1000}
