"""Launches at Vast.ai's create bound: a burst of N tasks, offers and instance slots for all.

    .venv/bin/python -m benchmarks.launch --tasks 200 --time-scale 3 --label after

Vast.ai lets one API key create an instance every 4.5 s at most (docs/reference.md §1.2):
about 13.3 launches a minute. With enough offers and no max_instances in the way, that
interval is the only bound on how fast a burst starts; this measures how close the agent
comes to it. Real worker and beat processes run against the local stack (benchmarks/common.py).

Figures, all from the simulators: the creates Vast.ai accepted (its `created` events, on the
simulated clock), the create calls it received (`calls`, refused ones included) and the 429s
it answered; pending → create from the Arkindex task history (real seconds, converted to
simulated ones too). Launch rate = (launches - 1) / (last - first create) on the simulated
clock, against the bound 60 / 4.5 per simulated minute.

Why a low time_scale (3 by default): scaled down, the agent's rate limiter adds 0.05 real s
to every scaled interval (SCALED_MARGIN_S in ratelimit.py, for the machine's send jitter),
i.e. 0.05 × time_scale simulated seconds per create; at time_scale 3 that is 0.15 s of 4.5
(3 %), at 50 it would be 2.5 s (55 %) and the figure would measure the margin, not the agent.
Unscaled (--time-scale 1) there is no such margin: the figure a real deployment gets.

The run stops once every task has its instance (it does not wait for the tasks to end): the
instances run for an hour of simulated time, so the watchers' load is there during the burst.
"""

from __future__ import annotations

import json
import re
import time
from pathlib import Path

import click
import redis

from benchmarks.common import (
    AgentRun,
    BenchFailed,
    fmt,
    history_time,
    machine,
    percentile,
    table,
    write_section,
)
from ponos_tasks.lifecycle import parse_label
from ponos_tasks.models import SENT_AT_HEADER, STEPS_QUEUE

CREATE_INTERVAL = 4.5  # Vast.ai's minimum interval between two creates of one key (sim s)
BOUND_PER_MIN = 60.0 / CREATE_INTERVAL
PLOT = Path(__file__).resolve().parent / "launch.png"
OFFER_GONE = re.compile(r"was taken before we could rent it")


def task_specs(n: int) -> list[dict]:
    env = {
        "SIM_DURATION": "3600",
        "SIM_PULL_SECONDS": "30",
        "SIM_LOG_LINES": "1",
        "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0",
        "SIM_SELF_STOP": "true",
    }
    return [
        {
            "slug": f"l{i:04d}",
            "image": "registry.example.com/bench/worker:1",
            "command": "python -m worker",
            "env": env,
            "requires_gpu": True,
        }
        for i in range(n)
    ]


def market(n: int) -> dict[int, float]:
    """One single-GPU machine per task and a quarter more: every task finds an offer."""
    return {50_000 + i: round(0.20 + 0.001 * (i % 97), 3) for i in range(n + n // 4 + 4)}


def run_burst(
    tasks: int,
    *,
    time_scale: float = 3.0,
    concurrency: int = 4,
    timeout: float | None = None,
    say=lambda _s: None,
    keep_logs: Path | None = None,
) -> dict:
    """Submit `tasks` tasks at once and measure their launches (see the module's doc).

    `timeout` (real s) defaults to twice the time the bound allows, plus a minute; a run
    that reaches it stops and reports the launches so far (`launched` < `tasks`)."""
    if timeout is None:
        timeout = 60.0 + 2 * tasks * CREATE_INTERVAL / time_scale
    with AgentRun(
        time_scale=time_scale,
        max_instances=tasks + 10,
        concurrency=concurrency,
        keep_logs=keep_logs,
    ) as run:
        run.admin.set_market(market(tasks))
        time.sleep(3)  # the worker registers and beat ticks once before the burst
        say(f"{tasks} tasks, time_scale {time_scale:g}: agent up, submitting")
        ids = set(run.submit("launch", task_specs(tasks)))
        start = time.monotonic()
        created: dict[str, float] = {}  # task id -> sim t of its first accepted create
        broker = redis.Redis.from_url(run.redis_url)
        queued: list[int] = []  # the steps queue's length, sampled each second
        waited: list[float] = []  # how long its oldest message had waited then (real s)
        while len(created) < tasks:
            length, age = steps_queue(broker)
            queued.append(length)
            waited.append(age)
            dead = run.agent.check_alive()
            if dead:
                raise BenchFailed("agent process exited: " + ", ".join(dead))
            for event in run.vast("events")["events"]:
                label = parse_label(event.get("label"))
                if event.get("event") == "created" and label and label.task_id in ids:
                    created.setdefault(label.task_id, event["t"])
            elapsed = time.monotonic() - start
            if elapsed > timeout:  # reported as it stands: a slow agent is a figure too
                say(f"only {len(created)}/{tasks} launched after {timeout:g} s: stopping")
                break
            say(f"  [{elapsed:5.1f}s] {len(created)}/{tasks} launched")
            time.sleep(1.0)
        stats = run.vast("stats")
        ledger = run.vast("ledger")
        pending = {t["id"]: history_time(t, "pending") for t in run.ark_tasks()}
        offer_gone = len(OFFER_GONE.findall(run.worker_log()))
        to_create = [
            run.sim_to_epoch(t) - pending[task] for task, t in created.items() if pending.get(task)
        ]

    times = sorted(created.values())
    span = times[-1] - times[0]
    rate = (len(times) - 1) / span * 60 if span > 0 else None
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    creates = stats["calls"].get("create", 0)
    return {
        "tasks": tasks,
        "time_scale": time_scale,
        "concurrency": concurrency,
        "launched": len(times),
        "launches_per_min": round(rate, 2) if rate else None,
        "bound_per_min": round(BOUND_PER_MIN, 2),
        "launch_rate_vs_bound": round(rate / BOUND_PER_MIN, 3) if rate else None,
        "pending_to_create_p50_s": _round(percentile(to_create, 50)),
        "pending_to_create_p95_s": _round(percentile(to_create, 95)),
        "create_gap_p50_sim_s": _round(percentile(gaps, 50)),
        "create_gap_p95_sim_s": _round(percentile(gaps, 95)),
        "create_gap_max_sim_s": _round(max(gaps, default=None)),
        "create_calls": creates,
        "instances_created": len(ledger["instances"]),
        "creates_per_instance": round(creates / max(1, len(ledger["instances"])), 3),
        "no_such_ask": offer_gone,
        "rate_limited": stats["rate_limited"],
        # What waits behind the creates: the watches, log reads and reports of the tasks
        # already launched (the chain steps of every task share the `steps` queue).
        "steps_queue_p50": percentile(queued, 50),
        "steps_queue_max": max(queued, default=None),
        "steps_oldest_wait_p95_s": _round(percentile(waited, 95)),
        "steps_oldest_wait_max_s": _round(max(waited, default=None)),
        "calls_per_launch": {
            k: round(v / max(1, len(times)), 2) for k, v in sorted(stats["calls"].items())
        },
        "launch_times_sim_s": [round(t - times[0], 3) for t in times],
    }


def steps_queue(broker: redis.Redis) -> tuple[int, float]:
    """The steps queue's length and how long its oldest message has waited (real s; kombu
    pushes on the left, so the oldest is the last element, and its header says when it was
    sent). A countdown message is not in the list: the worker fetched it and holds it."""
    length = broker.llen(STEPS_QUEUE)
    raw = broker.lindex(STEPS_QUEUE, -1)
    if raw is None:
        return length, 0.0
    try:
        sent_at = float(json.loads(raw)["headers"][SENT_AT_HEADER])
    except (ValueError, KeyError, TypeError):
        return length, 0.0
    return length, max(0.0, time.time() - sent_at)


def _round(value, digits: int = 2):
    return None if value is None else round(value, digits)


def plot(results: dict[str, dict], path: Path = PLOT) -> Path:
    """Tasks launched over (simulated) time for each labelled run, against the bound."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=110)
    longest = 0.0
    for label, result in results.items():
        times = result.get("launch_times_sim_s")
        if not times:  # a run recorded from its printed JSON, which leaves them out
            continue
        longest = max(longest, times[-1])
        ax.step(
            times,
            range(1, len(times) + 1),
            where="post",
            label=f"{label}: {fmt(result['launch_rate_vs_bound'], 3)} of the bound",
        )
    n = max(r["launched"] for r in results.values())
    bound_end = (n - 1) * CREATE_INTERVAL
    ax.plot([0, bound_end], [1, n], "k--", linewidth=1, label="bound: one create / 4.5 s")
    ax.set_xlim(0, max(longest, bound_end) * 1.03)
    ax.set_xlabel("simulated seconds since the first create")
    ax.set_ylabel("tasks launched")
    ax.set_title(f"Burst of {n} tasks: launches against Vast.ai's create bound")
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


RESULTS_JSON = Path(__file__).resolve().parent / "launch_results.json"


def report(results: dict[str, dict], commits: dict[str, str], commands: dict[str, str]) -> str:
    rows = []
    for label, r in results.items():
        rows.append(
            [
                f"{label} ({commits.get(label, '?')})",
                f"{r['launched']} of {r['tasks']}",
                f"{fmt(r['launches_per_min'])} / {fmt(r['bound_per_min'])}",
                fmt(r["launch_rate_vs_bound"], 3),
                f"{fmt(r['pending_to_create_p50_s'])} / {fmt(r['pending_to_create_p95_s'])}",
                f"{fmt(r['create_gap_p50_sim_s'])} / {fmt(r['create_gap_p95_sim_s'])} / "
                f"{fmt(r['create_gap_max_sim_s'])}",
                fmt(r["creates_per_instance"], 3),
                r["no_such_ask"],
                f"{fmt(r.get('steps_queue_p50'))} / {fmt(r.get('steps_queue_max'))} / "
                f"{fmt(r.get('steps_oldest_wait_p95_s'))} / {fmt(r.get('steps_oldest_wait_max_s'))}",
                ", ".join(f"{k} {v}" for k, v in sorted(r["rate_limited"].items())) or "0",
                ", ".join(f"{k} {v}" for k, v in r["calls_per_launch"].items()),
            ]
        )
    out = [
        table(
            [
                "run (commit)",
                "launched",
                "launches/min (sim) / bound",
                "vs bound",
                "pending→create p50/p95 (real s)",
                "gap between creates p50/p95/max (sim s)",
                "create calls per instance",
                "no_such_ask",
                "steps queue p50/max (msgs), its oldest's wait p95/max (real s)",
                "429s",
                "Vast.ai calls per launch",
            ],
            rows,
        ),
        "",
        "![tasks launched over time against the create bound](benchmarks/launch.png)",
        "",
        "Commands: " + "; ".join(f"{k}: `{v}`" for k, v in commands.items()),
    ]
    return "\n".join(out)


@click.command()
@click.option("--tasks", type=int, default=200, show_default=True)
@click.option("--time-scale", type=float, default=3.0, show_default=True)
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option("--timeout", type=float, default=None, help="Real seconds (default: 2x the bound).")
@click.option(
    "--label",
    default="after",
    show_default=True,
    help="Name of this run in BENCHMARKS.md and the plot (e.g. before, after); runs with "
    "other labels kept in benchmarks/launch_results.json stay in the table and the plot.",
)
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the worker and beat logs under this folder.",
)
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
def main(tasks, time_scale, concurrency, timeout, label, keep_logs, no_write):
    """Launch rate of a burst against Vast.ai's create bound, pending → create, wasted creates."""
    from benchmarks.common import command_line

    machine_info = machine()
    try:
        result = run_burst(
            tasks,
            time_scale=time_scale,
            concurrency=concurrency,
            timeout=timeout,
            say=lambda s: click.echo(s, err=True),
            keep_logs=keep_logs,
        )
    except BenchFailed as error:
        raise click.ClickException(str(error)) from error
    click.echo(json.dumps({k: v for k, v in result.items() if k != "launch_times_sim_s"}))
    if no_write:
        return
    saved = json.loads(RESULTS_JSON.read_text()) if RESULTS_JSON.exists() else {}
    saved[label] = {
        "result": result,
        "commit": machine_info["commit"],
        "command": command_line(),
    }
    RESULTS_JSON.write_text(json.dumps(saved, indent=1) + "\n")
    results = {k: v["result"] for k, v in saved.items()}
    plot(results)
    text = report(
        results,
        {k: v["commit"] for k, v in saved.items()},
        {k: v["command"] for k, v in saved.items()},
    )
    click.echo(text)
    write_section("launch", "Launches at the create bound", text, machine_info)


if __name__ == "__main__":
    main()
