"""mlserve.calibration on synthetic scores from a deliberately over-confident model."""

from __future__ import annotations

import json
import warnings
from dataclasses import dataclass

import numpy as np
import pytest
from sklearn.metrics import log_loss

from mlserve.calibration import Calibrator, choose_method

METHODS = ("sigmoid", "isotonic")


def softmax(z: np.ndarray) -> np.ndarray:
    z = z - z.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


@dataclass
class Scores:
    fit_proba: np.ndarray
    fit_y: np.ndarray
    test_proba: np.ndarray
    test_y: np.ndarray


def make_scores(n: int, k: int, seed: int, overconfidence: float = 3.0) -> Scores:
    """Labels drawn from softmax(z); the "model" reports softmax(overconfidence * z)."""
    rng = np.random.default_rng(seed)
    z = rng.normal(scale=1.2, size=(n, k))
    true_p = softmax(z)
    y = np.array([rng.choice(k, p=row) for row in true_p])
    raw = softmax(overconfidence * z)
    half = n // 2
    return Scores(raw[:half], y[:half], raw[half:], y[half:])


@pytest.fixture(scope="module")
def three_class() -> Scores:
    return make_scores(3000, 3, seed=0)


@pytest.fixture(scope="module")
def two_class() -> Scores:
    return make_scores(2000, 2, seed=1)


def nll(y: np.ndarray, proba: np.ndarray) -> float:
    return float(log_loss(y, np.clip(proba, 1e-12, 1.0), labels=list(range(proba.shape[1]))))


@pytest.mark.parametrize("method", METHODS)
def test_transform_gives_probability_rows(three_class: Scores, method: str) -> None:
    cal = Calibrator.fit(three_class.fit_proba, three_class.fit_y, method)
    out = cal.transform(three_class.test_proba)
    assert out.shape == three_class.test_proba.shape
    assert out.dtype == np.float64
    assert np.all(out >= 0.0)
    assert np.all(out <= 1.0)
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-12)
    assert cal.method == method
    assert len(cal.params) == 3


@pytest.mark.parametrize("method", METHODS)
def test_transform_accepts_float32(three_class: Scores, method: str) -> None:
    cal = Calibrator.fit(three_class.fit_proba, three_class.fit_y, method)
    out = cal.transform(three_class.test_proba.astype(np.float32))
    assert out.dtype == np.float64
    np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-12)


@pytest.mark.parametrize("method", METHODS)
def test_dict_round_trip_through_json_is_exact(three_class: Scores, method: str) -> None:
    cal = Calibrator.fit(three_class.fit_proba, three_class.fit_y, method)
    stored = json.loads(json.dumps(cal.to_dict()))  # plain numbers only: no pickles
    assert stored["method"] == method
    restored = Calibrator.from_dict(stored)
    np.testing.assert_array_equal(
        restored.transform(three_class.test_proba), cal.transform(three_class.test_proba)
    )


@pytest.mark.parametrize("method", METHODS)
def test_calibrating_an_overconfident_model_reduces_held_out_log_loss(
    three_class: Scores, method: str
) -> None:
    raw_loss = nll(three_class.test_y, three_class.test_proba)
    cal = Calibrator.fit(three_class.fit_proba, three_class.fit_y, method)
    cal_loss = nll(three_class.test_y, cal.transform(three_class.test_proba))
    assert cal_loss < raw_loss * 0.9, (raw_loss, cal_loss)


def test_sigmoid_softens_an_overconfident_model(three_class: Scores) -> None:
    cal = Calibrator.fit(three_class.fit_proba, three_class.fit_y, "sigmoid")
    slopes = [p["a"][0] for p in cal.params]
    # The model's log-odds are ~3x too large, so every per-class slope shrinks them by ~1/3.
    assert all(0.25 < a < 0.45 for a in slopes), slopes


def test_isotonic_maps_are_monotone_steps(three_class: Scores) -> None:
    cal = Calibrator.fit(three_class.fit_proba, three_class.fit_y, "isotonic")
    for p in cal.params:
        x, y = np.asarray(p["x"]), np.asarray(p["y"])
        assert len(x) == len(y) >= 2
        assert np.all(np.diff(x) > 0)
        assert np.all(np.diff(y) >= 0)
        assert y.min() >= 0.0
        assert y.max() <= 1.0


def test_isotonic_output_is_monotone_in_the_raw_score(two_class: Scores) -> None:
    cal = Calibrator.fit(two_class.fit_proba, two_class.fit_y, "isotonic")
    grid = np.linspace(0.0, 1.0, 501)
    proba = np.column_stack([1.0 - grid, grid])
    out = cal.transform(proba)[:, 1]
    assert np.all(np.diff(out) >= -1e-12)
    assert out[-1] > out[0]


def test_sigmoid_output_is_monotone_in_the_raw_score(two_class: Scores) -> None:
    cal = Calibrator.fit(two_class.fit_proba, two_class.fit_y, "sigmoid")
    grid = np.linspace(0.001, 0.999, 501)
    out = cal.transform(np.column_stack([1.0 - grid, grid]))[:, 1]
    assert np.all(np.diff(out) > 0)


def test_class_absent_from_fit_labels_gets_identity_map(three_class: Scores) -> None:
    keep = three_class.fit_y != 2
    proba, y = three_class.fit_proba[keep], three_class.fit_y[keep]
    sig = Calibrator.fit(proba, y, "sigmoid")
    iso = Calibrator.fit(proba, y, "isotonic")
    assert sig.params[2] == {"a": [1.0], "b": [0.0]}
    assert iso.params[2] == {}
    for cal in (sig, iso):
        out = cal.transform(three_class.test_proba)
        np.testing.assert_allclose(out.sum(axis=1), 1.0, atol=1e-12)
        assert np.all((out >= 0) & (out <= 1))


def test_all_zero_calibrated_row_becomes_uniform() -> None:
    cal = Calibrator("isotonic", [{"x": [0.0, 1.0], "y": [0.0, 0.0]}] * 4)
    out = cal.transform(np.array([[0.7, 0.1, 0.1, 0.1], [0.25, 0.25, 0.25, 0.25]]))
    np.testing.assert_array_equal(out, np.full((2, 4), 0.25))


@pytest.mark.parametrize(
    "data",
    [
        {"method": "platt", "params": []},
        {"method": "", "params": []},
        {"method": None, "params": []},
        {"params": []},
        {"method": "SIGMOID", "params": []},
    ],
)
def test_from_dict_refuses_unknown_method(data: dict) -> None:
    with pytest.raises(ValueError, match="unknown calibration method"):
        Calibrator.from_dict(data)


def test_choose_method_returns_a_method_and_both_scores(three_class: Scores) -> None:
    best, scores = choose_method(three_class.fit_proba, three_class.fit_y, seed=7)
    assert best in METHODS
    assert set(scores) == set(METHODS)
    assert all(np.isfinite(v) and v > 0 for v in scores.values())
    assert scores[best] == min(scores.values())
    # Both calibrated variants beat the uncalibrated model's in-sample log-loss.
    raw_loss = nll(three_class.fit_y, three_class.fit_proba)
    assert max(scores.values()) < raw_loss


def test_choose_method_is_deterministic_for_a_seed(two_class: Scores) -> None:
    a = choose_method(two_class.fit_proba, two_class.fit_y, seed=3)
    b = choose_method(two_class.fit_proba, two_class.fit_y, seed=3)
    assert a == b


def test_choose_method_with_a_singleton_class_does_not_cross_validate() -> None:
    rng = np.random.default_rng(5)
    proba = softmax(rng.normal(size=(30, 3)))
    y = np.array([0] * 15 + [1] * 14 + [2])  # class 2 has a single example
    best, scores = choose_method(proba, y, seed=0)
    assert best in METHODS
    assert set(scores) == set(METHODS)
    assert all(np.isfinite(v) for v in scores.values())


def test_sigmoid_map_saturates_without_overflow_warnings():
    """A steep map (large ``a``) on a near-0 probability used to overflow ``exp`` and warn, once
    per fold in training's output; the value is the same, 0 or 1, without the warning."""
    cal = Calibrator("sigmoid", [{"a": [900.0], "b": [0.0]}, {"a": [1.0], "b": [0.0]}])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        out = cal.transform(np.array([[1e-9, 1 - 1e-9], [0.5, 0.5]]))
    np.testing.assert_allclose(out, [[0.0, 1.0], [0.5, 0.5]], atol=1e-12)


def test_an_inherited_calibrator_keeps_its_method_and_decision_rule(three_class: Scores) -> None:
    """A variant of a model (`mlserve optimize`) keeps the source's calibration method and
    decision rule; only the calibration parameters are fitted again on its own scores."""
    from training.pipeline import _fit_calibrator

    s = three_class
    counts = np.bincount(s.fit_y, minlength=3).astype(float)
    chosen, scores = _fit_calibrator(None, [], s.fit_y, counts, 0, s.fit_proba)  # type: ignore[arg-type]
    assert chosen.method == min(scores, key=scores.__getitem__)
    # A source that made the other choices: the other method, and unusual decision weights.
    other = "isotonic" if chosen.method == "sigmoid" else "sigmoid"
    source = Calibrator.fit(s.test_proba, s.test_y, other)  # fitted on other scores
    source.decision_weights = [0.5, 1.0, 0.25]
    cal, _ = _fit_calibrator(None, [], s.fit_y, counts, 0, s.fit_proba, inherit=source)  # type: ignore[arg-type]
    assert cal.method == other and cal.decision_weights == [0.5, 1.0, 0.25]
    assert (
        cal.to_dict()["params"] == Calibrator.fit(s.fit_proba, s.fit_y, other).to_dict()["params"]
    )
    assert cal.to_dict()["params"] != source.to_dict()["params"]  # refitted, not copied
