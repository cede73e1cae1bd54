"""The runner interface shared by every model family."""

from __future__ import annotations

import abc
import hashlib
import importlib
import json
import time
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np

from mlserve.errors import ModelIntegrityError
from mlserve.preprocessing import CleaningConfig, clean_texts
from mlserve.store import StoredModel, open_model

# family name (as recorded in a model's metadata) -> "module:Class"
FAMILIES = {
    "classical": "runners.classical:ClassicalRunner",
    "transformer": "runners.transformer:TransformerRunner",
    "onnx": "runners.onnx:OnnxRunner",
}
WARMUP_TEXTS = ["warm up", "a slightly longer sentence to warm the model up with padding"]


@dataclass
class BatchResult:
    """Predictions for a batch: row ``i`` of ``probabilities`` belongs to input ``i``."""

    labels: list[str]
    probabilities: np.ndarray  # (n, k) calibrated, rows sum to 1
    predicted_index: np.ndarray  # (n,) the model's decision (see Calibrator.decide)
    timing_ms: dict[str, float] = field(default_factory=dict)  # preprocess / model / postprocess

    @property
    def predicted(self) -> list[str]:
        return [self.labels[i] for i in self.predicted_index]


def add_preprocess_ms(timing: dict[str, float], ms: float) -> None:
    """Count cleaning (done before the batch) into a batch's preprocess stage."""
    timing["preprocess_ms"] = timing.get("preprocess_ms", 0.0) + ms


class Runner(abc.ABC):
    """Wraps one stored model version. Batch-native: one text is a batch of one.

    ``predict(texts)`` is ``infer(clean(texts))``: the server cleans a request's texts once,
    keys its cache on exactly what the model will see, and batches only the cleaned texts.
    """

    family: str = ""
    inline: bool = False
    """A lone request may run in the event loop itself when the model is fast (see
    mlserve.batching, INLINE_MAX_MS): true for models that hold the GIL while they compute, for
    which the batch thread brings no parallelism, only the hop to it and back."""

    def __init__(self, model: StoredModel):
        self.model = model
        self.tag = model.tag
        self.labels = model.labels
        self.cleaning = CleaningConfig(**model.metadata["preprocessing"]["cleaning"])
        self.loaded = False

    @abc.abstractmethod
    def load(self) -> None:
        """Read the verified files into memory (and onto the device)."""

    def clean(self, texts: list[str]) -> list[str]:
        """The texts as this model sees them (its own stored cleaning)."""
        return clean_texts(texts, self.cleaning)

    @abc.abstractmethod
    def infer(self, cleaned: list[str]) -> BatchResult:
        """Calibrated class probabilities for already cleaned texts, in input order."""

    def predict(self, texts: list[str]) -> BatchResult:
        """Calibrated class probabilities for raw ``texts``, in input order."""
        start = time.perf_counter()
        cleaned = self.clean(texts)
        clean_ms = (time.perf_counter() - start) * 1000.0
        result = self.infer(cleaned)
        add_preprocess_ms(result.timing_ms, clean_ms)
        return result

    def serving_options(self) -> dict[str, Any]:
        """Options of this server that change the model's answers (none by default)."""
        return {}

    @cached_property
    def identity(self) -> str:
        """A digest of everything that decides this model's answers: every file's sha256, the
        labels, the cleaning and the serving options. Two models with one identity answer
        alike; a retrained or re-imported tag gets a new one."""
        meta = self.model.metadata
        content = {
            "family": self.family,
            "files": meta.get("files", {}),
            "labels": self.labels,
            "cleaning": self.cleaning.model_dump(),
            "options": self.serving_options(),
        }
        blob = json.dumps(content, sort_keys=True, separators=(",", ":")).encode()
        return hashlib.sha256(blob).hexdigest()[:32]

    def warmup(self) -> None:
        """Run a couple of batches so the first real request pays no start-up cost."""
        for n in (1, len(WARMUP_TEXTS)):
            self.predict(WARMUP_TEXTS[:n])

    def close(self) -> None:
        """Release memory (and GPU memory). The runner cannot predict afterwards."""
        self.loaded = False


def runner_class(family: str) -> type[Runner]:
    """The runner class that serves ``family``."""
    try:
        module_name, cls_name = FAMILIES[family].split(":")
    except KeyError as exc:
        raise ModelIntegrityError(f"unknown runner family {family!r}") from exc
    return getattr(importlib.import_module(module_name), cls_name)


def load_runner(tag: str, *, warmup: bool = True) -> Runner:
    """Open ``tag`` (checksums verified), load it with its family's runner, and warm it up."""
    model = open_model(tag, verify=True)
    runner = runner_class(model.family)(model)
    runner.load()
    runner.loaded = True
    if warmup:
        runner.warmup()
    return runner


class Stopwatch:
    """Collects named stage durations in milliseconds."""

    def __init__(self) -> None:
        self.timing: dict[str, float] = {}
        self._t = time.perf_counter()

    def lap(self, stage: str) -> None:
        now = time.perf_counter()
        self.timing[stage] = (now - self._t) * 1000.0
        self._t = now
