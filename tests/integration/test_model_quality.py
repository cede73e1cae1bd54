"""Model selection and quality records of the models trained for the integration tests (the
demo's candidates on the real data sets, trained by ``mlserve train`` in ``model_home``):
cross-validated candidates, the fine-tuned transformer saved in safe files and served like
training evaluated it, and its int8 variant exported from the fine-tuned weights."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
import yaml

from mlserve.store import verify_files

pytestmark = pytest.mark.integration

CV_METRICS = ("f1_macro", "pr_auc", "accuracy", "roc_auc", "ece")


def metadata(home: Path, tag: str) -> dict:
    name, version = tag.split(":")
    path = home / "models" / name / version
    meta = yaml.safe_load((path / "model.yaml").read_text())["metadata"]
    verify_files(tag, path, meta)  # every file's sha256
    return meta


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("tag", ["sentiment:v1", "sentiment:v2", "topic:v1"])
def test_the_winner_is_picked_on_five_fold_cross_validation(model_home: Path, tag: str) -> None:
    meta = metadata(model_home, tag)
    cv = meta["cross_validation"]
    assert cv["folds"] == 5 and cv["stratified"] and cv["on"] == "train+validation"
    split = meta["dataset"]["split_sizes"]
    assert cv["n"] == split["train"] + split["validation"] == sum(cv["fold_sizes"])
    assert meta["selection"]["basis"] == "cross-validated"
    assert "cross-validated" in meta["selection"]["reason"]
    metric = meta["selection"]["metric"]
    winner = next(c for c in meta["candidates"] if c["name"] == meta["estimator"]["name"])
    for candidate in meta["candidates"]:
        for m in CV_METRICS:
            assert len(candidate["cv"][m]["folds"]) == 5
            assert 0.0 <= candidate["cv"][m]["mean"] <= 1.0 and candidate["cv"][m]["std"] >= 0
        if candidate["family"] == winner["family"]:
            assert candidate["cv"][metric]["mean"] <= winner["cv"][metric]["mean"]
    card = (model_home / "models" / tag.replace(":", "/") / "report" / "model_card.md").read_text()
    assert "## Cross-validation (model selection)" in card
    assert f"{winner['cv']['f1_macro']['mean']:.3f} ± {winner['cv']['f1_macro']['std']:.3f}" in card


def test_sentiment_v2_is_the_better_transformer_and_the_fine_tuned_one_is_recorded(
    model_home: Path,
) -> None:
    meta = metadata(model_home, "sentiment:v2")
    names = {c["name"] for c in meta["candidates"]}
    assert names == {"minilm+linear_head", "minilm-finetuned+linear_head"}
    assert meta["runner_family"] == "transformer"
    assert meta["preprocessing"]["features"] == "minilm_mean_pooled"
    tuned = next(c for c in meta["candidates"] if c["name"] == "minilm-finetuned+linear_head")
    assert tuned["cv"]["schedule"].endswith("epoch(s) per fold")
    assert tuned["train_seconds"] > 0


def test_a_fine_tuned_v2_ships_its_own_weights_and_v3_is_made_from_them(model_home: Path) -> None:
    from runners.transformer import packaged_encoder_dir

    meta = metadata(model_home, "sentiment:v2")
    if meta["estimator"]["name"] != "minilm-finetuned+linear_head":
        pytest.fail(f"sentiment:v2 is {meta['estimator']['name']}; the README says fine-tuned")
    v2 = model_home / "models" / "sentiment" / "v2"
    files = set(meta["files"])
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".joblib", ".pth"))]
    assert "encoder/model.safetensors" in files and "head.safetensors" in files
    weights = v2 / "encoder" / "model.safetensors"
    assert _sha(weights) != _sha(packaged_encoder_dir() / "model.safetensors")
    ft = meta["fine_tuning"]
    assert ft["deterministic"] and ft["best_epoch"] >= 1 and ft["seconds"] > 0
    assert ft["max_tokens"] == meta["preprocessing"]["max_tokens"] <= 128
    assert [p["epoch"] for p in ft["learning_curve"]][:2] == [0, 1]
    v3 = metadata(model_home, "sentiment:v3")
    assert v3["quality_gate"]["source"] == "sentiment:v2" and v3["quality_gate"]["passed"]
    assert v3["preprocessing"]["max_tokens"] == meta["preprocessing"]["max_tokens"]
    assert "from sentiment:v2" in v3["estimator"]["params"]["encoder"]
