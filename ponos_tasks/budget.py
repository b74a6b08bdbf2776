"""The money arithmetic of the `budget:` section (README, "Budgets"). Pure: no Redis, HTTP,
Celery or clock; every time is a parameter (agent seconds, UTC epoch).

Three parts:

- **The meter**: what the instances cost, counted like Vast.ai's ledger (GPU while an
  instance is `running`, storage from create to destroy, docs/reference.md §1.4) from what
  each sync's listing shows. It errs on the side of counting: an interval between two
  listings is charged GPU when the instance ran at either end of it or its status changed
  in between (loading then exited: it ran meanwhile); an instance that left the listing is
  charged up to the listing that no longer shows it; one first seen, from its `start_date`.
  What it cannot see: a whole run that starts and ends between two listings and comes back
  to the same status (exited, restarted, loading, running, exited again); Vast.ai's restart
  delay and an image's start take longer than a sync interval.
- **Commitments and room**: what the live tasks may still cost, and so how much a new
  instance may cost per hour (`room_for_new`). Every limit becomes a ceiling on the new
  instance's $/h (its *allowance*); the sync loop grants allowances in arrival order and a
  task only rents an offer within its own.
- **The per-task cap**: when a task must be ended to stay within `max_spend_per_task`.

The read API for the metrics and the status view is at the end: `spend_today(store, now)`,
`task_spend(store, task_id)` and `headroom(settings, store, now)`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from ponos_tasks.lifecycle import Condition, Phase, classify_instance, parse_label
from ponos_tasks.models import Instance, TaskRecord

# The limits a waiting task can be held by (TaskRecord.held_by, `status`'s `held_by`).
MAX_INSTANCES = "max_instances"
MAX_DPH_TOTAL = "max_dph_total"
MAX_SPEND_PER_DAY = "max_spend_per_day"
MAX_SPEND_PER_TASK = "max_spend_per_task"
NO_OFFER = "offers"  # no offer matches the filters (max_dph_per_instance is one of them)

DAY = 86400.0
HOUR = 3600.0
# No instance costs less ($/h): a room below it is none (and rounding errors are no room).
MIN_DPH = 1e-4


@dataclass(frozen=True)
class Limits:
    """The `budget:` section's money limits (max_instances lives in Settings: it is a count,
    planned by reconcile's capacity slots)."""

    max_dph_per_instance: float | None = None
    max_dph_total: float | None = None
    max_spend_per_task: float | None = None
    max_spend_per_day: float | None = None
    billing_time_scale: float = 1.0

    @classmethod
    def from_config(cls, budget: Any) -> Limits:
        return cls(
            max_dph_per_instance=budget.max_dph_per_instance,
            max_dph_total=budget.max_dph_total,
            max_spend_per_task=budget.max_spend_per_task,
            max_spend_per_day=budget.max_spend_per_day,
            billing_time_scale=float(budget.billing_time_scale),
        )

    @property
    def rations(self) -> bool:
        """Whether new instances need an allowance (a limit shared by all instances)."""
        return self.max_dph_total is not None or self.max_spend_per_day is not None

    def billed_hours(self, agent_seconds: float) -> float:
        return max(0.0, agent_seconds) * self.billing_time_scale / HOUR


# ------------------------------------------------------------------------------ UTC days


def utc_day(t: float) -> str:
    """The UTC day of an epoch time, as YYYY-MM-DD (the day counters' key)."""
    return datetime.fromtimestamp(t, UTC).strftime("%Y-%m-%d")


def seconds_to_midnight(t: float) -> float:
    moment = datetime.fromtimestamp(t, UTC)
    midnight = (moment + timedelta(days=1)).replace(hour=0, minute=0, second=0, microsecond=0)
    return midnight.timestamp() - t


def split_by_day(start: float, end: float) -> list[tuple[str, float]]:
    """[start, end) cut at UTC midnights: (day, seconds) in order; [] when end <= start."""
    parts = []
    while end > start:
        cut = min(end, start + seconds_to_midnight(start))
        parts.append((utc_day(start), cut - start))
        start = cut
    return parts


# ------------------------------------------------------------------------------ the meter

# actual_status values in which Vast.ai bills no GPU (docs/reference.md §1.4: GPU is billed
# while running or frozen; nothing while offline). Any other value, one never seen
# included, is charged: the meter errs on the side of counting.
NO_GPU_STATUSES = frozenset({None, "created", "loading", "stopped", "exited", "offline"})


@dataclass(frozen=True)
class Rates:
    """An instance's price, $/h: the GPU part (billed while running) and the disk part."""

    gpu: float
    storage: float

    @property
    def total(self) -> float:
        return self.gpu + self.storage


def _number(value: Any) -> float | None:
    try:
        number = float(value)
    except (TypeError, ValueError):
        return None
    return number if math.isfinite(number) and number >= 0 else None


def instance_rates(instance: Instance) -> Rates:
    """From the listing's `dph_base` (GPU) and `storage_total_cost` (disk, $/h). A missing
    part is taken as the whole `dph_total`: too much rather than too little."""
    raw = instance.raw
    total = _number(instance.dph_total)
    gpu, storage = _number(raw.get("dph_base")), _number(raw.get("storage_total_cost"))
    if gpu is None:
        gpu = total if total is not None else 0.0
    if storage is None:
        storage = total if total is not None else 0.0
    return Rates(gpu, storage)


@dataclass(frozen=True)
class Observation:
    """One instance of ours as one listing showed it."""

    instance_id: int
    task_id: str | None
    rates: Rates
    gpu_billed: bool
    start_date: float | None
    live: bool
    status: str | None = None  # actual_status

    @classmethod
    def of(cls, instance: Instance) -> Observation:
        info = parse_label(instance.label)
        status = instance.actual_status or None
        return cls(
            instance_id=instance.id,
            task_id=info.task_id if info else None,
            rates=instance_rates(instance),
            gpu_billed=status not in NO_GPU_STATUSES,
            start_date=_number(instance.start_date),
            live=classify_instance(instance) is not Condition.GONE,
            status=status,
        )


@dataclass(frozen=True)
class Metered:
    """What the meter knows of one live instance: charged up to `until` (agent time)."""

    task_id: str | None
    until: float
    gpu_billed: bool
    gpu: float
    storage: float
    status: str | None = None  # actual_status then

    @property
    def rates(self) -> Rates:
        return Rates(self.gpu, self.storage)

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Metered:
        keys = ("task_id", "until", "gpu_billed", "gpu", "storage", "status")
        return cls(**{key: data[key] for key in keys if key in data})


def charge(start: float, end: float, rates: Rates, gpu: bool, scale: float) -> dict[str, float]:
    """$ per UTC day for [start, end): storage always, GPU when `gpu`."""
    rate = rates.storage + (rates.gpu if gpu else 0.0)
    return {day: seconds * scale * rate / HOUR for day, seconds in split_by_day(start, end)}


@dataclass
class MeterPass:
    """What one pass adds: $ per day and per task, the new meter entries, the instances gone."""

    entries: dict[int, Metered]
    gone: list[int]
    days: dict[str, float]
    tasks: dict[str, float]

    def add(self, task_id: str | None, amounts: Mapping[str, float]) -> None:
        for day, amount in amounts.items():
            self.days[day] = self.days.get(day, 0.0) + amount
            if task_id is not None:
                self.tasks[task_id] = self.tasks.get(task_id, 0.0) + amount


def meter_pass(
    meter: Mapping[int, Metered],
    observed: Iterable[Observation],
    *,
    now: float,
    epoch: float,
    scale: float,
) -> MeterPass:
    """Charge every instance from where the meter left it up to `now`.

    - known and still live: since `until`; GPU when it was billed then or is billed now, or
      when its status changed in between;
    - first seen: storage since its `start_date` (never later than now); GPU from then too
      when it runs now, or when it was created before the meter began (`epoch`): the meter
      of an earlier life was lost with Redis, and it may have run all along;
    - known but no longer live (destroyed, or missing from the listing): up to now, as it
      was last seen: it went at some moment since the last listing.
    """
    result = MeterPass({}, [], {}, {})
    seen: set[int] = set()
    for obs in observed:
        previous = meter.get(obs.instance_id)
        if not obs.live:
            continue  # handled below with the missing ones, if the meter knew it
        seen.add(obs.instance_id)
        if previous is None:
            start = min(now, obs.start_date if obs.start_date is not None else now)
            gpu = obs.gpu_billed or start < epoch
        else:
            start = previous.until
            gpu = previous.gpu_billed or obs.gpu_billed or previous.status != obs.status
        rates = obs.rates if previous is None else _dearer(previous.rates, obs.rates)
        result.add(obs.task_id, charge(start, now, rates, gpu, scale))
        result.entries[obs.instance_id] = Metered(
            obs.task_id,
            max(now, start),
            obs.gpu_billed,
            obs.rates.gpu,
            obs.rates.storage,
            obs.status,
        )
    for instance_id, previous in meter.items():
        if instance_id in seen:
            continue
        result.gone.append(instance_id)
        result.add(
            previous.task_id,
            charge(previous.until, now, previous.rates, previous.gpu_billed, scale),
        )
    return result


def _dearer(a: Rates, b: Rates) -> Rates:
    return Rates(max(a.gpu, b.gpu), max(a.storage, b.storage))


# ------------------------------------------------------------------ commitments and room


@dataclass(frozen=True)
class Commitment:
    """What one task burns or may burn ($/h) and has spent ($)."""

    task_id: str
    dph: float
    spent: float = 0.0


def task_commitments(
    records: Mapping[str, TaskRecord],
    instances: Sequence[Instance],
    spent: Mapping[str, float] | None = None,
) -> dict[str, Commitment]:
    """Per task: its live instances' $/h (every attempt's: a kept or duplicate instance bills
    too; a recorded instance the listing does not show yet counts), or, for a task about to
    rent (its allowance granted), that allowance when it is more: the instance it rents may
    cost that much, and the failed attempt's kept instance goes right before it is created.
    Instances whose task has no record count too (they bill until adopted or destroyed)."""
    spent = spent or {}
    burning: dict[str, float] = {}
    listed: set[int] = set()
    for instance in instances:
        listed.add(instance.id)
        info = parse_label(instance.label)
        if info is None or classify_instance(instance) is Condition.GONE:
            continue
        burning[info.task_id] = burning.get(info.task_id, 0.0) + instance_rates(instance).total
    for task_id, record in records.items():
        if (
            record.phase in (Phase.LOADING, Phase.RUNNING, Phase.FINISHING, Phase.DESTROYING)
            and record.instance_id is not None
            and record.instance_id not in listed
            and not record.instance_destroyed
        ):
            burning[task_id] = burning.get(task_id, 0.0) + (record.dph_total or 0.0)
    result = {}
    for task_id in set(burning) | set(records):
        dph = burning.get(task_id, 0.0)
        record = records.get(task_id)
        if record is not None and about_to_rent(record):
            dph = max(dph, record.budget_allowance or 0.0)
        if dph > 0 or task_id in spent:
            result[task_id] = Commitment(task_id, dph, spent.get(task_id, 0.0))
    return result


def about_to_rent(record: TaskRecord) -> bool:
    """The task may rent an instance within its allowance at any moment."""
    if record.phase in (Phase.WAITING_OFFER, Phase.CREATING, Phase.RETRYING):
        return True
    return record.phase == Phase.ACCEPTED and record.budget_allowance is not None


def exposure(commitment: Commitment, hours: float, limits: Limits) -> float:
    """The most a task can still cost in `hours` billed hours: its $/h all along, or what its
    max_spend_per_task leaves, whichever is less."""
    # An allowance of any price (math.inf) is bounded by the task's cap alone.
    worst = commitment.dph * hours if hours > 0 else 0.0
    if limits.max_spend_per_task is not None:
        worst = min(worst, max(0.0, limits.max_spend_per_task - commitment.spent))
    return worst


@dataclass(frozen=True)
class Spending:
    """What the sync loop read of the meter for one plan."""

    spent_today: float = 0.0
    task_spent: Mapping[str, float] = field(default_factory=dict)
    cheapest: float | None = None  # $/h of the cheapest matching offer seen lately


@dataclass(frozen=True)
class Room:
    """What a new instance may cost ($/h): None when no limit is shared (no allowance
    needed); `limit` names the tightest limit, `why` says it in words."""

    dph: float | None
    limit: str | None = None
    why: str = ""

    def holds(self, cheapest: float | None) -> bool:
        """Whether the room is too small for any instance (the cheapest matching offer seen
        lately, or any positive price when none was seen)."""
        if self.dph is None:
            return False
        return self.dph < max(cheapest or 0.0, MIN_DPH)


def room_for_new(
    limits: Limits, others: Iterable[Commitment], *, spent_today: float, now: float
) -> Room:
    """The $/h a new instance may cost, the other tasks' commitments `others` being kept.

    - max_dph_total: what the others' $/h leave.
    - max_spend_per_day: no UTC day may cost more, even if every live task ran on until
      its max_spend_per_task or the end of the day. Today: what is spent, plus what each
      task may still cost before midnight; a later day: what each task may cost in a whole
      day. A new task commits the same (its $/h over the hours, or its max_spend_per_task):
      its $/h may be what is left over the hours, or anything when its max_spend_per_task
      fits in what is left.
    """
    if not limits.rations:
        return Room(None)
    others = list(others)
    ceiling, limit, why = math.inf, None, ""
    if limits.max_dph_total is not None:
        left = limits.max_dph_total - sum(c.dph for c in others)
        ceiling, limit = left, MAX_DPH_TOTAL
        why = (
            f"max_dph_total ${limits.max_dph_total:g}/h: the live instances and those being "
            f"rented leave ${max(left, 0.0):.4f}/h"
        )
    if limits.max_spend_per_day is not None:
        today = limits.billed_hours(seconds_to_midnight(now))
        whole_day = limits.billed_hours(DAY)
        for hours, spent, when in ((today, spent_today, "today"), (whole_day, 0.0, "a later day")):
            left = (
                limits.max_spend_per_day - spent - sum(exposure(c, hours, limits) for c in others)
            )
            cap = limits.max_spend_per_task
            if cap is not None and cap <= left:
                continue  # a whole task fits in what is left
            rate = max(left, 0.0) / hours if hours > 0 else 0.0
            if rate < ceiling:
                ceiling, limit = rate, MAX_SPEND_PER_DAY
                why = (
                    f"max_spend_per_day ${limits.max_spend_per_day:g}: {when}, what is spent "
                    f"and what the live tasks may still cost leave ${max(left, 0.0):.4f}"
                    + (f", ${rate:.4f}/h until midnight UTC" if when == "today" else "")
                )
    return Room(max(ceiling, 0.0) if math.isfinite(ceiling) else None, limit, why)


def room_excluding(
    limits: Limits,
    commitments: Mapping[str, Commitment],
    task_id: str | None,
    *,
    spent_today: float,
    now: float,
) -> Room:
    others = [c for t, c in commitments.items() if t != task_id]
    return room_for_new(limits, others, spent_today=spent_today, now=now)


def startable(
    limits: Limits,
    others: Iterable[Commitment],
    *,
    spent_today: float,
    now: float,
    cheapest: float | None,
    slots: int,
) -> int:
    """How many new tasks could start now (at most `slots`): one more while the room holds
    an instance at the cheapest price seen lately, each counted as committing that price
    (or its max_spend_per_task). One at most while no price was seen yet."""
    if not limits.rations or slots <= 0:
        return max(0, slots)
    others = list(others)
    count = 0
    while count < slots:
        room = room_for_new(limits, others, spent_today=spent_today, now=now)
        if room.holds(cheapest):
            break
        count += 1
        if not cheapest:
            break
        others.append(Commitment(f"(new task {count})", cheapest))
    return count


def rebuilt_day_spend(
    limits: Limits, counted: float, commitments: Iterable[Commitment], *, now: float
) -> float:
    """Today's spend after Redis (and the day's counter with it) was lost.

    The instances still alive tell what they cost (`counted`, charged from their creation,
    GPU all along); those destroyed earlier today are gone from every listing. The agent kept
    to its own rule until the loss (`room_for_new`): what was spent today plus what the live
    tasks could still cost before midnight stayed within max_spend_per_day. So the day may
    have cost up to max_spend_per_day minus what the live tasks may still cost, and no more:
    that (or `counted`, if more) is taken as spent. No new instance starts until running
    tasks end and give back what they were allowed; a day never costs more than its limit
    because a counter was lost.
    """
    if limits.max_spend_per_day is None:
        return counted
    hours = limits.billed_hours(seconds_to_midnight(now))
    bound = limits.max_spend_per_day - sum(exposure(c, hours, limits) for c in commitments)
    return max(counted, bound)


# ------------------------------------------------------------------------- per-task cap


def spend_now(
    spent: float, until: float | None, dph: float, *, now: float, limits: Limits
) -> float:
    """A task's spend at `now`: what the meter counted, plus its instance's full price since
    the meter last charged it (`until`; None: nothing was charged yet)."""
    unmetered = 0.0 if until is None else limits.billed_hours(now - until) * dph
    return spent + unmetered


def over_task_cap(spend: float, dph: float, *, margin: float, limits: Limits) -> str | None:
    """Why the task must end now to stay within max_spend_per_task (None: it may go on).
    `margin`: agent seconds that ending it takes, paid at its full price."""
    cap = limits.max_spend_per_task
    if cap is None:
        return None
    if spend + limits.billed_hours(margin) * dph < cap:
        return None
    return (
        f"it reached its spending limit (max_spend_per_task ${cap:g}): ${spend:.4f} spent, "
        f"and its instance costs ${dph:.4f}/h"
    )


# ------------------------------------------------------------------------- the read API


def spend_today(store: Any, now: float) -> float:
    """$ the agent's instances cost today (UTC), as metered (state.BudgetStore)."""
    return store.spent_on(utc_day(now))


def task_spend(store: Any, task_id: str) -> float:
    """$ a task's instances (every attempt) cost so far, as metered."""
    return store.task_spent([task_id]).get(task_id, 0.0)


@dataclass(frozen=True)
class Headroom:
    """How far the agent is from each limit (None: the limit is not set)."""

    spent_today: float
    instances: int  # live instances of the last snapshot
    instances_left: int
    dph: float  # the live tasks' commitments, $/h
    dph_left: float | None  # under max_dph_total
    day_left: float | None  # $ under max_spend_per_day, the live tasks' commitments counted
    new_instance_dph: float | None  # what a new instance may cost now ($/h; None: anything)
    held_by: str | None  # the limit that stops new instances now, if any

    def to_dict(self) -> dict:
        return asdict(self)


def status_figures(store: Any, now: float, settings: Any = None) -> dict:
    """The budget's part of `ponos-vast status --json`: today's spend (and whether its
    counter was rebuilt after a loss of Redis), each task's spend, and with the agent's
    settings the headroom."""
    records = store.tasks.all_records(include_done=True)
    return {
        "metering": store.metering(),  # False: no sync has metered anything in this Redis
        "spent_today": round(spend_today(store, now), 6),
        "spent_today_rebuilt": store.rebuilt(utc_day(now)),
        "task_spend": {t: round(v, 6) for t, v in store.task_spent(sorted(records)).items()},
        "headroom": None if settings is None else headroom(settings, store, now).to_dict(),
    }


def headroom(settings: Any, store: Any, now: float) -> Headroom:
    """The agent's headroom from Redis alone: `settings` (settings.Settings) and the
    state.BudgetStore (its task store reads records and the snapshot)."""
    limits: Limits = settings.budget
    records = store.tasks.all_records(include_done=False)
    snapshot = store.tasks.load_snapshot()
    instances = list(snapshot.instances) if snapshot is not None else []
    spent = spend_today(store, now)
    commitments = task_commitments(records, instances, store.task_spent(list(records)))
    live = sum(1 for i in instances if classify_instance(i) is not Condition.GONE)
    room = room_for_new(limits, commitments.values(), spent_today=spent, now=now)
    hours = limits.billed_hours(seconds_to_midnight(now))
    cheapest = store.cheapest()
    # An allowance of any price (a task the daily budget affords whole) has no $/h to add.
    dph = sum(c.dph for c in commitments.values() if math.isfinite(c.dph))
    held = (
        MAX_INSTANCES
        if live >= settings.max_instances
        else (room.limit if room.holds(cheapest) else None)
    )
    return Headroom(
        spent_today=spent,
        instances=live,
        instances_left=max(0, settings.max_instances - live),
        dph=dph,
        dph_left=None if limits.max_dph_total is None else limits.max_dph_total - dph,
        day_left=None
        if limits.max_spend_per_day is None
        else limits.max_spend_per_day
        - spent
        - sum(exposure(c, hours, limits) for c in commitments.values()),
        new_instance_dph=room.dph,
        held_by=held,
    )
