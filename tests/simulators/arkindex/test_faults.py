"""The Arkindex simulator's fault knobs (faults.py), each through the admin client SimAdmin."""

import time

import pytest
import requests
from arkindex.exceptions import ErrorResponse

from ponos_tasks.simulators.arkindex import ArkindexSimulator
from ponos_tasks.simulators.arkindex.faults import FaultError, parse_flag
from ponos_tasks.simulators.harness import SimAdmin

from .helpers import agent_client, create_process


@pytest.fixture
def admin(sim):
    # Only the Arkindex half of SimAdmin is used: the Vast.ai URL is never called.
    with SimAdmin(vast_url="http://127.0.0.1:9", arkindex_url=sim.url) as client:
        yield client


@pytest.fixture
def world(sim):
    """An agent (raw token, client) with two tasks assigned to it."""
    _, ids = create_process(sim, [{"slug": "a", "image": "img"}, {"slug": "b", "image": "img"}])
    agent, client = agent_client(sim)
    client.request("RetrieveAgentActions")
    return agent, client, ids


def _bearer(agent):
    return {"Authorization": f"Bearer {agent['access_token']}"}


def test_no_fault_by_default(sim, world):
    _, client, ids = world
    assert sim.faults.snapshot() == {"rules": [], "hits": {}}
    assert client.request("RetrieveTaskDefinition", id=ids["a"])["id"] == ids["a"]


def test_http_5xx_scoped_by_operation_with_times(admin, world):
    _, client, ids = world
    admin.arkindex_5xx(503, operation="RetrieveTaskDefinition", times=2)
    for _ in range(2):
        with pytest.raises(ErrorResponse) as failed:
            client.single_request("RetrieveTaskDefinition", id=ids["a"])
        assert failed.value.status_code == 503
        assert failed.value.content["type"] == "server_error"
        # Another operation is not touched while the rule is active.
        assert client.request("RetrieveTask", id=ids["a"])["id"] == ids["a"]
    assert client.request("RetrieveTaskDefinition", id=ids["a"])["id"] == ids["a"]
    assert admin.arkindex_fault_state() == {"rules": [], "hits": {"http_5xx": 2}}


def test_html_502_is_a_load_balancer_page(admin, sim, world):
    agent, _, ids = world
    admin.arkindex_html_502(path=r"/definition/$", times=1)
    url = f"{sim.url}/api/v1/task/{ids['a']}/definition/"
    resp = requests.get(url, headers=_bearer(agent), timeout=10)
    assert resp.status_code == 502
    assert resp.headers["Content-Type"].startswith("text/html")
    assert "502 Bad Gateway" in resp.text and "nginx" in resp.text
    with pytest.raises(ValueError):
        resp.json()
    assert requests.get(url, headers=_bearer(agent), timeout=10).status_code == 200


def test_slow_answers_late_but_answers(admin, world):
    _, client, ids = world
    admin.arkindex_slow(0.6, operation="RetrieveTask", times=1)
    started = time.monotonic()
    assert client.request("RetrieveTask", id=ids["a"])["id"] == ids["a"]
    assert time.monotonic() - started >= 0.6
    started = time.monotonic()
    client.request("RetrieveTask", id=ids["a"])
    assert time.monotonic() - started < 0.5


def test_rate_limit_429_with_retry_after(admin, sim, world):
    agent, _, _ = world
    admin.arkindex_rate_limit(retry_after=7, operation="RetrieveAgentActions", times=1)
    url = f"{sim.url}/api/v1/agent/actions/"
    resp = requests.get(url, headers=_bearer(agent), timeout=10)
    assert resp.status_code == 429
    assert resp.headers["Retry-After"] == "7"
    assert resp.json() == {"detail": "Request was throttled. Expected available in 7 seconds."}
    assert requests.get(url, headers=_bearer(agent), timeout=10).status_code == 200


def test_task_deleted_404_on_every_call_naming_it(admin, world):
    _, client, ids = world
    admin.arkindex_delete_task(ids["a"])
    for operation, params in (
        ("RetrieveTaskDefinition", {}),
        ("RetrieveTask", {}),
        ("PartialUpdateTask", {"body": {"state": "running"}}),
        ("ListArtifacts", {}),
    ):
        with pytest.raises(ErrorResponse) as failed:
            client.single_request(operation, id=ids["a"], **params)
        assert failed.value.status_code == 404, operation
        assert failed.value.content["errors"][0]["code"] == "not_found"
    # The other task is untouched, and the deleted one leaves the agent's actions.
    assert client.request("RetrieveTaskDefinition", id=ids["b"])["id"] == ids["b"]
    actions = client.request("RetrieveAgentActions")["actions"]
    assert actions == [{"action": "start_task", "task_id": ids["b"]}]
    admin.clear_arkindex_faults()
    assert client.request("RetrieveTask", id=ids["a"])["id"] == ids["a"]


def test_token_expired_stays_expired_until_refreshed(admin, sim, world):
    agent, _, ids = world
    admin.arkindex_expire_token(operation="PartialUpdateTask", times=1)
    url = f"{sim.url}/api/v1/task/{ids['a']}/"
    # Another operation does not trigger the rule.
    assert requests.get(url, headers=_bearer(agent), timeout=10).status_code == 200
    patch = requests.patch(url, json={"state": "running"}, headers=_bearer(agent), timeout=10)
    assert patch.status_code == 401
    assert patch.json()["errors"][0]["code"] == "token_not_valid"
    # The rule is spent, but the token stays expired, on every operation.
    assert admin.arkindex_fault_state()["rules"] == []
    assert requests.get(url, headers=_bearer(agent), timeout=10).status_code == 401
    refreshed = requests.post(
        f"{sim.url}/api/v1/agent/refresh/", json={"refresh": agent["refresh_token"]}, timeout=10
    )
    assert refreshed.status_code == 200
    fresh = {"Authorization": f"Bearer {refreshed.json()['access_token']}"}
    patch = requests.patch(url, json={"state": "running"}, headers=fresh, timeout=10)
    assert patch.status_code == 200, patch.text


def test_stale_bearer_refused_on_refresh(admin, sim, world):
    agent, _, _ = world
    refresh_url = f"{sim.url}/api/v1/agent/refresh/"
    body = {"refresh": agent["refresh_token"]}
    sim.state.expire_access_token(agent["access_token"])
    # Without the knob, the stale header is ignored (the refresh token is what counts).
    assert requests.post(refresh_url, json=body, headers=_bearer(agent), timeout=10).ok
    admin.arkindex_stale_bearer_refresh()
    resp = requests.post(refresh_url, json=body, headers=_bearer(agent), timeout=10)
    assert resp.status_code == 401
    assert resp.json()["errors"][0]["code"] == "token_not_valid"
    # The same refresh without the stale header works; so does one with a live token.
    fresh = requests.post(refresh_url, json=body, timeout=10)
    assert fresh.status_code == 200
    live = {"Authorization": f"Bearer {fresh.json()['access_token']}"}
    assert requests.post(refresh_url, json=body, headers=live, timeout=10).ok


def test_scope_by_task_id(admin, world):
    _, client, ids = world
    admin.arkindex_5xx(task=ids["b"])
    assert client.request("RetrieveTask", id=ids["a"])["id"] == ids["a"]
    with pytest.raises(ErrorResponse) as failed:
        client.single_request("RetrieveTask", id=ids["b"])
    assert failed.value.status_code == 500


def test_bad_rules_are_refused(admin):
    for rule in (
        {"fault": "nope"},
        {"fault": "http_5xx", "status": 404},
        {"fault": "slow", "path": "("},
    ):
        with pytest.raises(requests.HTTPError) as failed:
            admin.arkindex_faults(rule)
        assert failed.value.response.status_code == 400
    assert admin.arkindex_fault_state()["rules"] == []


def test_parse_flag_and_constructor_rules(s3_server):
    rule = parse_flag("http_5xx,operation=RetrieveTask,status=503,times=2")
    assert rule == {"fault": "http_5xx", "operation": "RetrieveTask", "status": 503, "times": 2}
    with pytest.raises(FaultError):
        parse_flag("unknown_fault")
    with ArkindexSimulator(s3_url=s3_server.url, faults=[rule]) as sim:
        assert sim.faults.snapshot()["rules"] == [rule]


def test_slow_after_the_effect_applies_the_update_then_answers_late(admin, sim, world):
    """`slow` with `after`: the state update is recorded although its client gave up waiting
    for the answer (a worker killed inside a report leaves exactly this)."""
    agent, _, ids = world
    admin.arkindex_faults(
        {
            "fault": "slow",
            "seconds": 1.5,
            "after": True,
            "operation": "PartialUpdateTask",
            "times": 1,
        }
    )
    url = f"{sim.url}/api/v1/task/{ids['a']}/"
    with pytest.raises(requests.ReadTimeout):
        requests.patch(url, json={"state": "running"}, headers=_bearer(agent), timeout=0.5)
    assert admin.task(ids["a"])["state"] == "running"
    started = time.monotonic()
    assert requests.get(url, headers=_bearer(agent), timeout=10).status_code == 200
    assert time.monotonic() - started < 1.0
