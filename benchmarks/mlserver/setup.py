"""The MLServer contender: its virtual environment and its model repository.

    python -m benchmarks.mlserver.setup topic:v1 OUT_DIR --workers 2

MLServer 1.7.1 runs in a virtual environment of its own (``.bench-venvs/mlserver``, made on
first use from ``requirements.txt`` beside this file), since it pins its own FastAPI, Starlette
and uvloop. It serves the model with its scikit-learn runtime (``mlserver_sklearn``), which
loads a joblib file, so the stored mlserve model (safe formats only: TF-IDF vocabularies as JSON,
the estimator as skops) is rebuilt here into one scikit-learn ``Pipeline`` of the **same**
fitted objects: a ``FeatureUnion`` of the stored TF-IDF vectorizers (vocabulary and idf as
stored) and the stored estimator. Nothing is refitted; :func:`build_pipeline` checks that the
pipeline's probabilities equal the runner's own feature + estimator step on sample texts.

What MLServer serves is ``predict_proba`` of that pipeline: the features and the estimator.
mlserve also cleans the text (a no-op on the benchmark's already clean text) and applies the
model's calibration, so MLServer does slightly less work per text than mlserve.

MLServer's adaptive batching is on (``max_batch_size`` 32, ``max_batch_time`` 2 ms) and its
inference runs in ``parallel_workers`` processes, the same count as the other servers' workers.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
VENV = ROOT / ".bench-venvs" / "mlserver"
MODEL_NAME = "topic"


def ensure_venv(venv: Path = VENV) -> Path:
    """The MLServer virtual environment's ``mlserver`` command, installing it if needed."""
    exe = venv / "bin" / "mlserver"
    stamp = venv / ".requirements"
    wanted = (HERE / "requirements.txt").read_text()
    if exe.exists() and stamp.exists() and stamp.read_text() == wanted:
        return exe
    base = getattr(sys, "_base_executable", sys.executable)
    subprocess.run([base, "-m", "venv", str(venv)], check=True)
    pip = [str(venv / "bin" / "python"), "-m", "pip", "install", "-q"]
    subprocess.run([*pip, "-r", str(HERE / "requirements.txt")], check=True)
    stamp.write_text(wanted)
    return exe


def build_pipeline(tag: str):
    """The stored model's TF-IDF features and estimator as one fitted scikit-learn Pipeline."""
    import numpy as np
    from sklearn.pipeline import FeatureUnion, Pipeline

    from runners import load_runner

    runner = load_runner(tag, warmup=False)
    if runner.family != "classical":
        raise SystemExit(f"{tag} is not a classical model")
    estimator = runner.proba.__self__  # the stored estimator (predict_proba's owner)
    union = FeatureUnion([(f"tfidf{i}", v) for i, v in enumerate(runner.vectorizer.vectorizers)])
    pipeline = Pipeline([("features", union), ("estimator", estimator)])
    sample = [
        "the central bank raised interest rates again as inflation stayed high",
        "the striker scored twice in the second half to win the cup final",
        "a new smartphone with a faster chip and a better camera goes on sale",
    ]
    expected = runner.proba(runner.vectorizer.transform(sample))
    got = pipeline.predict_proba(sample)
    if not np.allclose(got, expected, rtol=0, atol=1e-12):
        raise SystemExit("the rebuilt pipeline does not reproduce the stored model")
    return pipeline


def write_repository(
    tag: str, out: Path, *, workers: int, http_port: int, grpc_port: int, metrics_port: int
) -> Path:
    """An MLServer model repository in ``out`` serving ``tag`` as model ``topic``."""
    import joblib

    model_dir = out / MODEL_NAME
    model_dir.mkdir(parents=True, exist_ok=True)
    joblib.dump(build_pipeline(tag), model_dir / "model.joblib")
    model_settings = {
        "name": MODEL_NAME,
        "implementation": "mlserver_sklearn.SKLearnModel",
        "max_batch_size": 32,
        "max_batch_time": 0.002,
        "parameters": {"uri": "./model.joblib", "extra": {"predict_fn": "predict_proba"}},
    }
    (model_dir / "model-settings.json").write_text(json.dumps(model_settings, indent=2))
    settings = {
        "debug": False,
        "parallel_workers": workers,
        "host": "127.0.0.1",
        "http_port": http_port,
        "grpc_port": grpc_port,
        "metrics_port": metrics_port,
    }
    (out / "settings.json").write_text(json.dumps(settings, indent=2))
    return out


def request_body(text: str) -> dict:
    """A V2 inference request for one text."""
    return {"inputs": [{"name": "text", "shape": [1], "datatype": "BYTES", "data": [text]}]}


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("tag")
    parser.add_argument("out", type=Path)
    parser.add_argument("--workers", type=int, default=os.cpu_count() or 1)
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    ensure_venv()
    write_repository(
        args.tag,
        args.out,
        workers=args.workers,
        http_port=args.port,
        grpc_port=args.port + 1,
        metrics_port=args.port + 2,
    )
    print(f"{VENV / 'bin' / 'mlserver'} start {args.out}")
