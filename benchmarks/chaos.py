"""The chaos suite: the whole agent as real processes (two workers, a beat, sometimes two, a
private Redis with AOF, the local stack with its realistic defaults) on a seeded workload,
with faults injected on a schedule drawn from the same seed; then the invariants
(benchmarks/chaos_checks.py) computed from the simulators' records.

    python -m benchmarks.chaos --seed 1 --tasks 60            # one run, figures on stdout
    python -m benchmarks.chaos --quick                        # the variant `make test` runs
    python -m benchmarks.chaos --seeds 1,2,3 --big 200 --write   # `make chaos`: RELIABILITY.md

Exit status 0 when every invariant holds in every run, 1 otherwise. Everything runs on
127.0.0.1 and stops by itself (`--timeout` bounds each run).
"""

from __future__ import annotations

import argparse
import json
import shutil
import signal
import sys
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import redis
import requests

from benchmarks.chaos_checks import (
    TERMINAL,
    Records,
    Verdict,
    blocked_tasks,
    check_all,
    final_instances,
    task_of,
)
from benchmarks.chaos_plan import LABEL_FAULTS, ChaosPlan, ChaosTask, Injection, build_plan
from benchmarks.common import command_line, machine
from ponos_tasks.config import AgentConfig
from ponos_tasks.settings import Settings
from ponos_tasks.simulators.harness import OVERRIDING_ENV, LocalRun, broker_dump
from ponos_tasks.simulators.stack import free_port

ROOT = Path(__file__).resolve().parent.parent
REPORT = ROOT / "RELIABILITY.md"
IMAGE = "registry.example.com/ponos/chaos-worker:1"
TIME_SCALE = 40.0  # simulated Vast.ai seconds per real second
# The demo's interval: a sync every 2 s. The invariant "no instance left two sync intervals
# after the last end" then allows 4 s for the last report, destroy step and DELETE, whose
# latencies (Celery, HTTP) are real seconds, not accelerated ones.
SYNC_INTERVAL = 2.0
LOGS_INTERVAL = 5.0
URL_LIFETIME = 30.0  # real seconds a pre-signed S3 URL lives: long tasks outlive theirs
REGISTRY_PASSWORD = "chaos-registry-password-5e1f"
FLOWER_AUTH = "chaos:flower-password-8c2d"
FINDINGS = "## Bugs the suite found"


class RunFailed(Exception):
    pass


# ---------------------------------------------------------------------- Sentry sink


class SentrySink:
    """A loopback HTTP server the agent's Sentry SDK sends its events to (its DSN points
    here): every body it received, for the secret check. Nothing leaves the machine."""

    def __init__(self):
        self.bodies: list[bytes] = []
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's naming)
                length = int(self.headers.get("Content-Length") or 0)
                sink.bodies.append(self.rfile.read(length))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *_args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    @property
    def dsn(self) -> str:
        return f"http://chaospublickey@127.0.0.1:{self.port}/1"

    def text(self) -> str:
        return "\n".join(body.decode("utf-8", "replace") for body in self.bodies)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


# ---------------------------------------------------------------------- the run


def agent_config(run: LocalRun, sentry_dsn: str) -> dict:
    """The agent's configuration: the stack's, with deadlines suited to the simulator's
    accelerated clock (the agent's own intervals are real seconds)."""
    return run.agent_config(
        sync_interval=SYNC_INTERVAL,
        logs_interval=LOGS_INTERVAL,
        agent_name="chaos-agent",
        sentry={"dsn": sentry_dsn, "environment": "chaos"},
        vast_api={
            "max_instances": 10,
            "disk_gb": 16,
            "rate_limit_scale": 1.0 / TIME_SCALE,
            "loading_deadline": 60,
            "pull_stall_timeout": 15,
            "offline_grace": 15,
            "early_exit_window": 10,
            "offer_wait": 180,
            "log_read_deadline": 30,
            "start_attempts": 3,
            "registries": [
                {
                    "url": "https://registry.example.com",
                    "username": "ci",
                    "password": REGISTRY_PASSWORD,
                }
            ],
        },
    )


def scripted_env(task: ChaosTask) -> dict[str, str]:
    """A scripted instance that behaves like the wrapper around the task's command (the
    simulator adds the wrapper's nonce to the marker)."""
    return {
        "SIM_RUN_MODE": "scripted",
        "SIM_DURATION": f"{max(80.0, task.duration * TIME_SCALE):g}",
        "SIM_LOG_LINES": "2",
        "SIM_SELF_STOP": "true",
        "SIM_FINAL_LINES": (
            f"{task.slug}: starting\n{task.slug}: done\nPONOS_EXIT_CODE={task.exit_code}"
        ),
    }


class ChaosRun:
    def __init__(self, plan: ChaosPlan, *, timeout: float, workdir: Path | None, say):
        self.plan = plan
        self.timeout = timeout
        self.say = say
        self.sink = SentrySink()
        self.local = LocalRun(
            time_scale=TIME_SCALE,
            vast_run_mode="local",
            # A 2 GB image, cached on no host at first: real pulls (tens of simulated seconds).
            vast_options={"image_sizes": {IMAGE: 2.0}},
            stack_options={"url_lifetime": URL_LIFETIME, "vast_seed": plan.seed},
            redis_appendonly=True,
            workdir=workdir,
            agent_env={**{name: "" for name in OVERRIDING_ENV}, "FLOWER_BASIC_AUTH": FLOWER_AUTH},
        )
        self.ids: dict[str, str] = {}
        self.broker_samples: list[str] = []
        self.injected: list[str] = []  # what was done, with when
        self.untriggered: list[str] = []
        self.armed: list = []  # targeted kills waiting for their moment
        self.later: list = []  # (when, what): ends of fault windows
        self.deleted_at: float | None = None
        # When the agent could not act on a deletion, real time: Arkindex down (injected),
        # no worker alive, destroy calls failing on purpose; and when workers were killed.
        self.outages: list[tuple[float, float]] = []
        self.no_worker_since: float | None = None
        self.destroy_faults: list = []  # (since, taken()) until the rule is used up
        self.kills: list[float] = []
        self.flower_port = free_port()
        self.t0 = 0.0

    # -- setup

    @property
    def admin(self):
        return self.local.admin

    @property
    def agent(self):
        return self.local.agent

    def start(self) -> None:
        self.local.start()
        for process in sorted({t.process for t in self.plan.tasks}):
            tasks = [t for t in self.plan.tasks if t.process == process]
            specs = [
                {
                    "slug": t.slug,
                    "image": IMAGE,
                    "command": t.command(),
                    "env": scripted_env(t) if t.scripted else {},
                    "parents": list(t.parents),
                    "requires_gpu": True,
                }
                for t in tasks
            ]
            for slug, task_id in self.admin.process(process, specs).items():
                self.ids[f"{process}/{slug}"] = task_id
        rules = []
        for key, name in self.plan.label_faults.items():
            params, _ = LABEL_FAULTS[name]
            rules.append({"fault": name, "label": f"-{self.ids[key]}-1$", "times": 1, **params})
        if rules:
            self.admin.faults(*rules)
        config = agent_config(self.local, self.sink.dsn)
        # The agent's own timings (how long before the sync resumes a killed chain).
        self.settings = Settings.from_config(AgentConfig.model_validate(config))
        self.local.start_agent(
            config=config, workers=2, beats=1, concurrency=3, flower_port=self.flower_port
        )
        self.t0 = time.monotonic()

    def stop(self) -> None:
        try:
            self.local.stop(agent_timeout=15)
        finally:
            self.sink.close()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def note(self, line: str) -> None:
        self.injected.append(f"{self.elapsed():6.1f}s {line}")
        self.say(f"[{self.elapsed():6.1f}s] {line}")

    # -- injections

    def kill_workers(self) -> None:
        for name in [n for n in self.agent.processes if n.startswith("worker")]:
            if self.agent.processes[name].poll() is None:
                self.agent.kill(name)
        self.kills.append(time.monotonic())

    def _vast_rule_taken(self, rule: dict):
        self.admin.faults(rule)

        def taken():
            return (
                rule not in self.admin._json("GET", self.admin.vast_url + "/_sim/faults")["rules"]
            )

        return taken

    def inject(self, injection: Injection) -> None:
        kind, p = injection.kind, injection.params
        admin = self.admin
        if kind == "kill_worker":
            name = f"worker{p['worker']}"
            if self.agent.processes[name].poll() is None:
                self.agent.kill(name)
                self.kills.append(time.monotonic())
            self.note(f"SIGKILL {name}")
        elif kind == "kill_beat":
            self.agent.kill("beat1")
            self.note("SIGKILL beat1")
        elif kind == "second_beat":
            self.agent.start_beat(2)
            self.note(f"second beat started for {p['seconds']} s")
            self.later.append((time.monotonic() + p["seconds"], self._stop_second_beat))
        elif kind == "kill_in_create":
            rule = {"fault": "slow", "endpoint": "create", "delay": 3.0, "after": True, "times": 1}
            self._targeted(self._vast_rule_taken(rule), "a create that took effect")
        elif kind == "kill_in_report":
            rule = {"fault": "slow", "seconds": 3.0, "after": True}
            before = admin.arkindex_fault_state()["hits"].get("slow", 0)
            admin.arkindex_faults({**rule, "operation": "PartialUpdateTask", "times": 1})
            self._targeted(
                lambda: admin.arkindex_fault_state()["hits"].get("slow", 0) > before,
                "a state update that took effect",
            )
        elif kind == "kill_in_upload":
            before = admin.s3_stats()["slow_answers"]
            admin.s3_slow(3.0, times=1)
            self._targeted(
                lambda: admin.s3_stats()["slow_answers"] > before, "a log upload that was stored"
            )
        elif kind == "redis_restart_aof":
            self.local.redis.restart(down_for=1.0)
            self.note("Redis restarted with its AOF (down 1 s)")
        elif kind == "redis_wipe":
            self.wipe_redis()
            self.note("Redis lost with its memory (no persistence: every message and record)")
        elif kind == "vast_429_storm":
            admin.faults(
                {"fault": "rate_limit", "endpoint": "create", "times": p["times"]},
                {"fault": "rate_limit", "endpoint": "search", "times": 3, "shape": "json"},
            )
            self.note(f"Vast.ai 429 storm ({p['times']} creates, 3 searches)")
        elif kind == "vast_5xx":
            rule = {"fault": "http_5xx", "endpoint": p["endpoint"], "times": p["times"]}
            self._vast_fault_window(rule)
            self.note(f"Vast.ai 500 x{p['times']} on {p['endpoint']}")
        elif kind == "vast_html":
            rule = {"fault": "html_error", "endpoint": p["endpoint"], "times": p["times"]}
            self._vast_fault_window(rule)
            self.note(f"Vast.ai HTML 502 page x{p['times']} on {p['endpoint']}")
        elif kind == "vast_slow":
            admin.faults(
                {
                    "fault": "slow",
                    "endpoint": p["endpoint"],
                    "delay": p["delay"],
                    "times": p["times"],
                }
            )
            self.note(f"Vast.ai {p['endpoint']} answers {p['delay']} s late x{p['times']}")
        elif kind in ("arkindex_5xx", "arkindex_html_502"):
            fault = "http_5xx" if kind == "arkindex_5xx" else "html_502"
            rule = {"fault": fault, "status": 500 if fault == "http_5xx" else 502}
            admin.arkindex_faults(rule)
            self.outages.append((time.monotonic(), time.monotonic() + p["seconds"]))
            self.later.append((time.monotonic() + p["seconds"], lambda: self._end_window(rule)))
            self.note(f"Arkindex {fault} for {p['seconds']:g} s")
        elif kind == "arkindex_slow":
            admin.arkindex_slow(p["seconds"], times=p["times"])
            self.note(f"Arkindex answers {p['seconds']} s late x{p['times']}")
        elif kind == "arkindex_token_expiry":
            admin.arkindex_expire_token(times=1)
            self.note("Arkindex access token expired")
        elif kind == "s3_urls_expire":
            # S3's clock runs ahead: a URL the agent has held for more than 3 s has expired
            # (a long task outliving its URL), while a freshly issued one still works.
            ahead = URL_LIFETIME - 3.0
            admin.s3_advance_clock(ahead)
            self.later.append(
                (time.monotonic() + p["seconds"], lambda: admin.s3_advance_clock(-ahead))
            )
            self.note(f"pre-signed URLs held over 3 s expire, for {p['seconds']:g} s")
        elif kind == "s3_down":
            admin.s3_down(p["seconds"])
            self.note(f"S3 down for {p['seconds']:g} s")
        else:
            raise ValueError(f"unknown injection {kind}")

    def _vast_fault_window(self, rule: dict) -> None:
        """Set a Vast.ai rule; one on destroy counts as time the agent could not destroy,
        from now until the rule is used up."""
        taken = self._vast_rule_taken(rule)
        if rule["endpoint"] == "destroy":
            self.destroy_faults.append((time.monotonic(), taken))

    def _targeted(self, in_flight, what: str) -> None:
        """Arm a kill: once `in_flight()` says the call took effect while its answer is held
        back, SIGKILL every worker (checked on every tick, for up to 60 s)."""
        self.armed.append((time.monotonic() + 60.0, in_flight, what))

    def _fire_armed(self) -> None:
        for item in list(self.armed):
            deadline, in_flight, what = item
            if in_flight():
                self.armed.remove(item)
                time.sleep(0.3)  # the call took effect; its answer is still on its way
                self.kill_workers()
                self.note(f"SIGKILL every worker inside {what}")
            elif time.monotonic() > deadline:
                self.armed.remove(item)
                self.untriggered.append(what)
                self.note(f"no {what} within 60 s: nothing killed")

    def _end_window(self, rule: dict) -> None:
        """Remove one Arkindex rule, keeping the others (a deleted task stays deleted)."""
        rules = self.admin.arkindex_fault_state()["rules"]
        self.admin.clear_arkindex_faults()
        kept = [r for r in rules if {k: r.get(k) for k in rule} != rule]
        if kept:
            self.admin.arkindex_faults(*kept)

    def _stop_second_beat(self) -> None:
        if "beat2" in self.agent.processes:
            self.agent.kill("beat2")
            del self.agent.processes["beat2"]
            self.agent.restarts.pop("beat2", None)
            self.note("second beat stopped")

    def wipe_redis(self) -> None:
        proc = self.local.redis
        proc.kill()
        for path in proc.workdir.iterdir():
            if path.is_dir():
                shutil.rmtree(path)
            else:
                path.unlink()
        proc.start()

    # -- the loop

    def sample_broker(self) -> None:
        """What the broker holds right now (queues, unacknowledged messages, their decoded
        bodies), capped: the secret check scans it."""
        try:
            client = redis.Redis.from_url(self.local.redis_url, socket_timeout=2)
            self.broker_samples.append(broker_dump(client)[:200_000])
        except redis.RedisError:
            pass  # Redis is being restarted: the next sample will see it

    def tick(self) -> None:
        for line in self.agent.supervise():
            self.say(f"[{self.elapsed():6.1f}s] {line}")
        self._fire_armed()
        now = time.monotonic()
        self._track_impairments(now)
        for item in [item for item in self.later if item[0] <= now]:
            self.later.remove(item)
            item[1]()

    def run(self) -> dict:
        pending = list(self.plan.injections)
        seen_running: dict[str, float] = {}
        acted: set[str] = set()
        names = {v: k for k, v in self.ids.items()}
        by_key = {t.key: t for t in self.plan.tasks}
        last_sample = last_status = 0.0
        all_ended_at = drained_at = deleted_gone_at = None
        ended_at: dict[str, float] = {}  # task key -> when first seen terminal
        deleted = {self.ids[t.key] for t in self.plan.tasks if t.role == "delete"}
        while True:
            self.tick()
            now = time.monotonic()
            while pending and pending[0].at <= self.elapsed():
                self.inject(pending.pop(0))
            try:
                tasks = self.admin.tasks()
            except requests.RequestException:
                time.sleep(0.2)
                continue
            for task_id, task in tasks.items():
                key = names.get(task_id)
                if key is None:
                    continue
                if task["state"] == "running":
                    seen_running.setdefault(key, now)
                spec = by_key[key]
                if (
                    spec.role in ("stop", "delete")
                    and key in seen_running
                    and key not in acted
                    and now - seen_running[key] >= spec.stop_after
                ):
                    acted.add(key)
                    if spec.role == "stop":
                        self.admin.stop_task(task_id)
                        self.note(f"user stops {key}")
                    else:
                        self.admin.arkindex_delete_task(task_id)
                        self.deleted_at = time.monotonic()
                        self.note(f"user deletes {key} (its process) while it runs")
            if now - last_sample >= 2.0:
                self.sample_broker()
                last_sample = now
            if now - last_status >= 15.0:
                counts = Counter(tasks[i]["state"] for i in self.ids.values())
                self.say(
                    f"[{self.elapsed():6.1f}s] "
                    + ", ".join(f"{n} {state}" for state, n in sorted(counts.items()))
                )
                last_status = now
            states = {key: tasks[task_id]["state"] for key, task_id in self.ids.items()}
            for key, state in states.items():
                if state in TERMINAL:
                    ended_at.setdefault(key, now)
            blocked = blocked_tasks(self.plan, states)
            ended = all(
                (states[t.key] in TERMINAL) if t.role != "delete" else (t.key in acted)
                for t in self.plan.tasks
                if t.key not in blocked
            )
            if ended and all_ended_at is None:
                all_ended_at = now
                self.say(f"[{self.elapsed():6.1f}s] every task ended")
            # Drained: from the last terminal state of the tasks that have one (the deleted
            # task has none, and may be deleted later), to no instance of theirs left.
            normal_ended = all(
                states[t.key] in TERMINAL
                for t in self.plan.tasks
                if t.key not in blocked and t.role != "delete"
            )
            watching_deleted = self.deleted_at is not None and deleted_gone_at is None
            if normal_ended or watching_deleted:
                live = self._live_owners()
                if normal_ended and drained_at is None and not live - deleted:
                    drained_at = now
                # Counted from the deletion, never before it.
                if watching_deleted and not live & deleted:
                    deleted_gone_at = now
            if all_ended_at is not None:
                # (a deleted-to-be task whose parent failed is never deleted: nothing to wait)
                deleted_done = deleted_gone_at is not None or self.deleted_at is None
                if drained_at is not None and deleted_done:
                    if not pending and not self.armed:
                        return {
                            "drained_after": drained_at - max(ended_at.values(), default=now),
                            "deleted_destroyed_after": (
                                deleted_gone_at - self.deleted_at if self.deleted_at else None
                            ),
                            "deleted_excused": self._deletion_excused(
                                self.deleted_at, deleted_gone_at
                            ),
                            "elapsed": self.elapsed(),
                        }
                elif now - all_ended_at > 120:
                    return {"drained_after": None, "elapsed": self.elapsed()}
            if self.elapsed() > self.timeout:
                waiting = sorted(
                    f"{names[i]}={t['state']}"
                    for i, t in tasks.items()
                    if i in names and t["state"] not in TERMINAL
                )
                self.say(f"timeout after {self.timeout:g} s; not ended: {', '.join(waiting)}")
                return {"drained_after": None, "elapsed": self.elapsed(), "timed_out": True}
            time.sleep(0.2)

    def _track_impairments(self, now: float) -> None:
        """Turn "no worker alive" and "destroy fault not used up yet" into windows."""
        alive = any(
            proc.poll() is None
            for name, proc in self.agent.processes.items()
            if name.startswith("worker")
        )
        if not alive and self.no_worker_since is None:
            self.no_worker_since = now
        elif alive and self.no_worker_since is not None:
            self.outages.append((self.no_worker_since, now))
            self.no_worker_since = None
        for item in list(self.destroy_faults):
            since, taken = item
            try:
                used_up = taken()
            except requests.RequestException:
                continue
            if used_up:
                self.destroy_faults.remove(item)
                self.outages.append((since, now))

    def _deletion_excused(self, start: float | None, end: float) -> float:
        """Seconds the agent could not act on the deletion between `start` and `end`: the
        windows when it was cut off (Arkindex down, no worker alive, destroys failing on
        purpose; counted once where they overlap), plus, for each worker kill, the time the
        sync loop takes by design to resume a killed chain (heartbeat_stale + one sync)."""
        if start is None:
            return 0.0
        clipped = sorted(
            (max(start, a), min(end, b)) for a, b in self.outages if min(end, b) > max(start, a)
        )
        covered, reach = 0.0, start
        for a, b in clipped:
            covered += max(0.0, b - max(a, reach))
            reach = max(reach, b)
        resume = self.settings.heartbeat_stale + self.settings.sync_interval
        kills = {round(k, 1) for k in self.kills if start <= k <= end}
        return covered + resume * len(kills)

    def _live_owners(self) -> set[str]:
        """Ids of the tasks that have a live Vast.ai instance now."""
        owners = set()
        for row in self.admin.instances():
            owner = task_of(row.get("label"))
            if row.get("live") and owner:
                owners.add(owner[0])
        return owners

    # -- the records

    def fired(self) -> dict:
        """What the services saw of the faults: aimed Vast.ai faults that never fired (their
        rule is still there: the task's first attempt never reached that point), S3 and
        Arkindex refusals, Vast.ai 429s."""
        rules = self.admin._json("GET", self.admin.vast_url + "/_sim/faults")["rules"]
        names = {v: k for k, v in self.ids.items()}
        unfired = sorted(
            f"{rule['fault']} on {names.get(rule['label'][1:37], rule['label'])}"
            for rule in rules
            if rule.get("label") and rule["fault"] in LABEL_FAULTS
        )
        s3 = self.admin.s3_stats()
        return {
            "aimed_unfired": unfired,
            "s3_expired_urls_refused": s3["refused_expired"],
            "s3_refused_while_down": s3["refused_down"],
            "vast_rate_limited": sum(self.admin.stats()["rate_limited"].values()),
            "arkindex_fault_hits": self.admin.arkindex_fault_state()["hits"],
        }

    def flower_pages(self) -> str:
        user, password = FLOWER_AUTH.split(":")
        texts = []
        for path in ("/api/tasks", "/api/workers", "/tasks"):
            try:
                resp = requests.get(
                    f"http://127.0.0.1:{self.flower_port}{path}", auth=(user, password), timeout=10
                )
                texts.append(resp.text)
            except requests.RequestException as exc:
                texts.append(f"flower unreachable: {exc}")
        return "\n".join(texts)

    def records(self, outcome: dict, baseline: dict | None) -> Records:
        admin = self.admin
        tasks = admin.tasks()
        logs = {task_id: admin.task_log(task_id) for task_id in self.ids.values()}
        instances = admin.instances()
        agent_logs = "\n".join(
            path.read_text(errors="replace") for path in sorted(self.local.logs_dir.glob("*.log"))
        )
        secrets = {
            "Vast.ai API key": self.local.stack.vast_api_key,
            "seed": self.local.stack.seed,
            "registry password": REGISTRY_PASSWORD,
        }
        for row in instances:
            secrets[f"instance key of {row.get('label')}"] = row.get("instance_api_key") or ""
        for task_id in self.ids.values():
            secrets[f"task token of {task_id[:8]}"] = tasks.get(task_id, {}).get("token") or ""
        for agent in admin.agents():
            for index, token in enumerate(agent.get("tokens", [])):
                secrets[f"agent token {index}"] = token
        places = {
            "published logs": "\n".join(text or "" for text in logs.values()),
            "agent log output": agent_logs,
            "broker messages": "\n".join(self.broker_samples),
            "Flower pages": self.flower_pages(),
            "Sentry events": self.sink.text(),
        }
        return Records(
            plan=self.plan,
            ids=self.ids,
            tasks=tasks,
            logs=logs,
            ledger=admin.ledger(),
            events=admin.events(),
            instances=instances,
            places=places,
            secrets=secrets,
            drained_after=outcome.get("drained_after"),
            deleted_destroyed_after=outcome.get("deleted_destroyed_after"),
            deleted_excused=outcome.get("deleted_excused") or 0.0,
            logs_interval=LOGS_INTERVAL,
            sync_interval=SYNC_INTERVAL,
            baseline_bill=baseline["bill"] if baseline else None,
            baseline_finals=baseline["finals"] if baseline else None,
        )


def run_once(
    seed: int,
    n_tasks: int,
    *,
    quick: bool = False,
    faults: bool = True,
    timeout: float = 900,
    baseline: dict | None = None,
    workdir: Path | None = None,
    say=print,
) -> dict:
    """One run; returns its figures (the verdicts, what was injected, the bill)."""
    plan = build_plan(seed, n_tasks, quick=quick, faults=faults)
    say(
        f"chaos seed {seed}: {n_tasks} tasks, {len(plan.label_faults)} aimed Vast.ai faults, "
        f"{len(plan.injections)} injections" + ("" if faults else " (baseline: no fault)")
    )
    run = ChaosRun(plan, timeout=timeout, workdir=workdir, say=say)
    try:
        run.start()
        outcome = run.run()
        time.sleep(2 * SYNC_INTERVAL)
        records = run.records(outcome, baseline)
        fired = run.fired()
        if workdir is not None:  # kept for a post-mortem: what the simulators recorded
            dump = {k: getattr(records, k) for k in ("ids", "tasks", "logs", "ledger", "events")}
            dump["instances"] = records.instances
            (workdir / "records.json").write_text(json.dumps(dump, indent=1, default=str))
        dead = []
    finally:
        run.stop()
    verdicts = check_all(records) if faults else []
    bill = sum(row["cost"] for row in records.ledger)
    return {
        "seed": seed,
        "tasks": n_tasks,
        "faults": faults,
        "elapsed_s": round(outcome["elapsed"], 1),
        "timed_out": bool(outcome.get("timed_out")),
        "bill": bill,
        "finals": final_instances(records.ledger, records.ids),
        "instances": len(records.ledger),
        "injected": run.injected,
        "untriggered": run.untriggered,
        "fault_counts": plan.fault_counts(),
        "fired": fired,
        "verdicts": [v.__dict__ for v in verdicts],
        "holds": (not outcome.get("timed_out")) and all(v.holds for v in verdicts) and not dead,
    }


def _verdicts(result: dict) -> list[Verdict]:
    return [Verdict(**v) for v in result["verdicts"]]


def run_seed(
    seed: int, n_tasks: int, *, quick: bool, baseline: bool, timeout: float, say, keep=None
) -> dict:
    def workdir(name: str) -> Path | None:
        if keep is None:
            return None
        path = Path(keep) / f"seed{seed}-{n_tasks}-{name}"
        shutil.rmtree(path, ignore_errors=True)
        path.mkdir(parents=True)
        return path

    base = None
    if baseline:
        base = run_once(
            seed,
            n_tasks,
            quick=quick,
            faults=False,
            timeout=timeout,
            say=say,
            workdir=workdir("baseline"),
        )
    result = run_once(
        seed,
        n_tasks,
        quick=quick,
        timeout=timeout,
        baseline=base,
        say=say,
        workdir=workdir("chaos"),
    )
    result["baseline"] = base and {k: base[k] for k in ("bill", "elapsed_s", "instances")}
    result.pop("finals", None)  # the ledger rows were for the comparison only
    return result


# ---------------------------------------------------------------------- the report


def markdown(results: list[dict], command: str, info: dict) -> str:
    """RELIABILITY.md's generated part; `info`: the machine and commit, taken at the start."""
    out = [
        "# Reliability",
        "",
        "What the chaos suite (`benchmarks/chaos.py`) proves, run after run: the agent as real",
        "processes (two Celery workers, a beat and at times a second one, a private Redis with",
        "AOF) against the local stack with its realistic defaults (log delays, read lag, image",
        "pulls, rate limits, create penalty), with faults injected on a schedule drawn from",
        "the seed. Every figure is computed from the simulators' records (Arkindex task",
        "histories and published logs, the Vast.ai ledger and event timeline) and from what",
        "the harness collected outside the agent (its log files, broker messages sampled",
        "every 2 s, Flower's pages, the Sentry events a loopback sink received).",
        "",
        f"Command: `{command}`",
        "",
        f"Machine: {info['nproc']} CPUs, {info['mem_gib']} GiB, Python {info['python']}, "
        f"commit {info['commit']}; "
        f"Vast.ai simulator at x{TIME_SCALE:g}, sync every {SYNC_INTERVAL:g} s, pre-signed "
        f"URLs living {URL_LIFETIME:g} s.",
        "",
        "## Runs",
        "",
        "| seed | tasks | time (s) | instances | bill | every invariant |",
        "|---|---|---|---|---|---|",
    ]
    for r in results:
        out.append(
            f"| {r['seed']} | {r['tasks']} | {r['elapsed_s']} | {r['instances']} | "
            f"${r['bill']:.4f} | {'holds' if r['holds'] else '**broken**'} |"
        )
    out += ["", "## Invariants, per run", ""]
    names = [v["name"] for v in results[0]["verdicts"]] if results else []
    out.append(
        "| invariant | " + " | ".join(f"seed {r['seed']} ({r['tasks']})" for r in results) + " |"
    )
    out.append("|---" * (len(results) + 1) + "|")
    for index, name in enumerate(names):
        cells = []
        for r in results:
            v = r["verdicts"][index]
            cells.append(("" if v["holds"] else "**broken**: ") + v["figure"])
        out.append(f"| {name} | " + " | ".join(cells) + " |")
    out += ["", "## Faults injected, per run", ""]
    kinds = sorted({k for r in results for k in r["fault_counts"]})
    out.append(
        "| fault | " + " | ".join(f"seed {r['seed']} ({r['tasks']})" for r in results) + " |"
    )
    out.append("|---" * (len(results) + 1) + "|")
    for kind in kinds:
        out.append(
            f"| {kind} | " + " | ".join(str(r["fault_counts"].get(kind, 0)) for r in results) + " |"
        )
    seen = [
        ("aimed Vast.ai faults that never fired", lambda f: len(f["aimed_unfired"])),
        ("Vast.ai answers 429 (injected and earned)", lambda f: f["vast_rate_limited"]),
        ("S3: expired pre-signed URLs refused", lambda f: f["s3_expired_urls_refused"]),
        ("S3: requests refused while down", lambda f: f["s3_refused_while_down"]),
        ("Arkindex: faulty answers", lambda f: sum(f["arkindex_fault_hits"].values())),
    ]
    for label, figure in seen:
        out.append(f"| *{label}* | " + " | ".join(str(figure(r["fired"])) for r in results) + " |")
    for r in results:
        problems = [p for v in r["verdicts"] for p in v["problems"]]
        if problems or r["untriggered"] or r["fired"]["aimed_unfired"]:
            out += ["", f"### Seed {r['seed']} ({r['tasks']} tasks): notes", ""]
            out += [f"- {p}" for p in problems]
            out += [f"- injection not triggered: {u}" for u in r["untriggered"]]
        if r["fired"]["aimed_unfired"]:
            out += ["", f"Seed {r['seed']} ({r['tasks']} tasks), aimed faults that never fired:"]
            out += [f"- {line}" for line in r["fired"]["aimed_unfired"]]
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=1)
    parser.add_argument("--seeds", help="comma-separated seeds (overrides --seed)")
    parser.add_argument("--tasks", type=int, default=60)
    parser.add_argument("--big", type=int, default=0, help="one more run of this many tasks")
    parser.add_argument("--quick", action="store_true", help="12 tasks, fewer faults, no baseline")
    parser.add_argument("--no-baseline", action="store_true", help="skip the fault-free run")
    parser.add_argument("--timeout", type=float, default=1200, help="seconds per run")
    parser.add_argument("--json", action="store_true", help="print the results as JSON")
    parser.add_argument(
        "--keep", type=Path, help="keep each run's files (agent logs, records.json) under DIR"
    )
    parser.add_argument("--write", action="store_true", help="write RELIABILITY.md")
    args = parser.parse_args(argv)
    if shutil.which("redis-server") is None:
        print("redis-server is not installed (apt-get install redis-server)", file=sys.stderr)
        return 2
    say = (lambda line: print(line, file=sys.stderr, flush=True)) if args.json else print
    seeds = [int(s) for s in args.seeds.split(",")] if args.seeds else [args.seed]
    n_tasks = 12 if args.quick else args.tasks
    baseline = not (args.quick or args.no_baseline)
    results = []
    info = machine()  # the commit measured is the one the runs start from
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    for seed in seeds:
        results.append(
            run_seed(
                seed,
                n_tasks,
                quick=args.quick,
                baseline=baseline,
                timeout=args.timeout,
                say=say,
                keep=args.keep,
            )
        )
    if args.big:
        results.append(
            run_seed(
                seeds[0],
                args.big,
                quick=False,
                baseline=baseline,
                timeout=args.timeout * 2,
                say=say,
                keep=args.keep,
            )
        )
    for r in results:
        for v in _verdicts(r):
            say(
                f"seed {r['seed']} ({r['tasks']}): {'ok ' if v.holds else 'BROKEN'} {v.name}: {v.figure}"
            )
            for problem in v.problems:
                say(f"    {problem}")
    if args.json:
        print(json.dumps(results, indent=2))
    if args.write:
        # The hand-written part (the bugs the suite found, each with its regression test)
        # is kept from the file as it was.
        kept = ""
        if REPORT.exists() and FINDINGS in REPORT.read_text():
            kept = REPORT.read_text()[REPORT.read_text().index(FINDINGS) :]
        REPORT.write_text(markdown(results, command_line(), info) + ("\n" + kept if kept else ""))
        say(f"written {REPORT}")
    return 0 if all(r["holds"] for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
