"""The agent's Arkindex client against the Arkindex simulator, over real HTTP on loopback."""

import json
import logging
import secrets
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import pytest
import requests
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ponos_tasks.arkindex import (
    Action,
    ArkindexAgentClient,
    ArkindexError,
    ArkindexUnavailable,
    MemoryCredentialStore,
    RegistrationError,
    TaskDefinition,
    TransitionRefused,
)
from ponos_tasks.simulators.arkindex import ArkindexSimulator
from ponos_tasks.simulators.s3 import S3Server, s3_client
from ponos_tasks.state import Keyspace, RedisCredentialStore, ReportedStates
from tests.conftest import free_port

FARM = str(uuid.uuid4())
SEED = secrets.token_hex(32)


@pytest.fixture(scope="module")
def s3():
    server = S3Server().start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def sim(s3):
    simulator = ArkindexSimulator(s3_url=s3.url, farms={FARM: SEED})
    simulator.start()
    yield simulator
    simulator.stop()


@pytest.fixture
def store(redis_client, key_prefix):
    return RedisCredentialStore(redis_client, Keyspace(key_prefix))


@pytest.fixture
def client(sim, store, redis_client, key_prefix):
    return ArkindexAgentClient(
        sim.url,
        FARM,
        SEED,
        store,
        max_wait=0.2,
        reported=ReportedStates(redis_client, Keyspace(key_prefix)),
    )


def create_process(sim, *tasks, name="test"):
    resp = requests.post(
        f"{sim.url}/_sim/processes", json={"name": name, "tasks": list(tasks)}, timeout=10
    )
    resp.raise_for_status()
    return {t["slug"]: t["id"] for t in resp.json()["tasks"]}


def task_info(sim, task_id):
    resp = requests.get(f"{sim.url}/_sim/tasks/{task_id}", timeout=10)
    resp.raise_for_status()
    return resp.json()


def agent_updates(sim, task_id):
    """The PartialUpdateTask calls the simulator received (scheduler moves have no status)."""
    return [h for h in task_info(sim, task_id)["history"] if h["status"] is not None]


def one_task(sim, slug="job", **extra):
    task = {
        "slug": slug,
        "image": "registry.example/worker:1",
        "command": "run.sh",
        "env": {},
        "parents": [],
        "requires_gpu": False,
        **extra,
    }
    return create_process(sim, task)[slug]


def start_task(client, task_id, attempts=20):
    """Poll actions until Arkindex hands the task to this agent."""
    for _ in range(attempts):
        if Action("start_task", task_id) in client.actions():
            return
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never offered to the agent")


# --------------------------------------------------------------------------- registration


def test_register_stores_credentials_in_redis_and_never_logs_tokens(
    client, store, redis_client, caplog
):
    caplog.set_level(logging.DEBUG)
    agent = client.register()
    assert agent["id"]
    assert "access_token" not in agent and "refresh_token" not in agent

    stored = json.loads(redis_client.get(store.keys.credentials))
    assert stored["agent_id"] == agent["id"] == client.agent_id
    assert stored["access_token"] and stored["refresh_token"]
    for secret in (stored["access_token"], stored["refresh_token"], SEED):
        assert secret not in caplog.text

    # A second client (another worker) reuses the stored agent: no new registration.
    other = ArkindexAgentClient(client.url, FARM, SEED, store)
    assert other.register()["id"] == agent["id"]
    assert (
        json.loads(redis_client.get(store.keys.credentials))["access_token"]
        == stored["access_token"]
    )
    # force=True registers again as the same agent (same nonce): same id, new token.
    assert other.register(force=True)["id"] == agent["id"]
    assert store.load()["access_token"] != stored["access_token"]
    # new_identity=True makes a new agent.
    assert other.register(new_identity=True)["id"] != agent["id"]


def test_workers_registering_at_once_make_one_agent_with_one_create_agent_call(sim, store):
    """Workers that find no credentials at once (first start, Redis lost its data) take the
    lock in turn: the ones that waited use the agent the first one registered."""
    calls = []
    clients = [
        ArkindexAgentClient(
            sim.url, FARM, SEED, store, on_call=lambda api, op, status: calls.append(op)
        )
        for _ in range(4)
    ]
    # The schema is read before the race, so that the four meet at the lock.
    assert all(each.api is not None for each in clients)
    start = threading.Barrier(len(clients))
    ids = []

    def register(each):
        start.wait()
        ids.append(each.register()["id"])

    threads = [threading.Thread(target=register, args=(each,)) for each in clients]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert len(ids) == 4 and len(set(ids)) == 1
    assert calls.count("CreateAgent") == 1


def test_a_registration_whose_lock_lapsed_adopts_the_agent_registered_meanwhile(
    sim, redis_client, key_prefix
):
    """A worker stalled past the credentials lock's TTL during its CreateAgent (another then
    registers too) keeps the other's credentials instead of writing its own over them: all
    workers end up with one agent and one token."""
    keys = Keyspace(key_prefix)
    other = ArkindexAgentClient(sim.url, FARM, SEED, RedisCredentialStore(redis_client, keys))
    registered_meanwhile = []

    def stall(api, operation, status):
        if operation == "CreateAgent" and not registered_meanwhile:
            redis_client.delete(keys.credentials_lock)  # lapsed while this worker stalled
            registered_meanwhile.append(other.register()["id"])

    slow = ArkindexAgentClient(
        sim.url, FARM, SEED, RedisCredentialStore(redis_client, keys), on_call=stall
    )
    agent = slow.register()
    assert registered_meanwhile and agent["id"] == registered_meanwhile[0]
    stored = RedisCredentialStore(redis_client, keys).load()
    assert stored["agent_id"] == agent["id"] == other.agent_id == slow.agent_id
    assert slow.api.session.auth.token == other.api.session.auth.token == stored["access_token"]


def test_registration_key_pair_is_p384_and_derived_from_the_identity(sim):
    """An agent that lost all memory (a fresh store) registers again as the same agent: its
    EC P-384 key pair comes from its identity; another identity is another agent."""
    identity = secrets.token_hex(32)
    first = ArkindexAgentClient(sim.url, FARM, SEED, MemoryCredentialStore(), public_key=identity)
    agent_id = first.register()["id"]
    reborn = ArkindexAgentClient(sim.url, FARM, SEED, MemoryCredentialStore(), public_key=identity)
    assert reborn.register()["id"] == agent_id
    other = ArkindexAgentClient(
        sim.url, FARM, SEED, MemoryCredentialStore(), public_key=secrets.token_hex(32)
    )
    assert other.register()["id"] != agent_id
    pem = first.store.load()["public_key"]
    assert pem == reborn.store.load()["public_key"]
    key = serialization.load_pem_public_key(pem.encode())
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    # A fixed identity is derived again, never stored; a drawn one is kept to be reused.
    assert first.store.load()["identity"] is None
    drawn = ArkindexAgentClient(sim.url, FARM, SEED, MemoryCredentialStore())
    drawn.register()
    assert len(drawn.store.load()["identity"]) == 64


def test_agent_survives_expired_token_and_stale_bearer_refresh(sim, client, store):
    """The simulator refuses a refresh that carries the expired Bearer: the agent still gets
    a working token (here by registering again as the same agent)."""
    agent_id = client.register()["id"]
    sim.faults.set([{"fault": "token_expired", "times": 1}, {"fault": "stale_bearer_refresh"}])
    try:
        assert client.actions() == []
        assert client.agent_id == agent_id
        assert sim.faults.snapshot()["hits"].get("token_expired") == 1
    finally:
        sim.faults.clear()


def test_an_expired_token_is_refreshed_without_the_stale_bearer(sim, client, caplog):
    """The refresh carries only the refresh token: refused when the expired Bearer travels
    with it, it must succeed as a refresh (not a new registration)."""
    caplog.set_level(logging.INFO)
    client.register()
    sim.faults.set([{"fault": "token_expired", "times": 1}, {"fault": "stale_bearer_refresh"}])
    try:
        assert client.actions() == []
        assert "token refreshed" in caplog.text
        assert "registering again" not in caplog.text
    finally:
        sim.faults.clear()


def test_wrong_url_nothing_answers():
    url = f"http://127.0.0.1:{free_port()}/"
    client = ArkindexAgentClient(url, FARM, SEED, MemoryCredentialStore(), max_wait=0.05)
    with pytest.raises(ArkindexError, match="nothing answers") as info:
        client.register()
    assert "\n" not in str(info.value) and url in str(info.value)


def test_wrong_url_not_an_arkindex(s3):
    # moto's S3 answers, but with no OpenAPI schema.
    client = ArkindexAgentClient(s3.url, FARM, SEED, MemoryCredentialStore())
    with pytest.raises(ArkindexError, match="not an Arkindex API") as info:
        client.register()
    assert "\n" not in str(info.value)


def test_wrong_seed(sim):
    client = ArkindexAgentClient(sim.url, FARM, "0" * 64, MemoryCredentialStore())
    with pytest.raises(RegistrationError, match="wrong seed") as info:
        client.register()
    assert "\n" not in str(info.value) and "0" * 64 not in str(info.value)


def test_farm_does_not_exist(sim):
    farm = str(uuid.uuid4())
    client = ArkindexAgentClient(sim.url, farm, SEED, MemoryCredentialStore())
    with pytest.raises(RegistrationError, match=f"farm {farm} does not exist") as info:
        client.register()
    assert "\n" not in str(info.value)


# --------------------------------------------------------------------------- tokens


def test_expired_token_is_refreshed(s3, redis_client, key_prefix, caplog):
    caplog.set_level(logging.INFO)
    simulator = ArkindexSimulator(s3_url=s3.url, farms={FARM: SEED}, token_ttl=1)
    simulator.start()
    try:
        store = RedisCredentialStore(redis_client, Keyspace(key_prefix))
        client = ArkindexAgentClient(simulator.url, FARM, SEED, store, max_wait=0.2)
        agent_id = client.register()["id"]
        first = store.load()
        assert client.actions() == []
        time.sleep(1.3)
        assert client.actions() == []  # 401 -> RefreshAgentToken -> retried once
        second = store.load()
        assert second["agent_id"] == agent_id  # refreshed, not registered again
        assert second["access_token"] != first["access_token"]
        assert "token refreshed" in caplog.text

        # Another worker holding the old token adopts the stored one instead of refreshing.
        worker = ArkindexAgentClient(simulator.url, FARM, SEED, store, max_wait=0.2)
        worker._set_token(first)
        assert worker.actions() == []
        assert store.load()["access_token"] == second["access_token"]
    finally:
        simulator.stop()


def test_refused_refresh_token_registers_again(sim, client, store, caplog):
    caplog.set_level(logging.INFO)
    agent_id = client.register()["id"]
    creds = store.load()
    creds["access_token"] = "not-a-token"
    creds["refresh_token"] = "not-a-refresh-token"
    store.save(creds)
    client._set_token(creds)

    task = one_task(sim)
    start_task(client, task)  # 401 -> refresh refused -> CreateAgent with the stored nonce
    assert "registering again" in caplog.text
    assert store.load()["agent_id"] == agent_id  # Arkindex recognised the same agent
    assert store.load()["access_token"] != "not-a-token"
    assert client.update_state(task, "running") is True  # its tasks are still its own


# --------------------------------------------------------------------------- tasks


def test_actions_definition_and_idempotent_states(sim, client, caplog):
    caplog.set_level(logging.DEBUG)
    parent = one_task(sim, slug="parent")
    ids = create_process(
        sim,
        {
            "slug": "init",
            "image": "img:1",
            "command": None,
            "env": {"FOO": "bar"},
            "parents": [],
            "requires_gpu": True,
        },
        {
            "slug": "work",
            "image": "img:2",
            "command": "work",
            "env": {},
            "parents": ["init"],
            "requires_gpu": False,
        },
    )
    start_task(client, parent)
    start_task(client, ids["init"])

    definition = client.task_definition(ids["init"])
    assert isinstance(definition, TaskDefinition)
    assert definition.id == ids["init"] and definition.slug == "init"
    assert definition.image == "img:1" and definition.command is None
    assert definition.requires_gpu is True and definition.parents == {}
    assert definition.env["FOO"] == "bar"
    assert definition.env["PONOS_TASK"] == ids["init"]
    assert definition.env["ARKINDEX_TASK_TOKEN"]
    assert definition.env["ARKINDEX_TASK_TOKEN"] not in repr(definition)
    assert definition.s3_logs_put_url.startswith(("http://", "https://"))
    assert client.task_definition(ids["init"]) is definition  # cached per task

    assert client.update_state(ids["init"], "running") is True
    assert client.update_state(ids["init"], "running") is False  # already reported: not sent
    assert client.update_state(ids["init"], "completed") is True
    assert client.update_state(ids["init"], "completed") is False
    assert client.update_state(ids["init"], "failed") is False  # second terminal: never sent

    history = agent_updates(sim, ids["init"])
    assert [(h["to"], h["accepted"]) for h in history] == [("running", True), ("completed", True)]
    assert task_info(sim, ids["init"])["state"] == "completed"

    # The child became pending and is offered with its parents' slugs.
    start_task(client, ids["work"])
    assert client.task_definition(ids["work"]).parents == {ids["init"]: "init"}
    assert definition.env["ARKINDEX_TASK_TOKEN"] not in caplog.text


def test_forbidden_transition_is_logged_and_not_retried(sim, client, caplog):
    task = one_task(sim)
    start_task(client, task)  # pending, assigned to us
    caplog.set_level(logging.WARNING)
    with pytest.raises(TransitionRefused) as info:
        client.update_state(task, "completed")  # pending -> completed is forbidden
    assert info.value.task_id == task and info.value.state == "completed"
    assert info.value.detail and info.value.detail in caplog.text
    assert "not retried" in caplog.text

    refused = [h for h in agent_updates(sim, task) if not h["accepted"]]
    assert len(refused) == 1 and refused[0]["to"] == "completed"  # sent once, no retry
    # The refusal released the guard: the right sequence still goes through.
    assert client.update_state(task, "running") is True
    assert client.update_state(task, "completed") is True


def test_a_state_already_on_arkindex_is_never_sent_again(
    sim, client, store, redis_client, key_prefix
):
    """A worker that lost its guard (Redis wiped, or killed after its update was applied)
    reports `completed` again: the client reads the task's state first, finds it completed and
    sends nothing, so Arkindex records no refused update (the chaos suite, seed 1, found the
    refused duplicate the old read-after-400 left in the history)."""
    task = one_task(sim)
    start_task(client, task)
    assert client.update_state(task, "running")
    assert client.update_state(task, "completed")
    amnesiac = ArkindexAgentClient(
        client.url,
        FARM,
        SEED,
        store,
        reported=ReportedStates(redis_client, Keyspace(key_prefix + "r2:")),
    )
    assert amnesiac.update_state(task, "completed") is True
    history = agent_updates(sim, task)
    assert [(h["to"], h["accepted"]) for h in history] == [("running", True), ("completed", True)]
    assert task_info(sim, task)["state"] == "completed"


def test_an_update_applied_but_answered_garbled_is_not_sent_twice(sim, client):
    """The update took effect, its answer came back garbled (it could as well be a read
    timeout or a 502 from a proxy): the client must not retry it blindly. It raises
    (unknown), and the next call finds the state on Arkindex."""
    task = one_task(sim)
    start_task(client, task)
    assert client.update_state(task, "running")
    sim.faults.set([{"fault": "malformed", "operation": "PartialUpdateTask", "times": 1}])
    try:
        with pytest.raises(ArkindexUnavailable):
            client.update_state(task, "completed")
    finally:
        sim.faults.clear()
    assert client.update_state(task, "completed") is True
    history = agent_updates(sim, task)
    assert [(h["to"], h["accepted"]) for h in history] == [("running", True), ("completed", True)]


def test_actions_capacity_is_sent(sim, client):
    task = one_task(sim)
    assert Action("start_task", task) not in client.actions(capacity=0)
    start_task(client, task)


def sim_stats(sim) -> dict:
    resp = requests.get(f"{sim.url}/_sim/stats", timeout=10)
    resp.raise_for_status()
    return resp.json()


def test_every_request_is_told_to_the_call_hook_as_the_simulator_counts_it(
    sim, store, redis_client, key_prefix
):
    """The hook the agent counts calls with sees each operation's requests (a 429 retried,
    a registration, a token refresh included) as the simulator counted them, and each log
    upload to S3 apart."""
    told = []
    client = ArkindexAgentClient(
        sim.url,
        FARM,
        SEED,
        store,
        max_wait=0.2,
        reported=ReportedStates(redis_client, Keyspace(key_prefix)),
        on_call=lambda *call: told.append(call),
    )
    task = one_task(sim)
    before = sim_stats(sim)
    rate_limit = {"fault": "rate_limit", "operation": "RetrieveAgentActions", "times": 2}
    resp = requests.post(f"{sim.url}/_sim/faults", json={"rules": [rate_limit]}, timeout=10)
    resp.raise_for_status()
    start_task(client, task)
    client.upload_logs(client.task_definition(task).s3_logs_put_url, "a log\n")
    assert client.update_state(task, "running") is True
    after = sim_stats(sim)

    told_calls = {}
    for api, operation, _status in told:
        told_calls[(api, operation)] = told_calls.get((api, operation), 0) + 1
    sim_calls = {
        ("arkindex", op): n - before["calls"].get(op, 0)
        for op, n in after["calls"].items()
        if n != before["calls"].get(op, 0)
    }
    assert {k: v for k, v in told_calls.items() if k[0] == "arkindex"} == sim_calls
    assert told_calls[("s3", "upload_logs")] == 1
    assert ("arkindex", "RetrieveAgentActions", 429) in told
    limited = [call for call in told if call[2] == 429]
    assert len(limited) == 2
    assert (
        after["rate_limited"]["RetrieveAgentActions"]
        - before["rate_limited"].get("RetrieveAgentActions", 0)
        == 2
    )
    # What a fresh client does first: register (GetPublicKey, CreateAgent).
    assert [operation for _, operation, _ in told[:2]] == ["GetPublicKey", "CreateAgent"]


def test_upload_logs_read_back_byte_for_byte(sim, s3, client):
    task = one_task(sim)
    start_task(client, task)
    put_url = client.task_definition(task).s3_logs_put_url
    text = "line 1\nligne 2 : données accentuées ✓\r\n\ttabs and trailing spaces   \n" * 50
    client.upload_logs(put_url, text)
    client.upload_logs(put_url, text + "more\n")  # overwrites: the whole text each time

    bucket, key = urlsplit(put_url).path.lstrip("/").split("/", 1)
    body = s3_client(s3.url).get_object(Bucket=bucket, Key=key)["Body"].read()
    assert body == (text + "more\n").encode("utf-8")

    published = requests.get(f"{sim.url}/_sim/tasks/{task}/logs", timeout=10)
    assert published.status_code == 200
    assert published.content == (text + "more\n").encode("utf-8")


class _Flaky(BaseHTTPRequestHandler):
    """A real HTTP server that fails the first PUTs with 503, then stores the body."""

    failures = 0
    bodies: list

    def do_PUT(self):
        body = self.rfile.read(int(self.headers["Content-Length"]))
        server = self.server
        if server.failures_left > 0:
            server.failures_left -= 1
            self.send_response(503)
            self.end_headers()
            return
        server.bodies.append((self.headers["Content-Type"], body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def flaky_server():
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Flaky)
    server.failures_left = 0
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


def test_upload_logs_retries_5xx_then_gives_up_with_one_line(flaky_server):
    client = ArkindexAgentClient(
        "http://127.0.0.1:1/", FARM, SEED, MemoryCredentialStore(), max_attempts=3, max_wait=0.05
    )
    url = f"http://127.0.0.1:{flaky_server.server_port}/logs/task.log?X-Amz-Signature=secret"
    flaky_server.failures_left = 2
    client.upload_logs(url, "hello ✓")
    assert flaky_server.bodies == [("text/plain; charset=utf-8", "hello ✓".encode())]

    flaky_server.failures_left = 5
    with pytest.raises(ArkindexError, match="HTTP 503") as info:
        client.upload_logs(url, "again")
    assert "secret" not in str(info.value)
    assert flaky_server.failures_left == 2  # exactly max_attempts tries


# --------------------------------------------------------------------------- transient faults


class _FaultyProxy(BaseHTTPRequestHandler):
    """A real HTTP proxy in front of the simulator that fails the first requests whose path
    contains `server.match`: `server.mode` "502" answers 502, "drop" closes the connection."""

    def _handle(self):
        server = self.server
        length = int(self.headers.get("Content-Length") or 0)
        body = self.rfile.read(length) if length else None
        method_matches = getattr(server, "method", None) in (None, self.command)
        if server.match and server.match in self.path and method_matches:
            server.hits += 1
            if server.failures_left > 0:
                server.failures_left -= 1
                if server.mode == "drop":
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.send_response(502)
                self.send_header("Content-Type", "text/html")
                self.end_headers()
                self.wfile.write(b"<html>Bad Gateway</html>")
                return
        headers = {
            k: v
            for k, v in self.headers.items()
            if k.lower() in ("authorization", "content-type", "accept")
        }
        resp = requests.request(
            self.command,
            server.target + self.path,
            headers=headers,
            data=body,
            timeout=10,
            allow_redirects=False,
        )
        self.send_response(resp.status_code)
        self.send_header("Content-Type", resp.headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(len(resp.content)))
        self.end_headers()
        self.wfile.write(resp.content)

    do_GET = do_POST = do_PATCH = do_PUT = _handle

    def log_message(self, *args):
        pass


@pytest.fixture
def proxy(sim):
    server = ThreadingHTTPServer(("127.0.0.1", 0), _FaultyProxy)
    server.target, server.match, server.mode = sim.url, None, "502"
    server.failures_left = server.hits = 0
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(5)


@pytest.mark.parametrize("mode", ["502", "drop"])
def test_5xx_and_network_errors_are_retried_a_bounded_number_of_times(sim, proxy, store, mode):
    """Reads are tried again (a bounded number of times); a state update is not: a 502 or a
    dropped connection may come after Arkindex applied it, so the update raises (unknown) and
    the next call reads the state before sending anything."""
    client = ArkindexAgentClient(
        f"http://127.0.0.1:{proxy.server_port}", FARM, SEED, store, max_attempts=3, max_wait=0.05
    )
    task = one_task(sim)
    start_task(client, task)

    proxy.match, proxy.mode, proxy.method, proxy.failures_left = f"/task/{task}/", mode, "GET", 2
    assert client.update_state(task, "running") is True  # the read's third try goes through
    assert proxy.hits == 3
    assert [h["to"] for h in agent_updates(sim, task)] == ["running"]

    proxy.hits, proxy.failures_left = 0, 10
    with pytest.raises(ArkindexUnavailable, match="failed 3 times") as info:
        client.update_state(task, "completed")
    assert "\n" not in str(info.value)
    assert proxy.hits == 3  # max_attempts, not multiplied by arkindex-client's own retries
    assert [h["to"] for h in agent_updates(sim, task)] == ["running"]

    proxy.hits, proxy.method, proxy.failures_left = 0, "PATCH", 1
    with pytest.raises(ArkindexUnavailable, match="PartialUpdateTask failed once"):
        client.update_state(task, "completed")
    assert proxy.hits == 1  # the update was tried once, never blindly again
    # The guard was released: once Arkindex answers again, the state is read, then sent.
    assert client.update_state(task, "completed") is True
    history = agent_updates(sim, task)
    assert [(h["to"], h["accepted"]) for h in history] == [("running", True), ("completed", True)]


def test_task_state_unreadable_is_unknown_never_absent(sim, proxy, store):
    """Adoption destroys an instance whose task is not active: a 502 blip must not read as
    "no such task" (it raises), only Arkindex's own 404 does (None)."""
    client = ArkindexAgentClient(
        f"http://127.0.0.1:{proxy.server_port}", FARM, SEED, store, max_attempts=2, max_wait=0.05
    )
    task = one_task(sim)
    start_task(client, task)
    assert client.task_state(task) == "pending"
    proxy.match, proxy.mode, proxy.failures_left = f"/api/v1/task/{task}/", "502", 10
    with pytest.raises(ArkindexUnavailable):
        client.task_state(task)
    proxy.mode = "drop"
    with pytest.raises(ArkindexUnavailable):
        client.task_state(task)
    proxy.failures_left = 0
    assert client.task_state(task) == "pending"
    assert client.task_state(str(uuid.uuid4())) is None  # Arkindex says: no such task


def test_a_report_claimed_by_a_dead_worker_is_sent_once_its_lease_lapses(
    sim, store, redis_client, key_prefix
):
    """A worker killed between claiming a state and Arkindex's answer must not leave the
    state "reported": the redelivered report waits for the lease, then sends it."""
    reported = ReportedStates(redis_client, Keyspace(key_prefix), lease=1)
    client = ArkindexAgentClient(sim.url, FARM, SEED, store, max_wait=0.2, reported=reported)
    task = one_task(sim)
    start_task(client, task)
    assert client.update_state(task, "running") is True
    assert reported.claim(task, "completed") == reported.CLAIMED  # ...and the worker dies
    with pytest.raises(ArkindexUnavailable):
        client.update_state(task, "completed")  # in flight elsewhere: unknown, retried later
    assert task_info(sim, task)["state"] == "running"
    time.sleep(1.2)
    assert client.update_state(task, "completed") is True
    assert task_info(sim, task)["state"] == "completed"
    assert client.update_state(task, "completed") is False  # once only
    assert client.update_state(task, "failed") is False  # never a second terminal state
    assert [h["to"] for h in agent_updates(sim, task)] == ["running", "completed"]


def test_definition_cache_is_bounded_and_short_lived(sim, client):
    """Every process caches definitions; bounded, and never long enough to hand out an
    expired pre-signed log URL."""
    client.DEFINITIONS_KEPT = 2
    client.DEFINITION_TTL = 0.5
    tasks = [one_task(sim) for _ in range(4)]
    for task in tasks:
        start_task(client, task)
    first = client.task_definition(tasks[0])
    assert client.task_definition(tasks[0]) is first  # cached
    for task in tasks[1:]:
        client.task_definition(task)
    assert len(client._definitions) == 2  # the oldest were dropped
    newest = client.task_definition(tasks[-1])
    time.sleep(0.6)
    assert client.task_definition(tasks[-1]) is not newest  # read again once too old


def test_a_stalled_arkindex_does_not_hold_a_worker(sim, store):
    """arkindex-client waits 60 s for an answer: every call of the agent's client uses the
    client's own timeout, so an Arkindex that answers late is unknown, not a held worker."""
    client = ArkindexAgentClient(
        sim.url, FARM, SEED, store, max_attempts=2, max_wait=0.05, timeout=(2, 0.5)
    )
    task = one_task(sim)
    start_task(client, task)
    sim.faults.set([{"fault": "slow", "seconds": 3, "operation": "RetrieveTask"}])
    try:
        started = time.monotonic()
        with pytest.raises(ArkindexUnavailable, match="RetrieveTask failed 2 times"):
            client.task_state(task)
        assert time.monotonic() - started < 2.5
    finally:
        sim.faults.clear()
