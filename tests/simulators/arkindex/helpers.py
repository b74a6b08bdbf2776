"""Helpers shared by the Arkindex simulator tests (agents, workers, admin calls)."""

import secrets

import requests
from arkindex import ArkindexClient

from ponos_tasks.simulators.arkindex import derivation_for


def registration(sim, *, gpu_count=1, hostname="agent-1", nonce=None, seed=None, farm=None):
    nonce = nonce or secrets.token_hex(32)
    farm = farm or sim.farm_id
    return {
        "farm": farm,
        "hostname": hostname,
        "cpu_cores": 4,
        "cpu_frequency": 2000,
        "gpu_count": gpu_count,
        "gpu_names": "RTX 4090" if gpu_count else None,
        "public_key": nonce,
        "derivation": derivation_for(seed or sim.seed, farm, nonce),
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
