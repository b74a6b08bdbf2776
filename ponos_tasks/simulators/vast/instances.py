"""Instances: Vast.ai's four status fields (docs/reference.md §1.4) on simulated time.

State advances lazily: each instance keeps timers (sim time, run number, action) that are
applied in order whenever the simulator looks at it (every request, and a background ticker).
A run number invalidates the timers of a run that was stopped or replaced.
Billing accrues between transitions: GPU while `running` (and the host online), storage
from create to destroy except while offline (as Vast.ai bills, docs/reference.md §1.4).

An instance lives as its command does (docs/reference.md §1.5). A scripted instance's
"command" is its SIM_* knobs: without SIM_DURATION it runs until it is stopped or destroyed;
with it, the command ends after that many simulated seconds and the container shows
`exited` with `intended_status` still `running` (and Vast.ai restarts it after
`restart_delay`), unless SIM_SELF_STOP=true: then the command, like the agent's wrapper or
base-worker, calls stop on its own instance. Only that call, a user's stop, an outbid or a
failed start set `intended_status` to `stopped`.

Per-instance knobs, read from the instance's env (strings, simulated seconds):

| knob | default | meaning |
|---|---|---|
| SIM_DURATION | unset: forever | seconds the scripted command runs |
| SIM_LOG_LINES | 5 | lines it prints (spread over SIM_DURATION, else one per 10 s) |
| SIM_EXIT_CODE | 0 | its exit code |
| SIM_FINAL_LINES | "" | lines printed when it ends |
| SIM_SELF_STOP | false | it stops its own instance when it ends |
| SIM_PULL_SECONDS | unset: images.py's model | fixed loading time (still with progress) |
| SIM_IMAGE_SIZE_GB | per-image default | size of the image for the pull model |
| SIM_RUN_MODE | the simulator's | scripted, or local (the command runs for real) |
"""

import heapq
import itertools
import os
import random
import re
import secrets
from dataclasses import dataclass, field

from ponos_tasks.simulators.vast import images as pulls
from ponos_tasks.simulators.vast.localrun import LocalProcess

PROVISION_SECONDS = 2.0  # null -> created
CREATED_SECONDS = 2.0  # created -> loading
# exited (intent running) -> loading again. Vast.ai restarts a container whose command ended
# (docs/reference.md §1.4: "Vast may restart it"); it publishes no delay. Docker's restart
# policy doubles its delay at each restart in a row: so do we, from 20 s up to 5 minutes.
RESTART_DELAY = 20.0
RESTART_DELAY_MAX = 300.0
# A stop is a request the host's daemon carries out: the API answers at once, the container
# receives its SIGTERM some seconds later (inferred; observed as a lag of a few seconds
# between the call and `actual_status` leaving `running`). Drawn uniformly, simulated s.
STOP_DELAY = (2.0, 8.0)
# A new instance is missing from show/list for up to this long after its create answered
# (reads come from a replica that lags the write; observed by SkyPilot, whose provisioner
# retries a read-only visibility check so that a slow show never causes a second create).
READ_LAG = 5.0
SCRIPTED_LINE_SPACING = 10.0  # seconds between scripted log lines when the command never ends
STOP_SIGNAL_DELAY = 0.2  # real seconds between a stop/destroy and SIGTERM to a local process
OCI_MESSAGE = (
    "Error response from daemon: failed to create task for container: failed to "
    "create shim task: OCI runtime create failed: runc create failed: unable to "
    "start container process: error during container init: nvidia-container-cli: "
    "initialization error: nvml error: driver/library version mismatch: unknown"
)
PORT_CONFLICT_MESSAGE = (
    "Error response from daemon: driver failed programming external "
    "connectivity on endpoint: Bind for 0.0.0.0:22 failed: port is "
    "already allocated"
)


def _env_float(env: dict, name: str, default: float | None) -> float | None:
    raw = env.get(name)
    if raw in (None, ""):
        return default
    try:
        return float(raw)
    except (TypeError, ValueError):
        return default


@dataclass
class Instance:
    id: int
    label: str | None
    machine_id: int
    offer_id: int
    num_gpus: int
    offer_row: dict  # the offer as rented (hardware and pricing fields)
    image: str
    env: dict
    onstart: str | None
    args: list | None
    runtype: str
    disk: float
    gpu_dph: float  # $/h for the GPUs (dph_base, or the bid price)
    storage_dph: float  # $/h for the disk
    is_bid: bool
    api_key: str
    run_mode: str
    created_at: float
    faults: dict = field(default_factory=dict)  # lifecycle fault name -> rule
    doomed_msg: str | None = None  # never starts (double rent)
    actual_status: str | None = None
    intended_status: str = "running"
    cur_state: str = "running"
    next_state: str = "running"
    status_msg: str = ""  # always a string, as clients read it
    offline: bool = False
    visible_at: float = 0.0  # show/list include it from then on (read lag)
    pull: dict | None = None  # the pull in progress: phases (images.plan), start, stall
    restarts_in_row: int = 0
    resume_at: float | None = None  # an outbid instance comes back then (outbid fault)
    destroyed_at: float | None = None
    timers: list = field(default_factory=list)
    run_seq: int = 0
    runs: int = 0
    log: list = field(default_factory=list)  # (sim t, line)
    proc: LocalProcess | None = None
    dying: list = field(default_factory=list)  # killed processes whose output still counts
    exit_code: int | None = None
    running_since: float | None = None
    gpu_seconds: float = 0.0
    storage_seconds: float = 0.0
    last_accrual: float = 0.0

    @property
    def live(self) -> bool:
        return self.destroyed_at is None

    @property
    def dph_total(self) -> float:
        return self.gpu_dph + self.storage_dph

    def knobs(self) -> dict:
        env = self.env
        return {
            "duration": _env_float(env, "SIM_DURATION", None),
            "log_lines": int(_env_float(env, "SIM_LOG_LINES", 5)),
            "exit_code": int(_env_float(env, "SIM_EXIT_CODE", 0)),
            "final_lines": str(env.get("SIM_FINAL_LINES", "")),
            "self_stop": str(env.get("SIM_SELF_STOP", "false")).lower() in ("true", "1", "yes"),
            "pull_seconds": _env_float(env, "SIM_PULL_SECONDS", None),
        }

    def log_lines(self, now: float) -> list[str]:
        lines = [entry for entry in self.log if entry[0] <= now]
        for proc in ([self.proc] if self.proc is not None else []) + self.dying:
            lines += proc.lines()
        return [text for _, text in sorted(lines, key=lambda entry: entry[0])]


# A scripted instance plays an image run under ponos-vast's exit-code wrapper: a bare marker
# line `PONOS_EXIT_CODE=<n>` in SIM_FINAL_LINES stands for the one that wrapper prints, which
# ends with a nonce its first-stage script holds in a here-document (`<<'E'`, nonce, `E`).
# As `sh` would, the simulator reads the nonce from the instance's args (no agent import).
_HEREDOC_NONCE = re.compile(r"<<'E'\n([A-Za-z0-9_-]{1,64})\nE\n")
_BARE_MARKER = re.compile(r"PONOS_EXIT_CODE=\d+")


def wrapper_line(line: str, args) -> str:
    """`line` as the wrapper prints it: a bare marker gets the wrapper's nonce, if any."""
    if not _BARE_MARKER.fullmatch(line):
        return line
    for arg in args or ():
        found = _HEREDOC_NONCE.search(str(arg))
        if found:
            return f"{line} {found.group(1)}"
    return line


class Fleet:
    """All instances ever created, their transitions, billing and event timeline."""

    def __init__(
        self,
        clock,
        market,
        *,
        url_getter,
        run_mode="scripted",
        on_event=None,
        rng=None,
        images=None,
        read_lag=READ_LAG,
        stop_delay=STOP_DELAY,
        restart_delay=RESTART_DELAY,
    ):
        self.clock = clock
        self.market = market
        self.rng = rng or random.Random(0)
        self.images = images or pulls.Images()
        self.read_lag = float(read_lag)
        self.stop_delay = tuple(stop_delay)
        self.restart_delay = float(restart_delay)
        self.url_getter = url_getter
        self.run_mode = run_mode
        self.on_event = on_event or (lambda event: None)
        self.instances: dict[int, Instance] = {}
        self._ids = itertools.count(30_000_000 + market.rng.randrange(1_000_000))
        self._timer_order = itertools.count()

    # -- timers and events ---------------------------------------------------------------
    def _schedule(self, inst: Instance, t: float, action: str, run: bool = True) -> None:
        seq = inst.run_seq if run else None
        heapq.heappush(inst.timers, (t, next(self._timer_order), seq, action))

    def _set(self, inst: Instance, t: float, **fields) -> None:
        before = (inst.actual_status, inst.intended_status, inst.cur_state, inst.next_state)
        self._accrue(inst, t)
        for key, value in fields.items():
            setattr(inst, key, value)
        after = (inst.actual_status, inst.intended_status, inst.cur_state, inst.next_state)
        if after != before:
            self.on_event(
                {
                    "t": round(t, 3),
                    "event": "status",
                    **self._identity(inst),
                    "actual_status": self.actual(inst),
                    "intended_status": inst.intended_status,
                    "cur_state": inst.cur_state,
                    "next_state": inst.next_state,
                    "status_msg": inst.status_msg,
                }
            )

    @staticmethod
    def _identity(inst: Instance) -> dict:
        return {"instance_id": inst.id, "label": inst.label, "machine_id": inst.machine_id}

    def _accrue(self, inst: Instance, t: float) -> None:
        dt = max(0.0, t - inst.last_accrual)
        if inst.live and not inst.offline:
            inst.storage_seconds += dt
            if inst.actual_status == "running":
                inst.gpu_seconds += dt
        inst.last_accrual = max(inst.last_accrual, t)

    @staticmethod
    def actual(inst: Instance) -> str | None:
        """Offline is computed at query time over the stored status, which it hides until the
        host is back (as on Vast.ai)."""
        return "offline" if inst.offline else inst.actual_status

    # -- creation ------------------------------------------------------------------------
    def create(
        self,
        *,
        offer_row: dict,
        machine_id: int,
        offer_id: int,
        body: dict,
        env: dict,
        now: float,
        faults: dict,
        doomed: bool,
        start_stopped: bool,
        price: float | None,
    ) -> Instance:
        run_mode = str(env.get("SIM_RUN_MODE", self.run_mode))
        disk = float(body.get("disk") or 10)
        gpu_dph = float(price) if price is not None else float(offer_row["dph_base"])
        inst = Instance(
            id=next(self._ids),
            label=body.get("label"),
            machine_id=machine_id,
            offer_id=offer_id,
            num_gpus=offer_row["num_gpus"],
            offer_row=offer_row,
            image=body.get("image") or "vastai/base-image:@vastai-automatic-tag",
            env=env,
            onstart=body.get("onstart"),
            args=body.get("args"),
            runtype=body.get("runtype") or ("args" if body.get("args") is not None else "ssh"),
            disk=disk,
            gpu_dph=gpu_dph,
            storage_dph=float(offer_row["storage_cost"]) * disk / 720.0,
            is_bid=price is not None,
            api_key=secrets.token_hex(32),
            run_mode=run_mode if run_mode in ("scripted", "local") else "scripted",
            created_at=now,
            faults=faults,
            last_accrual=now,
            doomed_msg=PORT_CONFLICT_MESSAGE if doomed else None,
            visible_at=now + self.rng.uniform(0.0, self.read_lag),
        )
        if "read_lag" in faults:
            inst.visible_at = now + float(faults["read_lag"].get("seconds", READ_LAG))
        self.instances[inst.id] = inst
        self.on_event(
            {
                "t": round(now, 3),
                "event": "created",
                **self._identity(inst),
                "actual_status": None,
                "offer_id": offer_id,
            }
        )
        if start_stopped:
            self._set(
                inst,
                now,
                intended_status="stopped",
                cur_state="stopped",
                next_state="stopped",
                actual_status="stopped",
                status_msg="Instance created stopped: required resources unavailable",
            )
        else:
            self._schedule(inst, now + PROVISION_SECONDS, "created")
        offline = faults.get("offline")
        if offline is not None:
            start = now + float(offline.get("after", 10.0))
            self._schedule(inst, start, "offline_on", run=False)
            if offline.get("duration") is not None:
                self._schedule(inst, start + float(offline["duration"]), "offline_off", run=False)
        return inst

    # -- advancing -----------------------------------------------------------------------
    def advance(self, inst: Instance, now: float) -> None:
        while inst.live and inst.timers and inst.timers[0][0] <= now:
            t, _, seq, action = heapq.heappop(inst.timers)
            if seq is not None and seq != inst.run_seq:
                continue
            getattr(self, f"_on_{action}")(inst, t)
        if inst.live and inst.proc is not None and inst.proc.finished():
            self._process_ended(inst, now)
        if inst.live:
            self._refresh_pull(inst, now)
        for proc in [p for p in inst.dying if p.finished()]:
            inst.dying.remove(proc)
            inst.log.extend(proc.lines())
        self._accrue(inst, now)

    def _on_created(self, inst: Instance, t: float) -> None:
        if "oci_failure" in inst.faults:
            # Abandoned start as observed on Vast: created + OCI error, everything stopped.
            self._set(
                inst,
                t,
                actual_status="created",
                status_msg=OCI_MESSAGE,
                intended_status="stopped",
                cur_state="stopped",
                next_state="stopped",
            )
            return
        if inst.doomed_msg:
            self._set(inst, t, actual_status="created", status_msg=inst.doomed_msg)
            return
        self._set(inst, t, actual_status="created", status_msg="")
        self._schedule(inst, t + CREATED_SECONDS, "loading")

    def _on_loading(self, inst: Instance, t: float) -> None:
        self._set(inst, t, actual_status="loading", status_msg=f"Pulling image {inst.image}")
        self._schedule_outbid(inst, t, "loading")
        if "stuck_loading" in inst.faults:
            inst.pull = None
            return
        cached = self.images.cached(inst.machine_id, inst.image)
        size = self.images.size_gb(inst.image, inst.env)
        plan = pulls.plan(size, float(inst.offer_row.get("inet_down") or 100.0), cached, self.rng)
        fixed = inst.knobs()["pull_seconds"]
        if fixed is not None:
            # SIM_PULL_SECONDS: the same phases, rescaled to that total.
            total = sum(plan[k] for k in ("download", "extract", "create")) or 1.0
            for key in ("download", "extract", "create"):
                plan[key] *= fixed / total
        plan.update(start=t, stall_at=None, stall_for=0.0)
        stall = inst.faults.pop("pull_stall", None)  # one stall: the first pull only
        if stall is not None:
            work = plan["download"] + plan["extract"] or plan["create"]
            plan["stall_at"] = float(stall.get("at", 0.3)) * work
            duration = stall.get("duration")
            plan["stall_for"] = float("inf") if duration is None else float(duration)
        inst.pull = plan
        total = plan["download"] + plan["extract"] + plan["create"] + plan["stall_for"]
        if total != float("inf"):
            self._schedule(inst, t + total, "running")

    def _pull_elapsed(self, pull: dict, now: float) -> float:
        """Seconds of progress made, a stall counting for none."""
        elapsed = now - pull["start"]
        stall_at = pull["stall_at"]
        if stall_at is None or elapsed < stall_at:
            return elapsed
        return max(stall_at, elapsed - pull["stall_for"])

    def _refresh_pull(self, inst: Instance, now: float) -> None:
        if inst.actual_status != "loading" or inst.pull is None:
            return
        # Not an event: progress changes every read, as docker pull's output does.
        inst.status_msg = pulls.progress_message(
            inst.image, inst.pull, self._pull_elapsed(inst.pull, now)
        )

    def _on_running(self, inst: Instance, t: float) -> None:
        inst.pull = None
        self.images.remember(inst.machine_id, inst.image)
        inst.runs += 1
        inst.exit_code = None
        inst.running_since = t
        self._set(
            inst,
            t,
            actual_status="running",
            status_msg=f"success, running {inst.image}/{inst.runtype.split()[0]}",
        )
        knobs = inst.knobs()
        if inst.run_mode == "local":
            self._start_process(inst)
        else:
            count, duration = knobs["log_lines"], knobs["duration"]
            for index in range(count):
                at = (
                    t + duration * (index + 1) / (count + 1)
                    if duration is not None
                    else t + SCRIPTED_LINE_SPACING * (index + 1)
                )
                inst.log.append((at, f"sim log line {index + 1}/{count}"))
            if duration is not None:  # without SIM_DURATION the command never ends
                for line in knobs["final_lines"].splitlines():
                    inst.log.append((t + duration, wrapper_line(line, inst.args)))
                self._schedule(inst, t + duration, "run_end")
        down = inst.faults.get("host_down")
        if down is not None:
            self._schedule(inst, t + float(down.get("after", 10.0)), "host_down")
        crash = inst.faults.get("unexpected_exit")
        if crash is not None:
            self._schedule(inst, t + float(crash.get("after", 10.0)), "crash")
        self._schedule_outbid(inst, t, "running")

    def _on_run_end(self, inst: Instance, t: float) -> None:
        knobs = inst.knobs()
        inst.exit_code = knobs["exit_code"]
        if knobs["self_stop"]:
            # What base-worker and the agent's wrapper do at the end of a task: stop their
            # own instance (and wait for it), which sets intended_status to stopped.
            self.stop(inst, t)
        else:
            self._container_exited(inst, t, f"exited with code {inst.exit_code}")

    def _container_exited(
        self, inst: Instance, t: float, message: str, restart: bool = True
    ) -> None:
        inst.run_seq += 1
        inst.running_since = None
        self._set(inst, t, actual_status="exited", status_msg=message)
        if restart and inst.intended_status == "running":
            delay = min(self.restart_delay * 2**inst.restarts_in_row, RESTART_DELAY_MAX)
            inst.restarts_in_row += 1
            self._schedule(inst, t + delay, "restart")

    def _on_restart(self, inst: Instance, t: float) -> None:
        if inst.intended_status == "running" and inst.actual_status == "exited":
            self._on_loading(inst, t)

    def _on_crash(self, inst: Instance, t: float) -> None:
        rule = inst.faults["unexpected_exit"]
        self._kill(inst, t, crash=True)
        inst.exit_code = int(rule.get("exit_code", 137))
        self._container_exited(
            inst, t, f"exited with code {inst.exit_code}", restart=bool(rule.get("restart", False))
        )

    def _schedule_outbid(self, inst: Instance, t: float, phase: str) -> None:
        """The outbid fault strikes once per instance, `after` s into the phase it names
        (`during`: running, the default, or loading)."""
        rule = inst.faults.get("outbid")
        if rule is None or rule.get("during", "running") != phase:
            return
        inst.faults.pop("outbid")
        self._schedule(inst, t + float(rule.get("after", 10.0)), "outbid")
        if rule.get("resume_after") is not None:
            # The higher-priority rental ends: Vast.ai resumes the interruptible instance
            # (docs/reference.md §1.4), its container starts again from the image.
            # Not a run timer: the outbid itself starts a new run.
            inst.resume_at = t + float(rule.get("after", 10.0)) + float(rule["resume_after"])

    def _on_outbid(self, inst: Instance, t: float) -> None:
        self._kill(inst, t)
        inst.run_seq += 1
        inst.running_since = None
        inst.pull = None
        self._set(
            inst,
            t,
            actual_status="stopped",
            intended_status="stopped",
            cur_state="stopped",
            next_state="stopped",
            status_msg="Instance stopped: outbid by a higher priority rental",
        )
        if inst.resume_at is not None:
            self._schedule(inst, max(t, inst.resume_at), "resume", run=False)
            inst.resume_at = None

    def _on_resume(self, inst: Instance, t: float) -> None:
        if inst.intended_status == "stopped" and "outbid" in inst.status_msg:
            self.start(inst, t)  # only an instance still parked by the outbid comes back

    def _on_offline_on(self, inst: Instance, t: float) -> None:
        self._accrue(inst, t)
        inst.offline = True
        self.on_event(
            {
                "t": round(t, 3),
                "event": "status",
                **self._identity(inst),
                "actual_status": "offline",
            }
        )

    def _on_host_down(self, inst: Instance, t: float) -> None:
        """The host went down mid-run (reliability_failures) and stays down: the container
        dies with it, the instance shows `offline` (not billed) until it is destroyed."""
        self._kill(inst, t)
        inst.run_seq += 1
        inst.running_since = None
        self._on_offline_on(inst, t)
        inst.actual_status = "exited"  # hidden by offline; no restart on a host that is down
        inst.status_msg = "host down"

    def _on_offline_off(self, inst: Instance, t: float) -> None:
        self._accrue(inst, t)
        inst.offline = False
        self.on_event(
            {
                "t": round(t, 3),
                "event": "status",
                **self._identity(inst),
                "actual_status": inst.actual_status,
            }
        )

    # -- local processes -----------------------------------------------------------------
    def command(self, inst: Instance) -> list[str]:
        if inst.runtype.split()[0] == "args":
            return ([inst.onstart] if inst.onstart else []) + [str(a) for a in inst.args or []]
        return ["sh", "-c", inst.onstart] if inst.onstart else []

    def _start_process(self, inst: Instance) -> None:
        cmd = self.command(inst)
        if not cmd:
            return  # nothing to run: the container idles until stopped
        env = dict(os.environ)
        env.update({str(k): str(v) for k, v in inst.env.items() if not str(k).startswith("-")})
        env.update(
            {
                "CONTAINER_ID": str(inst.id),
                "CONTAINER_API_KEY": inst.api_key,
                "VAST_URL": self.url_getter(),
            }
        )
        try:
            inst.proc = LocalProcess(cmd, env, self.clock.now)
        except OSError as exc:
            now = self.clock.now()
            inst.log.append((now, f"exec failed: {exc}"))
            self._container_exited(inst, now, f"exec failed: {exc}")

    def _collect(self, inst: Instance) -> None:
        if inst.proc is not None:
            inst.log.extend(inst.proc.lines())
            inst.proc = None

    def _kill(self, inst: Instance, t: float, *, crash: bool = False) -> None:
        if inst.proc is not None:
            if crash:
                inst.proc.crash()
            else:
                inst.proc.kill(delay=STOP_SIGNAL_DELAY)
            inst.dying.append(inst.proc)
            inst.proc = None
        # A stopped run prints nothing more: drop scripted lines not yet printed.
        inst.log = [entry for entry in inst.log if entry[0] <= t]

    def _process_ended(self, inst: Instance, now: float) -> None:
        inst.exit_code = inst.proc.returncode
        self._collect(inst)
        if inst.actual_status == "running":
            self._container_exited(inst, now, f"exited with code {inst.exit_code}")

    # -- API actions ---------------------------------------------------------------------
    def stop(self, inst: Instance, now: float) -> None:
        """The stop request: intended_status changes at once, the container later."""
        if inst.intended_status == "stopped" and inst.cur_state == "stopped":
            return
        self._set(inst, now, intended_status="stopped", next_state="stopped")
        self._schedule(inst, now + self.rng.uniform(*self.stop_delay), "stop_effect", run=False)

    def _on_stop_effect(self, inst: Instance, t: float) -> None:
        if inst.intended_status != "stopped" or inst.cur_state == "stopped":
            return  # started again before the host acted, or already stopped
        self._kill(inst, t)
        inst.run_seq += 1
        inst.running_since = None
        inst.pull = None
        actual = inst.actual_status if inst.actual_status in (None, "created") else "exited"
        self._set(inst, t, cur_state="stopped", next_state="stopped", actual_status=actual)

    def start(self, inst: Instance, now: float) -> None:
        if inst.intended_status == "running" and inst.actual_status not in ("exited", "stopped"):
            return
        if inst.cur_state == "running" and inst.actual_status in ("running", "loading"):
            # A stop the host has not carried out yet: cancelled, the container goes on.
            self._set(inst, now, intended_status="running", next_state="running")
            return
        inst.run_seq += 1
        inst.restarts_in_row = 0
        self._set(inst, now, intended_status="running", cur_state="running", next_state="running")
        if "oci_failure" in inst.faults or inst.doomed_msg or inst.actual_status is None:
            if inst.actual_status is None:
                self._schedule(inst, now + PROVISION_SECONDS, "created")
            return
        self._on_loading(inst, now)

    def destroy(self, inst: Instance, now: float) -> None:
        self._kill(inst, now)
        self._accrue(inst, now)
        inst.run_seq += 1
        inst.timers.clear()
        inst.destroyed_at = now
        inst.cur_state = inst.next_state = "unloaded"
        self.market.release(inst.machine_id, inst.num_gpus)
        self.on_event(
            {
                "t": round(now, 3),
                "event": "destroyed",
                **self._identity(inst),
                "actual_status": inst.actual_status,
            }
        )

    def shutdown(self) -> None:
        for inst in self.instances.values():
            for proc in ([inst.proc] if inst.proc is not None else []) + inst.dying:
                proc.kill(grace=0)
                proc.wait(timeout=2)

    # -- views ---------------------------------------------------------------------------
    def ledger_row(self, inst: Instance) -> dict:
        gpu_cost = inst.gpu_seconds / 3600.0 * inst.gpu_dph
        storage_cost = inst.storage_seconds / 3600.0 * inst.storage_dph
        return {
            "id": inst.id,
            "label": inst.label,
            "machine_id": inst.machine_id,
            "offer_id": inst.offer_id,
            "gpu_name": inst.offer_row["gpu_name"],
            "dph_total": inst.dph_total,
            "is_bid": inst.is_bid,
            "gpu_seconds": inst.gpu_seconds,
            "storage_seconds": inst.storage_seconds,
            "gpu_cost": gpu_cost,
            "storage_cost": storage_cost,
            "cost": gpu_cost + storage_cost,
            "created_at": inst.created_at,
            "destroyed_at": inst.destroyed_at,
        }
