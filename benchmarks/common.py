"""What both baselines answer: the same fields as mlserve's /predict, minus the extras."""

from __future__ import annotations

from runners.base import Runner


def prediction_body(runner: Runner, text: str) -> dict:
    result = runner.predict([text])
    idx = int(result.predicted_index[0])
    probs = result.probabilities[0]
    return {
        "label": result.labels[idx],
        "confidence": float(probs[idx]),
        "probabilities": dict(zip(result.labels, map(float, probs), strict=True)),
        "model_version": runner.tag,
    }
