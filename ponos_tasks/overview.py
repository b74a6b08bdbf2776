"""What `ponos-vast status` shows, as plain data: pure functions of what the agent keeps in Redis.

- `status_document(state, sync_report)`: every task (phase, attempt, machine, GPU, $/h, age,
  spend so far, why it waits), the instances of the last snapshot, and totals (burn rate,
  spend today, capacity, age of the last sync). It is `status --json` and what the live view
  (`status --watch`, status_view.py) draws.
- `task_document(...)`: one task's record and its timeline, the agent's own entries about it
  (the same ones its published log starts with), for `status TASK_ID`.

Spend here is an estimate from the task records: the current attempt's offer price
(`dph_total`, GPU and the configured disk) from its create to now, or to its destroy. It
leaves out earlier attempts (a record keeps only the current one's price) and counts a stopped
instance in full (only its storage bills). Vast.ai's own ledger is the bill.

No Redis, no clock, no terminal here: every time is a parameter (`state.now`).
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING

from ponos_tasks.lifecycle import Condition, Phase, classify_instance, parse_label
from ponos_tasks.logs import redact
from ponos_tasks.models import Instance, TaskRecord

if TYPE_CHECKING:  # read by metrics.read_agent_state (Redis); only its data is used here
    from ponos_tasks.metrics import AgentState

#: Phases in which a task waits for something before an instance runs it.
WAITING_PHASES = frozenset({Phase.ACCEPTED, Phase.WAITING_OFFER, Phase.RETRYING})
#: A sync older than this many sync intervals (plus STALE_MARGIN s) is late: beat or the
#: workers are down, or the sync fails (the agent's log says why).
STALE_INTERVALS = 3
STALE_MARGIN = 10.0
#: The sync interval assumed when no sync report says it (the configuration's default).
DEFAULT_SYNC_INTERVAL = 10.0
STATUS_MSG_CHARS = 120


def utc_day_start(now: float) -> float:
    """Midnight (UTC) of the day `now` is in, as a timestamp."""
    day = dt.datetime.fromtimestamp(now, dt.UTC).date()
    return dt.datetime(day.year, day.month, day.day, tzinfo=dt.UTC).timestamp()


def attempt_window(record: TaskRecord, now: float) -> tuple[float, float] | None:
    """(from, to) of the current attempt's instance: its create to now, or to the moment
    the record closed once the instance is destroyed. None when there is no instance."""
    if record.instance_id is None or record.instance_created_at is None:
        return None
    closed = record.instance_destroyed or record.phase == Phase.DONE
    end = (record.phase_changed_at or now) if closed else now
    return record.instance_created_at, max(record.instance_created_at, end)


def attempt_spend(record: TaskRecord, now: float, since: float | None = None) -> float | None:
    """Estimated $ of the current attempt (from `since` on, when given): dph_total over its
    window. None when the attempt has no instance or no known price."""
    window = attempt_window(record, now)
    if window is None or record.dph_total is None:
        return None
    start, end = window
    if since is not None:
        start = max(start, since)
    return max(0.0, end - start) / 3600.0 * record.dph_total


def waiting_reason(record: TaskRecord, now: float, capacity_wait: str | None = None) -> str | None:
    """Why a task that has no running instance yet waits, in words; None when it does not.

    The limit the record says holds it (`held_by`, `waiting_for`: set by the agent's budget
    and offer checks) wins; otherwise what the record and the last sync show."""
    if record.phase not in WAITING_PHASES:
        return None
    if record.waiting_for:  # a budget limit (or no offer) holds it: budget.py says which
        return f"{record.held_by}: {record.waiting_for}" if record.held_by else record.waiting_for
    if record.phase == Phase.ACCEPTED:
        if capacity_wait:
            return f"capacity: {capacity_wait}"
        return "accepted; its chain starts at the next sync"
    if record.phase == Phase.RETRYING:
        why = record.attempt_reasons[-1] if record.attempt_reasons else "its start failed"
        return f"attempt {record.attempt} failed ({why}); a new one follows on another machine"
    # waiting_offer
    if record.waiting_since is None:
        return "looking for an offer"
    avoided = len(set(record.failed_machines))
    return f"no offer matches the filters for {format_age(now - record.waiting_since)}" + (
        f" ({avoided} machine(s) that failed this task left out)" if avoided else ""
    )


def activity(record: TaskRecord, now: float) -> str | None:
    """What the agent is doing with a task that does not wait (None: nothing to add)."""
    phase = record.phase
    if record.log_unread_since is not None and phase in (Phase.RUNNING, Phase.FINISHING):
        return "its instance has ended; its log could not be read yet: reading it again"
    if phase == Phase.CREATING:
        if record.create_unknown_at is not None:
            return "a create got no answer: looking its label up before anything else"
        if record.create_sent_at is not None:
            return "a create was sent: waiting for its instance to show"
        if record.create_turn_at is not None and record.create_turn_at > now:
            turn_in = format_age(record.create_turn_at - now)
            return f"in the line of creates: its turn comes in {turn_in}"
        return "renting an instance"
    if phase == Phase.LOADING:
        if record.start_status:
            return "starting: " + record.start_status[:STATUS_MSG_CHARS]
        return "instance created; waiting for it to start"
    if phase == Phase.RUNNING:
        return "stop requested" if record.stop_requested else None
    if phase == Phase.FINISHING:
        return f"{record.final_state}: publishing the final log"
    if phase == Phase.DESTROYING:
        step = "destroying the instance" if record.final_reported else "reporting the state"
        return f"{record.final_state}: {step}"
    if phase == Phase.DONE:
        return (record.final_state or "") + (f": {record.reason}" if record.reason else "")
    return None


def format_age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(max(0.0, seconds))
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def _round(value: float | None, digits: int = 6) -> float | None:
    return None if value is None else round(value, digits)


def task_row(
    record: TaskRecord, state: AgentState, instance: Instance | None, capacity_wait: str | None
) -> dict:
    """One task as `status` shows it."""
    waiting = waiting_reason(record, state.now, capacity_wait)
    return {
        "id": record.task_id,
        "phase": record.phase,
        "attempt": record.attempt,
        "instance_id": record.instance_id,
        "machine_id": record.machine_id
        if record.machine_id is not None
        else (instance.machine_id if instance else None),
        "gpu_name": record.gpu_name or (instance.gpu_name if instance else None),
        "dph_total": record.dph_total
        if record.dph_total is not None
        else (instance.dph_total if instance else None),
        "age_s": state.age(record.accepted_at),
        "age_in_phase_s": state.age(record.phase_changed_at),
        "spend_usd": _round(attempt_spend(record, state.now)),
        "waiting_reason": waiting,
        "detail": waiting or activity(record, state.now),
        "final_state": record.final_state,
        "reason": record.reason,
    }


def instance_row(instance: Instance) -> dict:
    label = parse_label(instance.label)
    return {
        "id": instance.id,
        "label": instance.label,
        "task_id": label.task_id if label else None,
        "attempt": label.attempt if label else None,
        "actual_status": instance.actual_status,
        "intended_status": instance.intended_status,
        "status_msg": (instance.status_msg or "")[:STATUS_MSG_CHARS] or None,
        "machine_id": instance.machine_id,
        "gpu_name": instance.gpu_name,
        "dph_total": instance.dph_total,
        "live": classify_instance(instance) is not Condition.GONE,  # as metrics.is_live
    }


def sync_summary(state: AgentState, report: Mapping | None) -> dict:
    """The last sync: its age, whether it is late, and the capacity it asked Arkindex for."""
    interval = float((report or {}).get("sync_interval") or DEFAULT_SYNC_INTERVAL)
    age = state.last_sync_age
    return {
        "last_sync_age_s": age,
        "sync_interval_s": interval,
        "stale": age is None or age > STALE_INTERVALS * interval + STALE_MARGIN,
        # How many new tasks the last sync asked Arkindex for (its actions call's capacity):
        # 0 means every further task waits on Arkindex's side.
        "asked_for_tasks": None if report is None else report.get("asked"),
        "max_instances": None if report is None else report.get("max_instances"),
    }


def status_document(
    state: AgentState, sync_report: Mapping | None = None, budget: Mapping | None = None
) -> dict:
    """The data `status` shows (its --json output): tasks oldest first, instances, totals.
    `budget` (budget.status_figures): the metered spend, which replaces the estimates from
    the records wherever it has a figure, and the headroom under each limit."""
    instances_by_id = {i.id: i for i in state.instances}
    capacity_waits = dict((sync_report or {}).get("waiting") or {})
    records = sorted(state.records.values(), key=lambda r: (r.accepted_at or 0, r.task_id))
    tasks = [
        task_row(
            record,
            state,
            instances_by_id.get(record.instance_id),
            capacity_waits.get(record.task_id),
        )
        for record in records
    ]
    metered = dict((budget or {}).get("task_spend") or {})
    for row in tasks:
        if row["id"] in metered:
            row["spend_usd"] = metered[row["id"]]
    day_start = utc_day_start(state.now)
    today = sum(attempt_spend(record, state.now, since=day_start) or 0.0 for record in records)
    if budget is not None and budget.get("metering") and budget.get("spent_today") is not None:
        today = float(budget["spent_today"])
    return {
        "now": state.now,
        "tasks": tasks,
        "instances": [instance_row(i) for i in state.instances],
        "snapshot_age_s": state.snapshot_age,
        "sync": sync_summary(state, sync_report),
        "totals": {
            "tasks_per_phase": {p: n for p, n in state.tasks_per_phase.items() if n},
            "active_tasks": len(state.active_records),
            "waiting_tasks": sum(1 for t in tasks if t["waiting_reason"]),
            "live_instances": len(state.live_instances),
            "spend_per_hour": round(state.spend_per_hour, 6),
            # An estimate from the records (module docstring), since 00:00 UTC.
            "spend_today_usd": round(today, 6),
            "last_sync_age_s": state.last_sync_age,
            "destroyed_by_cause": state.destroyed,
        },
        "budget": None if budget is None else dict(budget),
    }


def timeline(entries: Iterable[Mapping], secrets: Iterable[str] = ()) -> list[dict]:
    """The logbook's entries as `status TASK_ID` shows them, secrets replaced."""
    secrets = list(secrets)
    out = []
    for entry in entries:
        at = float(entry["t"])
        out.append(
            {
                "t": at,
                "time": dt.datetime.fromtimestamp(at, dt.UTC).isoformat(timespec="milliseconds"),
                "level": entry.get("level", "INFO"),
                "message": redact(str(entry.get("msg", "")), secrets),
            }
        )
    return out


def task_document(
    task_id: str,
    state: AgentState,
    entries: Iterable[Mapping],
    *,
    dropped: int = 0,
    sync_report: Mapping | None = None,
    secrets: Iterable[str] = (),
) -> dict:
    """One task for `status TASK_ID`: its row, its whole record, its instance in the last
    snapshot and its timeline (`record` is None once its tombstone has expired: the timeline
    lives longer)."""
    record = state.records.get(task_id)
    instance = None
    if record is not None:
        instance = next((i for i in state.instances if i.id == record.instance_id), None)
    capacity_wait = dict((sync_report or {}).get("waiting") or {}).get(task_id)
    return {
        "id": task_id,
        "now": state.now,
        "summary": None if record is None else task_row(record, state, instance, capacity_wait),
        "record": None if record is None else record.to_dict(),
        "instance": None if instance is None else instance_row(instance),
        "timeline": timeline(entries, secrets),
        "dropped_entries": dropped,
    }


def resolve_task_id(wanted: str, known: Iterable[str]) -> str | None:
    """`wanted` itself when known, else the one known id it starts (the views show ids
    shortened); None when none or several match."""
    known = list(known)
    if wanted in known:
        return wanted
    matches = [task_id for task_id in known if task_id.startswith(wanted)]
    return matches[0] if len(matches) == 1 else None
