"""What a chaos run does, drawn from one seed (pure: no process, no network).

    plan = build_plan(seed=1, n_tasks=60)
    plan.tasks        # the workload: processes with parents, durations, exit codes, stops
    plan.label_faults # Vast.ai faults aimed at one task's first attempt (by task key)
    plan.injections   # what happens when: kills, restarts, outages, fault windows

The same seed gives the same plan, so a failing run can be replayed (`--seed`). Every
random choice is made here; the runner (benchmarks/chaos.py) only carries it out.

Expectations: each task says which terminal state it must end in (`expect`), and which
other states a fault aimed at it may excuse (`excused`, with the reason). Only leaves (tasks
without children) fail, are stopped or deleted: Arkindex never schedules the children of a
task that did not complete.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from ponos_tasks.workload import leaves_of, random_dag

MAX_PROCESS_SIZE = 5
STOPPED_RUNS_FOR = 900  # real seconds a stopped task would run: it is always stopped first

# Vast.ai faults aimed at a task's first attempt, and the terminal states they may excuse
# besides the task's own (with why). A fault that only delays or retries excuses nothing.
LABEL_FAULTS: dict[str, tuple[dict, dict[str, str]]] = {
    "offer_vanished": ({}, {}),
    "double_rent": ({}, {}),
    "create_lost": ({}, {}),
    "read_lag": ({"seconds": 5}, {}),
    "pull_stall": ({"at": 0.3}, {}),
    "stuck_loading": ({}, {}),
    "oci_failure": ({}, {}),
    # A crash without the exit marker (scripted instance): the start is retried.
    "unexpected_exit": ({"after": 10.0}, {}),
    # The host goes offline for good: its log can never be read, so the exit status of a
    # command that ran there is unknowable.
    "offline": ({"after": 20.0}, {"error": "host offline: the task's log could not be read"}),
    # Not `outbid`: only interruptible (bid) instances are outbid, and the agent rents
    # on-demand ones.
}


@dataclass(frozen=True)
class ChaosTask:
    process: str
    slug: str
    parents: tuple[str, ...]
    role: str  # complete | fail | stop | delete
    duration: float  # real seconds the command runs (stop/delete: until stopped)
    exit_code: int = 0
    stop_after: float = 0.0  # stop/delete: real seconds after it is seen running
    scripted: bool = False  # a scripted instance (for faults that need one)

    @property
    def key(self) -> str:
        return f"{self.process}/{self.slug}"

    @property
    def expect(self) -> str | None:
        """The terminal state on Arkindex; None for a deleted task (it has none)."""
        return {"complete": "completed", "fail": "failed", "stop": "stopped"}.get(self.role)

    def command(self) -> str:
        """A real `sh -c` script (the simulator's local run mode runs it in the wrapper);
        unquoted echoes, so that the script itself needs one level of quotes only."""
        name = self.slug
        if self.role in ("stop", "delete"):
            body = (
                f"echo {name}: long job; i=0; while [ $i -lt {STOPPED_RUNS_FOR} ]; do "
                f"echo {name}: tick $i; sleep 1; i=$((i+1)); done"
            )
        else:
            half = f"{self.duration / 2:.1f}"
            body = f"echo {name}: starting; sleep {half}; echo {name}: half way; sleep {half}"
            if self.exit_code:
                body += f"; echo {name}: giving up >&2; exit {self.exit_code}"
            else:
                body += f"; echo {name}: done"
        return f"sh -c '{body}'"


@dataclass(frozen=True)
class Injection:
    at: float  # real seconds after the agent started
    kind: str
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        extra = ", ".join(f"{k}={v}" for k, v in sorted(self.params.items()))
        return f"{self.at:6.1f}s {self.kind}" + (f" ({extra})" if extra else "")


@dataclass
class ChaosPlan:
    seed: int
    tasks: list[ChaosTask]
    label_faults: dict[str, str]  # task key -> fault name (first attempt)
    injections: list[Injection]
    horizon: float

    def excused(self, task: ChaosTask) -> dict[str, str]:
        fault = self.label_faults.get(task.key)
        return dict(LABEL_FAULTS[fault][1]) if fault else {}

    def vast_log_faults(self) -> bool:
        """Whether faults aimed at Vast.ai's log endpoint are injected."""
        return any(i.params.get("endpoint") == "logs" for i in self.injections)

    def fault_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for name in self.label_faults.values():
            counts[f"vast:{name}"] = counts.get(f"vast:{name}", 0) + 1
        for injection in self.injections:
            counts[injection.kind] = counts.get(injection.kind, 0) + 1
        return dict(sorted(counts.items()))


def _process_sizes(n_tasks: int, rng: random.Random) -> list[int]:
    sizes = []
    left = n_tasks
    while left:
        size = min(left, rng.randint(1, MAX_PROCESS_SIZE))
        sizes.append(size)
        left -= size
    return sizes


def _workload(n_tasks: int, rng: random.Random) -> list[ChaosTask]:
    shapes = [
        (f"c{p_index + 1:03d}", random_dag([f"t{i}" for i in range(1, size + 1)], rng))
        for p_index, size in enumerate(_process_sizes(n_tasks, rng))
    ]
    leaves = leaves_of(shapes)
    rng.shuffle(leaves)
    deleted = {leaves.pop()} if len(leaves) > 4 else set()
    n_stopped = max(1, n_tasks // 20) if len(leaves) > 3 else 0
    stopped = {leaves.pop() for _ in range(n_stopped)}
    failing = set(leaves[: max(1, n_tasks // 8)])
    out = []
    for process, tasks in shapes:
        for slug, parents in tasks:
            # Mostly short tasks, one in six long (past a pre-signed URL's short lifetime).
            long = rng.random() < 1 / 6
            duration = round(rng.uniform(20, 40) if long else rng.uniform(1, 8), 1)
            role, code, stop_after = "complete", 0, 0.0
            if (process, slug) in deleted:
                role, stop_after = "delete", round(rng.uniform(2, 10), 1)
            elif (process, slug) in stopped:
                role, stop_after = "stop", round(rng.uniform(0, 10), 1)
            elif (process, slug) in failing:
                role, code = "fail", rng.choice((1, 2, 3, 42))
            out.append(ChaosTask(process, slug, parents, role, duration, code, stop_after))
    return out


def _label_faults(tasks: list[ChaosTask], rng: random.Random, share: float) -> dict[str, str]:
    """About `share` of the tasks get one Vast.ai fault on their first attempt; every kind
    is used at least once when there are enough tasks."""
    candidates = [t for t in tasks if t.role in ("complete", "fail")]
    rng.shuffle(candidates)
    count = min(len(candidates), max(len(LABEL_FAULTS), round(share * len(tasks))))
    names = list(LABEL_FAULTS)
    return {task.key: names[i % len(names)] for i, task in enumerate(candidates[:count])}


# Injections: (kind, how many in a full run, params drawn by _params).
FULL_INJECTIONS = {
    "kill_worker": 4,  # SIGKILL of one worker at a random moment (restarted after backoff)
    "kill_in_create": 1,  # SIGKILL of every worker while a create took effect, unanswered
    "kill_in_report": 1,  # ... while a state update took effect, unanswered
    "kill_in_upload": 1,  # ... while a log upload was stored, unanswered
    "kill_beat": 1,
    "second_beat": 1,  # a second beat for a while (two sync ticks per interval)
    "redis_restart_aof": 1,  # Redis restarted with its AOF: every record kept
    "redis_wipe": 1,  # Redis lost with its memory: every queued message and record gone
    "vast_429_storm": 1,  # 429 on create (each one a create penalty) and search
    "vast_5xx": 2,  # JSON 500s on list/show/logs/destroy
    "vast_html": 1,  # an HTML error page instead of JSON
    "vast_slow": 1,  # answers late on list and logs
    "arkindex_5xx": 1,  # 30 s of 500s
    "arkindex_html_502": 1,  # 30 s of a load balancer's 502 page
    "arkindex_slow": 1,
    "arkindex_token_expiry": 1,
    "s3_down": 1,  # 30 s of 503 from S3
    "s3_urls_expire": 1,  # for 30 s every pre-signed URL held over 3 s is expired
}
QUICK_INJECTIONS = {
    "kill_worker": 1,
    "kill_in_create": 1,
    "kill_in_report": 1,
    "kill_in_upload": 1,
    "second_beat": 1,
    "redis_restart_aof": 1,
    "redis_wipe": 1,
    "vast_429_storm": 1,
    "vast_5xx": 1,
    "arkindex_html_502": 1,
    "arkindex_token_expiry": 1,
    "s3_down": 1,
    "s3_urls_expire": 1,
}


def _params(kind: str, rng: random.Random, window: float) -> dict:
    if kind == "kill_worker":
        return {"worker": rng.randint(1, 2)}
    if kind == "second_beat":
        return {"seconds": round(rng.uniform(10, 30), 1)}
    if kind == "vast_5xx":
        return {"endpoint": rng.choice(("list", "show", "logs", "destroy")), "times": 6}
    if kind == "vast_html":
        return {"endpoint": rng.choice(("list", "search", "logs")), "times": 4}
    if kind == "vast_slow":
        return {"endpoint": rng.choice(("list", "logs")), "delay": 3.0, "times": 5}
    if kind == "vast_429_storm":
        return {"times": 5}
    if kind in ("arkindex_5xx", "arkindex_html_502", "s3_down", "s3_urls_expire"):
        return {"seconds": window}
    if kind == "arkindex_slow":
        return {"seconds": 3.0, "times": 10}
    return {}


def build_plan(
    seed: int,
    n_tasks: int = 60,
    *,
    quick: bool = False,
    faults: bool = True,
    label_share: float = 0.25,
) -> ChaosPlan:
    """The workload and the fault schedule of one run. `faults=False`: the same workload
    (same tasks, stops and deletion) with nothing injected, the baseline of the bill."""
    rng = random.Random(seed)
    tasks = _workload(n_tasks, rng)
    horizon = max(60.0, 2.0 * n_tasks)  # injections land in [5 s, horizon]
    window = 10.0 if quick else 30.0
    label_faults = _label_faults(tasks, rng, label_share)
    injections = []
    for kind, count in (QUICK_INJECTIONS if quick else FULL_INJECTIONS).items():
        for _ in range(count):
            # Targeted kills need calls in flight: early, while most tasks start (in a quick
            # run of 12 tasks, within the first 15 s).
            early = 15.0 if quick else horizon / 2
            top = early if kind.startswith("kill_in_") else horizon
            at = round(rng.uniform(5.0, top), 1)
            injections.append(Injection(at, kind, _params(kind, rng, window)))
    if not faults:
        label_faults, injections = {}, []
    # Tasks hit by a crash fault run as scripted instances: a real crash leaves no marker,
    # while the local run mode's SIGTERM would be caught by the wrapper (exit 143).
    tasks = [
        ChaosTask(**{**t.__dict__, "scripted": label_faults.get(t.key) == "unexpected_exit"})
        for t in tasks
    ]
    return ChaosPlan(seed, tasks, label_faults, sorted(injections, key=lambda i: i.at), horizon)
