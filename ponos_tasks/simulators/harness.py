"""Driving the local stack from outside: one client of the simulators' admin APIs, and one
local run (a private Redis, the local stack on it, the agent's processes) that stops all.

    with LocalRun(time_scale=40, vast_run_mode="local") as run:   # Redis + stack
        agent = run.start_agent(config=run.agent_config(sync_interval=2))
        ids = run.admin.process("demo", [{"slug": "a", "image": "...", "command": "..."}])
        run.admin.tasks()[ids["a"]]["state"], run.admin.ledger(), run.admin.stats()

Used by `ponos-vast demo`, the benchmarks and the tests (end-to-end fixtures, the steps
harness), so that there is one copy of each admin call. Part of the `sim` extra.

`find_secrets(text, secrets)` and `broker_dump(redis_client)` scan for known secrets where
none may show (logs, Celery messages in Redis, Flower's pages, the metrics page): for
tests/test_secret_places.py and the chaos benchmarks.

Unlike the simulators (independent oracles: they import nothing from the agent), this
module starts the agent's processes, through ponos_tasks.supervisor only: the same
commands as the Procfile.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import html
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterable, Mapping
from pathlib import Path
from urllib.parse import quote, quote_plus

import requests
import yaml

from ponos_tasks.simulators.stack import DEFAULT_REDIS_URL, LocalStack, RedisProcess
from ponos_tasks.supervisor import AgentProcesses

# Variables that would point an agent started here at something else than the local stack
# (the config loader prefers them to the file); they are blanked in the agent's environment
# (an empty value counts as unset).
OVERRIDING_ENV = (
    "PONOS_ARKINDEX_URL",
    "ARKINDEX_URL",
    "PONOS_FARM_ID",
    "PONOS_SEED",
    "PONOS_AGENT_NAME",
    "PONOS_VAST_URL",
    "PONOS_VAST_API_KEY",
    "VAST_API_KEY",
    "PONOS_OFFER_FILTERS",
    "PONOS_REDIS_URL",
    "PONOS_SENTRY_DSN",
    "SENTRY_DSN",
)


# ---------------------------------------------------------------------- admin client


# One single-GPU, verified RTX 3090 machine at $0.25/h: what a benchmark or test rents many
# instances of (add it to the market with its own machine_id).
ONE_GPU_MACHINE = {
    "num_gpus": 1,
    "machine_gpus": 1,
    "gpu_name": "RTX 3090",
    "dph_base": 0.25,
    "verified": True,
    "verification": "verified",
    "external": False,
    "disk_space": 1000.0,
    "reliability": 0.99,
    "reliability2": 0.99,
}


class SimAdmin:
    """The admin APIs (`/_sim/...`, no auth) of the Vast.ai and Arkindex simulators.

    `SimAdmin(stack)` for a started LocalStack, or `SimAdmin(vast_url=..., arkindex_url=...)`.
    Errors raise requests.HTTPError; `timeout` is per request, in seconds.
    """

    def __init__(
        self,
        stack=None,
        *,
        vast_url: str | None = None,
        arkindex_url: str | None = None,
        s3_url: str | None = None,
        timeout: float = 10.0,
    ):
        self.vast_url = vast_url or (stack.vast_url if stack is not None else None)
        self.arkindex_url = arkindex_url or (stack.arkindex_url if stack is not None else None)
        # The S3 server's chaos knobs (s3_* methods), when its URL is known.
        self.s3_url = s3_url or (getattr(stack, "s3_url", None) if stack is not None else None)
        if not self.vast_url or not self.arkindex_url:
            raise ValueError("SimAdmin needs a started stack, or both simulator URLs")
        self.timeout = timeout
        self.http = requests.Session()

    def close(self) -> None:
        self.http.close()

    def __enter__(self) -> SimAdmin:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def _request(self, method: str, url: str, **kwargs) -> requests.Response:
        resp = self.http.request(method, url, timeout=self.timeout, **kwargs)
        resp.raise_for_status()
        return resp

    def _json(self, method: str, url: str, **kwargs):
        resp = self._request(method, url, **kwargs)
        return resp.json() if resp.content else None

    # ------------------------------------------------------------------ Vast.ai

    def vast(self, what: str) -> dict:
        """`GET /_sim/<what>` as returned (e.g. "ledger" with its `total_cost`)."""
        return self._json("GET", f"{self.vast_url}/_sim/{what}")

    def faults(self, *rules: dict) -> None:
        self._json("POST", self.vast_url + "/_sim/faults", json={"rules": list(rules)})

    def clear_faults(self) -> None:
        self._json("DELETE", self.vast_url + "/_sim/faults")

    def ledger(self) -> list[dict]:
        """The billing ledger's rows, one per instance ever created."""
        return self.vast("ledger")["instances"]

    def stats(self) -> dict:
        return self.vast("stats")

    def events(self) -> list[dict]:
        return self.vast("events")["events"]

    def instances(self) -> list[dict]:
        data = self.vast("instances")
        return data["instances"] if isinstance(data, dict) else data

    def offers(self) -> list[dict]:
        data = self.vast("offers")
        return data["offers"] if isinstance(data, dict) else data

    def clear_offers(self) -> None:
        self._json("DELETE", self.vast_url + "/_sim/offers")

    def add_offers(self, offers: list[dict]) -> None:
        self._json("POST", self.vast_url + "/_sim/offers", json={"offers": offers})

    def set_market(self, prices: dict[int, float], *, storage_cost: float = 0.1) -> None:
        """Replace the market by one single-GPU, verified machine per (machine id, $/h), all
        alike but for the price (same line, same reliability): the cheapest has the lowest
        expected bill too, whatever the agent's offer_ranking policy."""
        self.clear_offers()
        self.add_offers(
            [
                {
                    "machine_id": machine_id,
                    "num_gpus": 1,
                    "dph_base": price,
                    "verified": True,
                    "verification": "verified",
                    "vericode": 1,
                    "external": False,
                    "reliability": 0.99,
                    "reliability2": 0.99,
                    "inet_down": 1000.0,
                    "storage_cost": storage_cost,
                    "gpu_name": "RTX 3090",
                    "gpu_ram": 24576,
                    "disk_space": 500.0,
                }
                for machine_id, price in prices.items()
            ]
        )

    # ------------------------------------------------------------------ Arkindex

    def create_process(self, name: str, tasks: list[dict]) -> dict:
        """Create a process (tasks in the admin shape); returns it with its tasks."""
        return self._json(
            "POST", self.arkindex_url + "/_sim/processes", json={"name": name, "tasks": tasks}
        )

    def process(self, name: str, tasks: list[dict]) -> dict[str, str]:
        """Create a process; returns {slug: task id}, in the order of `tasks`."""
        created = self.create_process(name, tasks)
        return {task["slug"]: task["id"] for task in created["tasks"]}

    def one_task(self, **spec) -> str:
        """A process of one task; returns its id. Defaults: slug, image and a command."""
        spec.setdefault("slug", "task")
        spec.setdefault("image", "registry.example/worker:1")
        # With a command the agent never looks the image up in its registry: tests talk to
        # 127.0.0.1 only (the no-command tests pass command=None and a loopback registry).
        spec.setdefault("command", "python -m worker")
        return self.process("test", [spec])[spec["slug"]]

    def tasks(self) -> dict[str, dict]:
        """Every task of the simulator, by id."""
        data = self._json("GET", self.arkindex_url + "/_sim/tasks")
        return {task["id"]: task for task in data["tasks"]}

    def agents(self) -> list[dict]:
        """The agents registered with Arkindex, each with every token it was given."""
        return self._json("GET", self.arkindex_url + "/_sim/agents")["agents"]

    def task(self, task_id: str) -> dict:
        return self._json("GET", f"{self.arkindex_url}/_sim/tasks/{task_id}")

    def task_log(self, task_id: str) -> str | None:
        """The log the agent published for the task, or None when there is none."""
        resp = self.http.get(f"{self.arkindex_url}/_sim/tasks/{task_id}/logs", timeout=self.timeout)
        if resp.status_code == 404:
            return None
        resp.raise_for_status()
        return resp.text

    def stop_task(self, task_id: str) -> dict:
        """What a user's "stop" does in Arkindex."""
        return self._json("POST", f"{self.arkindex_url}/_sim/tasks/{task_id}/stop")

    def accepted_agent_states(self, task_id: str) -> list[str]:
        """The states the agent reported and Arkindex accepted, in order."""
        return [
            h["to"]
            for h in self.task(task_id)["history"]
            if h.get("source") == "agent" and h.get("accepted")
        ]

    def refused_agent_states(self, task_id: str) -> list[str]:
        """States the agent tried to report and Arkindex refused (forbidden transitions)."""
        return [
            h["to"]
            for h in self.task(task_id)["history"]
            if h.get("source") == "agent" and not h.get("accepted")
        ]

    def rows_for(self, task_id: str) -> list[dict]:
        """Ledger rows of every instance whose label names this task."""
        return [row for row in self.ledger() if task_id in (row.get("label") or "")]

    # ------------------------------------------------------------------ S3 (simulators/s3.py)

    def s3_down(self, seconds: float) -> None:
        """Every S3 request gets 503 ServiceUnavailable for `seconds`."""
        self._json("POST", self.s3_url + "/_sim/down", json={"seconds": seconds})

    def s3_up(self) -> None:
        self._json("DELETE", self.s3_url + "/_sim/down")

    def s3_slow(self, seconds: float, times: int = 1) -> None:
        """The next `times` PUTs are stored, then answered `seconds` late."""
        self._json("POST", self.s3_url + "/_sim/slow", json={"seconds": seconds, "times": times})

    def s3_advance_clock(self, seconds: float) -> None:
        """Move the clock pre-signed URLs are checked against (expire them sooner)."""
        self._json("POST", self.s3_url + "/_sim/clock", json={"advance": seconds})

    def s3_stats(self) -> dict:
        """Requests seen and refused (expired, signature, down, other) by the S3 proxy."""
        return self._json("GET", self.s3_url + "/_sim/stats")

    def arkindex_stats(self) -> dict:
        """The Arkindex simulator's request counts: {"calls": {operation: n}, "rate_limited":
        {operation: n}}."""
        return self._json("GET", self.arkindex_url + "/_sim/stats")

    # ------------------------------------------------------------------ Arkindex faults
    # One method per knob of simulators/arkindex/faults.py. `scope`: operation= (an
    # operationId), path= (a regex), task= (a task id), times= (default unlimited).

    def arkindex_faults(self, *rules: dict) -> None:
        self._json("POST", self.arkindex_url + "/_sim/faults", json={"rules": list(rules)})

    def arkindex_fault_state(self) -> dict:
        """{"rules": the active rules, "hits": {fault: how often it fired}}."""
        return self._json("GET", self.arkindex_url + "/_sim/faults")

    def clear_arkindex_faults(self) -> None:
        self._json("DELETE", self.arkindex_url + "/_sim/faults")

    def arkindex_5xx(self, status: int = 500, **scope) -> None:
        self.arkindex_faults({"fault": "http_5xx", "status": status, **scope})

    def arkindex_html_502(self, status: int = 502, **scope) -> None:
        self.arkindex_faults({"fault": "html_502", "status": status, **scope})

    def arkindex_malformed(self, shape: str = "truncated", **scope) -> None:
        """200 answers spoiled: `truncated` JSON or an `html` page."""
        self.arkindex_faults({"fault": "malformed", "shape": shape, **scope})

    def arkindex_slow(self, seconds: float, **scope) -> None:
        self.arkindex_faults({"fault": "slow", "seconds": seconds, **scope})

    def arkindex_rate_limit(self, retry_after: float = 1, **scope) -> None:
        self.arkindex_faults({"fault": "rate_limit", "retry_after": retry_after, **scope})

    def arkindex_delete_task(self, task_id: str, **scope) -> None:
        """The task is gone, as if deleted while it runs (404 on every call naming it)."""
        self.arkindex_faults({"fault": "task_deleted", "task": task_id, **scope})

    def arkindex_expire_token(self, **scope) -> None:
        """The access token of the next matching agent call expires (401 from then on)."""
        self.arkindex_faults({"fault": "token_expired", **scope})

    def arkindex_stale_bearer_refresh(self, **scope) -> None:
        """RefreshAgentToken refuses a request carrying an expired Bearer (401)."""
        self.arkindex_faults({"fault": "stale_bearer_refresh", **scope})


# ---------------------------------------------------------------------- local run


class LocalRun:
    """A private Redis, the local stack on it, and the agent's processes.

    `redis`: "private" (a `redis-server` of its own, needed; with AOF if `redis_appendonly`), "private-or-env" (one of its own
    when `redis-server` is installed, else $REDIS_URL, else redis://127.0.0.1:6379/0), or a
    Redis URL to use. `workdir`: where Redis, the config and (by default) the logs go; a
    temporary folder removed on stop when not given. `agent_env`: set in the agent's
    environment (default: the OVERRIDING_ENV variables blanked). `say`: progress lines.

    `start()` starts Redis and the stack; `start_agent()` the agent's processes (several
    times if needed); `stop()` stops everything, in reverse order, even after a failure.
    """

    def __init__(
        self,
        *,
        time_scale: float = 20.0,
        vast_run_mode: str = "scripted",
        vast_options: dict | None = None,
        stack_options: dict | None = None,
        redis: str = "private",
        redis_new_session: bool = False,
        redis_appendonly: bool = False,
        workdir: Path | None = None,
        logs_dir: Path | None = None,
        agent_env: dict | None = None,
        admin_timeout: float = 10.0,
        say=None,
    ):
        self.time_scale = time_scale
        self.vast_run_mode = vast_run_mode
        self.vast_options = dict(vast_options or {})
        self.stack_options = dict(stack_options or {})  # more LocalStack keywords
        self.redis_mode = redis
        self.redis_new_session = redis_new_session
        self.redis_appendonly = redis_appendonly
        self.own_workdir = workdir is None
        self.workdir = Path(workdir) if workdir else Path(tempfile.mkdtemp(prefix="ponos-run-"))
        self.logs_dir = Path(logs_dir) if logs_dir else self.workdir / "logs"
        self.agent_env = (
            {name: "" for name in OVERRIDING_ENV} if agent_env is None else dict(agent_env)
        )
        self.admin_timeout = admin_timeout
        self.say = say or (lambda _message: None)
        self.redis: RedisProcess | None = None  # the private one, when started here
        self.redis_url: str | None = None
        self.stack: LocalStack | None = None
        self.admin: SimAdmin | None = None
        self.agents: list[AgentProcesses] = []

    # ------------------------------------------------------------------ lifecycle

    def start_redis(self) -> str:
        """Start (or choose) the Redis; returns its URL. RuntimeError when there is none."""
        mode = self.redis_mode
        if mode in ("private", "private-or-env"):
            if shutil.which("redis-server") is None:
                if mode == "private":
                    raise RuntimeError(
                        "redis-server is not installed (a private Redis is "
                        "needed: apt-get install redis-server)"
                    )
                self.redis_url = os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
                self.say(
                    f"redis-server is not installed: using {self.redis_url} (its "
                    "ponos:* keys and Celery queues)"
                )
                return self.redis_url
            workdir = self.workdir / "redis"
            workdir.mkdir(parents=True, exist_ok=True)
            self.redis = RedisProcess(
                workdir, new_session=self.redis_new_session, appendonly=self.redis_appendonly
            ).start()
            self.redis_url = self.redis.url
        else:
            self.redis_url = mode
        return self.redis_url

    def start_stack(self) -> LocalStack:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # S3's access log
        self.stack = LocalStack(
            self.redis_url,
            time_scale=self.time_scale,
            vast_run_mode=self.vast_run_mode,
            start_redis=False,
            vast_options=self.vast_options,
            **self.stack_options,
        ).start()
        if not self.stack.redis_url:
            raise RuntimeError(f"no Redis answers at {self.redis_url}")
        self.admin = SimAdmin(self.stack, timeout=self.admin_timeout)
        return self.stack

    def start(self) -> LocalRun:
        """Redis and the local stack (not the agent: see start_agent)."""
        try:
            if self.redis_url is None:
                self.start_redis()
            if self.stack is None:
                self.start_stack()
        except BaseException:
            self.stop()
            raise
        return self

    def agent_config(self, **overrides) -> dict:
        """The agent's config for this stack and Redis; `vast_api` overrides merge."""
        config = yaml.safe_load(self.stack.config_yaml())
        config["redis_url"] = self.redis_url
        config["vast_api"].update(overrides.pop("vast_api", {}))
        config.update(overrides)
        return config

    def write_config(self, config: dict, name: str = "agent.yml") -> Path:
        path = self.workdir / name
        path.write_text(yaml.safe_dump(config))
        return path

    def start_agent(
        self,
        config_path: Path | None = None,
        *,
        config: dict | None = None,
        workers: int = 1,
        beats: int = 1,
        concurrency: int = 4,
        flower_port: int | None = None,
    ) -> AgentProcesses:
        """Start worker(s), beat(s) (and Flower with a port) for a config file, or for
        `config` (written to the workdir), or for agent_config()."""
        if config_path is None:
            config_path = self.write_config(config if config is not None else self.agent_config())
        agent = AgentProcesses(
            config_path=Path(config_path),
            log_dir=self.logs_dir,
            redis_url=self.redis_url,
            workers=workers,
            concurrency=concurrency,
            beats=beats,
            flower_port=flower_port,
            extra_env=self.agent_env,
        )
        self.agents.append(agent)
        return agent.start()

    @property
    def agent(self) -> AgentProcesses | None:
        """The agent started last."""
        return self.agents[-1] if self.agents else None

    def check_alive(self) -> list[str]:
        """Names of the agent processes that exited (with their status)."""
        return [dead for agent in self.agents for dead in agent.check_alive()]

    def stop(self, agent_timeout: float = 20.0) -> None:
        """Stop the agent, the stack, Redis; each part even when an earlier one failed."""
        try:
            for agent in reversed(self.agents):
                agent.stop(timeout=agent_timeout)
        finally:
            try:
                if self.admin is not None:
                    self.admin.close()
                if self.stack is not None:
                    self.stack.stop()
            finally:
                if self.redis is not None:
                    self.redis.stop()
                if self.own_workdir:
                    shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> LocalRun:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# ---------------------------------------------------------------------- secret scanning
# For the tests and the chaos benchmarks: is any known secret visible where it must not be
# (logs, broker messages, Flower's pages, the metrics page, `status --json`)?

# Shorter values would match by chance (the agent does not redact them either: logs.py).
MIN_SCANNED_LENGTH = 4


def _forms(value: str) -> set[str]:
    """How a value may be written in a log line, a URL, a JSON document or an HTML page."""
    return {
        value,
        quote(value, safe=""),
        quote_plus(value),
        json.dumps(value)[1:-1],
        html.escape(value),
    }


def find_secrets(
    text: str | bytes | None, secrets: Mapping[str, str | None] | Iterable[str | None]
) -> list[str]:
    """Which of `secrets` appear in `text`: their names (for a mapping name -> value), or a
    masked form of each value found (first 4 characters + "…"), never the whole value, so
    that a failure message does not leak it in turn. Also finds the URL-quoted, JSON- and
    HTML-escaped forms. None and "" are skipped; a shorter value than MIN_SCANNED_LENGTH is a
    ValueError (it would match by chance)."""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="replace")
    text = text or ""
    named = (
        secrets.items()
        if isinstance(secrets, Mapping)
        else ((f"{value[:4]}…", value) for value in secrets if value)
    )
    found = []
    for name, value in named:
        if not value:
            continue
        if len(value) < MIN_SCANNED_LENGTH:
            raise ValueError(f"secret {name!r} is too short to scan for")
        if any(form in text for form in _forms(value)):
            found.append(name)
    return found


def celery_message_bodies(node) -> list[str]:
    """The decoded bodies of the kombu messages inside a JSON value (kombu stores each
    message's body base64-encoded in Redis: scanned as stored, a secret would be missed)."""
    bodies = []
    if isinstance(node, dict):
        encoding = (node.get("properties") or {}).get("body_encoding")
        if encoding == "base64" and isinstance(node.get("body"), str):
            with contextlib.suppress(binascii.Error, ValueError):  # not a real message
                bodies.append(base64.b64decode(node["body"]).decode("utf-8", errors="replace"))
        for value in node.values():
            bodies.extend(celery_message_bodies(value))
    elif isinstance(node, list):
        for value in node:
            bodies.extend(celery_message_bodies(value))
    return bodies


def broker_dump(client, *, skip_prefix: str | None = "ponos:") -> str:
    """Everything a Redis broker holds, as text to scan: every key (queues, `unacked`,
    bindings, ...) with its values, and the decoded body of each Celery message in them.

    `skip_prefix`: the agent's own keys (state.DEFAULT_PREFIX), which keep what the agent
    needs to redact and authenticate (instance keys, Arkindex tokens) and are no broker
    message; None scans them too."""
    lines = []
    for key in sorted(client.scan_iter(count=1000)):
        name = key.decode("utf-8", errors="replace")
        if skip_prefix and name.startswith(skip_prefix):
            continue
        kind = client.type(key).decode()
        if kind == "string":
            items = [client.get(key)]
        elif kind == "list":
            items = client.lrange(key, 0, -1)
        elif kind == "hash":
            items = [part for pair in client.hgetall(key).items() for part in pair]
        elif kind == "set":
            items = sorted(client.smembers(key))
        elif kind == "zset":
            items = client.zrange(key, 0, -1)
        else:  # streams and others: Celery does not use them
            items = []
        for item in items:
            text = item.decode("utf-8", errors="replace") if isinstance(item, bytes) else item
            lines.append(f"{name}: {text}")
            try:
                decoded = json.loads(text)
            except ValueError:
                continue
            lines.extend(f"{name} (body): {body}" for body in celery_message_bodies(decoded))
    return "\n".join(lines)
