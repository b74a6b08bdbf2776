"""Shared pieces of the benchmarks: a bounded agent run on the local stack, /proc sampling,
percentiles, the machine description and BENCHMARKS.md sections.

A benchmark is not a test: it measures and records, it does not assert. Everything runs on
127.0.0.1 (private redis-server, the simulators on ephemeral ports) and stops by itself.
"""

from __future__ import annotations

import datetime as dt
import math
import os
import platform
import re
import shlex
import subprocess
import sys
import threading
import time
from collections import Counter
from pathlib import Path

import redis

from ponos_tasks.lifecycle import parse_label
from ponos_tasks.simulators.harness import LocalRun

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "BENCHMARKS.md"
TERMINAL = ("completed", "failed", "error", "stopped")
HEADER = """# Benchmarks

Figures measured by `benchmarks/` (run with `.venv/bin/python -m benchmarks.<name>`): real
Celery worker and beat processes, a private Redis and the local stack (Arkindex and Vast.ai
simulators, S3), all on 127.0.0.1. Each section is rewritten by the command shown in it.

Reading the figures: the Vast.ai simulator runs on an accelerated clock (`time_scale`
simulated seconds per real second; its rate limits and billing follow that clock, and the
agent's rate limiter is scaled by the same factor), while the agent's own intervals (sync,
watch, Celery) run in real time. "sim s" are Vast.ai seconds, "real s" wall-clock seconds.
"""


# ------------------------------------------------------------------------------ numbers


def percentile(values: list[float], q: float) -> float | None:
    """Nearest-rank percentile (q in 0..100); None for no values."""
    data = sorted(values)
    if not data:
        return None
    rank = max(1, math.ceil(q / 100.0 * len(data)))
    return data[min(rank, len(data)) - 1]


def spread(values: list[float]) -> dict:
    return {
        "n": len(values),
        "p50": percentile(values, 50),
        "p95": percentile(values, 95),
        "max": max(values) if values else None,
    }


def fmt(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.{digits}f}"
    return str(value)


# ------------------------------------------------------------------------------ machine


def machine() -> dict:
    mem_kb = 0
    with open("/proc/meminfo") as meminfo:
        for line in meminfo:
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    commit = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return {
        "nproc": os.cpu_count(),
        "mem_gib": round(mem_kb / 1024 / 1024, 1),
        "load": " ".join(f"{x:.2f}" for x in os.getloadavg()),
        "python": platform.python_version(),
        "commit": commit or "?",
    }


def command_line() -> str:
    module = sys.modules["__main__"].__spec__
    name = module.name if module is not None else sys.argv[0]
    return ".venv/bin/python -m " + " ".join([name, *map(shlex.quote, sys.argv[1:])])


def write_section(name: str, title: str, body: str, machine_info: dict) -> None:
    """Replace (or append) the section `name` of BENCHMARKS.md."""
    now = dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC")
    block = (
        f"<!-- bench:{name} -->\n## {title}\n\n"
        f"Command: `{command_line()}`  \n"
        f"Date: {now}; machine: {machine_info['nproc']} CPUs, {machine_info['mem_gib']} GiB, "
        f"load average at start {machine_info['load']}; Python {machine_info['python']}; "
        f"commit {machine_info['commit']}\n\n{body.rstrip()}\n<!-- /bench:{name} -->"
    )
    text = RESULTS.read_text() if RESULTS.exists() else HEADER
    pattern = re.compile(
        rf"<!-- bench:{re.escape(name)} -->.*?<!-- /bench:{re.escape(name)} -->", re.S
    )
    if pattern.search(text):
        text = pattern.sub(lambda _m: block, text)
    else:
        text = text.rstrip() + "\n\n" + block + "\n"
    RESULTS.write_text(text if text.endswith("\n") else text + "\n")


def table(header: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ------------------------------------------------------------------------------ /proc


def _children_map() -> dict[int, list[int]]:
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as stat:
                fields = stat.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(entry))
    return children


def _rss_kb(pid: int) -> int:
    try:
        with open(f"/proc/{pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
    except OSError:
        pass
    return 0


def tree_rss_kb(root: int, children: dict[int, list[int]] | None = None) -> int:
    """Resident memory of a process and all its descendants (Celery's pool children)."""
    children = children if children is not None else _children_map()
    total, todo = 0, [root]
    while todo:
        pid = todo.pop()
        total += _rss_kb(pid)
        todo.extend(children.get(pid, ()))
    return total


# A key's family: its name with ids (UUIDs, hex digests, numbers) replaced by "*".
_KEY_ID = re.compile(
    r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|[0-9a-f]{16,}|\d+"
)


def redis_memory_by_family(client: redis.Redis, top: int = 8) -> dict[str, int]:
    """Bytes (MEMORY USAGE) per key family, the `top` largest: where Redis's memory goes,
    e.g. Celery's queues and unacked hash against the agent's records and view."""
    sizes: Counter = Counter()
    for key in client.scan_iter(count=1000):
        name = key.decode(errors="replace")
        sizes[_KEY_ID.sub("*", name)] += client.memory_usage(key, samples=0) or 0
    return dict(sizes.most_common(top))


class Sampler(threading.Thread):
    """Samples RSS of named process trees and Redis used_memory until stopped; keeps peaks."""

    def __init__(self, pids: dict[str, int], redis_url: str, every: float = 0.5):
        super().__init__(daemon=True, name="bench-sampler")
        self.pids = pids
        self.redis = redis.Redis.from_url(redis_url)
        self.every = every
        self.peak_rss_kb: Counter = Counter()
        self.peak_redis = 0
        # Celery's queues (Redis lists of the default transport): a backlog the worker has
        # not taken shows here, and in used_memory (about 1 KB a message).
        self.peak_queue: Counter = Counter()
        self.samples = 0
        self._halt = threading.Event()

    def sample(self) -> None:
        children = _children_map()
        for name, pid in self.pids.items():
            self.peak_rss_kb[name] = max(self.peak_rss_kb[name], tree_rss_kb(pid, children))
        try:
            used = int(self.redis.info("memory")["used_memory"])
            self.peak_redis = max(self.peak_redis, used)
            for queue in ("steps", "sync"):
                self.peak_queue[queue] = max(self.peak_queue[queue], self.redis.llen(queue))
        except redis.RedisError:
            pass
        self.samples += 1

    def run(self) -> None:
        while not self._halt.is_set():
            self.sample()
            self._halt.wait(self.every)

    def stop(self) -> None:
        self._halt.set()
        self.join(timeout=5)
        self.sample()


# ------------------------------------------------------------------------------ the run


class BenchFailed(Exception):
    pass


class AgentRun(LocalRun):
    """Private Redis + LocalStack + the agent's worker and beat (a LocalRun), no Flower, with
    the /proc sampler and the benchmarks' submit/wait.

        with AgentRun(time_scale=50, max_instances=20) as run:
            run.submit(tasks); run.wait_done(timeout); run.vast("ledger")
    """

    def __init__(
        self,
        *,
        time_scale: float,
        max_instances: int,
        run_mode: str = "scripted",
        concurrency: int = 4,
        sync_interval: float = 2.0,
        logs_interval: float = 5.0,
        keep_logs: Path | None = None,
    ):
        super().__init__(
            time_scale=time_scale,
            vast_run_mode=run_mode,
            redis="private",
            logs_dir=keep_logs,
            admin_timeout=30.0,
        )
        self.max_instances = max_instances
        self.run_mode = run_mode
        self.concurrency = concurrency
        self.sync_interval = sync_interval
        self.logs_interval = logs_interval
        self.sampler: Sampler | None = None
        self.task_ids: list[str] = []

    def config(self) -> dict:
        return self.agent_config(
            sync_interval=self.sync_interval,
            logs_interval=self.logs_interval,
            agent_name="ponos-vast-bench",
            vast_api={
                "rate_limit_scale": 1.0 / self.time_scale,
                "loading_deadline": max(30.0, 1200.0 / self.time_scale),
                "offer_wait": max(60.0, 3600.0 / self.time_scale),
                "max_instances": self.max_instances,
            },
        )

    def start(self) -> AgentRun:
        try:
            super().start()
        except RuntimeError as error:
            raise BenchFailed(str(error)) from None
        self.start_sampled_agent()
        return self

    def start_sampled_agent(self) -> None:
        """The agent's worker and beat with this run's config, and a sampler on them."""
        agent = self.start_agent(config=self.config(), concurrency=self.concurrency)
        self.sampler = Sampler({name: p.pid for name, p in agent.processes.items()}, self.redis_url)
        self.sampler.start()

    def stop(self, agent_timeout: float = 20.0) -> None:
        # Each part stops even when an earlier one failed: nothing may be left running.
        try:
            if self.sampler is not None and self.sampler.is_alive():
                self.sampler.stop()
        finally:
            super().stop(agent_timeout)

    def __enter__(self) -> AgentRun:
        try:
            return self.start()
        except BaseException:
            self.stop()
            raise

    # -- simulators

    def vast(self, what: str) -> dict:
        return self.admin.vast(what)

    def ark_tasks(self) -> list[dict]:
        wanted = set(self.task_ids)
        return [t for t in self.admin.tasks().values() if t["id"] in wanted]

    def submit(self, name: str, tasks: list[dict]) -> list[str]:
        ids = list(self.admin.process(name, tasks).values())
        self.task_ids += ids
        return ids

    def wait_done(self, timeout: float, on_poll=None) -> float:
        """Seconds until every submitted task is terminal and no instance is left."""
        start = time.monotonic()
        while True:
            dead = self.agent.check_alive()
            if dead:
                raise BenchFailed("agent process exited: " + ", ".join(dead))
            tasks = self.ark_tasks()
            if on_poll is not None:
                on_poll(time.monotonic() - start, tasks)
            if (
                all(t["state"] in TERMINAL for t in tasks)
                and self.vast("stats")["live_instances"] == 0
            ):
                return time.monotonic() - start
            if time.monotonic() - start > timeout:
                states = Counter(t["state"] for t in tasks)
                raise BenchFailed(
                    f"not done after {timeout:g} s: {dict(states)}, "
                    f"{self.vast('stats')['live_instances']} live instances"
                )
            time.sleep(0.5)

    def sim_to_epoch(self, sim_t: float) -> float:
        return self.stack.vast.state.clock.epoch(sim_t)

    def epoch_to_sim(self, wall: float) -> float:
        return (wall - self.stack.vast.state.clock.epoch(0.0)) * self.time_scale

    def worker_log(self) -> str:
        path = self.logs_dir / "worker1.log"
        return path.read_text(errors="replace") if path.exists() else ""


# ------------------------------------------------------------------------------ timelines


def live_peaks(events: list[dict]) -> tuple[int, int]:
    """(peak live instances overall, peak live instances of any one task) from the events."""
    live_total, peak_total = 0, 0
    per_task: Counter = Counter()
    peak_task = 0
    for event in sorted(events, key=lambda e: e.get("t", 0)):
        if event.get("event") not in ("created", "destroyed"):
            continue
        delta = 1 if event["event"] == "created" else -1
        live_total += delta
        peak_total = max(peak_total, live_total)
        info = parse_label(event.get("label"))
        if info is not None:
            per_task[info.task_id] += delta
            peak_task = max(peak_task, per_task[info.task_id])
    return peak_total, peak_task


def history_time(task: dict, to: str) -> float | None:
    return next(
        (h["t"] for h in task.get("history", []) if h.get("accepted") and h.get("to") == to), None
    )


# A sync that found another one running returns 'skipped' (tasks.py): not a sync that ran.
SYNC_DONE = re.compile(r"Task ponos\.sync\[[^\]]+\] succeeded in ([0-9.]+)s: (?!'skipped')")


ENDED_CHECK_DONE = re.compile(r"ended check: listed \d+ instance")


def ended_checks(worker_log: str) -> int:
    """How many ended checks (ponos.check_ended) made their list call."""
    return len(ENDED_CHECK_DONE.findall(worker_log))


def sync_durations(worker_log: str) -> list[float]:
    """Durations of the ponos.sync runs, from Celery's "succeeded in" lines."""
    return [float(m.group(1)) for m in SYNC_DONE.finditer(worker_log)]
