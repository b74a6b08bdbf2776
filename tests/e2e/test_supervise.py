"""`ponos-vast run` restarts an agent process that dies (issue 8, §2.13): a worker killed
under it is started again, says so, and works; the restart backoff doubles and resets."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import redis
from celery import Celery

from ponos_tasks import supervisor
from ponos_tasks.simulators.harness import OVERRIDING_ENV
from ponos_tasks.supervisor import AgentProcesses
from tests.conftest import free_port
from tests.e2e.conftest import write_agent_config
from tests.e2e.helpers import wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(120)]

SUCCEEDED = re.compile(r"Task ponos\.sync\[[0-9a-f-]+\] succeeded")


def _children(pid: int) -> dict[int, str]:
    """{pid: command line} of the direct children of `pid` (Linux /proc)."""
    out = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            ppid = int(stat.rsplit(")", 1)[1].split()[1])
            if ppid == pid:
                out[int(entry.name)] = (
                    (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                )
        except (OSError, ValueError, IndexError):
            continue
    return out


def _worker_pid(run_pid: int) -> int | None:
    for pid, cmdline in _children(run_pid).items():
        if " worker " in cmdline and "worker1@" in cmdline:
            return pid
    return None


def test_ponos_vast_run_restarts_a_killed_worker(local_run, tmp_path):
    config = write_agent_config(local_run.stack, tmp_path / "agent.yml", local_run.redis.url)
    logs = tmp_path / "run-logs"
    env = {**os.environ, **{name: "" for name in OVERRIDING_ENV}, "PONOS_CONFIG": str(config)}
    stderr_path = tmp_path / "run.stderr"
    with open(stderr_path, "wb") as stderr:
        run = subprocess.Popen(
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
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=stderr,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    worker_log = logs / "worker1.log"

    def syncs() -> int:
        return (
            len(SUCCEEDED.findall(worker_log.read_text(errors="replace")))
            if worker_log.exists()
            else 0
        )

    try:
        first = wait_until(lambda: _worker_pid(run.pid), timeout=30, what="the worker started")
        wait_until(lambda: syncs() >= 2, timeout=60, what="the worker processing syncs")
        os.killpg(first, signal.SIGKILL)  # the worker and its pool, like an OOM kill
        killed_at = time.monotonic()
        second = wait_until(
            lambda: (pid := _worker_pid(run.pid)) not in (None, first) and pid,
            timeout=30,
            what="a new worker",
        )
        restarted_after = time.monotonic() - killed_at
        before = syncs()
        wait_until(lambda: syncs() >= before + 2, timeout=60, what="the new worker's syncs")
        assert run.poll() is None, "ponos-vast run exited"
        said = stderr_path.read_text(errors="replace")
        assert re.search(r"worker1 exited with status -?\d+; restarting it in 1 s", said), said
        assert f"worker1 restarted (pid {second})" in said, said
        print(f"supervise: worker restarted {restarted_after:.1f} s after the kill")
    finally:
        if run.poll() is None:
            run.send_signal(signal.SIGTERM)
        status = run.wait(timeout=60)
    assert status == 0
    assert _worker_pid(run.pid) is None


def test_supervise_backoff_doubles_and_resets(tmp_path):
    """Real processes that die at once: each restart waits twice as long as the last, up to
    the maximum, and a process that stayed up long enough starts again from the first delay."""
    agent = AgentProcesses(tmp_path / "agent.yml", tmp_path / "logs", "redis://127.0.0.1:1/0")
    dies = [sys.executable, "-c", "raise SystemExit(3)"]
    agent._spawn("worker1", dies)
    agent.processes["worker1"].wait(timeout=10)

    delays = []
    now = time.monotonic()
    for _ in range(8):
        (event,) = agent.supervise(now=now)
        assert event.startswith("worker1 exited with status 3; restarting it in ")
        delay = float(re.search(r"in ([\d.]+) s", event).group(1))
        delays.append(delay)
        assert agent.supervise(now=now + delay - 0.01) == []  # not before its time
        (event,) = agent.supervise(now=now + delay)
        assert event.startswith("worker1 restarted (pid ")
        agent.processes["worker1"].wait(timeout=10)
        now = agent.restarts["worker1"].started_at
    assert delays == [1, 2, 4, 8, 16, 32, 60, 60]

    # It stays up RESTART_RESET seconds before dying: the next restart is quick again.
    (event,) = agent.supervise(now=now + supervisor.RESTART_RESET)
    assert "restarting it in 1 s" in event
    agent.stop(timeout=5)


def _slow_step_then_stop(tmp_path, broker: str, queue: str, seconds: float, stop_timeout: float):
    """A Celery worker (tests/e2e/warm_stop_app.py: prefork, one child) runs a step of
    `seconds`; once it has started, stop(stop_timeout). Returns the stopped processes and
    whether the step finished."""
    env = {
        "WARM_STOP_BROKER": broker,
        "WARM_STOP_QUEUE": queue,
        "PYTHONPATH": str(Path(__file__).resolve().parents[2]),
    }
    agent = AgentProcesses(tmp_path / "agent.yml", tmp_path / "logs", broker, extra_env=env)
    worker = [sys.executable, "-m", "celery", "-A", "tests.e2e.warm_stop_app", "worker"]
    agent._spawn("worker1", [*worker, "--pool", "prefork", "-c", "1", "-Q", queue, "-l", "INFO"])
    started, done = tmp_path / "started", tmp_path / "done"
    sender = Celery("warm_stop_sender", broker=broker)  # sends by the task's name
    try:
        sender.send_task("warm_stop.slow", args=[str(started), str(done), seconds], queue=queue)
        wait_until(started.exists, timeout=60, what="the slow step to start")
    finally:
        sender.close()
        agent.stop(timeout=stop_timeout)
    return agent, done.exists()


def test_a_step_that_outlasts_the_stop_goes_back_to_its_queue(tmp_path, redis_url):
    """Past stop()'s timeout the pool is stopped (the whole group gets SIGTERM) before the
    SIGKILL sweep: Celery's main process sees the step lost and puts its message back, rather
    than dying with it unacknowledged until the broker's visibility timeout (an hour)."""
    broker = redis_url.rsplit("/", 1)[0] + "/11"  # Celery's own keys (unacked...) apart
    queue = f"warm-stop-{os.getpid()}-{time.monotonic_ns()}"
    client = redis.Redis.from_url(broker)
    try:
        agent, finished = _slow_step_then_stop(tmp_path, broker, queue, 60.0, stop_timeout=2)
        assert not finished
        assert client.llen(queue) == 1, (agent.log_dir / "worker1.log").read_text()[-3000:]
    finally:
        client.delete(queue)
        client.close()


def test_stop_lets_the_steps_that_run_finish(tmp_path, redis_url, key_prefix):
    """stop() is a warm shutdown: Celery's main process is asked to stop, and the step a pool
    child runs finishes. (Celery resets SIGTERM to its default in pool children: a SIGTERM
    sent to the worker's whole process group killed a running step mid-call.)"""
    queue = f"{key_prefix}warm-stop"
    agent, finished = _slow_step_then_stop(tmp_path, redis_url, queue, 3.0, stop_timeout=30)
    assert finished, (agent.log_dir / "worker1.log").read_text()[-3000:]
