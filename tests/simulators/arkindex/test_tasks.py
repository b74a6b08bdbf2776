"""Assignment, task definitions, the state table, parents scheduling and the stop flow."""

import pytest
import requests
from arkindex.exceptions import ArkindexClientError, ArkindexValidationError

from .helpers import admin_task, agent_client, create_process


def start(client, task_id):
    return client.request("PartialUpdateTask", id=task_id, body={"state": "running"})


def finish(client, task_id, state="completed"):
    return client.request("PartialUpdateTask", id=task_id, body={"state": state})


def test_assignment_gpu_and_capacity(sim):
    _, ids = create_process(
        sim,
        [
            {"slug": "cpu-1", "image": "img"},
            {"slug": "gpu-1", "image": "img", "requires_gpu": True},
            {"slug": "cpu-2", "image": "img"},
            {"slug": "cpu-3", "image": "img"},
        ],
    )
    _, cpu_agent = agent_client(sim, gpu_count=0, hostname="cpu")
    _, gpu_agent = agent_client(sim, gpu_count=1, hostname="gpu")

    # capacity bounds the *new* assignments; GPU tasks are skipped for a GPU-less agent.
    actions = cpu_agent.request("RetrieveAgentActions", capacity=2)["actions"]
    assert actions == [
        {"action": "start_task", "task_id": ids["cpu-1"]},
        {"action": "start_task", "task_id": ids["cpu-2"]},
    ]
    # Assigned tasks keep coming back as start_task until reported running.
    again = cpu_agent.request("RetrieveAgentActions", capacity=0)["actions"]
    assert again == actions
    gpu_actions = gpu_agent.request("RetrieveAgentActions")["actions"]
    assert gpu_actions == [
        {"action": "start_task", "task_id": ids["gpu-1"]},
        {"action": "start_task", "task_id": ids["cpu-3"]},
    ]
    start(cpu_agent, ids["cpu-1"])
    assert cpu_agent.request("RetrieveAgentActions")["actions"] == [
        {"action": "start_task", "task_id": ids["cpu-2"]}
    ]
    # Another agent's task is out of reach.
    with pytest.raises(ArkindexClientError) as caught:
        gpu_agent.request("RetrieveTaskDefinition", id=ids["cpu-1"])
    assert caught.value.status_code == 403
    with pytest.raises(ArkindexClientError) as caught:
        gpu_agent.request("PartialUpdateTask", id=ids["cpu-2"], body={"state": "running"})
    assert caught.value.status_code == 403


def test_unknown_task_is_404(sim):
    _, client = agent_client(sim)
    with pytest.raises(ArkindexClientError) as caught:
        client.request("RetrieveTaskDefinition", id="00000000-0000-0000-0000-000000000000")
    assert caught.value.status_code == 404


def test_task_definition(sim):
    _, ids = create_process(
        sim,
        [
            {"slug": "init", "image": "img", "state": "completed"},
            {"slug": "prep", "image": "img", "state": "completed"},
            {
                "slug": "train",
                "image": "registry.example/worker:1",
                "command": "worker --go",
                "env": {"FOO": "bar"},
                "parents": ["init", "prep"],
                "requires_gpu": True,
                "model": {"files": {"weights.txt": "w"}, "dir": "/data/model"},
            },
        ],
    )
    _, client = agent_client(sim)
    assert client.request("RetrieveAgentActions")["actions"] == [
        {"action": "start_task", "task_id": ids["train"]}
    ]
    definition = client.request("RetrieveTaskDefinition", id=ids["train"])
    assert definition["id"] == ids["train"] and definition["slug"] == "train"
    assert definition["image"] == "registry.example/worker:1"
    assert definition["command"] == "worker --go"
    assert definition["requires_gpu"] is True
    assert definition["parents"] == [
        {"id": ids["init"], "slug": "init"},
        {"id": ids["prep"], "slug": "prep"},
    ]
    env = definition["env"]
    task = admin_task(sim, ids["train"])
    assert env["FOO"] == "bar"
    assert env["ARKINDEX_API_URL"] == sim.url
    assert env["ARKINDEX_TASK_TOKEN"] == task["token"]
    assert env["PONOS_TASK"] == ids["train"]
    assert env["ARKINDEX_WORKER_RUN_ID"] == task["worker_run_id"]
    assert env["ARKINDEX_MODEL_VERSION"] == task["model_version_id"]
    assert env["ARKINDEX_MODEL_DIR"] == "/data/model"
    assert definition["s3_logs_put_url"].startswith(sim.s3_url + "/ponos-logs/")


def test_forbidden_transition_and_repeated_terminal_state_are_refused_and_recorded(sim):
    _, ids = create_process(sim, [{"slug": "a", "image": "img"}])
    _, client = agent_client(sim)
    client.request("RetrieveAgentActions")
    # pending -> completed skips running: forbidden.
    with pytest.raises(ArkindexValidationError) as caught:
        finish(client, ids["a"])
    assert caught.value.status_code == 400
    assert caught.value.content["errors"][0]["code"] == "invalid_transition"
    assert start(client, ids["a"])["state"] == "running"
    assert finish(client, ids["a"])["state"] == "completed"
    for repeated in ("completed", "failed", "running"):
        with pytest.raises(ArkindexValidationError) as caught:
            finish(client, ids["a"], repeated)
        assert caught.value.status_code == 400
    with pytest.raises(ArkindexValidationError):
        finish(client, ids["a"], "bogus")

    history = [
        (h["from"], h["to"], h["accepted"], h["status"], h["source"])
        for h in admin_task(sim, ids["a"])["history"]
    ]
    assert history == [
        ("unscheduled", "pending", True, None, "scheduler"),
        ("pending", "completed", False, 400, "agent"),
        ("pending", "running", True, 200, "agent"),
        ("running", "completed", True, 200, "agent"),
        ("completed", "completed", False, 400, "agent"),
        ("completed", "failed", False, 400, "agent"),
        ("completed", "running", False, 400, "agent"),
        ("completed", "bogus", False, 400, "agent"),
    ]
    refused = [h for h in admin_task(sim, ids["a"])["history"] if not h["accepted"]]
    assert all(h["error"] for h in refused)
    assert admin_task(sim, ids["a"])["state"] == "completed"


def test_parents_scheduling(sim):
    _, ids = create_process(
        sim,
        [
            {"slug": "a", "image": "img"},
            {"slug": "b", "image": "img"},
            {"slug": "c", "image": "img", "parents": ["a", "b"]},
            {"slug": "d", "image": "img", "parents": ["b"]},
        ],
    )
    _, client = agent_client(sim)
    states = lambda: {s: admin_task(sim, i)["state"] for s, i in ids.items()}  # noqa: E731
    assert states() == {"a": "pending", "b": "pending", "c": "unscheduled", "d": "unscheduled"}
    client.request("RetrieveAgentActions")
    start(client, ids["a"])
    start(client, ids["b"])
    finish(client, ids["a"])
    assert states()["c"] == "unscheduled"  # b is not completed yet
    finish(client, ids["b"], "failed")
    # A failed parent leaves its children unscheduled for good.
    assert states() == {"a": "completed", "b": "failed", "c": "unscheduled", "d": "unscheduled"}
    assert client.request("RetrieveAgentActions")["actions"] == []


def test_children_become_pending_when_all_parents_completed(sim):
    _, ids = create_process(
        sim,
        [
            {"slug": "a", "image": "img"},
            {"slug": "b", "image": "img", "parents": ["a"]},
        ],
    )
    _, client = agent_client(sim)
    client.request("RetrieveAgentActions")
    start(client, ids["a"])
    finish(client, ids["a"])
    assert admin_task(sim, ids["b"])["state"] == "pending"
    assert client.request("RetrieveAgentActions")["actions"] == [
        {"action": "start_task", "task_id": ids["b"]}
    ]


def test_stop_flow(sim):
    _, ids = create_process(
        sim,
        [
            {"slug": "running", "image": "img"},
            {"slug": "assigned", "image": "img"},
            {"slug": "child", "image": "img", "parents": ["running"]},
            {"slug": "waiting", "image": "img", "requires_gpu": True},
        ],
    )
    _, client = agent_client(sim, gpu_count=0)
    client.request("RetrieveAgentActions")
    start(client, ids["running"])

    def stop(slug):
        response = requests.post(f"{sim.url}/_sim/tasks/{ids[slug]}/stop", timeout=10)
        response.raise_for_status()
        return response.json()["state"]

    assert stop("running") == "stopping"
    assert stop("assigned") == "stopping"
    assert stop("child") == "stopped"  # unscheduled
    assert stop("waiting") == "stopped"  # pending, no agent holds it
    actions = client.request("RetrieveAgentActions")["actions"]
    assert actions == [
        {"action": "stop_task", "task_id": ids["running"]},
        {"action": "stop_task", "task_id": ids["assigned"]},
    ]
    # A stopping task may not complete: the agent must report stopped.
    with pytest.raises(ArkindexValidationError):
        finish(client, ids["running"], "completed")
    assert finish(client, ids["running"], "stopped")["state"] == "stopped"
    assert finish(client, ids["assigned"], "stopped")["state"] == "stopped"
    assert client.request("RetrieveAgentActions")["actions"] == []
    with pytest.raises(ArkindexValidationError):
        finish(client, ids["running"], "stopped")
    sources = [(h["to"], h["source"]) for h in admin_task(sim, ids["running"])["history"]]
    assert sources == [
        ("pending", "scheduler"),
        ("running", "agent"),
        ("stopping", "user"),
        ("completed", "agent"),
        ("stopped", "agent"),
        ("stopped", "agent"),
    ]


def test_admin_rejects_bad_processes(sim):
    for tasks, message in [
        ([], "tasks"),
        # a task without an image is allowed (the agent refuses it), not one of another type
        ([{"slug": "a", "image": 5}], "image"),
        ([{"slug": "a", "image": "i", "definition": "x"}], "definition"),
        ([{"slug": "a", "image": "i", "parents": ["zz"]}], "unknown parent"),
        ([{"slug": "a", "image": "i"}, {"slug": "a", "image": "i"}], "unique"),
        (
            [
                {"slug": "a", "image": "i", "parents": ["b"]},
                {"slug": "b", "image": "i", "parents": ["a"]},
            ],
            "cycle",
        ),
        ([{"slug": "a", "image": "i", "command": ["ls"]}], "command"),
    ]:
        response = requests.post(f"{sim.url}/_sim/processes", json={"tasks": tasks}, timeout=10)
        assert response.status_code == 400, tasks
        assert message in response.json()["error"]


def test_admin_listing(sim):
    created, ids = create_process(sim, [{"slug": "a", "image": "img"}], name="demo")
    listing = requests.get(
        f"{sim.url}/_sim/tasks", params={"process": created["id"]}, timeout=10
    ).json()["tasks"]
    assert [t["id"] for t in listing] == [ids["a"]]
    process = requests.get(f"{sim.url}/_sim/processes/{created['id']}", timeout=10).json()
    assert process["name"] == "demo" and process["tasks"][0]["state"] == "pending"
    stopped = requests.post(f"{sim.url}/_sim/processes/{created['id']}/stop", timeout=10).json()
    assert stopped["tasks"][0]["state"] == "stopped"
    assert requests.get(f"{sim.url}/_sim/tasks/nope", timeout=10).status_code == 404


def test_invalid_capacity_is_400(sim):
    _, client = agent_client(sim)
    for capacity in (-1, "many"):
        with pytest.raises(ArkindexValidationError) as caught:
            client.request("RetrieveAgentActions", capacity=capacity)
        assert caught.value.content["errors"][0]["attr"] == ["capacity"]
