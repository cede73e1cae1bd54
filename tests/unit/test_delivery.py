"""Progressive delivery without a server: weights and their validation, sticky and random
routing, the registry's routing, the control path's traffic and shadow changes (and how load,
default and unload treat them), the shadow runner's queue, errors and comparison, the
comparison read back from the metrics, and the client calls."""

from __future__ import annotations

import asyncio
import collections
import json
import random

import httpx
import numpy as np
import pytest

from mlserve.admin import comparisons
from mlserve.client import Client, InvalidResponse
from mlserve.delivery import (
    Answers,
    Comparison,
    ShadowObserver,
    ShadowRunner,
    compare,
    key_point,
    pick,
    validate_shadow,
    validate_weights,
)
from mlserve.errors import (
    ModelStateError,
    OverloadedError,
    ValidationError,
)
from tests.unit.test_client import (  # noqa: F401 - cli_server is a fixture
    CHANGE,
    TOKEN,
    URL,
    Recorder,
    cli,
    cli_server,
    json_answer,
)
from tests.unit.test_control import closed, started, store, workers  # noqa: F401
from tests.unit.test_registry import loaded

MODELS = ["sentiment:v1", "sentiment:v2", "sentiment:v3", "topic:v1"]


# --- validation --------------------------------------------------------------------------------


def test_valid_weights_are_kept_sorted() -> None:
    assert validate_weights("sentiment", {"v2": 10, "v1": 90}, MODELS) == {"v1": 90, "v2": 10}
    assert validate_weights("sentiment", {"v2": 100, "v1": 0}, MODELS) == {"v1": 0, "v2": 100}
    assert validate_weights("sentiment", {}, MODELS) == {}


@pytest.mark.parametrize(
    "name,weights,words",
    [
        ("sentiment", {"v1": 90, "v2": 20}, "sum to 100, not 110"),
        ("sentiment", {"v1": 50}, "sum to 100, not 50"),
        ("sentiment", {"v1": 110, "v2": -10}, "negative"),
        ("sentiment", {"v1": 90, "v9": 10}, "sentiment:v9 is not loaded"),
        ("sentiment", {"v1": 90.0, "v2": 10}, "whole numbers"),
        ("sentiment", {"v1": True, "v2": 99}, "whole numbers"),
        ("nope", {"v1": 100}, "no version of model 'nope'"),
        ("nope", {}, "no version of model 'nope'"),
    ],
)
def test_bad_weights_are_422(name, weights, words) -> None:
    with pytest.raises(ValidationError) as caught:
        validate_weights(name, weights, MODELS)
    assert caught.value.status == 422 and words in caught.value.message


def test_shadow_validation() -> None:
    defaults = {"sentiment": "v1", "topic": "v1"}
    assert validate_shadow("sentiment", "v2", 0.5, MODELS, defaults) == {
        "version": "v2",
        "sample": 0.5,
    }
    for version, sample, words in [
        ("v1", 1.0, "primary"),
        ("v9", 1.0, "not loaded"),
        ("v2", 0.0, "sample"),
        ("v2", 1.5, "sample"),
    ]:
        with pytest.raises(ValidationError) as caught:
            validate_shadow("sentiment", version, sample, MODELS, defaults)
        assert words in caught.value.message


# --- routing -----------------------------------------------------------------------------------


def test_random_choice_follows_the_weights() -> None:
    rng = random.Random(7)
    counts = collections.Counter(pick({"v1": 80, "v2": 20}, rand=rng.random) for _ in range(20000))
    assert abs(counts["v2"] / 20000 - 0.20) < 0.015
    assert set(counts) == {"v1", "v2"}


def test_a_zero_weight_never_gets_traffic() -> None:
    rng = random.Random(3)
    assert {pick({"v1": 0, "v2": 100}, rand=rng.random) for _ in range(2000)} == {"v2"}
    assert pick({"v1": 100, "v2": 0}, rand=lambda: 0.999999999) == "v1"
    assert pick({}) is None


def test_a_key_always_gets_the_same_version_and_keys_spread() -> None:
    weights = {"v1": 80, "v2": 20}
    assert {pick(weights, "user-42") for _ in range(200)} == {pick(weights, "user-42")}
    share = sum(pick(weights, f"user-{i}") == "v2" for i in range(20000)) / 20000
    assert abs(share - 0.20) < 0.015
    assert 0 <= key_point("") < 100 and key_point("a") == key_point("a")


def test_growing_a_weight_only_moves_keys_to_that_version() -> None:
    keys = [f"k{i}" for i in range(3000)]
    before = {k: pick({"v1": 90, "v2": 10}, k) for k in keys}
    after = {k: pick({"v1": 50, "v2": 50}, k) for k in keys}
    assert all(after[k] == "v2" for k in keys if before[k] == "v2")


def test_the_registry_routes_bare_names_and_never_exact_versions() -> None:
    from mlserve.registry import ModelRegistry

    registry = ModelRegistry("sentiment")
    for tag in ("sentiment:v1", "sentiment:v2", "topic:v1"):
        registry.add(loaded(tag))
    registry.set_delivery({"sentiment": {"v1": 0, "v2": 100}}, {})
    assert registry.resolve("sentiment").tag == "sentiment:v2"
    assert registry.resolve(None).tag == "sentiment:v2"  # the service default is a bare name
    assert registry.resolve("sentiment:v1").tag == "sentiment:v1"
    assert registry.resolve("topic").tag == "topic:v1"
    with registry.acquired("sentiment", "some-key") as model:
        assert model.tag == "sentiment:v2"
    # A weighted version this worker does not serve: its default answers.
    registry.set_delivery({"sentiment": {"v1": 0, "v9": 100}}, {})
    assert registry.resolve("sentiment").tag == "sentiment:v1"
    registry.set_delivery({}, {})
    assert registry.resolve("sentiment").tag == "sentiment:v1"
    assert registry.traffic() == {} and registry.shadows() == {}


# --- the control path --------------------------------------------------------------------------

THREE = ("sentiment:v1", "sentiment:v2", "topic:v1")


def test_a_split_reaches_every_worker_and_promote_ends_it(store) -> None:  # noqa: F811
    async def scenario():
        a, b = workers(store, models=THREE)
        await started([a, b])
        split = await a.set_traffic("sentiment", {"v1": 80, "v2": 20})
        shadow = await b.set_shadow("sentiment", "v2", 0.5)
        seen = (b.core.registry.traffic(), a.core.registry.shadows())
        promoted = await b.set_default("sentiment", "v2")
        after = (a.core.registry.traffic(), b.core.registry.shadows())
        await closed([a, b])
        return split, shadow, seen, promoted, after

    split, shadow, seen, promoted, after = asyncio.run(scenario())
    assert split["complete"] and split["action"] == "traffic"
    assert split["traffic"] == {"sentiment": {"v1": 80, "v2": 20}}
    assert shadow["shadows"] == {"sentiment": {"version": "v2", "sample": 0.5}}
    assert shadow["traffic"] == split["traffic"]  # a shadow change keeps the split
    assert seen == (
        {"sentiment": {"v1": 80, "v2": 20}},
        {"sentiment": {"version": "v2", "sample": 0.5}},
    )
    assert promoted["traffic"] == {} and promoted["shadows"] == {}
    assert after == ({}, {})


def test_unloading_a_weighted_version_is_409_and_a_shadow_goes_with_its_version(
    store,  # noqa: F811
) -> None:
    async def scenario():
        (a,) = workers(store, 1, models=THREE)
        await started([a])
        await a.set_traffic("sentiment", {"v1": 90, "v2": 10})
        with pytest.raises(ModelStateError) as refused:
            await a.unload("sentiment:v2")
        state = store.read()
        await a.set_traffic("sentiment", {"v1": 100, "v2": 0})
        await a.set_shadow("sentiment", "v2", 1.0)
        result = await a.unload("sentiment:v2")
        await closed([a])
        return refused.value, state, result

    refused, state, result = asyncio.run(scenario())
    assert refused.status == 409 and "10%" in refused.message
    assert "sentiment:v2" in state["models"]
    assert result["models"] == ["sentiment:v1", "topic:v1"]
    assert result["traffic"] == {"sentiment": {"v1": 100}}
    assert result["shadows"] == {}


def test_loading_a_new_default_ends_the_split(store) -> None:  # noqa: F811
    async def scenario():
        (a,) = workers(store, 1, models=THREE, max_loaded=4)
        await started([a])
        await a.set_traffic("sentiment", {"v1": 90, "v2": 10})
        kept = await a.load("sentiment:v3", make_default=False)
        ended = await a.load("sentiment:v3", make_default=True)
        await closed([a])
        return kept, ended

    kept, ended = asyncio.run(scenario())
    assert kept["traffic"] == {"sentiment": {"v1": 90, "v2": 10}}
    assert ended["traffic"] == {}


@pytest.mark.parametrize(
    "call,words",
    [
        (("traffic", "sentiment", {"v1": 90, "v2": 20}), "sum to 100"),
        (("traffic", "sentiment", {"v1": 90, "v3": 10}), "not loaded"),
        (("traffic", "nope", {"v1": 100}), "no version"),
        (("shadow", "sentiment", "v1"), "primary"),
        (("shadow", "sentiment", "v3"), "not loaded"),
    ],
)
def test_bad_changes_are_422_and_publish_nothing(store, call, words) -> None:  # noqa: F811
    async def scenario():
        (a,) = workers(store, 1, models=THREE)
        await started([a])
        kind, name, arg = call
        with pytest.raises(ValidationError) as caught:
            if kind == "traffic":
                await a.set_traffic(name, arg)
            else:
                await a.set_shadow(name, arg, 1.0)
        await closed([a])
        return a, caught.value

    a, exc = asyncio.run(scenario())
    assert exc.status == 422 and words in exc.message
    assert store.read() is None
    assert a.core.registry.traffic() == {} and a.core.registry.shadows() == {}


def test_a_record_without_traffic_or_shadows_still_applies(store) -> None:  # noqa: F811
    store.update(lambda cur: {"models": list(THREE), "defaults": {"sentiment": "v1"}})

    async def scenario():
        (a,) = workers(store, 1, models=THREE)
        await started([a])
        result = await a.set_traffic("sentiment", {"v1": 50, "v2": 50})
        await closed([a])
        return result

    assert asyncio.run(scenario())["traffic"] == {"sentiment": {"v1": 50, "v2": 50}}


# --- comparison and shadow runs ----------------------------------------------------------------


def answers(labels: list[str], probs: list[list[float]]) -> Answers:
    p = np.array(probs, dtype=np.float64)
    return Answers(labels, p, p.argmax(axis=1))


def test_compare_agreement_and_probability_difference() -> None:
    a = answers(["neg", "pos"], [[0.9, 0.1], [0.4, 0.6]])
    b = answers(["neg", "pos"], [[0.7, 0.3], [0.8, 0.2]])
    result = compare(a, b)
    assert (result.texts, result.agreements) == (2, 1)
    assert result.probability_difference == pytest.approx(0.2 + 0.4)
    assert result.primary_labels == ["neg", "pos"] and result.shadow_labels == ["neg", "neg"]
    # Different label sets: a missing label has probability 0.
    c = answers(["neg", "neutral", "pos"], [[0.9, 0.1, 0.0]])
    d = answers(["neg", "pos"], [[0.9, 0.1]])
    assert compare(c, d).probability_difference == pytest.approx((0 + 0.1 + 0.1) / 3)


class Recording(ShadowObserver):
    def __init__(self) -> None:
        self.events: list[tuple] = []

    def compared(self, primary, shadow, result: Comparison, primary_s, shadow_s) -> None:
        self.events.append(("compared", primary, shadow, result.texts, result.agreements))

    def dropped(self, primary, shadow) -> None:
        self.events.append(("dropped", primary, shadow))

    def errored(self, primary, shadow) -> None:
        self.events.append(("error", primary, shadow))


PRIMARY = answers(["neg", "pos"], [[0.9, 0.1]])


def test_shadow_runs_are_sampled_compared_and_never_on_the_primary() -> None:
    async def scenario():
        seen: list[tuple[str, list[str]]] = []

        async def infer(tag, texts):
            seen.append((tag, texts))
            return answers(["neg", "pos"], [[0.2, 0.8]])

        obs = Recording()
        rng = random.Random(1)
        runner = ShadowRunner(infer, obs, rand=rng.random)
        runner.configure({"sentiment": {"version": "v2", "sample": 0.5}})
        offered = [runner.offer("sentiment:v1", ["t"], PRIMARY, 0.01) for _ in range(400)]
        assert not runner.offer("sentiment:v2", ["t"], PRIMARY, 0.01)  # the shadow itself
        assert not runner.offer("topic:v1", ["t"], PRIMARY, 0.01)  # no shadow for topic
        await runner.drain()
        await runner.aclose()
        return offered, seen, obs.events

    offered, seen, events = asyncio.run(scenario())
    assert 150 < sum(offered) < 250
    assert len(seen) == sum(offered) and {tag for tag, _ in seen} == {"sentiment:v2"}
    assert events == [("compared", "sentiment:v1", "sentiment:v2", 1, 0)] * sum(offered)


def test_a_full_shadow_queue_drops_and_counts() -> None:
    async def scenario():
        gate = asyncio.Event()

        async def infer(tag, texts):
            await gate.wait()
            return PRIMARY

        obs = Recording()
        runner = ShadowRunner(infer, obs, queue_size=3, concurrency=1)
        runner.configure({"sentiment": {"version": "v2", "sample": 1.0}})
        offered = [runner.offer("sentiment:v1", ["t"], PRIMARY, 0.01) for _ in range(10)]
        await asyncio.sleep(0)  # the one consumer takes a job; the queue has room for 3
        offered += [runner.offer("sentiment:v1", ["t"], PRIMARY, 0.01) for _ in range(3)]
        gate.set()
        await runner.drain()
        await runner.aclose()
        return offered, obs.events

    offered, events = asyncio.run(scenario())
    kinds = collections.Counter(e[0] for e in events)
    assert sum(offered) == kinds["compared"] == 4
    assert kinds["dropped"] == 9


def test_shadow_errors_are_counted_overload_and_clearing_drop() -> None:
    async def scenario():
        failures = [RuntimeError("boom"), OverloadedError("full", retry_after=1)]

        async def infer(tag, texts):
            if failures:
                raise failures.pop(0)
            return PRIMARY

        obs = Recording()
        runner = ShadowRunner(infer, obs, concurrency=1)
        runner.configure({"sentiment": {"version": "v2", "sample": 1.0}})
        for _ in range(3):
            runner.offer("sentiment:v1", ["t"], PRIMARY, 0.01)
        await runner.drain()
        runner.offer("sentiment:v1", ["t"], PRIMARY, 0.01)
        runner.configure({})  # cleared while the job waits
        await runner.drain()
        await runner.aclose()
        return obs.events

    assert [e[0] for e in asyncio.run(scenario())] == ["error", "dropped", "compared", "dropped"]


def test_comparisons_are_read_back_from_the_metrics() -> None:
    from prometheus_client import CollectorRegistry, Counter, Histogram

    reg = CollectorRegistry()
    pair = ["primary", "shadow"]
    runs = Counter("mlserve_shadow_runs", "", [*pair, "outcome"], registry=reg)
    comps = Counter("mlserve_shadow_comparisons", "", pair, registry=reg)
    agree = Counter("mlserve_shadow_agreements", "", pair, registry=reg)
    diff = Counter("mlserve_shadow_probability_difference", "", pair, registry=reg)
    labels = Counter("mlserve_shadow_labels", "", [*pair, "role", "label"], registry=reg)
    latency = Histogram("mlserve_shadow_latency_seconds", "", [*pair, "role"], registry=reg)
    p = {"primary": "sentiment:v1", "shadow": "sentiment:v2"}
    runs.labels(**p, outcome="compared").inc(3)
    runs.labels(**p, outcome="dropped").inc(2)
    runs.labels(**p, outcome="error").inc(1)
    comps.labels(**p).inc(4)
    agree.labels(**p).inc(3)
    diff.labels(**p).inc(0.4)
    labels.labels(**p, role="primary", label="pos").inc(4)
    labels.labels(**p, role="shadow", label="pos").inc(3)
    labels.labels(**p, role="shadow", label="neg").inc(1)
    for role, seconds in (("primary", 0.004), ("shadow", 0.020)):
        for _ in range(3):
            latency.labels(**p, role=role).observe(seconds)
    runs.labels(primary="topic:v1", shadow="topic:v2", outcome="compared").inc()
    samples = [s for family in reg.collect() for s in family.samples]

    (found,) = comparisons(samples, "sentiment")
    assert found["comparisons"] == 4 and found["requests"] == 3
    assert found["agreement_rate"] == 0.75
    assert found["mean_abs_probability_difference"] == pytest.approx(0.1)
    assert found["labels"] == {"primary": {"pos": 4}, "shadow": {"pos": 3, "neg": 1}}
    assert found["shadow_errors"] == 1 and found["shadow_dropped"] == 2
    assert found["latency"]["primary"]["mean_ms"] == pytest.approx(4.0)
    assert 10 <= found["latency"]["shadow"]["p50_ms"] <= 25
    assert [c["primary"] for c in comparisons(samples)] == ["sentiment:v1", "topic:v1"]
    assert comparisons(samples, "nope") == []


def test_the_metrics_observer_uses_only_bounded_labels() -> None:
    from mlserve import observability as obs

    m = obs.ShadowMetrics()
    result = compare(PRIMARY, answers(["neg", "pos"], [[0.3, 0.7]]))
    m.compared("sentiment:v1", "sentiment:v2", result, 0.01, 0.02)
    m.dropped("sentiment:v1", "sentiment:v2")
    m.errored("sentiment:v1", "sentiment:v2")
    (pair,) = [c for c in comparisons(_samples()) if _ours(c)]
    assert pair["shadow_errors"] >= 1 and pair["shadow_dropped"] >= 1
    assert set(pair["labels"]["shadow"]) <= {"neg", "pos"}


def _samples():
    from mlserve.admin import _samples as samples

    return samples()


def _ours(c: dict) -> bool:
    return (c["primary"], c["shadow"]) == ("sentiment:v1", "sentiment:v2")


# --- the client --------------------------------------------------------------------------------

STATUS = {
    "store": "file:/x",
    "desired": {"generation": 2, "models": list(THREE), "defaults": {"sentiment": "v1"}},
    "workers": {},
}


def test_client_canary_shadow_compare_and_routing_key() -> None:
    rec = Recorder(
        json_answer(200, STATUS),
        json_answer(200, {**CHANGE, "action": "traffic"}),
        json_answer(200, {**CHANGE, "action": "traffic"}),
        json_answer(200, {**CHANGE, "action": "shadow"}),
        json_answer(
            200, {"name": "sentiment", "default": "v1", "traffic": {}, "shadow": None, "pairs": []}
        ),
        json_answer(200, {}),
    )
    with Client(URL, admin_token=TOKEN, transport=httpx.MockTransport(rec)) as c:
        assert c.canary("sentiment:v2", 10).action == "traffic"
        c.canary("sentiment:v2", 0)
        c.shadow("sentiment", "v2", 0.5)
        assert c.compare("sentiment").default == "v1"
        with pytest.raises(InvalidResponse):  # an empty body is not a PredictResponse
            c.predict("text", "sentiment", routing_key="user-1")
        with pytest.raises(ValueError):
            c.canary("sentiment:v2", 101)
    seen = [(r.method, r.url.path, json.loads(r.content or b"null")) for r in rec.requests]
    assert seen == [
        ("GET", "/admin/models", None),
        ("POST", "/admin/models/traffic", {"name": "sentiment", "weights": {"v2": 10, "v1": 90}}),
        ("POST", "/admin/models/traffic", {"name": "sentiment", "weights": {}}),
        ("POST", "/admin/models/shadow", {"name": "sentiment", "version": "v2", "sample": 0.5}),
        ("GET", "/admin/models/sentiment/compare", None),
        (
            "POST",
            "/predict",
            {"text": "text", "model_version": "sentiment", "routing_key": "user-1"},
        ),
    ]


def test_core_offers_only_when_a_shadow_is_set() -> None:
    """The request path asks the runner only for names with a shadow (no copy, no lock)."""
    from mlserve.registry import ModelRegistry

    registry = ModelRegistry("sentiment")
    runner = ShadowRunner(None, ShadowObserver(), shadows=registry.shadow_settings)  # type: ignore[arg-type]
    assert runner.shadow_of("sentiment:v1") is None
    registry.set_delivery({}, {"sentiment": {"version": "v2", "sample": 1.0}})
    assert runner.shadow_of("sentiment:v1") == "sentiment:v2"
    assert runner.shadow_of("sentiment:v2") is None


# --- the CLI -----------------------------------------------------------------------------------

COMPARED = {
    "name": "sentiment",
    "default": "v1",
    "traffic": {"v1": 90, "v2": 10},
    "shadow": {"version": "v2", "sample": 0.5},
    "pairs": [
        {
            "primary": "sentiment:v1",
            "shadow": "sentiment:v2",
            "comparisons": 40,
            "requests": 20,
            "agreement_rate": 0.925,
            "mean_abs_probability_difference": 0.0412,
            "labels": {"primary": {"positive": 30, "negative": 10}, "shadow": {"positive": 40}},
            "latency": {
                "primary": {"p50_ms": 2.0, "p95_ms": 4.0, "p99_ms": 5.0, "mean_ms": 2.5},
                "shadow": {"p50_ms": 30.0, "p95_ms": 60.0, "p99_ms": 70.0, "mean_ms": 33.0},
            },
            "shadow_errors": 1,
            "shadow_dropped": 3,
        }
    ],
}


def test_cli_canary_shadow_and_compare(cli_server, monkeypatch) -> None:  # noqa: F811
    monkeypatch.setenv("COLUMNS", "250")
    split = {**CHANGE, "traffic": {"sentiment": {"v1": 90, "v2": 10}}}
    rec = cli_server(json_answer(200, STATUS), json_answer(200, split))
    result = cli("canary", "sentiment:v2", "--weight", "10", "--server", URL)
    assert result.exit_code == 0, result.output
    assert "traffic sentiment: v1 90%, v2 10%" in result.output
    assert json.loads(rec.requests[1].content) == {
        "name": "sentiment",
        "weights": {"v2": 10, "v1": 90},
    }

    shadowed = {**CHANGE, "shadows": {"sentiment": {"version": "v2", "sample": 0.5}}}
    rec = cli_server(json_answer(200, shadowed))
    result = cli("shadow", "sentiment:v2", "--sample", "0.5", "--server", URL)
    assert result.exit_code == 0 and "shadow sentiment: sentiment:v2 (sample 0.5)" in result.output
    rec = cli_server(json_answer(200, CHANGE))
    assert cli("shadow", "sentiment", "--off", "--server", URL).exit_code == 0
    assert json.loads(rec.requests[0].content)["version"] is None
    refused = cli("shadow", "sentiment", "--server", URL)
    assert refused.exit_code == 1 and "--off" in refused.output

    cli_server(json_answer(200, COMPARED))
    result = cli("compare", "sentiment", "--server", URL)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "default v1; traffic v1 90%, v2 10%; shadow sentiment:v2 (sample 0.5)" in out
    for cell in ("92.50%", "0.0412", "30.0", "negative 10, positive 30", "positive 40"):
        assert cell in out, cell
    cli_server(json_answer(200, COMPARED))
    raw = cli("compare", "sentiment", "--json", "--server", URL)
    assert json.loads(raw.output)["pairs"][0]["shadow_dropped"] == 3
