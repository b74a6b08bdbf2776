"""Redis restarts under a running agent (issue 8, §2.13): the worker and beat started by the
Procfile's commands must stay up through the restart and keep working once Redis is back,
whether Redis comes back with its data (AOF) or empty (no persistence).

Before the fix (ponos_tasks/broker.py), Celery 5.7 + kombu 5.7 killed the worker here with
`Unrecoverable error: AttributeError("'NoneType' object has no attribute 'hostname'")` from
kombu's restore_unacked, in every run.
"""

from __future__ import annotations

import re
import shutil
import time

import pytest

from ponos_tasks.simulators.harness import LocalRun
from tests.e2e.conftest import TIME_SCALE, write_agent_config
from tests.e2e.helpers import assert_terminal_once, log_tails, wait_all_terminal, wait_until
from tests.e2e.workloads import Spec, admin_tasks, command

pytestmark = [pytest.mark.e2e, pytest.mark.timeout(240)]

SUCCEEDED = re.compile(r"Task ponos\.sync\[[0-9a-f-]+\] succeeded")
SYNC_EVENT = re.compile(r"Task ponos\.sync\[([0-9a-f-]+)\] (received|succeeded|raised)")


def _worker_log(agent) -> str:
    return (agent.log_dir / "worker1.log").read_text(errors="replace")


def _syncs_done(agent) -> int:
    return len(SUCCEEDED.findall(_worker_log(agent)))


def _sync_in_flight(agent) -> bool:
    """A sync message received and not finished yet: unacknowledged (acks_late), while the
    consumer waits in BRPOP for the next one (prefetch 1 x concurrency 2): the state in
    which losing Redis crashed the worker."""
    events = SYNC_EVENT.findall(_worker_log(agent))
    return bool(events) and events[-1][1] == "received"


@pytest.mark.parametrize("appendonly", [True, False], ids=["aof", "no-persistence"])
def test_worker_survives_redis_restart(tmp_path, appendonly):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    run = LocalRun(
        time_scale=TIME_SCALE,
        vast_run_mode="local",
        vast_options={"churn": False, "log_delay": 1.0},
        redis_appendonly=appendonly,
        workdir=tmp_path,
        logs_dir=tmp_path / "logs",
    ).start()
    try:
        config = write_agent_config(run.stack, tmp_path / "agent.yml", run.redis.url)
        agent = run.start_agent(config, concurrency=2)
        pids = {name: p.pid for name, p in agent.processes.items()}
        wait_until(
            lambda: _syncs_done(agent) >= 3, timeout=60, agent=agent, what="three syncs done"
        )
        # The next sync's instance list answers in 4 s: that sync stays in flight (received,
        # unacknowledged) while Redis goes, every time.
        run.admin.faults(
            *(
                {"fault": "slow", "endpoint": endpoint, "delay": 4.0, "times": 1}
                for endpoint in ("list", "list_v0")
            )
        )
        wait_until(
            lambda: _sync_in_flight(agent),
            timeout=30,
            interval=0.01,
            agent=agent,
            what="a sync in flight",
        )
        before = _syncs_done(agent)
        run.redis.restart(down_for=1.0)

        # The worker reconnects and processes syncs again...
        wait_until(
            lambda: _syncs_done(agent) >= before + 3,
            timeout=40,
            agent=agent,
            what="syncs processed after the Redis restart",
        )
        # ...and a whole task submitted after the restart, through the chain's steps. The
        # sync that was in flight when Redis went releases its lock once Redis is back
        # (state.release retries through the blip): with AOF a lock left behind would come
        # back and skip every sync until it expires (over 2 minutes).
        ids = run.admin.process("after", admin_tasks("after", [Spec("a0", command("a0", 1.0))]))
        submitted = time.monotonic()
        tasks = wait_all_terminal(run.admin, ids.values(), timeout=60, agent=agent)
        print(f"redis restart: task done {time.monotonic() - submitted:.1f} s after submission")
        for task_id in ids.values():
            assert_terminal_once(tasks[task_id], "completed")
        time.sleep(1.0)  # a crash right after the last step would still be seen
        assert not agent.check_alive(), log_tails(agent.log_dir)
        # The same processes: nothing restarted them behind the test's back.
        assert {name: p.pid for name, p in agent.processes.items()} == pids
        assert "Unrecoverable error" not in _worker_log(agent)
    finally:
        run.stop(agent_timeout=10)
