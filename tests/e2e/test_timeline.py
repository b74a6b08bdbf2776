"""End to end: a task's timeline (every decision the agent took for it, with times) in its
published log and in `ponos-vast status TASK_ID`, for a task whose first start fails, whose
second one pulls its image, runs, and is stopped by its user."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import pytest

from tests.e2e.helpers import TERMINAL, assert_terminal_once, wait_until
from tests.e2e.workloads import long_command

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

# One single-GPU machine per price: the first (cheapest) one fails the start.
MARKET = {91_000 + i: round(0.20 + 0.05 * i, 2) for i in range(4)}
# An image no host has cached: the second start pulls it (its progress is in the log).
PULLED_IMAGE = "registry.example.com/ponos/e2e-pulled:1"

# Each kind of entry, in the order it happens. `{n}` is the attempt.
KINDS = [
    ("accepted", r"task accepted by agent e2e-agent"),
    (
        "offers considered (1)",
        r"attempt 1: 4 offer\(s\) match the filters; lowest expected bill first: offer \d+"
        r" \$0\.\d+/h: pull ~",
    ),
    (
        "created (1), and why",
        r"attempt 1: created Vast\.ai instance \d+ from offer \d+ on machine"
        r" 91000 \(.*\$0\.\d+/h\): the lowest expected bill \[offer \d+ .*: expected"
        r" \$0\.\d+\]$",
    ),
    ("failed start", r"attempt 1 failed on machine 91000: .*; trying another machine"),
    ("failed instance gone", r"instance \d+ of the failed attempt destroyed"),
    (
        "offers considered (2)",
        r"attempt 2: 3 offer\(s\) match the filters \(left out: 1 on a "
        r"machine that failed a start\); lowest expected bill first",
    ),
    ("created (2)", r"attempt 2: created Vast\.ai instance \d+ from offer \d+ on machine 91001"),
    ("pull progress", r"instance \d+ starting: .*(Downloading|Extracting|Pulling)"),
    ("running", r"instance \d+ is running"),
    ("reported running", r"reported `running` to Arkindex"),
    ("stop", r"stop requested by Arkindex: stopping the task"),
    ("reported final", r"reported `stopped` to Arkindex"),
    ("destroyed", r"instance \d+ destroyed"),
]
AGENT_LINE = re.compile(r"^\[agent (\w+) (\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3})\] (.*)$")


def in_order(messages: list[str]) -> list[str]:
    """The kinds found one after the other in `messages` (stops at the first missing one)."""
    found, position = [], 0
    for name, pattern in KINDS:
        regex = re.compile(pattern)
        hit = next((i for i in range(position, len(messages)) if regex.search(messages[i])), None)
        if hit is None:
            break
        found.append(name)
        position = hit + 1
    return found


def test_timeline_of_a_failed_start_a_retry_and_a_stop(
    sim, agent_config, agent_processes, private_redis
):
    sim.set_market(MARKET)
    ids = sim.process(
        "timeline",
        [
            {
                "slug": "retried",
                "image": PULLED_IMAGE,
                "command": long_command("retried"),
                # About 2 real seconds of docker pull at the tests' time scale.
                "env": {"SIM_IMAGE_SIZE_GB": "1", "SIM_PULL_SECONDS": "80"},
                "parents": [],
                "requires_gpu": True,
            }
        ],
    )
    task_id = ids["retried"]
    sim.faults({"fault": "oci_failure", "label": f"-{task_id}-1$", "times": 1})
    agent = agent_processes(agent_config(max_instances=2, loading_deadline=10))

    stopped = []

    def ended():
        task = sim.tasks()[task_id]
        if not stopped and task["state"] == "running":
            sim.stop_task(task_id)  # the user stops it once it runs
            stopped.append(True)
        return task["state"] in TERMINAL and task

    task = wait_until(ended, timeout=150, what="the task to end", agent=agent)
    assert_terminal_once(task, "stopped")

    # The published log: the agent's lines first, then the instance's output. The last
    # lines (state reported, instance destroyed) are published once the instance is gone.
    # The failed attempt's instance is "destroyed" early in the log too: wait for the last
    # kind of entry after all the others, not for the word.
    def agent_lines_of(text):
        return [m for m in map(AGENT_LINE.match, text.splitlines()) if m]

    def published():
        text = sim.task_log(task_id) or ""
        messages = [m.group(3) for m in agent_lines_of(text)]
        return len(in_order(messages)) == len(KINDS) and text

    text = wait_until(
        published,
        timeout=30,
        what="the log's last lines",
        agent=agent,
        describe=lambda: sim.task_log(task_id) or "(no log published)",
    )
    agent_lines = agent_lines_of(text)
    messages = [m.group(3) for m in agent_lines]
    assert in_order(messages) == [name for name, _ in KINDS], "\n".join(messages)
    assert "retried: long job" in text  # the instance's own output follows
    times = [m.group(2) for m in agent_lines]
    assert times == sorted(times)

    # `status TASK_ID` (from Redis only) shows the same entries, with their times.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "status",
            task_id,
            "--redis-url",
            private_redis.url,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    assert doc["summary"]["phase"] == "done" and doc["summary"]["final_state"] == "stopped"
    assert doc["summary"]["attempt"] == 2
    timeline = doc["timeline"]
    assert in_order([e["message"] for e in timeline]) == [name for name, _ in KINDS]
    stamps = [e["t"] for e in timeline]
    assert stamps == sorted(stamps)
    # The published log is the same timeline (it went out before the last entries).
    assert messages == [e["message"] for e in timeline][: len(messages)]

    # The human view of the same task.
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "status",
            task_id[:8],
            "--redis-url",
            private_redis.url,
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert f"Task {task_id}" in proc.stdout and "stop requested by Arkindex" in proc.stdout
