"""training.evaluate on small examples whose metrics can be checked by hand."""

from __future__ import annotations

import math

import numpy as np
import pytest

from training.evaluate import (
    evaluate,
    expected_calibration_error,
    is_imbalanced,
    measure_speed,
    selection_metric,
)


def test_perfect_predictions() -> None:
    y = np.array([0, 1, 2, 2, 1, 0])
    probs = np.eye(3)[y]
    m = evaluate(y, probs, ["neg", "neu", "pos"])
    assert m["accuracy"] == 1.0
    assert m["precision_macro"] == 1.0
    assert m["recall_macro"] == 1.0
    assert m["f1_macro"] == 1.0
    assert m["roc_auc"] == 1.0
    assert m["pr_auc"] == 1.0
    assert m["brier"] == 0.0
    assert m["ece"] == 0.0
    assert m["n"] == 6
    assert m["per_class"] == {
        label: {"precision": 1.0, "recall": 1.0, "f1": 1.0, "support": 2}
        for label in ("neg", "neu", "pos")
    }


def test_binary_hand_checked() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    m = evaluate(y, probs, ["ham", "spam"])
    # Predictions 0, 0, 0, 1: one spam missed.
    assert m["accuracy"] == pytest.approx(0.75)
    assert m["per_class"]["ham"] == pytest.approx(
        {"precision": 2 / 3, "recall": 1.0, "f1": 0.8, "support": 2}
    )
    assert m["per_class"]["spam"] == pytest.approx(
        {"precision": 1.0, "recall": 0.5, "f1": 2 / 3, "support": 2}
    )
    assert m["f1_macro"] == pytest.approx((0.8 + 2 / 3) / 2)
    assert m["precision_macro"] == pytest.approx((2 / 3 + 1) / 2)
    assert m["recall_macro"] == pytest.approx(0.75)
    # spam scores 0.1, 0.4 (ham) vs 0.3, 0.8 (spam): 3 of 4 pairs ordered correctly.
    assert m["roc_auc"] == pytest.approx(0.75)
    # Brier, summed over classes: (0.02 + 0.32 + 0.98 + 0.08) / 4.
    assert m["brier"] == pytest.approx(0.35)
    # Confidences 0.9, 0.6, 0.7, 0.8 fall in separate bins: mean |correct - conf|.
    assert m["ece"] == pytest.approx((0.1 + 0.4 + 0.7 + 0.2) / 4)
    assert m["n"] == 4


@pytest.mark.filterwarnings("ignore::sklearn.exceptions.UndefinedMetricWarning")
def test_class_absent_from_split() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array(
        [[0.8, 0.1, 0.1], [0.6, 0.3, 0.1], [0.2, 0.7, 0.1], [0.1, 0.8, 0.1]],
    )
    m = evaluate(y, probs, ["a", "b", "c"])
    assert m["accuracy"] == 1.0
    assert math.isnan(m["roc_auc"])  # undefined with a class missing
    assert m["pr_auc"] == 1.0  # averaged over the classes present only
    assert m["per_class"]["c"]["support"] == 0
    assert m["per_class"]["c"]["f1"] == 0.0
    assert m["f1_macro"] == pytest.approx(2 / 3)


def test_ece_single_bin_overconfident() -> None:
    y = np.array([0, 1, 0, 1])
    probs = np.tile([0.8, 0.2], (4, 1))  # always 80% sure of class 0, right half the time
    assert expected_calibration_error(y, probs) == pytest.approx(0.3)


def test_ece_weights_bins_by_size() -> None:
    # Bin near 0.95: 3 rows, all correct -> gap 0.05. Bin near 0.55: 1 row, wrong -> gap 0.55.
    y = np.array([0, 0, 0, 0])
    probs = np.array([[0.95, 0.05], [0.95, 0.05], [0.95, 0.05], [0.45, 0.55]])
    assert expected_calibration_error(y, probs) == pytest.approx(0.75 * 0.05 + 0.25 * 0.55)


def test_ece_depends_on_binning() -> None:
    y = np.array([0, 0, 1, 1])
    probs = np.array([[0.9, 0.1], [0.6, 0.4], [0.7, 0.3], [0.2, 0.8]])
    assert expected_calibration_error(y, probs, bins=15) == pytest.approx(0.35)
    # One bin: |accuracy 0.75 - mean confidence 0.75| = 0.
    assert expected_calibration_error(y, probs, bins=1) == pytest.approx(0.0)


def test_ece_perfectly_calibrated_in_each_bin() -> None:
    y = np.array([0] * 7 + [1] * 3)
    probs = np.tile([0.7, 0.3], (10, 1))
    assert expected_calibration_error(y, probs) == pytest.approx(0.0)


@pytest.mark.parametrize(
    ("counts", "metric"),
    [
        ({"a": 10, "b": 10}, "f1_macro"),
        ({"a": 29, "b": 10}, "f1_macro"),
        ({"a": 30, "b": 10}, "pr_auc"),  # ratio exactly 3
        ({"a": 10, "b": 31}, "pr_auc"),
        ({"a": 100, "b": 60, "c": 34}, "f1_macro"),
        ({"a": 100, "b": 60, "c": 33}, "pr_auc"),  # max/min over all classes
        ({"a": 5, "b": 0}, "pr_auc"),
    ],
)
def test_selection_metric(counts: dict[str, int], metric: str) -> None:
    assert selection_metric(counts) == metric
    assert is_imbalanced(counts) is (metric == "pr_auc")


def test_measure_speed_reports_both_batch_sizes() -> None:
    calls: list[int] = []

    def predict(texts: list[str]) -> list[int]:
        calls.append(len(texts))
        return [len(t) for t in texts]

    out = measure_speed(predict, ["a", "bb", "ccc"])
    assert set(out) == {"ms_per_text_batch1", "ms_per_text_batch32"}
    assert all(v >= 0 for v in out.values())
    # Warm-up at 1, one call per text (3), warm-up at 32, then three timed batches of 32.
    assert calls == [1, 1, 1, 1, 32, 32, 32, 32]
