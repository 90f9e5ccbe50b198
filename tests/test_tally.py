"""sidecar.tally: deferred metric writes give, once flushed, exactly the exposition that
prometheus-client's own inc()/observe() give (this pins the client internals it adds to)."""

from __future__ import annotations

import math

from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from sidecar.metrics import LATENCY_BUCKETS
from sidecar.tally import _FOLD_AT, Tallies

# Amounts on every bucket bound exactly, between them, past the last, and zero.
AMOUNTS = st.lists(
    st.one_of(
        st.sampled_from([0.0, *LATENCY_BUCKETS, 3.0, 1e9]),
        st.floats(min_value=0, max_value=10, allow_nan=False),
    ),
    max_size=60,
)


def _pair() -> tuple[CollectorRegistry, Histogram, Counter]:
    registry = CollectorRegistry()
    histogram = Histogram("h_seconds", "h", ["op"], buckets=LATENCY_BUCKETS, registry=registry)
    counter = Counter("c", "c", ["op"], registry=registry)
    return registry, histogram, counter


@given(AMOUNTS, st.integers(min_value=0, max_value=4))
def test_flushed_tallies_expose_what_direct_writes_expose(
    amounts: list[float], flushes: int
) -> None:
    direct_registry, direct_h, direct_c = _pair()
    tallied_registry, tallied_h, tallied_c = _pair()
    tallies = Tallies(direct=False)
    observe = tallies.observations(tallied_h.labels("authorize"))
    inc = tallies.count(tallied_c.labels("authorize"))
    direct_observe, direct_inc = direct_h.labels("authorize"), direct_c.labels("authorize")
    for i, amount in enumerate(amounts):
        direct_observe.observe(amount)
        direct_inc.inc(amount)
        observe.observe(amount)
        inc.inc(amount)
        if flushes and i % (flushes + 1) == 0:
            tallies.flush()  # a scrape in the middle changes nothing at the end
    tallies.flush()
    tallies.flush()  # a flush with nothing pending adds nothing
    tallied, direct = _samples(tallied_registry), _samples(direct_registry)
    assert tallied.keys() == direct.keys()
    for key, value in direct.items():
        if key[0].endswith(("_sum", "c_total")):
            # Sums of floats added in another grouping may differ in the last bits.
            assert math.isclose(tallied[key], value, rel_tol=1e-12, abs_tol=1e-12), key
        else:
            assert tallied[key] == value, key


def _samples(registry: CollectorRegistry) -> dict[tuple[str, str], float]:
    """Every sample of the exposition but the creation times, which differ per registry."""
    text = generate_latest(registry).decode()
    return {
        (sample.name, repr(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if not sample.name.endswith("_created")
    }


def test_nothing_shows_before_a_flush() -> None:
    registry, histogram, counter = _pair()
    tallies = Tallies(direct=False)
    tallies.count(counter.labels("x")).inc(3)
    tallies.observations(histogram.labels("x")).observe(0.002)
    assert registry.get_sample_value("c_total", {"op": "x"}) == 0
    assert registry.get_sample_value("h_seconds_count", {"op": "x"}) == 0
    tallies.flush()
    assert registry.get_sample_value("c_total", {"op": "x"}) == 3
    assert registry.get_sample_value("h_seconds_count", {"op": "x"}) == 1
    assert registry.get_sample_value("h_seconds_bucket", {"op": "x", "le": "0.001"}) == 0
    assert registry.get_sample_value("h_seconds_bucket", {"op": "x", "le": "0.0025"}) == 1


def test_one_writer_per_child_and_direct_mode_writes_through() -> None:
    registry, histogram, counter = _pair()
    tallies = Tallies(direct=False)
    child = counter.labels("x")
    assert tallies.count(child) is tallies.count(child)
    direct = Tallies(direct=True)
    assert direct.count(child) is child
    assert direct.observations(histogram.labels("x")) is histogram.labels("x")
    direct.count(child).inc(2)
    assert registry.get_sample_value("c_total", {"op": "x"}) == 2


def test_observations_counted_in_bulk_past_the_fold_bound_match_direct_ones() -> None:
    """More observations than a writer keeps (sidecar.tally._FOLD_AT) before a scrape:
    counted into buckets in bulk on the way, they expose what direct observe() gives."""
    direct_registry, direct_h, _ = _pair()
    tallied_registry, tallied_h, _ = _pair()
    tallies = Tallies(direct=False)
    observe = tallies.observations(tallied_h.labels("authorize"))
    amounts = [*LATENCY_BUCKETS, 0.0, 3.0] * 200  # every bound exactly, 3,200 in all
    assert len(amounts) > 3 * _FOLD_AT
    for amount in amounts:
        direct_h.labels("authorize").observe(amount)
        observe.observe(amount)
    assert tallied_registry.get_sample_value("h_seconds_count", {"op": "authorize"}) == 0
    tallies.flush()
    tallied, direct = _samples(tallied_registry), _samples(direct_registry)
    assert tallied.keys() == direct.keys()
    for key, value in direct.items():
        if key[0].endswith("_sum"):
            assert math.isclose(tallied[key], value, rel_tol=1e-12), key
        else:
            assert tallied[key] == value, key
    assert direct_registry.get_sample_value("h_seconds_count", {"op": "authorize"}) == 3200
