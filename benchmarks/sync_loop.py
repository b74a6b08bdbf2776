"""Cost of one `ponos.sync` (loop.sync) at 0, 50, 200 active tasks, for both ways of
reading the instances (`vast_api.instance_reads`: `full_list`, every instance each sync, and
`flat`, filtered calls plus a spread full resync, measured at its steady state: after one
sync that made the first whole pass).

    .venv/bin/python -m benchmarks.sync_loop --active 0 --active 50 --active 200

For each level: a fresh private Redis and local stack (scripted instances that run for a
very long time), N tasks brought to `running` by the agent's own steps run in-process
(tests/agent_harness.Harness, no Celery), then loop.sync timed directly against the
context, and its parts separately: Arkindex actions, the instance listing (all pages of 25),
reading the records, plan(). Twice: with the agent's rate limiter scaled like the
simulator's clock (what the code itself costs), and with Vast.ai's published intervals
(rate_limit_scale 1, what a real deployment waits: one `list` page per second).
"""

from __future__ import annotations

import cProfile
import io
import json
import logging
import pstats
import shutil
import tempfile
import time
from pathlib import Path

import click

from benchmarks.common import fmt, machine, spread, table, write_section
from ponos_tasks import loop, reconcile, steps
from ponos_tasks.lifecycle import Phase
from ponos_tasks.simulators.harness import ONE_GPU_MACHINE
from ponos_tasks.simulators.stack import LocalStack, RedisProcess
from tests.agent_harness import Harness, make_context

TIME_SCALE = 50.0
READS = ("full_list", "flat")
MACHINE = ONE_GPU_MACHINE
LONG = {"SIM_DURATION": "10000000", "SIM_PULL_SECONDS": "30", "SIM_LOG_LINES": "3"}


def timed(function, *args, **kwargs) -> tuple[float, object]:
    start = time.perf_counter()
    value = function(*args, **kwargs)
    return time.perf_counter() - start, value


def bring_up(ctx, stack, n: int, timeout: float) -> float:
    """Submit n tasks and run the agent's steps until every record is `running`."""
    if n == 0:
        return 0.0
    import requests

    spec = [
        {
            "slug": f"t{i:04d}",
            "image": "registry.example.com/bench/worker:1",
            "command": "python -m worker",
            "env": LONG,
            "requires_gpu": True,
        }
        for i in range(n)
    ]
    # The seeded market has ~100 matching single-GPU offers: add one machine per task so that
    # every task gets an instance.
    machine = MACHINE
    requests.post(
        stack.vast_url + "/_sim/offers", json={"offers": [machine] * (n + 10)}, timeout=30
    ).raise_for_status()
    requests.post(
        stack.arkindex_url + "/_sim/processes",
        json={"name": "sync-bench", "tasks": spec},
        timeout=30,
    ).raise_for_status()
    harness = Harness(ctx, max_sleep=0.02)
    start = time.monotonic()

    checked = [0.0]

    def all_running() -> bool:
        # Read every record at most once a second: the harness asks after each step, and
        # reading 1000 records per step took most of a bring-up's time (O(N) per step).
        if time.monotonic() - checked[0] < 1.0:
            return False
        checked[0] = time.monotonic()
        records = ctx.store.all_records(include_done=False)
        return len(records) == n and all(r.phase == Phase.RUNNING for r in records.values())

    harness.sync()
    harness.run(until=all_running, timeout=timeout, sync_every=1.0)
    return time.monotonic() - start


def add_foreign(stack, count: int, timeout: float) -> None:
    """`count` running instances of another user of the account (labels this agent ignores),
    rented in-process in the simulator: every full listing pages through them too."""
    if count == 0:
        return
    import requests

    machine = dict(MACHINE, gpu_name="RTX 2080")
    requests.post(
        stack.vast_url + "/_sim/offers", json={"offers": [machine] * count}, timeout=30
    ).raise_for_status()
    state = stack.vast.state
    free = [o["id"] for o in state.admin_offers()["offers"] if o.get("gpu_name") == "RTX 2080"]
    for i, offer_id in enumerate(free[:count]):
        status, body, _ = state.create(
            offer_id,
            {"image": "example.org/other:1", "label": f"other-{i}", "env": LONG, "disk": 16},
        )
        assert status == 200, body
    deadline = time.monotonic() + timeout
    while state.stats()["live_instances"] < count or any(
        r["label"].startswith("other-") and r["actual_status"] != "running"
        for r in state.admin_instances()["instances"]
        if r.get("live") and r.get("label")
    ):
        assert time.monotonic() < deadline, "the foreign fleet never ran"
        time.sleep(0.5)


def list_calls(stack) -> int:
    """The simulator's count of list calls (in-process: no call of its own)."""
    return stack.vast.state.stats()["calls"].get("list", 0)


def read_instances(ctx):
    """What the sync's instance reads do, by the configured strategy."""
    if ctx.settings.instance_reads == "flat":
        steps.refresh_view(ctx, wait=30)
        return list(ctx.store.view_entries().values())
    return ctx.vast.list_instances(label_prefix=ctx.label_prefix())


def measure(ctx, stack, reps: int, gap: float) -> dict:
    totals, actions_s, list_s, records_s, plan_s, enqueued, calls = [], [], [], [], [], [], []
    short_id = ctx.agent_short_id()
    loop.sync(ctx)  # steady state: the flat view's first whole pass is made here
    time.sleep(gap)
    for _ in range(reps):
        before = list_calls(stack)
        elapsed, result = timed(loop.sync, ctx)
        if not result.ran:
            continue
        calls.append(list_calls(stack) - before)
        totals.append(elapsed)
        enqueued.append(len(result.enqueue))
        time.sleep(gap)
    for _ in range(reps):
        a, actions = timed(ctx.arkindex.actions, capacity=0)
        li, instances = timed(read_instances, ctx)
        r, records = timed(ctx.store.all_records)
        p, _ = timed(
            reconcile.plan,
            now=ctx.now(),
            agent_short_id=short_id,
            records=records,
            instances=instances,
            actions=[(x.kind, x.task_id) for x in actions],
            settings=ctx.settings,
        )
        actions_s.append(a)
        list_s.append(li)
        records_s.append(r)
        plan_s.append(p)
        time.sleep(gap)
    return {
        "sync": spread(totals),
        "actions": spread(actions_s),
        "list": spread(list_s),
        "records": spread(records_s),
        "plan": spread(plan_s),
        "instances_listed": len(instances),
        "enqueued_max": max(enqueued, default=0),
        "list_calls_max": max(calls, default=0),
        "list_calls_p50": sorted(calls)[len(calls) // 2] if calls else 0,
    }


def profile_syncs(ctx, reps: int, gap: float, say) -> None:
    """Where a sync's own CPU goes (cProfile over `reps` syncs, top functions by cumulative
    time, printed to stderr): what to cut when the sync is the bottleneck."""
    profiler = cProfile.Profile()
    for _ in range(reps):
        profiler.enable()
        loop.sync(ctx)
        profiler.disable()
        time.sleep(gap)
    out = io.StringIO()
    pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(35)
    say(out.getvalue())


def run_level(
    n: int, redis_url: str, reps: int, timeout: float, say, foreign: int = 0, profile: bool = False
) -> dict:
    with LocalStack(redis_url, time_scale=TIME_SCALE, start_redis=False) as stack:
        base = make_context(
            stack, redis_url, sync_interval=10, vast_api={"max_instances": max(1, n + 5)}
        )
        up = bring_up(base, stack, n, timeout)
        say(f"{n} active tasks running after {up:.1f} s")
        add_foreign(stack, foreign, timeout)
        out = {"active": n, "foreign": foreign, "bring_up_s": round(up, 1)}
        # Same agent (prefix and name), two reads, two rate-limiter settings.
        for reads in READS:
            for mode, scale, gap in (("scaled", 1.0 / TIME_SCALE, 0.05), ("real", 1.0, 1.2)):
                ctx = make_context(
                    stack,
                    redis_url,
                    prefix=base.prefix,
                    agent_name=base.config.agent_name,
                    sync_interval=10,
                    vast_api={
                        "max_instances": max(1, n + 5),
                        "rate_limit_scale": scale,
                        "instance_reads": reads,
                    },
                )
                time.sleep(gap)  # start with the list bucket free, as after a sync interval
                key = f"{reads}/{mode}"
                out[key] = measure(ctx, stack, reps if mode == "scaled" else max(2, reps // 3), gap)
                say(
                    f"  {key}: sync p50 {out[key]['sync']['p50']:.3f} s, "
                    f"list calls max {out[key]['list_calls_max']}"
                )
                if profile and mode == "scaled":
                    say(f"  {key}: profile of {reps} syncs")
                    profile_syncs(ctx, reps, gap, say)
        return out  # stopping the stack ends its instances


def report(results: list[dict]) -> str:
    rows = []
    for r in results:
        for key in (f"{reads}/{mode}" for reads in READS for mode in ("scaled", "real")):
            m = r[key]
            reads, mode = key.split("/")
            rows.append(
                [
                    f"{r['active']} + {r['foreign']} foreign" if r.get("foreign") else r["active"],
                    reads,
                    mode,
                    m["instances_listed"],
                    m["list_calls_max"],
                    *(f"{fmt(m['sync'][k], 3)}" for k in ("n", "p50", "p95", "max")),
                    *(
                        fmt(m[part]["p50"] * 1000, 1)
                        for part in ("actions", "list", "records", "plan")
                    ),
                ]
            )
    return "\n".join(
        [
            table(
                [
                    "active tasks",
                    "instance reads",
                    "rate limiter",
                    "instances listed",
                    "list calls / sync (max)",
                    "syncs timed",
                    "sync p50 (s)",
                    "sync p95 (s)",
                    "sync max (s)",
                    "actions p50 (ms)",
                    "list p50 (ms)",
                    "records p50 (ms)",
                    "plan() p50 (ms)",
                ],
                rows,
            ),
            "",
            "`scaled`: the agent's limiter scaled by 1/time_scale like the simulator (HTTP, Redis "
            "and plan() cost only); `real`: Vast.ai's published intervals ×1.1 (a list page every "
            "1.1 s, 25 instances a page), i.e. what one sync costs in a real deployment. Parts "
            "are timed separately (actions with capacity 0; list = the reads: a full listing, or "
            "the flat view's refresh). `flat` is timed at its steady state (after one sync that "
            "made the first whole pass; full_resync_interval 300 s, sync_interval 10 s). "
            "loop.sync called in-process "
            f"against a real Redis and the simulators (time_scale {TIME_SCALE:g}).",
        ]
    )


@click.command()
@click.option(
    "--active",
    "levels",
    type=int,
    multiple=True,
    default=(0, 50, 200),
    show_default=True,
    help="Active task counts (repeatable).",
)
@click.option(
    "--foreign",
    type=int,
    default=0,
    show_default=True,
    help="Running instances of another user of the account, added at every level.",
)
@click.option("--reps", type=int, default=10, show_default=True)
@click.option("--timeout", type=float, default=240.0, show_default=True)
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
@click.option("--profile", is_flag=True, help="Also print a cProfile of the scaled syncs (stderr).")
def main(levels, foreign, reps, timeout, no_write, profile):
    """Duration of one sync (and its parts) at several numbers of active tasks."""
    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    machine_info = machine()
    workdir = Path(tempfile.mkdtemp(prefix="ponos-bench-sync-"))
    redis_process = RedisProcess(workdir).start()
    results = []
    try:
        for n in levels:
            results.append(
                run_level(
                    n,
                    redis_process.url,
                    reps,
                    timeout,
                    lambda s: click.echo(s, err=True),
                    foreign,
                    profile,
                )
            )
            click.echo(json.dumps(results[-1]))
    finally:
        redis_process.stop()
        shutil.rmtree(workdir, ignore_errors=True)
    text = report(results)
    click.echo(text)
    if not no_write:
        write_section("sync", "Sync loop cost", text, machine_info)


if __name__ == "__main__":
    main()
