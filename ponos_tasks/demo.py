"""`ponos-vast demo`: a bounded run of the agent on the local stack (the `sim` extra).

(`ponos-vast run` without PONOS_CONFIG runs it too; the real agent's entry point is
ponos_tasks.run.)

The demo starts a private Redis, the local stack (S3, the Arkindex and Vast.ai simulators,
instances running their commands for real), then the agent's worker, beat and Flower as
real processes (ponos_tasks.supervisor, the Procfile's commands), loads the sample workload
(ponos_tasks.workload), shows progress, stops the designated task once it runs, waits until
every task is terminal and no instance is left, and prints the summary. Everything it
started is stopped at the end, on Ctrl-C and on SIGTERM too.

The figures come from the simulators, not from the agent: states from Arkindex, attempts,
GPU, price and cost from the Vast.ai billing ledger (by instance label), the live-instance
peak from its event timeline, API calls from its counters.
"""

from __future__ import annotations

import json
import sys
import time
from collections import Counter, defaultdict
from pathlib import Path

import click
import requests
import yaml

from ponos_tasks.config import ConfigError, load_config
from ponos_tasks.lifecycle import parse_label
from ponos_tasks.run import shielded, sigterm_as_interrupt
from ponos_tasks.simulators.harness import LocalRun, SimAdmin
from ponos_tasks.simulators.stack import free_port
from ponos_tasks.workload import build_workload

TERMINAL = ("completed", "failed", "error", "stopped")
STATE_ORDER = ("unscheduled", "pending", "running", "stopping", *TERMINAL)
POLL_SECONDS = 1.0


class DemoFailed(Exception):
    """The demo could not finish (timeout, an agent process died): the message says why."""


# ------------------------------------------------------------------------------ summary (pure)


def summarize(
    ark_tasks: list[dict],
    expected: dict[str, str],
    ledger: dict,
    events: list[dict],
    stats: dict,
    names: dict[str, str] | None = None,
    budget: dict | None = None,
) -> dict:
    """The --json document from the simulators' admin answers (pure, unit-tested).

    `names`: task id -> "process/slug", shown in the table instead of the bare slug.
    `budget`: the agent's budget section as it ran (environment included), reported."""
    instances_of = defaultdict(list)
    for row in ledger.get("instances", []):
        info = parse_label(row.get("label"))
        if info is not None:
            instances_of[info.task_id].append((info.attempt, row))

    live: Counter = Counter()
    peak: Counter = Counter()
    fleet = fleet_peak = 0  # instances of the agent alive at once
    # At equal times a destroy goes first: an instance replaced in the same instant is not
    # two alive.
    for event in sorted(events, key=lambda e: (e.get("t", 0), e.get("event") == "created")):
        info = parse_label(event.get("label"))
        if info is None or event.get("event") not in ("created", "destroyed"):
            continue
        step = 1 if event["event"] == "created" else -1
        live[info.task_id] += step
        peak[info.task_id] = max(peak[info.task_id], live[info.task_id])
        fleet += step
        fleet_peak = max(fleet_peak, fleet)

    rows = []
    for task in ark_tasks:
        attempts = sorted(instances_of.get(task["id"], []), key=lambda pair: pair[0])
        last = attempts[-1][1] if attempts else {}
        rows.append(
            {
                "id": task["id"],
                "slug": task.get("slug"),
                "name": (names or {}).get(task["id"], task.get("slug")),
                "state": task["state"],
                "expected": expected.get(task["id"]),
                "attempts": len({attempt for attempt, _ in attempts}),
                "gpu_name": last.get("gpu_name"),
                "dph_total": last.get("dph_total"),
                "cost": round(sum(row.get("cost") or 0.0 for _, row in attempts), 6),
                "runtime_s": _runtime(task.get("history", [])),
            }
        )
    states = Counter(row["state"] for row in rows)
    totals = {
        "tasks": len(rows),
        **{state: states.get(state, 0) for state in TERMINAL},
        "unexpected": sum(1 for r in rows if r["expected"] and r["state"] != r["expected"]),
        "cost": round(float(ledger.get("total_cost") or 0.0), 6),
        "instances_left": int(stats.get("live_instances", 0)),
        "max_live_instances": fleet_peak,
        "max_live_instances_per_task": max(peak.values(), default=0),
        "api_calls": sum((stats.get("calls") or {}).values()),
        "rate_limited": sum((stats.get("rate_limited") or {}).values()),
    }
    return {"tasks": rows, "totals": totals, "budget": budget}


def _runtime(history: list[dict]) -> float | None:
    """Real seconds from `running` to the terminal state, as Arkindex saw them."""
    started = next(
        (h["t"] for h in history if h.get("accepted") and h.get("to") == "running"), None
    )
    ended = next((h["t"] for h in history if h.get("accepted") and h.get("to") in TERMINAL), None)
    if started is None or ended is None:
        return None
    return round(ended - started, 1)


def format_table(document: dict) -> str:
    header = ("task", "process/slug", "state", "attempts", "GPU", "$/h", "cost $", "run time")
    lines = []
    for row in document["tasks"]:
        state = row["state"] + (
            "" if row["expected"] in (None, row["state"]) else f" (expected {row['expected']})"
        )
        lines.append(
            (
                row["id"][:8],
                row["name"] or "",
                state,
                str(row["attempts"]),
                row["gpu_name"] or "-",
                f"{row['dph_total']:.3f}" if row["dph_total"] is not None else "-",
                f"{row['cost']:.5f}",
                f"{row['runtime_s']:.1f} s" if row["runtime_s"] is not None else "-",
            )
        )
    widths = [
        max(len(h), *(len(line[i]) for line in lines)) if lines else len(h)
        for i, h in enumerate(header)
    ]
    out = [
        "  ".join(h.ljust(w) for h, w in zip(header, widths, strict=True)),
        "  ".join("-" * w for w in widths),
    ]
    out += ["  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) for line in lines]
    t = document["totals"]
    out.append("")
    out.append(
        f"Totals: {t['tasks']} tasks: {t['completed']} completed, {t['failed']} failed, "
        f"{t['error']} error, {t['stopped']} stopped; cost ${t['cost']:.5f}; "
        f"instances left {t['instances_left']}; max live instances {t['max_live_instances']} "
        f"(per task {t['max_live_instances_per_task']}); {t['api_calls']} Vast.ai API calls, "
        f"{t['rate_limited']} rate limited"
    )
    return "\n".join(out)


# ------------------------------------------------------------------------------ the demo


def demo_config(stack, time_scale: float) -> dict:
    """The agent's config for the local stack, with intervals suited to a short run."""
    config = yaml.safe_load(stack.config_yaml())
    config["sync_interval"] = 2
    config["logs_interval"] = 5
    config["agent_name"] = "ponos-vast-demo"
    config["vast_api"].update(
        {
            # The simulator's rate limits shrink with its clock; so do the agent's intervals.
            "rate_limit_scale": 1.0 / time_scale,
            "loading_deadline": max(30.0, 1200.0 / time_scale),
            "offer_wait": max(60.0, 3600.0 / time_scale),
        }
    )
    # The budget section (PONOS__BUDGET__* in the environment wins, as for every agent).
    config.setdefault("budget", {})["max_instances"] = 6
    return config


class Demo:
    """The demo's run: a LocalRun (private Redis, local stack, agent) and its workload."""

    def __init__(self, n_tasks: int, time_scale: float, timeout: float, logs_dir: Path | None, say):
        self.n_tasks = n_tasks
        self.time_scale = time_scale
        self.timeout = timeout
        self.say = say
        # Redis in its own session: a terminal's Ctrl-C does not kill it before the agent.
        self.local = LocalRun(
            time_scale=time_scale,
            vast_run_mode="local",
            redis="private-or-env",
            redis_new_session=True,
            logs_dir=logs_dir,
            say=say,
        )
        self.logs_dir = self.local.logs_dir
        self.expected: dict[str, str] = {}
        self.names: dict[str, str] = {}
        self.to_stop: str | None = None
        self.budget: dict | None = None

    @property
    def stack(self):
        return self.local.stack

    @property
    def agent(self):
        return self.local.agent

    @property
    def admin(self) -> SimAdmin:
        return self.local.admin

    # -- setup / teardown

    def start(self) -> None:
        try:
            self.local.start()
        except RuntimeError as error:
            raise DemoFailed(str(error)) from None
        path = self.local.write_config(demo_config(self.stack, self.time_scale))
        # The budget as the agent reads it: the file and the environment's PONOS__BUDGET__*.
        try:
            self.budget = load_config(str(path)).budget.model_dump()
        except ConfigError as error:
            raise DemoFailed("; ".join(error.problems)) from None
        agent = self.local.start_agent(path, flower_port=free_port())
        self.say(
            f"Local stack: Arkindex {self.stack.arkindex_url}, Vast.ai "
            f"{self.stack.vast_url} (x{self.time_scale:g}), Redis {self.stack.redis_url}"
        )
        self.say(f"Agent: worker, beat and Flower started; logs in {self.logs_dir}")
        self.say(agent.flower.notice())

    def stop(self) -> None:
        self.local.stop()

    # -- simulators

    def ark_tasks(self) -> list[dict]:
        return [t for t in self.admin.tasks().values() if t["id"] in self.expected]

    def vast(self, what: str) -> dict:
        return self.admin.vast(what)

    def load_workload(self) -> None:
        for process in build_workload(self.n_tasks):
            spec = process.admin_json()
            by_slug = self.admin.process(spec["name"], spec["tasks"])
            for task in process.tasks:
                task_id = by_slug[task.slug]
                self.expected[task_id] = task.expect
                self.names[task_id] = f"{process.name}/{task.slug}"
                if task.stop_by_user:
                    self.to_stop = task_id
        counts = Counter(self.expected.values())
        n_processes = len({name.split("/")[0] for name in self.names.values()})
        self.say(
            f"Workload: {len(self.expected)} tasks in {n_processes} processes; expected "
            + ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
            + (" (one stopped by the user once it runs)" if self.to_stop else "")
        )

    # -- the run

    def _check_agent(self) -> None:
        dead = self.local.check_alive()
        if dead:
            raise DemoFailed("agent process exited: " + ", ".join(dead) + self._log_tail())

    def _log_tail(self, lines: int = 15) -> str:
        path = self.logs_dir / "worker1.log"
        try:
            tail = path.read_text(errors="replace").splitlines()[-lines:]
        except OSError:
            return ""
        return f"\nlast lines of {path}:\n" + "\n".join(tail)

    def _status_line(self, elapsed: float, tasks: list[dict]) -> str:
        counts = Counter(t["state"] for t in tasks)
        stats, ledger = self.vast("stats"), self.vast("ledger")
        parts = [f"{counts[s]} {s}" for s in STATE_ORDER if counts.get(s)]
        return (
            f"[{elapsed:6.1f}s] " + ", ".join(parts) + f" | {stats['live_instances']} live "
            f"instances | ${ledger['total_cost']:.5f} spent"
        )

    def run(self) -> dict:
        start = time.monotonic()
        deadline = start + self.timeout
        seen: dict[str, str] = {}
        last_status = 0.0
        stop_sent = False
        while True:
            self._check_agent()
            tasks = self.ark_tasks()
            now = time.monotonic()
            changed = False
            for task in tasks:
                if seen.get(task["id"]) != task["state"]:
                    changed = True
                    self.say(
                        f"[{now - start:6.1f}s] {task['id'][:8]} "
                        f"{self.names[task['id']]:<18} {seen.get(task['id'], 'new')} -> "
                        f"{task['state']}"
                    )
                    seen[task["id"]] = task["state"]
            if self.to_stop and not stop_sent and seen.get(self.to_stop) == "running":
                self.admin.stop_task(self.to_stop)
                stop_sent = True
                self.say(
                    f"[{now - start:6.1f}s] {self.to_stop[:8]} {self.names[self.to_stop]}: "
                    "stop requested by the user"
                )
            if changed or now - last_status >= 15:
                self.say(self._status_line(now - start, tasks))
                last_status = now
            if all(t["state"] in TERMINAL for t in tasks):
                break
            if now > deadline:
                pending = [
                    f"{self.names[t['id']]} ({t['state']})"
                    for t in tasks
                    if t["state"] not in TERMINAL
                ]
                raise DemoFailed(
                    f"timeout after {self.timeout:g} s: not finished: " + ", ".join(pending)
                )
            time.sleep(POLL_SECONDS)
        self.say(
            f"[{time.monotonic() - start:6.1f}s] every task is terminal; waiting for the "
            "last instances to go"
        )
        while self.vast("stats")["live_instances"] > 0:
            if time.monotonic() > deadline:
                raise DemoFailed(
                    f"timeout after {self.timeout:g} s: "
                    f"{self.vast('stats')['live_instances']} instance(s) left"
                )
            self._check_agent()
            time.sleep(POLL_SECONDS)
        return summarize(
            self.ark_tasks(),
            self.expected,
            self.vast("ledger"),
            self.vast("events")["events"],
            self.vast("stats"),
            self.names,
            self.budget,
        )


@click.command("demo")
@click.option(
    "--tasks",
    "n_tasks",
    type=click.IntRange(1, 200),
    default=20,
    show_default=True,
    help="How many tasks the sample workload has.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="Print one JSON document on stdout (progress goes to stderr).",
)
@click.option(
    "--time-scale",
    type=click.FloatRange(min=1.0),
    default=20.0,
    show_default=True,
    help="Simulated Vast.ai seconds per real second (image pulls, billing, limits).",
)
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the worker, beat and Flower logs in this folder.",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=1.0),
    default=600.0,
    show_default=True,
    help="Give up (exit status 1) when the run takes longer, in seconds.",
)
def demo_command(n_tasks, as_json, time_scale, keep_logs, timeout):
    """A bounded run against the local stack: sample workload, progress, summary."""

    def say(message: str) -> None:
        click.echo(message, err=as_json)

    demo = Demo(n_tasks, time_scale, timeout, keep_logs, say)
    try:
        with sigterm_as_interrupt():
            try:
                demo.start()
                demo.load_workload()
                document = demo.run()
            finally:
                say("Stopping the agent and the local stack...")
                with shielded():
                    demo.stop()
    except KeyboardInterrupt:
        click.echo("Interrupted: everything the demo started was stopped.", err=True)
        sys.exit(130)
    except (DemoFailed, requests.RequestException) as error:
        click.echo(f"demo failed: {error}", err=True)
        sys.exit(1)
    if as_json:
        click.echo(json.dumps(document))
    else:
        click.echo("")
        click.echo(format_table(document))
    totals = document["totals"]
    if totals["unexpected"] or totals["instances_left"]:
        click.echo(
            f"demo: {totals['unexpected']} task(s) ended in an unexpected state, "
            f"{totals['instances_left']} instance(s) left",
            err=True,
        )
        sys.exit(1)
