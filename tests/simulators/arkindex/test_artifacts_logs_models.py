"""Logs and artifacts through pre-signed S3 URLs, model archives, worker runs, and one test
that drives every operation of the document through arkindex-client."""

import io
import tarfile

import pytest
import requests
import zstandard
from arkindex import ArkindexClient
from arkindex.exceptions import ArkindexClientError, ArkindexValidationError

from ponos_tasks.simulators.arkindex.archive import untar_zst
from ponos_tasks.simulators.s3 import s3_client

from .helpers import admin_task, agent_client, create_process, registration, worker_client


def running_task(sim, tasks, slug):
    """Create a process, register an agent, start task `slug`; (ids, agent, definition)."""
    _, ids = create_process(sim, tasks)
    _, agent = agent_client(sim)
    agent.request("RetrieveAgentActions")
    definition = agent.request("RetrieveTaskDefinition", id=ids[slug])
    agent.request("PartialUpdateTask", id=ids[slug], body={"state": "running"})
    return ids, agent, definition


def test_logs_put_through_presigned_url_read_back_byte_for_byte(sim):
    ids, _, definition = running_task(sim, [{"slug": "a", "image": "img"}], "a")
    # Non-ASCII, control characters kept as they are, and several MiB.
    line = "étape 1/3 — Ünïcödé ✓ 漢字 🚀\tcolonne\r\n"
    text = "[agent INFO] démarrage\n" + line * 60000 + "fin sans saut de ligne"
    data = text.encode("utf-8")
    assert len(data) > 2 * 1024 * 1024
    response = requests.put(
        definition["s3_logs_put_url"],
        data=data,
        timeout=60,
        headers={"Content-Type": "text/plain; charset=utf-8"},
    )
    assert response.status_code == 200
    stored = s3_client(sim.s3_url).get_object(Bucket="ponos-logs", Key=f"{ids['a']}.log")
    assert stored["Body"].read() == data
    # Logs are overwritten by each upload (the agent sends the whole text every time).
    requests.put(definition["s3_logs_put_url"], data=b"court", timeout=10)
    published = requests.get(f"{sim.url}/_sim/tasks/{ids['a']}/logs", timeout=10)
    assert published.status_code == 200 and published.content == b"court"
    assert sim.logs(ids["a"]) == b"court"


def test_no_logs_yet_is_404(sim):
    _, ids = create_process(sim, [{"slug": "a", "image": "img"}])
    assert requests.get(f"{sim.url}/_sim/tasks/{ids['a']}/logs", timeout=10).status_code == 404


def test_artifacts_create_upload_list_download(sim):
    ids, _, definition = running_task(
        sim,
        [
            {
                "slug": "parent",
                "image": "img",
                "state": "completed",
                "artifacts": [{"path": "elements.sqlite", "content": "ABC"}],
            },
            {"slug": "a", "image": "img", "parents": ["parent"]},
        ],
        "a",
    )
    worker = worker_client(sim, definition["env"]["ARKINDEX_TASK_TOKEN"])
    payload = bytes(range(256)) * 40
    artifact = worker.request(
        "CreateArtifact",
        id=ids["a"],
        body={
            "path": "model.bin",
            "content_type": "application/octet-stream",
            "size": len(payload),
        },
    )
    assert artifact["path"] == "model.bin" and artifact["size"] == len(payload)
    assert artifact["s3_put_url"].startswith(sim.s3_url + "/ponos-artifacts/")
    put = requests.put(
        artifact["s3_put_url"],
        data=payload,
        timeout=10,
        headers={"Content-Type": "application/octet-stream"},
    )
    assert put.status_code == 200
    with pytest.raises(ArkindexValidationError):  # one artifact per path
        worker.request(
            "CreateArtifact",
            id=ids["a"],
            body={"path": "model.bin", "content_type": "text/plain", "size": 1},
        )

    listed = list(worker.paginate("ListArtifacts", id=ids["a"]))
    assert [(a["path"], a["size"], a["s3_put_url"]) for a in listed] == [
        ("model.bin", len(payload), None)
    ]
    # The parent's artifacts are readable with this task's token (same process).
    assert [a["path"] for a in worker.paginate("ListArtifacts", id=ids["parent"])] == [
        "elements.sqlite"
    ]

    # DownloadArtifact the way base-worker's bootstrap does it: the session, following
    # the redirect to S3, raw bytes.
    link = worker.lookup_operation("DownloadArtifact")
    url = worker.get_url(link, {"id": ids["a"], "path": "model.bin"})
    response = worker.session.get(url, timeout=10)
    assert response.history[0].status_code == 302
    assert response.content == payload
    # ... and through client.request (text content is decoded by the client).
    assert worker.request("DownloadArtifact", id=ids["parent"], path="elements.sqlite") == "ABC"
    with pytest.raises(ArkindexClientError) as caught:
        worker.request("DownloadArtifact", id=ids["a"], path="missing.txt")
    assert caught.value.status_code == 404


def test_task_token_scope(sim):
    ids, _, definition = running_task(
        sim, [{"slug": "a", "image": "img"}, {"slug": "b", "image": "img"}], "a"
    )
    _, other_ids = create_process(sim, [{"slug": "x", "image": "img"}])
    worker = worker_client(sim, definition["env"]["ARKINDEX_TASK_TOKEN"])
    assert worker.request("RetrieveTask", id=ids["a"])["state"] == "running"
    worker.request("ListArtifacts", id=ids["b"])  # same process: allowed
    for operation, kwargs in [
        ("RetrieveTask", {"id": ids["b"]}),
        ("ListArtifacts", {"id": other_ids["x"]}),
        ("CreateArtifact", {"id": ids["b"], "body": {"path": "f", "content_type": "t", "size": 1}}),
    ]:
        with pytest.raises(ArkindexClientError) as caught:
            worker.request(operation, **kwargs)
        assert caught.value.status_code == 403, operation


def test_model_version_archive_is_zstd_tar(sim):
    ids, _, definition = running_task(
        sim,
        [
            {
                "slug": "a",
                "image": "img",
                "model": {
                    "files": {"model.txt": "hello world\n", "config.json": "{}"},
                    "configuration": {"epochs": 3},
                },
            }
        ],
        "a",
    )
    worker = worker_client(sim, definition["env"]["ARKINDEX_TASK_TOKEN"])
    version = worker.request("RetrieveModelVersion", id=definition["env"]["ARKINDEX_MODEL_VERSION"])
    assert version["configuration"] == {"epochs": 3}
    # Fetched without Arkindex credentials, as base-worker does.
    response = requests.get(version["s3_url"], timeout=10)
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/zstd"
    assert untar_zst(response.content) == {"model.txt": b"hello world\n", "config.json": b"{}"}
    # Independently of our helper: zstd frame then a plain tar.
    raw = zstandard.ZstdDecompressor().stream_reader(io.BytesIO(response.content)).read()
    with tarfile.open(fileobj=io.BytesIO(raw)) as tar:
        assert sorted(tar.getnames()) == ["config.json", "model.txt"]


def test_worker_run_and_configuration(sim):
    ids, _, definition = running_task(
        sim,
        [
            {
                "slug": "a",
                "image": "img",
                "requires_gpu": True,
                "configuration": {"batch": 8},
                "model": {"files": {"m": "x"}, "configuration": {"lr": 0.1}},
            }
        ],
        "a",
    )
    worker = worker_client(sim, definition["env"]["ARKINDEX_TASK_TOKEN"])
    run_id = definition["env"]["ARKINDEX_WORKER_RUN_ID"]
    run = worker.request("RetrieveWorkerRun", id=run_id)
    assert run["id"] == run_id and run["summary"]
    assert run["process"]["id"] == definition["process_id"] and run["process"]["corpus"]
    assert run["process"]["mode"] == "workers"
    assert run["worker_version"]["worker"]["name"]
    assert run["model_version"]["id"] == definition["env"]["ARKINDEX_MODEL_VERSION"]
    assert run["model_version"]["configuration"] == {"lr": 0.1}
    config = worker.request("RetrieveWorkerRunConfiguration", id=run_id)
    assert config == {"configuration": [{"key": "batch", "value": 8, "secret": False}]}
    _, other_ids = create_process(sim, [{"slug": "x", "image": "img"}])
    other_run = admin_task(sim, other_ids["x"])["worker_run_id"]
    with pytest.raises(ArkindexClientError) as caught:
        worker.request("RetrieveWorkerRun", id=other_run)
    assert caught.value.status_code == 403


def test_every_operation_through_arkindex_client(sim):
    """One pass over the whole document with arkindex-client, nothing else."""
    called = set()
    anonymous = ArkindexClient(base_url=sim.url)
    _, ids = create_process(
        sim,
        [
            {
                "slug": "parent",
                "image": "img",
                "state": "completed",
                "artifacts": [{"path": "a.txt", "content": "parent artifact"}],
            },
            {"slug": "task", "image": "img", "parents": ["parent"], "model": {"files": {"m": "x"}}},
        ],
    )
    # GetPublicKey answers a PEM file, which arkindex-client saves to a temporary file.
    with anonymous.request("GetPublicKey") as pem:
        assert b"BEGIN PUBLIC KEY" in pem.read()
    called.add("GetPublicKey")
    agent = anonymous.request("CreateAgent", body=registration(sim))
    called.add("CreateAgent")
    refreshed = anonymous.request("RefreshAgentToken", body={"refresh": agent["refresh_token"]})
    called.add("RefreshAgentToken")
    client = ArkindexClient(base_url=sim.url, token=refreshed["access_token"], auth_scheme="Bearer")
    assert client.request("RetrieveAgentActions", capacity=1)["actions"] == [
        {"action": "start_task", "task_id": ids["task"]}
    ]
    called.add("RetrieveAgentActions")
    definition = client.request("RetrieveTaskDefinition", id=ids["task"])
    called.add("RetrieveTaskDefinition")
    client.request("PartialUpdateTask", id=ids["task"], body={"state": "running"})
    called.add("PartialUpdateTask")
    assert client.request("RetrieveTask", id=ids["task"])["state"] == "running"
    worker = worker_client(sim, definition["env"]["ARKINDEX_TASK_TOKEN"])
    assert worker.request("RetrieveTask", id=ids["task"])["parents"] == [ids["parent"]]
    called.add("RetrieveTask")
    assert [a["path"] for a in worker.paginate("ListArtifacts", id=ids["parent"])] == ["a.txt"]
    called.add("ListArtifacts")
    assert worker.request("DownloadArtifact", id=ids["parent"], path="a.txt") == "parent artifact"
    called.add("DownloadArtifact")
    created = worker.request(
        "CreateArtifact",
        id=ids["task"],
        body={"path": "out.txt", "content_type": "text/plain", "size": 3},
    )
    requests.put(created["s3_put_url"], data=b"out", timeout=10).raise_for_status()
    called.add("CreateArtifact")
    version = worker.request("RetrieveModelVersion", id=definition["env"]["ARKINDEX_MODEL_VERSION"])
    assert requests.get(version["s3_url"], timeout=10).headers["Content-Type"] == "application/zstd"
    called.add("RetrieveModelVersion")
    run_id = definition["env"]["ARKINDEX_WORKER_RUN_ID"]
    worker.request("RetrieveWorkerRun", id=run_id)
    called.add("RetrieveWorkerRun")
    worker.request("RetrieveWorkerRunConfiguration", id=run_id)
    called.add("RetrieveWorkerRunConfiguration")
    client.request("PartialUpdateTask", id=ids["task"], body={"state": "completed"})
    assert called == set(anonymous.document.links)
