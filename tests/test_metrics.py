"""The Prometheus endpoint, served on 127.0.0.1:0 and scraped over HTTP, against a real Redis."""

import math
import subprocess
import sys
import time

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from ponos_tasks.metrics import AgentState, serve_metrics
from ponos_tasks.models import Instance, TaskRecord
from ponos_tasks.state import Keyspace, TaskStore
from tests.conftest import free_port
from tests.test_commands import populate, running_instance

NOW = 1_700_000_000.0


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = requests.get(url, timeout=10)
    assert response.status_code == 200
    samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


@pytest.fixture
def endpoint(redis_client, key_prefix):
    """The metrics server of `key_prefix`, with a fixed clock so ages are exact."""
    server, thread = serve_metrics(
        redis_client, key_prefix, host="127.0.0.1", port=0, now=lambda: NOW + 10
    )
    yield f"http://127.0.0.1:{server.server_port}/metrics"
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def test_metrics_exact_values(redis_client, key_prefix, endpoint):
    # Records are timed at real time (tombstone expiry is real); shift them onto NOW.
    populate(redis_client, key_prefix, NOW)
    redis_client.zadd(Keyspace(key_prefix).done, {"t-failed": time.time() + 3600})
    samples = scrape(endpoint)
    assert samples[("ponos_redis_up", ())] == 1
    phases = {
        dict(labels)["phase"]: value
        for (name, labels), value in samples.items()
        if name == "ponos_tasks"
    }
    assert phases == {
        "accepted": 1,
        "waiting_offer": 0,
        "creating": 0,
        "loading": 1,
        "running": 1,
        "finishing": 0,
        "destroying": 0,
        "done": 1,
        "retrying": 0,
    }
    oldest = {
        dict(labels)["phase"]: value
        for (name, labels), value in samples.items()
        if name == "ponos_task_phase_age_max_seconds"
    }
    assert oldest == {"accepted": 50.0, "loading": 70.0, "running": 130.0}
    assert samples[("ponos_instances_live", ())] == 2
    assert samples[("ponos_instances_orphaned", ())] == 0  # both held by their tasks
    assert samples[("ponos_spend_dollars_per_hour", ())] == 0.75
    assert samples[("ponos_instances_destroyed_total", (("cause", "orphan"),))] == 2
    assert samples[("ponos_instances_destroyed_total", (("cause", "duplicate"),))] == 1
    assert samples[("ponos_last_sync_age_seconds", ())] == 17.0
    assert samples[("ponos_snapshot_age_seconds", ())] == 15.0
    # active tasks' attempts: accepted 0, loading 1, running 2 (the done one is left out)
    assert samples[("ponos_task_attempts_count", ())] == 3
    assert samples[("ponos_task_attempts_sum", ())] == 3
    buckets = {
        dict(labels)["le"]: value
        for (name, labels), value in samples.items()
        if name == "ponos_task_attempts_bucket"
    }
    assert buckets == {
        "0.0": 1,
        "1.0": 2,
        "2.0": 3,
        "3.0": 3,
        "4.0": 3,
        "5.0": 3,
        "10.0": 3,
        "+Inf": 3,
    }


def test_metrics_follow_redis_on_each_scrape(redis_client, key_prefix, endpoint):
    samples = scrape(endpoint)
    assert samples[("ponos_instances_live", ())] == 0
    assert samples[("ponos_spend_dollars_per_hour", ())] == 0
    assert math.isinf(samples[("ponos_last_sync_age_seconds", ())])
    assert math.isinf(samples[("ponos_snapshot_age_seconds", ())])
    assert samples[("ponos_task_attempts_count", ())] == 0
    assert not any(name == "ponos_instances_destroyed_total" for name, _ in samples)
    store = TaskStore(redis_client, Keyspace(key_prefix))
    store.mark_synced(NOW)
    store.count_destroyed("orphan", 1)
    samples = scrape(endpoint)
    assert samples[("ponos_last_sync_age_seconds", ())] == 10.0
    assert samples[("ponos_instances_destroyed_total", (("cause", "orphan"),))] == 1


def test_metrics_when_redis_is_down():
    client = redis.Redis.from_url(f"redis://127.0.0.1:{free_port()}/0", socket_connect_timeout=1)
    server, thread = serve_metrics(client, "ponos:", host="127.0.0.1", port=0)
    try:
        samples = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert samples == {("ponos_redis_up", ()): 0}


def test_metrics_command_serves_in_the_foreground(redis_client, redis_url, key_prefix):
    populate(redis_client, key_prefix, time.time())
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "metrics",
            "--redis-url",
            redis_url,
            "--prefix",
            key_prefix,
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        line = proc.stderr.readline()  # printed once the server listens
        assert line.startswith("Serving metrics on http://127.0.0.1:"), line
        url = line.split()[3]
        samples = scrape(url)
        assert samples[("ponos_instances_live", ())] == 2
        assert samples[("ponos_tasks", (("phase", "running"),))] == 1
        assert proc.poll() is None  # still serving
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_metrics_help_points_to_flower():
    proc = subprocess.run(
        [sys.executable, "-m", "ponos_tasks.cli", "metrics", "--help"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0
    assert "Flower" in proc.stdout and "ponos_spend_dollars_per_hour" in proc.stdout


def test_an_instance_no_active_task_holds_is_orphaned():
    """Held: an active task's instance, and the stopped instance a retrying task keeps until
    its next attempt. Orphaned: a live instance of a finished task, or of no known task."""
    stopped = dict(
        running_instance(7, "ponos-0123abcd-t-retry-1", "A", 0.1), actual_status="exited"
    )
    stopped["intended_status"] = "stopped"
    instances = [
        Instance.from_dict(running_instance(5, "ponos-0123abcd-t-run-1", "A", 0.1)),
        Instance.from_dict(stopped),
        Instance.from_dict(running_instance(8, "ponos-0123abcd-t-done-1", "A", 0.1)),
        Instance.from_dict(running_instance(9, "ponos-0123abcd-t-unknown-1", "A", 0.1)),
        Instance.from_dict(dict(running_instance(10, "x", "A", 0.1), actual_status="destroyed")),
    ]
    records = {
        "t-run": TaskRecord("t-run", phase="running", attempt=1, instance_id=5),
        "t-retry": TaskRecord("t-retry", phase="retrying", attempt=1, kept_instance_id=7),
        "t-done": TaskRecord("t-done", phase="done", attempt=1, instance_id=8),
    }
    state = AgentState(NOW, records, instances, NOW, NOW)
    assert [i.id for i in state.orphaned_instances] == [8, 9]


def test_spend_metrics_follow_the_budget_meter(redis_client, key_prefix):
    """The meter's passes add to the day, the task and the all-time counter; the endpoint
    exports them, and the day's headroom when it has the limits."""
    from ponos_tasks.budget import MeterPass, headroom, utc_day
    from ponos_tasks.config import AgentConfig
    from ponos_tasks.settings import Settings
    from ponos_tasks.state import BudgetStore

    keys = Keyspace(key_prefix)
    store = BudgetStore(redis_client, keys, TaskStore(redis_client, keys))
    day = utc_day(NOW + 10)
    for amount in (0.25, 0.5):
        result = store.apply_meter(lambda meter, a=amount: MeterPass({}, [], {day: a}, {"t": a}))
        assert result is not None
    config = AgentConfig.model_validate(
        {
            "url": "http://127.0.0.1:9",
            "farm_id": "00000000-0000-4000-8000-000000000000",
            "seed": "s",
            "vast_api": {"api_key": "k"},
            "budget": {"max_spend_per_day": 2.0},
        }
    )
    settings = Settings.from_config(config)
    server, thread = serve_metrics(
        redis_client, key_prefix, host="127.0.0.1", port=0, now=lambda: NOW + 10, settings=settings
    )
    try:
        samples = scrape(f"http://127.0.0.1:{server.server_port}/metrics")
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
    assert samples[("ponos_spend_dollars_total", ())] == pytest.approx(0.75)
    assert samples[("ponos_spend_today_dollars", ())] == pytest.approx(0.75)
    left = samples[("ponos_budget_headroom_dollars", (("limit", "max_spend_per_day"),))]
    assert left == pytest.approx(headroom(settings, store, NOW + 10).day_left)
    assert left <= 2.0 - 0.75 + 1e-9


@pytest.mark.stack
def test_a_steps_backlog_shows_its_length_and_the_age_of_its_oldest_message(tmp_path):
    """Celery's queues are plain lists in the agent's Redis (a private one here: a shared
    Redis may hold a real agent's): the gauges read their length and the send time that
    every chain message carries."""
    from celery import Celery

    from ponos_tasks.models import SENT_AT_HEADER
    from ponos_tasks.simulators.stack import RedisProcess

    server = RedisProcess(tmp_path).start()
    client = redis.Redis.from_url(server.url)
    metrics, thread = serve_metrics(client, "m:", host="127.0.0.1", port=0, now=lambda: NOW)
    url = f"http://127.0.0.1:{metrics.server_port}/metrics"
    try:
        samples = scrape(url)
        assert samples[("ponos_queue_messages", (("queue", "steps"),))] == 0
        assert samples[("ponos_steps_queue_oldest_age_seconds", ())] == 0
        producer = Celery("metrics-test", broker=server.url, set_as_current=False)
        producer.conf.broker_transport = "ponos_tasks.broker:Transport"
        for sent_at in (NOW - 40, NOW - 5):
            producer.send_task(
                "ponos.watch", args=("t",), queue="steps", headers={SENT_AT_HEADER: sent_at}
            )
        samples = scrape(url)
        assert samples[("ponos_queue_messages", (("queue", "steps"),))] == 2
        assert samples[("ponos_queue_messages", (("queue", "sync"),))] == 0
        assert samples[("ponos_steps_queue_oldest_age_seconds", ())] == 40.0
    finally:
        metrics.shutdown()
        metrics.server_close()
        thread.join(timeout=5)
        server.stop()
