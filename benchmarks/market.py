"""Offer ranking: expected-cost policy against cheapest-hourly on a market where the cheapest
hosts pull slowly and fail often.

    .venv/bin/python -m benchmarks.market            # full (about 8 minutes)
    .venv/bin/python -m benchmarks.market --quick    # 6 tasks in waves of 2

The same workload and seed run twice, once per `vast_api.offer_ranking`, each with a fresh
private Redis, local stack and agent (real worker and beat). The Vast.ai simulator's market
is its seeded one with `slow_cheap_hosts` (the cheapest 30 % of the machines get a 20–100
Mbit/s line and a reliability of 0.70–0.90) and `reliability_failures=1` (a start fails with
probability 1 − reliability: an OCI error at once, or a pull that stalls part way; a host
that started the task goes down mid-run with probability 1 − reliability per hour of
running, and the run is lost). Every
task runs the same image (`SIM_IMAGE_SIZE_GB`, pulled at the host's `inet_down`; the
agent does not know its size: the task has a command, so it assumes 6 GB) for
`SIM_DURATION` simulated seconds. The agent's deadlines are Vast.ai's defaults divided by
the time scale (loading_deadline, pull_stall_timeout). Figures: the simulator's ledger
(total bill), the time until every task is terminal and no instance is left, and per task
its state, instances and bill.

`run_market(quick)` returns the figures as a dict (the fleet benchmark may call it).
"""

from __future__ import annotations

import json
import time
from collections import defaultdict

import click

from benchmarks.common import AgentRun, fmt, machine, spread, table, write_section
from ponos_tasks.lifecycle import parse_label

SEED = 7
IMAGE = "registry.example.com/bench/big-worker:1"
SLOW_FRACTION = 0.3
# (tasks, instances at once, time_scale, simulated run seconds, image GB, timeout real s).
# Fewer instances at once than tasks: the tasks run in waves, and each wave chooses among
# more matching offers than it rents (with as many tasks at once as matching offers, every
# policy rents all of them, and the ranking cannot matter).
QUICK = dict(tasks=6, max_instances=2, time_scale=100.0, run_s=900.0, image_gb=4.0, timeout=300.0)
FULL = dict(tasks=24, max_instances=4, time_scale=100.0, run_s=1800.0, image_gb=6.0, timeout=900.0)


class MarketRun(AgentRun):
    """An AgentRun on the slow-cheap-hosts market, with one offer-ranking policy."""

    def __init__(self, policy: str, *, time_scale: float, max_instances: int, **kwargs):
        super().__init__(time_scale=time_scale, max_instances=max_instances, **kwargs)
        self.policy = policy
        self.vast_options.update(slow_cheap_hosts=SLOW_FRACTION, reliability_failures=1.0)
        self.stack_options.update(vast_seed=SEED)

    def config(self) -> dict:
        config = super().config()
        config["vast_api"].update(
            offer_ranking=self.policy,
            # Vast.ai-time defaults, on the simulator's clock.
            loading_deadline=7200.0 / self.time_scale,
            pull_stall_timeout=max(3.0, 600.0 / self.time_scale),
            offline_grace=max(3.0, 600.0 / self.time_scale),
        )
        return config


def task_specs(n: int, run_s: float, image_gb: float) -> list[dict]:
    env = {
        "SIM_DURATION": f"{run_s:g}",
        "SIM_IMAGE_SIZE_GB": f"{image_gb:g}",
        "SIM_LOG_LINES": "3",
        "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0",
        "SIM_SELF_STOP": "true",
    }
    return [
        {
            "slug": f"m{i:03d}",
            "image": IMAGE,
            "command": "python -m worker",
            "env": env,
            "requires_gpu": True,
        }
        for i in range(n)
    ]


def run_policy(policy: str, params: dict, say) -> dict:
    n = params["tasks"]
    with MarketRun(
        policy, time_scale=params["time_scale"], max_instances=params["max_instances"]
    ) as run:
        time.sleep(3)  # the worker registers, the beat ticks once
        say(f"{policy}: agent up, submitting {n} tasks")
        run.submit(f"market-{policy}", task_specs(n, params["run_s"], params["image_gb"]))
        elapsed = run.wait_done(params["timeout"])
        ledger = run.vast("ledger")
        tasks = run.ark_tasks()
        machines = run.stack.vast.state.market.machines
    by_task: dict[str, list[dict]] = defaultdict(list)
    for row in ledger["instances"]:
        info = parse_label(row["label"])
        if info is not None:
            by_task[info.task_id].append(row)
    per_task = []
    for task in sorted(tasks, key=lambda t: t["slug"]):
        rows = sorted(by_task.get(task["id"], []), key=lambda r: r["id"])
        per_task.append(
            {
                "task": task["slug"],
                "state": task["state"],
                "instances": len(rows),
                "bill": sum(r["cost"] for r in rows),
                "inet_down": [machines[r["machine_id"]].specs["inet_down"] for r in rows],
                "dph": [round(r["dph_total"], 4) for r in rows],
            }
        )
    states = defaultdict(int)
    for task in tasks:
        states[task["state"]] += 1
    return {
        "policy": policy,
        "total_bill": ledger["total_cost"],
        "time_to_terminal_real_s": elapsed,
        "time_to_terminal_sim_s": elapsed * params["time_scale"],
        "instances": len(ledger["instances"]),
        "states": dict(states),
        "bill_per_task": spread([t["bill"] for t in per_task]),
        "per_task": per_task,
    }


def run_market(quick: bool, say=None) -> dict:
    """Both policies on the same workload and seed; returns their figures and the ratios."""
    say = say or (lambda message: click.echo(message, err=True))
    params = QUICK if quick else FULL
    results = {policy: run_policy(policy, params, say) for policy in POLICIES}
    cost, hourly = results["expected_cost"], results["cheapest_hourly"]
    return {
        "params": params,
        "seed": SEED,
        "slow_cheap_hosts": SLOW_FRACTION,
        "results": results,
        "bill_ratio": cost["total_bill"] / hourly["total_bill"] if hourly["total_bill"] else None,
        "time_ratio": (
            cost["time_to_terminal_real_s"] / hourly["time_to_terminal_real_s"]
            if hourly["time_to_terminal_real_s"]
            else None
        ),
    }


POLICIES = ("expected_cost", "cheapest_hourly")


def report(result: dict) -> str:
    p = result["params"]
    rows = []
    for policy in POLICIES:
        r = result["results"][policy]
        rows.append(
            [
                policy,
                f"{r['total_bill']:.4f}",
                fmt(r["time_to_terminal_real_s"], 1),
                fmt(r["time_to_terminal_sim_s"], 0),
                r["instances"],
                ", ".join(f"{n} {s}" for s, n in sorted(r["states"].items())),
                fmt(r["bill_per_task"]["p50"], 4),
                fmt(r["bill_per_task"]["max"], 4),
            ]
        )
    out = [
        table(
            [
                "policy",
                "total bill $ (ledger)",
                "time to all terminal, real s",
                "same, sim s",
                "instances",
                "tasks",
                "bill/task p50 $",
                "bill/task max $",
            ],
            rows,
        ),
        "",
        f"Ratio expected_cost / cheapest_hourly: bill {fmt(result['bill_ratio'], 3)}, "
        f"time to all terminal {fmt(result['time_ratio'], 3)}.",
        "",
        f"Workload: {p['tasks']} tasks submitted at once, run in waves (max_instances "
        f"{p['max_instances']}), one image of "
        f"{p['image_gb']:g} GB (size unknown to the agent), {p['run_s']:g} sim s of run each; "
        f"time_scale {p['time_scale']:g}; market seed {result['seed']}, slow_cheap_hosts "
        f"{result['slow_cheap_hosts']:g}, reliability_failures 1.",
        "",
        "Reading it: the simulator bills as Vast.ai does, the GPU only while `running` and "
        "storage from create to destroy, so a slow pull costs storage (cents a day) and time, "
        "not the GPU's price; the expected bill is then dominated by $/h x run time and the "
        "expected-cost policy mostly rents what cheapest-hourly rents, departing from it only "
        "where prices are close, or where a host's low uptime makes a run likely to be cut "
        "short (the GPU time paid for it lost). Tasks of a wave start in parallel (creates "
        "race for the same offers), so which task gets which host varies from run to run: "
        "compare the totals, and run twice to see the noise.",
        "",
        "Per task (instances rented in order: inet_down Mbit/s, $/h):",
        "",
    ]
    for policy in POLICIES:
        for t in result["results"][policy]["per_task"]:
            hosts = ", ".join(
                f"{inet:g} Mbit/s ${dph:g}/h"
                for inet, dph in zip(t["inet_down"], t["dph"], strict=True)
            )
            out.append(f"- {policy} {t['task']}: {t['state']}, ${t['bill']:.4f}, {hosts}")
    return "\n".join(out)


@click.command()
@click.option("--quick", is_flag=True, help="The short variant (6 tasks in waves of 2).")
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
def main(quick, no_write):
    """Total bill and time to all terminal, expected-cost vs cheapest-hourly ranking."""
    machine_info = machine()
    result = run_market(quick)
    click.echo(json.dumps({k: v for k, v in result.items() if k != "results"}))
    text = report(result)
    click.echo(text)
    if not no_write:
        write_section(
            "market", "Offer ranking on a market of slow, flaky cheap hosts", text, machine_info
        )


if __name__ == "__main__":
    main()
