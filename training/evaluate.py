"""Held-out metrics for calibrated probabilities, and inference-speed measurement."""

from __future__ import annotations

import itertools
import statistics
import time
from collections.abc import Callable

import numpy as np
from sklearn.metrics import (
    accuracy_score,
    average_precision_score,
    precision_recall_fscore_support,
    roc_auc_score,
)

IMBALANCE_RATIO = 3.0  # largest/smallest class count at which PR-AUC picks the winner


def expected_calibration_error(y: np.ndarray, probs: np.ndarray, bins: int = 15) -> float:
    """Top-label ECE with equal-width confidence bins."""
    conf = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(float)
    edges = np.linspace(0.0, 1.0, bins + 1)
    ece = 0.0
    for lo, hi in itertools.pairwise(edges):
        mask = (conf > lo) & (conf <= hi)
        if mask.any():
            ece += mask.mean() * abs(correct[mask].mean() - conf[mask].mean())
    return float(ece)


def evaluate(
    y: np.ndarray, probs: np.ndarray, labels: list[str], pred: np.ndarray | None = None
) -> dict:
    """Accuracy, macro and per-class precision/recall/F1, ROC-AUC, PR-AUC, Brier and ECE.

    ``pred`` are the predicted labels (default: argmax of ``probs``).
    """
    k = len(labels)
    pred = probs.argmax(axis=1) if pred is None else pred
    onehot = np.eye(k)[y]
    p, r, f, support = precision_recall_fscore_support(
        y, pred, labels=list(range(k)), zero_division=0
    )
    present = [c for c in range(k) if (y == c).any()]
    pr_auc = [float(average_precision_score(onehot[:, c], probs[:, c])) for c in present]
    try:
        if k == 2:
            roc = float(roc_auc_score(y, probs[:, 1]))
        else:
            roc = float(
                roc_auc_score(y, probs, multi_class="ovr", average="macro", labels=list(range(k)))
            )
    except ValueError:  # a class missing from this split
        roc = float("nan")
    return {
        "accuracy": float(accuracy_score(y, pred)),
        "precision_macro": float(p.mean()),
        "recall_macro": float(r.mean()),
        "f1_macro": float(f.mean()),
        "roc_auc": roc,
        "pr_auc": float(np.mean(pr_auc)),
        "brier": float(((probs - onehot) ** 2).sum(axis=1).mean()),
        "ece": expected_calibration_error(y, probs),
        "per_class": {
            labels[c]: {
                "precision": float(p[c]),
                "recall": float(r[c]),
                "f1": float(f[c]),
                "support": int(support[c]),
            }
            for c in range(k)
        },
        "n": len(y),
    }


def is_imbalanced(counts: dict[str, int]) -> bool:
    values = list(counts.values())
    return max(values) / max(1, min(values)) >= IMBALANCE_RATIO


def selection_metric(counts: dict[str, int]) -> str:
    """PR-AUC when the classes are imbalanced, macro-F1 otherwise."""
    return "pr_auc" if is_imbalanced(counts) else "f1_macro"


def measure_speed(predict: Callable[[list[str]], object], texts: list[str]) -> dict[str, float]:
    """Median milliseconds per text at batch 1 and at batch 32 (after one warm-up call each)."""
    singles = texts[:20]
    batch = (texts * (32 // max(1, len(texts)) + 1))[:32]
    predict(singles[:1])
    one = []
    for text in singles:
        t0 = time.perf_counter()
        predict([text])
        one.append((time.perf_counter() - t0) * 1000)
    predict(batch)
    many = []
    for _ in range(3):
        t0 = time.perf_counter()
        predict(batch)
        many.append((time.perf_counter() - t0) * 1000 / len(batch))
    return {
        "ms_per_text_batch1": round(statistics.median(one), 3),
        "ms_per_text_batch32": round(statistics.median(many), 3),
    }
