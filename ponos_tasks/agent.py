"""The agent's process-wide context: configuration and the clients built from it.

Celery's prefork pool forks worker processes; sockets must not be shared across a fork, so
the context is built lazily in each process (keyed by pid) on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

import redis

from ponos_tasks.arkindex import ArkindexAgentClient, RedisCredentialStore
from ponos_tasks.config import AgentConfig, load_config
from ponos_tasks.lifecycle import agent_short_id
from ponos_tasks.logs import TaskLogBook
from ponos_tasks.ratelimit import RedisRateLimiter
from ponos_tasks.reconcile import PlanSettings
from ponos_tasks.registry_client import RegistryClient
from ponos_tasks.state import TaskStore
from ponos_tasks.vast import VastClient

logger = logging.getLogger(__name__)

KEY_PREFIX = "ponos:"
CONFIG_ENV = "PONOS_CONFIG"


def stable_public_key(seed: str, farm_id: str, name: str) -> str:
    """The registration nonce, derived from the farm seed and the agent's name.

    Deriving it (instead of drawing it at random) lets an agent that lost all its memory
    (Redis gone) register again as the *same* agent, so the tasks Arkindex assigned to it stay
    its own and its instances' labels still name it.
    """
    message = f"ponos-vast-identity:{farm_id}:{name}".encode()
    return hmac.new(seed.encode(), message, hashlib.sha256).hexdigest()


@dataclass
class AgentContext:
    config: AgentConfig
    prefix: str = KEY_PREFIX
    _registered: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @cached_property
    def redis(self) -> redis.Redis:
        return redis.Redis.from_url(self.config.redis_url)

    @cached_property
    def store(self) -> TaskStore:
        return TaskStore(self.redis, self.prefix)

    @cached_property
    def logbook(self) -> TaskLogBook:
        return TaskLogBook(self.redis, self.prefix + "tasklog:",
                           task_format=self.config.logging.task_format)

    @cached_property
    def vast(self) -> VastClient:
        vast = self.config.vast_api
        # Scaled down (a simulator's accelerated clock), intervals of tens of ms drown in
        # scheduling jitter: 50 ms more keeps calls from arriving early (BENCHMARKS.md).
        # Unscaled, DEFAULT_INTERVALS already carry a 10 % margin.
        limiter = RedisRateLimiter(self.redis, prefix=self.prefix + "ratelimit:",
                                   scale=vast.rate_limit_scale,
                                   margin=0.05 if vast.rate_limit_scale < 1 else 0.0)
        return VastClient(vast.url, vast.api_key, rate_limiter=limiter)

    @cached_property
    def arkindex(self) -> ArkindexAgentClient:
        store = RedisCredentialStore(self.redis, self.prefix + "arkindex:agent")
        public_key = stable_public_key(self.config.seed, str(self.config.farm_id),
                                       self.config.agent_name)
        return ArkindexAgentClient(self.config.url, str(self.config.farm_id), self.config.seed,
                                   store, hostname=self.config.agent_name,
                                   public_key=public_key)

    @cached_property
    def registry(self) -> RegistryClient:
        return RegistryClient(self.config.vast_api.registries, redis=self.redis,
                              cache_prefix=self.prefix + "imgcfg:")

    @cached_property
    def plan_settings(self) -> PlanSettings:
        vast = self.config.vast_api
        return PlanSettings(
            max_instances=vast.max_instances,
            heartbeat_stale=self.stale_after,
            loading_deadline=vast.loading_deadline,
            offer_wait=vast.offer_wait,
            max_attempts=vast.start_attempts,
        )

    @property
    def watch_interval(self) -> float:
        """Seconds between two looks at a task's instance (from the shared snapshot)."""
        return min(max(self.config.sync_interval / 2, 0.5), 30.0)

    @property
    def stale_after(self) -> float:
        """A chain that made no progress for this long is resumed by the sync loop."""
        return max(6 * self.watch_interval, 3 * self.config.sync_interval, 5.0)

    def secrets(self) -> list[str]:
        return self.config.secrets()

    def agent_short_id(self) -> str:
        """Registers on first use (every process shares the credentials through Redis)."""
        with self._lock:
            if not self._registered:
                self.arkindex.register()
                self._registered = True
        agent_id = self.arkindex.agent_id
        if agent_id is None:  # credentials lost (Redis flushed): register again
            self.arkindex.register(force=True)
            agent_id = self.arkindex.agent_id
        return agent_short_id(agent_id)

    def label_prefix(self) -> str:
        return f"ponos-{self.agent_short_id()}-"

    def now(self) -> float:
        return time.time()


_contexts: dict[int, AgentContext] = {}


def get_context() -> AgentContext:
    """The context of this process, built from $PONOS_CONFIG (and the environment)."""
    pid = os.getpid()
    context = _contexts.get(pid)
    if context is None:
        context = _contexts[pid] = AgentContext(load_config(os.environ.get(CONFIG_ENV)))
    return context
