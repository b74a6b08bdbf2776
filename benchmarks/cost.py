"""Cost: what the Vast.ai ledger billed for the demo's workload vs the ideal cost.

    .venv/bin/python -m benchmarks.cost --tasks 20 --time-scale 20

Runs exactly what `ponos-vast demo` runs (ponos_tasks.demo.Demo: private Redis, local stack
with instances running their commands as real subprocesses through the agent's wrapper,
worker + beat + Flower, the sample workload with failures and one user stop), then compares,
per instance, the ledger's cost with the ideal one: dph_total × the task's own run time (from
the instance turning `running` to the moment its command ended — the self-stop the wrapper
sends right after the marker line; for the user-stopped task, the stop request). The
difference is the overhead of loading (storage billed while the image is pulled), log
publication and the destroy delay. Idle billed seconds per instance = destroyed_at − the
moment its command ended.
"""

from __future__ import annotations

import json

import click

from benchmarks.common import fmt, history_time, machine, spread, table, write_section
from ponos_tasks.demo import Demo, DemoFailed
from ponos_tasks.lifecycle import parse_label


def command_ends(events: list[dict]) -> dict[int, tuple[float, float]]:
    """instance id -> (sim t it turned running, sim t its command ended) from the events."""
    running: dict[int, float] = {}
    ended: dict[int, float] = {}
    for event in sorted(events, key=lambda e: e["t"]):
        iid = event["instance_id"]
        if (
            event["event"] == "status"
            and event.get("actual_status") == "running"
            and event.get("intended_status", "running") == "running"
        ):
            running.setdefault(iid, event["t"])
        elif (
            iid in running
            and iid not in ended
            and (
                event["event"] == "destroyed"
                or (
                    event["event"] == "status"
                    and (
                        event.get("actual_status") != "running"
                        or event.get("intended_status") == "stopped"
                    )
                )
            )
        ):
            ended[iid] = event["t"]
    return {iid: (running[iid], ended[iid]) for iid in running if iid in ended}


def analyse(
    ledger: dict, events: list[dict], tasks: list[dict], epoch_to_sim, time_scale: float
) -> dict:
    by_id = {t["id"]: t for t in tasks}
    spans = command_ends(events)
    rows, idle_sim = [], []
    billed = ideal = gpu_over = storage_over = 0.0
    for row in ledger["instances"]:
        info = parse_label(row["label"])
        task = by_id.get(info.task_id) if info else None
        span = spans.get(row["id"])
        if task is None or span is None or row["destroyed_at"] is None:
            continue
        started, ended = span
        if task["state"] == "stopped":
            # Its command did not end by itself: the run the user wanted ended at the request.
            stop_at = history_time(task, "stopping") or history_time(task, "stopped")
            ended = min(ended, epoch_to_sim(stop_at)) if stop_at else ended
        run_s = max(0.0, ended - started)
        ideal_cost = row["dph_total"] * run_s / 3600.0
        gpu_dph = row["gpu_cost"] / row["gpu_seconds"] * 3600 if row["gpu_seconds"] else 0.0
        storage_dph = row["dph_total"] - gpu_dph
        idle = row["destroyed_at"] - ended
        idle_sim.append(idle)
        billed += row["cost"]
        ideal += ideal_cost
        gpu_over += gpu_dph * max(0.0, row["gpu_seconds"] - run_s) / 3600.0
        storage_over += storage_dph * max(0.0, row["storage_seconds"] - run_s) / 3600.0
        rows.append(
            {
                "task": task["slug"],
                "state": task["state"],
                "dph": row["dph_total"],
                "loading_s": started - row["created_at"],
                "run_s": run_s,
                "idle_s": idle,
                "billed": row["cost"],
                "ideal": ideal_cost,
            }
        )
    unmatched = len(ledger["instances"]) - len(rows)
    return {
        "instances": len(ledger["instances"]),
        "instances_analysed": len(rows),
        "unmatched": unmatched,
        "time_scale": time_scale,
        "billed": billed,
        "ledger_total": ledger["total_cost"],
        "ideal": ideal,
        "overhead": billed - ideal,
        "overhead_pct_of_billed": 100.0 * (billed - ideal) / billed if billed else None,
        "gpu_overhead": gpu_over,
        "storage_overhead": storage_over,
        "loading_sim_s": spread([r["loading_s"] for r in rows]),
        "run_sim_s": spread([r["run_s"] for r in rows]),
        "idle_sim_s": spread(idle_sim),
        "idle_real_s": spread([s / time_scale for s in idle_sim]),
        "rows": rows,
    }


def report(result: dict, summary: dict) -> str:
    t = summary["totals"]
    idle_sim, idle_real = result["idle_sim_s"], result["idle_real_s"]
    out = [
        table(
            [
                "billed (ledger) $",
                "ideal $",
                "overhead $",
                "overhead % of billed",
                "of which GPU $",
                "of which storage $",
            ],
            [
                [
                    f"{result['billed']:.5f}",
                    f"{result['ideal']:.5f}",
                    f"{result['overhead']:.5f}",
                    fmt(result["overhead_pct_of_billed"], 1),
                    f"{result['gpu_overhead']:.5f}",
                    f"{result['storage_overhead']:.5f}",
                ]
            ],
        ),
        "",
        table(
            ["per instance", "p50", "p95", "max"],
            [
                [
                    "loading (created → running), sim s",
                    *[fmt(result["loading_sim_s"][k], 1) for k in ("p50", "p95", "max")],
                ],
                [
                    "task run time, sim s",
                    *[fmt(result["run_sim_s"][k], 1) for k in ("p50", "p95", "max")],
                ],
                [
                    "idle billed after the command ended, sim s",
                    *[fmt(idle_sim[k], 1) for k in ("p50", "p95", "max")],
                ],
                [
                    "same idle, real s (agent latency)",
                    *[fmt(idle_real[k], 2) for k in ("p50", "p95", "max")],
                ],
            ],
        ),
        "",
        f"Workload: the demo's ({t['tasks']} tasks: {t['completed']} completed, "
        f"{t['failed']} failed, {t['error']} error, {t['stopped']} stopped; "
        f"{result['instances']} instances, {result['instances_analysed']} analysed); "
        f"time_scale {result['time_scale']:g}; instances left {t['instances_left']}; max live "
        f"instances per task {t['max_live_instances_per_task']}; {t['api_calls']} Vast.ai "
        f"calls, {t['rate_limited']} rate limited.",
        "",
        "The ledger bills GPU while `running` and storage from create to destroy; the ideal "
        "bills dph_total (GPU + storage) only for the command's own run. The idle time is "
        "made of agent latencies that run in real time (watch interval, the log request "
        "and its result_url delay, the final log upload, the destroy call); in simulated "
        "seconds it is multiplied by time_scale, so the overhead % here is that of tasks "
        "lasting a few real seconds (the demo's), i.e. an upper bound for real tasks.",
    ]
    return "\n".join(out)


@click.command()
@click.option("--tasks", "n_tasks", type=int, default=20, show_default=True)
@click.option("--time-scale", type=float, default=20.0, show_default=True)
@click.option("--timeout", type=float, default=300.0, show_default=True)
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
def main(n_tasks, time_scale, timeout, no_write):
    """Billed vs ideal cost of the demo's workload, idle billed seconds per instance."""
    machine_info = machine()

    def say(message: str) -> None:
        click.echo(message, err=True)

    demo = Demo(n_tasks, time_scale, timeout, None, say)
    try:
        demo.start()
        demo.load_workload()
        summary = demo.run()
        clock = demo.stack.vast.state.clock
        wall0 = clock.epoch(0.0)
        result = analyse(
            demo.vast("ledger"),
            demo.vast("events")["events"],
            demo.ark_tasks(),
            lambda wall: (wall - wall0) * time_scale,
            time_scale,
        )
    except DemoFailed as error:
        raise click.ClickException(str(error)) from error
    finally:
        demo.stop()
    click.echo(json.dumps({k: v for k, v in result.items() if k != "rows"}))
    for row in result["rows"]:
        click.echo(json.dumps(row), err=True)
    text = report(result, summary)
    click.echo(text)
    if not no_write:
        write_section("cost", "Cost overhead", text, machine_info)


if __name__ == "__main__":
    main()
