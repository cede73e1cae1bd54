"""The fine-tuned MiniLM candidate (training.finetune) on the real MiniLM and a tiny data set:
it trains, stops early, saves safetensors only, and the transformer runner serves it as
training evaluated it; ``mlserve optimize`` exports its fine-tuned encoder."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pytest

from mlserve.store import open_model
from runners import load_runner
from tests.unit.test_runners import tiny_dataset
from training import finetune as ft
from training.finetune import FineTuneConfig, needed_tokens
from training.pipeline import TrainConfig, save_result, train, verify_reload

FAST = FineTuneConfig(max_epochs=2, patience=1)


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def ft_run():
    cfg = TrainConfig(candidates=("minilm_ft",), finetune=FAST, cv_folds=0)
    run = train(tiny_dataset(), cfg)
    return run, run.results[0]


@pytest.fixture(scope="module")
def ft_tag(ft_run) -> str:
    run, result = ft_run
    stored = save_result(run, result, "unit-ft:v1", "unit test", overwrite=True)
    verify_reload(stored, run, result)
    return stored.tag


def test_needed_tokens_covers_the_quantile_in_steps_of_16_under_the_cap() -> None:
    assert needed_tokens([10] * 99 + [300], cap=128, quantile=0.99) == 16
    assert needed_tokens(list(range(1, 101)), cap=128, quantile=0.95) == 96
    assert needed_tokens([500] * 10, cap=128) == 128
    assert needed_tokens([], cap=128) == 16


def test_the_candidate_fine_tunes_and_records_how(ft_run) -> None:
    run, result = ft_run
    fit = result.fitted
    assert (fit.name, fit.family, fit.kind) == (
        "minilm-finetuned+linear_head",
        "transformer",
        "minilm_finetuned",
    )
    info = fit.extra_meta["fine_tuning"]
    assert info["deterministic"] and info["seed"] == run.config.seed
    # Short texts: truncated to what the data needs, not to the configured 128.
    assert info["max_tokens"] == fit.extra_meta["max_tokens"] == 16
    curve = info["learning_curve"]
    assert [p["epoch"] for p in curve] == list(range(len(curve)))
    assert 2 <= len(curve) <= FAST.max_epochs + 1
    assert 1 <= info["best_epoch"] <= len(curve) - 1  # ties go to the later epoch
    assert info["seconds"] > 0 and result.train_seconds > 0
    assert result.test["f1_macro"] >= 0.6  # three easy topics


def test_saved_in_safe_files_with_fine_tuned_weights_and_metadata(ft_tag: str) -> None:
    from runners.transformer import ENCODER_FILES, packaged_encoder_dir

    model = open_model(ft_tag)  # every file's sha256 checked
    files = set(model.metadata["files"])
    assert {f"encoder/{n}" for n in ENCODER_FILES} | {"head.safetensors"} <= files
    assert not [f for f in files if f.endswith((".pkl", ".pt", ".bin", ".joblib", ".pth"))]
    weights = model.path / "encoder" / "model.safetensors"
    assert _sha(weights) != _sha(packaged_encoder_dir() / "model.safetensors")
    meta = model.metadata
    assert meta["runner_family"] == "transformer"
    assert meta["preprocessing"]["max_tokens"] == 16
    assert meta["fine_tuning"]["learning_curve"]
    card = (model.path / "report" / "model_card.md").read_text()
    assert "## Fine-tuning" in card and "| epoch | training loss |" in card
    assert "refitted after fine-tuning" in meta["fine_tuning"]["head"]


def test_the_transformer_runner_reproduces_the_training_probabilities(ft_run, ft_tag) -> None:
    from training.pipeline import _split

    run, result = ft_run
    texts = [run.dataset.texts[i] for i in _split(run.dataset, run.config)[2]]
    runner = load_runner(ft_tag)
    try:
        assert runner.max_tokens == 16
        served = runner.predict(texts).probabilities
    finally:
        runner.close()
    assert np.allclose(served, result.test_probs, atol=1e-5)


def _tune(seed: int, head: tuple[np.ndarray, np.ndarray], **cfg: int | str) -> ft.FineTuned:
    """Fine-tune the packaged encoder on the tiny data set: even rows train, odd rows validate."""
    from runners.transformer import packaged_encoder_dir

    ds = tiny_dataset()
    y = np.array([ds.classes.index(label) for label in ds.labels])
    return ft.finetune(
        packaged_encoder_dir(),
        ds.texts[::2],
        y[::2],
        ds.texts[1::2],
        y[1::2],
        3,
        seed=seed,
        max_tokens=16,
        init_head=head,
        cfg=FineTuneConfig(**cfg),
    )


def test_fine_tuning_is_deterministic() -> None:
    head = (np.zeros((3, 384)), np.zeros(3))
    runs = [_tune(7, head, max_epochs=1, patience=1) for _ in range(2)]
    a, b = (dict(r.model.state_dict()) for r in runs)
    assert a.keys() == b.keys()
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)
    assert np.array_equal(runs[0].weight, runs[1].weight)


def test_training_precision_resolves_auto_by_the_device() -> None:
    import torch

    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    assert ft.training_precision("auto", "cpu") == ("bf16" if native else "fp32")
    assert ft.training_precision("auto", "mps") == "fp32"
    assert ft.training_precision("fp32", "cpu") == "fp32"
    assert ft.training_precision("bf16", "cpu") == "bf16"
    with pytest.raises(ValueError, match="precision"):
        ft.training_precision("fp16", "cpu")


def test_bf16_fine_tuning_is_mixed_precision_deterministic_and_float32_weights(
    monkeypatch,
) -> None:
    scores = iter([0.1, 0.9] * 3)  # each run keeps its trained epoch 1
    monkeypatch.setattr(ft, "macro_f1", lambda *args: next(scores))
    # A non-zero head, so that the encoder gets a gradient from the first step.
    head = (np.random.default_rng(0).normal(0, 0.1, (3, 384)), np.zeros(3))
    runs = [_tune(7, head, max_epochs=1, patience=1, precision="bf16") for _ in range(2)]
    full = _tune(7, head, max_epochs=1, patience=1, precision="fp32")
    assert [r.precision for r in runs] == ["bf16", "bf16"] and full.precision == "fp32"
    assert [r.best_epoch for r in (*runs, full)] == [1, 1, 1]
    a, b, c = (dict(r.model.state_dict()) for r in (*runs, full))
    assert all(v.dtype == c[k].dtype for k, v in a.items())  # the weights stay float32
    assert all(np.array_equal(a[k].numpy(), b[k].numpy()) for k in a)  # deterministic
    # The autocast did apply: the training steps computed something else than float32's.
    assert not all(np.array_equal(a[k].numpy(), c[k].numpy()) for k in a)


def test_early_stopping_keeps_the_best_epoch(monkeypatch) -> None:
    scores = iter([0.5, 0.6, 0.55, 0.58, 0.9, 0.9])  # epoch 0, 1, 2, 3, ...
    monkeypatch.setattr(ft, "macro_f1", lambda *args: next(scores))
    tuned = _tune(1, (np.zeros((3, 384)), np.zeros(3)), max_epochs=6, patience=2)
    # Epochs 2 and 3 do not beat epoch 1: it stops there, with epoch 1's weights.
    assert [h["val_f1_macro"] for h in tuned.history] == [0.5, 0.6, 0.55, 0.58]
    assert tuned.best_epoch == 1


def test_no_better_epoch_keeps_the_frozen_encoder(monkeypatch) -> None:
    from runners.transformer import packaged_encoder_dir

    scores = iter([0.9, 0.5, 0.6])
    monkeypatch.setattr(ft, "macro_f1", lambda *args: next(scores))
    head = (np.arange(3 * 384, dtype=float).reshape(3, 384) / 1e4, np.array([0.1, 0.2, 0.3]))
    tuned = _tune(1, head, max_epochs=5, patience=2)
    assert tuned.best_epoch == 0 and len(tuned.history) == 3
    assert np.allclose(tuned.weight, head[0], atol=1e-6)
    assert np.allclose(tuned.bias, head[1], atol=1e-6)
    from transformers import AutoModel

    frozen = AutoModel.from_pretrained(packaged_encoder_dir(), use_safetensors=True).state_dict()
    assert all(
        np.array_equal(v.numpy(), frozen[k].numpy()) for k, v in tuned.model.state_dict().items()
    )


def test_deterministic_restores_the_global_torch_settings() -> None:
    import torch

    threads = torch.get_num_threads()
    before = torch.are_deterministic_algorithms_enabled()
    fill = torch.utils.deterministic.fill_uninitialized_memory
    with ft.deterministic(seed=3, threads=1):
        assert torch.are_deterministic_algorithms_enabled()
        assert torch.get_num_threads() == 1
        # no NaN fill of new tensors: it cost a share of every step and no op here needs it
        assert torch.utils.deterministic.fill_uninitialized_memory is False
    assert torch.are_deterministic_algorithms_enabled() == before
    assert torch.get_num_threads() == threads
    assert torch.utils.deterministic.fill_uninitialized_memory == fill


def test_the_optimiser_is_the_fused_adamw(monkeypatch) -> None:
    """One fused kernel per step on the CPU (the same update as the loop of passes)."""
    import torch

    made: list[dict] = []
    real = torch.optim.AdamW

    def spy(params, **kwargs):
        made.append(kwargs)
        return real(params, **kwargs)

    monkeypatch.setattr(torch.optim, "AdamW", spy)
    _tune(1, (np.zeros((3, 384)), np.zeros(3)), max_epochs=1, patience=1)
    assert [kwargs["fused"] for kwargs in made] == [True]


def test_optimize_exports_the_fine_tuned_encoder(ft_tag: str, monkeypatch) -> None:
    from training import optimize

    exported: list[Path] = []
    original = optimize.export_encoder

    def spy(encoder_dir: Path, out: Path, max_tokens: int) -> float:
        exported.append(encoder_dir)
        return original(encoder_dir, out, max_tokens)

    monkeypatch.setattr(optimize, "export_encoder", spy)
    stored = optimize.optimize_int8(
        ft_tag, "unit-ft:v2", dataset=tiny_dataset(), max_f1_drop=1.0, overwrite=True
    )
    source = open_model(ft_tag)
    assert exported == [source.path / "encoder"]
    assert stored.family == "onnx"
    assert stored.metadata["preprocessing"]["max_tokens"] == 16
    assert stored.metadata["quality_gate"]["source"] == ft_tag
    runner = load_runner(stored.tag)
    try:
        out = runner.predict(["the striker scored twice", "bake the bread in the oven"])
    finally:
        runner.close()
    assert np.allclose(out.probabilities.sum(axis=1), 1.0)
