"""Fixtures of the end-to-end tests: real Celery worker/beat processes (the Procfile's
commands, through ponos_tasks.supervisor), a private Redis they may lose, and the local stack
with the Vast.ai simulator in local run mode (the real exit-code wrapper runs `sh -c`).

Each test gets its own `redis-server` (no persistence, free loopback port): the agent uses
fixed key names (`ponos:`) and Celery queues, so two tests sharing one Redis would see each
other's messages; and the restart test kills and restarts it empty.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import yaml

from ponos_tasks.simulators.stack import LocalStack, RedisProcess
from ponos_tasks.supervisor import AgentProcesses
from tests.e2e.helpers import Sim

TIME_SCALE = 40.0  # simulated Vast.ai seconds per real second


class PrivateRedis(RedisProcess):
    """A `redis-server` on a fixed free loopback port that a test may SIGKILL and restart
    (empty: no RDB, no AOF), like a Redis host lost with its memory."""

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart_empty(self) -> None:
        self.kill()
        self.start()


@pytest.fixture
def private_redis(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server): the "
                    "end-to-end tests need a private Redis they can kill")
    workdir = tmp_path / "redis"
    workdir.mkdir()
    server = PrivateRedis(workdir).start()
    yield server
    server.kill()


@pytest.fixture
def stack(private_redis):
    """The local stack on the private Redis; Vast.ai instances run their command for real;
    no market churn (the cheapest-offer check reconstructs the market from the events)."""
    local = LocalStack(private_redis.url, time_scale=TIME_SCALE, vast_run_mode="local",
                       start_redis=False, vast_options={"churn": False, "log_delay": 1.0})
    local.start()
    yield local
    local.stop()


@pytest.fixture
def sim(stack):
    admin = Sim(stack.vast_url, stack.arkindex_url)
    yield admin
    admin.close()


def write_agent_config(stack: LocalStack, path: Path, redis_url: str, **vast_overrides) -> Path:
    """The agent's YAML config for this stack (same agent_name every time: the restart test
    relies on the agent's stable identity)."""
    vast = {
        "url": stack.vast_url,
        "api_key": stack.vast_api_key,
        "offer_filters": {},
        "disk_gb": 16,
        "max_instances": 6,
        "loading_deadline": 8,  # real seconds; a normal start takes ~1 s at TIME_SCALE
        "start_attempts": 3,
        "offer_wait": 60,
        # The simulator's rate limits shrink with its time scale; so do ours.
        "rate_limit_scale": 1.0 / TIME_SCALE,
    }
    vast.update(vast_overrides)
    data = {
        "url": stack.arkindex_url,
        "farm_id": stack.farm_id,
        "seed": stack.seed,
        "agent_name": "e2e-agent",
        "redis_url": redis_url,
        "sync_interval": 0.5,
        "logs_interval": 5,
        "logging": {"level": "INFO"},
        "vast_api": vast,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def agent_config(stack, private_redis, tmp_path):
    """A factory: agent_config(**vast_api overrides) -> path of the YAML file."""

    def make(**vast_overrides) -> Path:
        return write_agent_config(stack, tmp_path / "agent.yml", private_redis.url,
                                  **vast_overrides)

    return make


@pytest.fixture
def agent_processes(private_redis, tmp_path):
    """A factory for AgentProcesses (started); everything is stopped at the end."""
    started: list[AgentProcesses] = []

    def make(config_path: Path, *, workers: int = 1, beats: int = 1,
             concurrency: int = 4) -> AgentProcesses:
        processes = AgentProcesses(config_path=config_path, log_dir=tmp_path / "logs",
                                   redis_url=private_redis.url, workers=workers,
                                   concurrency=concurrency, beats=beats)
        started.append(processes)
        return processes.start()

    yield make
    for processes in started:
        processes.stop(timeout=10)
