"""What the agent is doing, read from Redis only: for `ponos-vast status` and Prometheus.

Both read what the agent writes, through state.TaskStore: task records (active ones and done
tombstones), the instance snapshot of the last listing, the time of the last sync that ran
and the count of instances the sync loop destroyed, per cause; and, through
metric_store.MetricStore, the counters and histograms the workers add to (API calls and 429s,
start failures, waits). Nothing here calls Arkindex or Vast.ai, so both work while those are
unreachable, and a scrape costs a handful of Redis reads.

The Prometheus side is a custom collector (prometheus-client's pattern for values that live
elsewhere): it reads Redis on each scrape instead of keeping gauges up to date in the workers,
so prefork children, beat and several hosts need no multiprocess setup.
"""

from __future__ import annotations

import math
import time
from collections import Counter
from collections.abc import Callable, Iterable
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
from ponos_tasks.metric_store import HISTOGRAMS, Measurements, MetricStore, cumulative
from ponos_tasks.models import QUEUES, STEPS_QUEUE, Instance, TaskRecord
from ponos_tasks.state import DEFAULT_PREFIX, Keyspace, TaskStore

#: Upper bounds of the attempts histogram (attempt 0 = no instance created yet).
ATTEMPT_BUCKETS = (0, 1, 2, 3, 4, 5, 10)


def is_live(instance: Instance) -> bool:
    """Not destroyed: it bills (a stopped one bills its storage)."""
    return classify_instance(instance) is not Condition.GONE


@dataclass(frozen=True)
class Spend:
    """What the budget's meter counted (budget.py), for the spend metrics."""

    total: float  # $ since the meter began in this Redis
    today: float  # $ this UTC day
    day_left: float | None  # $ under max_spend_per_day (None: no limit, or no settings)


def read_spend(client: redis.Redis, prefix: str, now: float, settings=None) -> Spend:
    # Imported here: budget.py is the pure arithmetic; the collector only reads its figures.
    from ponos_tasks.budget import headroom, spend_today
    from ponos_tasks.state import BudgetStore

    keys = Keyspace(prefix)
    store = BudgetStore(client, keys, TaskStore(client, keys))
    day_left = None
    if settings is not None and settings.budget.max_spend_per_day is not None:
        day_left = headroom(settings, store, now).day_left
    return Spend(total=store.spent_total(), today=spend_today(store, now), day_left=day_left)


@dataclass
class AgentState:
    """One consistent-enough read of the agent's Redis keys, taken at `now`."""

    now: float
    records: dict[str, TaskRecord]
    instances: list[Instance]
    snapshot_taken_at: float | None
    last_sync_at: float | None
    destroyed: dict[str, int] = field(default_factory=dict)
    measurements: Measurements = field(default_factory=Measurements)
    spend: Spend | None = None  # the budget's meter (None: not read, as in describe())
    queue_messages: dict[str, int] = field(default_factory=dict)  # Celery queue -> waiting
    steps_oldest_sent_at: float | None = None  # send time of the oldest waiting chain step

    @property
    def live_instances(self) -> list[Instance]:
        return [i for i in self.instances if is_live(i)]

    @property
    def orphaned_instances(self) -> list[Instance]:
        """Live instances that no active task holds (neither its instance nor the kept one of
        a failed attempt). The sync loop destroys them; one that stays is a leak that bills."""
        held = set()
        for record in self.active_records:
            held.update({record.instance_id, record.kept_instance_id})
        return [i for i in self.live_instances if i.id not in held]

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
    keys = Keyspace(prefix)
    store = TaskStore(client, keys)
    snapshot = store.load_snapshot()
    return AgentState(
        now=now(),
        records=store.all_records(include_done=True),
        instances=list(snapshot.instances) if snapshot is not None else [],
        snapshot_taken_at=snapshot.taken_at if snapshot is not None else None,
        last_sync_at=store.last_sync(),
        destroyed=store.destroyed_counts(),
        measurements=MetricStore(client, keys).read(),
        queue_messages={queue: int(client.llen(queue)) for queue in QUEUES},
        steps_oldest_sent_at=store.oldest_waiting_sent_at(STEPS_QUEUE),
    )


def _redis_up(value: float | None = None) -> GaugeMetricFamily:
    return GaugeMetricFamily(
        "ponos_redis_up", "1 when the agent's Redis answered this scrape, else 0", value=value
    )


def _histogram(name: str, help_text: str, buckets, total: float):
    """A histogram from cumulative (bound, count) buckets ending with +Inf (its count)."""
    family = HistogramMetricFamily(name, help_text)
    family.add_metric(
        [], [(floatToGoString(bound), value) for bound, value in buckets], sum_value=total
    )
    return family


class PonosCollector:
    """Prometheus collector reading the agent's state from Redis on each scrape."""

    def __init__(
        self,
        client: redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        *,
        now: Callable[[], float] = time.time,
        settings=None,
    ):
        self.client = client
        self.prefix = prefix
        self.now = now
        self.settings = settings  # settings.Settings: the budget's limits (headroom), if given

    def describe(self):
        """Every family this collector exports, without samples (no Redis read: from an
        empty state); the alert rules and the dashboard are checked against these names."""
        yield _redis_up()
        yield from self.families(
            AgentState(now=0.0, records={}, instances=[], snapshot_taken_at=None, last_sync_at=None)
        )

    def collect(self):
        try:
            state = read_agent_state(self.client, self.prefix, now=self.now)
            state.spend = read_spend(self.client, self.prefix, state.now, self.settings)
        except redis.RedisError:
            yield _redis_up(0)
            return
        yield _redis_up(1)
        yield from self.families(state)

    @staticmethod
    def families(state: AgentState):
        yield labelled(
            GaugeMetricFamily,
            "ponos_tasks",
            "Task records per phase (done: tombstones still kept)",
            ["phase"],
            state.tasks_per_phase.items(),
        )

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

        yield labelled(
            CounterMetricFamily,
            "ponos_instances_destroyed",
            "Instances destroyed by the sync loop (orphans, stale attempts, duplicates, ...)",
            ["cause"],
            sorted(state.destroyed.items()),
        )

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

        yield labelled(
            GaugeMetricFamily,
            "ponos_queue_messages",
            "Messages waiting in a Celery queue of the agent (sync, steps) for a worker",
            ["queue"],
            sorted(state.queue_messages.items()),
        )
        yield GaugeMetricFamily(
            "ponos_steps_queue_oldest_age_seconds",
            "Seconds the oldest chain step waiting in the steps queue has waited (0: none)",
            value=state.age(state.steps_oldest_sent_at) or 0.0,
        )

        yield GaugeMetricFamily(
            "ponos_instances_orphaned",
            "Live instances in the last snapshot that no active task holds (a leak if it stays)",
            value=len(state.orphaned_instances),
        )
        yield from measured_families(state.measurements)
        yield from spend_families(state)


def labelled(family: type, name: str, doc: str, labels: list[str], counts: Iterable) -> object:
    """A metric family with one sample per (label value(s), count) of `counts`; a label value
    is a string, or a tuple of strings when there are several labels."""
    metric = family(name, doc, labels=labels)
    for key, count in counts:
        metric.add_metric(list(key) if isinstance(key, tuple) else [key], count)
    return metric


def measured_families(measurements: Measurements):
    """What the workers measured (metric_store): API calls and 429s, start failures, waits."""
    yield labelled(
        CounterMetricFamily,
        "ponos_api_calls",
        "Requests sent, per API (vast, arkindex, s3) and endpoint (Arkindex: operation id)",
        ["api", "endpoint"],
        sorted(measurements.api_calls.items()),
    )
    yield labelled(
        CounterMetricFamily,
        "ponos_api_rate_limited",
        "429 (rate limited) answers, per API and endpoint",
        ["api", "endpoint"],
        sorted(measurements.api_rate_limited.items()),
    )
    yield labelled(
        CounterMetricFamily,
        "ponos_start_failures",
        "Instances that did not start a task (a create refused or an attempt given up), per reason",
        ["reason"],
        sorted(measurements.start_failures.items()),
    )
    for spec in HISTOGRAMS:
        # Never observed yet (or no Redis read: describe()): zeros, so the series exists.
        value = measurements.histograms.get(spec.name) or cumulative(spec, {})
        yield _histogram(f"ponos_{spec.name}", spec.help, value.buckets, value.sum)


def spend_families(state: AgentState):
    """Spend as the budget's meter counts it (the Vast.ai ledger's way: GPU while running,
    storage from create to destroy), and what is left of the day's budget."""
    spend = state.spend
    total = CounterMetricFamily(
        "ponos_spend_dollars", "$ metered since the meter began in this Redis (budget.py)"
    )
    today = GaugeMetricFamily("ponos_spend_today_dollars", "$ metered this UTC day")
    left = GaugeMetricFamily(
        "ponos_budget_headroom_dollars",
        "$ left under a spending limit, the live tasks' commitments counted "
        "(limit=max_spend_per_day; only with --config and that limit set)",
        labels=["limit"],
    )
    if spend is not None:
        total.add_metric([], spend.total)
        today.add_metric([], spend.today)
        if spend.day_left is not None:
            left.add_metric(["max_spend_per_day"], spend.day_left)
    yield from (total, today, left)


def exposed_sample_names(collector: PonosCollector) -> set[str]:
    """The names PromQL sees for the collector's families: a gauge's own, a counter's with
    `_total`, a histogram's `_bucket`, `_count` and `_sum`."""
    names = set()
    for family in collector.describe():
        if family.type == "counter":
            names.add(family.name + "_total")
        elif family.type == "histogram":
            names.update(family.name + suffix for suffix in ("_bucket", "_count", "_sum"))
        else:
            names.add(family.name)
    return names


def make_registry(
    client: redis.Redis,
    prefix: str = DEFAULT_PREFIX,
    *,
    now: Callable[[], float] = time.time,
    settings=None,
) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(PonosCollector(client, prefix, now=now, settings=settings))
    return registry


def serve_metrics(
    client: redis.Redis,
    prefix: str = DEFAULT_PREFIX,
    *,
    host: str = "127.0.0.1",
    port: int = 9808,
    now: Callable[[], float] = time.time,
    settings=None,
):
    """Serve /metrics in a daemon thread; returns (server, thread). server.server_port is
    the bound port (useful with port 0); server.shutdown() stops it."""
    registry = make_registry(client, prefix, now=now, settings=settings)
    return start_http_server(port, addr=host, registry=registry)
