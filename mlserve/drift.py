"""Drift detection: live traffic against the reference profile stored with each model.

The profile (``drift_reference.json``, written at training time) holds, for the training data:
text-length bins, the vocabulary (for the out-of-vocabulary rate) and, for the held-out test
split, the predicted-label and confidence distributions. Each worker keeps a sliding window of
recent inputs per model version and compares it with the profile by the Population Stability
Index, PSI = sum((live - ref) * ln(live / ref)) over bins.

Why PSI: it works the same for every feature (binned numbers and labels), needs no labels from
live traffic, reads as one number per feature, and has a conventional scale (< 0.1 stable,
0.1-0.2 moderate, > 0.2 significant shift). The drift score is the largest feature PSI.
"""

from __future__ import annotations

import collections
import json
import math
import re
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np

_WORD = re.compile(r"\w\w+")
OOV_EDGES = [0.0, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5, 1.0]
CONF_EDGES = [round(x, 2) for x in np.linspace(0.0, 1.0, 11)]
REFERENCE_FILE = "drift_reference.json"
_EPS = 1e-4


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def _oov_rate(tokens: list[str], vocab: set[str]) -> float:
    return sum(t not in vocab for t in tokens) / len(tokens) if tokens else 0.0


def _proportions(values: list[float], edges: list[float]) -> list[float]:
    counts, _ = np.histogram(np.clip(values, edges[0], edges[-1]), bins=edges)
    return (counts / max(1, counts.sum())).tolist()


def psi(live: list[float], ref: list[float]) -> float:
    """Population Stability Index between two binned distributions."""
    total = 0.0
    for a, e in zip(live, ref, strict=True):
        a, e = max(a, _EPS), max(e, _EPS)
        total += (a - e) * math.log(a / e)
    return float(total)


def build_reference(
    train_texts: list[str],
    test_texts: list[str],
    test_pred: np.ndarray,
    test_conf: np.ndarray,
    labels: list[str],
    max_vocab: int = 30_000,
) -> dict[str, Any]:
    """The reference profile of a model's data (JSON-ready)."""
    counts = collections.Counter(t for text in train_texts for t in words(text))
    vocab = [w for w, c in counts.most_common(max_vocab) if c >= 2] or list(counts)[:max_vocab]
    vocab_set = set(vocab)
    lengths = [len(t) for t in train_texts]
    inner = np.unique(np.quantile(lengths, np.linspace(0, 1, 11))[1:-1]).tolist()
    length_edges = [0.0, *inner, float(10**9)]
    test_oov = [_oov_rate(words(t), vocab_set) for t in test_texts]
    return {
        "labels": labels,
        "vocabulary": vocab,
        "length_edges": length_edges,
        "length": _proportions([len(t) for t in test_texts], length_edges),
        "oov_rate": _proportions(test_oov, OOV_EDGES),
        "label": (np.bincount(test_pred, minlength=len(labels)) / max(1, len(test_pred))).tolist(),
        "confidence": _proportions(test_conf.tolist(), CONF_EDGES),
        "n": len(test_texts),
    }


def write_reference(reference: dict[str, Any], directory: Path) -> None:
    (directory / REFERENCE_FILE).write_text(json.dumps(reference), encoding="utf-8")


class DriftMonitor:
    """Sliding window of live inputs for one model version in one worker."""

    def __init__(self, reference: dict[str, Any], window: int, threshold: float, min_n: int):
        self.ref = reference
        self.vocab = set(reference["vocabulary"])
        self.threshold, self.min_n = threshold, min_n
        self._rows: collections.deque[tuple[str, int, float]] = collections.deque(maxlen=window)
        self._lock = threading.Lock()
        self._seen = 0  # inputs observed so far: a report is current while this is unchanged
        self._latest: tuple[int, dict[str, Any]] | None = None

    def current(self) -> dict[str, Any]:
        """The report of the window as it is now: the last one computed if no input arrived
        since, else computed now (CPU work: call it off the event loop)."""
        with self._lock:
            seen, latest = self._seen, self._latest
        if latest is not None and latest[0] == seen:
            return latest[1]
        report = {**self.report(), "computed_at": round(time.time(), 3)}
        self._latest = (seen, report)
        return report

    @classmethod
    def from_model_dir(cls, directory: Path, **kwargs: Any) -> DriftMonitor | None:
        path = directory / REFERENCE_FILE
        if not path.is_file():
            return None
        return cls(json.loads(path.read_text(encoding="utf-8")), **kwargs)

    def observe(self, texts: list[str], pred: np.ndarray, conf: np.ndarray) -> None:
        """O(1) per text on the request path; features are computed when a report is read.

        The window holds recent texts in memory only (like the batcher's queue); they are never
        logged or written anywhere.
        """
        rows = zip(texts, pred.tolist(), conf.tolist(), strict=True)
        with self._lock:
            self._rows.extend(rows)
            self._seen += len(texts)

    def report(self) -> dict[str, Any]:
        with self._lock:
            rows = list(self._rows)
        n, k = len(rows), len(self.ref["labels"])
        features: dict[str, float] = {}
        if n:
            texts, pred, conf = zip(*rows, strict=True)
            lengths = [len(t) for t in texts]
            oov = [_oov_rate(words(t), self.vocab) for t in texts]
            label_live = (np.bincount(pred, minlength=k) / n).tolist()
            features = {
                "length": psi(
                    _proportions(list(lengths), self.ref["length_edges"]), self.ref["length"]
                ),
                "oov_rate": psi(_proportions(list(oov), OOV_EDGES), self.ref["oov_rate"]),
                "label": psi(label_live, self.ref["label"]),
                "confidence": psi(_proportions(list(conf), CONF_EDGES), self.ref["confidence"]),
            }
        score = max(features.values(), default=0.0)
        return {
            "method": "psi",
            "score": round(score, 4),
            "threshold": self.threshold,
            "drifted": n >= self.min_n and score > self.threshold,
            "window_size": n,
            "min_window": self.min_n,
            "features": {name: round(v, 4) for name, v in features.items()},
        }
