"""The OpenAPI document, agent registration, token expiry and refresh, authentication."""

import time

import pytest
import requests
from arkindex import ArkindexClient
from arkindex.exceptions import ArkindexClientError, ArkindexValidationError
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from ponos_tasks.simulators.arkindex import ArkindexSimulator

from .helpers import agent_client, create_process, public_pem, registration, worker_client

EXPECTED_OPERATIONS = {
    "GetPublicKey",
    "CreateAgent",
    "RefreshAgentToken",
    "RetrieveAgentActions",
    "RetrieveTaskDefinition",
    "RetrieveTask",
    "PartialUpdateTask",
    "ListArtifacts",
    "CreateArtifact",
    "DownloadArtifact",
    "RetrieveModelVersion",
    "RetrieveWorkerRun",
    "RetrieveWorkerRunConfiguration",
}


def test_openapi_document_accepted_by_arkindex_client(sim):
    raw = requests.get(f"{sim.url}/api/v1/openapi/?format=json", timeout=10).json()
    operations = [op for path in raw["paths"].values() for op in path.values()]
    assert all(op["operationId"] and op["x-paginated"] is False for op in operations)
    client = ArkindexClient(base_url=sim.url)
    assert set(client.document.links) == EXPECTED_OPERATIONS
    # Community Edition: base-worker decides from this that there is no secret store.
    assert "RetrieveSecret" not in client.document.links
    for name in ("CreateAgent", "PartialUpdateTask", "CreateArtifact", "RefreshAgentToken"):
        assert client.lookup_operation(name).get_body_field().name == "body"
    assert client.lookup_operation("DownloadArtifact").url == "/api/v1/task/{id}/artifact/{path}"


def test_registration(sim):
    agent, client = agent_client(sim, gpu_count=2)
    assert agent["farm"] == sim.farm_id and agent["gpu_count"] == 2
    assert agent["access_token"] and agent["refresh_token"] and agent["id"]
    assert client.request("RetrieveAgentActions") == {"actions": []}
    agents = requests.get(f"{sim.url}/_sim/agents", timeout=10).json()["agents"]
    assert [a["id"] for a in agents] == [agent["id"]]


def test_registration_again_with_same_key_keeps_the_agent(sim):
    body = registration(sim)
    client = ArkindexClient(base_url=sim.url)
    first = client.request("CreateAgent", body=body)
    second = client.request("CreateAgent", body=body)
    assert first["id"] == second["id"]
    assert first["access_token"] != second["access_token"]


def test_registration_with_wrong_seed_fails_clearly(sim):
    client = ArkindexClient(base_url=sim.url)
    with pytest.raises(ArkindexValidationError) as caught:
        client.request("CreateAgent", body=registration(sim, seed="not-the-seed"))
    assert caught.value.status_code == 400
    [error] = caught.value.content["errors"]
    assert error["attr"] == ["derivation"] and error["code"] == "invalid"
    assert "seed" in error["detail"]


def test_registration_with_unknown_farm_fails_clearly(sim):
    client = ArkindexClient(base_url=sim.url)
    unknown = "00000000-0000-0000-0000-000000000000"
    with pytest.raises(ArkindexValidationError) as caught:
        client.request("CreateAgent", body=registration(sim, farm=unknown))
    [error] = caught.value.content["errors"]
    assert error["attr"] == ["farm"] and error["code"] == "does_not_exist"
    assert unknown in error["detail"]


@pytest.mark.parametrize(
    "field,value,code",
    [
        ("hostname", "", "required"),
        ("hostname", "bad host!", "invalid"),
        ("cpu_cores", 0, "min_value"),
        ("gpu_count", "two", "invalid"),
        ("public_key", "xyz", "invalid"),
    ],
)
def test_registration_validation(sim, field, value, code):
    body = registration(sim)
    body[field] = value
    response = requests.post(f"{sim.url}/api/v1/agent/", json=body, timeout=10)
    assert response.status_code == 400
    assert response.json() == {
        "type": "validation_error",
        "errors": [
            {"attr": [field], "code": code, "detail": response.json()["errors"][0]["detail"]}
        ],
    }


def test_token_expiry_then_refresh(s3_server):
    with ArkindexSimulator(s3_url=s3_server.url, token_ttl=0.3) as sim:
        agent, client = agent_client(sim)
        assert client.request("RetrieveAgentActions") == {"actions": []}
        time.sleep(0.4)
        with pytest.raises(ArkindexClientError) as caught:
            client.request("RetrieveAgentActions")
        assert caught.value.status_code == 401
        assert caught.value.content["errors"][0]["code"] == "token_not_valid"
        # The refresh itself needs no valid access token (the old one is expired).
        refreshed = client.request("RefreshAgentToken", body={"refresh": agent["refresh_token"]})
        assert refreshed["id"] == agent["id"] and refreshed["access_token"] != agent["access_token"]
        client.session.auth.token = refreshed["access_token"]
        assert client.request("RetrieveAgentActions") == {"actions": []}


def test_refresh_with_unknown_token_is_401(sim):
    client = ArkindexClient(base_url=sim.url)
    with pytest.raises(ArkindexClientError) as caught:
        client.request("RefreshAgentToken", body={"refresh": "nope"})
    assert caught.value.status_code == 401


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Token abc", "Ponos wrong"])
def test_bad_credentials_are_401(sim, header):
    headers = {"Authorization": header} if header else {}
    response = requests.get(f"{sim.url}/api/v1/agent/actions/", headers=headers, timeout=10)
    assert response.status_code == 401
    assert response.json()["type"] == "client_error"


def test_task_token_cannot_act_as_agent(sim):
    _, ids = create_process(sim, [{"slug": "a", "image": "img"}])
    token = requests.get(f"{sim.url}/_sim/tasks/{ids['a']}", timeout=10).json()["token"]
    worker = worker_client(sim, token)
    for operation, kwargs in [
        ("RetrieveAgentActions", {}),
        ("RetrieveTaskDefinition", {"id": ids["a"]}),
        ("PartialUpdateTask", {"id": ids["a"], "body": {"state": "running"}}),
    ]:
        with pytest.raises(ArkindexClientError) as caught:
            worker.request(operation, **kwargs)
        assert caught.value.status_code == 403, operation


def test_get_public_key_is_an_ec_p384_pem(sim):
    response = requests.get(f"{sim.url}/api/v1/public-key/", timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/x-pem-file"
    key = serialization.load_pem_public_key(response.content)
    assert isinstance(key, ec.EllipticCurvePublicKey) and key.curve.name == "secp384r1"
    assert ArkindexClient(base_url=sim.url).lookup_operation("GetPublicKey").url == (
        "/api/v1/public-key/"
    )


def test_registration_needs_a_p384_key_and_its_own_derivation(sim):
    url = f"{sim.url}/api/v1/agent/"
    # Another curve: refused on public_key.
    p256 = ec.generate_private_key(ec.SECP256R1())
    body = registration(sim)
    body["public_key"] = public_pem(p256)
    response = requests.post(url, json=body, timeout=10)
    assert response.status_code == 400 and response.json()["errors"][0]["attr"] == ["public_key"]
    # Another agent's key with this derivation: the proof is bound to the key.
    body = registration(sim)
    body["public_key"] = public_pem(ec.generate_private_key(ec.SECP384R1()))
    response = requests.post(url, json=body, timeout=10)
    assert response.status_code == 400 and response.json()["errors"][0]["attr"] == ["derivation"]
    # The right key and seed: accepted; the same key spelt differently is the same agent.
    key = ec.generate_private_key(ec.SECP384R1())
    first = requests.post(url, json=registration(sim, key=key), timeout=10).json()
    again = registration(sim, key=key)
    again["public_key"] = again["public_key"].replace("\n", "\r\n")
    assert requests.post(url, json=again, timeout=10).json()["id"] == first["id"]
