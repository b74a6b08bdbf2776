"""`ponos-vast demo` / `run` and the sample workload.

The demo test is a real end-to-end run (private Redis, local stack, real worker, beat and
Flower processes, instances running real `sh` commands) checked only through its --json
document, whose figures come from the simulators.
"""

import json
import os
import shlex
import subprocess
import sys
from collections import Counter

import pytest

from ponos_tasks.demo import summarize
from ponos_tasks.workload import build_workload

TERMINAL = {"completed", "failed", "error", "stopped"}


def cli(*args, env=None, timeout=180):
    return subprocess.run([sys.executable, "-m", "ponos_tasks.cli", *args], env=env,
                          capture_output=True, text=True, timeout=timeout)


def test_workload_shape():
    processes = build_workload(20, seed=0)
    tasks = [(p.name, t) for p in processes for t in p.tasks]
    assert len(tasks) == 20
    assert 3 <= len(processes) <= 5
    assert all(len(p.tasks) <= 5 for p in processes)
    assert Counter(t.expect for _, t in tasks) == {"completed": 17, "failed": 2, "stopped": 1}
    for process in processes:
        slugs = [t.slug for t in process.tasks]
        assert len(set(slugs)) == len(slugs)
        assert process.tasks[0].parents == ()
        with_children = {parent for t in process.tasks for parent in t.parents}
        for index, task in enumerate(process.tasks):
            assert set(task.parents) <= set(slugs[:index])  # a DAG: parents come first
            if task.expect != "completed":
                # Arkindex never schedules the children of a task that did not complete.
                assert task.slug not in with_children
        spec = process.admin_json()
        assert [t["slug"] for t in spec["tasks"]] == slugs
        assert all(t["requires_gpu"] and shlex.split(t["command"])[:2] == ["sh", "-c"]
                   for t in spec["tasks"])
    assert any(t.parents for _, t in tasks)
    assert build_workload(20, seed=0) == processes
    assert build_workload(20, seed=1) != processes


def test_workload_commands_end_as_expected():
    processes = build_workload(4, seed=3, min_duration=0.1, max_duration=0.2)
    for task in (t for p in processes for t in p.tasks if t.expect != "stopped"):
        result = subprocess.run(shlex.split(task.command), capture_output=True, timeout=10)
        assert result.returncode == task.exit_code
        assert (result.returncode == 0) == (task.expect == "completed")


def test_summarize_counts_attempts_cost_and_live_peak():
    tasks = [{"id": "t1", "slug": "a", "state": "completed", "history": [
                {"t": 10.0, "to": "running", "accepted": True},
                {"t": 14.5, "to": "completed", "accepted": True}]},
             {"id": "t2", "slug": "b", "state": "failed", "history": []}]
    ledger = {"instances": [
        {"label": "ponos-0123abcd-t1-1", "gpu_name": "A", "dph_total": 0.1, "cost": 0.5},
        {"label": "ponos-0123abcd-t1-2", "gpu_name": "B", "dph_total": 0.2, "cost": 0.25},
        {"label": "someone-else", "gpu_name": "C", "dph_total": 9.0, "cost": 9.0}],
        "total_cost": 9.75}
    events = [{"t": 1, "event": "created", "label": "ponos-0123abcd-t1-1"},
              {"t": 2, "event": "created", "label": "ponos-0123abcd-t1-2"},
              {"t": 3, "event": "destroyed", "label": "ponos-0123abcd-t1-1"},
              {"t": 4, "event": "destroyed", "label": "ponos-0123abcd-t1-2"}]
    stats = {"calls": {"create": 2, "list": 5}, "rate_limited": {"list": 1},
             "live_instances": 0}
    doc = summarize(tasks, {"t1": "completed", "t2": "completed"}, ledger, events, stats)
    first, second = doc["tasks"]
    assert (first["attempts"], first["gpu_name"], first["dph_total"], first["cost"],
            first["runtime_s"]) == (2, "B", 0.2, 0.75, 4.5)
    assert (second["attempts"], second["cost"], second["runtime_s"]) == (0, 0.0, None)
    totals = doc["totals"]
    assert totals["max_live_instances_per_task"] == 2
    assert (totals["completed"], totals["failed"], totals["unexpected"]) == (1, 1, 1)
    assert (totals["api_calls"], totals["rate_limited"], totals["cost"]) == (7, 1, 9.75)


def test_run_refuses_a_bad_config(tmp_path, local_stack):
    config = tmp_path / "agent.yml"
    config.write_text(local_stack.config_yaml() + "sync_intervall: 3\n")
    env = {**os.environ, "PONOS_CONFIG": str(config)}
    result = cli("run", "--log-dir", str(tmp_path / "logs"), env=env, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "sync_intervall: unknown key (did you mean 'sync_interval'?)" in result.stderr
    assert not (tmp_path / "logs").exists()  # nothing was started


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_demo_json_end_to_end():
    expected = Counter(t.expect for p in build_workload(6) for t in p.tasks)
    result = cli("demo", "--tasks", "6", "--json", "--timeout", "150", timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)  # exactly one JSON document on stdout
    tasks, totals = document["tasks"], document["totals"]
    assert len(tasks) == totals["tasks"] == 6
    assert all(t["state"] in TERMINAL for t in tasks)
    assert all(t["state"] == t["expected"] for t in tasks), tasks
    assert Counter(t["state"] for t in tasks) == expected
    assert {k: totals[k] for k in ("completed", "failed", "stopped", "error")} == {
        "completed": expected["completed"], "failed": expected["failed"],
        "stopped": expected["stopped"], "error": 0}
    assert totals["instances_left"] == 0
    assert totals["max_live_instances_per_task"] == 1
    assert totals["rate_limited"] == 0
    assert totals["cost"] > 0 and totals["api_calls"] > 0
    for task in tasks:
        assert task["attempts"] >= 1 and task["gpu_name"] and task["dph_total"] > 0
        assert task["cost"] > 0
    assert abs(sum(t["cost"] for t in tasks) - totals["cost"]) < 1e-4
    assert "Flower: http://127.0.0.1:" in result.stderr
