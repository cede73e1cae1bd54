"""The int8 ONNX variant of the demo transformer (sentiment:v3, made by `mlserve optimize` from
sentiment:v2) served by a real 2-worker server: it answers like the float model, its quality
gate is in the store, and it hot-swaps in under load without a failed request."""

from __future__ import annotations

import threading
import time

import pytest

from tests.integration.conftest import READY_TIMEOUT_S, wait_for
from training.data import load_named

pytestmark = pytest.mark.integration

TOKEN = "onnx-test-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(scope="module")
def reviews() -> list[str]:
    return load_named("drugscom").texts[:60]


def test_the_int8_variant_answers_like_the_float_model(start_server, reviews) -> None:
    server = start_server(
        ready=True, MLSERVE_MODELS="sentiment:v2,sentiment:v3", MLSERVE_WORKERS="2"
    )
    try:
        with server.client() as client:
            models = {m["tag"]: m for m in client.get("/models").json()["models"]}
            assert models["sentiment:v3"]["runner_family"] == "onnx"
            float_answers = client.post(
                "/batch-predict", json={"texts": reviews, "model_version": "sentiment:v2"}
            ).json()["predictions"]
            int8 = client.post(
                "/batch-predict", json={"texts": reviews, "model_version": "sentiment:v3"}
            )
            assert int8.status_code == 200, int8.text
            int8_answers = int8.json()["predictions"]
            assert int8.json()["model_version"] == "sentiment:v3"
            agree = sum(
                a["label"] == b["label"] for a, b in zip(float_answers, int8_answers, strict=True)
            )
            # The store's quality gate measured 0.97 on the test split; real reviews, too.
            assert agree >= 0.85 * len(reviews), agree
            one = client.post(
                "/predict", json={"text": reviews[0], "model_version": "sentiment:v3"}
            )
            assert one.status_code == 200
            probabilities = one.json()["probabilities"]
            # Each probability is rounded to 6 decimals, so k of them sum to 1 within k * 5e-7
            # (0.080263 + 0.032282 + 0.887456 = 1.000001 in one run).
            assert abs(sum(probabilities.values()) - 1.0) <= len(probabilities) * 5e-7 + 1e-12
    finally:
        server.stop()


def test_the_int8_variant_hot_swaps_in_under_load(start_server, reviews) -> None:
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v2",
        MLSERVE_DEFAULT_MODEL="sentiment",
        MLSERVE_WORKERS="2",
        MLSERVE_ADMIN_TOKEN=TOKEN,
        MLSERVE_CACHE_ENABLED="false",
    )
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []

    def load() -> None:
        with server.client(timeout=30) as client:
            i = 0
            while not stop.is_set():
                r = client.post("/predict", json={"text": reviews[i % len(reviews)]})
                seen.append((r.status_code, r.json().get("model_version")))
                i += 1

    threads = [threading.Thread(target=load) for _ in range(8)]
    try:
        for t in threads:
            t.start()
        deadline = time.monotonic() + 60
        while len(seen) < 20 and time.monotonic() < deadline:  # the float model answers first
            threading.Event().wait(0.05)
        with server.client(timeout=READY_TIMEOUT_S) as client:
            r = client.post(
                "/admin/models/load",
                json={"tag": "sentiment:v3", "make_default": True},
                headers=AUTH,
            )
            assert r.status_code == 200, r.text
            wait_for(server, "/ready", 200, READY_TIMEOUT_S)
            before = len(seen)
            deadline = time.monotonic() + 60
            while len(seen) < before + 40 and time.monotonic() < deadline:  # after the swap
                threading.Event().wait(0.05)
        stop.set()
        for t in threads:
            t.join(timeout=60)
        assert seen and {code for code, _ in seen} == {200}, [s for s in seen if s[0] != 200][:5]
        versions = [v for _, v in seen]
        summary = f"before={before} total={len(versions)} after={versions[before:][:30]}"
        assert versions[:20] == ["sentiment:v2"] * 20, summary
        assert versions[-1] == "sentiment:v3", summary
        # At most those already in flight when the swap answered: one per client.
        assert versions[before:].count("sentiment:v2") <= 8, summary
    finally:
        stop.set()
        server.stop()
