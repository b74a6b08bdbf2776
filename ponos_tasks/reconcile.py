"""The sync loop's brain: compare desired state (records, Arkindex actions) with actual state
(this agent's Vast.ai instances) and say what must change. PURE: no Redis, HTTP, Celery or
clock; `now` is a parameter, so the same inputs always give the same steps. It is
level-triggered: it looks at the whole state every time rather than at events, so a lost
message or a missed event is repaired at the next sync.

Each plan step says which chain step it starts (`message()`, None for the ones the sync
handles itself) and de-duplicates with `key` (TaskStore.once(step.key, ttl)). Inputs should
be read snapshot first, records second: a record is then never older than the instances it
is compared with.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from enum import StrEnum

from ponos_tasks.budget import (
    MAX_INSTANCES,
    Commitment,
    Spending,
    room_excluding,
    startable,
    task_commitments,
)
from ponos_tasks.lifecycle import (
    NO_INSTANCE_PHASES,
    SLOT_PHASES,
    Condition,
    LabelInfo,
    Outcome,
    Phase,
    classify_instance,
    final_state,
    next_attempt_allowed,
    parse_label,
    start_failure,
)
from ponos_tasks.models import Instance, Next, StepName, TaskRecord
from ponos_tasks.settings import Settings

START_TASK = "start_task"
STOP_TASK = "stop_task"

# DestroyInstance.cause values (one metric label each).
ORPHAN = "orphan"  # our label, task finished (tombstone)
STALE_ATTEMPT = "stale_attempt"  # label attempt != record attempt
ABANDONED_ATTEMPT = "abandoned_attempt"  # current attempt, but the record expects no instance
DUPLICATE = "duplicate"  # second instance of the same attempt
STOPPED = "stopped"  # stop_task for a task we have no record of


# ---------------------------------------------------------------------------- steps


@dataclass(frozen=True)
class AcceptTask:
    """New start_task: create_if_absent(TaskRecord.new(task_id, now)) in `accepted`.
    Processed before the StartChain steps of the same plan."""

    task_id: str
    reason: str

    @property
    def key(self) -> str:
        return f"accept:{self.task_id}"

    def message(self) -> Next | None:
        return None  # the sync loop creates the record itself, before the StartChain steps


@dataclass(frozen=True)
class StartChain:
    """A capacity slot is free for this `accepted` task: start its chain. The first link
    CASes (accepted, attempt) -> waiting_offer (waiting_since=now), so a second StartChain
    is harmless, then chooses the offer and creates."""

    task_id: str
    reason: str
    allowance: float | None = None  # $/h its instance may cost (budget.py); None: any
    limit: str | None = None  # the limit that set the allowance

    @property
    def key(self) -> str:
        return f"start:{self.task_id}"

    def message(self) -> Next:
        return Next(StepName.START)


@dataclass(frozen=True)
class ResumeStep:
    """The chain of this task stalled (no progress for stale_after(phase)): enqueue `step`
    (step_for(record)) again. Every step re-reads the record and acts only through CAS on
    (phase, attempt)."""

    task_id: str
    step: StepName
    phase: str
    attempt: int
    reason: str

    @property
    def key(self) -> str:
        return f"resume:{self.task_id}:{self.step}:{self.attempt}"

    def message(self) -> Next:
        if self.step == StepName.PUBLISH_LOGS:
            return Next(self.step, kwargs={"final": True})
        return Next(self.step)


@dataclass(frozen=True)
class StopTask:
    """stop_task from Arkindex. has_record: set stop_requested and final_state `stopped`,
    CAS the current phase to finishing (unless already finishing/destroying), so the chain
    publishes logs, destroys and reports `stopped`. Without a record (never seen, or memory
    lost): create the record directly in `finishing` with final_state `stopped`."""

    task_id: str
    has_record: bool
    reason: str

    @property
    def key(self) -> str:
        return f"stop:{self.task_id}"

    def message(self) -> Next:
        return Next(StepName.STOP_TASK, kwargs={"has_record": self.has_record})


@dataclass(frozen=True)
class DestroyInstance:
    """Destroy an instance of ours nobody wants (`cause`: ORPHAN, STALE_ATTEMPT,
    ABANDONED_ATTEMPT, DUPLICATE, STOPPED). "Not found" counts as destroyed."""

    instance_id: int
    label: str
    task_id: str
    cause: str
    reason: str

    @property
    def key(self) -> str:
        return f"destroy:{self.instance_id}"

    def message(self) -> Next:
        return Next(
            StepName.DESTROY_UNWANTED,
            kwargs={
                "instance_id": self.instance_id,
                "label": self.label,
                "cause": self.cause,
                "reason": self.reason,
            },
        )


@dataclass(frozen=True)
class AdoptInstance:
    """An instance of ours that the records do not know (all memory lost, or the record
    rolled back behind it). After checking with Arkindex that the task is still ours and
    active (otherwise: destroy it), either create the record (from_phase None) in `loading`
    with this attempt, instance id and adopted=True, or CAS (from_phase, from_attempt) ->
    (loading, attempt, instance_id); then start watching it."""

    task_id: str
    instance_id: int
    attempt: int
    label: str
    from_phase: str | None
    from_attempt: int | None
    reason: str

    @property
    def key(self) -> str:
        return f"adopt:{self.task_id}:{self.instance_id}"

    def message(self) -> Next:
        return Next(
            StepName.ADOPT_INSTANCE,
            kwargs={
                "instance_id": self.instance_id,
                "attempt": self.attempt,
                "label": self.label,
                "from_phase": self.from_phase,
                "from_attempt": self.from_attempt,
                "reason": self.reason,
            },
        )


@dataclass(frozen=True)
class GrantAllowance:
    """A task about to rent (waiting_offer, retrying) may now rent a dearer instance: the
    sync loop sets its allowance (CAS on phase and attempt; never lowered)."""

    task_id: str
    allowance: float
    limit: str | None
    phase: str
    attempt: int
    reason: str

    @property
    def key(self) -> str:
        return f"grant:{self.task_id}"

    def message(self) -> Next | None:
        return None  # the sync loop writes it itself


@dataclass(frozen=True)
class WaitForCapacity:
    """The task stays `accepted`: `limit` (max_instances, or a budget limit) leaves no room
    for it. The sync loop writes why in its record and its log."""

    task_id: str
    reason: str
    limit: str = MAX_INSTANCES

    @property
    def key(self) -> str:
        return f"wait:{self.task_id}"

    def message(self) -> Next | None:
        return None  # informational (status, logs)


Step = (
    AcceptTask
    | StartChain
    | ResumeStep
    | StopTask
    | DestroyInstance
    | AdoptInstance
    | GrantAllowance
    | WaitForCapacity
)


# ---------------------------------------------------------------------------- helpers


def step_for(record: TaskRecord) -> StepName | None:
    """The chain step that moves a record on from its phase (None: accepted, done)."""
    phase = Phase(record.phase)
    if phase is Phase.DESTROYING:
        # The final state is reported before the instance is destroyed.
        return StepName.DESTROY_INSTANCE if record.final_reported else StepName.REPORT_STATE
    return {
        Phase.WAITING_OFFER: StepName.CHOOSE_OFFER,
        Phase.CREATING: StepName.CREATE_INSTANCE,
        Phase.LOADING: StepName.WATCH,
        Phase.RUNNING: StepName.WATCH,
        Phase.FINISHING: StepName.PUBLISH_LOGS,
        Phase.RETRYING: StepName.RETRY_ATTEMPT,
    }.get(phase)


def last_progress(record: TaskRecord) -> float:
    stamps = [record.heartbeat_at, record.phase_changed_at, record.accepted_at]
    if record.phase == Phase.CREATING:
        # It may lie ahead: a create waiting in Celery for its turn is not stalled before its
        # next look. (Only while creating: a task stopped in the line must not wait for it.)
        stamps.append(record.create_look_at)
    return max((s for s in stamps if s is not None), default=0.0)


def is_stalled(record: TaskRecord, now: float, settings: Settings) -> bool:
    return now - last_progress(record) > settings.stale_after(record.phase)


@dataclass(frozen=True)
class _Ours:
    info: LabelInfo
    instance_id: int
    label: str

    @property
    def order(self) -> tuple[int, int]:
        return (self.info.attempt, self.instance_id)


def _our_instances(agent_short_id: str, instances: Sequence[Instance]) -> dict[str, list[_Ours]]:
    """This agent's live instances by task id; foreign, unlabelled and already-destroyed
    (next_state unloaded) instances are left out."""
    ours: dict[str, list[_Ours]] = {}
    for inst in instances:
        info = parse_label(inst.label)
        if info is None or info.agent_short_id != agent_short_id.lower():
            continue
        if classify_instance(inst) is Condition.GONE:
            continue
        ours.setdefault(info.task_id, []).append(_Ours(info, inst.id, inst.label.strip()))
    for found in ours.values():
        found.sort(key=lambda o: o.order)
    return ours


def _unique(actions: Sequence[tuple[str, str]], kind: str) -> list[str]:
    return list(dict.fromkeys(str(task_id) for k, task_id in actions if k == kind))


def _destroy(o: _Ours, cause: str, reason: str) -> DestroyInstance:
    return DestroyInstance(o.instance_id, o.label, o.info.task_id, cause, reason)


def _adopt_best(
    task_id: str, found: list[_Ours], record: TaskRecord | None, why: str
) -> list[Step]:
    """Adopt the newest attempt (lowest id among its duplicates), destroy the others."""
    top = max(o.info.attempt for o in found)
    keep = min((o for o in found if o.info.attempt == top), key=lambda o: o.instance_id)
    steps: list[Step] = [
        AdoptInstance(
            task_id,
            keep.instance_id,
            top,
            keep.label,
            None if record is None else record.phase,
            None if record is None else record.attempt,
            why,
        )
    ]
    for o in found:
        if o is keep:
            continue
        if o.info.attempt < top:
            steps.append(
                _destroy(
                    o, STALE_ATTEMPT, f"attempt {o.info.attempt} older than adopted attempt {top}"
                )
            )
        else:
            steps.append(
                _destroy(
                    o,
                    DUPLICATE,
                    f"duplicate of adopted instance {keep.instance_id} (attempt {top})",
                )
            )
    return steps


# ---------------------------------------------------------------------------- plan


def plan(
    *,
    now: float,
    agent_short_id: str,
    records: Mapping[str, TaskRecord],
    instances: Sequence[Instance],
    actions: Sequence[tuple[str, str]],
    settings: Settings,
    spending: Spending | None = None,
) -> list[Step]:
    """Steps that move actual state towards desired state; each carries its `reason`.

    records: every record (active and done tombstones, TaskStore.all_records()).
    instances: the latest snapshot's instances.
    actions: Arkindex actions as (kind, task_id), kind start_task / stop_task.
    spending: the meter's figures, for the budget's shared limits (None: none planned).
    Order of the result: stops, destroys, adoptions, accepts, resumes, grants, starts, waits.
    """
    ours = _our_instances(agent_short_id, instances)
    starts, stops = _unique(actions, START_TASK), set(_unique(actions, STOP_TASK))
    out: dict[type, list[Step]] = {
        kind: []
        for kind in (
            StopTask,
            DestroyInstance,
            AdoptInstance,
            AcceptTask,
            ResumeStep,
            GrantAllowance,
            StartChain,
            WaitForCapacity,
        )
    }
    waiting: list[tuple[float, str]] = []  # accepted records asking for a slot
    new_tasks: list[str] = []  # accepted this plan, in Arkindex's order
    for task_id in sorted(set(records) | set(ours) | set(starts) | stops):
        record = records.get(task_id)
        found = ours.get(task_id, [])
        if record is None:
            task_steps = _plan_unknown_task(task_id, found, task_id in starts, task_id in stops)
            if any(isinstance(step, AcceptTask) for step in task_steps):
                new_tasks.append(task_id)
        else:
            task_steps = _plan_known_task(record, found, task_id in stops, now, settings)
            adopting = any(isinstance(step, AdoptInstance) for step in task_steps)
            if (
                record.phase == Phase.ACCEPTED
                and not record.stop_requested
                and task_id not in stops
                and not adopting
            ):
                waiting.append((record.accepted_at or 0.0, task_id))
        for step in task_steps:
            out[type(step)].append(step)
    queue = [t for _, t in sorted(waiting)] + new_tasks
    for step in _plan_capacity(queue, ours, records, settings.max_instances):
        out[type(step)].append(step)
    if spending is not None and settings.budget.rations:
        budgeted = _plan_budget(out, records, instances, now, settings, spending)
        out[GrantAllowance], out[StartChain], waits = budgeted
        out[WaitForCapacity] = [*out[WaitForCapacity], *waits]
    return [step for steps in out.values() for step in steps]


def _plan_unknown_task(
    task_id: str, found: list[_Ours], started: bool, stopped: bool
) -> list[Step]:
    """A task without a record: a new start, a stop, or instances of ours to adopt."""
    if stopped and found:
        # Memory lost, then stopped: the instance holds what the task printed. Adopt it
        # (adopt_instance sees the task `stopping` and stops it through the chain, which
        # reads and publishes its log before destroying it), never destroy it unread.
        return _adopt_best(
            task_id, found, None, "stop_task for a task without a record, with an instance"
        )
    if stopped:
        return [StopTask(task_id, False, "stop_task for a task without a record")]
    if found:
        return _adopt_best(task_id, found, None, "instance of ours without a record (memory lost?)")
    if started:
        return [AcceptTask(task_id, "new start_task")]
    return []


def _plan_known_task(
    record: TaskRecord, found: list[_Ours], stop_action: bool, now: float, settings: Settings
) -> list[Step]:
    """A task with a record: stop it, clean its instances up, adopt, or resume its chain."""
    task_id, phase = record.task_id, Phase(record.phase)
    if phase is Phase.DONE:
        done: list[Step] = [
            _destroy(o, ORPHAN, f"task is done ({record.final_state or 'finished'})") for o in found
        ]
        if record.kept_log_pending and is_stalled(record, now, settings):
            done.append(
                ResumeStep(
                    task_id,
                    StepName.PUBLISH_KEPT_LOG,
                    record.phase,
                    record.attempt,
                    "its final log could not be published yet (kept in Redis)",
                )
            )
        return done
    steps: list[Step] = []
    stopping = record.stop_requested or stop_action
    # Handled once stop_requested is set and the phase has moved to finishing or later;
    # otherwise (new stop, or a StopTask whose CAS lost a race) ask again.
    stop_now = stopping and not (
        record.stop_requested and phase in (Phase.FINISHING, Phase.DESTROYING)
    )
    if stop_now:
        steps.append(StopTask(task_id, True, f"stop_task while {phase}"))

    ahead = [o for o in found if o.info.attempt > record.attempt]
    if ahead and not stopping and phase in (Phase.ACCEPTED, Phase.WAITING_OFFER, Phase.CREATING):
        # The record is behind an instance (Redis rolled back): the instance wins.
        return steps + _adopt_best(
            task_id,
            found,
            record,
            f"instance attempt {max(o.info.attempt for o in ahead)} "
            f"ahead of record attempt {record.attempt} ({phase})",
        )
    steps += _unwanted_instances(record, found)
    if phase is Phase.ACCEPTED or stop_now:
        # accepted: waits for a capacity slot (plan's queue); stop_now: the StopTask above
        # moves the phase on, so resuming the old one is moot.
        return steps
    if is_stalled(record, now, settings):
        step = step_for(record)
        if step is not None:
            idle = now - last_progress(record)
            steps.append(
                ResumeStep(
                    task_id,
                    step,
                    record.phase,
                    record.attempt,
                    f"no progress in {phase} for {idle:.0f}s "
                    f"(stale after {settings.stale_after(phase):.0f}s)",
                )
            )
    return steps


def _unwanted_instances(record: TaskRecord, found: list[_Ours]) -> list[DestroyInstance]:
    """Instances of a known task that must go: other attempts, an attempt the record gave
    up, and duplicates of the current attempt (the recorded one is kept)."""
    phase = Phase(record.phase)
    steps: list[DestroyInstance] = []
    current = []
    for o in found:
        if o.instance_id == record.kept_instance_id and phase in (
            Phase.RETRYING,
            Phase.WAITING_OFFER,
            Phase.CREATING,
        ):
            continue  # the failed attempt's stopped instance, kept as the task's trace
        if o.info.attempt != record.attempt:
            steps.append(
                _destroy(
                    o,
                    STALE_ATTEMPT,
                    f"attempt {o.info.attempt}, record at attempt {record.attempt}",
                )
            )
        elif phase in NO_INSTANCE_PHASES:
            steps.append(
                _destroy(
                    o, ABANDONED_ATTEMPT, f"attempt {o.info.attempt} was abandoned (record {phase})"
                )
            )
        else:
            current.append(o)
    if len(current) > 1:
        keep = next((o for o in current if o.instance_id == record.instance_id), current[0])
        steps += [
            _destroy(
                o, DUPLICATE, f"duplicate of instance {keep.instance_id} (attempt {record.attempt})"
            )
            for o in current
            if o is not keep
        ]
    return steps


def _plan_capacity(
    queue: list[str],
    ours: Mapping[str, list[_Ours]],
    records: Mapping[str, TaskRecord],
    max_instances: int,
) -> list[Step]:
    """Start the chains of the queued tasks while capacity slots are free.

    Occupied: every live instance of ours (stale and duplicate ones bill too) plus one for
    each task holding a slot whose instance is not listed (yet).
    """
    slot_tasks = {t for t, r in records.items() if r.phase in SLOT_PHASES}
    occupied = sum(len(found) for found in ours.values()) + sum(
        1 for t in slot_tasks if not ours.get(t)
    )
    free = max(0, max_instances - occupied)
    steps: list[Step] = []
    for index, task_id in enumerate(queue):
        if index < free:
            steps.append(
                StartChain(task_id, f"capacity slot free ({occupied + index + 1}/{max_instances})")
            )
        else:
            steps.append(
                WaitForCapacity(
                    task_id,
                    f"{max_instances} instances at most; "
                    f"{occupied + min(index, free)} in use, "
                    f"position {index - free + 1} in the queue",
                )
            )
    return steps


def _plan_budget(
    out: Mapping[type, list[Step]],
    records: Mapping[str, TaskRecord],
    instances: Sequence[Instance],
    now: float,
    settings: Settings,
    spending: Spending,
) -> tuple[list[Step], list[Step], list[Step]]:
    """Allowances, in arrival order (budget.py): the tasks about to rent first (their
    allowance may grow with the room), then the chains the slots would start, each with
    what the room leaves it. The first task the room is too small for waits, and every
    later one behind it: tasks start in the order they came."""
    limits = settings.budget
    commitments = task_commitments(records, instances, spending.task_spent)
    grants: list[Step] = []
    renting = sorted(
        (
            r
            for r in records.values()
            if r.phase in (Phase.WAITING_OFFER, Phase.RETRYING) and not r.stop_requested
        ),
        key=lambda r: (r.accepted_at or 0.0, r.task_id),
    )
    for record in renting:
        room = room_excluding(
            limits, commitments, record.task_id, spent_today=spending.spent_today, now=now
        )
        current = record.budget_allowance
        granted = _allowance(room)
        if current is None or granted > current + 1e-9:
            grants.append(
                GrantAllowance(
                    record.task_id, granted, room.limit, record.phase, record.attempt, room.why
                )
            )
            held = commitments.get(record.task_id, Commitment(record.task_id, 0.0))
            commitments[record.task_id] = Commitment(
                record.task_id, max(held.dph, granted), held.spent
            )
    starts: list[Step] = []
    waits: list[Step] = []
    hold = None
    for start in out[StartChain]:
        task_id = start.task_id
        if hold is None:
            room = room_excluding(
                limits, commitments, task_id, spent_today=spending.spent_today, now=now
            )
            if room.holds(spending.cheapest):
                cheapest = (
                    f"; the cheapest matching offer costs ${spending.cheapest:.4f}/h"
                    if spending.cheapest is not None
                    else ""
                )
                hold = (room.limit, f"{room.why}{cheapest}")
                waits.append(WaitForCapacity(task_id, hold[1], hold[0]))
                continue
            record = records.get(task_id)
            allowance = max(_allowance(room), (record.budget_allowance or 0.0) if record else 0.0)
            commitments[task_id] = Commitment(
                task_id, allowance, spending.task_spent.get(task_id, 0.0)
            )
            starts.append(StartChain(task_id, start.reason, allowance, room.limit))
        else:
            waits.append(WaitForCapacity(task_id, f"behind earlier tasks; {hold[1]}", hold[0]))
    return grants, starts, waits


def _allowance(room) -> float:
    """The $/h a task may rent at: the room's, or any price when no limit bounds it (a daily
    budget that affords the task's whole max_spend_per_task: it costs at most that)."""
    return math.inf if room.dph is None else room.dph


def capacity(
    records: Mapping[str, TaskRecord],
    instances: Sequence[Instance],
    settings: Settings,
    now: float,
    spending: Spending | None = None,
) -> int:
    """How many new tasks to ask Arkindex for: as many as could start now. One per free
    instance slot (every active task holds one), and no more than the budget's room holds
    at the cheapest price seen, once the tasks already waiting are counted at that price."""
    active = {t: r for t, r in records.items() if r.phase != Phase.DONE}
    slots = max(0, settings.max_instances - len(active))
    if spending is None or not settings.budget.rations:
        return slots
    commitments = task_commitments(active, instances, spending.task_spent)
    queued = [
        Commitment(t, spending.cheapest or 0.0)
        for t, r in active.items()
        if r.phase == Phase.ACCEPTED and r.budget_allowance is None
    ]
    return startable(
        settings.budget,
        [*commitments.values(), *queued],
        spent_today=spending.spent_today,
        now=now,
        cheapest=spending.cheapest,
        slots=slots,
    )


# ---------------------------------------------------------------------------- the watch step


class WatchAction(StrEnum):
    WAIT = "wait"  # nothing to do yet; re-schedule the watch
    MARK_RUNNING = "mark_running"  # CAS loading -> running (running_since=now), report running
    READ_LOGS = "read_logs"  # the instance ended: fetch its logs, parse the marker, decide again
    FINISH = "finish"  # CAS -> finishing with outcome (final_state, reason, exit_code)
    RETRY_ATTEMPT = "retry_attempt"  # CAS -> retrying: destroy this attempt, avoid its machine
    GIVE_UP = "give_up"  # start failed and no attempt left: CAS -> finishing with `error`


_ENDED = (Condition.STOPPED, Condition.EXITED, Condition.START_FAILED, Condition.GONE)


@dataclass(frozen=True)
class WatchDecision:
    action: WatchAction
    reason: str
    condition: Condition
    offline_since: float | None  # what record.offline_since must be (touch it if different)
    outcome: Outcome | None = None  # FINISH, GIVE_UP


def watch_decision(
    record: TaskRecord,
    instance: Instance | None,
    now: float,
    settings: Settings,
    *,
    exit_code: int | None = None,
    logs_read: bool = False,
    log_unreadable: bool = False,
    log_tail: str = "",
    snapshot_taken_at: float | None = None,
) -> WatchDecision:
    """What the watch step does for a loading/running record, given its instance from the
    snapshot (None when absent). Call again with logs_read=True, the marker's exit_code
    (None when there is none) and the log tail after a READ_LOGS; log_unreadable=True when
    the log of the ended instance could not be read up to the deadline (the outcome is then
    `error`, never a new attempt: the task may have run to its end)."""
    A = WatchAction
    condition = classify_instance(instance)
    if (
        instance is None
        and snapshot_taken_at is not None
        and record.instance_created_at is not None
        and snapshot_taken_at < record.instance_created_at
    ):
        # The snapshot predates the create: absent does not mean gone.
        return WatchDecision(
            A.WAIT, "snapshot older than the instance", Condition.PROVISIONING, record.offline_since
        )
    if (
        instance is None
        and record.instance_created_at is not None
        and now - record.instance_created_at < settings.visibility_grace
    ):
        # Vast.ai's reads lag a create by a few seconds: not listed yet is not gone.
        return WatchDecision(
            A.WAIT, "new instance not listed yet", Condition.PROVISIONING, record.offline_since
        )
    offline_since = (record.offline_since or now) if condition is Condition.OFFLINE else None

    def decide(action: WatchAction, reason: str, outcome: Outcome | None = None) -> WatchDecision:
        return WatchDecision(action, reason, condition, offline_since, outcome)

    if record.stop_requested:
        return decide(A.FINISH, "stop requested", final_state(None, condition, True))
    code = record.exit_code if exit_code is None else exit_code
    if code is not None:
        return decide(
            A.FINISH,
            f"exit code {code} in the log",
            final_state(code, condition, False, record.inferred, log_tail),
        )
    ended = condition in _ENDED
    # A start that failed before the task was ever seen running (an OCI error: the container
    # could not be created) has no log of the task to read: its command never ran.
    never_ran = condition is Condition.START_FAILED and record.phase == Phase.LOADING
    if ended and not logs_read and condition is not Condition.GONE and not never_ran:
        return decide(A.READ_LOGS, f"instance {condition}: look for the exit code")
    if ended and log_unreadable:
        reason = (
            f"instance {condition}, and its log could not be read within "
            f"{settings.log_read_deadline:g} s: exit code unknown"
        )
        return decide(A.FINISH, reason, Outcome("error", reason))
    failure = start_failure(
        replace(record, offline_since=offline_since),
        condition,
        now,
        settings.loading_deadline,
        offline_grace=settings.offline_grace,
        early_exit_window=settings.early_exit_window,
        pull_stall_timeout=settings.pull_stall_timeout,
        status_msg=None if instance is None else instance.status_msg,
    )
    if failure is not None:
        if next_attempt_allowed(record.attempt, settings.max_attempts):
            return decide(A.RETRY_ATTEMPT, failure)
        reason = f"no instance could run the task in {record.attempt} attempt(s); last: {failure}"
        return decide(A.GIVE_UP, reason, Outcome("error", reason))
    if ended:
        outcome = final_state(None, condition, False, record.inferred, log_tail)
        return decide(A.FINISH, outcome.reason, outcome)
    if condition is Condition.RUNNING and record.phase == Phase.LOADING:
        return decide(A.MARK_RUNNING, "instance running")
    return decide(A.WAIT, f"instance {condition}")
