"""Every place a secret could reach, checked against every secret in play, on one real run.

One run of the agent as users run it (worker, beat and Flower through the supervisor, a
private Redis, the local stack with instances that really run their command): a task prints
its instance key, its task token and the seed, another fails. Meanwhile the Celery messages in
Redis are read repeatedly, and every request the agent and the instances send to the Vast.ai
and Arkindex simulators is recorded. Then the clients fail in-process with secrets in their
arguments (exception messages, their log lines, Sentry events through a local transport).

The secrets: the Vast.ai API key, every instance's own key, the seed, every Arkindex agent
access and refresh token, every task token, the registry password, the signature of every
pre-signed URL Arkindex issued, and Flower's generated password.

PLACES is the list of places, one check each (`find_secrets`, ponos_tasks/simulators/
harness.py, which the chaos benchmarks use too). Each place also names a value it must hold
(its `proof`: a task id, the canary a task printed...): the same check with that value listed
as a secret fails, so no check passes because it read nothing. Three places are also shown
to catch a secret really sent through them: a task argument in the broker and in Flower, an
`api_key` query in a request URL.
"""

from __future__ import annotations

import base64
import json
import logging
import os
import re
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit, urlunsplit

import pytest
import redis
import requests
import sentry_sdk
from celery import Celery

from ponos_tasks.app import init_sentry
from ponos_tasks.arkindex import ArkindexAgentClient, ArkindexError, MemoryCredentialStore
from ponos_tasks.config import load_config
from ponos_tasks.simulators.harness import (
    OVERRIDING_ENV,
    LocalRun,
    broker_dump,
    celery_message_bodies,
    find_secrets,
)
from ponos_tasks.vast import VastClient, VastError
from tests.conftest import free_port
from tests.test_secrets import CaptureTransport, upload_that_fails

pytestmark = pytest.mark.timeout(300)

IMAGE = "registry.example/ponos/secret-places:1"
REGISTRY_PASSWORD = "registry-pass-" + uuid.uuid4().hex[:12]
# Printed by a task, unknown to the agent as a secret: it must reach the published log.
CANARY = "canary-" + uuid.uuid4().hex
TERMINAL = {"completed", "failed", "error", "stopped", "cancelled"}


# ---------------------------------------------------------------------- request recording


class RequestRecorder:
    """WSGI middleware in front of a simulator: keeps each request's method, raw URL (path
    and query as sent) and Authorization scheme. In-process, on the simulator's own
    loopback server: nothing is forwarded anywhere."""

    def __init__(self, app, name: str):
        self.app, self.name = app, name
        self.seen: list[dict] = []

    def __call__(self, environ, start_response):
        path = environ.get("RAW_URI") or environ.get("REQUEST_URI") or environ["PATH_INFO"]
        if environ.get("QUERY_STRING") and "?" not in path:
            path += "?" + environ["QUERY_STRING"]
        scheme = environ.get("HTTP_AUTHORIZATION", "").partition(" ")[0]
        if not path.startswith("/_sim/"):  # the test's own admin calls
            self.seen.append(
                {"sim": self.name, "method": environ["REQUEST_METHOD"], "url": path, "auth": scheme}
            )
        return self.app(environ, start_response)


def record_requests(simulator, name: str) -> RequestRecorder:
    # werkzeug's server calls `server.app` for each request: wrapping it records them all.
    server = simulator._server
    recorder = RequestRecorder(server.app, name)
    server.app = recorder
    return recorder


# ---------------------------------------------------------------------- the run


@dataclass
class Evidence:
    """What the run left in each place, and the secrets that were in play."""

    run: LocalRun
    task_ids: dict[str, str]
    flower_auth: tuple[str, str]
    recorders: list[RequestRecorder]
    signed_urls: list[str]  # every pre-signed URL Arkindex issued
    secrets: dict[str, str] = field(default_factory=dict)
    texts: dict[str, str] = field(default_factory=dict)
    closed_url: str = ""  # host:port of the failing client calls


def text_of_logs(folder: Path) -> str:
    return "\n".join(
        f"----- {path.name}\n" + path.read_text(errors="replace")
        for path in sorted(folder.glob("*.log"))
    )


def flower_pages(url: str, auth: tuple[str, str]) -> str:
    """Flower's task list (its API) and the page of every agent task it saw."""
    session = requests.Session()
    session.auth = auth
    listing = session.get(url + "api/tasks", timeout=30)
    listing.raise_for_status()
    pages = [listing.text]
    for uuid_, task in listing.json().items():
        if task.get("name") not in ("ponos.sync", "ponos.check_ended"):  # ticks, no arguments
            page = session.get(f"{url}task/{uuid_}", timeout=30)
            page.raise_for_status()
            pages.append(page.text)
    return "\n".join(pages)


def command_env(run: LocalRun) -> dict[str, str]:
    """The environment of a command run next to the agent: its Redis (REDIS_URL would win
    over the config file), none of the variables that would point elsewhere."""
    return {**os.environ, **run.agent_env, "REDIS_URL": run.redis_url}


def metrics_page(run: LocalRun, config_path: Path) -> str:
    """`ponos-vast metrics` as users run it, scraped once."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "ponos_tasks.cli", "metrics", "--config", str(config_path)]
        + ["--host", "127.0.0.1", "--port", str(port)],
        env=command_env(run),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                resp = requests.get(f"http://127.0.0.1:{port}/metrics", timeout=5)
                resp.raise_for_status()
                return resp.text
            except requests.ConnectionError:
                assert process.poll() is None and time.monotonic() < deadline
                time.sleep(0.2)
    finally:
        process.terminate()
        process.wait(timeout=10)


def status_json(run: LocalRun, config_path: Path, *args: str) -> str:
    result = subprocess.run(
        [sys.executable, "-m", "ponos_tasks.cli", "status", *args, "--config", str(config_path)]
        + ["--json"],
        env=command_env(run),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return result.stdout + result.stderr


def explain_output(run: LocalRun, config_path: Path, task_id: str) -> str:
    """`ponos-vast explain TASK_ID`, as text and as JSON (the task has ended: it shows what
    a retry would send, its definition and environment included)."""
    out = []
    for extra in ([], ["--json"]):
        result = subprocess.run(
            [sys.executable, "-m", "ponos_tasks.cli", "explain", task_id]
            + ["--config", str(config_path), *extra],
            env=command_env(run),
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert result.returncode == 0, result.stderr
        out.append(result.stdout + result.stderr)
    return "\n".join(out)


class ListHandler(logging.Handler):
    def __init__(self):
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []

    def emit(self, record):
        self.lines.append(self.format(record))


def failing_client_calls(evidence: Evidence, config) -> None:
    """The clients fail with secrets in their arguments and locals: a log upload to a real
    pre-signed URL (a closed port) with a task token in its text, a Vast.ai call with the
    real key (a closed port). Their exception messages, log lines and Sentry events."""
    stack = evidence.run.stack
    signed = next(url for url in evidence.signed_urls if "X-Amz-Signature" in url)
    closed = f"127.0.0.1:{free_port()}"
    evidence.closed_url = closed
    url = urlunsplit(urlsplit(signed)._replace(netloc=closed))
    token = next(iter(stack.arkindex.state.task_tokens))
    handler = ListHandler()
    handler.setFormatter(logging.Formatter("%(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    level = root.level
    root.addHandler(handler)
    root.setLevel(logging.DEBUG)
    messages = []
    transport = CaptureTransport()
    init_sentry(config, transport=transport)
    try:
        client = ArkindexAgentClient(
            stack.arkindex_url, stack.farm_id, stack.seed, MemoryCredentialStore(), max_wait=0.01
        )
        try:
            upload_that_fails(client, url, token)
        except ArkindexError as error:
            messages.append(str(error))
            sentry_sdk.capture_exception(error)
        vast = VastClient(f"http://{closed}", stack.vast_api_key, max_attempts=2)
        try:
            vast.list_instances()
        except VastError as error:
            messages.append(str(error))
            sentry_sdk.capture_exception(error)
        sentry_sdk.flush()
    finally:
        sentry_sdk.init()  # Sentry off again for the other tests
        root.removeHandler(handler)
        root.setLevel(level)
    assert len(messages) == 2 and transport.sent
    evidence.texts["exception messages"] = "\n".join(messages)
    evidence.texts["agent log lines (in-process clients)"] = "\n".join(handler.lines)
    evidence.texts["Sentry events (local transport)"] = "\n".join(transport.sent)


def signature_of(url: str) -> str | None:
    return (parse_qs(urlsplit(url).query).get("X-Amz-Signature") or [None])[0]


def collect_secrets(evidence: Evidence, config) -> dict[str, str]:
    stack = evidence.run.stack
    ark = stack.arkindex.state
    secrets = {
        "Vast.ai API key": stack.vast_api_key,
        "seed": stack.seed,
        "registry password": REGISTRY_PASSWORD,
        "Flower password": evidence.flower_auth[1],
    }
    assert config.vast_api.api_key == stack.vast_api_key and config.seed == stack.seed
    for instance in evidence.run.admin.instances():
        secrets[f"instance key of {instance['label']}"] = instance["instance_api_key"]
    for n, token in enumerate(ark.access_tokens):
        secrets[f"agent access token {n}"] = token
    for agent in ark.agents.values():
        secrets[f"agent refresh token of {agent.id}"] = agent.refresh_token
    for token, task_id in ark.task_tokens.items():
        secrets[f"task token of {task_id}"] = token
    for n, url in enumerate(evidence.signed_urls):
        if signature_of(url):
            secrets[f"pre-signed URL signature {n}"] = signature_of(url)
    return secrets


@pytest.fixture(scope="module")
def evidence(tmp_path_factory):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed: the run needs a private Redis")
    workdir = tmp_path_factory.mktemp("secret-places")
    run = LocalRun(
        time_scale=40.0,
        vast_run_mode="local",
        vast_options={"churn": False, "image_sizes": {IMAGE: 0.3}, "cached_images": [IMAGE]},
        workdir=workdir,
        agent_env={**{name: "" for name in OVERRIDING_ENV}, "FLOWER_BASIC_AUTH": ""},
    )
    run.start()
    try:
        yield gather(run)
    finally:
        run.stop(agent_timeout=10)


def gather(run: LocalRun) -> Evidence:
    stack = run.stack
    signed_urls: list[str] = []
    storage = stack.arkindex.storage

    def recording(original):
        def presign(*args, **kwargs):
            url = original(*args, **kwargs)
            signed_urls.append(url)
            return url

        return presign

    for name in ("presign_put", "presign_get"):  # every pre-signed URL Arkindex issues
        setattr(storage, name, recording(getattr(storage, name)))
    recorders = [record_requests(stack.vast, "vast"), record_requests(stack.arkindex, "arkindex")]

    config = run.agent_config(
        sync_interval=0.5,
        logs_interval=2,
        vast_api={
            "registries": [
                {"host": "registry.example", "username": "u", "password": REGISTRY_PASSWORD}
            ],
            "loading_deadline": 8,
            "rate_limit_scale": 1 / 40,
        },
    )
    config_path = run.write_config(config)
    agent = run.start_agent(config_path, flower_port=free_port())
    user, _, password = agent.flower.credentials_file.read_text().strip().partition(":")
    prints = (
        "echo ikey=$CONTAINER_API_KEY; echo token=$ARKINDEX_TASK_TOKEN; "
        f"echo seed={stack.seed}; echo {CANARY}"
    )
    task_ids = run.admin.process(
        "secrets",
        [
            {"slug": "prints", "image": IMAGE, "command": f"sh -c '{prints}; sleep 3; exit 0'"},
            {"slug": "fails", "image": IMAGE, "command": f"sh -c '{prints}; exit 3'"},
        ],
    )
    evidence = Evidence(run, task_ids, (user, password), recorders, signed_urls)

    # Celery's messages in Redis, read while the tasks run (a watch waiting for its countdown
    # sits in `unacked`), until every task ended and its instance is gone.
    broker = redis.Redis.from_url(run.redis_url)
    snapshots: dict[str, None] = {}
    deadline = time.monotonic() + 120
    while True:
        for line in broker_dump(broker).splitlines():
            snapshots[line] = None
        tasks = run.admin.tasks()
        ended = all(tasks[tid]["state"] in TERMINAL for tid in task_ids.values())
        if ended and run.admin.stats()["live_instances"] == 0:
            break
        assert not run.check_alive(), run.check_alive()
        assert time.monotonic() < deadline, {s: tasks[t]["state"] for s, t in task_ids.items()}
        time.sleep(0.3)
    time.sleep(2)  # the last syncs and events, for Flower, the logs and the status
    broker.close()
    assert {slug: tasks[tid]["state"] for slug, tid in task_ids.items()} == {
        "prints": "completed",
        "fails": "failed",
    }

    loaded = load_config(str(config_path), environ={})
    evidence.texts["published task logs"] = "\n".join(
        run.admin.task_log(tid) or "" for tid in task_ids.values()
    )
    evidence.texts["agent process logs (worker, beat, Flower)"] = text_of_logs(run.logs_dir)
    evidence.texts["Celery messages in Redis"] = "\n".join(snapshots)
    evidence.texts["Flower task pages"] = flower_pages(agent.flower.url, (user, password))
    evidence.texts["metrics page"] = metrics_page(run, config_path)
    evidence.texts["status --json"] = status_json(run, config_path)
    evidence.texts["status TASK_ID --json (timelines)"] = "\n".join(
        status_json(run, config_path, task_id) for task_id in task_ids.values()
    )
    evidence.texts["explain TASK_ID (text and --json)"] = "\n".join(
        explain_output(run, config_path, task_id) for task_id in task_ids.values()
    )
    evidence.texts["request URLs (Vast.ai, Arkindex)"] = "\n".join(
        f"{r['sim']} {r['method']} {r['url']} {unquote(r['url'])}"
        for recorder in recorders
        for r in recorder.seen
    )
    failing_client_calls(evidence, loaded)
    evidence.secrets = collect_secrets(evidence, loaded)
    return evidence


# ---------------------------------------------------------------------- the places


@dataclass(frozen=True)
class Place:
    name: str
    # A value this place must hold once read: listed as a secret, the check fails.
    proof: Callable[[Evidence], str]

    def text(self, evidence: Evidence) -> str:
        return evidence.texts[self.name]


def a_task_id(evidence: Evidence) -> str:
    return evidence.task_ids["prints"]


PLACES = [
    # The task printed CANARY next to its key, token and the seed: only those are redacted.
    Place("published task logs", lambda e: CANARY),
    Place("agent process logs (worker, beat, Flower)", a_task_id),
    Place("agent log lines (in-process clients)", lambda e: e.closed_url),
    Place("exception messages", lambda e: e.closed_url),
    Place("Sentry events (local transport)", lambda e: "ArkindexError"),
    Place("Celery messages in Redis", a_task_id),
    Place("Flower task pages", a_task_id),
    Place("metrics page", lambda e: 'ponos_tasks{phase="done"} 2.0'),  # the two tasks
    Place("status --json", a_task_id),
    Place("status TASK_ID --json (timelines)", lambda e: "reported `completed` to Arkindex"),
    Place("explain TASK_ID (text and --json)", lambda e: "TASK_BOOTSTRAP=true"),
    Place("request URLs (Vast.ai, Arkindex)", a_task_id),
]


@pytest.mark.parametrize("place", PLACES, ids=[place.name for place in PLACES])
def test_no_known_secret_reaches(place, evidence):
    text = place.text(evidence)
    proof = place.proof(evidence)
    # The check can fail: the value this place holds, listed as a secret, is found.
    assert find_secrets(text, {**evidence.secrets, "(proof)": proof}) == ["(proof)"]
    assert find_secrets(text, evidence.secrets) == []


def test_every_kind_of_secret_was_in_play(evidence):
    """Each kind of secret is listed (the run made instances, tokens and signed URLs), and
    the task's own printing of its secrets was redacted, not absent."""
    names = " ".join(evidence.secrets)
    for kind in (
        "Vast.ai API key",
        "seed",
        "registry password",
        "Flower password",
        "instance key of ponos-",
        "agent access token",
        "agent refresh token",
        "task token of",
        "pre-signed URL signature",
    ):
        assert kind in names, kind
    published = evidence.texts["published task logs"]
    for printed in ("ikey=[REDACTED]", "token=[REDACTED]", "seed=[REDACTED]"):
        assert printed in published


def test_a_secret_in_a_task_argument_is_found_in_the_broker_and_in_flower(evidence):
    """The broker and Flower scans read what a task's arguments hold: a (made-up) secret
    sent as an argument is found in both."""
    probe = "probe-secret-" + uuid.uuid4().hex
    config = load_config(str(evidence.run.agent.config_path), environ={})
    # A Celery app of its own (the agent's settings and broker): the shared one is left alone.
    app = Celery("probe")
    app.config_from_object("ponos_tasks.celery_settings")
    app.conf.broker_url = config.redis_url
    # Due in an hour: the worker holds it unexecuted (in Redis' `unacked`) for the check.
    sent = app.send_task("ponos.sync", kwargs={"probe": probe}, queue="sync", countdown=3600)
    client = redis.Redis.from_url(config.redis_url)
    try:
        deadline = time.monotonic() + 30
        while not find_secrets(broker_dump(client), {"probe": probe}):
            assert time.monotonic() < deadline, "the probe never showed in the broker dump"
            time.sleep(0.2)
        url, auth = evidence.run.agent.flower.url, evidence.flower_auth
        while not find_secrets(flower_pages(url, auth), {"probe": probe}):
            assert time.monotonic() < deadline, "the probe never showed in Flower"
            time.sleep(0.5)
    finally:
        app.control.revoke(sent.id)
        app.close()
        client.close()


def test_keys_travel_in_headers_only(evidence):
    """Every Vast.ai call (the agent's, and the instances' self-stop) carries its key as
    `Authorization: Bearer`, never as `?api_key=` (which Vast.ai also accepts); no Arkindex
    call has a query naming a token. The recorder does see a query: a call with `?api_key=`
    is caught."""
    seen = [r for recorder in evidence.recorders for r in recorder.seen]
    vast_api = [r for r in seen if r["sim"] == "vast" and r["url"].startswith("/api/")]
    assert vast_api and all(r["auth"] == "Bearer" for r in vast_api), [
        (r["method"], r["url"].split("?")[0]) for r in vast_api if r["auth"] != "Bearer"
    ]
    # The instance logs' result_url (Vast.ai's S3): read without any key at all.
    vast_s3 = [r for r in seen if r["sim"] == "vast" and r["url"].startswith("/s3/")]
    assert vast_s3 and all(r["auth"] == "" for r in vast_s3)
    assert len(vast_api) + len(vast_s3) == len([r for r in seen if r["sim"] == "vast"])
    for r in seen:
        assert not re.search(r"[?&](api_key|token|key|access_token|seed)=", r["url"]), r["url"]

    stack = evidence.run.stack
    requests.get(
        f"{stack.vast_url}/api/v0/users/current/",
        params={"api_key": stack.vast_api_key},
        timeout=10,
    ).raise_for_status()
    last = evidence.recorders[0].seen[-1]["url"]
    assert find_secrets(last, evidence.secrets) == ["Vast.ai API key"]


# ---------------------------------------------------------------------- the scanner itself


def test_find_secrets_finds_encoded_forms_and_never_returns_a_value():
    secret = "s3cr3t/with+odd&chars"
    encoded = {
        "plain": f"x {secret} y",
        "URL-quoted": "GET /p?q=s3cr3t%2Fwith%2Bodd%26chars",
        "form-quoted": "s3cr3t%2Fwith%2Bodd%26chars",
        "JSON": json.dumps({"k": 'a"' + secret}),
        "HTML": "<td>s3cr3t/with+odd&amp;chars</td>",
    }
    for where, text in encoded.items():
        assert find_secrets(text, {"the key": secret}) == ["the key"], where
        assert find_secrets(text.encode(), [secret]) == ["s3cr…"], where
    assert find_secrets("nothing here", {"the key": secret, "unset": None, "empty": ""}) == []
    assert find_secrets(None, [secret]) == []
    with pytest.raises(ValueError, match="too short"):
        find_secrets("abc", {"pin": "abc"})


def test_broker_dump_decodes_celery_message_bodies():
    """kombu keeps each message's body base64-encoded: scanned as stored, a secret in a task
    argument would be missed; the dump decodes it."""
    body = json.dumps([["task-id"], {"token": "tok-in-a-kwarg"}, {}])
    message = {
        "body": base64.b64encode(body.encode()).decode(),
        "properties": {"body_encoding": "base64", "delivery_tag": "t"},
        "headers": {"task": "ponos.step.start"},
    }
    stored = json.dumps([message, "", "steps"])  # an `unacked` entry: [message, exchange, key]
    assert "tok-in-a-kwarg" not in stored
    found = celery_message_bodies(json.loads(stored))
    assert found == [body] and find_secrets("\n".join(found), ["tok-in-a-kwarg"])
