"""The sync loop, as plain functions of a context: one tick (`sync`: Arkindex's actions,
the instances, plan(), what to send), the ended check between two ticks (`check_ended`), and
the hold that keeps a backlogged queue from feeding itself (`message_headers`,
`_still_queued`). No Celery here: tasks.py wires them to Celery beat; the per-task chain
they start and resume is steps.py's.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable
from dataclasses import dataclass, field

from ponos_tasks import create_line, view
from ponos_tasks.agent import AgentContext
from ponos_tasks.budget import (
    Observation,
    Spending,
    meter_pass,
    rebuilt_day_spend,
    task_commitments,
    utc_day,
)
from ponos_tasks.lifecycle import Phase, parse_label
from ponos_tasks.models import (
    SENT_AT_HEADER,
    SEQ_HEADER,
    STEPS_QUEUE,
    Instance,
    Next,
    Snapshot,
    StepName,
)
from ponos_tasks.reconcile import (
    AcceptTask,
    GrantAllowance,
    ResumeStep,
    StartChain,
    WaitForCapacity,
    capacity,
    plan,
)
from ponos_tasks.state import ended_wake, kept_alive, release
from ponos_tasks.steps import (
    ViewRefused,
    accept,
    instance_reads,
    note_task,
    refresh_view,
    set_waiting,
)
from ponos_tasks.vast import VastError

logger = logging.getLogger(__name__)


@dataclass
class SyncResult:
    ran: bool
    steps: list = field(default_factory=list)  # what plan() said
    enqueue: list[tuple[str, Next]] = field(default_factory=list)  # (task id, message)
    held: list[str] = field(default_factory=list)  # tasks whose chain message still waits


# Chain messages the sync sends again when a chain makes no progress. A chain that only waits
# its turn in a backlogged queue makes none either: sending it again then adds a copy behind
# the first, each copy adds to the backlog, and the backlog feeds itself (a 1000-task burst
# once piled up 16 000 messages in 4 minutes, nine in ten of them copies of choose_offer).
# So the sync holds one while the message of the same step it sent last may still wait there.
HELD_WHILE_QUEUED = (ResumeStep, StartChain)


def message_headers(ctx: AgentContext, task_id: str, step: str) -> dict:
    """The headers of a message of `step` about to be sent for the task: its send time (the
    queue's age, for metrics and logs) and its number, noted as the mark of (task, step) for
    the sync's hold (`_still_queued`). Every message is noted, a countdown's too: a worker
    takes one at once and holds it until it is due, but a worker whose processes are all
    busy takes nothing, and then it waits in the queue like any other."""
    seq = ctx.store.note_queued(task_id, step)
    return {SENT_AT_HEADER: ctx.now(), SEQ_HEADER: seq}


def _still_queued(ctx: AgentContext, task_id: str, step: str, oldest_seq: int | None) -> bool:
    """Whether the last message of `step` sent for the task may still wait in the steps
    queue: the queue is FIFO, so it does while the oldest waiting message is numbered no
    later than it. Numbers come from one Redis counter, so no host's clock plays a part, and
    the mark is per step, so the task's other messages (a destroy the sync sends again, a
    log upload) do not move it. Unknown (no mark, empty queue, an older agent's message):
    not waiting, the message is sent as before. A message taken by a worker that then died
    is not waiting: the stall is resumed once the queue has moved past it.

    Two senders may number their messages in one order and push them in the other: the
    oldest waiting message is then numbered after one still waiting behind it, and that one's
    chain is sent again once (a copy, as before the hold), or it is numbered before one
    already taken, and that one's chain is held until it is taken (one more wait)."""
    if oldest_seq is None:
        return False
    marked = ctx.store.queued_seq(task_id, step)
    return marked is not None and oldest_seq <= marked


# Sends (task id, next step) messages at once (the Celery sync task's enqueue).
SendNow = Callable[[list[tuple[str, Next]]], None]


def sync(ctx: AgentContext, send_now: SendNow | None = None) -> SyncResult:
    """One tick of the loop (single-flight): actions, snapshot, plan(), what to enqueue.

    `send_now(items)`, when given, sends the watches of ended instances the flat view's A
    shows as soon as it has listed them (the Celery task passes it); without it they are
    woken with the result's `enqueue`, after every listing call succeeded, as before."""
    timeout = ctx.settings.sync_lock_timeout
    lock = ctx.store.sync_lock(timeout=timeout)
    if not lock.acquire():
        return SyncResult(ran=False)
    try:
        with kept_alive(lock, every=timeout / 3):
            return _sync_locked(ctx, send_now)
    finally:
        release(lock)


def _capacity(ctx: AgentContext) -> int:
    """How many new tasks Arkindex may assign us now: as many as could start now (one per
    free instance slot, within the budget's room: reconcile.capacity). Nothing is refused
    that could run later: what cannot start is not asked for."""
    if not ctx.settings.budget.rations:
        return max(0, ctx.settings.max_instances - len(ctx.store.active_ids()))
    records = ctx.store.all_records(include_done=False)
    snapshot = ctx.store.load_snapshot()
    instances = snapshot.instances if snapshot is not None else ()
    return capacity(records, instances, ctx.settings, ctx.now(), current_spending(ctx, records))


def current_spending(ctx: AgentContext, records) -> Spending:
    return Spending(
        spent_today=ctx.budget.spent_on(utc_day(ctx.now())),
        task_spent=ctx.budget.task_spent(sorted(records)),
        cheapest=ctx.budget.cheapest(),
    )


def _meter(ctx: AgentContext, instances, now: float) -> None:
    """Charge what the instances cost since the last sync (budget.meter_pass).

    A meter that begins while instances of ours are alive lost its memory with Redis: today's
    counter is then rebuilt as the most the day can have cost (budget.rebuilt_day_spend),
    never less; the instances' own cost is charged from their creation, GPU all along."""
    limits = ctx.settings.budget
    epoch, fresh = ctx.budget.epoch(now)
    observed = [Observation.of(instance) for instance in instances]
    passed = ctx.budget.apply_meter(
        lambda meter: meter_pass(
            meter, observed, now=now, epoch=epoch, scale=limits.billing_time_scale
        )
    )
    if not (fresh and passed is not None and any(o.live for o in observed)):
        return
    day = utc_day(now)
    records = ctx.store.all_records(include_done=False)
    commitments = task_commitments(records, instances, ctx.budget.task_spent(sorted(passed.tasks)))
    spent = rebuilt_day_spend(limits, ctx.budget.spent_on(day), commitments.values(), now=now)
    ctx.budget.rebuild_day(day, spent)
    logger.warning(
        "the spend meter starts afresh while %d instance(s) of ours are alive (Redis lost its "
        "data?): today's spend is taken as $%.4f, the most it can have been",
        sum(1 for o in observed if o.live),
        spent,
    )


def _start_with_allowance(ctx: AgentContext, planned: StartChain) -> None:
    """Before its chain starts: the task's allowance (never lowered) and no waiting reason."""
    record = ctx.store.get(planned.task_id)
    if record is None or record.phase != Phase.ACCEPTED:
        return
    changes: dict = {}
    if planned.allowance is not None:
        allowance = max(planned.allowance, record.budget_allowance or 0.0)
        if allowance != record.budget_allowance:
            changes.update(budget_allowance=allowance, allowance_limit=planned.limit)
    if record.held_by is not None or record.waiting_for is not None:
        changes.update(held_by=None, waiting_for=None)
    if changes:
        ctx.store.cas(
            planned.task_id, expect_phase=Phase.ACCEPTED, expect_attempt=record.attempt, **changes
        )


def _grant(ctx: AgentContext, planned: GrantAllowance) -> None:
    """A larger allowance for a task about to rent; lost to a create that began meanwhile
    (the CAS fails), which then rents within the smaller one."""
    ctx.store.cas(
        planned.task_id,
        expect_phase=planned.phase,
        expect_attempt=planned.attempt,
        budget_allowance=planned.allowance,
        allowance_limit=planned.limit,
    )


def _sync_locked(ctx: AgentContext, send_now: SendNow | None = None) -> SyncResult:
    short_id = ctx.agent_short_id()

    def wake_early(listed: list[Instance]) -> None:
        send_now(_wake_watchers_of_listed(ctx, listed))

    capacity = _capacity(ctx)
    actions = ctx.arkindex.actions(capacity=capacity)
    # Stamped when the listing starts: an instance created while the pages are read may be
    # missing, and must not look gone to a watcher that recorded it after this time.
    listed_at = ctx.now()
    instances = None
    if instance_reads(ctx) == "flat":
        # The flat view (view.py): a few filtered calls, whatever the fleet's size. A
        # watcher refreshing it meanwhile is waited for (same lock), then refreshed again.
        with contextlib.suppress(ViewRefused):  # then full listings, as configured otherwise
            # The early wake only with a sender: its `once` keys are claimed when it runs,
            # and a wake kept for the result would be lost if a later call raised.
            state = refresh_view(
                ctx,
                wait=ctx.settings.sync_lock_timeout,
                seen_not_running=wake_early if send_now is not None else None,
            )
            if state is None:
                raise RuntimeError("the instance view's lock stayed held: this sync is skipped")
            listed_at = state.refreshed_at
            instances = sorted(ctx.store.view_entries().values(), key=lambda i: i.id)
    if instances is None:
        listed_at = ctx.now()
        instances = ctx.vast.list_instances(label_prefix=ctx.label_prefix())
    now = ctx.now()
    # Whole, for status, metrics and adoption (never for a watcher's "gone" in flat mode).
    ctx.store.save_snapshot(Snapshot(tuple(instances), listed_at))
    ctx.store.mark_synced(now)
    _meter(ctx, instances, now)
    in_line = ctx.limiter.line("create")  # before the records (create_line.left_the_line)
    # Snapshot first, records second (reconcile's docstring): no record older than it.
    records = ctx.store.all_records()
    ctx.limiter.leave_line_if_same("create", create_line.left_the_line(in_line, records))
    ctx.store.save_running_count(sum(1 for r in records.values() if r.phase == Phase.RUNNING))
    steps = plan(
        now=now,
        agent_short_id=short_id,
        records=records,
        instances=instances,
        actions=[(a.kind, a.task_id) for a in actions],
        settings=ctx.settings,
        spending=current_spending(ctx, records) if ctx.settings.budget.rations else None,
    )
    result = SyncResult(ran=True, steps=steps)
    result.enqueue += _wake_watchers_of_ended(ctx, records, instances)
    result.enqueue += create_line.wake_the_head(ctx, in_line, records, now)
    oldest_seq = ctx.store.oldest_waiting_seq(STEPS_QUEUE)
    _save_sync_report(ctx, now, capacity, steps)
    for planned in steps:
        if isinstance(planned, AcceptTask):
            accept(ctx, planned.task_id)  # cheap and must precede the StartChain of this plan
            continue
        if isinstance(planned, GrantAllowance):
            _grant(ctx, planned)
            continue
        if isinstance(planned, StartChain):
            _start_with_allowance(ctx, planned)
        if isinstance(planned, WaitForCapacity):
            record = ctx.store.get(planned.task_id)
            if record is not None and record.phase == Phase.ACCEPTED:
                publish = set_waiting(ctx, record, planned.limit, planned.reason)
                result.enqueue += [(planned.task_id, message) for message in publish]
            continue
        message = planned.message()
        if (
            isinstance(planned, HELD_WHILE_QUEUED)
            and message is not None
            and _still_queued(ctx, planned.task_id, message.step, oldest_seq)
        ):
            result.held.append(planned.task_id)
            continue
        if message is not None and ctx.store.once(planned.key, ctx.settings.heartbeat_stale):
            result.enqueue.append((planned.task_id, message))
    if result.held:
        oldest_sent_at = ctx.store.oldest_waiting_sent_at(STEPS_QUEUE)
        logger.info(
            "sync: %d stalled chain(s) not sent again: their last message still waits in the "
            "steps queue (its oldest was sent %s ago)",
            len(result.held),
            "?" if oldest_sent_at is None else f"{ctx.now() - oldest_sent_at:.0f} s",
        )
    return result


# Ended, or gone offline (its host): offline too, so that offline_grace counts from the look
# that first shows it, not from a running look up to 90 s later.
WAKE_STATUSES = ("exited", "stopped", "offline")


def _wake_watchers_of_ended(ctx: AgentContext, records, instances) -> list[tuple[str, Next]]:
    """A watch now for each task whose instance this sync saw ended (or offline), once per
    run (a watch that sees it running again re-arms it): its watcher may be up to
    running_watch_interval away, and an ended instance is acted on within one sync interval
    of its end (the watch decides; a new chain takes the old one over)."""
    by_id = {i.id: i for i in instances}
    woken = []
    for task_id, record in records.items():
        instance = by_id.get(record.instance_id) if record.instance_id is not None else None
        if (
            record.phase in (Phase.LOADING, Phase.RUNNING)
            and instance is not None
            and instance.actual_status in WAKE_STATUSES
            and ctx.store.once(ended_wake(task_id, record.attempt), ctx.settings.tombstone_ttl)
        ):
            woken.append((task_id, Next(StepName.WATCH)))
    return woken


def check_ended(ctx: AgentContext) -> list[tuple[str, Next]]:
    """The ended check (flat view only; Celery beat, twice a sync interval): one filtered
    list call (view.py's A) between two refreshes, and a watch now for each task whose
    instance it shows ended. A sync's own A comes right after its Arkindex poll, and it
    wakes the watchers of what that shows at once (refresh_view's `seen_not_running`), but
    only once an interval: with the check midway, an end waits at most about half an
    interval for a look.

    Decides nothing itself: the woken watch does, on the entry written here (a positive
    listing, as a refresh's). Skipped when a refresh runs (it holds the lock: its A is this
    check) or has just run or is about to (view.ended_check_due). A failed call is logged
    and left to the next check and sync: nothing is inferred from it."""
    if instance_reads(ctx) != "flat":
        return []
    since = ctx.now() - ctx.store.load_view_meta().refreshed_at
    if not view.ended_check_due(since, ctx.settings.sync_interval):
        return []
    lock = ctx.store.snapshot_lock(timeout=ctx.settings.sync_lock_timeout)
    if not lock.acquire(blocking=False):
        return []
    try:
        listed = view.list_not_running(ctx)
    except VastError as error:
        logger.warning(
            "ended check: could not list instances not running (%s); the next "
            "check or sync looks again",
            error,
        )
        return []
    finally:
        release(lock)
    logger.info("ended check: listed %d instance(s) not running", len(listed))
    return _wake_watchers_of_listed(ctx, listed)


def _wake_watchers_of_listed(ctx: AgentContext, listed: list[Instance]):
    """_wake_watchers_of_ended for the instances a call A listed (the ended check's, or a
    refresh's before its pages): only their tasks' records are read, not the fleet's."""
    records = {}
    for instance in listed:
        if instance.actual_status not in WAKE_STATUSES:
            continue
        label = parse_label(instance.label)
        record = ctx.store.get(label.task_id) if label is not None else None
        if record is not None and record.instance_id == instance.id:
            records[record.task_id] = record
    return _wake_watchers_of_ended(ctx, records, listed)


def _save_sync_report(ctx: AgentContext, now: float, capacity: int, steps: list) -> None:
    """Keep what this sync decided that no record shows, for `status`: how many new tasks it
    asked Arkindex for, and why each accepted task still waits (a task's log says it once)."""
    waiting = {s.task_id: s.reason for s in steps if isinstance(s, WaitForCapacity)}
    ctx.store.save_sync_report(
        {
            "at": now,
            "asked": capacity,
            "max_instances": ctx.settings.max_instances,
            "sync_interval": ctx.settings.sync_interval,
            "waiting": waiting,
        }
    )
    for task_id, reason in waiting.items():
        if ctx.store.once(f"waitnote:{task_id}", ctx.settings.tombstone_ttl):
            note_task(ctx, task_id, f"waiting for a capacity slot: {reason}")
