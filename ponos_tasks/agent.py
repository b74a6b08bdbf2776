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
from redis.exceptions import LockError

from ponos_tasks.arkindex import ArkindexAgentClient, ArkindexError
from ponos_tasks.config import AgentConfig, current_config
from ponos_tasks.lifecycle import agent_short_id
from ponos_tasks.metric_store import MetricStore
from ponos_tasks.ratelimit import RedisRateLimiter
from ponos_tasks.registry_client import RegistryClient
from ponos_tasks.settings import Settings
from ponos_tasks.state import (
    DEFAULT_PREFIX,
    BudgetStore,
    ImageConfigCache,
    Keyspace,
    RedisCredentialStore,
    ReportedStates,
    TaskLogBook,
    TaskStore,
)
from ponos_tasks.vast import VastClient, VastError
from ponos_tasks.wrapper import marker_nonce

logger = logging.getLogger(__name__)


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
    prefix: str = DEFAULT_PREFIX
    _registered: bool = field(default=False, init=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, init=False, repr=False)

    @cached_property
    def settings(self) -> Settings:
        return Settings.from_config(self.config)

    @cached_property
    def keys(self) -> Keyspace:
        return Keyspace(self.prefix)

    @cached_property
    def redis(self) -> redis.Redis:
        """The connection the stores below share (steps never use it directly)."""
        return redis.Redis.from_url(self.config.redis_url)

    @cached_property
    def store(self) -> TaskStore:
        return TaskStore(self.redis, self.keys, tombstone_ttl=self.settings.tombstone_ttl)

    @cached_property
    def budget(self) -> BudgetStore:
        return BudgetStore(self.redis, self.keys, self.store)

    @cached_property
    def reported(self) -> ReportedStates:
        return ReportedStates(self.redis, self.keys)

    @cached_property
    def logbook(self) -> TaskLogBook:
        return TaskLogBook(self.redis, self.keys, task_format=self.config.logging.task_format)

    @cached_property
    def metric_store(self) -> MetricStore:
        return MetricStore(self.redis, self.keys)

    @cached_property
    def limiter(self) -> RedisRateLimiter:
        """Vast.ai's call slots, shared by every worker (ratelimit.py)."""
        return RedisRateLimiter.for_agent(
            self.redis,
            prefix=self.keys.ratelimit_prefix,
            scale=self.config.vast_api.rate_limit_scale,
        )

    @cached_property
    def vast(self) -> VastClient:
        vast = self.config.vast_api
        return VastClient(
            vast.url,
            vast.api_key,
            rate_limiter=self.limiter,
            on_call=self.metric_store.count_api_call,
        )

    @cached_property
    def arkindex(self) -> ArkindexAgentClient:
        store = RedisCredentialStore(self.redis, self.keys)
        public_key = stable_public_key(
            self.config.seed, str(self.config.farm_id), self.config.agent_name
        )
        return ArkindexAgentClient(
            self.config.url,
            str(self.config.farm_id),
            self.config.seed,
            store,
            hostname=self.config.agent_name,
            public_key=public_key,
            reported=self.reported,
            on_call=self.metric_store.count_api_call,
        )

    @cached_property
    def registry(self) -> RegistryClient:
        return RegistryClient(
            self.config.vast_api.registries, shared_cache=ImageConfigCache(self.redis, self.keys)
        )

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

    def marker_nonce(self, label: str | None) -> str:
        """The exit marker's nonce of the attempt `label` names ("" when there is no label:
        no marker is accepted then)."""
        return marker_nonce(self.config.seed, label) if label else ""

    def label_prefix(self) -> str:
        return f"ponos-{self.agent_short_id()}-"

    def now(self) -> float:
        return time.time()


def service_problem(
    context: AgentContext, *, arkindex: bool = True, vast: bool = True
) -> str | None:
    """The first service of the configuration that cannot be used, as one line starting with
    the key to look at; None when every one answers. Redis first: everything else keeps its
    state there. `arkindex` registers the agent (as the worker does at start), `vast` makes
    one authenticated Vast.ai call."""
    config = context.config
    probe = redis.Redis.from_url(config.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        probe.ping()
    except redis.RedisError as error:
        # redis-py's messages name host and port, never the password.
        return f"redis_url: no usable Redis at {config.redis_location()} ({error})"
    finally:
        probe.close()
    try:
        if arkindex:
            context.agent_short_id()  # registers (or reuses the stored credentials)
    except ArkindexError as error:
        return f"url: {error}"
    except LockError as error:  # another worker registers and does not finish
        return f"url: registration on Arkindex did not complete: {error}"
    except redis.RedisError as error:  # Redis lost during the registration
        return f"redis_url: Redis at {config.redis_location()} failed during the registration on Arkindex ({error})"
    try:
        if vast:
            context.vast.check_auth()
    except VastError as error:
        return f"vast_api: {error}"
    return None


_contexts: dict[int, AgentContext] = {}


def get_context() -> AgentContext:
    """The context of this process (one per pid: a forked pool process builds its own
    connections), from config.current_config(); raises ConfigError when it is unusable."""
    pid = os.getpid()
    context = _contexts.get(pid)
    if context is None:
        context = _contexts[pid] = AgentContext(current_config())
    return context
