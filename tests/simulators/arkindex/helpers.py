"""Helpers shared by the Arkindex simulator tests (agents, workers, admin calls)."""

import base64

import requests
from arkindex import ArkindexClient
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF


def agent_derivation(url, seed, private_key):
    """The CreateAgent proof computed on the agent's side, written here independently of the
    simulator: base64(HKDF-SHA256(ECDH(agent key, server key), 32, salt=None, info=seed))."""
    pem = requests.get(f"{url}/api/v1/public-key/", timeout=10)
    assert pem.status_code == 200 and pem.headers["Content-Type"] == "application/x-pem-file"
    server_key = serialization.load_pem_public_key(pem.content)
    shared = private_key.exchange(ec.ECDH(), server_key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=seed.encode())
    return base64.b64encode(derived.derive(shared)).decode()


def public_pem(private_key):
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def registration(sim, *, gpu_count=1, hostname="agent-1", key=None, seed=None, farm=None):
    key = key or ec.generate_private_key(ec.SECP384R1())
    farm = farm or sim.farm_id
    return {
        "farm": farm,
        "hostname": hostname,
        "cpu_cores": 4,
        "cpu_frequency": 2000,
        "gpu_count": gpu_count,
        "gpu_names": "RTX 4090" if gpu_count else None,
        "public_key": public_pem(key),
        "derivation": agent_derivation(sim.url, seed or sim.seed, key),
    }


def agent_client(sim, **kwargs):
    """(registration response, ArkindexClient authenticated as that agent)."""
    anonymous = ArkindexClient(base_url=sim.url)
    agent = anonymous.request("CreateAgent", body=registration(sim, **kwargs))
    client = ArkindexClient(base_url=sim.url, token=agent["access_token"], auth_scheme="Bearer")
    return agent, client


def worker_client(sim, token):
    return ArkindexClient(base_url=sim.url, token=token, auth_scheme="Ponos")


def create_process(sim, tasks, name="process"):
    response = requests.post(
        f"{sim.url}/_sim/processes", json={"name": name, "tasks": tasks}, timeout=10
    )
    assert response.status_code == 201, response.text
    created = response.json()
    return created, {t["slug"]: t["id"] for t in created["tasks"]}


def admin_task(sim, task_id):
    response = requests.get(f"{sim.url}/_sim/tasks/{task_id}", timeout=10)
    response.raise_for_status()
    return response.json()
