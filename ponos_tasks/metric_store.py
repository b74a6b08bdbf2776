"""The agent's own measurements in Redis: counters and histograms that any process of the agent
(every worker on every machine) adds to, and that the Prometheus collector (metrics.py) reads
on each scrape.

Keys, under the agent's prefix (state.Keyspace.metric):

    metrics:api_calls          hash   "<api>:<endpoint>" -> requests sent (answered or not)
    metrics:api_rate_limited   hash   "<api>:<endpoint>" -> 429 answers among them
    metrics:start_failures     hash   kind (lifecycle.StartFailureKind) -> failed starts
    metrics:hist:<name>        hash   "le:<bound>" -> observations in that bucket alone (not
                                      cumulative: one HINCRBY per observation), "count", "sum"

Why in Redis and not in each process: prefork children, beat and several hosts would each
hold a part of a counter; here one pipelined round trip adds to the shared value, and a scrape
reads the agent's whole history. The keys have no TTL: they live as long as Redis does (a
Redis that lost its data resets them, which Prometheus' rate() and increase() handle as a
counter reset).

Writing is best effort: a measurement that cannot be written is lost, never a failed call or
step (a RedisError is logged at debug level and swallowed).
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import redis

from ponos_tasks.state import Keyspace

if TYPE_CHECKING:
    from ponos_tasks.lifecycle import StartFailureKind

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class HistogramSpec:
    """A histogram kept in Redis: its metric name (without the ponos_ prefix of the
    exposition), help text and bucket upper bounds (ascending; +Inf is implied)."""

    name: str
    help: str
    bounds: tuple[float, ...]

    def bucket_of(self, value: float) -> str:
        """The field of the one bucket `value` falls in (the smallest bound >= value)."""
        for bound in self.bounds:
            if value <= bound:
                return f"le:{bound:g}"
        return "le:+Inf"


PENDING_TO_RUNNING = HistogramSpec(
    "task_pending_to_running_seconds",
    "Seconds from the agent accepting a task (pending on Arkindex) to Arkindex being told it runs",
    (10, 30, 60, 120, 300, 600, 1200, 1800, 3600, 7200),
)
END_TO_DESTROY = HistogramSpec(
    "task_end_to_destroy_seconds",
    "Seconds from a task's outcome being decided to its instance being destroyed (storage "
    "still bills meanwhile)",
    (1, 5, 10, 30, 60, 120, 300, 600, 1800, 3600),
)
OFFERS_MATCHED = HistogramSpec(
    "offers_matched",
    "Offers that matched the filters, per offer search (machines a task failed on left out)",
    (0, 1, 2, 5, 10, 20, 50),
)
HISTOGRAMS: tuple[HistogramSpec, ...] = (PENDING_TO_RUNNING, END_TO_DESTROY, OFFERS_MATCHED)


@dataclass(frozen=True)
class HistogramValue:
    """A histogram as Prometheus exposes it: cumulative bucket counts (bound, count) ending
    with +Inf, the count and the sum."""

    buckets: tuple[tuple[float, int], ...]
    count: int
    sum: float


@dataclass
class Measurements:
    """Everything MetricStore.read() found."""

    api_calls: dict[tuple[str, str], int] = field(default_factory=dict)
    api_rate_limited: dict[tuple[str, str], int] = field(default_factory=dict)
    start_failures: dict[str, int] = field(default_factory=dict)
    histograms: dict[str, HistogramValue] = field(default_factory=dict)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _api_counts(raw: Mapping) -> dict[tuple[str, str], int]:
    counts = {}
    for key, value in raw.items():
        api, _, endpoint = _text(key).partition(":")
        counts[(api, endpoint)] = int(value)
    return counts


def cumulative(spec: HistogramSpec, raw: Mapping) -> HistogramValue:
    """The histogram from its stored per-bucket counts. A bucket field no bound names (the
    bounds changed since it was written) still counts in +Inf, through `count`."""
    fields = {_text(k): v for k, v in raw.items()}
    total = int(fields.get("count", 0))
    running = 0
    buckets = []
    for bound in spec.bounds:
        running += int(fields.get(f"le:{bound:g}", 0))
        buckets.append((float(bound), running))
    buckets.append((math.inf, total))
    return HistogramValue(tuple(buckets), total, float(fields.get("sum", 0.0)))


class MetricStore:
    """Adds to and reads the agent's measurements (layout above)."""

    def __init__(self, redis_client: redis.Redis, keys: Keyspace):
        self.redis = redis_client
        self.keys = keys

    def _write(self, what: str, commands) -> None:
        pipe = self.redis.pipeline(transaction=False)
        commands(pipe)
        try:
            pipe.execute()
        except redis.RedisError as error:
            logger.debug("measurement %s not recorded: %s", what, error)

    # ------------------------------------------------------------------ writing

    def count_api_call(self, api: str, endpoint: str, status: int | None) -> None:
        """One request sent to `api` ("vast", "arkindex", "s3"); `status` is its HTTP status,
        None when no answer came."""
        field_name = f"{api}:{endpoint}"

        def commands(pipe):
            pipe.hincrby(self.keys.metric("api_calls"), field_name, 1)
            if status == 429:
                pipe.hincrby(self.keys.metric("api_rate_limited"), field_name, 1)

        self._write(f"call {field_name}", commands)

    def count_start_failure(self, kind: StartFailureKind | str) -> None:
        self._write(
            f"start failure {kind}",
            lambda pipe: pipe.hincrby(self.keys.metric("start_failures"), str(kind), 1),
        )

    def observe(self, spec: HistogramSpec, value: float) -> None:
        """Add one observation to a histogram (a negative value, from clocks that disagree,
        counts as 0)."""
        value = max(0.0, float(value))
        key = self.keys.metric(f"hist:{spec.name}")

        def commands(pipe):
            pipe.hincrby(key, spec.bucket_of(value), 1)
            pipe.hincrby(key, "count", 1)
            pipe.hincrbyfloat(key, "sum", value)

        self._write(spec.name, commands)

    # ------------------------------------------------------------------ reading

    def read(self, histograms: Sequence[HistogramSpec] = HISTOGRAMS) -> Measurements:
        """Every counter and histogram, in one round trip (raises redis errors)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.hgetall(self.keys.metric("api_calls"))
        pipe.hgetall(self.keys.metric("api_rate_limited"))
        pipe.hgetall(self.keys.metric("start_failures"))
        for spec in histograms:
            pipe.hgetall(self.keys.metric(f"hist:{spec.name}"))
        calls, limited, failures, *hists = pipe.execute()
        return Measurements(
            api_calls=_api_counts(calls),
            api_rate_limited=_api_counts(limited),
            start_failures={_text(k): int(v) for k, v in failures.items()},
            histograms={
                spec.name: cumulative(spec, raw)
                for spec, raw in zip(histograms, hists, strict=True)
            },
        )
