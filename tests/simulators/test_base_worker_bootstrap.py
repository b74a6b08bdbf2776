"""The real bootstrap of arkindex-base-worker 0.6.x against the simulators.

base-worker pins arkindex-client==1.3.0, so it lives in its own virtual environment
(.venvs/base-worker, installed by `make tools`). The worker runs as a subprocess, exactly as in
a Vast.ai container: `BaseWorker().configure()` with TASK_BOOTSTRAP=true, TASK_PARENTS,
PONOS_TASK, PONOS_DATA and the ARKINDEX_* variables of the task definition; at exit its
cleanup hook stops "its" Vast.ai instance through CONTAINER_ID / CONTAINER_API_KEY / VAST_URL.
"""

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests

from ponos_tasks.arkindex import Action, ArkindexAgentClient, MemoryCredentialStore
from tests.tool_venvs import tool_bin

pytestmark = pytest.mark.base_worker

REPO = Path(__file__).resolve().parents[2]

# What a worker image runs: the real BaseWorker, configured from the environment.
WORKER_SCRIPT = """
import json, logging, sys
logging.basicConfig(level=logging.INFO, stream=sys.stderr)
from arkindex_worker.worker.base import BaseWorker

worker = BaseWorker(description="ponos-vast bootstrap test")
worker.configure()
print("WORKER-CONFIGURED " + json.dumps({
    "read_only": worker.is_read_only,
    "corpus_id": worker.corpus_id,
    "model_version_id": worker.model_version_id,
    "config": worker.config,
}), flush=True)
"""


@pytest.fixture(scope="session")
def base_worker_python():
    python = tool_bin("base-worker", "python")
    version = subprocess.run(
        [
            str(python),
            "-c",
            "import importlib.metadata as m; print(m.version('arkindex-base-worker'))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert version.returncode == 0 and version.stdout.startswith("0.6."), version.stderr
    return python


def _post(url, body):
    resp = requests.post(url, json=body, timeout=10)
    assert resp.status_code < 300, resp.text
    return resp.json()


def _start(client, task_id):
    for _ in range(40):
        if Action("start_task", task_id) in client.actions():
            return
        time.sleep(0.05)
    raise AssertionError(f"task {task_id} never offered")


def _vast_instance(stack):
    """Rent an instance on the Vast.ai simulator, as the agent would, for the self-stop hook."""
    headers = {"Authorization": f"Bearer {stack.vast_api_key}"}
    offers = requests.post(
        f"{stack.vast_url}/api/v0/bundles/",
        headers=headers,
        timeout=10,
        json={"num_gpus": {"eq": 1}, "rentable": {"eq": True}, "limit": 5},
    )
    assert offers.status_code == 200, offers.text
    offer = offers.json()["offers"][0]
    created = requests.put(
        f"{stack.vast_url}/api/v0/asks/{offer['id']}/",
        headers=headers,
        timeout=10,
        json={
            "client_id": "me",
            "image": "worker:latest",
            "disk": 10,
            "runtype": "args",
            "label": "ponos-test-bootstrap",
            "env": {"SIM_DURATION": "100000", "SIM_SELF_STOP": "false"},
        },
    )
    assert created.status_code == 200 and created.json()["success"], created.text
    return created.json()["new_contract"], created.json()["instance_api_key"]


def _instance(stack, instance_id):
    resp = requests.get(
        f"{stack.vast_url}/api/v0/instances/{instance_id}/",
        headers={"Authorization": f"Bearer {stack.vast_api_key}"},
        timeout=10,
    )
    assert resp.status_code == 200, resp.text
    data = resp.json()
    return data.get("instances", data)


def test_bootstrap_downloads_parents_artifacts_and_model(
    base_worker_python,
    make_local_stack,
    tmp_path,  # noqa: F811
):
    stack = make_local_stack(time_scale=100.0)
    data = tmp_path / "data"
    model_dir = tmp_path / "model"
    weights = bytes(range(256)) * 40
    created = _post(
        f"{stack.arkindex_url}/_sim/processes",
        {
            "name": "bootstrap",
            "tasks": [
                {
                    "slug": "init",
                    "image": "worker:1",
                    "command": None,
                    "parents": [],
                    "artifacts": [
                        {"path": "pages.json", "content": '{"pages": [1, 2]}'},
                        {"path": "notes.txt", "content": "première ligne\n"},
                    ],
                },
                {
                    "slug": "extract",
                    "image": "worker:1",
                    "command": None,
                    "parents": [],
                    "artifacts": [{"path": "lines.csv", "content": "id,text\n1,hello\n"}],
                },
                {
                    "slug": "train",
                    "image": "worker:1",
                    "command": None,
                    "parents": ["init", "extract"],
                    "requires_gpu": True,
                    "configuration": {"epochs": 3},
                    "model": {
                        "name": "htr",
                        "dir": str(model_dir),
                        "files": {"weights.bin": weights.hex(), "conf/params.yml": "lr: 0.1\n"},
                    },
                },
            ],
        },
    )
    ids = {t["slug"]: t["id"] for t in created["tasks"]}

    # An agent runs the two parents to completion; the child then becomes pending.
    agent = ArkindexAgentClient(
        stack.arkindex_url, stack.farm_id, stack.seed, MemoryCredentialStore(), max_wait=0.2
    )
    for slug in ("init", "extract"):
        _start(agent, ids[slug])
        assert agent.update_state(ids[slug], "running")
        assert agent.update_state(ids[slug], "completed")
    _start(agent, ids["train"])
    definition = agent.task_definition(ids["train"])
    assert definition.parents == {ids["init"]: "init", ids["extract"]: "extract"}
    assert definition.env["ARKINDEX_MODEL_DIR"] == str(model_dir)
    assert definition.env["ARKINDEX_MODEL_VERSION"]
    assert agent.update_state(ids["train"], "running")

    instance_id, instance_key = _vast_instance(stack)
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(tmp_path),
        **definition.env,
        "TASK_BOOTSTRAP": "true",
        "TASK_PARENTS": json.dumps(definition.parents),
        "PONOS_DATA": str(data),
        "CONTAINER_ID": str(instance_id),
        "CONTAINER_API_KEY": instance_key,
        "VAST_URL": stack.vast_url,
    }
    assert env["PONOS_TASK"] == ids["train"] and env["ARKINDEX_API_URL"]

    result = subprocess.run(
        [str(base_worker_python), "-c", WORKER_SCRIPT],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    configured = json.loads(result.stdout.split("WORKER-CONFIGURED ", 1)[1])
    assert configured["read_only"] is False
    assert configured["config"] == {"epochs": 3}
    assert configured["model_version_id"] == definition.env["ARKINDEX_MODEL_VERSION"]

    # The documented layout: <data>/<parent id>/<artifact>, <data>/<slug> links, current.
    assert json.loads((data / ids["init"] / "pages.json").read_text()) == {"pages": [1, 2]}
    assert (data / ids["init"] / "notes.txt").read_text(encoding="utf-8") == "première ligne\n"
    assert (data / ids["extract"] / "lines.csv").read_text() == "id,text\n1,hello\n"
    for slug in ("init", "extract"):
        assert (data / slug).is_symlink()
        assert (data / slug).resolve() == (data / ids[slug]).resolve()
    assert (data / "current").is_symlink()
    assert (data / "current").resolve() == (data / ids["train"]).resolve()
    assert (data / ids["train"]).is_dir()
    # The model archive (tar.zst, served as application/zstd) is extracted in place.
    assert model_dir.is_dir(), "the model was not extracted (wrong Content-Type?)"
    assert (model_dir / "conf" / "params.yml").read_text() == "lr: 0.1\n"
    assert (model_dir / "weights.bin").read_text() == weights.hex()
    assert not model_dir.with_suffix(".download").exists()

    # The exit hook stopped the Vast.ai instance with the instance's own key.
    deadline = time.monotonic() + 10
    while _instance(stack, instance_id).get("intended_status") != "stopped":
        assert time.monotonic() < deadline, _instance(stack, instance_id)
        time.sleep(0.1)

    # A restarted container finds `current` and does not bootstrap again.
    again = subprocess.run(
        [str(base_worker_python), "-c", WORKER_SCRIPT],
        env={**env, "CONTAINER_ID": ""},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert again.returncode == 0, again.stderr[-3000:]
    assert "already been setup" in again.stderr
