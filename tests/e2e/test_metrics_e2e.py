"""The Prometheus endpoint during and after a real run (worker, beat and Flower processes, the
local stack with scripted Vast.ai instances), checked against what the simulators counted:
the call and 429 counters against their request counts per endpoint, the histograms against
the tasks that ran (Arkindex's histories, Vast.ai's ledger). And Flower's view of the same run:
every task under its step's name, with the Arkindex task's id as its argument.

Scripted instances (not `local` ones): a real wrapper stops its own instance through the
Vast.ai API with the instance's key, a call the simulator counts and the agent does not make.
"""

from __future__ import annotations

import re
import time

import pytest
import redis
import requests
from prometheus_client.parser import text_string_to_metric_families

from ponos_tasks.lifecycle import parse_label
from ponos_tasks.metrics import serve_metrics
from ponos_tasks.simulators.harness import LocalRun
from ponos_tasks.steps import STEPS
from tests.conftest import free_port
from tests.e2e.helpers import TERMINAL

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(300)]

TIME_SCALE = 40.0
MARKET = {95_000 + i: round(0.12 + 0.02 * i, 2) for i in range(8)}
IMAGE = "registry.example/ponos/metrics-worker:1"


def scripted(code: int = 0, seconds: float = 120) -> dict[str, str]:
    """A scripted instance that behaves like the wrapper: runs `seconds` simulated seconds,
    prints the marker, stops itself."""
    return {
        "SIM_DURATION": f"{seconds:g}",
        "SIM_PULL_SECONDS": "20",
        "SIM_LOG_LINES": "3",
        "SIM_SELF_STOP": "true",
        "SIM_FINAL_LINES": f"PONOS_EXIT_CODE={code}",
    }


def scrape(url: str) -> dict[tuple[str, tuple], float]:
    response = requests.get(url, timeout=10)
    response.raise_for_status()
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(response.text)
        for sample in family.samples
    }


def per_endpoint(samples, metric: str, api: str) -> dict[str, int]:
    return {
        dict(labels)["endpoint"]: int(value)
        for (name, labels), value in samples.items()
        if name == metric and dict(labels)["api"] == api
    }


def wait_until(condition, timeout: float, what: str, run: LocalRun) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert not run.check_alive(), run.check_alive()
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.3)


@pytest.fixture
def run(tmp_path):
    run = LocalRun(
        time_scale=TIME_SCALE,
        vast_run_mode="scripted",
        vast_options={"churn": False},
        workdir=tmp_path,
    ).start()
    yield run
    run.stop(agent_timeout=20)


def test_metrics_during_a_run_match_the_simulators_counts(run):
    sim = run.admin
    sim.set_market(MARKET)
    config = run.agent_config(
        sync_interval=0.5,
        logs_interval=2,
        vast_api={"loading_deadline": 8, "rate_limit_scale": 1 / TIME_SCALE, "max_instances": 4},
    )
    agent = run.start_agent(run.write_config(config), flower_port=free_port())
    tasks = [
        {"slug": "ok-1", "env": scripted(0)},
        {"slug": "ok-2", "env": scripted(0, seconds=200)},
        {"slug": "fails", "env": scripted(3)},
        {"slug": "oci", "env": scripted(0)},  # its first instance fails to start
        {"slug": "ok-3", "env": scripted(0, seconds=80)},
    ]
    ids = sim.process(
        "metrics", [{"image": IMAGE, "command": "python -m worker", **task} for task in tasks]
    )
    sim.faults(
        {"fault": "oci_failure", "label": f"-{ids['oci']}-1$", "times": 1},
        {"fault": "rate_limit", "endpoint": "list", "times": 3, "retry_after": None},
    )
    sim.arkindex_rate_limit(retry_after=1, operation="RetrieveAgentActions", times=2)

    client = redis.Redis.from_url(run.redis_url)
    server, thread = serve_metrics(client, host="127.0.0.1", port=0)
    url = f"http://127.0.0.1:{server.server_port}/metrics"
    try:
        # During the run: the endpoint follows the workers' records and counters.
        wait_until(
            lambda: any(t["state"] == "running" for t in sim.tasks().values()),
            120,
            "a task running",
            run,
        )
        during = scrape(url)
        assert during[("ponos_redis_up", ())] == 1
        assert per_endpoint(during, "ponos_api_calls_total", "vast").get("create", 0) >= 1
        assert per_endpoint(during, "ponos_api_calls_total", "arkindex")["RetrieveAgentActions"]
        active = sum(
            value
            for (name, labels), value in during.items()
            if name == "ponos_tasks" and dict(labels)["phase"] != "done"
        )
        assert active >= 1

        wait_until(
            lambda: (
                all(sim.task(i)["state"] in TERMINAL for i in ids.values())
                and sim.stats()["live_instances"] == 0
            ),
            180,
            "every task ended and every instance destroyed",
            run,
        )
        time.sleep(1.5)  # Flower's last events
        flower = agent.flower
        user, _, password = flower.credentials_file.read_text().strip().partition(":")
        flower_tasks = requests.get(
            flower.url + "api/tasks", auth=(user, password), timeout=30
        ).json()
        tasks_page = requests.get(flower.url + "tasks", auth=(user, password), timeout=30).text
        # Stopped (warm shutdown: running steps end): nothing more is sent, so the agent's
        # counters and the simulators' can be compared exactly.
        agent.stop(timeout=30)
        after = scrape(url)
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)
        client.close()

    states = {slug: sim.task(task_id)["state"] for slug, task_id in ids.items()}
    assert states == {
        "ok-1": "completed",
        "ok-2": "completed",
        "fails": "failed",
        "oci": "completed",
        "ok-3": "completed",
    }

    # Calls and 429s: exactly what the simulators received, endpoint by endpoint.
    vast = sim.stats()
    assert per_endpoint(after, "ponos_api_calls_total", "vast") == vast["calls"]
    assert per_endpoint(after, "ponos_api_rate_limited_total", "vast") == vast["rate_limited"]
    assert vast["rate_limited"]["list"] >= 3  # the injected ones, at least
    arkindex = sim.arkindex_stats()
    assert per_endpoint(after, "ponos_api_calls_total", "arkindex") == arkindex["calls"]
    assert (
        per_endpoint(after, "ponos_api_rate_limited_total", "arkindex")
        == arkindex["rate_limited"]
        == {"RetrieveAgentActions": 2}
    )
    # Each task's final log, at least, went to S3 (periodic uploads come on top).
    assert per_endpoint(after, "ponos_api_calls_total", "s3")["upload_logs"] >= len(ids)

    # Histograms against the tasks that ran.
    ran = [i for i in ids.values() if "running" in sim.accepted_agent_states(i)]
    assert len(ran) == len(ids)
    assert after[("ponos_task_pending_to_running_seconds_count", ())] == len(ran)
    ledger = [row for row in sim.ledger() if parse_label(row["label"]) is not None]
    assert len(ledger) == len(ids) + 1  # the failed start's instance
    assert all(row["destroyed_at"] is not None for row in ledger)
    # One end per task; the failed attempt's instance is not a task's end.
    assert after[("ponos_task_end_to_destroy_seconds_count", ())] == len(ids)
    assert 0 < after[("ponos_task_end_to_destroy_seconds_sum", ())] < 60 * len(ids)
    # Every search Vast.ai answered went through the filters once.
    searches = vast["calls"]["search"] - vast["rate_limited"].get("search", 0)
    assert after[("ponos_offers_matched_count", ())] == searches
    assert after[("ponos_offers_matched_bucket", (("le", "0.0"),))] == 0
    assert after[("ponos_start_failures_total", (("reason", "start_failed"),))] == 1
    assert after[("ponos_instances_orphaned", ())] == 0
    # Spend: the budget's meter against the Vast.ai ledger's bill of the same instances. The
    # meter counts in sync-sized steps and errs on the side of more (README, "Budgets").
    billed = sum(row["cost"] for row in ledger)
    metered = after[("ponos_spend_dollars_total", ())]
    print(f"spend: metered ${metered:.5f}, ledger ${billed:.5f}")
    assert billed > 0
    assert billed * 0.98 <= metered <= billed * 2.0

    # Flower: every Celery task under its step's name, with the Arkindex task id as argument.
    names = {STEPS[name].task_name for name in STEPS} | {"ponos.sync", "ponos.check_ended"}
    seen = set()
    for task in flower_tasks.values():
        assert task["name"] in names, task["name"]
        seen.add(task["name"])
        if task["name"] not in ("ponos.sync", "ponos.check_ended"):
            assert task["args"] in {f"('{task_id}',)" for task_id in ids.values()}, task
    assert {"ponos.sync", "ponos.create_instance", "ponos.watch", "ponos.destroy_instance"} <= seen
    # ... and its task list shows that argument next to the name (--tasks_columns).
    columns = re.findall(r'<th data-column="([a-z_-]+)"', tasks_page)
    assert columns[:3] == ["name", "args", "kwargs"], columns
