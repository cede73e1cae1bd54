"""Probability calibration that stores as plain numbers (no pickles).

Each class is calibrated one-vs-rest on the model's raw probabilities, then rows are renormalised,
as scikit-learn's ``CalibratedClassifierCV`` does. ``sigmoid`` is Platt scaling on the log-odds;
``isotonic`` is a monotone step function evaluated with ``np.interp``.
"""

from __future__ import annotations

from typing import Literal

import numpy as np
from scipy.special import expit
from sklearn.isotonic import IsotonicRegression
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import log_loss
from sklearn.model_selection import StratifiedKFold

Method = Literal["sigmoid", "isotonic"]
_EPS = 1e-6


def _logit(p: np.ndarray) -> np.ndarray:
    p = np.clip(p, _EPS, 1 - _EPS)
    return np.log(p / (1 - p))


class Calibrator:
    """Per-class calibration maps from raw to calibrated probabilities."""

    def __init__(
        self,
        method: Method,
        params: list[dict[str, list[float]]],
        decision_weights: list[float] | None = None,
    ):
        self.method = method
        self.params = params
        # The label is argmax(p * w). w = 1 is plain argmax; w = 1/prior favours rare classes
        # (better macro-F1 on imbalanced data). Probabilities themselves are never reweighted.
        self.decision_weights = decision_weights or [1.0] * len(params)

    @property
    def decision_rule(self) -> str:
        """``argmax`` (the most probable label) or ``prior_corrected_argmax`` (the label of
        the largest ``p * w`` with ``w`` proportional to 1 / the label's training prior)."""
        return "argmax" if len(set(self.decision_weights)) <= 1 else "prior_corrected_argmax"

    def describe_decision(self, labels: list[str]) -> dict[str, object]:
        """The decision rule for a model card or an API answer."""
        rule = self.decision_rule
        text = (
            "the label is the most probable one"
            if rule == "argmax"
            else "the label maximises probability x weight, with weights proportional to 1 / "
            "the label's share of the training data (chosen on validation macro-F1); a rare "
            "label can win with less probability than a common one"
        )
        weights = dict(zip(labels, (round(w, 6) for w in self.decision_weights), strict=True))
        return {"rule": rule, "weights": weights, "description": text}

    def decide(self, probs: np.ndarray) -> np.ndarray:
        """Predicted class index per row."""
        return (probs * np.asarray(self.decision_weights)).argmax(axis=1)

    @classmethod
    def fit(cls, proba: np.ndarray, y: np.ndarray, method: Method) -> Calibrator:
        """Fit one map per class on raw probabilities ``proba`` (n, k) and integer labels ``y``."""
        params: list[dict[str, list[float]]] = []
        for k in range(proba.shape[1]):
            target = (y == k).astype(float)
            if target.min() == target.max():  # class absent (or alone): identity map
                params.append({"a": [1.0], "b": [0.0]} if method == "sigmoid" else {})
                continue
            if method == "sigmoid":
                lr = LogisticRegression(C=1e4)
                lr.fit(_logit(proba[:, k]).reshape(-1, 1), target)
                params.append({"a": [float(lr.coef_[0, 0])], "b": [float(lr.intercept_[0])]})
            else:
                iso = IsotonicRegression(out_of_bounds="clip", y_min=0.0, y_max=1.0)
                iso.fit(proba[:, k], target)
                params.append({"x": iso.X_thresholds_.tolist(), "y": iso.y_thresholds_.tolist()})
        return cls(method, params)

    def transform(self, proba: np.ndarray) -> np.ndarray:
        """Calibrated, row-normalised probabilities."""
        out = np.empty_like(proba, dtype=np.float64)
        for k, p in enumerate(self.params):
            col = proba[:, k]
            if not p:
                out[:, k] = col
            elif self.method == "sigmoid":
                # expit: the logistic function without exp's overflow warning for a large
                # negative argument (training printed one per fold; the value was right, 0).
                out[:, k] = expit(p["a"][0] * _logit(col) + p["b"][0])
            else:
                out[:, k] = np.interp(col, p["x"], p["y"])
        total = out.sum(axis=1, keepdims=True)
        uniform = np.full_like(out, 1.0 / out.shape[1])
        return np.where(total > 0, out / np.where(total > 0, total, 1.0), uniform)

    def to_dict(self) -> dict:
        return {
            "method": self.method,
            "params": self.params,
            "decision_weights": self.decision_weights,
        }

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        if data.get("method") not in ("sigmoid", "isotonic"):
            raise ValueError(f"unknown calibration method {data.get('method')!r}")
        return cls(data["method"], data["params"], data.get("decision_weights"))


def choose_method(proba: np.ndarray, y: np.ndarray, seed: int) -> tuple[Method, dict[str, float]]:
    """Pick sigmoid or isotonic by cross-validated log-loss on held-out (validation) scores."""
    n_classes = proba.shape[1]
    min_count = int(np.bincount(y, minlength=n_classes).min())
    folds = max(2, min(5, min_count))
    scores: dict[str, float] = {}
    for method in ("sigmoid", "isotonic"):
        losses = []
        if min_count < 2:  # too few examples to cross-validate: fit and score in-sample
            cal = Calibrator.fit(proba, y, method)
            losses.append(log_loss(y, cal.transform(proba), labels=list(range(n_classes))))
        else:
            skf = StratifiedKFold(n_splits=folds, shuffle=True, random_state=seed)
            for fit_idx, eval_idx in skf.split(proba, y):
                cal = Calibrator.fit(proba[fit_idx], y[fit_idx], method)
                pred = np.clip(cal.transform(proba[eval_idx]), 1e-12, 1.0)
                losses.append(log_loss(y[eval_idx], pred, labels=list(range(n_classes))))
        scores[method] = float(np.mean(losses))
    best: Method = min(scores, key=scores.__getitem__)  # type: ignore[assignment]
    return best, scores


def choose_decision_weights(
    probs: np.ndarray, y: np.ndarray, train_counts: np.ndarray
) -> list[float]:
    """Plain argmax, or prior-corrected argmax: whichever has the better validation macro-F1."""
    from sklearn.metrics import f1_score

    prior = train_counts / train_counts.sum()
    corrected = (1.0 / np.maximum(prior, 1e-9)) / (1.0 / np.maximum(prior, 1e-9)).max()
    best, best_f1 = [1.0] * probs.shape[1], -1.0
    for weights in ([1.0] * probs.shape[1], corrected.tolist()):
        f1 = f1_score(y, (probs * np.asarray(weights)).argmax(axis=1), average="macro")
        if f1 > best_f1 + 1e-9:
            best, best_f1 = weights, f1
    return [float(w) for w in best]
