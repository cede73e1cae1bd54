"""Model resolution: exact version, a name's default, the service default, typed errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from mlserve.batching import AdaptiveBatcher
from mlserve.errors import (
    ModelNotFoundError,
    ModelStateError,
    ServiceUnavailableError,
    ValidationError,
)
from mlserve.registry import LoadedModel, ModelLoader, ModelRegistry
from mlserve.store import StoredModel


class _Runner:
    def __init__(self, tag: str):
        name, version = tag.split(":")
        self.model = StoredModel(tag, name, version, Path("/nonexistent"), {}, "")


def loaded(tag: str) -> LoadedModel:
    name, version = tag.split(":")
    batcher = AdaptiveBatcher(lambda texts: None, 8, 0)  # never called: no request here
    return LoadedModel(name, version, _Runner(tag), batcher=batcher)


@pytest.fixture
def registry() -> ModelRegistry:
    reg = ModelRegistry("sentiment")
    for tag in ("sentiment:v1", "sentiment:v2", "topic:v1"):
        reg.add(loaded(tag))
    return reg


def test_exact_version(registry: ModelRegistry) -> None:
    assert registry.resolve("sentiment:v2").tag == "sentiment:v2"


def test_bare_name_is_its_first_loaded_version(registry: ModelRegistry) -> None:
    assert registry.resolve("sentiment").tag == "sentiment:v1"
    assert registry.resolve("topic").tag == "topic:v1"


@pytest.mark.parametrize("value", [None, ""])
def test_nothing_means_the_service_default(registry: ModelRegistry, value) -> None:
    assert registry.resolve(value).tag == "sentiment:v1"


def test_make_default_moves_the_default(registry: ModelRegistry) -> None:
    registry.add(loaded("sentiment:v3"), make_default=True)
    assert registry.resolve("sentiment").tag == "sentiment:v3"
    assert registry.defaults() == {"sentiment": "v3", "topic": "v1"}


@pytest.mark.parametrize("ref", ["sentiment:v9", "nope", "nope:v1"])
def test_unknown_models_are_404(registry: ModelRegistry, ref: str) -> None:
    with pytest.raises(ModelNotFoundError) as info:
        registry.resolve(ref)
    assert info.value.status == 404


@pytest.mark.parametrize("ref", ["../x", "/etc/passwd", "http://evil/x", "%2e%2e", "Sentiment"])
def test_unsafe_references_are_422(registry: ModelRegistry, ref: str) -> None:
    with pytest.raises(ValidationError) as info:
        registry.resolve(ref)
    assert info.value.status == 422


def test_loader_reports_progress_and_failures() -> None:
    registry = ModelRegistry("a")

    def build(tag: str) -> LoadedModel:
        if tag == "b:v1":
            raise ModelNotFoundError("model b:v1 is not in the store")
        return loaded(tag)

    loader = ModelLoader(["a:v1", "b:v1"], build, registry)
    assert not loader.ready and set(loader.status.values()) == {"pending"}
    with pytest.raises(ServiceUnavailableError):
        loader.require_ready()
    loader._run()  # synchronously, as the background thread would
    assert loader.status == {"a:v1": "ready", "b:v1": "failed"}
    assert loader.errors == {"b:v1": "model b:v1 is not in the store"}
    assert not loader.ready  # one configured model failed
    loader.require_ready()  # but a:v1 can serve
    assert registry.resolve(None).tag == "a:v1"


def test_acquired_holds_the_model_until_the_block_ends(registry: ModelRegistry) -> None:
    with registry.acquired("sentiment") as model:
        assert model.tag == "sentiment:v1" and model.active == 1
        with pytest.raises(RuntimeError), registry.acquired("sentiment:v1"):
            assert model.active == 2
            raise RuntimeError("the request failed")
        assert model.active == 1  # released even when the request failed
    assert model.active == 0


def test_removed_models_cannot_be_acquired(registry: ModelRegistry) -> None:
    registry.remove("sentiment", "v2")
    with pytest.raises(ModelNotFoundError):
        registry.acquired("sentiment:v2").__enter__()


def test_a_default_is_removable_only_as_its_names_last_version(registry: ModelRegistry) -> None:
    with pytest.raises(ModelStateError, match="default"):
        registry.remove("sentiment", "v1")  # v2 is still loaded
    registry.remove("sentiment", "v2")
    registry.remove("sentiment", "v1")
    assert "sentiment" not in registry.defaults()


def test_a_shadow_that_serves_no_client_runs_on_spare_cpu_only() -> None:
    registry = ModelRegistry("sentiment")
    v1, v2 = loaded("sentiment:v1"), loaded("sentiment:v2")
    registry.add(v1)
    registry.add(v2)
    assert not v1.batcher.background and not v2.batcher.background
    registry.set_delivery({}, {"sentiment": {"version": "v2", "sample": 1.0}})
    assert v2.batcher.background and not v1.batcher.background
    # Weighted in a canary split, it serves clients: normal priority again.
    registry.set_delivery(
        {"sentiment": {"v1": 90, "v2": 10}}, {"sentiment": {"version": "v2", "sample": 1.0}}
    )
    assert not v2.batcher.background
    registry.set_delivery({}, {"sentiment": {"version": "v2", "sample": 1.0}})
    assert v2.batcher.background
    registry.set_default("sentiment", "v2")  # promoted
    assert not v2.batcher.background and not v1.batcher.background
