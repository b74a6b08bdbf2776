"""Pure lifecycle rules of one task: labels, phases, instance conditions and outcomes.

Nothing here touches Redis, HTTP, Celery or the clock: every time is a parameter, so the
rules are unit-tested on their own and shared by the Celery steps and `reconcile.plan()`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ponos_tasks.models import Instance, TaskRecord

# ---------------------------------------------------------------------------- labels

LABEL_PREFIX = "ponos"
_SHORT_ID = re.compile(r"^[0-9a-f]{8}$")
# The task id may contain dashes (UUID); the attempt is the last dash-separated number.
_LABEL = re.compile(r"^ponos-([0-9a-fA-F]{8})-([0-9A-Za-z][0-9A-Za-z_-]*?)-([0-9]{1,6})$")


@dataclass(frozen=True)
class LabelInfo:
    agent_short_id: str
    task_id: str
    attempt: int


def agent_short_id(agent_id: str) -> str:
    """First 8 hex characters of the agent's UUID (dashes ignored), lower case."""
    digits = str(agent_id).replace("-", "").lower()
    if len(digits) < 8 or not _SHORT_ID.match(digits[:8]):
        raise ValueError(f"agent id {agent_id!r} does not start with 8 hex characters")
    return digits[:8]


def make_label(agent_short_id: str, task_id: str, attempt: int) -> str:
    """`ponos-<agent short id>-<task id>-<attempt>`, sent in the create call itself."""
    short = str(agent_short_id).lower()
    if not _SHORT_ID.match(short):
        raise ValueError(f"agent short id must be 8 hex characters, got {agent_short_id!r}")
    if attempt < 1:
        raise ValueError(f"attempt must be >= 1, got {attempt}")
    label = f"{LABEL_PREFIX}-{short}-{task_id}-{attempt}"
    if parse_label(label) != LabelInfo(short, str(task_id), attempt):
        raise ValueError(f"task id {task_id!r} cannot be carried in a label")
    return label


def parse_label(label: Any) -> LabelInfo | None:
    """The label's parts, or None for anything that is not a ponos label (never raises)."""
    if not isinstance(label, str):
        return None
    match = _LABEL.match(label.strip())
    if match is None:
        return None
    short, task_id, attempt = match.groups()
    if int(attempt) < 1:
        return None
    return LabelInfo(short.lower(), task_id, int(attempt))


# ---------------------------------------------------------------------------- phases


class Phase(StrEnum):
    ACCEPTED = "accepted"  # known, waiting for a capacity slot (no chain yet)
    WAITING_OFFER = "waiting_offer"  # chain started: looking for an offer, none matched yet
    CREATING = "creating"  # attempt n claimed; the create call may be in flight
    LOADING = "loading"  # instance id recorded; image pull / container start
    RUNNING = "running"  # container runs; `running` reported to Arkindex
    FINISHING = "finishing"  # outcome decided (final_state); publishing the final logs
    DESTROYING = "destroying"  # logs published; destroying the instance, then reporting
    DONE = "done"  # final state reported; the record is a tombstone with a TTL
    RETRYING = "retrying"  # the attempt failed to start: destroy it, then a new attempt


P = Phase
TRANSITIONS: Mapping[Phase, frozenset[Phase]] = {
    P.ACCEPTED: frozenset({P.WAITING_OFFER, P.CREATING, P.FINISHING}),
    P.WAITING_OFFER: frozenset({P.CREATING, P.FINISHING}),
    # creating -> running: the label lookup found an instance that already runs.
    P.CREATING: frozenset({P.LOADING, P.RUNNING, P.RETRYING, P.WAITING_OFFER, P.FINISHING}),
    # loading -> finishing: a short task can end before a snapshot ever saw it running.
    P.LOADING: frozenset({P.RUNNING, P.RETRYING, P.FINISHING}),
    P.RUNNING: frozenset({P.FINISHING, P.RETRYING}),
    P.FINISHING: frozenset({P.DESTROYING}),
    P.DESTROYING: frozenset({P.DONE}),
    P.DONE: frozenset(),
    P.RETRYING: frozenset({P.WAITING_OFFER, P.CREATING, P.FINISHING}),
}
del P

#: Phases in which the task holds (or is about to hold) an instance: they use a capacity slot.
SLOT_PHASES = frozenset(
    {Phase.WAITING_OFFER, Phase.CREATING, Phase.LOADING, Phase.RUNNING, Phase.RETRYING}
)
#: Phases in which no live instance of the current attempt is expected.
NO_INSTANCE_PHASES = frozenset({Phase.ACCEPTED, Phase.WAITING_OFFER, Phase.RETRYING})


class TransitionError(ValueError):
    pass


def check_transition(from_phase: str, to_phase: str) -> None:
    """Raise TransitionError unless `from -> to` is in TRANSITIONS (staying put is allowed:
    a CAS that only updates fields, or creating -> creating with attempt + 1)."""
    try:
        src, dst = Phase(from_phase), Phase(to_phase)
    except ValueError as exc:
        raise TransitionError(str(exc)) from None
    if src is not dst and dst not in TRANSITIONS[src]:
        raise TransitionError(f"phase {src} cannot change to {dst}")
    if src is dst is Phase.DONE:
        raise TransitionError("a done task cannot change any more")


# ---------------------------------------------------------------------------- conditions


class Condition(StrEnum):
    PROVISIONING = "provisioning"
    LOADING = "loading"
    RUNNING = "running"
    STOPPED = "stopped"  # stopped by itself, by us or outbid: all look alike
    EXITED = "exited"  # container ended without stopping its instance (Vast may restart it)
    START_FAILED = "start_failed"
    OFFLINE = "offline"
    GONE = "gone"
    UNKNOWN = "unknown"


def _norm(value: Any) -> str | None:
    if value is None:
        return None
    text = str(value).strip().lower()
    return text or None


def classify_instance(instance: Instance | None) -> Condition:
    """The condition of an instance from its Vast.ai status fields (actual_status, intended_status, cur_state, next_state; docs/reference.md §1.4).

    None (the instance is absent from the list) is GONE. Unknown values never raise.
    """
    if instance is None:
        return Condition.GONE
    actual = _norm(instance.actual_status)
    intended = _norm(instance.intended_status)
    cur = _norm(instance.cur_state)
    nxt = _norm(instance.next_state)
    if cur == "unloaded" or nxt == "unloaded" or actual in ("destroyed", "terminated"):
        return Condition.GONE
    if actual in ("offline", "unknown"):
        return Condition.OFFLINE
    if actual in ("running", "frozen"):
        # running with intended "stopped" is a stop in progress: the container still runs.
        return Condition.RUNNING
    # A start that failed can sit in created/exited forever with an error message (dstack).
    if actual in (None, "created", "loading", "exited") and instance.status_msg_is_fatal:
        return Condition.START_FAILED
    stopped_intent = intended == "stopped" or cur == "stopped"
    if actual in ("exited", "stopped"):
        if intended == "running":
            return Condition.EXITED
        if stopped_intent:
            return Condition.STOPPED
        return Condition.UNKNOWN
    if actual in (None, "created", "loading", "rebooting"):
        if intended == "stopped":
            # Created stopped, or the create/start race: nothing will run by itself.
            return Condition.STOPPED
        return Condition.PROVISIONING if actual in (None, "created") else Condition.LOADING
    return Condition.UNKNOWN


# ---------------------------------------------------------------------------- outcomes

FINAL_STATES = ("completed", "failed", "error", "stopped")
#: Arkindex task states after which it accepts no other (its state table).
ARKINDEX_TERMINAL_STATES = frozenset({"completed", "failed", "error", "stopped", "cancelled"})
#: Arkindex task states in which the task is still this agent's to run.
ARKINDEX_ACTIVE_STATES = frozenset({"pending", "running", "stopping"})


@dataclass(frozen=True)
class Outcome:
    state: str  # one of FINAL_STATES
    reason: str


_TRACEBACK_HEADER = "Traceback (most recent call last):"
_EXCEPTION_LINE = re.compile(r"^[A-Za-z_][\w.]*(: .*|:)?$")


def ends_with_traceback(log_tail: str) -> bool:
    """True when the last thing in the log is a Python traceback (frames + exception line)."""
    lines = [line.rstrip() for line in (log_tail or "").splitlines()]
    while lines and not lines[-1].strip():
        lines.pop()
    for index in range(len(lines) - 1, -1, -1):
        if lines[index].strip().endswith(_TRACEBACK_HEADER):
            break
    else:
        return False
    rest = lines[index + 1 :]
    tail = [line for line in rest if line and not line[0].isspace()]
    # After the frames: the exception line, possibly a short multi-line message.
    return bool(tail) and len(tail) <= 3 and bool(_EXCEPTION_LINE.match(tail[0].strip()))


def final_state(
    exit_code: int | None,
    condition: Condition | str,
    stop_requested: bool,
    inferred: bool = False,
    log_tail: str = "",
) -> Outcome:
    """The state to report to Arkindex once the task's instance has ended: exit marker 0 ->
    completed, other -> failed, no marker in a log read from the ended instance -> error
    (docs/reference.md §3); for an image run unwrapped, inferred from how it ended."""
    condition = Condition(condition)
    if stop_requested:
        return Outcome("stopped", "stopped on request (stop_task)")
    if exit_code is not None:
        if exit_code == 0:
            return Outcome("completed", "exit code 0")
        return Outcome("failed", f"exit code {exit_code}")
    if inferred:
        if condition is Condition.STOPPED:
            if ends_with_traceback(log_tail):
                return Outcome(
                    "failed",
                    "inferred (no exit code: image run unwrapped): the "
                    "instance stopped itself and the log ends with a "
                    "Python traceback",
                )
            return Outcome(
                "completed",
                "inferred (no exit code: image run unwrapped): the instance stopped itself",
            )
        if condition is Condition.EXITED:
            return Outcome(
                "error",
                "inferred (no exit code: image run unwrapped): the "
                "container exited without stopping its instance",
            )
        return Outcome(
            "error", f"inferred (no exit code: image run unwrapped): instance ended as {condition}"
        )
    if condition in (Condition.STOPPED, Condition.EXITED):
        return Outcome("error", "instance ended without an exit code")
    if condition is Condition.GONE:
        return Outcome("error", "instance lost (no longer listed by Vast.ai) without an exit code")
    return Outcome("error", f"instance ended as {condition} without an exit code")


# ---------------------------------------------------------------------------- start failures


def start_failure(
    record: TaskRecord,
    condition: Condition | str,
    now: float,
    loading_deadline: float,
    *,
    offline_grace: float,
    early_exit_window: float,
    pull_stall_timeout: float | None = None,
    status_msg: str | None = None,
) -> str | None:
    """Why the current attempt must be abandoned (destroy + new attempt), or None.

    `loading_deadline` is the ceiling of a start (image pull included). Within it, a start
    that shows progress (its status_msg changes: docker pull's progress lines;
    record.progress_at, kept by the watch step) goes on, and one with no progress for
    `pull_stall_timeout` seconds is given up: a slow pull of a big image is not a stuck one.

    `offline_grace`: seconds a host may stay offline (record.offline_since, kept by the watch
    step) before the attempt is given up. `early_exit_window`: an exit without exit code
    within this many seconds of running is a failed start; later it is the task's own end
    (final_state() -> error).
    """
    condition = Condition(condition)
    phase = Phase(record.phase)
    if phase not in (Phase.CREATING, Phase.LOADING, Phase.RUNNING):
        return None
    if record.exit_code is not None:
        return None  # the task ran to its end: final_state() decides
    started = record.phase_changed_at if record.phase_changed_at is not None else now
    ran_for = None if record.running_since is None else now - record.running_since
    ran_long = ran_for is not None and ran_for >= early_exit_window
    if condition is Condition.OFFLINE:
        if record.offline_since is not None and now - record.offline_since >= offline_grace:
            return (
                f"host offline for {now - record.offline_since:.0f}s (grace {offline_grace:.0f}s)"
            )
        return None
    if condition is Condition.START_FAILED and not ran_long:
        detail = f": {status_msg.strip()}" if status_msg else ""
        return f"instance failed to start{detail}"
    if phase is Phase.RUNNING:
        if condition is Condition.EXITED and not ran_long and not record.inferred:
            return f"container exited without an exit code after {ran_for or 0:.0f}s of running"
        return None
    # creating / loading: the task has not been seen running.
    if condition in (Condition.PROVISIONING, Condition.LOADING, Condition.UNKNOWN):
        if now - started > loading_deadline:
            return (
                f"stuck {condition} for {now - started:.0f}s "
                f"(loading deadline {loading_deadline:.0f}s)"
            )
        last_progress = max(started, record.progress_at or started)
        if pull_stall_timeout is not None and now - last_progress > pull_stall_timeout:
            return (
                f"{condition} with no progress for {now - last_progress:.0f}s "
                f"(pull stall timeout {pull_stall_timeout:.0f}s)"
            )
        return None
    if condition is Condition.GONE:
        if phase is Phase.LOADING:
            return "instance disappeared before the task ran"
        if now - started > loading_deadline:  # creating: no instance ever appeared
            return f"no instance appeared within {loading_deadline:.0f}s of the create"
        return None
    if condition is Condition.EXITED and not record.inferred:
        return "container exited without an exit code before running"
    if condition is Condition.STOPPED and not record.inferred:
        return "instance stopped before the task ran (outbid, host or create refused)"
    return None


class StartFailureKind(StrEnum):
    """Why an instance did not start the task, as a small fixed set (a metric's label; the
    reason text in the task's log has the details)."""

    OFFER_GONE = "offer_gone"  # the offer was rented by someone else first (no_such_ask)
    CREATE_REFUSED = "create_refused"  # Vast.ai refused the create (a 4xx)
    CREATED_STOPPED = "created_stopped"  # Vast.ai created the instance stopped
    START_FAILED = "start_failed"  # the container could not start (OCI runtime, pull error)
    LOADING_DEADLINE = "loading_deadline"  # not running within loading_deadline
    PULL_STALLED = "pull_stalled"  # no start progress for pull_stall_timeout
    HOST_OFFLINE = "host_offline"  # offline past offline_grace
    EXITED_EARLY = "exited_early"  # the container exited without an exit code
    STOPPED_BEFORE_RUNNING = "stopped_before_running"  # outbid, the host, a refused create
    DISAPPEARED = "disappeared"  # no longer (or never) listed by Vast.ai


_KIND_OF_CONDITION = {
    Condition.OFFLINE: StartFailureKind.HOST_OFFLINE,
    Condition.START_FAILED: StartFailureKind.START_FAILED,
    Condition.EXITED: StartFailureKind.EXITED_EARLY,
    Condition.STOPPED: StartFailureKind.STOPPED_BEFORE_RUNNING,
    Condition.GONE: StartFailureKind.DISAPPEARED,
}


def start_failure_kind(condition: Condition | str, reason: str) -> StartFailureKind:
    """The kind of a failure start_failure() found, from the instance's condition (and, for an
    instance still starting, whether the reason is a stall or the deadline)."""
    kind = _KIND_OF_CONDITION.get(Condition(condition))
    if kind is not None:
        return kind
    # provisioning, loading or unknown: still starting, given up by one of the two clocks.
    if "no progress" in reason:
        return StartFailureKind.PULL_STALLED
    return StartFailureKind.LOADING_DEADLINE


def next_attempt_allowed(attempt: int, max_attempts: int) -> bool:
    """Whether attempt `attempt` (the one that just failed, 1-based) may be followed by another."""
    return attempt < max_attempts


def offer_wait_expired(record: TaskRecord, now: float, max_wait: float) -> bool:
    """Whether the task has waited for a matching offer longer than `max_wait` seconds."""
    return record.waiting_since is not None and now - record.waiting_since > max_wait
