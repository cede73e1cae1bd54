"""Locust load test for a running mlserve.

    .venv/bin/locust -f locustfile.py --headless -H http://127.0.0.1:3000 \
        -u 32 -r 8 -t 60s --csv benchmarks/results/locust

Texts are real reviews and news articles from the training data sets (downloaded once into the
mlserve data cache). The mix: single predictions on the classical, transformer and topic models
(mixed versions), a share of repeated texts (cache hits) and 20-text batches.

The run fails (exit code 1) when more than 1 % of requests fail or the
95th percentile exceeds MLSERVE_LOCUST_P95_MS (default 500 ms).
"""

from __future__ import annotations

import os
import random

from locust import FastHttpUser, between, events, task

P95_LIMIT_MS = float(os.environ.get("MLSERVE_LOCUST_P95_MS", "500"))
_TEXTS: dict[str, list[str]] = {}


def texts(kind: str) -> list[str]:
    if not _TEXTS:
        from training.data import load_bbc, load_drugscom

        _TEXTS["reviews"] = [t[:2000] for t in load_drugscom().texts]
        _TEXTS["news"] = [t[:2000] for t in load_bbc().texts]
    return _TEXTS[kind]


class ClassifierUser(FastHttpUser):
    wait_time = between(0.0, 0.05)

    def _post(self, path: str, body: dict, name: str) -> None:
        with self.client.post(path, json=body, name=name, catch_response=True) as resp:
            if resp.status_code != 200:
                resp.failure(f"HTTP {resp.status_code}: {resp.text[:200]}")

    @task(6)
    def predict_classical(self) -> None:
        self._post("/predict", {"text": random.choice(texts("reviews"))}, "/predict classical")

    @task(2)
    def predict_transformer(self) -> None:
        body = {"text": random.choice(texts("reviews")), "model_version": "sentiment:v2"}
        self._post("/predict", body, "/predict transformer")

    @task(1)
    def predict_topic(self) -> None:
        body = {"text": random.choice(texts("news")), "model_version": "topic"}
        self._post("/predict", body, "/predict topic")

    @task(2)
    def repeated(self) -> None:
        """A small pool of texts sent again and again: cache hits."""
        body = {"text": random.choice(texts("reviews")[:20])}
        self._post("/predict", body, "/predict repeated")

    @task(1)
    def batch(self) -> None:
        body = {"texts": random.sample(texts("reviews"), 20), "model_version": "sentiment:v1"}
        self._post("/batch-predict", body, "/batch-predict 20")


@events.quitting.add_listener
def _enforce_slo(environment, **_kwargs) -> None:
    stats = environment.stats.total
    p95 = stats.get_response_time_percentile(0.95) or 0.0
    if stats.fail_ratio > 0.01:
        print(f"FAIL: failure ratio {stats.fail_ratio:.2%} > 1%")
        environment.process_exit_code = 1
    elif p95 > P95_LIMIT_MS:
        print(f"FAIL: p95 {p95:.0f} ms > {P95_LIMIT_MS:.0f} ms")
        environment.process_exit_code = 1
