"""The fleet benchmark: how each way of reading instances scales with N live instances.

    .venv/bin/python -m benchmarks.fleet --n 10 --n 100 --n 1000
    .venv/bin/python -m benchmarks.fleet --quick --json     # N = 10, one JSON document

Three strategies side by side on one fleet: N live instances (scripted, running for ever)
brought up once by the flat agent, then each strategy measured in turn over a steady-state
window while a few short tasks end and a few instances are destroyed behind the agent's
back (the agent restarted with the next strategy's config between two turns):

- `full_list`: the agent as configured by default (every sync lists every instance of the
  agent, all pages of `GET /api/v1/instances/`);
- `flat`: the agent with `vast_api.instance_reads: flat` (skipped, and said so, while the
  agent's config does not know that key);
- `per_instance`: not an agent mode. dstack's way, emulated here faithfully: one
  `GET /api/v0/instances/ID/` per live instance every 7 s, no shared limiter (dstack has
  none), a 429 is a skipped observation. It runs in a window after the `full_list`
  agent's (the agent keeps the fleet alive; its own calls are not counted for the poller).

One bring-up, not one per strategy: at N = 1000 it is most of the run (the create bound
alone is 4500 sim s), and the full-listing agent is slower at it: each of its syncs lists
every page, the list endpoint saturates as N grows, and the creates' label lookups wait
behind the pages (621 of 1000 up after 1176 real s at time_scale 3, 0.45 a second and
slowing, when the flat agent brings 1000 up in about 1650 s).

Clock: the Vast.ai simulator runs `time_scale` simulated seconds per real second, and so
do Vast.ai's rate limits and the agent's limiter (rate_limit_scale = 1/time_scale). The
agent's own intervals are real seconds: they are set to the config defaults divided by
time_scale (sync_interval 10 sim s, logs_interval 60 sim s, full_resync_interval 300 sim
s), so that every figure here is in simulated seconds, i.e. what a real deployment would
see, except where the agent's own CPU time (multiplied by time_scale on that clock)
dominates: the table gives the measured real sync durations beside. Calls per minute are per simulated minute.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import click
import requests

from benchmarks.common import (
    TERMINAL,
    AgentRun,
    BenchFailed,
    ended_checks,
    fmt,
    machine,
    percentile,
    redis_memory_by_family,
    sync_durations,
    table,
    write_section,
)
from ponos_tasks.lifecycle import parse_label
from ponos_tasks.simulators.harness import ONE_GPU_MACHINE
from ponos_tasks.state import Keyspace

STRATEGIES = ("per_instance", "full_list", "flat")
TAGS = {"flat": "a", "full_list": "b", "per_instance": "c"}  # the window's short tasks' slugs
SYNC_INTERVAL = 10.0  # sim s: the config default of sync_interval
LOGS_INTERVAL = 60.0  # sim s: the config default of logs_interval
FULL_RESYNC_INTERVAL = 300.0  # sim s: the config default of vast_api.full_resync_interval
DSTACK_POLL = 7.0  # sim s between two polls of one instance by dstack
LOADING_DEADLINE = 300.0  # sim s: the agent's loading deadline here (see FleetRun)
LIST_INTERVAL = 1.0 * 1.1  # s: Vast.ai's list threshold, with the agent limiter's margin
PAGE = 25  # instances per list page
LONG_ENV = {"SIM_DURATION": "100000000", "SIM_PULL_SECONDS": "30", "SIM_LOG_LINES": "3"}
IMAGE = "registry.example.com/bench/worker:1"
MACHINE = ONE_GPU_MACHINE


def flat_available() -> bool:
    """Whether the agent's config knows `vast_api.instance_reads` (the flat sync)."""
    from ponos_tasks.config import VastConfig

    return "instance_reads" in VastConfig.model_fields


def agent_overrides(strategy: str) -> dict:
    """The agent's config overrides for an agent strategy (per_instance is the emulated
    poller). Before the flat sync, full_list is the agent as it is (no key to set)."""
    if strategy == "full_list" and not flat_available():
        return {}
    return {"vast_api": {"instance_reads": strategy}}


def task_spec(slug: str, env: dict) -> dict:
    return {
        "slug": slug,
        "image": IMAGE,
        "command": "python -m worker",
        "env": env,
        "requires_gpu": True,
    }


def short_env(duration: float) -> dict:
    return {
        "SIM_DURATION": f"{duration:g}",
        "SIM_PULL_SECONDS": "30",
        "SIM_LOG_LINES": "3",
        "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0",
        "SIM_SELF_STOP": "true",
    }


# ------------------------------------------------------------------------------ /proc


def _cpu_ticks(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/stat") as stat:
            fields = stat.read().rsplit(")", 1)[1].split()
    except OSError:
        return 0
    # utime, stime, cutime, cstime (fields 14-17): the process and its reaped children.
    return sum(int(x) for x in fields[11:15])


def tree_cpu_seconds(root: int) -> float:
    from benchmarks.common import _children_map

    children, total, todo = _children_map(), 0, [root]
    while todo:
        pid = todo.pop()
        total += _cpu_ticks(pid)
        todo.extend(children.get(pid, ()))
    return total / os.sysconf("SC_CLK_TCK")


# ------------------------------------------------------------------------------ dstack


class DstackPoller(threading.Thread):
    """dstack's status polling: each live instance read with `GET /api/v0/instances/ID/`
    every DSTACK_POLL sim s, requests spread over the cycle, no limiter; a 429 skips that
    observation. `max_rps` caps real requests per second (the machine's limit, not dstack's):
    when it binds, `kept_up` is False and the 429 count is below what dstack would get."""

    def __init__(self, run: AgentRun, api_key: str, max_rps: float):
        super().__init__(daemon=True, name="dstack-poller")
        self.agent_run, self.max_rps = run, max_rps
        self.ids: list[int] = []
        self.session = requests.Session()
        self.session.headers["Authorization"] = f"Bearer {api_key}"
        self.calls = self.limited = 0
        self.seen: dict[int, list[tuple[float, str | None]]] = {}  # id -> [(sim t, status)]
        self.target = 0
        self._halt = threading.Event()

    def sim_now(self) -> float:
        return self.agent_run.stack.vast.state.clock.now()

    def run_once(self, instance_id: int) -> None:
        url = f"{self.agent_run.stack.vast_url}/api/v0/instances/{instance_id}/"
        try:
            answer = self.session.get(url, timeout=10)
        except requests.RequestException:
            return
        at = self.sim_now()
        self.calls += 1
        if answer.status_code == 429:
            self.limited += 1
            return
        if answer.status_code == 404:
            self.seen.setdefault(instance_id, []).append((at, None))
            return
        body = answer.json().get("instances") or {}
        self.seen.setdefault(instance_id, []).append((at, body.get("actual_status")))

    def run(self) -> None:
        scale = self.agent_run.time_scale
        while not self._halt.is_set():
            cycle_start = self.sim_now()
            # dstack polls the instance of every job it runs, new ones included; one it saw
            # gone (404) it polls no more.
            state = self.agent_run.stack.vast.state
            with state.lock:
                live = [i.id for i in state.fleet.instances.values() if i.live]
            self.ids += [i for i in live if i not in set(self.ids)]
            ids = [i for i in self.ids if not self._gone(i)]
            self.target += len(ids)
            gap = max(DSTACK_POLL / scale / max(1, len(ids)), 1.0 / self.max_rps)
            for instance_id in ids:
                if self._halt.is_set():
                    return
                started = time.monotonic()
                self.run_once(instance_id)
                self._halt.wait(max(0.0, gap - (time.monotonic() - started)))
            rest = DSTACK_POLL - (self.sim_now() - cycle_start)
            if rest > 0:
                self._halt.wait(rest / scale)

    def _gone(self, instance_id: int) -> bool:
        seen = self.seen.get(instance_id)
        return bool(seen) and seen[-1][1] is None  # dstack stops polling what is gone

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=30)

    def noticed(self, instance_id: int, after: float, gone: bool) -> float | None:
        """Sim time of the first observation after `after` that shows the end (gone: a 404;
        else any status other than running/loading)."""
        for at, status in self.seen.get(instance_id, []):
            if at < after:
                continue
            if (status is None) if gone else (status not in ("running", "loading")):
                return at
        return None


# ------------------------------------------------------------------------------ one run


class FleetRun(AgentRun):
    def __init__(self, overrides: dict, **kwargs):
        super().__init__(**kwargs)
        self.overrides = overrides
        self.loading_deadline = max(10.0, LOADING_DEADLINE / self.time_scale)
        # The agent waits min(60, loading_deadline) real s (not scaled) before it takes an
        # unlisted new instance for gone (Vast.ai's reads lag a create): the instances
        # destroyed behind its back are older than that (vanish_oldest).
        self.visibility_grace = min(60.0, self.loading_deadline)
        self.redis_base = 0  # Redis used_memory before the fleet (set by run_fleet)

    def config(self) -> dict:
        config = super().config()
        # The loading deadline is real seconds: LOADING_DEADLINE sim s at least (a start takes
        # 30 sim s of pull), else the agent gives up on instances still loading.
        config["vast_api"]["loading_deadline"] = self.loading_deadline
        # The flat view's full pass is the config default on the simulated clock, as the
        # sync and log intervals are: unscaled (before 2026-12-07), a pass took time_scale x
        # 300 sim s, so the flat sync listed 1/time_scale of the pages per sync that a real
        # deployment lists, and a vanished instance could be seen time_scale times later.
        config["vast_api"]["full_resync_interval"] = FULL_RESYNC_INTERVAL / self.time_scale
        for key, value in self.overrides.items():
            if isinstance(value, dict):
                config.setdefault(key, {}).update(value)
            else:
                config[key] = value
        return config

    def switch_agent(self, overrides: dict) -> None:
        """Stop the agent (warm) and start it with other config overrides on the same Redis,
        stack and fleet; the sampler follows the new processes (peaks start afresh)."""
        old = self.agents.pop()
        old.stop()
        self.sampler.stop()
        self.overrides = overrides
        self.start_sampled_agent()


def sim_instances(run: AgentRun) -> list[dict]:
    return run.vast("instances")["instances"]


def bring_up(run: FleetRun, n: int, timeout: float, say) -> float:
    """Submit n long tasks; wait until n instances run. Returns real seconds."""
    requests.post(
        run.stack.vast_url + "/_sim/offers", json={"offers": [MACHINE] * (n + 40)}, timeout=60
    ).raise_for_status()
    run.submit("fleet", [task_spec(f"long{i:04d}", LONG_ENV) for i in range(n)])
    start = time.monotonic()
    last = 0.0
    while True:
        dead = run.agent.check_alive()
        if dead:
            raise BenchFailed("agent process exited: " + ", ".join(dead))
        running = sum(
            1 for i in sim_instances(run) if i["live"] and i.get("actual_status") == "running"
        )
        elapsed = time.monotonic() - start
        if running >= n:
            return elapsed
        if elapsed - last >= 15:
            last = elapsed
            say(f"  [{elapsed:5.0f} s] {running}/{n} instances running")
        if elapsed > timeout:
            raise BenchFailed(f"only {running}/{n} instances running after {timeout:g} s")
        time.sleep(1.0)


def ended_at(events: list[dict], instance_id: int) -> float | None:
    """Sim time an instance's container stopped running (its first status event after
    running that is not running)."""
    was_running = False
    for event in events:
        if event.get("instance_id") != instance_id or event.get("event") != "status":
            continue
        if event.get("actual_status") == "running":
            was_running = True
        elif was_running:
            return event["t"]
    return None


def agent_acted(run: AgentRun, events: list[dict], instance_id: int, after: float) -> float | None:
    """First agent action on an instance after `after`: a log request or its destroy."""
    state = run.stack.vast.state
    with state.lock:
        asked = [
            e["asked_at"]
            for e in state.logs.values()
            if e["inst"].id == instance_id and e["asked_at"] >= after
        ]
    destroyed = [
        e["t"]
        for e in events
        if e.get("instance_id") == instance_id and e.get("event") == "destroyed" and e["t"] >= after
    ]
    times = asked + destroyed
    return min(times) if times else None


def task_noticed(run: AgentRun, task: dict, events: list[dict], after: float) -> float | None:
    """Sim time the agent acted on a task whose instance vanished: a line in the task's
    agent log, a state reported to Arkindex or a new instance created for it, after
    `after`."""
    reports = [
        run.epoch_to_sim(h["t"])
        for h in task.get("history", [])
        if h.get("accepted") and run.epoch_to_sim(h["t"]) >= after
    ]
    created = [
        e["t"]
        for e in events
        if e.get("event") == "created"
        and e["t"] >= after
        and (parse_label(e.get("label")) or None) is not None
        and parse_label(e["label"]).task_id == task["id"]
    ]
    # The agent's own note in the task's log (Redis): it says what it saw when it saw it.
    raw = run.sampler.redis.lrange(Keyspace().task_log(task["id"]), 0, -1) if task else []
    notes = [run.epoch_to_sim(json.loads(r)["t"]) for r in raw]
    times = reports + created + [t for t in notes if t >= after]
    return min(times) if times else None


class Window:
    """One steady-state window: counters, CPU and syncs at its start, figures at its end."""

    def __init__(self, run: AgentRun):
        self.run = run
        stats = run.vast("stats")
        self.calls0, self.limited0 = Counter(stats["calls"]), Counter(stats["rate_limited"])
        self.shapes0 = Counter(stats.get("list_shapes", {}))
        self.sim0 = run.stack.vast.state.clock.now()
        self.syncs0 = len(sync_durations(run.worker_log()))
        self.checks0 = ended_checks(run.worker_log())
        self.cpu0 = self.cpu()

    def cpu(self) -> float:
        return sum(tree_cpu_seconds(p.pid) for p in self.run.agent.processes.values())

    def close(self) -> dict:
        stats = self.run.vast("stats")
        minutes = (self.run.stack.vast.state.clock.now() - self.sim0) / 60.0
        calls = Counter(stats["calls"]) - self.calls0
        limited = Counter(stats["rate_limited"]) - self.limited0
        syncs = sync_durations(self.run.worker_log())[self.syncs0 :]
        return {
            "sim_minutes": round(minutes, 2),
            "calls": dict(calls),
            "limited": dict(limited),
            "list_shapes": dict(Counter(stats.get("list_shapes", {})) - self.shapes0),
            "syncs": syncs,
            "ended_checks": ended_checks(self.run.worker_log()) - self.checks0,
            "cpu_s": self.cpu() - self.cpu0,
        }


def start_short(run: AgentRun, ends: int, tag: str) -> list[str]:
    """`ends` short tasks: created now, they end inside the window."""
    specs = [task_spec(f"{tag}{i:03d}", short_env(60.0)) for i in range(ends)]
    return run.submit(f"ends-{tag}", specs)


def vanish_oldest(run: FleetRun, count: int) -> list[dict]:
    """Destroy the `count` oldest running long-task instances with their own instance key
    (behind the agent's back), once they are older than the agent's visibility grace."""
    rows = sorted(
        (
            r
            for r in sim_instances(run)
            if r["live"]
            and r.get("actual_status") == "running"
            and r.get("env", {}).get("SIM_DURATION") == LONG_ENV["SIM_DURATION"]
        ),
        key=lambda r: r["id"],
    )[:count]
    events = run.vast("events")["events"]
    created = [e["t"] for e in events if e.get("event") == "created"]
    newest = max(
        (
            e["t"]
            for e in events
            if e.get("event") == "created" and e["instance_id"] in {r["id"] for r in rows}
        ),
        default=min(created, default=0.0),
    )
    wait_sim(
        run, newest + 1.2 * run.visibility_grace * run.time_scale - run.stack.vast.state.clock.now()
    )
    gone = []
    for row in rows:
        answer = requests.delete(
            f"{run.stack.vast_url}/api/v0/instances/{row['id']}/",
            headers={"Authorization": f"Bearer {row['instance_api_key']}"},
            timeout=10,
        )
        if answer.ok:
            label = parse_label(row.get("label"))
            gone.append(
                {
                    "instance": row["id"],
                    "task": label.task_id if label else None,
                    "at": run.stack.vast.state.clock.now(),
                }
            )
    return gone


def disturb(run: AgentRun, ends: int, vanish: int, tag: str, window_sim: float, say) -> dict:
    """The window: short tasks that end in it, and instances destroyed a third into it."""
    start = run.stack.vast.state.clock.now()
    short = start_short(run, ends, tag)
    wait_sim(run, window_sim / 3)
    gone = vanish_oldest(run, vanish)
    say(f"  window {tag}: {len(short)} short tasks started, {len(gone)} instances destroyed")
    wait_sim(run, start + window_sim - run.stack.vast.state.clock.now())
    return {"short_tasks": short, "vanished": gone}


def latencies(run: AgentRun, since: float, plan: dict, poller: DstackPoller | None) -> dict:
    events = run.vast("events")["events"]
    tasks = {t["id"]: t for t in run.ark_tasks()}
    short = set(plan["short_tasks"])
    ends, misses = [], 0
    for event in events:
        label = parse_label(event.get("label"))
        if event.get("event") != "created" or label is None or label.task_id not in short:
            continue
        end = ended_at(events, event["instance_id"])
        if end is None:  # not ended by the end of settle(): counted as missed
            misses += 1
            continue
        if end < since:
            continue
        acted = (
            poller.noticed(event["instance_id"], end, gone=False)
            if poller
            else agent_acted(run, events, event["instance_id"], end)
        )
        if acted is None:
            misses += 1
        else:
            ends.append(acted - end)
    vanished, vmisses = [], 0
    for gone in plan["vanished"]:
        if poller:
            noticed = poller.noticed(gone["instance"], gone["at"], gone=True)
        else:
            noticed = task_noticed(run, tasks.get(gone["task"], {}), events, gone["at"])
        if noticed is None:
            vmisses += 1
        else:
            vanished.append(noticed - gone["at"])
    return {"end": ends, "end_missed": misses, "vanished": vanished, "vanished_missed": vmisses}


def settle(run: AgentRun, plan: dict, limit_sim: float, poller=None) -> None:
    """Wait (at most `limit_sim` sim s) until the window's short tasks are terminal and its
    vanished instances noticed: what happens late in the window ends after it; their
    latencies count, not their calls."""
    wanted = set(plan["short_tasks"])
    deadline = run.stack.vast.state.clock.now() + limit_sim
    while run.stack.vast.state.clock.now() < deadline:
        tasks = {t["id"]: t for t in run.ark_tasks()}
        events = run.vast("events")["events"]
        ended = all(tasks[i]["state"] in TERMINAL for i in wanted if i in tasks)
        noticed = all(
            (
                poller.noticed(g["instance"], g["at"], gone=True)
                if poller
                else task_noticed(run, tasks.get(g["task"], {}), events, g["at"])
            )
            is not None
            for g in plan["vanished"]
        )
        if ended and noticed:
            return
        wait_sim(run, min(10.0, limit_sim))


def wait_sim(run: AgentRun, seconds: float) -> None:
    end = run.stack.vast.state.clock.now() + seconds
    while run.stack.vast.state.clock.now() < end:
        dead = run.agent.check_alive()
        if dead:
            raise BenchFailed("agent process exited: " + ", ".join(dead))
        time.sleep(0.5)


def summarize(
    n: int,
    window: dict,
    lat: dict,
    *,
    calls: dict,
    limited: dict,
    sync_interval: float,
    watch_interval: float | None = None,
) -> dict:
    minutes = window["sim_minutes"]
    list_calls = calls.get("list", 0) + calls.get("list_v0", 0)
    syncs = len(window["syncs"])
    # The ended check's one call each is not the sync's: counted apart (flat only).
    checks = window.get("ended_checks", 0)
    per_sync = (list_calls - checks) / syncs if syncs else None
    return {
        "n": n,
        "vast_calls_per_min": {k: round(v / minutes, 1) for k, v in sorted(calls.items())},
        "list_calls_per_min": round(list_calls / minutes, 1),
        "rate_limited": sum(limited.values()),
        "rate_limited_by_endpoint": dict(limited),
        "syncs": syncs,
        "list_calls_per_sync": round(per_sync, 2) if per_sync is not None else None,
        "ended_checks_per_min": round(checks / minutes, 1),
        # Every list call of the window by its filters' shape, per sync: a full pass's pages
        # (`id.gt`), call A and the ended checks (`actual_status.neq+id.gte`), lookups by id
        # (`id.in`) and by label (a create's), so the sync's own calls can be told apart.
        "list_calls_per_sync_by_filter": {
            shape: round(count / syncs, 2)
            for shape, count in sorted(window.get("list_shapes", {}).items())
        }
        if syncs
        else {},
        "sync_real_s_p50": percentile(window["syncs"], 50),
        "sync_real_s_p95": percentile(window["syncs"], 95),
        "sync_at_real_limits_s": round(per_sync * LIST_INTERVAL, 1) if per_sync else None,
        "end_to_action_p50_s": _round(percentile(lat["end"], 50)),
        "end_to_action_p95_s": _round(percentile(lat["end"], 95)),
        "ends_measured": len(lat["end"]),
        "ends_missed": lat["end_missed"],
        "vanished_to_noticed_p50_s": _round(percentile(lat["vanished"], 50)),
        "vanished_to_noticed_max_s": _round(max(lat["vanished"], default=None)),
        "vanished_measured": len(lat["vanished"]),
        "vanished_missed": lat["vanished_missed"],
        "sync_interval_s": sync_interval,
        "watch_interval_s": watch_interval,
    }


def _round(value):
    return None if value is None else round(value, 1)


def measure(run: FleetRun, n: int, strategy: str, *, window_sim, ends, vanish, say) -> dict:
    """One agent strategy's window on the fleet that runs: settle, disturb, figures."""
    wait_sim(run, 2 * SYNC_INTERVAL)  # settle: every watcher reads a steady state
    redis_used = int(run.sampler.redis.info("memory")["used_memory"])
    redis_families = redis_memory_by_family(run.sampler.redis)
    window = Window(run)
    plan = disturb(run, ends, vanish, TAGS[strategy], window_sim, say)
    figures = window.close()
    settle(run, plan, 3 * window_sim)
    lat = latencies(run, window.sim0, plan, None)
    result = summarize(
        n,
        figures,
        lat,
        calls=figures["calls"],
        limited=figures["limited"],
        sync_interval=SYNC_INTERVAL,
        # The agent's watch interval: half a sync, at least 0.5 real s (ponos_tasks
        # settings), so at least 0.5 x time_scale sim s here.
        watch_interval=max(SYNC_INTERVAL / 2, 0.5 * run.time_scale),
    )
    peaks = run.sampler.peak_rss_kb
    result.update(
        {
            "time_scale": run.time_scale,
            "cpu_s_per_task_per_sim_hour": round(
                figures["cpu_s"] / n / (figures["sim_minutes"] / 60.0), 3
            ),
            "cpu_s_window": round(figures["cpu_s"], 1),
            "peak_rss_kib_per_task": round(sum(peaks.values()) / n, 1),
            "peak_rss_mib": {k: round(v / 1024, 1) for k, v in peaks.items()},
            "redis_bytes_per_task": round((redis_used - run.redis_base) / n),
            "peak_queue_messages": dict(run.sampler.peak_queue),
            "redis_bytes_by_family": redis_families,
        }
    )
    return result


def measure_poller(run: FleetRun, n: int, *, window_sim, ends, vanish, max_rps, say) -> dict:
    """The dstack poller's window on the same fleet (the agent keeps it alive)."""
    window = Window(run)
    poller = DstackPoller(run, run.stack.vast.state.api_key, max_rps)
    poller.start()
    plan = disturb(run, ends, vanish, TAGS["per_instance"], window_sim, say)
    figures = window.close()
    settle(run, plan, 3 * window_sim, poller)
    poller.stop()
    lat = latencies(run, window.sim0, plan, poller)
    minutes = figures["sim_minutes"]
    result = summarize(
        n,
        {**figures, "syncs": []},
        lat,
        calls={"show": poller.calls},
        limited={"show": poller.limited},
        sync_interval=DSTACK_POLL,
    )
    result.update(
        {
            "time_scale": run.time_scale,
            "target_calls_per_min": round(poller.target / minutes, 1),
            "kept_up": poller.calls >= 0.9 * poller.target,
            "sync_at_real_limits_s": None,
        }
    )
    return result


def run_fleet(
    n: int,
    agent_strategies: list[str],
    *,
    bring_up_with: str,
    poll: bool,
    time_scale: float,
    window_sim: float,
    ends: int,
    vanish: int,
    max_rps: float,
    timeout: float,
    say,
) -> dict[str, dict]:
    """One fleet of N, brought up once by the `bring_up_with` agent, then measured by each
    agent strategy in turn (the agent restarted with the next one's config, as a deploy
    restarts it) and, with `poll`, by the dstack poller during the full_list agent's turn.
    One bring-up instead of one per strategy: at N = 1000 it is most of the run (the
    create bound, 4500 sim s), and the full listing alone cannot finish it (its list calls
    grow with N until the list endpoint is saturated)."""
    out: dict[str, dict] = {}
    first = bring_up_with
    with FleetRun(
        agent_overrides(first),
        time_scale=time_scale,
        max_instances=n + 2 * ends * (len(agent_strategies) + poll) + 5,
        sync_interval=SYNC_INTERVAL / time_scale,
        logs_interval=LOGS_INTERVAL / time_scale,
    ) as run:
        time.sleep(3)  # the worker registers and beat ticks once
        run.redis_base = int(run.sampler.redis.info("memory")["used_memory"])
        say(f"N={n}: bringing up with the {first} agent (time_scale {time_scale:g})")
        up = bring_up(run, n, timeout, say)
        current = first
        for strategy in agent_strategies:
            if strategy != current:
                current = strategy
                say(f"N={n}: the agent restarts as {strategy}")
                run.switch_agent(agent_overrides(strategy))
            result = measure(
                run, n, strategy, window_sim=window_sim, ends=ends, vanish=vanish, say=say
            )
            result["bring_up_real_s"] = round(up, 1)  # the fleet's, by `brought_up_by`
            result["brought_up_by"] = first
            out[strategy] = result
            if poll and strategy == "full_list":
                out["per_instance"] = measure_poller(
                    run,
                    n,
                    window_sim=window_sim,
                    ends=ends,
                    vanish=vanish,
                    max_rps=max_rps,
                    say=say,
                )
    return out


def run_n(
    n: int,
    *,
    quick: bool,
    time_scale: float,
    window_sim: float,
    ends: int,
    vanish: int,
    max_rps: float,
    timeout: float,
    say,
    only: str | None = None,
) -> dict:
    skipped = {"n": n, "skipped": True}
    if only is not None:
        agents = [only]  # one agent strategy alone (--only): the others' columns are empty
    elif flat_available():
        agents = ["flat", "full_list"]
    else:
        agents = ["full_list"]
    results = run_fleet(
        n,
        agents,
        # The flat agent brings the fleet up (the fastest: see the module's docstring).
        bring_up_with="flat" if flat_available() else "full_list",
        poll=only != "flat",  # the poller keeps to a full_list turn (it needs a live fleet)
        time_scale=time_scale,
        window_sim=window_sim,
        ends=ends,
        vanish=vanish,
        max_rps=max_rps,
        timeout=timeout,
        say=say,
    )
    if only is None and not flat_available():
        results["flat"] = {
            "n": n,
            "available": False,
            "vast_calls_per_min": None,
            "rate_limited": None,
            "end_to_action_p95_s": None,
        }
    return {s: results.get(s, skipped) for s in STRATEGIES}


# ------------------------------------------------------------------------------ output


def launch_rate(quick: bool, say) -> float | None:
    """`launch_rate_vs_bound` of the launch burst (benchmarks/launch.py) when it exists."""
    try:
        from benchmarks.launch import run_burst
    except ImportError:
        say("benchmarks.launch is not there yet: launch_rate_vs_bound is null")
        return None
    return run_burst(10 if quick else 100)["launch_rate_vs_bound"]


def ratio(value, base):
    if value is None or base in (None, 0):
        return None
    return round(value / base, 2)


ROWS = (
    ("Vast.ai calls/min (all endpoints)", lambda s: _total(s.get("vast_calls_per_min"))),
    ("list calls/min", lambda s: s.get("list_calls_per_min")),
    ("instance GETs/min", lambda s: (s.get("vast_calls_per_min") or {}).get("show")),
    ("429s in the window", lambda s: s.get("rate_limited")),
    ("429s by endpoint", lambda s: _calls(s.get("rate_limited_by_endpoint"))),
    ("list calls per sync", lambda s: s.get("list_calls_per_sync")),
    ("ended checks/min (1 list call each)", lambda s: s.get("ended_checks_per_min")),
    ("sync at real limits (s)", lambda s: s.get("sync_at_real_limits_s")),
    ("sync measured p50 / p95 (real s)", lambda s: _pair(s, "sync_real_s_p50", "sync_real_s_p95")),
    ("end → action p50 (sim s)", lambda s: s.get("end_to_action_p50_s")),
    ("end → action p95 (sim s)", lambda s: s.get("end_to_action_p95_s")),
    (
        "vanished → noticed p50 / max (sim s)",
        lambda s: _pair(s, "vanished_to_noticed_p50_s", "vanished_to_noticed_max_s"),
    ),
    ("missed (ends, vanished)", lambda s: _pair(s, "ends_missed", "vanished_missed")),
    ("agent CPU s per task per sim hour", lambda s: s.get("cpu_s_per_task_per_sim_hour")),
    ("peak RSS per task (KiB, worker + beat)", lambda s: s.get("peak_rss_kib_per_task")),
    ("Redis used_memory per task (bytes)", lambda s: s.get("redis_bytes_per_task")),
)


def _calls(calls):
    return ", ".join(f"{k} {v}" for k, v in sorted(calls.items()) if v) or "0" if calls else None


def _total(calls):
    return None if calls is None else round(sum(calls.values()), 1)


def _pair(s, a, b):
    if s.get(a) is None and s.get(b) is None:
        return None
    return f"{fmt(s.get(a), 3)} / {fmt(s.get(b), 3)}"


def report(results: dict[int, dict]) -> str:
    out = []
    for n, by in results.items():
        flat = by["flat"]
        header = [f"N = {n}", *STRATEGIES, "per_instance / flat", "full_list / flat"]
        rows = []
        for name, get in ROWS:
            values = [get(by[s]) for s in STRATEGIES]
            base = get(flat)
            rows.append(
                [name, *values]
                + [
                    ratio(v, base) if isinstance(v, (int, float)) else None
                    for v in (values[0], values[1])
                ]
            )
        out += [table(header, rows), ""]
        notes = []
        per = by["per_instance"]
        if per.get("kept_up") is False:
            notes.append(
                f"the poller could not keep dstack's pace on this machine "
                f"({fmt(_total(per['vast_calls_per_min']), 0)} of "
                f"{fmt(per['target_calls_per_min'], 0)} GETs/min): its 429 count is a floor"
            )
        if flat.get("available") is False:
            notes.append("flat: the agent does not know `vast_api.instance_reads` yet (not run)")
        # The run's own figures: the strategy that brought the fleet up (flat, unless it ran
        # alone as full_list), then each agent strategy's peaks over its own turn.
        ran = [s for s in ("flat", "full_list") if not by[s].get("skipped") and s in by]
        first = next((by[s] for s in ran if by[s].get("bring_up_real_s") is not None), {})
        notes.append(
            f"time_scale {first.get('time_scale')}: bring-up by {first.get('brought_up_by')} "
            f"{first.get('bring_up_real_s')} real s"
        )
        for s in ran:
            notes.append(
                f"{s}: peak RSS (MiB) {by[s].get('peak_rss_mib')}; peak Celery queue lengths "
                f"{by[s].get('peak_queue_messages')}; Redis bytes by key family after settling "
                f"{by[s].get('redis_bytes_by_family')}"
            )
        out += ["Notes: " + "; ".join(notes) + ".", ""]
    out.append(
        "Setup: per N, a fresh private Redis, local stack and agent (one worker, "
        "concurrency 4, one beat); N long tasks brought to `running` by the flat agent, "
        "then each agent strategy in turn on that fleet (flat, then the agent restarted as "
        "full_list): two sync intervals of settling, then a window during which short tasks (30 sim s pull, 60 "
        "sim s run, then `PONOS_EXIT_CODE=0` and self-stop) end and a few long tasks' "
        "instances are destroyed with their own instance key (behind the agent's back). "
        "The agent's intervals are the config defaults on the simulated clock (sync 10 sim s, "
        "logs 60 sim s); Vast.ai's limits and the agent's limiter on the same clock. "
        "end → action: from the instance's first status after `running` to the agent's first "
        "call on it (a log request or its destroy), from the simulator's records; for "
        "per_instance, to the poller's first GET showing it. vanished → noticed: to the "
        "agent's next report to Arkindex or new instance for that task; for per_instance, to "
        "the poller's first 404. list calls per sync: the window's list calls (the syncs', "
        "the watchers' and the creates' label lookups) but the ended checks' (flat: one call "
        "each, midway between two syncs, counted apart from the worker log), over the syncs. "
        "sync at real limits = list calls per sync × 1.1 s (Vast.ai's "
        "1 s list threshold and the agent limiter's margin). CPU: utime+stime of the worker "
        "and beat process trees over the window; RSS: peak of those trees over the agent "
        "strategy's turn (bring-up included for the first); Redis: used_memory after the "
        "turn's settling minus before submitting (the second turn's includes what the first "
        "left, e.g. the flat view's entries). per_instance is not an "
        "agent mode: dstack's polling emulated in the benchmark (one `GET /api/v0/instances/ID/` "
        "per live instance every 7 sim s, spread over the cycle, no limiter, a 429 skips the "
        "observation), run in a window after the full_list agent's, on the same fleet and "
        "API key, counted from its own requests."
    )
    return "\n".join(out)


def plot(results: dict[int, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ns = sorted(results)
    fig, ax = plt.subplots(figsize=(6, 4))
    for strategy in STRATEGIES:
        if strategy == "per_instance":
            ys = [_total(results[n][strategy].get("vast_calls_per_min")) for n in ns]
            label = "per_instance (instance GETs)"
        else:
            ys = [results[n][strategy].get("list_calls_per_min") for n in ns]
            label = strategy
        points = [(n, y) for n, y in zip(ns, ys, strict=True) if y is not None]
        if points:
            ax.plot(*zip(*points, strict=True), marker="o", label=label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("live instances N")
    ax.set_ylabel("instance-read calls per simulated minute")
    ax.set_title("Vast.ai instance reads against N")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


QUICK = {"n": (10,), "time_scale": 10.0, "window": 180.0, "ends": 5, "vanish": 2}
# The agent's work runs in real time while its intervals are divided by time_scale: its load
# is N x time_scale-fold what a real deployment sees (a watch per running task every three
# syncs, more while starting), so the scale goes down as N goes up (on 2 cores, N x
# time_scale of a few hundred keeps up).
SCALES = {10: 10.0, 100: 4.0, 1000: 4.0}


@click.command()
@click.option(
    "--n",
    "ns",
    type=int,
    multiple=True,
    default=(10, 100),
    show_default=True,
    help="Live instances (repeatable).",
)
@click.option("--quick", is_flag=True, help="N = 10 only, short window (for make test).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document only.")
@click.option(
    "--time-scale",
    type=float,
    default=None,
    help="Sim s per real s (default per N: 10 → 10, 100 and 1000 → 4).",
)
@click.option(
    "--window",
    type=float,
    default=300.0,
    show_default=True,
    help="Simulated seconds of each steady-state window.",
)
@click.option(
    "--ends", type=int, default=10, show_default=True, help="Short tasks that end in each window."
)
@click.option(
    "--vanish",
    type=int,
    default=3,
    show_default=True,
    help="Instances destroyed behind the agent's back in each window.",
)
@click.option(
    "--max-rps",
    type=float,
    default=150.0,
    show_default=True,
    help="Cap on the emulated poller's real requests per second.",
)
@click.option(
    "--timeout",
    type=float,
    default=900.0,
    show_default=True,
    help="Real seconds allowed to bring the fleet up.",
)
@click.option(
    "--only",
    type=click.Choice(["flat", "full_list"]),
    default=None,
    help="One agent strategy alone (full_list keeps its per-instance poller window; no launch "
    "burst; implies --no-write).",
)
@click.option("--no-write", is_flag=True, help="Print only; leave BENCHMARKS.md alone.")
def main(ns, quick, as_json, time_scale, window, ends, vanish, max_rps, timeout, only, no_write):
    """Instance reads at N live instances: per-instance polling, full listing, flat sync."""
    import logging

    logging.getLogger("werkzeug").setLevel(logging.WARNING)
    # A SIGTERM (kill, a timeout) unwinds the runs' `with` blocks: the agent, the stack and
    # the private Redis stop instead of outliving the benchmark.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if quick:
        ns, window, ends, vanish = QUICK["n"], QUICK["window"], QUICK["ends"], QUICK["vanish"]
    machine_info = machine()

    def say(text):
        click.echo(text, err=True)

    results: dict[int, dict] = {}
    for n in ns:
        scale = time_scale or (QUICK["time_scale"] if quick else SCALES.get(n, 20.0))
        try:
            results[n] = run_n(
                n,
                quick=quick,
                time_scale=scale,
                window_sim=window,
                ends=ends,
                vanish=vanish,
                max_rps=max_rps,
                timeout=timeout,
                say=say,
                only=only,
            )
        except BenchFailed as error:
            raise click.ClickException(f"N={n}: {error}") from error
        if not as_json:
            click.echo(json.dumps({str(n): results[n]}))
    no_write = no_write or only is not None
    rate = None if only is not None else launch_rate(quick, say)
    if as_json:
        first = results[ns[0]]
        click.echo(
            json.dumps(
                {
                    "strategies": first,
                    "launch_rate_vs_bound": rate,
                    "by_n": {str(n): r for n, r in results.items()},
                }
            )
        )
        return
    text = report(results)
    if rate is not None:
        text += f"\n\nLaunch burst: launch rate / create bound = {rate}."
    if not no_write and len(results) > 1:
        try:
            path = Path(__file__).resolve().parent.parent / "docs" / "fleet_list_calls.png"
            plot(results, path)
            text += f"\n\n![list calls per minute against N](docs/{path.name})"
        except ImportError:
            say("matplotlib is not installed (make bench): no plot")
    click.echo(text)
    if not no_write:
        write_section("fleet", "Fleet: instance reads at N live instances", text, machine_info)


if __name__ == "__main__":
    main()
