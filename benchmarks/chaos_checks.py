"""The invariants of a chaos run, computed from what the simulators recorded (Arkindex's task
histories and published logs, Vast.ai's ledger, events and instances) and from what the
harness collected from outside the agent (its log files, broker messages, Flower pages,
Sentry events). Never from the agent's own records. Pure: records in, verdicts out.

Each check returns a `Verdict`: whether it holds, its figure (what RELIABILITY.md shows) and
the problems found (one line each, naming the task or the place).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field

from benchmarks.chaos_plan import ChaosPlan, ChaosTask
from ponos_tasks.simulators.harness import MIN_SCANNED_LENGTH, find_secrets

TERMINAL = {"completed", "failed", "error", "stopped", "cancelled"}
# What the agent writes in a task's log when it ends it for an unreadable log.
LOG_UNREAD = "its log could not be read within"
# A pre-signed URL's signature, whatever URL it was cut from.
SIGNATURE = re.compile(r"X-Amz-Signature=([0-9a-fA-F]{16,})")
LABEL = re.compile(r"^ponos-[0-9a-f]+-(?P<task>[0-9a-f-]{36})-(?P<attempt>\d+)$")


@dataclass
class Verdict:
    name: str
    holds: bool
    figure: str
    problems: list[str] = field(default_factory=list)


@dataclass
class Records:
    """What the runner collected at the end of a run."""

    plan: ChaosPlan
    ids: dict[str, str]  # task key -> Arkindex task id
    tasks: dict[str, dict]  # Arkindex task id -> admin JSON (state, history)
    logs: dict[str, str | None]  # Arkindex task id -> published log
    ledger: list[dict]  # Vast.ai billing rows, one per instance ever created
    events: list[dict]  # Vast.ai created/status/destroyed timeline
    instances: list[dict]  # Vast.ai admin view (runs, instance_api_key, faults)
    places: dict[str, str] = field(default_factory=dict)  # where secrets could show -> text
    secrets: dict[str, str] = field(default_factory=dict)  # what -> secret value
    drained_after: float | None = None  # real s from the last terminal state to no instance
    deleted_destroyed_after: float | None = None  # real s from a task's deletion to no instance
    # s within that time when the agent could not act (Arkindex down, no worker alive,
    # destroys failing on purpose) + the designed resume time of each chain killed
    deleted_excused: float = 0.0
    sync_interval: float = 1.0
    logs_interval: float = 5.0
    baseline_bill: float | None = None  # the same workload without faults
    baseline_finals: dict[str, dict] | None = None  # its final_instances()


def task_of(label: str | None) -> tuple[str, int] | None:
    match = LABEL.match(label or "")
    return (match["task"], int(match["attempt"])) if match else None


def _by_task(rows: list[dict]) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = defaultdict(list)
    for row in rows:
        owner = task_of(row.get("label"))
        if owner:
            out[owner[0]].append(row)
    return out


def blocked_tasks(plan: ChaosPlan, states: dict[str, str]) -> set[str]:
    """Keys of the tasks Arkindex will never schedule: a parent ended and did not complete
    (or is itself blocked). They stay unscheduled, rightly."""
    blocked: set[str] = set()
    for task in plan.tasks:  # parents come before their children in a process
        for parent in task.parents:
            key = f"{task.process}/{parent}"
            state = states.get(key)
            if key in blocked or (state in TERMINAL and state != "completed"):
                blocked.add(task.key)
    return blocked


# ---------------------------------------------------------------------- the invariants


def terminal_states(rec: Records) -> Verdict:
    """Every task terminal exactly once, in the right state; `error` only where a fault
    aimed at the task excuses it; no update refused by the state table."""
    problems, errors_excused = [], []
    states = {key: (rec.tasks.get(i) or {}).get("state") for key, i in rec.ids.items()}
    blocked = blocked_tasks(rec.plan, states)
    for task in rec.plan.tasks:
        task_id = rec.ids[task.key]
        seen = rec.tasks.get(task_id)
        if task.expect is None:  # deleted while it ran: Arkindex has no state for it
            continue
        if task.key in blocked:
            if seen and seen["state"] != "unscheduled":
                problems.append(f"{task.key}: {seen['state']} although a parent did not complete")
            continue
        if seen is None:
            problems.append(f"{task.key}: missing from Arkindex")
            continue
        history = seen["history"]
        refused = [h for h in history if h.get("source") == "agent" and not h.get("accepted")]
        if refused:
            problems.append(f"{task.key}: refused updates {[h['to'] for h in refused]}")
        ends = [h["to"] for h in history if h.get("accepted") and h["to"] in TERMINAL]
        if len(ends) != 1:
            problems.append(f"{task.key}: {len(ends)} terminal states {ends} (now {seen['state']})")
            continue
        state = ends[0]
        excused = rec.plan.excused(task)
        if LOG_UNREAD in (rec.logs.get(task_id) or "") and rec.plan.vast_log_faults():
            # Vast.ai's log service failed (injected) past log_read_deadline: the exit status
            # was unknowable, and the agent said so.
            excused.setdefault("error", "its log could not be read past log_read_deadline")
        if state == task.expect:
            continue
        if state in excused:
            errors_excused.append(f"{task.key}: {state} ({excused[state]})")
            continue
        problems.append(f"{task.key}: ended {state}, expected {task.expect}")
    n = sum(1 for t in rec.plan.tasks if t.expect is not None)
    figure = f"{n - len(problems)}/{n} right, {len(errors_excused)} excused"
    verdict = Verdict("terminal exactly once, right state", not problems, figure, problems)
    verdict.problems += [f"(excused) {line}" for line in errors_excused] if not problems else []
    return verdict


def live_peak(events: list[dict]) -> dict[str, int]:
    """Most instances alive at once per task, from the created/destroyed timeline (a
    destroy and a create at the same instant count as a succession)."""
    live: dict[str, int] = defaultdict(int)
    peak: dict[str, int] = defaultdict(int)
    timeline = sorted(
        (e for e in events if e["event"] in ("created", "destroyed")),
        key=lambda e: (e["t"], e["event"] == "created"),
    )
    for event in timeline:
        owner = task_of(event.get("label"))
        if owner is None:
            continue
        live[owner[0]] += 1 if event["event"] == "created" else -1
        peak[owner[0]] = max(peak[owner[0]], live[owner[0]])
    return dict(peak)


def one_live_instance(rec: Records) -> Verdict:
    peaks = live_peak(rec.events)
    names = {v: k for k, v in rec.ids.items()}
    problems = [
        f"{names.get(task_id, task_id)}: {count} instances alive at once"
        for task_id, count in sorted(peaks.items())
        if count > 1
    ]
    most = max(peaks.values(), default=0)
    return Verdict("at most one live instance per task", not problems, f"max {most}", problems)


# Faults that may cut a command short, so that it legitimately runs again.
CUTTING_FAULTS = {"unexpected_exit", "offline", "outbid"}


def commands_run_once(rec: Records) -> Verdict:
    """A task's command started more than once only when a fault cut an earlier run short."""
    by_task = _by_task(rec.instances)
    names = {v: k for k, v in rec.ids.items()}
    problems, cut = [], []
    for task_id, rows in sorted(by_task.items()):
        runs = sum(int(row.get("runs") or 0) for row in rows)
        if runs <= 1:
            continue
        key = names.get(task_id, task_id)
        faulted = [row for row in rows if CUTTING_FAULTS & set(row.get("faults") or ())]
        if faulted:
            cut.append(key)
        else:
            problems.append(f"{key}: its command started {runs} times, no fault cut a run")
    figure = f"{len(problems)} unexplained re-runs, {len(cut)} re-run after a cut"
    return Verdict("no command run twice", not problems, figure, problems)


def nothing_left(rec: Records) -> Verdict:
    left = [row["label"] for row in rec.ledger if row.get("destroyed_at") is None]
    limit = 2 * rec.sync_interval
    problems = [f"instance {label} never destroyed" for label in left]
    drained = rec.drained_after
    if drained is None and not left:
        problems.append("the run never saw every task terminal with no instance left")
    elif drained is not None and drained > limit:
        problems.append(
            f"last instance destroyed {drained:.1f} s after the last terminal state "
            f"(more than two sync intervals, {limit:g} s)"
        )
    # A task deleted while it runs has no terminal state: its instance goes once the agent
    # meets the 404, at its next periodic upload (every logs_interval; one more when that
    # upload failed on a fault and is tried again), then straight to the destroy. Time the
    # agent could not act (Arkindex down, no worker, destroys failing on purpose, a killed
    # chain waiting for the sync to resume it) is added: the harness measures it.
    deleted = rec.deleted_destroyed_after
    deleted_limit = 2 * rec.logs_interval + rec.deleted_excused
    if deleted is not None and deleted > deleted_limit:
        problems.append(
            f"the deleted task's instance went {deleted:.1f} s after the deletion (more than "
            f"two logs intervals + {rec.deleted_excused:.1f} s the agent could not act, "
            f"{deleted_limit:.1f} s)"
        )
    figure = f"{len(left)} left"
    if drained is not None:
        figure += f"; drained {drained:.1f} s after the last end"
    if deleted is not None:
        figure += (
            f"; deleted task's instance gone {deleted:.1f} s after the deletion "
            f"({rec.deleted_excused:.1f} s of it excused)"
        )
    return Verdict(
        "no instance left within two sync intervals", not problems, figure or "-", problems
    )


def _exit_code(task: ChaosTask) -> int:
    return task.exit_code if task.role == "fail" else 0


def logs_whole(rec: Records) -> Verdict:
    """Every task that ran to its end has its whole log published: the first and the last
    line of its command and the exit marker with its code (the final upload is last: a later
    periodic upload would have no marker)."""
    problems = []
    checked = 0
    for task in rec.plan.tasks:
        task_id = rec.ids[task.key]
        seen = rec.tasks.get(task_id) or {}
        if task.expect is None or seen.get("state") not in ("completed", "failed"):
            continue
        checked += 1
        text = rec.logs.get(task_id) or ""
        if not text:
            problems.append(f"{task.key}: no log published")
            continue
        if not re.search(rf"PONOS_EXIT_CODE={_exit_code(task)}\b", text):
            problems.append(f"{task.key}: no marker PONOS_EXIT_CODE={_exit_code(task)}")
        first = f"{task.slug}: starting"
        last = f"{task.slug}: giving up" if task.exit_code else f"{task.slug}: done"
        if not task.scripted and (first not in text or last not in text):
            problems.append(f"{task.key}: log is missing its first or last line")
    stopped = [t for t in rec.plan.tasks if t.expect == "stopped"]
    for task in stopped:
        if not rec.logs.get(rec.ids[task.key]) and _ran(rec, task):
            problems.append(f"{task.key}: stopped after it ran, but no log published")
    return Verdict(
        "whole logs published", not problems, f"{checked - len(problems)}/{checked}", problems
    )


def _ran(rec: Records, task: ChaosTask) -> bool:
    task_id = rec.ids[task.key]
    return any(int(r.get("runs") or 0) for r in _by_task(rec.instances).get(task_id, []))


def no_secret_shown(rec: Records) -> Verdict:
    problems = []
    for place, text in sorted(rec.places.items()):
        scanned = {k: v for k, v in rec.secrets.items() if v and len(v) >= MIN_SCANNED_LENGTH}
        for what in find_secrets(text, scanned):
            problems.append(f"{what} shown in {place}")
        for match in SIGNATURE.finditer(text):
            problems.append(f"a pre-signed URL signature ({match[1][:8]}…) shown in {place}")
    n_places, n_secrets = len(rec.places), len(rec.secrets)
    figure = f"{len(problems)} found; {n_secrets} secrets x {n_places} places"
    return Verdict("no secret shown", not problems, figure, problems)


def final_instances(ledger: list[dict], ids: dict[str, str]) -> dict[str, dict]:
    """Task key -> the ledger row of its last attempt (the instance that ended it)."""
    names = {task_id: key for key, task_id in ids.items()}
    finals: dict[str, dict] = {}
    for task_id, rows in _by_task(ledger).items():
        if task_id in names:
            finals[names[task_id]] = max(rows, key=lambda r: (task_of(r["label"])[1], r["id"]))
    return finals


def _rate(cost: float, seconds: float) -> float:
    return cost / seconds if seconds else 0.0


def bill(rec: Records) -> Verdict:
    """The bill against the same workload without faults, and where the difference went:
    instances that did not end their task (failed starts, crashes: the faults' own cost),
    prices (machines avoided after a failed start, others taken meanwhile), storage while
    decisions waited (outages, kills), stops and the deletion seen later, and GPU time.

    The invariant is on GPU time: a task that completed or failed must not have run its
    final instance longer than without faults (5 % slack: the simulator's timings vary).
    An agent that left an instance running after its command ended would break it."""
    total = sum(row["cost"] for row in rec.ledger)
    finals = final_instances(rec.ledger, rec.ids)
    fault_cost = total - sum(row["cost"] for row in finals.values())
    if rec.baseline_bill is None or rec.baseline_finals is None:
        return Verdict("bill within faults' cost", True, f"${total:.4f} (no baseline run)")
    parts = {"price": 0.0, "storage time": 0.0, "stops seen later": 0.0, "GPU time": 0.0}
    base_gpu = 0.0
    roles = {t.key: t.role for t in rec.plan.tasks}
    for key, now in finals.items():
        then = rec.baseline_finals.get(key)
        if then is None:
            continue
        if roles.get(key) in ("stop", "delete"):
            parts["stops seen later"] += now["cost"] - then["cost"]
            continue
        gpu_now = _rate(now["gpu_cost"], now["gpu_seconds"])
        st_now = _rate(now["storage_cost"], now["storage_seconds"])
        gpu_then = _rate(then["gpu_cost"], then["gpu_seconds"])
        st_then = _rate(then["storage_cost"], then["storage_seconds"])
        parts["price"] += then["gpu_seconds"] * (gpu_now - gpu_then)
        parts["price"] += then["storage_seconds"] * (st_now - st_then)
        parts["storage time"] += (now["storage_seconds"] - then["storage_seconds"]) * st_now
        parts["GPU time"] += (now["gpu_seconds"] - then["gpu_seconds"]) * gpu_now
        base_gpu += then["gpu_cost"]
    ratio = total / rec.baseline_bill if rec.baseline_bill else 0.0
    limit = 0.05 * base_gpu
    holds = parts["GPU time"] <= limit
    figure = (
        f"${total:.4f} vs ${rec.baseline_bill:.4f} without faults (ratio {ratio:.2f}); "
        f"difference: ${fault_cost:.4f} instances that did not end their task, "
        + ", ".join(f"${value:+.4f} {name}" for name, value in parts.items())
    )
    problems = (
        []
        if holds
        else [f"GPU time beyond the fault-free run: ${parts['GPU time']:.4f} > ${limit:.4f}"]
    )
    return Verdict("bill within faults' cost", holds, figure, problems)


CHECKS = (
    terminal_states,
    one_live_instance,
    commands_run_once,
    nothing_left,
    logs_whole,
    no_secret_shown,
    bill,
)


def check_all(rec: Records) -> list[Verdict]:
    return [check(rec) for check in CHECKS]
