"""The sync loop's brain: compare desired state (records, Arkindex actions) with actual state
(this agent's Vast.ai instances) and say what must change. PURE: no Redis, HTTP, Celery or
clock; `now` is a parameter, so the same inputs always give the same steps (level-triggered,
celery-practice §1.1 b / §1.11).

The integrator maps each Step to a Celery task and de-duplicates enqueues with `step.key`
(e.g. TaskStore.once(step.key, ttl)). Inputs should be read snapshot first, records second:
a record is then never older than the instances it is compared with.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any

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
from ponos_tasks.state import TaskRecord

START_TASK = "start_task"
STOP_TASK = "stop_task"

# Names of the chain's steps, as used in ResumeStep.step.
CHOOSE_OFFER = "choose_offer"
CREATE = "create"
WATCH = "watch"
PUBLISH_LOGS = "publish_logs"
DESTROY = "destroy"
REPORT = "report"
RETRY = "retry"

# DestroyInstance.cause values (one metric label each).
ORPHAN = "orphan"  # our label, task finished (tombstone)
STALE_ATTEMPT = "stale_attempt"  # label attempt != record attempt
ABANDONED_ATTEMPT = "abandoned_attempt"  # current attempt, but the record expects no instance
DUPLICATE = "duplicate"  # second instance of the same attempt
STOPPED = "stopped"  # stop_task for a task we have no record of


@dataclass(frozen=True)
class PlanSettings:
    max_instances: int = 4  # concurrent live instances of this agent
    heartbeat_stale: float = 120.0  # s without progress before a chain counts as stalled
    creating_stale: float | None = None  # same for `creating` (default: heartbeat_stale)
    loading_deadline: float = 1800.0  # s an instance may take to run (lifecycle.start_failure)
    offer_wait: float = 3600.0  # s to wait for a matching offer before `error`
    max_attempts: int = 3  # instance starts per task
    offline_grace: float = 600.0  # s a host may stay offline before the attempt is dropped

    def stale_after(self, phase: str) -> float:
        if phase == Phase.CREATING and self.creating_stale is not None:
            return self.creating_stale
        return self.heartbeat_stale


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


@dataclass(frozen=True)
class StartChain:
    """A capacity slot is free for this `accepted` task: start its chain. The first link
    CASes (accepted, attempt) -> waiting_offer (waiting_since=now), so a second StartChain
    is harmless, then chooses the offer and creates."""

    task_id: str
    reason: str

    @property
    def key(self) -> str:
        return f"start:{self.task_id}"


@dataclass(frozen=True)
class ResumeStep:
    """The chain of this task stalled (no progress for stale_after(phase)): enqueue `step`
    (one of CHOOSE_OFFER, CREATE, WATCH, PUBLISH_LOGS, DESTROY, REPORT, RETRY) again.
    Every step re-reads the record and acts only through CAS on (phase, attempt)."""

    task_id: str
    step: str
    phase: str
    attempt: int
    reason: str

    @property
    def key(self) -> str:
        return f"resume:{self.task_id}:{self.step}:{self.attempt}"


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


@dataclass(frozen=True)
class WaitForCapacity:
    """Informational: the task stays `accepted` because max_instances is reached."""

    task_id: str
    reason: str

    @property
    def key(self) -> str:
        return f"wait:{self.task_id}"


Step = AcceptTask | StartChain | ResumeStep | StopTask | DestroyInstance | AdoptInstance | \
    WaitForCapacity


# ---------------------------------------------------------------------------- helpers


def step_for(record: TaskRecord) -> str | None:
    """The chain step that moves a record on from its phase (None: accepted, done)."""
    phase = Phase(record.phase)
    if phase is Phase.DESTROYING:
        return REPORT if record.instance_destroyed else DESTROY
    return {
        Phase.WAITING_OFFER: CHOOSE_OFFER,
        Phase.CREATING: CREATE,
        Phase.LOADING: WATCH,
        Phase.RUNNING: WATCH,
        Phase.FINISHING: PUBLISH_LOGS,
        Phase.RETRYING: RETRY,
    }.get(phase)


def last_progress(record: TaskRecord) -> float:
    stamps = [record.heartbeat_at, record.phase_changed_at, record.accepted_at]
    return max((s for s in stamps if s is not None), default=0.0)


def is_stalled(record: TaskRecord, now: float, settings: PlanSettings) -> bool:
    return now - last_progress(record) > settings.stale_after(record.phase)


@dataclass(frozen=True)
class _Ours:
    info: LabelInfo
    instance_id: int
    label: str

    @property
    def order(self) -> tuple[int, int]:
        return (self.info.attempt, self.instance_id)


def _our_instances(agent_short_id: str, instances: Sequence[Mapping[str, Any]]
                   ) -> dict[str, list[_Ours]]:
    """This agent's live instances by task id; foreign, unlabelled and already-destroyed
    (next_state unloaded) instances are left out."""
    ours: dict[str, list[_Ours]] = {}
    for inst in instances:
        info = parse_label(inst.get("label"))
        if info is None or info.agent_short_id != agent_short_id.lower():
            continue
        if classify_instance(inst) is Condition.GONE:
            continue
        try:
            instance_id = int(inst["id"])
        except (KeyError, TypeError, ValueError):
            continue
        ours.setdefault(info.task_id, []).append(
            _Ours(info, instance_id, str(inst.get("label")).strip()))
    for found in ours.values():
        found.sort(key=lambda o: o.order)
    return ours


def _unique(actions: Sequence[tuple[str, str]], kind: str) -> list[str]:
    return list(dict.fromkeys(str(task_id) for k, task_id in actions if k == kind))


def _destroy(o: _Ours, cause: str, reason: str) -> DestroyInstance:
    return DestroyInstance(o.instance_id, o.label, o.info.task_id, cause, reason)


def _adopt_best(task_id: str, found: list[_Ours], record: TaskRecord | None, why: str
                ) -> list[Step]:
    """Adopt the newest attempt (lowest id among its duplicates), destroy the others."""
    top = max(o.info.attempt for o in found)
    keep = min((o for o in found if o.info.attempt == top), key=lambda o: o.instance_id)
    steps: list[Step] = [AdoptInstance(
        task_id, keep.instance_id, top, keep.label,
        None if record is None else record.phase, None if record is None else record.attempt,
        why)]
    for o in found:
        if o is keep:
            continue
        if o.info.attempt < top:
            steps.append(_destroy(o, STALE_ATTEMPT,
                                  f"attempt {o.info.attempt} older than adopted attempt {top}"))
        else:
            steps.append(_destroy(o, DUPLICATE,
                                  f"duplicate of adopted instance {keep.instance_id} "
                                  f"(attempt {top})"))
    return steps


# ---------------------------------------------------------------------------- plan


def plan(
    *,
    now: float,
    agent_short_id: str,
    records: Mapping[str, TaskRecord],
    instances: Sequence[Mapping[str, Any]],
    actions: Sequence[tuple[str, str]],
    settings: PlanSettings,
) -> list[Step]:
    """Steps that move actual state towards desired state; each carries its `reason`.

    records: every record (active and done tombstones, TaskStore.all_records()).
    instances: the latest snapshot (dicts with at least id, label and the status fields).
    actions: Arkindex actions as (kind, task_id), kind start_task / stop_task.
    Order of the result: stops, destroys, adoptions, accepts, resumes, starts, waits.
    """
    ours = _our_instances(agent_short_id, instances)
    starts, stops = _unique(actions, START_TASK), set(_unique(actions, STOP_TASK))
    out: dict[type, list[Step]] = {kind: [] for kind in (
        StopTask, DestroyInstance, AdoptInstance, AcceptTask, ResumeStep, StartChain,
        WaitForCapacity)}

    def emit(step: Step) -> None:
        out[type(step)].append(step)

    waiting: list[tuple[float, str]] = []  # accepted records asking for a slot
    new_tasks: list[str] = []  # accepted this plan, in Arkindex's order
    for task_id in sorted(set(records) | set(ours) | set(starts) | stops):
        record = records.get(task_id)
        found = ours.get(task_id, [])
        if record is None:
            if task_id in stops:
                for o in found:
                    emit(_destroy(o, STOPPED, "stop_task for a task without a record"))
                emit(StopTask(task_id, False, "stop_task for a task without a record"))
            elif found:
                for step in _adopt_best(task_id, found, None,
                                        "instance of ours without a record (memory lost?)"):
                    emit(step)
            elif task_id in starts:
                emit(AcceptTask(task_id, "new start_task"))
                new_tasks.append(task_id)
            continue
        phase = Phase(record.phase)
        if phase is Phase.DONE:
            for o in found:
                emit(_destroy(o, ORPHAN, f"task is done ({record.final_state or 'finished'})"))
            continue

        stopping = record.stop_requested or task_id in stops
        # Handled once stop_requested is set and the phase has moved to finishing or later;
        # otherwise (new stop, or a StopTask whose CAS lost a race) ask again.
        stop_now = stopping and not (
            record.stop_requested and phase in (Phase.FINISHING, Phase.DESTROYING))
        if stop_now:
            emit(StopTask(task_id, True, f"stop_task while {phase}"))

        ahead = [o for o in found if o.info.attempt > record.attempt]
        if ahead and not stopping and phase in (Phase.ACCEPTED, Phase.WAITING_OFFER,
                                                Phase.CREATING):
            # The record is behind an instance (Redis rolled back): the instance wins.
            for step in _adopt_best(task_id, found, record,
                                    f"instance attempt {max(o.info.attempt for o in ahead)} "
                                    f"ahead of record attempt {record.attempt} ({phase})"):
                emit(step)
            continue

        current = []
        for o in found:
            if o.info.attempt != record.attempt:
                emit(_destroy(o, STALE_ATTEMPT,
                              f"attempt {o.info.attempt}, record at attempt {record.attempt}"))
            elif phase in NO_INSTANCE_PHASES:
                emit(_destroy(o, ABANDONED_ATTEMPT,
                              f"attempt {o.info.attempt} was abandoned (record {phase})"))
            else:
                current.append(o)
        if len(current) > 1:
            keep = next((o for o in current if o.instance_id == record.instance_id),
                        current[0])
            for o in current:
                if o is not keep:
                    emit(_destroy(o, DUPLICATE, f"duplicate of instance {keep.instance_id} "
                                                f"(attempt {record.attempt})"))

        if phase is Phase.ACCEPTED:
            if not stopping:
                waiting.append((record.accepted_at or 0.0, task_id))
            continue
        if stop_now:
            continue  # the StopTask above moves the phase on; resuming the old one is moot
        if is_stalled(record, now, settings):
            step = step_for(record)
            if step is not None:
                idle = now - last_progress(record)
                emit(ResumeStep(task_id, step, record.phase, record.attempt,
                                f"no progress in {phase} for {idle:.0f}s "
                                f"(stale after {settings.stale_after(phase):.0f}s)"))

    # Capacity: every live instance of ours (stale and duplicate ones bill too) plus one for
    # each task holding a slot whose instance is not listed (yet).
    slot_tasks = {t for t, r in records.items() if r.phase in SLOT_PHASES}
    occupied = sum(len(found) for found in ours.values()) + sum(
        1 for t in slot_tasks if not ours.get(t))
    free = max(0, settings.max_instances - occupied)
    queue = [t for _, t in sorted(waiting)] + new_tasks
    for index, task_id in enumerate(queue):
        if index < free:
            emit(StartChain(task_id, f"capacity slot free ({occupied + index + 1}/"
                                     f"{settings.max_instances})"))
        else:
            emit(WaitForCapacity(task_id, f"{settings.max_instances} instances at most; "
                                          f"{occupied + min(index, free)} in use, "
                                          f"position {index - free + 1} in the queue"))
    return [step for steps in out.values() for step in steps]


# ---------------------------------------------------------------------------- the watch step

WAIT = "wait"  # nothing to do yet; re-schedule the watch
MARK_RUNNING = "mark_running"  # CAS loading -> running (running_since=now), report `running`
READ_LOGS = "read_logs"  # the instance ended: fetch its logs, parse the marker, decide again
FINISH = "finish"  # CAS -> finishing with outcome (final_state, reason, exit_code)
RETRY = "retry"  # CAS -> retrying: destroy this attempt, never this machine again
GIVE_UP = "give_up"  # start failed and no attempt left: CAS -> finishing with outcome `error`

_ENDED = (Condition.STOPPED, Condition.EXITED, Condition.START_FAILED, Condition.GONE)


@dataclass(frozen=True)
class WatchDecision:
    action: str  # one of WAIT, MARK_RUNNING, READ_LOGS, FINISH, RETRY, GIVE_UP
    reason: str
    condition: Condition
    offline_since: float | None  # what record.offline_since must be (touch it if different)
    outcome: Outcome | None = None  # FINISH, GIVE_UP


def watch_decision(
    record: TaskRecord,
    instance: Mapping[str, Any] | None,
    now: float,
    settings: PlanSettings,
    *,
    exit_code: int | None = None,
    logs_read: bool = False,
    log_tail: str = "",
    snapshot_taken_at: float | None = None,
) -> WatchDecision:
    """What the watch step does for a loading/running record, given its instance's fields
    from the snapshot (None when absent). Call again with logs_read=True, the marker's
    exit_code (None when there is none) and the log tail after a READ_LOGS."""
    condition = classify_instance(instance)
    if (instance is None and snapshot_taken_at is not None
            and record.instance_created_at is not None
            and snapshot_taken_at < record.instance_created_at):
        # The snapshot predates the create: absent does not mean gone.
        return WatchDecision(WAIT, "snapshot older than the instance", Condition.PROVISIONING,
                             record.offline_since)
    offline_since = (record.offline_since or now) if condition is Condition.OFFLINE else None

    def decide(action: str, reason: str, outcome: Outcome | None = None) -> WatchDecision:
        return WatchDecision(action, reason, condition, offline_since, outcome)

    if record.stop_requested:
        return decide(FINISH, "stop requested", final_state(None, condition, True))
    code = record.exit_code if exit_code is None else exit_code
    if code is not None:
        return decide(FINISH, f"exit code {code} in the log",
                      final_state(code, condition, False, record.inferred, log_tail))
    ended = condition in _ENDED
    if ended and not logs_read and condition is not Condition.GONE:
        return decide(READ_LOGS, f"instance {condition}: look for the exit code")
    failure = start_failure(
        replace(record, offline_since=offline_since), condition, now,
        settings.loading_deadline, offline_grace=settings.offline_grace,
        status_msg=None if instance is None else instance.get("status_msg"))
    if failure is not None:
        if next_attempt_allowed(record.attempt, settings.max_attempts):
            return decide(RETRY, failure)
        reason = (f"no instance could run the task in {record.attempt} attempt(s); "
                  f"last: {failure}")
        return decide(GIVE_UP, reason, Outcome("error", reason))
    if ended:
        outcome = final_state(None, condition, False, record.inferred, log_tail)
        return decide(FINISH, outcome.reason, outcome)
    if condition is Condition.RUNNING and record.phase == Phase.LOADING:
        return decide(MARK_RUNNING, "instance running")
    return decide(WAIT, f"instance {condition}")
