"""PSI drift: traffic like the reference stays low, skewed traffic goes up."""

from __future__ import annotations

import numpy as np
import pytest

from mlserve.drift import DriftMonitor, build_reference, psi

rng = np.random.default_rng(0)
VOCAB = [f"word{i}" for i in range(300)]


def texts(n: int, length: tuple[int, int] = (5, 40), vocab=VOCAB) -> list[str]:
    return [" ".join(rng.choice(vocab, size=rng.integers(*length))) for _ in range(n)]


@pytest.fixture
def reference() -> dict:
    test = texts(400)
    pred = rng.integers(0, 3, size=400)
    conf = rng.uniform(0.4, 1.0, size=400)
    return build_reference(texts(2000), test, pred, conf, ["a", "b", "c"])


def monitor(ref: dict) -> DriftMonitor:
    return DriftMonitor(ref, window=300, threshold=0.2, min_n=100)


def test_psi_is_zero_for_identical_and_grows_with_shift() -> None:
    assert psi([0.25] * 4, [0.25] * 4) == pytest.approx(0.0)
    small = psi([0.3, 0.2, 0.25, 0.25], [0.25] * 4)
    large = psi([0.85, 0.05, 0.05, 0.05], [0.25] * 4)
    assert 0 < small < 0.1 < 0.2 < large


def test_like_the_reference_stays_below_the_threshold(reference) -> None:
    mon = monitor(reference)
    live = texts(300)
    mon.observe(live, rng.integers(0, 3, size=300), rng.uniform(0.4, 1.0, size=300))
    report = mon.report()
    assert report["window_size"] == 300
    assert not report["drifted"], report
    assert report["score"] < 0.2


def test_one_label_only_is_drift(reference) -> None:
    mon = monitor(reference)
    mon.observe(texts(300), np.zeros(300, dtype=int), rng.uniform(0.4, 1.0, size=300))
    report = mon.report()
    assert report["drifted"] and report["features"]["label"] > 0.2


def test_long_unknown_texts_are_drift(reference) -> None:
    mon = monitor(reference)
    live = texts(300, (200, 400), vocab=[f"zz{i}" for i in range(50)])
    mon.observe(live, rng.integers(0, 3, size=300), rng.uniform(0.4, 1.0, size=300))
    report = mon.report()
    assert report["drifted"]
    assert report["features"]["length"] > 0.2 and report["features"]["oov_rate"] > 0.2


def test_no_flag_before_the_minimum_window(reference) -> None:
    mon = monitor(reference)
    mon.observe(texts(20), np.zeros(20, dtype=int), np.ones(20))
    report = mon.report()
    assert report["score"] > 0.2 and not report["drifted"]


def test_a_report_is_reused_until_new_inputs_arrive(reference) -> None:
    monitor = DriftMonitor(reference, window=50, threshold=0.2, min_n=5)
    empty = monitor.current()
    assert empty["window_size"] == 0 and monitor.current() is empty  # nothing new: reused
    monitor.observe(["a text"] * 3, np.array([0, 0, 0]), np.array([0.9, 0.9, 0.9]))
    fresh = monitor.current()
    assert fresh is not empty and fresh["window_size"] == 3 and fresh["computed_at"] > 0
    assert monitor.current() is fresh
