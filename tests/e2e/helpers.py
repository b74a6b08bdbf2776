"""Helpers of the end-to-end tests: waiting with a useful failure message, and the invariants
every run must keep (computed from what the simulators recorded, never from the agent's own
view). The simulators' admin client is ponos_tasks.simulators.harness.SimAdmin."""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

from ponos_tasks.lifecycle import parse_label
from ponos_tasks.simulators.harness import SimAdmin

TERMINAL = {"completed", "failed", "error", "stopped", "cancelled"}


# ---------------------------------------------------------------------- waiting


# Routine lines (a sync tick every half second) that would drown the interesting ones.
_NOISE = (
    "ponos.sync[",
    "Sending due task ponos-sync",
    "ponos.check_ended[",
    "Sending due task ponos-check-ended",
)


def log_tails(log_dir: Path, lines: int = 60) -> str:
    """The last lines of each agent process log, without the routine sync ticks."""
    parts = []
    for path in sorted(log_dir.glob("*.log")):
        kept = [
            line
            for line in path.read_text(errors="replace").splitlines()
            if not any(noise in line for noise in _NOISE)
        ]
        tail = kept[-lines:]
        parts.append(f"----- {path.name} (last {len(tail)} lines)\n" + "\n".join(tail))
    return "\n".join(parts)


def wait_until(
    condition, *, timeout: float, what: str, agent=None, interval: float = 0.3, describe=None
):
    """Poll `condition()` until truthy; on timeout fail with `describe()` and the tails of
    the agent's logs. Also fails at once if an agent process died."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        dead = agent.check_alive() if agent is not None else []
        if dead or time.monotonic() > deadline:
            message = (
                f"agent processes exited: {dead}"
                if dead
                else f"timed out after {timeout:.0f} s waiting for {what}"
            )
            if describe is not None:
                message += "\n" + describe()
            if agent is not None:
                message += "\n" + log_tails(agent.log_dir)
            raise AssertionError(message)
        time.sleep(interval)


def wait_all_terminal(sim: SimAdmin, task_ids, *, timeout: float, agent=None) -> dict[str, dict]:
    """Wait until every task is in a terminal state on Arkindex; returns the tasks."""
    ids = set(task_ids)
    latest: dict[str, dict] = {}

    def done():
        latest.clear()
        latest.update({tid: t for tid, t in sim.tasks().items() if tid in ids})
        return all(t["state"] in TERMINAL for t in latest.values())

    def describe():
        waiting = sorted(
            f"{t['slug']}={t['state']}" for t in latest.values() if t["state"] not in TERMINAL
        )
        return f"not terminal yet: {', '.join(waiting)}"

    wait_until(
        done, timeout=timeout, what="every task to be terminal", agent=agent, describe=describe
    )
    return dict(latest)


def wait_no_live_instance(sim: SimAdmin, *, timeout: float = 10.0, agent=None) -> None:
    wait_until(
        lambda: sim.stats()["live_instances"] == 0,
        timeout=timeout,
        what="no live Vast.ai instance",
        agent=agent,
        describe=lambda: (
            "live: "
            + ", ".join(str(row["label"]) for row in sim.ledger() if row["destroyed_at"] is None)
        ),
    )


# ---------------------------------------------------------------------- invariants


def agent_updates(task: dict) -> list[dict]:
    return [h for h in task["history"] if h.get("source") == "agent"]


def assert_terminal_once(task: dict, expected: str) -> None:
    """The task ended in `expected`, reached by exactly one accepted terminal update and no
    refused update at all (a refused one would mean a repeated or out-of-order report)."""
    updates = agent_updates(task)
    refused = [h for h in updates if not h["accepted"]]
    assert not refused, f"{task['slug']}: Arkindex refused updates {refused}"
    terminal = [h for h in task["history"] if h["accepted"] and h["to"] in TERMINAL]
    assert len(terminal) == 1, f"{task['slug']}: terminal updates {terminal}"
    assert task["state"] == expected, (
        f"{task['slug']}: ended {task['state']}, expected {expected}; history {task['history']}"
    )


def instances_by_task(ledger: list[dict]) -> dict[str, list[dict]]:
    rows: dict[str, list[dict]] = defaultdict(list)
    for row in ledger:
        info = parse_label(row["label"])
        assert info is not None, f"instance {row['id']} has a non-ponos label {row['label']!r}"
        rows[info.task_id].append(row)
    return rows


def assert_no_instance_left(sim: SimAdmin, agent=None) -> list[dict]:
    wait_no_live_instance(sim, agent=agent)
    ledger = sim.ledger()
    left = [row for row in ledger if row["destroyed_at"] is None]
    assert not left, f"instances not destroyed: {left}"
    assert sim.stats()["live_instances"] == 0
    return ledger


def max_live_per_task(events: list[dict]) -> dict[str, int]:
    """Most instances alive at once per task id, from the created/destroyed timeline."""
    live: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    for event in sorted(
        (e for e in events if e["event"] in ("created", "destroyed")),
        key=lambda e: (e["t"], e["event"] == "created"),
    ):
        info = parse_label(event["label"])
        assert info is not None, f"event for a non-ponos label: {event}"
        live[info.task_id] += 1 if event["event"] == "created" else -1
        peak[info.task_id] = max(peak[info.task_id], live[info.task_id])
    return dict(peak)


def assert_one_instance_per_attempt(ledger: list[dict]) -> None:
    labels = defaultdict(list)
    for row in ledger:
        labels[row["label"]].append(row["id"])
    duplicated = {label: ids for label, ids in labels.items() if len(ids) > 1}
    assert not duplicated, f"several instances for one attempt: {duplicated}"


def cheapest_violations(
    events: list[dict],
    ledger: list[dict],
    prices: dict[int, float],
    *,
    vanished: set[int],
    slack: float,
) -> list[str]:
    """Instances created while a strictly cheaper, usable machine was free.

    The market is ours (one single-GPU machine per price, no churn), so which machines were
    free at any moment follows from the created/destroyed events. A machine counts as a
    cheaper alternative to an instance created at t only if it was free during the whole
    [t - slack, t] (the agent searched a moment before it created: a machine released in
    that moment may not have been in its search, one rented by a concurrent create in that
    moment was legitimately lost), is not among the machines where a start failed before
    (every task avoids those for a while), and did not vanish (offer_vanished fault).
    """
    busy: dict[int, list[tuple[float, float]]] = defaultdict(list)
    rows = {row["id"]: row for row in ledger}
    created_at = {e["instance_id"]: e["t"] for e in events if e["event"] == "created"}
    destroyed_at = {e["instance_id"]: e["t"] for e in events if e["event"] == "destroyed"}
    for instance_id, start in created_at.items():
        busy[rows[instance_id]["machine_id"]].append(
            (start, destroyed_at.get(instance_id, float("inf")))
        )

    def free_during(machine_id: int, start: float, end: float) -> bool:
        return all(b_end <= start or b_start >= end for b_start, b_end in busy[machine_id])

    by_task = instances_by_task(ledger)
    # A start that failed (its task went on to another attempt) makes every task avoid that
    # machine for machine_cooldown (an hour: longer than any test run).
    failed_starts = [
        (created_at.get(r["id"], float("inf")), r["machine_id"])
        for task_rows in by_task.values()
        for r in task_rows
        if any(parse_label(o["label"]).attempt > parse_label(r["label"]).attempt for o in task_rows)
    ]
    problems = []
    for instance_id, t in sorted(created_at.items(), key=lambda item: item[1]):
        row = rows[instance_id]
        failed_before = {machine for started, machine in failed_starts if started < t}
        chosen = prices[row["machine_id"]]
        cheaper = [
            m
            for m, price in prices.items()
            if price < chosen
            and m not in failed_before
            and m not in vanished
            and free_during(m, t - slack, t)
        ]
        if cheaper:
            problems.append(
                f"{row['label']} on machine {row['machine_id']} (${chosen}/h) "
                f"while cheaper machines were free: "
                f"{[(m, prices[m]) for m in cheaper]}"
            )
    return problems
