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

from ponos_tasks.simulators.harness import LocalRun
from ponos_tasks.simulators.stack import LocalStack
from tests.e2e.workloads import IMAGE, IMAGE_SIZE_GB

TIME_SCALE = 40.0  # simulated Vast.ai seconds per real second


@pytest.fixture
def local_run(tmp_path):
    """Private Redis + the local stack on it (ponos_tasks.simulators.harness.LocalRun); Vast.ai
    instances run their command for real; no market churn (the cheapest-offer check
    reconstructs the market from the events). The agent processes a test starts through
    `agent_processes` are stopped with it."""
    if shutil.which("redis-server") is None:
        pytest.skip(
            "redis-server is not installed (apt-get install redis-server): the "
            "end-to-end tests need a private Redis they can kill"
        )
    run = LocalRun(
        time_scale=TIME_SCALE,
        vast_run_mode="local",
        vast_options={
            "churn": False,
            "image_sizes": {IMAGE: IMAGE_SIZE_GB},
            "cached_images": [IMAGE],
        },
        workdir=tmp_path,
        logs_dir=tmp_path / "logs",
    )
    run.start()
    yield run
    run.stop(agent_timeout=10)


@pytest.fixture
def private_redis(local_run):
    """The run's `redis-server`: a test may SIGKILL it and restart it empty (no RDB, no AOF)
    on the same port, like a Redis host lost with its memory (`restart_empty()`)."""
    return local_run.redis


@pytest.fixture
def stack(local_run) -> LocalStack:
    return local_run.stack


@pytest.fixture
def sim(local_run):
    """The simulators' admin APIs (ponos_tasks.simulators.harness.SimAdmin)."""
    return local_run.admin


# Keys of the `budget:` section a test may pass among the vast_api overrides.
BUDGET_KEYS = (
    "max_instances",
    "max_dph_per_instance",
    "max_dph_total",
    "max_spend_per_task",
    "max_spend_per_day",
)


def write_agent_config(stack: LocalStack, path: Path, redis_url: str, **vast_overrides) -> Path:
    """The agent's YAML config for this stack (same agent_name every time: the restart test
    relies on the agent's stable identity). Budget keys go to the `budget:` section."""
    budget = {"max_instances": 6, "billing_time_scale": TIME_SCALE}
    budget.update({k: vast_overrides.pop(k) for k in BUDGET_KEYS if k in vast_overrides})
    vast = {
        "url": stack.vast_url,
        "api_key": stack.vast_api_key,
        "offer_filters": {},
        "disk_gb": 16,
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
        "budget": budget,
    }
    path.write_text(yaml.safe_dump(data))
    return path


@pytest.fixture
def agent_config(stack, private_redis, tmp_path):
    """A factory: agent_config(**vast_api overrides) -> path of the YAML file."""

    def make(**vast_overrides) -> Path:
        return write_agent_config(
            stack, tmp_path / "agent.yml", private_redis.url, **vast_overrides
        )

    return make


@pytest.fixture
def agent_processes(local_run):
    """A factory for AgentProcesses (started); everything is stopped with the run."""

    def make(config_path: Path, *, workers: int = 1, beats: int = 1, concurrency: int = 4):
        return local_run.start_agent(
            config_path, workers=workers, beats=beats, concurrency=concurrency
        )

    return make
