"""What the agent is doing, read from Redis only: for `ponos-vast status` and Prometheus.

Both read what the agent writes, through state.TaskStore: task records (active ones and done
tombstones), the instance snapshot of the last listing, the time of the last sync that ran
and the count of instances the sync loop destroyed, per cause. Nothing here calls Arkindex or
Vast.ai, so both work while those are unreachable, and a scrape costs a handful of Redis
reads.

The Prometheus side is a custom collector (prometheus-client's pattern for values that live
elsewhere): it reads Redis on each scrape instead of keeping gauges up to date in the workers,
so prefork children, beat and several hosts need no multiprocess setup.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import redis
from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
)
from prometheus_client.utils import floatToGoString

from ponos_tasks.lifecycle import Condition, Phase, classify_instance
from ponos_tasks.models import Instance, TaskRecord
from ponos_tasks.state import DEFAULT_PREFIX, Keyspace, TaskStore

#: Upper bounds of the attempts histogram (attempt 0 = no instance created yet).
ATTEMPT_BUCKETS = (0, 1, 2, 3, 4, 5, 10)


def is_live(instance: Instance) -> bool:
    """Not destroyed: it bills (a stopped one bills its storage)."""
    return classify_instance(instance) is not Condition.GONE


@dataclass
class AgentState:
    """One consistent-enough read of the agent's Redis keys, taken at `now`."""

    now: float
    records: dict[str, TaskRecord]
    instances: list[Instance]
    snapshot_taken_at: float | None
    last_sync_at: float | None
    destroyed: dict[str, int] = field(default_factory=dict)

    @property
    def live_instances(self) -> list[Instance]:
        return [i for i in self.instances if is_live(i)]

    @property
    def spend_per_hour(self) -> float:
        """Sum of dph_total of the live instances of the snapshot ($/h)."""
        return sum(i.dph_total or 0.0 for i in self.live_instances)

    @property
    def tasks_per_phase(self) -> dict[str, int]:
        """Every phase, zeros included (so a gauge series never disappears)."""
        counts = Counter(record.phase for record in self.records.values())
        return {phase.value: counts.get(phase.value, 0) for phase in Phase}

    @property
    def active_records(self) -> list[TaskRecord]:
        return [r for r in self.records.values() if r.phase != Phase.DONE]

    def age(self, since: float | None) -> float | None:
        return None if since is None else max(0.0, self.now - since)

    @property
    def last_sync_age(self) -> float | None:
        return self.age(self.last_sync_at)

    @property
    def snapshot_age(self) -> float | None:
        return self.age(self.snapshot_taken_at)


def read_agent_state(
    client: redis.Redis, prefix: str = DEFAULT_PREFIX, *, now: Callable[[], float] = time.time
) -> AgentState:
    """Read records, snapshot, last sync time and destroy counters (raises redis errors)."""
    store = TaskStore(client, Keyspace(prefix))
    snapshot = store.load_snapshot()
    return AgentState(
        now=now(),
        records=store.all_records(include_done=True),
        instances=list(snapshot.instances) if snapshot is not None else [],
        snapshot_taken_at=snapshot.taken_at if snapshot is not None else None,
        last_sync_at=store.last_sync(),
        destroyed=store.destroyed_counts(),
    )


class PonosCollector:
    """Prometheus collector reading the agent's state from Redis on each scrape."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        *,
        now: Callable[[], float] = time.time,
    ):
        self.client = client
        self.prefix = prefix
        self.now = now

    def describe(self):
        return []  # no Redis read when the collector is registered

    def collect(self):
        up = GaugeMetricFamily(
            "ponos_redis_up", "1 when the agent's Redis answered this scrape, else 0"
        )
        try:
            state = read_agent_state(self.client, self.prefix, now=self.now)
        except redis.RedisError:
            up.add_metric([], 0)
            yield up
            return
        up.add_metric([], 1)
        yield up
        yield from self.families(state)

    @staticmethod
    def families(state: AgentState):
        tasks = GaugeMetricFamily(
            "ponos_tasks", "Task records per phase (done: tombstones still kept)", labels=["phase"]
        )
        for phase, count in state.tasks_per_phase.items():
            tasks.add_metric([phase], count)
        yield tasks

        oldest = GaugeMetricFamily(
            "ponos_task_phase_age_max_seconds",
            "Seconds the oldest active task has been in its phase",
            labels=["phase"],
        )
        ages: dict[str, float] = {}
        for record in state.active_records:
            age = state.age(record.phase_changed_at)
            if age is not None:
                ages[record.phase] = max(ages.get(record.phase, 0.0), age)
        for phase, age in sorted(ages.items()):
            oldest.add_metric([phase], age)
        yield oldest

        yield GaugeMetricFamily(
            "ponos_instances_live",
            "Live (not destroyed) instances in the last snapshot",
            value=len(state.live_instances),
        )
        yield GaugeMetricFamily(
            "ponos_spend_dollars_per_hour",
            "Sum of dph_total of the live instances in the last snapshot",
            value=state.spend_per_hour,
        )

        destroyed = CounterMetricFamily(
            "ponos_instances_destroyed",
            "Instances destroyed by the sync loop (orphans, stale attempts, duplicates, ...)",
            labels=["cause"],
        )
        for cause, count in sorted(state.destroyed.items()):
            destroyed.add_metric([cause], count)
        yield destroyed

        # +Inf when no sync ever ran: an alert on `> N` fires instead of seeing no series.
        last_sync = state.last_sync_age
        yield GaugeMetricFamily(
            "ponos_last_sync_age_seconds",
            "Seconds since the last sync ran (+Inf: never)",
            value=math.inf if last_sync is None else last_sync,
        )
        snapshot = state.snapshot_age
        yield GaugeMetricFamily(
            "ponos_snapshot_age_seconds",
            "Seconds since the instance snapshot was taken (+Inf: none)",
            value=math.inf if snapshot is None else snapshot,
        )

        attempts = [record.attempt for record in state.active_records]
        buckets = [
            (floatToGoString(bound), sum(1 for a in attempts if a <= bound))
            for bound in ATTEMPT_BUCKETS
        ]
        buckets.append(("+Inf", len(attempts)))
        histogram = HistogramMetricFamily(
            "ponos_task_attempts", "Attempt number (instances tried) of the active tasks"
        )
        histogram.add_metric([], buckets, sum_value=sum(attempts))
        yield histogram


def make_registry(
    client: redis.Redis, prefix: str = DEFAULT_PREFIX, *, now: Callable[[], float] = time.time
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PonosCollector(client, prefix, now=now))
    return registry


def serve_metrics(
    client: redis.Redis,
    prefix: str = DEFAULT_PREFIX,
    *,
    host: str = "127.0.0.1",
    port: int = 9808,
    now: Callable[[], float] = time.time,
):
    """Serve /metrics in a daemon thread; returns (server, thread). server.server_port is
    the bound port (useful with port 0); server.shutdown() stops it."""
    return start_http_server(port, addr=host, registry=make_registry(client, prefix, now=now))
