"""mlserve.observability.observe_many: a batch's values into a histogram at once, counted
exactly as one observe() per value would count them."""

from __future__ import annotations

import math

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, Histogram

from mlserve.observability import observe_many

BUCKETS = (0.25, 0.5, 0.75, 0.9, 1.0)


def _histogram(name: str) -> Histogram:
    return Histogram(name, "test", ["v"], buckets=BUCKETS, registry=CollectorRegistry())


def _samples(h: Histogram) -> dict[tuple[str, str], float]:
    return {
        (s.name, s.labels.get("le", "")): s.value
        for metric in h.collect()
        for s in metric.samples
        if not s.name.endswith("_created")
    }


@pytest.mark.parametrize(
    "values",
    [
        # on every bound exactly, between them, below the first and above the last finite one
        [0.25, 0.5, 0.75, 0.9, 1.0, 0.1, 0.3, 0.6, 0.8, 0.95, 1.5, 0.0, 0.5, 0.5],
        np.random.default_rng(3).random(1000),
        [0.4, 0.41],
    ],
)
def test_bulk_counts_equal_one_observe_per_value(values) -> None:
    one, bulk = _histogram("one"), _histogram("bulk")
    for v in np.asarray(values, dtype=float).tolist():
        one.labels(v="a").observe(v)
    observe_many(bulk.labels(v="a"), np.asarray(values))
    a = {(n.replace("one", ""), le): x for (n, le), x in _samples(one).items()}
    b = {(n.replace("bulk", ""), le): x for (n, le), x in _samples(bulk).items()}
    assert a.keys() == b.keys()
    for key, expected in a.items():
        if key[0] == "_sum":
            assert math.isclose(b[key], expected, rel_tol=1e-12)
        else:
            assert b[key] == expected, key  # bucket and count: exact


def test_a_nan_is_summed_but_lands_in_no_bucket_as_with_observe() -> None:
    one, bulk = _histogram("one"), _histogram("bulk")
    for v in (0.3, float("nan"), 0.8):
        one.labels(v="a").observe(v)
    observe_many(bulk.labels(v="a"), [0.3, float("nan"), 0.8])
    a, b = _samples(one), _samples(bulk)
    assert b[("bulk_count", "")] == a[("one_count", "")] == 2
    assert math.isnan(b[("bulk_sum", "")]) and math.isnan(a[("one_sum", "")])


def test_falls_back_to_observe_without_the_histogram_internals() -> None:
    class Plain:
        def __init__(self) -> None:
            self.seen: list[float] = []

        def observe(self, v: float) -> None:
            self.seen.append(v)

    plain = Plain()
    observe_many(plain, np.array([0.2, 0.7, 0.9]))
    assert plain.seen == [0.2, 0.7, 0.9]
