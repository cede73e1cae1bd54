"""Runners on tiny real models trained in fixtures (in the session's temporary model store)."""

from __future__ import annotations

import random

import numpy as np
import pytest

from mlserve.errors import ModelIntegrityError
from runners import load_runner
from runners.base import BatchResult
from training.data import Dataset
from training.pipeline import TrainConfig, save_result, train

TOPICS = {
    "sport": [
        "the striker scored twice in the final",
        "the team won the league after a late goal",
        "the tennis player lost the match in five sets",
        "a record crowd watched the football derby",
        "the coach praised the defence after the win",
        "the runner broke the world record in the sprint",
        "the cricket side collapsed in the second innings",
        "the goalkeeper saved a penalty in extra time",
        "the boxer retained his title on points",
        "fans celebrated the cup victory in the stadium",
    ],
    "tech": [
        "the new phone has a faster processor and more memory",
        "the software update fixes a security flaw in the browser",
        "engineers released an open source database engine",
        "the laptop battery lasts twelve hours on a charge",
        "a startup built a chip for machine learning workloads",
        "the operating system adds a new file manager",
        "hackers exploited a bug in the web server",
        "the cloud provider launched cheaper storage",
        "programmers debated the new compiler release",
        "the tablet screen uses an efficient display panel",
    ],
    "food": [
        "the chef baked fresh bread with rosemary",
        "add garlic and onions to the hot pan",
        "the soup tastes better with a pinch of salt",
        "we ordered pasta with tomato sauce and basil",
        "the bakery sells chocolate cakes and pastries",
        "roast the vegetables in the oven for an hour",
        "the restaurant serves grilled fish and rice",
        "stir the sugar into the warm milk slowly",
        "the recipe needs eggs flour and butter",
        "a spicy curry with lentils and coconut milk",
    ],
}


def tiny_dataset() -> Dataset:
    texts, labels = [], []
    for label, items in TOPICS.items():
        for text in items:
            texts.append(text)
            labels.append(label)
    return Dataset("tiny_topics", texts, labels, source="tests")


@pytest.fixture(scope="module")
def classical_tags() -> dict[str, str]:
    run = train(
        tiny_dataset(), TrainConfig(candidates=("logreg", "xgboost", "lightgbm", "random_forest"))
    )
    tags = {}
    for result in run.results:
        tag = f"unit-{result.fitted.kind.replace('_', '-')}:v1"
        save_result(run, result, tag, "unit test", overwrite=True)
        tags[result.fitted.kind] = tag
    return tags


@pytest.fixture(scope="module")
def transformer_tag() -> str:
    run = train(tiny_dataset(), TrainConfig(candidates=("minilm",)))
    save_result(run, run.results[0], "unit-minilm:v1", "unit test", overwrite=True)
    return "unit-minilm:v1"


@pytest.mark.parametrize("kind", ["logreg", "xgboost", "lightgbm", "random_forest"])
def test_classical_runner_predicts_calibrated_batches(classical_tags, kind) -> None:
    runner = load_runner(classical_tags[kind])
    try:
        texts = ["the goalkeeper scored a goal", "a new chip for the laptop", "bake the bread"]
        result = runner.predict(texts)
        assert isinstance(result, BatchResult)
        assert result.labels == ["food", "sport", "tech"]
        assert result.probabilities.shape == (3, 3)
        np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-9)
        assert set(result.timing_ms) == {"preprocess_ms", "model_ms", "postprocess_ms"}
        if kind == "logreg":  # the linear model separates this toy data reliably
            assert result.predicted == ["sport", "tech", "food"]
    finally:
        runner.close()


def test_a_single_text_is_a_batch_of_one_and_order_is_kept(classical_tags) -> None:
    runner = load_runner(classical_tags["logreg"])
    texts = [t for items in TOPICS.values() for t in items]
    batch = runner.predict(texts).probabilities
    singles = np.vstack([runner.predict([t]).probabilities for t in texts])
    np.testing.assert_allclose(batch, singles, atol=1e-12)
    order = list(range(len(texts)))
    random.Random(0).shuffle(order)
    shuffled = runner.predict([texts[i] for i in order]).probabilities
    np.testing.assert_allclose(shuffled, batch[order], atol=1e-12)


def test_close_releases_the_model(classical_tags) -> None:
    runner = load_runner(classical_tags["logreg"])
    assert runner.loaded
    runner.close()
    assert not runner.loaded
    with pytest.raises(AttributeError):
        runner.predict(["anything"])


def test_skops_files_with_untrusted_types_are_refused(tmp_path) -> None:
    import skops.io as sio
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import FunctionTransformer

    from runners.classical import load_estimator

    sio.dump(Pipeline([("f", FunctionTransformer(np.log1p))]), tmp_path / "estimator.skops")
    with pytest.raises(ModelIntegrityError, match="untrusted types"):
        load_estimator("logreg", tmp_path)


def test_transformer_runner_on_cpu(transformer_tag) -> None:
    import torch

    from runners.transformer import pick_device

    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.cuda.is_available() and torch.backends.mps.is_available():
        expected = "mps"
    assert pick_device("auto") == expected
    runner = load_runner(transformer_tag)
    try:
        assert runner.device == expected
        texts = ["the striker scored a late goal in the match", "bake bread with butter and flour"]
        result = runner.predict(texts)
        np.testing.assert_allclose(result.probabilities.sum(axis=1), 1.0, atol=1e-6)
        assert result.predicted == ["sport", "food"]
        # Sorting by length inside the batch never changes which row belongs to which text.
        mixed = ["tiny", "a much longer sentence about the football team and its coach", "phones"]
        together = runner.predict(mixed).probabilities
        alone = np.vstack([runner.predict([t]).probabilities for t in mixed])
        np.testing.assert_allclose(together, alone, atol=1e-4)
    finally:
        runner.close()


def test_transformer_truncates_to_max_tokens(transformer_tag) -> None:
    runner = load_runner(transformer_tag)
    try:
        head = "the team won the cup final " * 40  # well over 128 tokens
        a = runner.predict([head]).probabilities
        b = runner.predict([head + " bread butter flour " * 200]).probabilities
        np.testing.assert_allclose(a, b, atol=1e-5)  # everything past the limit is ignored
    finally:
        runner.close()


def test_device_choice_follows_cuda_then_mps_then_cpu(monkeypatch) -> None:
    import torch

    from runners.transformer import pick_device

    mps = torch.backends.mps
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(mps, "is_available", lambda: True)
    assert pick_device("auto") == "cuda"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pick_device("auto") == "mps"
    monkeypatch.setattr(mps, "is_available", lambda: False)
    assert pick_device("auto") == "cpu"
    assert pick_device("cpu") == "cpu"  # an explicit setting wins over detection


def test_gpu_out_of_memory_is_a_503_and_frees_the_cache(transformer_tag, monkeypatch) -> None:
    import torch

    from mlserve.errors import ServiceUnavailableError

    runner = load_runner(transformer_tag)
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))

    def out_of_memory(texts):
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    try:
        monkeypatch.setattr(runner.encoder, "embed", out_of_memory)
        with pytest.raises(ServiceUnavailableError) as caught:
            runner.predict(["a text"])
        assert caught.value.status == 503
        assert "GiB" not in caught.value.to_dict()["message"]  # no allocator details
        assert emptied
    finally:
        runner.close()


def test_close_on_a_gpu_releases_its_memory(transformer_tag, monkeypatch) -> None:
    import torch

    runner = load_runner(transformer_tag)
    # The device was passed to the model explicitly; pretend it is a GPU to check the release.
    assert next(runner.encoder.model.parameters()).device == runner.encoder.device
    emptied = []
    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: emptied.append(True))
    runner.encoder.device = torch.device("cuda")
    runner.close()
    assert emptied and not runner.loaded
    assert not hasattr(runner.encoder, "model")


def test_gpu_check_script_compares_a_device_with_the_cpu(transformer_tag, monkeypatch) -> None:
    from benchmarks.gpu_check import check
    from mlserve.settings import get_settings

    monkeypatch.setenv("MLSERVE_DEVICE", "cpu")  # restored afterwards; check() changes it
    try:
        report = check(transformer_tag, device="cpu", sizes=(1, 4), repeat=1)
    finally:
        get_settings.cache_clear()
    assert report["device"] == "cpu"
    assert report["max_abs_probability_diff_vs_cpu"] < 1e-5
    assert report["label_agreement_vs_cpu"] == 1.0
    assert set(report["texts_per_s_by_batch_size"]) == {"1", "4"}
    assert all(v > 0 for v in report["texts_per_s_by_batch_size"].values())
