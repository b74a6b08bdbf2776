"""Scale / throughput: N independent tasks, at most M instances, real worker and beat.

    .venv/bin/python -m benchmarks.scale --case 100:20 --case 200:50 --time-scale 50

Each case gets a fresh private Redis, local stack and agent. Instances are scripted (no
subprocess per instance): each runs SIM_DURATION simulated seconds after a SIM_PULL_SECONDS
pull, prints the wrapper's marker `PONOS_EXIT_CODE=0` and stops itself. Figures come from the
simulators (Arkindex task history, Vast.ai events, ledger and counters), the agent's worker
log (ponos.sync durations) and /proc (RSS of the worker's process tree).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from pathlib import Path

import click

from benchmarks.common import (
    AgentRun,
    BenchFailed,
    fmt,
    history_time,
    live_peaks,
    machine,
    spread,
    sync_durations,
    table,
    write_section,
)
from ponos_tasks.lifecycle import parse_label


def task_specs(n: int, duration: float, pull: float) -> list[dict]:
    env = {
        "SIM_DURATION": f"{duration:g}",
        "SIM_PULL_SECONDS": f"{pull:g}",
        "SIM_LOG_LINES": "3",
        "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0",
        "SIM_SELF_STOP": "true",
    }
    return [
        {
            "slug": f"t{i:04d}",
            "image": "registry.example.com/bench/worker:1",
            "command": "python -m worker",
            "env": env,
            "requires_gpu": True,
        }
        for i in range(n)
    ]


def run_case(
    n: int,
    m: int,
    *,
    time_scale: float,
    duration: float,
    pull: float,
    concurrency: int,
    timeout: float,
    say,
    keep_logs: Path | None = None,
) -> dict:
    logs = keep_logs / f"{n}-{m}" if keep_logs else None
    with AgentRun(
        time_scale=time_scale, max_instances=m, concurrency=concurrency, keep_logs=logs
    ) as run:
        time.sleep(3)  # let the worker register and beat tick once before the clock starts
        say(f"case {n} tasks / {m} instances: agent up, submitting")
        run.submit(f"bench-{n}", task_specs(n, duration, pull))
        last = [0.0]

        def progress(elapsed, tasks):
            if elapsed - last[0] >= 10:
                last[0] = elapsed
                say(
                    f"  [{elapsed:5.1f}s] "
                    + ", ".join(
                        f"{c} {s}" for s, c in sorted(Counter(t["state"] for t in tasks).items())
                    )
                )

        wall = run.wait_done(timeout, progress)
        run.sampler.stop()
        tasks = run.ark_tasks()
        events = run.vast("events")["events"]
        stats = run.vast("stats")
        ledger = run.vast("ledger")

        first_created: dict[str, float] = {}
        for event in events:
            label = parse_label(event.get("label"))
            if event.get("event") == "created" and label is not None:
                first_created.setdefault(label.task_id, run.sim_to_epoch(event["t"]))
        to_created, to_running = [], []
        for task in tasks:
            pending = history_time(task, "pending")
            running = history_time(task, "running")
            if pending is not None and task["id"] in first_created:
                to_created.append(first_created[task["id"]] - pending)
            if pending is not None and running is not None:
                to_running.append(running - pending)
        # The first wave (as many tasks as there are instance slots) waits for no capacity.
        wave = sorted(to_created)[:m]
        submitted = min(history_time(t, "pending") for t in tasks)
        ended = max(next(h["t"] for h in t["history"] if h["to"] == t["state"]) for t in tasks)
        peak_live, peak_per_task = live_peaks(events)
        attempts = Counter(
            parse_label(r["label"]).task_id for r in ledger["instances"] if parse_label(r["label"])
        )
        syncs = sync_durations(run.worker_log())
        return {
            "tasks": n,
            "max_instances": m,
            "time_scale": time_scale,
            "sim_duration": duration,
            "sim_pull": pull,
            "concurrency": concurrency,
            "wall_s": round(wall, 1),
            "terminal_span_s": round(ended - submitted, 1),
            "states": dict(Counter(t["state"] for t in tasks)),
            "tasks_per_min": round(n / (ended - submitted) * 60, 1),
            "pending_to_created_s": spread(to_created),
            "pending_to_running_s": spread(to_running),
            "first_wave_pending_to_created_s": spread(wave),
            "calls": stats["calls"],
            "calls_per_task": {k: round(v / n, 2) for k, v in sorted(stats["calls"].items())},
            "rate_limited": stats["rate_limited"],
            "peak_live": peak_live,
            "max_live_per_task": max(
                peak_per_task, max(stats["max_live_per_label"].values(), default=0)
            ),
            "instances_created": len(ledger["instances"]),
            "max_attempts": max(attempts.values(), default=0),
            "instances_left": stats["live_instances"],
            "cost": round(ledger["total_cost"], 4),
            "peak_rss_mib": {k: round(v / 1024, 1) for k, v in run.sampler.peak_rss_kb.items()},
            "redis_peak_used_mib": round(run.sampler.peak_redis / 2**20, 2),
            "sync_s": spread(syncs),
        }


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        created, running = r["pending_to_created_s"], r["pending_to_running_s"]
        wave = r["first_wave_pending_to_created_s"]
        rows.append(
            [
                f"{r['tasks']} / {r['max_instances']}",
                f"{r['terminal_span_s']:.1f}",
                f"{r['tasks_per_min']:.1f}",
                f"{fmt(created['p50'])} / {fmt(created['p95'])} / {fmt(created['max'])}",
                f"{fmt(wave['p50'])} / {fmt(wave['max'])}",
                f"{fmt(running['p50'])} / {fmt(running['p95'])} / {fmt(running['max'])}",
                f"{r['peak_live']} / {r['max_instances']}",
                r["max_live_per_task"],
                r["instances_created"],
                r["instances_left"],
                sum(r["rate_limited"].values()),
                ", ".join(f"{k} {v}" for k, v in r["states"].items()),
            ]
        )
    out = [
        table(
            [
                "tasks / max instances",
                "all terminal (real s)",
                "tasks/min",
                "pending→created p50/p95/max (real s)",
                "first wave (M fastest) pending→created p50/max (real s)",
                "pending→running p50/p95/max (real s)",
                "peak live / max",
                "max live per task",
                "instances created",
                "left",
                "429s",
                "final states",
            ],
            rows,
        ),
        "",
    ]
    endpoints = sorted({k for r in results for k in r["calls"]})
    out.append("Vast.ai API calls per task, by endpoint:\n")
    out.append(
        table(
            ["tasks / max instances", *endpoints, "total"],
            [
                [
                    f"{r['tasks']} / {r['max_instances']}",
                    *[r["calls_per_task"].get(k, 0.0) for k in endpoints],
                    round(sum(r["calls"].values()) / r["tasks"], 2),
                ]
                for r in results
            ],
        )
    )
    out.append("")
    out.append("Resources and the sync loop:\n")
    out.append(
        table(
            [
                "tasks / max instances",
                "peak RSS worker tree (MiB)",
                "peak RSS beat (MiB)",
                "Redis peak used_memory (MiB)",
                "ponos.sync runs",
                "sync p50/p95/max (s)",
            ],
            [
                [
                    f"{r['tasks']} / {r['max_instances']}",
                    r["peak_rss_mib"].get("worker1"),
                    r["peak_rss_mib"].get("beat1"),
                    r["redis_peak_used_mib"],
                    r["sync_s"]["n"],
                    f"{fmt(r['sync_s']['p50'], 3)} / {fmt(r['sync_s']['p95'], 3)} / "
                    f"{fmt(r['sync_s']['max'], 3)}",
                ]
                for r in results
            ],
        )
    )
    r0 = results[0]
    out.append("")
    out.append(
        f"Setup: time_scale {r0['time_scale']:g}; each task runs {r0['sim_duration']:g} "
        f"sim s ({r0['sim_duration'] / r0['time_scale']:.1f} real s) after a "
        f"{r0['sim_pull']:g} sim s pull; one worker, concurrency {r0['concurrency']}, "
        "one beat, sync_interval 2 s, logs_interval 5 s; scripted instances (marker "
        '`PONOS_EXIT_CODE=0`, self-stop). "all terminal" runs from the first task '
        "becoming pending to the last terminal state in Arkindex."
    )
    return "\n".join(out)


def parse_case(text: str) -> tuple[int, int]:
    n, _, m = text.partition(":")
    return int(n), int(m)


@click.command()
@click.option(
    "--case",
    "cases",
    multiple=True,
    default=("100:20", "200:50"),
    show_default=True,
    help="TASKS:MAX_INSTANCES (repeatable).",
)
@click.option("--time-scale", type=float, default=50.0, show_default=True)
@click.option(
    "--duration",
    type=float,
    default=300.0,
    show_default=True,
    help="Simulated seconds each task runs.",
)
@click.option(
    "--pull", type=float, default=30.0, show_default=True, help="Simulated seconds of image pull."
)
@click.option("--concurrency", type=int, default=4, show_default=True)
@click.option(
    "--timeout",
    type=float,
    default=300.0,
    show_default=True,
    help="Give up on a case after this many real seconds.",
)
@click.option(
    "--keep-logs",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep the worker and beat logs under this folder (one per case).",
)
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
def main(cases, time_scale, duration, pull, concurrency, timeout, keep_logs, no_write):
    """Throughput, latency, API calls, peak instances and memory at N tasks / M instances."""
    machine_info = machine()
    results = []
    for case in cases:
        n, m = parse_case(case)
        try:
            results.append(
                run_case(
                    n,
                    m,
                    time_scale=time_scale,
                    duration=duration,
                    pull=pull,
                    concurrency=concurrency,
                    timeout=timeout,
                    say=lambda s: click.echo(s, err=True),
                    keep_logs=keep_logs,
                )
            )
        except BenchFailed as error:
            raise click.ClickException(f"case {case}: {error}") from error
        click.echo(json.dumps(results[-1]))
    text = report(results)
    click.echo(text)
    if not no_write:
        write_section("scale", "Scale and throughput", text, machine_info)


if __name__ == "__main__":
    main()
