"""Start and stop the agent's processes (Celery worker(s), beat, Flower) like the Procfile.

Used by `ponos-vast run` (ponos_tasks/run.py) and, through ponos_tasks.simulators.harness,
by the demo, the benchmarks and the end-to-end tests, so that what is tested is what users
run: the same commands as the Procfile, as real processes.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from ponos_tasks.models import QUEUES as _QUEUES

QUEUES = ",".join(_QUEUES)


def celery_command(*args: str) -> list[str]:
    return [sys.executable, "-m", "celery", "-A", "ponos_tasks.app", *args]


def worker_command(concurrency: int = 4, name: str = "worker1") -> list[str]:
    return celery_command(
        "worker",
        "--queues",
        QUEUES,
        "--concurrency",
        str(concurrency),
        "--prefetch-multiplier",
        "1",
        "--loglevel",
        "INFO",
        "--hostname",
        f"{name}@%h",
    )


def beat_command(schedule_file: Path) -> list[str]:
    return celery_command("beat", "--loglevel", "INFO", "--schedule", str(schedule_file))


# Flower's task list shows each Celery task's name and uuid by default; with the arguments
# (the Arkindex task id, ids only: never a secret) a person sees which task each step is for.
# The Procfile and docker-compose.yml pass the same option (tests/test_deploy.py).
FLOWER_TASK_COLUMNS = "--tasks_columns=name,args,kwargs,state,received,runtime,worker"


def flower_command(port: int, address: str = "127.0.0.1") -> list[str]:
    return celery_command("flower", f"--address={address}", f"--port={port}", FLOWER_TASK_COLUMNS)


# ---------------------------------------------------------------------- Flower's credentials

# Flower can show every task and (unless read-only) revoke tasks and shut workers down, and a
# loopback port is reachable by every local user: it never starts without basic auth. The
# operator's FLOWER_BASIC_AUTH when set (the Procfile's and compose's variable), else a
# password generated for this run.
FLOWER_AUTH_VARIABLE = "FLOWER_BASIC_AUTH"
# Flower 2.x serves its /api/* without auth when this is set: never passed on.
FLOWER_OPEN_API_VARIABLE = "FLOWER_UNAUTHENTICATED_API"
FLOWER_USER = "ponos"
FLOWER_CREDENTIALS_FILE = "flower-credentials"


class FlowerAuthError(ValueError):
    """FLOWER_BASIC_AUTH is set but is not `user:password[,user2:password2]`."""


def parse_basic_auth(value: str) -> list[str]:
    """The user names of a FLOWER_BASIC_AUTH value; FlowerAuthError when malformed (the
    message never quotes the value: it holds passwords)."""
    users = []
    for index, entry in enumerate(value.split(","), start=1):
        user, sep, password = entry.partition(":")
        if not (sep and user.strip() and password):
            raise FlowerAuthError(
                f"{FLOWER_AUTH_VARIABLE}: entry {index} is not user:password "
                f"(expected user:password[,user2:password2])"
            )
        users.append(user)
    return users


@dataclass(frozen=True)
class FlowerAccess:
    """How Flower is reached: `basic_auth` goes to Flower's environment only (never its
    command line, which `ps` shows); `credentials_file` is set when the password was
    generated for this run."""

    port: int
    basic_auth: str = field(repr=False)
    users: tuple[str, ...]
    credentials_file: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/"

    def notice(self) -> str:
        """One line for stderr: where Flower is and how to log in (never the password)."""
        if self.credentials_file is None:
            return (
                f"Flower: {self.url} (basic auth from {FLOWER_AUTH_VARIABLE}, "
                f"user {', '.join(self.users)})"
            )
        return (
            f"Flower: {self.url} (user {FLOWER_USER}; password generated for this run, in "
            f"{self.credentials_file} as user:password, readable by you only; set "
            f"{FLOWER_AUTH_VARIABLE}=user:password to choose your own)"
        )


def write_private_file(path: Path, text: str) -> None:
    """Write `text` to `path`, readable and writable by the owner only (0600) from the first
    byte: created under a temporary name with that mode, then renamed over any older file
    (whose mode may have been wider)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        os.fchmod(fd, 0o600)  # whatever the umask
        os.write(fd, text.encode())
    finally:
        os.close(fd)
    os.replace(tmp, path)


def flower_access(port: int, environ: dict[str, str], log_dir: Path) -> FlowerAccess:
    """Flower's credentials for this run: FLOWER_BASIC_AUTH from `environ` when set (an empty
    value counts as unset), else user `ponos` and a random password written to
    `log_dir/flower-credentials` (0600)."""
    given = environ.get(FLOWER_AUTH_VARIABLE, "")
    if given:
        return FlowerAccess(port, given, tuple(parse_basic_auth(given)))
    basic_auth = f"{FLOWER_USER}:{secrets.token_urlsafe(24)}"
    path = log_dir / FLOWER_CREDENTIALS_FILE
    write_private_file(path, basic_auth + "\n")
    return FlowerAccess(port, basic_auth, (FLOWER_USER,), path)


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, sig)


# Restart backoff of `supervise()`: the first restart of a process that died comes after
# RESTART_DELAY seconds, each further one waits twice as long, up to RESTART_DELAY_MAX; a
# process that then stays up RESTART_RESET seconds starts again from RESTART_DELAY. (A worker
# that dies on every start, e.g. a Redis that stays unreachable, is retried once a minute
# instead of in a tight loop.)
RESTART_DELAY = 1.0
RESTART_DELAY_MAX = 60.0
RESTART_RESET = 120.0


@dataclass
class _Restarts:
    command: list[str]
    started_at: float = 0.0
    failures: int = 0  # consecutive deaths without RESTART_RESET seconds of uptime
    due_at: float | None = None  # when a dead process is started again


@dataclass
class AgentProcesses:
    """The agent's processes for one configuration file; logs go to `log_dir`.

    `supervise()` restarts the ones that died (with backoff), like a platform's process
    manager; the tests and the demo use `check_alive()` instead, to see any death."""

    config_path: Path
    log_dir: Path
    redis_url: str
    workers: int = 1
    concurrency: int = 4
    beats: int = 1
    flower_port: int | None = None
    extra_env: dict = field(default_factory=dict)
    processes: dict[str, subprocess.Popen] = field(default_factory=dict)
    restarts: dict[str, _Restarts] = field(default_factory=dict)
    flower: FlowerAccess | None = None  # set by setup_flower() (start() calls it)

    def _base_env(self) -> dict[str, str]:
        env = dict(os.environ)
        env.update(self.extra_env)
        return env

    def env(self, name: str = "") -> dict[str, str]:
        """The environment of process `name`. Flower's credentials reach Flower only, and
        FLOWER_UNAUTHENTICATED_API nobody."""
        env = self._base_env()
        env["PONOS_CONFIG"] = str(self.config_path)
        env["REDIS_URL"] = self.redis_url
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.pop(FLOWER_AUTH_VARIABLE, None)
        env.pop(FLOWER_OPEN_API_VARIABLE, None)
        if name == "flower" and self.flower is not None:
            env[FLOWER_AUTH_VARIABLE] = self.flower.basic_auth
        return env

    def setup_flower(self) -> FlowerAccess | None:
        """Flower's credentials (see flower_access), once per run, so that a restarted
        Flower keeps them; None without flower_port. Raises FlowerAuthError."""
        if self.flower_port and self.flower is None:
            self.flower = flower_access(self.flower_port, self._base_env(), self.log_dir)
        return self.flower

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        log = open(self.log_dir / f"{name}.log", "ab")  # noqa: SIM115 (owned by the child)
        process = subprocess.Popen(
            command,
            env=self.env(name),
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
        log.close()
        self.processes[name] = process
        restarts = self.restarts.setdefault(name, _Restarts(command))
        restarts.command, restarts.started_at, restarts.due_at = command, time.monotonic(), None
        return process

    def start_worker(self, index: int) -> subprocess.Popen:
        return self._spawn(f"worker{index}", worker_command(self.concurrency, f"worker{index}"))

    def start_beat(self, index: int) -> subprocess.Popen:
        return self._spawn(f"beat{index}", beat_command(self.log_dir / f"beat{index}-schedule"))

    def start(self) -> AgentProcesses:
        self.setup_flower()  # first: a malformed FLOWER_BASIC_AUTH starts nothing
        for index in range(1, self.workers + 1):
            self.start_worker(index)
        for index in range(1, self.beats + 1):
            self.start_beat(index)
        if self.flower_port:
            self._spawn("flower", flower_command(self.flower_port))
        return self

    def check_alive(self) -> list[str]:
        """Names of the processes that exited (with their status)."""
        return [
            f"{name} (exit {p.returncode})"
            for name, p in self.processes.items()
            if p.poll() is not None
        ]

    def supervise(self, now: float | None = None) -> list[str]:
        """Restart the processes that exited, each after its backoff delay; returns what
        was done, one line per event (to be shown: a restart is never silent)."""
        now = time.monotonic() if now is None else now
        events = []
        for name, process in list(self.processes.items()):
            status = process.poll()
            if status is None:
                continue
            restarts = self.restarts[name]
            if restarts.due_at is None:
                # Just seen dead: sweep what is left of its session (pool children), then
                # schedule the restart.
                _signal_group(process, signal.SIGKILL)
                if now - restarts.started_at >= RESTART_RESET:
                    restarts.failures = 0
                delay = min(RESTART_DELAY * 2**restarts.failures, RESTART_DELAY_MAX)
                restarts.failures += 1
                restarts.due_at = now + delay
                events.append(
                    f"{name} exited with status {status}; restarting it in {delay:g} s "
                    f"(restart {restarts.failures} in a row; log: {self.log_dir / name}.log)"
                )
            elif now >= restarts.due_at:
                self._spawn(name, restarts.command)
                events.append(f"{name} restarted (pid {self.processes[name].pid})")
        return events

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal a process and its children (its whole session: Celery's pool too)."""
        process = self.processes[name]
        _signal_group(process, sig)
        process.wait(timeout=30)

    # After stop()'s timeout, how long a process whose pool was stopped gets to exit.
    POOL_STOP_GRACE = 10.0

    def stop(self, timeout: float = 30.0) -> None:
        """Stop every process: warm first, then the pool, then SIGKILL.

        1. SIGTERM to each main process only. Celery's pool children take SIGTERM's default
           action (celery.concurrency.prefork resets it), so a group-wide SIGTERM killed the
           steps they ran mid-call; the main process's warm shutdown lets them finish.
           `timeout` (30 s) is above worker_soft_shutdown_timeout (25 s), so that with
           REMAP_SIGTERM=SIGQUIT Celery's own soft shutdown ends first.
        2. Past `timeout`, SIGTERM to the process groups: the pool children die, and the main
           process marks their steps lost (back to their queue) and gives its unacknowledged
           messages back to the broker as it exits, instead of leaving them stranded until
           the visibility timeout (an hour) as a SIGKILL would.
        3. POOL_STOP_GRACE later, SIGKILL to every group (what is left of any session)."""
        for process in self.processes.values():
            if process.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    process.send_signal(signal.SIGTERM)
        late = self._wait_all(timeout)
        if late:
            for process in late:
                _signal_group(process, signal.SIGTERM)
            for process in self._wait_all(self.POOL_STOP_GRACE):
                _signal_group(process, signal.SIGKILL)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    process.wait(timeout=10)
        # Children of a killed main process (pool workers) share its session: sweep it.
        for process in self.processes.values():
            _signal_group(process, signal.SIGKILL)
        # A generated password is good for this run only: no stale secret left behind.
        if self.flower is not None and self.flower.credentials_file is not None:
            with contextlib.suppress(FileNotFoundError):
                self.flower.credentials_file.unlink()

    def _wait_all(self, timeout: float) -> list[subprocess.Popen]:
        """Wait up to `timeout` s in all for every process to exit; those still running."""
        deadline = time.monotonic() + timeout
        late = []
        for process in self.processes.values():
            try:
                process.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                late.append(process)
        return late

    def __enter__(self) -> AgentProcesses:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
