"""End to end: the budget's limits hold against workloads that would pass each of them.

Real worker and beat processes, the local stack (its Vast.ai simulator bills on its clock,
TIME_SCALE times the agent's: the config's budget.billing_time_scale says so). Every check
is computed from what the simulators recorded: the Vast.ai ledger (cost per instance) and
event timeline (created, destroyed), Arkindex's task histories, assignments and published
logs; the agent's own Redis only for what `ponos-vast status` shows.
"""

from __future__ import annotations

import time
from datetime import UTC, datetime

import pytest
import redis

from ponos_tasks.budget import seconds_to_midnight, status_figures
from ponos_tasks.config import load_config
from ponos_tasks.lifecycle import parse_label
from ponos_tasks.settings import Settings
from ponos_tasks.state import BudgetStore, Keyspace, TaskStore
from tests.e2e.helpers import (
    TERMINAL,
    assert_no_instance_left,
    assert_terminal_once,
    instances_by_task,
    wait_all_terminal,
    wait_until,
)
from tests.e2e.workloads import Spec, admin_tasks, command, long_command

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]


def fleet_timeline(events: list[dict], ledger: list[dict]) -> list[tuple[float, int, float]]:
    """(time, live instances, their $/h together) after each create or destroy, from the
    Vast.ai simulator's events (a destroy first at equal times)."""
    price = {row["id"]: row["dph_total"] for row in ledger}
    live: dict[int, float] = {}
    timeline = []
    for event in sorted(
        (e for e in events if e["event"] in ("created", "destroyed")),
        key=lambda e: (e["t"], e["event"] == "created"),
    ):
        assert parse_label(event["label"]) is not None, event
        if event["event"] == "created":
            live[event["instance_id"]] = price[event["instance_id"]]
        else:
            live.pop(event["instance_id"], None)
        timeline.append((event["t"], len(live), sum(live.values())))
    return timeline


def short_tasks(prefix: str, count: int, seconds: float) -> list[Spec]:
    return [Spec(f"{prefix}-{i}", command(f"{prefix}-{i}", seconds=seconds)) for i in range(count)]


def test_max_instances_caps_the_fleet_and_what_is_asked_of_arkindex(
    sim, agent_config, agent_processes
):
    """8 tasks, budget.max_instances 2: never more than 2 instances alive (Vast.ai's
    timeline), never more than 2 unfinished tasks taken from Arkindex (the actions call's
    capacity), every task completed in the end."""
    sim.set_market({90_000 + i: round(0.10 + 0.02 * i, 2) for i in range(10)})
    specs = short_tasks("cap", 8, seconds=2)
    ids = sim.process("cap", admin_tasks("cap", specs))
    agent = agent_processes(agent_config(max_instances=2))
    taken_most = 0

    def done():
        nonlocal taken_most
        tasks = sim.tasks()
        taken = [t for t in tasks.values() if t["agent_id"] and t["state"] not in TERMINAL]
        taken_most = max(taken_most, len(taken))
        return all(t["state"] in TERMINAL for t in tasks.values())

    wait_until(done, timeout=150, what="8 tasks terminal", agent=agent, interval=0.1)
    tasks = sim.tasks()
    for task_id in ids.values():
        assert_terminal_once(tasks[task_id], "completed")
    ledger = assert_no_instance_left(sim, agent)
    peak = max(live for _, live, _ in fleet_timeline(sim.events(), ledger))
    assert peak == 2, f"peak of live instances {peak}"
    assert taken_most <= 2, f"{taken_most} unfinished tasks taken from Arkindex at once"


def test_max_dph_total_and_max_dph_per_instance(sim, private_redis, agent_config, agent_processes):
    """6 tasks on a market whose dearer machines pass max_dph_per_instance ($0.6/h) and
    whose cheaper ones fit two at a time under max_dph_total ($0.7/h): no instance above
    $0.6/h, never more than $0.7/h alive together, two at once (the limit does not starve
    the farm); meanwhile the other tasks are not taken from Arkindex, and `status` names
    max_dph_total as what holds new instances."""
    market = {91_000: 0.30, 91_001: 0.32, 91_002: 0.34, 91_003: 0.36, 91_004: 0.9, 91_005: 1.2}
    sim.set_market(market)
    specs = short_tasks("dph", 6, seconds=4)
    ids = sim.process("dph", admin_tasks("dph", specs))
    agent = agent_processes(agent_config(max_dph_per_instance=0.6, max_dph_total=0.7))
    settings = Settings.from_config(load_config(str(agent.config_path)))
    held_seen: set[str | None] = set()
    taken_most = 0

    def done():
        nonlocal taken_most
        tasks = sim.tasks()
        taken = [t for t in tasks.values() if t["agent_id"] and t["state"] not in TERMINAL]
        taken_most = max(taken_most, len(taken))
        held_seen.add(budget_figures(private_redis.url, settings)["headroom"]["held_by"])
        return all(t["state"] in TERMINAL for t in tasks.values())

    wait_until(done, timeout=150, what="6 tasks terminal", agent=agent, interval=0.1)
    tasks = sim.tasks()
    for task_id in ids.values():
        assert_terminal_once(tasks[task_id], "completed")
    ledger = assert_no_instance_left(sim, agent)
    assert max(row["dph_total"] for row in ledger) <= 0.6
    timeline = fleet_timeline(sim.events(), ledger)
    assert max(dph for _, _, dph in timeline) <= 0.7 + 1e-9, timeline
    assert max(live for _, live, _ in timeline) == 2, timeline
    assert taken_most <= 3, taken_most  # two running, at most one more being started
    assert "max_dph_total" in held_seen, held_seen


def budget_figures(redis_url: str, settings: Settings) -> dict:
    """The budget part of `ponos-vast status --json` (the agent's Redis, default prefix)."""
    client = redis.Redis.from_url(redis_url)
    try:
        keys = Keyspace()
        return status_figures(
            BudgetStore(client, keys, TaskStore(client, keys)), time.time(), settings
        )
    finally:
        client.close()


def test_max_spend_per_task_ends_the_task_in_error_with_the_reason(
    sim, agent_config, agent_processes
):
    """A task that would run two minutes at about $1/h (its bill: ~$1.3 on the simulator's
    clock) under max_spend_per_task $0.3: it ends `error`, its instance stopped and
    destroyed, the reason in its published log, its bill within $0.3; a short task beside
    it completes."""
    sim.set_market({92_000: 0.99, 92_001: 1.0})
    specs = [
        Spec("spend-long", long_command("spend-long", seconds=240), expect="error"),
        Spec("spend-short", command("spend-short", seconds=1)),
    ]
    ids = sim.process("spend", admin_tasks("spend", specs))
    agent = agent_processes(agent_config(max_spend_per_task=0.3))
    tasks = wait_all_terminal(sim, ids.values(), timeout=150, agent=agent)
    assert_terminal_once(tasks[ids["spend-long"]], "error")
    assert_terminal_once(tasks[ids["spend-short"]], "completed")
    ledger = assert_no_instance_left(sim, agent)
    cost = {slug: sum(r["cost"] for r in instances_by_task(ledger)[ids[slug]]) for slug in ids}
    assert 0.1 < cost["spend-long"] <= 0.3, cost  # ended near its cap, never past it
    print(f"the long task cost ${cost['spend-long']:.4f} (limit $0.3)")
    log = sim.task_log(ids["spend-long"])
    assert "it reached its spending limit (max_spend_per_task $0.3)" in log, log
    assert "stopping its instance; the task ends in error" in log
    assert "spend-long: long job" in log  # its own output was published


@pytest.mark.skipif(
    seconds_to_midnight(time.time()) < 600,
    reason="too close to midnight UTC: the day's budget would be two days' budgets",
)
def test_max_spend_per_day_is_never_passed_and_nothing_is_refused(
    sim, private_redis, agent_config, agent_processes
):
    """6 tasks of about $0.14 each (12 s at ~$1/h on the simulator's clock) under
    max_spend_per_day $0.9 and max_spend_per_task $0.4: a task starts only when the day can
    afford its whole cap, so some start and the others are never taken from Arkindex
    (still `pending`, unassigned: nothing refused), while `status` says the day's budget
    holds new instances. The day's bill (the ledger) stays within $0.9."""
    sim.set_market({93_000: 0.99, 93_001: 1.0, 93_002: 1.01})
    specs = short_tasks("day", 6, seconds=12)
    ids = sim.process("day", admin_tasks("day", specs))
    day = datetime.now(UTC).date()
    agent = agent_processes(agent_config(max_spend_per_day=0.9, max_spend_per_task=0.4))
    config = agent.config_path

    quiet_since: list[float] = []

    def settled():
        """Nothing alive, nothing taken from Arkindex unfinished, for 4 s (8 syncs): what
        remains waits for the next day."""
        tasks = [sim.tasks()[t] for t in ids.values()]
        waiting = [t for t in tasks if t["state"] not in TERMINAL]
        quiet = (
            sim.stats()["live_instances"] == 0
            and all(t["state"] == "pending" and t["agent_id"] is None for t in waiting)
            and len(waiting) < len(tasks)
        )
        if not quiet:
            quiet_since.clear()
            return False
        quiet_since[:1] = quiet_since[:1] or [time.monotonic()]
        return time.monotonic() - quiet_since[0] >= 4.0

    wait_until(settled, timeout=180, what="the day's budget spent", agent=agent, interval=0.2)
    tasks = sim.tasks()
    finished = [tasks[t] for t in ids.values() if tasks[t]["state"] in TERMINAL]
    for task in finished:
        assert_terminal_once(task, "completed")
    waiting = [tasks[t] for t in ids.values() if tasks[t]["state"] not in TERMINAL]
    assert waiting and all(t["state"] == "pending" and t["agent_id"] is None for t in waiting)
    ledger = sim.ledger()
    assert datetime.now(UTC).date() == day
    total = sum(row["cost"] for row in ledger)
    assert total <= 0.9, f"the day cost ${total:.4f}"
    print(f"{len(finished)} of 6 tasks ran; the day cost ${total:.4f} (limit $0.9)")
    # What `status` says: today's spend as metered (never less than the bill), and why no
    # new instance starts.
    figures = budget_figures(private_redis.url, Settings.from_config(load_config(str(config))))
    assert total - 1e-6 <= figures["spent_today"] <= 0.9 + 1e-6, (figures, total)
    assert figures["headroom"]["held_by"] == "max_spend_per_day", figures
