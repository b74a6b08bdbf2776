"""Task definitions that can never run: each ends `error` with the reason in its published log,
reported to Arkindex, and no instance is ever rented for it (the Vast.ai simulator's ledger).
Steps run in-process (tests/agent_harness.py) against the simulators and a real Redis.
"""

import pytest

from ponos_tasks.definition import MAX_COMMAND_CHARS
from ponos_tasks.simulators.registry import RegistrySimulator
from ponos_tasks.vast import VastClient, VastError

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
    start_and_finish,
)


def assert_refused(ctx, admin, task_id: str, *reason_parts: str) -> str:
    """The task ended `error` for `reason_parts`, said so in its log, and rented nothing."""
    record = ctx.store.get(task_id)
    assert record.final_state == "error", record
    assert record.attempt == 1 and record.instance_id is None
    for part in reason_parts:
        assert part in record.reason, record.reason
    assert admin.accepted_agent_states(task_id) == ["error"]
    log = admin.task_log(task_id)
    assert log is not None and "the task cannot run: " in log and reason_parts[0] in log, log
    assert admin.rows_for(task_id) == []  # nothing rented, ever
    return log


@pytest.mark.parametrize(
    ("spec", "reason"),
    [
        ({"image": None}, "its definition has no image"),
        ({"image": ""}, "its definition has no image"),
        ({"image": "Registry.example/Worker:1"}, "invalid repository name in image reference"),
        (
            {"image": "registry.example/" + "w" * 1100},
            "the image reference is 1117 characters long (Vast.ai takes 1024)",
        ),
        (
            {"command": "python -m worker " + "--flag " * 400},
            f"its command is too long: the wrapped command is 4203 characters, Vast.ai accepts {MAX_COMMAND_CHARS}",
        ),
        (
            {"command": 'python -m worker --name "unclosed'},
            "its command is not valid: the shell could not split it (No closing quotation)",
        ),
        ({"env": {"BIG": "x" * 600}}, "the environment variable BIG is 603 characters long"),
        (
            {"env": {f"VAR_{i}": "y" * 400 for i in range(100)}},
            "variables; Vast.ai takes 32768)",
        ),
        (
            {"definition": {"env": "A=1"}},
            "its definition is malformed: env is a str, not a mapping",
        ),
        (
            {"definition": {"command": ["python", "-m", "worker"]}},
            "command is a list, not a string",
        ),
        (
            {"definition": {"parents": [{"id": "0b7c1d4e-0000-4000-8000-000000000000"}]}},
            'its definition is malformed: parent {"id": "0b7c1d4e-0000-4000-8000-000000000000"} has no id and slug',
        ),
        ({"definition": {"parents": "none"}}, "parents is a str, not a list"),
    ],
    ids=[
        "no-image",
        "empty-image",
        "invalid-image",
        "image-too-long",
        "command-too-long",
        "command-unclosed-quote",
        "env-entry-too-long",
        "env-too-large",
        "env-not-a-mapping",
        "command-not-a-string",
        "parent-without-slug",
        "parents-not-a-list",
    ],
)
def test_a_definition_that_cannot_run_ends_error_and_rents_nothing(contexts, admin, spec, reason):
    ctx = contexts()
    spec = {**spec, "env": {**scripted(0), **spec.get("env", {})}}
    task_id = admin.one_task(**spec)
    start_and_finish(ctx, task_id)
    assert_refused(ctx, admin, task_id, reason)


def test_the_simulator_refuses_a_command_longer_than_vast_accepts(stack):
    """The limit the agent checks is the one the Vast.ai simulator enforces (400)."""
    from tests.test_vast_client import cheapest_offer

    vast = VastClient(stack.vast_url, stack.vast_api_key, max_attempts=1)
    offer = cheapest_offer(vast)
    with pytest.raises(VastError) as refused:
        vast.create_instance(
            offer.id,
            image="registry.example/worker:1",
            label="ponos-test-too-long",
            env={},
            disk=10,
            onstart="sh",
            args=["-c", "x" * MAX_COMMAND_CHARS],
        )
    assert refused.value.status == 400 and refused.value.error == "invalid_args"
    assert "onstart + args longer than 4096 characters" in refused.value.msg


def test_a_create_vast_refuses_ends_error_without_an_instance(contexts, admin):
    """Whatever the agent did not foresee: a create every offer refuses (400) is a definite
    answer, not a transient one: the task ends error with Vast.ai's message."""
    ctx = contexts()
    # A refusal the agent does not check beforehand: a disk under Vast.ai's 8 GB minimum
    # (the configuration refuses it: set behind its back).
    ctx.config.vast_api.disk_gb = 4
    task_id = admin.one_task(env=scripted(0))
    start_and_finish(ctx, task_id)
    log = assert_refused(ctx, admin, task_id, "Vast.ai refused to create its instance")
    assert "disk must be at least 8 GB" in log


@pytest.fixture
def registry():
    with RegistrySimulator() as server:
        server.add_image("team/worker", "1", entrypoint=["worker"], cmd=["--run"])
        yield server


def test_an_image_its_registry_does_not_have_ends_error_and_rents_nothing(
    contexts, admin, registry
):
    ctx = contexts()
    image = f"{registry.host}/team/missing:1"
    task_id = admin.one_task(image=image, command=None, env=scripted(0))
    start_and_finish(ctx, task_id)
    assert_refused(ctx, admin, task_id, "its image does not exist", "not found in registry")


def test_a_non_ascii_command_and_slug_run_as_written(contexts, admin):
    """Not bad input: a slug and a command in UTF-8 reach Vast.ai intact and the task runs."""
    ctx = contexts()
    command = 'python -m worker --titre "Étude n° 3 — 東京 🚀"'
    task_id = admin.process(
        "été",
        [
            {
                "slug": "tâche-é",
                "image": "registry.example/worker:1",
                "command": command,
                "env": scripted(0),
            }
        ],
    )["tâche-é"]
    harness = start_and_finish(ctx, task_id)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record
    (row,) = admin.rows_for(task_id)
    (instance,) = [i for i in admin.instances() if i["id"] == row["id"]]
    assert instance["image_args"][-5:] == [
        "python",
        "-m",
        "worker",
        "--titre",
        "Étude n° 3 — 東京 🚀",
    ]
    assert harness.done(task_id) and "tâche-é" in admin.task(task_id)["slug"]


# ------------------------------------------------------------------ answers that are not answers


@pytest.mark.parametrize(
    ("shape", "operation"),
    [
        ("truncated", "RetrieveTaskDefinition"),
        ("html", "RetrieveTaskDefinition"),
        ("html", "RetrieveAgentActions"),
        ("truncated", "PartialUpdateTask"),  # the state was applied: not sent twice
    ],
)
def test_a_garbled_arkindex_answer_is_retried_and_the_task_ends_once(
    contexts, admin, shape, operation
):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    hits = admin.arkindex_fault_state()["hits"].get("malformed", 0)
    admin.arkindex_malformed(shape, operation=operation, times=2)
    start_and_finish(ctx, task_id)
    assert ctx.store.get(task_id).final_state == "completed"
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    assert admin.arkindex_fault_state()["hits"]["malformed"] - hits == 2
    assert len(admin.rows_for(task_id)) == 1


@pytest.mark.parametrize(
    ("endpoint", "shape"),
    [("list", "truncated"), ("list", "html"), ("show", "wrong_types"), ("create", "truncated")],
)
def test_a_garbled_vast_answer_is_retried_and_never_rents_twice(contexts, admin, endpoint, shape):
    """A garbled create answer is an unknown outcome: the label is looked up, the instance
    adopted, never created again."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    admin.faults({"fault": "malformed", "endpoint": endpoint, "shape": shape, "times": 2})
    start_and_finish(ctx, task_id, timeout=60)
    assert ctx.store.get(task_id).final_state == "completed"
    assert len(admin.rows_for(task_id)) == 1
