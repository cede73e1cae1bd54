"""The serving core's cache path on tiny real models: the cache's "same input" is exactly the
model's own, so a cased model never shares an entry between "US" and "us"."""

from __future__ import annotations

import asyncio

import pytest

from mlserve.core import ClassificationService
from mlserve.preprocessing import CleaningConfig
from mlserve.settings import Settings
from tests.unit.test_runners import tiny_dataset
from training.pipeline import TrainConfig, save_result, train


@pytest.fixture(scope="module")
def tags() -> dict[str, str]:
    out = {}
    for name, lowercase in (("cased", False), ("uncased", True)):
        config = TrainConfig(candidates=("logreg",), cleaning=CleaningConfig(lowercase=lowercase))
        run = train(tiny_dataset(), config)
        tag = f"unit-{name}:v1"
        save_result(run, run.results[0], tag, "unit test", overwrite=True)
        out[name] = tag
    return out


@pytest.fixture
def core(tags, clean_env) -> ClassificationService:
    settings = Settings(
        models=list(tags.values()),
        default_model=tags["cased"],
        control_dir=str(clean_env / "control"),
        workers=1,
    )
    core = ClassificationService(settings)
    for tag in tags.values():
        core.serve(core.build(tag))
    return core


def cached(core: ClassificationService, texts: list[str], tag: str) -> list[bool]:
    async def go():
        outcome = await core.classify(texts, tag)
        return outcome.cached

    return asyncio.run(go())


def test_a_cased_model_keeps_us_and_US_apart(core, tags) -> None:
    tag = tags["cased"]
    assert cached(core, ["news from the US today"], tag) == [False]
    assert cached(core, ["news from the us today"], tag) == [False]  # another input for it
    # Whitespace is collapsed by the model's own cleaning: the same input, a hit.
    assert cached(core, ["news  from the US   today"], tag) == [True]


def test_an_uncased_model_shares_entries_exactly_where_its_cleaning_does(core, tags) -> None:
    tag = tags["uncased"]
    assert cached(core, ["News from the US"], tag) == [False]
    assert cached(core, ["news FROM the us"], tag) == [True]
    # lower() keeps "ß" (casefold would make it "ss"): different inputs for this model.
    assert cached(core, ["die straße"], tag) == [False]
    assert cached(core, ["die strasse"], tag) == [False]
    # HTML entities are unescaped by the model's cleaning, so they hit too.
    assert cached(core, ["it&#039;s great"], tag) == [False]
    assert cached(core, ["it's great"], tag) == [True]


def test_two_models_never_share_an_entry(core, tags) -> None:
    assert cached(core, ["the same words"], tags["cased"]) == [False]
    assert cached(core, ["the same words"], tags["uncased"]) == [False]
    assert core.registry.get("unit-cased", "v1").runner.identity != (
        core.registry.get("unit-uncased", "v1").runner.identity
    )
