"""Process-kill tests: the agent loses processes, or all its processes and its
Redis, in the middle of a workload, and still finishes every task exactly once without
leaking or duplicating an instance."""

from __future__ import annotations

import time

import pytest

from tests.e2e.helpers import (
    assert_no_instance_left,
    assert_one_instance_per_attempt,
    assert_terminal_once,
    instances_by_task,
    max_live_per_task,
    wait_all_terminal,
    wait_until,
)
from tests.e2e.workloads import Spec, admin_tasks, command

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(180)]

MARKET = {91_000 + i: round(0.12 + 0.02 * i, 2) for i in range(10)}


def _workload(sim, name: str, n: int, seconds: float) -> dict[str, str]:
    specs = [Spec(f"{name}{i}", command(f"{name}{i}", seconds)) for i in range(n)]
    return sim.process(name, admin_tasks(name, specs))


def _running(sim, ids) -> int:
    tasks = sim.tasks()
    return sum(tasks[tid]["state"] == "running" for tid in ids)


def _check_finished(sim, ids, agent, tasks) -> None:
    for task_id in ids:
        assert_terminal_once(tasks[task_id], "completed")
    ledger = assert_no_instance_left(sim, agent=agent)
    assert_one_instance_per_attempt(ledger)
    assert max(max_live_per_task(sim.events()).values()) == 1
    assert max(sim.stats()["max_live_per_label"].values()) == 1
    by_task = instances_by_task(ledger)
    assert set(by_task) <= set(ids)
    for task_id in ids:
        text = sim.task_log(task_id)
        assert text and "PONOS_EXIT_CODE=0" in text, f"{task_id}: log {text!r}"


@pytest.mark.xfail(
    strict=False,
    reason="agent defect (§2, unknown read as gone): a new instance missing from Vast.ai's "
    "reads during its read lag is judged 'disappeared before the task ran', destroyed and "
    "rented again (random: see test_steps::test_read_lag_after_create_is_not_a_vanished_instance)",
)
def test_restart_after_losing_every_process_and_redis(
    private_redis, sim, agent_config, agent_processes
):
    """SIGKILL the worker and beat (with their pool children) while instances run, lose
    Redis (killed, restarted empty: no persistence), start the agent again with the same
    configuration: it registers as the same agent (stable identity), finds its instances by
    their labels, re-adopts them and finishes the work."""
    sim.set_market(MARKET)
    ids = list(_workload(sim, "r", 8, 3.0).values())
    config = agent_config(max_instances=4)
    first = agent_processes(config)
    wait_until(
        lambda: _running(sim, ids) >= 3,
        timeout=60,
        agent=first,
        what="three tasks running before the crash",
    )
    live_before = sim.stats()["live_instances"]
    for name in list(first.processes):
        first.kill(name)
    private_redis.restart_empty()
    started = time.monotonic()
    second = agent_processes(config)
    tasks = wait_all_terminal(sim, ids, timeout=120, agent=second)
    print(
        f"restart: {live_before} live instances at the crash; "
        f"all terminal {time.monotonic() - started:.1f} s after the restart"
    )
    assert live_before >= 3
    _check_finished(sim, ids, second, tasks)
    # The instances alive at the crash were adopted, not replaced: one per task.
    by_task = instances_by_task(sim.ledger())
    assert {tid: len(rows) for tid, rows in by_task.items()} == {tid: 1 for tid in ids}
    assert not second.check_alive(), "an agent process died during the run"


def test_worker_killed_mid_run(sim, agent_config, agent_processes):
    """SIGKILL one of two workers (and its pool) while every task's instance runs: its
    messages (watch, logs steps) are not redelivered before the visibility timeout, so the
    other worker and the sync loop (stale heartbeats -> resumed steps) must finish the work.

    The kill comes once every instance exists: a worker killed inside a create step leaves
    that task's create lock held until the lock's timeout (180 s, steps.create), which this
    test does not wait for (see the report)."""
    sim.set_market(MARKET)
    ids = list(_workload(sim, "k", 6, 4.0).values())
    agent = agent_processes(agent_config(max_instances=6), workers=2, concurrency=2)
    wait_until(
        lambda: _running(sim, ids) == len(ids),
        timeout=60,
        agent=agent,
        what="every task running before the kill",
    )
    agent.kill("worker1")
    del agent.processes["worker1"]  # killed on purpose: check_alive must not report it
    started = time.monotonic()
    tasks = wait_all_terminal(sim, ids, timeout=90, agent=agent)
    print(f"worker kill: all terminal {time.monotonic() - started:.1f} s after the kill")
    _check_finished(sim, ids, agent, tasks)
