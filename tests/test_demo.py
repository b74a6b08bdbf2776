"""`ponos-vast demo` / `run` and the sample workload.

`run` with PONOS_CONFIG is the real agent and never touches the simulators (checked in a
subprocess where they cannot be imported); without it, it says so and runs the demo.

The demo test is a real end-to-end run (private Redis, local stack, real worker, beat and
Flower processes, instances running real `sh` commands) checked only through its --json
document, whose figures come from the simulators.
"""

import json
import os
import shlex
import signal
import subprocess
import sys
import time
from collections import Counter

import click
import pytest
from click.testing import CliRunner

from ponos_tasks import demo
from ponos_tasks.cli import SIM_EXTRA_MESSAGE, main
from ponos_tasks.demo import summarize
from ponos_tasks.run import NO_CONFIG_MESSAGE
from ponos_tasks.workload import build_workload
from tests.blocked_imports import SIM_EXTRA, blocked_env, run_blocked
from tests.conftest import free_port

TERMINAL = {"completed", "failed", "error", "stopped"}


def cli(*args, env=None, timeout=180):
    return subprocess.run(
        [sys.executable, "-m", "ponos_tasks.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


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
        assert all(
            t["requires_gpu"] and shlex.split(t["command"])[:2] == ["sh", "-c"]
            for t in spec["tasks"]
        )
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
    tasks = [
        {
            "id": "t1",
            "slug": "a",
            "state": "completed",
            "history": [
                {"t": 10.0, "to": "running", "accepted": True},
                {"t": 14.5, "to": "completed", "accepted": True},
            ],
        },
        {"id": "t2", "slug": "b", "state": "failed", "history": []},
    ]
    ledger = {
        "instances": [
            {"label": "ponos-0123abcd-t1-1", "gpu_name": "A", "dph_total": 0.1, "cost": 0.5},
            {"label": "ponos-0123abcd-t1-2", "gpu_name": "B", "dph_total": 0.2, "cost": 0.25},
            {"label": "someone-else", "gpu_name": "C", "dph_total": 9.0, "cost": 9.0},
        ],
        "total_cost": 9.75,
    }
    events = [
        {"t": 1, "event": "created", "label": "ponos-0123abcd-t1-1"},
        {"t": 2, "event": "created", "label": "ponos-0123abcd-t1-2"},
        {"t": 3, "event": "destroyed", "label": "ponos-0123abcd-t1-1"},
        {"t": 4, "event": "destroyed", "label": "ponos-0123abcd-t1-2"},
        # Another task's instance, alive with both: the fleet's peak is 3.
        {"t": 2.5, "event": "created", "label": "ponos-0123abcd-t2-1"},
        {"t": 5, "event": "destroyed", "label": "ponos-0123abcd-t2-1"},
        # Destroyed and created at the same instant: not alive together.
        {"t": 6, "event": "created", "label": "ponos-0123abcd-t2-2"},
        {"t": 7, "event": "destroyed", "label": "ponos-0123abcd-t2-2"},
        {"t": 7, "event": "created", "label": "ponos-0123abcd-t2-3"},
    ]
    stats = {"calls": {"create": 2, "list": 5}, "rate_limited": {"list": 1}, "live_instances": 0}
    doc = summarize(tasks, {"t1": "completed", "t2": "completed"}, ledger, events, stats)
    first, second = doc["tasks"]
    assert (
        first["attempts"],
        first["gpu_name"],
        first["dph_total"],
        first["cost"],
        first["runtime_s"],
    ) == (2, "B", 0.2, 0.75, 4.5)
    assert (second["attempts"], second["cost"], second["runtime_s"]) == (0, 0.0, None)
    totals = doc["totals"]
    assert totals["max_live_instances_per_task"] == 2
    assert totals["max_live_instances"] == 3
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


def unreachable_config(tmp_path) -> str:
    """A valid config whose Arkindex, Vast.ai and Redis are closed loopback ports."""
    closed = free_port()
    path = tmp_path / "agent.yml"
    path.write_text(f"""url: http://127.0.0.1:{closed}
farm_id: 00000000-0000-0000-0000-000000000001
seed: "{"ab" * 32}"
redis_url: redis://127.0.0.1:{closed}/0
vast_api:
  url: http://127.0.0.1:{closed}
  api_key: not-a-key
  offer_filters: {{}}
""")
    return str(path)


@pytest.mark.timeout(120)
def test_run_with_a_config_runs_the_agent_and_never_the_simulators(tmp_path):
    """The simulators, the demo and the `sim` extra cannot be imported (here and in the
    worker, beat and Flower it starts): `run` still starts the agent for the config."""
    env = {**os.environ, "PONOS_CONFIG": unreachable_config(tmp_path), "FLOWER_BASIC_AUTH": ""}
    blocked = (*SIM_EXTRA, "ponos_tasks.simulators", "ponos_tasks.demo")
    logs = tmp_path / "logs"
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "run",
            "--log-dir",
            str(logs),
            "--flower-port",
            str(free_port()),
        ],
        env=blocked_env(tmp_path, blocked, env),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        # The worker imported the app and its tasks, and tries to reach its (closed) Redis.
        deadline = time.monotonic() + 60
        worker_log = logs / "worker1.log"
        while not (worker_log.exists() and "127.0.0.1" in worker_log.read_text()):
            assert process.poll() is None, process.communicate()
            assert time.monotonic() < deadline, "the worker never tried its broker"
            time.sleep(0.2)
        assert {p.name for p in logs.glob("*.log")} == {"worker1.log", "beat1.log", "flower.log"}
    finally:
        process.send_signal(signal.SIGTERM)
        stdout, stderr = process.communicate(timeout=60)
    assert process.returncode == 0, stderr
    assert "Agent running: worker, beat and Flower" in stdout and "Agent stopped." in stdout
    # Where Flower's password is, on stderr; never the password (the file is gone by now).
    assert f"(user ponos; password generated for this run, in {logs}/flower-credentials" in stderr
    assert not (logs / "flower-credentials").exists()
    assert NO_CONFIG_MESSAGE not in stderr and "demo" not in stdout + stderr
    for path in logs.glob("*.log"):
        text = path.read_text()
        assert "ModuleNotFoundError" not in text and "ImportError" not in text, path


def test_run_without_config_says_so_and_runs_the_demo(monkeypatch):
    ran = []

    @click.command("demo")
    def fake_demo():
        ran.append(True)
        click.echo("the demo ran")

    monkeypatch.setattr(demo, "demo_command", fake_demo)
    monkeypatch.delenv("PONOS_CONFIG", raising=False)
    result = CliRunner().invoke(main, ["run"])
    assert result.exit_code == 0, result.output
    assert ran == [True]
    assert result.stderr == NO_CONFIG_MESSAGE + "\n"  # one plain line
    assert result.stdout == "the demo ran\n"


def test_run_without_config_nor_the_sim_extra(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PONOS_CONFIG"}
    result = run_blocked(["-m", "ponos_tasks.cli", "run"], tmp_path, env=env)
    assert result.returncode == 1
    assert result.stderr.splitlines() == [
        NO_CONFIG_MESSAGE,
        f"ponos-vast demo: {SIM_EXTRA_MESSAGE}",
    ]


@pytest.mark.e2e
@pytest.mark.timeout(240)
def test_demo_json_end_to_end():
    expected = Counter(t.expect for p in build_workload(6) for t in p.tasks)
    # A budget key from the environment, as for every agent: at most 2 instances at once.
    env = {**os.environ, "PONOS__BUDGET__MAX_INSTANCES": "2"}
    result = cli("demo", "--tasks", "6", "--json", "--timeout", "150", env=env, timeout=220)
    assert result.returncode == 0, result.stderr[-3000:]
    document = json.loads(result.stdout)  # exactly one JSON document on stdout
    tasks, totals = document["tasks"], document["totals"]
    assert len(tasks) == totals["tasks"] == 6
    assert all(t["state"] in TERMINAL for t in tasks)
    assert all(t["state"] == t["expected"] for t in tasks), tasks
    assert Counter(t["state"] for t in tasks) == expected
    assert {k: totals[k] for k in ("completed", "failed", "stopped", "error")} == {
        "completed": expected["completed"],
        "failed": expected["failed"],
        "stopped": expected["stopped"],
        "error": 0,
    }
    assert totals["instances_left"] == 0
    assert totals["max_live_instances_per_task"] == 1
    assert document["budget"]["max_instances"] == 2
    assert 1 <= totals["max_live_instances"] <= 2  # from the Vast.ai simulator's timeline
    assert totals["rate_limited"] == 0
    assert totals["cost"] > 0 and totals["api_calls"] > 0
    for task in tasks:
        assert task["attempts"] >= 1 and task["gpu_name"] and task["dph_total"] > 0
        assert task["cost"] > 0
    assert abs(sum(t["cost"] for t in tasks) - totals["cost"]) < 1e-4
    assert "Flower: http://127.0.0.1:" in result.stderr
