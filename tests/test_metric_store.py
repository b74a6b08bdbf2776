"""The measurements the workers add to in Redis (metric_store.py), against a real Redis, and
their exposition by the collector."""

from __future__ import annotations

import math
import threading

import pytest
import redis

from ponos_tasks.lifecycle import StartFailureKind
from ponos_tasks.metric_store import (
    END_TO_DESTROY,
    OFFERS_MATCHED,
    PENDING_TO_RUNNING,
    HistogramSpec,
    MetricStore,
    cumulative,
)
from ponos_tasks.metrics import PonosCollector
from ponos_tasks.state import Keyspace
from tests.conftest import free_port

pytestmark = pytest.mark.stack  # every test here talks to a Redis

SPEC = HistogramSpec("test_seconds", "a test histogram", (1, 5, 10))


def test_histogram_buckets_are_cumulative_with_bounds_inclusive(redis_client, key_prefix):
    store = MetricStore(redis_client, Keyspace(key_prefix))
    for value in (0.5, 1, 1.01, 5, 9.9, 10, 11, 250, -3):  # -3: clocks that disagree -> 0
        store.observe(SPEC, value)
    value = store.read((SPEC,)).histograms[SPEC.name]
    # <=1: 0.5, 1, 0 (the -3); <=5: + 1.01, 5; <=10: + 9.9, 10; +Inf: + 11, 250
    assert value.buckets == ((1.0, 3), (5.0, 5), (10.0, 7), (math.inf, 9))
    assert value.count == 9
    assert value.sum == pytest.approx(sum((0.5, 1, 1.01, 5, 9.9, 10, 11, 250)))


def test_a_bucket_no_bound_names_still_counts_in_inf():
    # Bounds changed between two versions of the agent: the old bucket is kept in the count.
    value = cumulative(SPEC, {b"le:2": b"4", b"le:5": b"1", b"count": b"5", b"sum": b"12.5"})
    assert value.buckets == ((1.0, 0), (5.0, 1), (10.0, 1), (math.inf, 5))


def test_api_calls_and_429s_per_endpoint(redis_client, key_prefix):
    store = MetricStore(redis_client, Keyspace(key_prefix))
    for status in (200, 429, 429, None, 500):
        store.count_api_call("vast", "create", status)
    store.count_api_call("arkindex", "PartialUpdateTask", 200)
    store.count_start_failure(StartFailureKind.OFFER_GONE)
    store.count_start_failure(StartFailureKind.OFFER_GONE)
    store.count_start_failure(StartFailureKind.PULL_STALLED)
    read = store.read()
    assert read.api_calls == {("vast", "create"): 5, ("arkindex", "PartialUpdateTask"): 1}
    assert read.api_rate_limited == {("vast", "create"): 2}
    assert read.start_failures == {"offer_gone": 2, "pull_stalled": 1}


def test_writers_in_threads_lose_nothing(redis_client, key_prefix):
    """Every worker process adds to the same keys: concurrent adds all count."""
    keys = Keyspace(key_prefix)

    def work():
        store = MetricStore(redis_client, keys)  # its own store; connections from the pool
        for index in range(50):
            store.observe(END_TO_DESTROY, index % 7)
            store.count_api_call("vast", "list", 200)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    read = MetricStore(redis_client, keys).read()
    assert read.api_calls == {("vast", "list"): 200}
    assert read.histograms[END_TO_DESTROY.name].count == 200
    assert read.histograms[END_TO_DESTROY.name].sum == 4 * sum(i % 7 for i in range(50))


def test_a_measurement_without_redis_is_lost_not_raised():
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    store = MetricStore(client, Keyspace("nowhere:"))
    store.observe(PENDING_TO_RUNNING, 12.0)  # no exception: an API call must not fail for it
    store.count_api_call("vast", "create", 429)
    store.count_start_failure(StartFailureKind.START_FAILED)


def test_collector_exposes_the_measurements(redis_client, key_prefix):
    store = MetricStore(redis_client, Keyspace(key_prefix))
    store.observe(OFFERS_MATCHED, 0)
    store.observe(OFFERS_MATCHED, 3)
    store.count_api_call("arkindex", "RetrieveAgentActions", 429)
    store.count_start_failure(StartFailureKind.HOST_OFFLINE)
    samples = {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in PonosCollector(redis_client, key_prefix).collect()
        for sample in family.samples
    }
    assert samples[("ponos_offers_matched_bucket", (("le", "0.0"),))] == 1
    assert samples[("ponos_offers_matched_bucket", (("le", "2.0"),))] == 1
    assert samples[("ponos_offers_matched_bucket", (("le", "5.0"),))] == 2
    assert samples[("ponos_offers_matched_count", ())] == 2
    assert samples[("ponos_offers_matched_sum", ())] == 3
    labels = (("api", "arkindex"), ("endpoint", "RetrieveAgentActions"))
    assert samples[("ponos_api_calls_total", labels)] == 1
    assert samples[("ponos_api_rate_limited_total", labels)] == 1
    assert samples[("ponos_start_failures_total", (("reason", "host_offline"),))] == 1
    # Never observed: the series exist, at zero (an alert on them sees 0, not nothing).
    assert samples[("ponos_task_pending_to_running_seconds_count", ())] == 0
    assert samples[("ponos_task_end_to_destroy_seconds_bucket", (("le", "+Inf"),))] == 0
