"""`ponos-vast explain TASK_ID` against the local stack: what it shows is what the agent then
does, it writes nothing anywhere, and it names the limit that holds a task."""

from __future__ import annotations

import json
import uuid

import pytest
import yaml
from click.testing import CliRunner

from ponos_tasks.cli import main
from ponos_tasks.explain import ExplainError, explain_task, read_only_context, render
from ponos_tasks.logs import redact
from ponos_tasks.models import Next, StepName
from ponos_tasks.simulators.stack import LocalStack
from ponos_tasks.wrapper import marker_nonce
from tests.agent_harness import Admin, Harness, make_context, wipe

pytestmark = pytest.mark.timeout(120)

FAST = {"SIM_DURATION": "20", "SIM_PULL_SECONDS": "5", "SIM_LOG_LINES": "3"}
SCRIPTED = {**FAST, "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0", "SIM_SELF_STOP": "true"}
CANARY = "canary-secret-value-0123456789"


@pytest.fixture(scope="module")
def local_stack(redis_url):
    """A stack of this module's own: Arkindex hands any pending task of the farm to the
    agent that asks, and these tests leave tasks assigned to agents that never run them."""
    stack = LocalStack(redis_url, time_scale=20.0, start_redis=False)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def admin(local_stack):
    with Admin(local_stack) as admin:
        yield admin


@pytest.fixture
def contexts(local_stack, redis_url):
    made = []

    def make(**overrides):
        ctx = make_context(local_stack, redis_url, **overrides)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        wipe(ctx)
        ctx.redis.close()


def redis_dump(ctx) -> dict:
    """Every key of the context's prefix with its serialized value (TTLs aside)."""
    return {key: ctx.redis.dump(key) for key in ctx.redis.scan_iter(match=ctx.keys.pattern())}


def outside_world(admin: Admin, task_id: str) -> dict:
    """What explain must not change on the simulators: instances ever created, the task's
    state, every agent's tokens (a registration or a refresh adds one). An agent's
    `last_seen` is Arkindex's stamp of any authenticated call, reads included."""
    agents = [{k: v for k, v in a.items() if k != "last_seen"} for a in admin.agents()]
    return {
        "ledger": len(admin.ledger()),
        "state": admin.task(task_id)["state"],
        "agents": json.dumps(agents, sort_keys=True),
    }


def accepted(ctx, task_id: str) -> Harness:
    """The agent's sync loop accepts the task (Arkindex assigns it); its chain is queued."""
    harness = Harness(ctx)
    harness.sync()
    assert ctx.store.get(task_id) is not None, harness.syncs[-1].steps
    return harness


def test_explain_shows_what_the_agent_then_sends_and_writes_nothing(contexts, admin):
    ctx = contexts()
    ids = admin.process(
        "explain",
        [
            {"slug": "parent", "image": "registry.example/worker:1", "state": "completed"},
            {
                "slug": "child",
                "image": "registry.example/worker:1",
                "parents": ["parent"],
                "command": "worker --flag 'two words'",
                "env": {**SCRIPTED, "MY_SETTING": "42", "HF_TOKEN": CANARY},
            },
        ],
    )
    task_id = ids["child"]
    harness = accepted(ctx, task_id)
    redis_before, world_before = redis_dump(ctx), outside_world(admin, task_id)

    explainer = read_only_context(ctx.config, ctx.prefix)
    doc = explain_task(explainer, task_id)
    text = "\n".join(render(doc))

    # Nothing written: Redis, Vast.ai (no create), Arkindex (state, tokens).
    assert redis_dump(ctx) == redis_before
    assert outside_world(admin, task_id) == world_before

    label = f"ponos-{ctx.agent_short_id()}-{task_id}-1"
    request = doc["request"]
    assert request["label"] == label and doc["attempt"] == 1
    assert request["env"]["TASK_BOOTSTRAP"] == "true"
    assert json.loads(request["env"]["TASK_PARENTS"]) == {ids["parent"]: "parent"}
    assert request["env"]["MY_SETTING"] == "42"
    assert doc["definition"]["parents"] == {ids["parent"]: "parent"}
    assert request["args"][-3:] == ["worker", "--flag", "two words"]
    assert doc["budget"]["held_by"] is None and doc["offers"]["chosen"] is not None
    # Secrets: the task's token and our canary, the seed, the Vast.ai key, the nonce.
    token = ctx.arkindex.task_definition(task_id).env["ARKINDEX_TASK_TOKEN"]
    secrets = [token, CANARY, ctx.config.seed, ctx.config.vast_api.api_key]
    secrets.append(marker_nonce(ctx.config.seed, label))
    for shown in (json.dumps(doc), text):
        assert not [s for s in secrets if s in shown]
    assert "HF_TOKEN" in text and "TASK_PARENTS" in text and label in text

    # The agent's chain, run now, rents the offer explain chose and sends its request.
    harness.run(until=lambda: harness.done(task_id), timeout=60)
    [row] = admin.rows_for(task_id)
    assert row["offer_id"] == doc["offers"]["chosen"]["id"]
    assert row["label"] == label
    [instance] = [i for i in admin.instances() if i["label"] == label]
    assert {k: redact(v, secrets) for k, v in instance["env"].items()} == request["env"]


def test_explain_names_the_budget_limit_that_holds_the_task(contexts, admin):
    # Above the smallest price the loop plans for (it accepts the task), far below any offer.
    ctx = contexts(budget={"max_dph_total": 0.002})
    task_id = admin.one_task(env=SCRIPTED)
    accepted(ctx, task_id)
    redis_before = redis_dump(ctx)
    doc = explain_task(read_only_context(ctx.config, ctx.prefix), task_id)
    assert redis_dump(ctx) == redis_before
    assert doc["budget"]["held_by"] == "max_dph_total"
    assert "max_dph_total leaves $0.0020/h" in doc["budget"]["reason"]
    assert doc["offers"]["chosen"] is None and doc["offers"]["ranked"]
    assert "HELD by max_dph_total" in "\n".join(render(doc))


def write_config(ctx, tmp_path) -> str:
    path = tmp_path / "agent.yml"
    path.write_text(yaml.safe_dump(ctx.config.model_dump(mode="json")))
    return str(path)


def test_explain_command_json_and_unknown_task(contexts, admin, tmp_path):
    ctx = contexts()
    task_id = admin.one_task(env=SCRIPTED)
    accepted(ctx, task_id)
    config = write_config(ctx, tmp_path)
    runner = CliRunner()

    result = runner.invoke(
        main, ["explain", task_id, "--config", config, "--prefix", ctx.prefix, "--json"]
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.stdout)["task_id"] == task_id

    unknown = "0b7c1d4e-0000-4000-8000-000000000000"
    result = runner.invoke(main, ["explain", unknown, "--config", config, "--prefix", ctx.prefix])
    assert result.exit_code == 1
    assert f"task {unknown} does not exist on Arkindex" in result.output

    other = contexts()  # another agent of the farm, and its task
    theirs = admin.one_task(env=SCRIPTED)
    accepted(other, theirs)
    result = runner.invoke(main, ["explain", theirs, "--config", config, "--prefix", ctx.prefix])
    assert result.exit_code == 1
    assert f"task {theirs} is not assigned to agent {ctx.config.agent_name}" in result.output


def test_explain_never_registers(contexts, admin):
    ctx = contexts()  # never synced: no credentials in its Redis
    agents = admin.agents()
    with pytest.raises(ExplainError, match="no stored Arkindex credentials"):
        explain_task(read_only_context(ctx.config, ctx.prefix), "a-task-of-nobody")
    assert admin.agents() == agents and redis_dump(ctx) == {}


def test_first_contact_hold_then_run(local_stack, redis_url, admin):
    """README, First contact: a budget no offer fits lets Arkindex assign one task and rents
    nothing; restarted with real limits, the agent rents the offer explain then shows."""
    name, prefix = f"test-{uuid.uuid4().hex[:10]}", f"test-explain-{uuid.uuid4().hex[:10]}:"
    held = make_context(
        local_stack,
        redis_url,
        prefix=prefix,
        agent_name=name,
        budget={"max_instances": 1, "max_dph_total": 0.0002},
    )
    try:
        task_id = admin.one_task(env=SCRIPTED)
        harness = accepted(held, task_id)
        harness.run(until=lambda: held.store.get(task_id).held_by is not None, timeout=30)
        record = held.store.get(task_id)
        assert record.held_by == "max_dph_total" and record.instance_id is None
        assert "max_dph_total leaves $0.0002/h" in record.waiting_for
        assert (
            explain_task(read_only_context(held.config, prefix), task_id)["budget"]["held_by"]
            == "max_dph_total"
        )
        assert admin.rows_for(task_id) == []

        tight = {"max_instances": 1, "max_spend_per_task": 1, "max_spend_per_day": 5}
        ctx = make_context(local_stack, redis_url, prefix=prefix, agent_name=name, budget=tight)
        harness = Harness(ctx)
        harness.sync()  # the allowance grows: the waiting task may rent now
        doc = explain_task(read_only_context(ctx.config, prefix), task_id)
        assert doc["budget"]["held_by"] is None and doc["offers"]["chosen"] is not None
        harness.push(task_id, [Next(StepName.CHOOSE_OFFER)])
        harness.run(until=lambda: harness.done(task_id), timeout=60)
        [row] = admin.rows_for(task_id)
        assert row["offer_id"] == doc["offers"]["chosen"]["id"]
        assert row["label"] == doc["request"]["label"]
    finally:
        wipe(held)
        held.redis.close()


def test_explain_interruptible_shows_the_bid_the_agent_sends(contexts, admin):
    ctx = contexts(vast_api={"interruptible": {"enabled": True, "bid_margin": 0.01}})
    task_id = admin.one_task(env=SCRIPTED)
    harness = accepted(ctx, task_id)
    doc = explain_task(read_only_context(ctx.config, ctx.prefix), task_id)
    assert doc["offers"]["interruptible"] and doc["offers"]["query"]["type"] == "bid"
    chosen = doc["offers"]["chosen"]
    assert chosen["bid"] > 0 and "bid $" in "\n".join(render(doc))
    harness.run(until=lambda: ctx.store.get(task_id).instance_id is not None, timeout=60)
    record = ctx.store.get(task_id)
    assert (record.offer_id, record.bid) == (chosen["id"], pytest.approx(chosen["bid"]))
    [row] = admin.rows_for(task_id)
    assert row["is_bid"]
    harness.run(until=lambda: harness.done(task_id), timeout=60)


def test_explain_says_the_agent_refuses_a_task_that_cannot_run(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(image="", env=SCRIPTED)
    harness = accepted(ctx, task_id)
    doc = explain_task(read_only_context(ctx.config, ctx.prefix), task_id)
    assert doc["refused"] == "its definition has no image" and doc["request"] is None
    assert "REFUSED: the task cannot run: its definition has no image" in "\n".join(render(doc))
    harness.run(until=lambda: harness.done(task_id), timeout=60)
    assert doc["refused"] in ctx.store.get(task_id).reason and admin.rows_for(task_id) == []
