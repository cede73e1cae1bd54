"""What both baselines answer: the same fields as mlserve's /predict, minus the extras."""

from __future__ import annotations

from runners.base import Runner

# The request text of every benchmark run: a 27-word news sentence, already lowercase and free
# of the characters the models' cleaning removes, so every contender (MLServer's pipeline has
# no cleaning step) computes the same features from it.
TEXT = (
    "the central bank raised interest rates for the third time this year, saying that "
    "inflation was still too high and that growth would slow over the coming months"
)


def batch_texts(n: int) -> list[str]:
    """The texts of an ``n``-text batch: TEXT numbered, so no two are the same."""
    return [f"{TEXT} {i}" for i in range(n)]


# The 25-word drug review of the sentiment benchmarks (benchmarks.onnx_ab, benchmarks.shadow).
REVIEW = (
    "I have been taking this medication for three months. It helped my migraines a lot, "
    "although I had some nausea during the first week."
)


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
