"""Cross-validated model selection (training.pipeline) on tiny real models: stratified folds on
train+validation, mean ± std per candidate in the metadata and the model card, and the winner
picked on the cross-validated mean."""

from __future__ import annotations

import numpy as np
import pytest

from mlserve.store import open_model
from tests.unit.test_runners import tiny_dataset
from training.finetune import FineTuneConfig
from training.pipeline import CV_METRICS, TrainConfig, _cv_folds, _split, save_result, train


@pytest.fixture(scope="module")
def cv_run():
    cfg = TrainConfig(
        candidates=("logreg", "lightgbm", "minilm", "minilm_ft"),
        cv_folds=3,
        finetune=FineTuneConfig(max_epochs=1, patience=1),
    )
    return train(tiny_dataset(), cfg)


def test_folds_are_stratified_and_cover_train_plus_validation_once() -> None:
    y = np.array([0] * 40 + [1] * 25 + [2] * 10)
    folds = _cv_folds(y, TrainConfig(cv_folds=5))
    assert len(folds) == 5
    held = np.concatenate([h for _, h in folds])
    assert sorted(held.tolist()) == list(range(len(y)))  # each example held out exactly once
    for fit, h in folds:
        assert not set(fit) & set(h)
        assert np.bincount(y[h], minlength=3).tolist() == [8, 5, 2]


def test_too_few_examples_or_zero_folds_mean_no_cross_validation() -> None:
    y = np.array([0] * 10 + [1] * 1)
    assert _cv_folds(y, TrainConfig(cv_folds=5)) == []
    assert _cv_folds(np.array([0, 1] * 20), TrainConfig(cv_folds=0)) == []
    # A class with 3 examples allows 3 folds, not 5.
    assert len(_cv_folds(np.array([0] * 20 + [1] * 3), TrainConfig(cv_folds=5))) == 3


def test_every_candidate_has_cross_validated_metrics(cv_run) -> None:
    train_idx, val_idx, _ = _split(cv_run.dataset, cv_run.config)
    cv = cv_run.cross_validation
    assert cv["folds"] == 3 and cv["n"] == len(train_idx) + len(val_idx)
    assert sum(cv["fold_sizes"]) == cv["n"]
    assert "test split is never used" in cv["protocol"]
    assert "1 epoch(s) per fold" in cv["finetune_protocol"]
    for result in cv_run.results:
        for metric in CV_METRICS:
            summary = result.cv[metric]
            folds = np.array(summary["folds"])
            assert len(folds) == 3
            assert summary["mean"] == pytest.approx(folds.mean(), abs=1e-4)
            assert summary["std"] == pytest.approx(folds.std(ddof=1), abs=1e-4)
    names = {r.fitted.kind: r for r in cv_run.results}
    assert names["minilm_finetuned"].cv["schedule"] == "1 epoch(s) per fold"


def test_selection_uses_the_cross_validated_mean(cv_run) -> None:
    metric = cv_run.metric
    results = cv_run.results
    originals = [(r.cv, r.validation) for r in results]
    try:
        # The weakest on validation gets the best CV mean: CV decides.
        weakest = min(results, key=lambda r: r.validation[metric])
        for r in results:
            r.cv = {**r.cv, metric: {**r.cv[metric], "mean": 0.1}}
        weakest.cv = {**weakest.cv, metric: {**weakest.cv[metric], "mean": 0.9}}
        assert cv_run.basis() == "cross-validated"
        assert cv_run.best() is weakest
        assert "by cross-validated" in cv_run.reason(weakest)
        assert "± " in cv_run.reason(weakest)
        # The family pool is compared on its own.
        best_classical = cv_run.best("classical")
        assert best_classical.fitted.family == "classical"
        # A candidate without CV figures: the whole pool falls back to validation.
        weakest.cv = None
        assert cv_run.basis() == "validation"
        best = cv_run.best()
        assert best.validation[metric] == max(r.validation[metric] for r in results)
    finally:
        for r, (cv, val) in zip(results, originals, strict=True):
            r.cv, r.validation = cv, val


def test_metadata_and_model_card_carry_the_cross_validation(cv_run) -> None:
    best = cv_run.best("transformer")
    stored = save_result(cv_run, best, "unit-cv:v1", cv_run.reason(best, "transformer"), None, True)
    meta = open_model(stored.tag).metadata
    assert meta["selection"]["basis"] == "cross-validated"
    assert meta["cross_validation"]["folds"] == 3
    rows = {c["name"]: c for c in meta["candidates"]}
    assert len(rows) == 4
    for row in rows.values():
        assert set(CV_METRICS) <= set(row["cv"]) and row["train_seconds"] >= 0
    card = (stored.path / "report" / "model_card.md").read_text()
    assert "## Cross-validation (model selection)" in card
    f1 = rows["tfidf+logreg"]["cv"]["f1_macro"]
    assert f"{f1['mean']:.3f} ± {f1['std']:.3f}" in card
    assert "3-fold stratified cross-validation on train+validation" in card


def test_cross_validation_is_off_with_zero_folds() -> None:
    run = train(tiny_dataset(), TrainConfig(candidates=("logreg",), cv_folds=0))
    assert run.cross_validation is None and run.results[0].cv is None
    assert run.basis() == "validation"
    stored = save_result(run, run.results[0], "unit-cv:v2", run.reason(run.results[0]), None, True)
    card = (stored.path / "report" / "model_card.md").read_text()
    assert "Cross-validation" not in card and "| n/a |" in card


def test_the_learning_curve_trains_on_growing_shares_of_each_fold() -> None:
    from training.learning_curve import learning_curve

    points = learning_curve(
        tiny_dataset(), "logreg", TrainConfig(candidates=("logreg",), cv_folds=3), (0.6, 1.0)
    )
    assert [p["fraction"] for p in points] == [0.6, 1.0]
    assert points[0]["fit_examples"] < points[1]["fit_examples"]
    for p in points:
        assert len(p["f1_macro"]["folds"]) == 3 and 0.0 <= p["f1_macro"]["mean"] <= 1.0
