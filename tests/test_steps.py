"""The agent's per-task steps and sync loop, called directly (no Celery), against the real
simulators and a real Redis (tests/agent_harness.py runs the steps in-process).

One stack (time_scale 100: one simulated minute is 0.6 s) serves the tests that leave the
market alone; each context has its own Redis prefix and agent identity, and faults are scoped
to one task by a label regex. Tests that empty the market use a private stack.
"""

import json
import re
import time

import pytest

from ponos_tasks import steps
from ponos_tasks.lifecycle import Phase, parse_label
from ponos_tasks.models import Next, StepName
from ponos_tasks.offers import build_query, offer_matches, rank_offers
from tests.agent_harness import Admin, Harness, make_context, wipe
from tests.fixtures_stack import running_stack

TIME_SCALE = 100.0
FAST = {"SIM_DURATION": "20", "SIM_PULL_SECONDS": "5", "SIM_LOG_LINES": "3"}


def scripted(code: int = 0, **extra) -> dict:
    """Env knobs of a scripted instance that behaves like the wrapper: it ends with the
    marker line and stops its own instance."""
    return {
        **FAST,
        "SIM_FINAL_LINES": f"PONOS_EXIT_CODE={code}",
        "SIM_SELF_STOP": "true",
        **extra,
    }


@pytest.fixture(scope="module")
def stack(redis_url):
    with running_stack(redis_url, TIME_SCALE) as stack:
        yield stack


@pytest.fixture
def admin(stack):
    admin = Admin(stack)
    yield admin
    admin.clear_faults()


@pytest.fixture
def contexts(stack, redis_url):
    """make(**overrides) -> AgentContext; every context's keys are wiped afterwards."""
    made = []

    def make(**overrides):
        ctx = make_context(stack, redis_url, **overrides)
        made.append(ctx)
        return ctx

    yield make
    admin = Admin(stack)
    prefixes = {ctx.label_prefix() for ctx in made if ctx._registered}
    try:
        # Whatever the test did: nothing of ours left running, and never two live instances
        # for one task at any moment (from the simulator's event timeline).
        assert [
            r["label"]
            for r in admin.ledger()
            if r["destroyed_at"] is None and (r["label"] or "").startswith(tuple(prefixes))
        ] == []
        live: dict[str, int] = {}
        for event in admin.events():
            info = parse_label(event.get("label"))
            if info is None or f"ponos-{info.agent_short_id}-" not in prefixes:
                continue
            if event["event"] in ("created", "destroyed"):
                live[info.task_id] = live.get(info.task_id, 0) + (
                    1 if event["event"] == "created" else -1
                )
                assert live[info.task_id] <= 1, f"two live instances for {info.task_id}"
    finally:
        for ctx in made:
            wipe(ctx)
            ctx.redis.close()


def start_and_finish(ctx, task_id: str, timeout: float = 30.0) -> Harness:
    """Sync until Arkindex hands us the task, then run its chain to the end."""
    harness = Harness(ctx)
    harness.sync()
    assert any(
        s
        for s in harness.syncs[-1].steps
        if type(s).__name__ == "AcceptTask" and s.task_id == task_id
    ), harness.syncs[-1].steps
    harness.run(until=lambda: harness.done(task_id), timeout=timeout)
    return harness


def agent_lines(ctx, log: str) -> list[str]:
    """The published lines formatted with logging.task_format (agent lines)."""
    head = ctx.config.logging.task_format.split("%(", 1)[0]  # e.g. "[agent "
    return [line for line in log.splitlines() if line.startswith(head)]


def wait_visible(stack, instance_id: int, timeout: float = 5.0) -> None:
    """Until the simulator's reads show a new instance (in-process: no rate-limited call)."""
    deadline = time.monotonic() + timeout
    while stack.vast.state.show(instance_id)[1]["instances"] is None:
        assert time.monotonic() < deadline, f"instance {instance_id} never became visible"
        time.sleep(0.01)


def live_labels(admin: Admin, task_id: str) -> list[str]:
    return [row["label"] for row in admin.rows_for(task_id) if row["destroyed_at"] is None]


# --------------------------------------------------------------------------- happy path


@pytest.mark.parametrize("code,state", [(0, "completed"), (3, "failed")])
def test_marker_decides_final_state(contexts, admin, code, state):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(code))
    start_and_finish(ctx, task_id)

    record = ctx.store.get(task_id)
    assert record.final_state == state and record.attempt == 1
    assert admin.task(task_id)["state"] == state
    # running, then the final state, each reported once and accepted
    assert admin.accepted_agent_states(task_id) == ["running", state]
    refused = [h for h in admin.task(task_id)["history"] if not h["accepted"]]
    assert refused == []
    rows = admin.rows_for(task_id)
    assert len(rows) == 1 and rows[0]["destroyed_at"] is not None
    assert admin.stats()["max_live_per_label"][rows[0]["label"]] == 1
    # Measured once each (metric_store): the wait to run, and the bill after the end.
    waits = ctx.metric_store.read().histograms
    assert waits["task_pending_to_running_seconds"].count == 1
    assert waits["task_end_to_destroy_seconds"].count == 1
    assert ctx.metric_store.read().start_failures == {}


def test_ended_instance_log_is_read_once(contexts, admin):
    """The log that decided the outcome is reused for the final upload: one request_logs
    call per task when no periodic upload happens (the logs endpoint is rate limited)."""
    ctx = contexts(logs_interval=3600)
    before = admin.stats()["calls"].get("logs", 0)
    task_id = admin.one_task(env=scripted(0))
    start_and_finish(ctx, task_id)
    assert admin.stats()["calls"].get("logs", 0) - before == 1
    assert "PONOS_EXIT_CODE=0" in admin.task_log(task_id)
    assert list(ctx.redis.scan_iter(match=ctx.keys.ended_log("*", "*"))) == []


def test_published_log_agent_lines_first_no_secrets(stack, contexts, admin):
    """Local run mode: the real wrapper runs `sh -c` and the task prints secrets it knows."""
    ctx = contexts()
    vast_key, seed = stack.vast_api_key, stack.seed
    command = (
        "sh -c 'echo hello-from-task; echo token=$ARKINDEX_TASK_TOKEN; "
        f"echo seed={seed}; echo key={vast_key}; exit 0'"
    )
    task_id = admin.one_task(command=command, env={**FAST, "SIM_RUN_MODE": "local"})
    start_and_finish(ctx, task_id)

    log = admin.task_log(task_id)
    assert log is not None
    [instance] = [i for i in admin.instances() if task_id in (i["label"] or "")]
    token = instance["env"]["ARKINDEX_TASK_TOKEN"]
    lines = log.splitlines()
    mine = agent_lines(ctx, log)
    assert mine, log
    assert any("accepted" in line for line in mine)
    # The agent's lines come first, then the instance's output and the marker.
    first_instance = lines.index("hello-from-task")
    assert lines.index(mine[-1]) < first_instance
    assert any(line.startswith("PONOS_EXIT_CODE=0 ") for line in lines[first_instance:])
    assert admin.task(task_id)["state"] == "completed"
    for secret in (seed, vast_key):
        assert secret not in log
    assert token and token not in log and "token=" in log
    # A line formatted by task_format: "[agent LEVEL time] message"
    assert re.match(r"^\[agent (INFO|WARNING|ERROR) ", mine[0]), mine[0]


# --------------------------------------------------------------------------- instance env


def test_instance_env_parents_gpu_runtype_label(contexts, admin):
    ctx = contexts()
    ids = admin.process(
        "test",
        [
            {"slug": "parent", "image": "registry.example/worker:1", "state": "completed"},
            {
                "slug": "child",
                "image": "registry.example/worker:1",
                "parents": ["parent"],
                "command": "worker --flag 'two words'",
                "env": {**scripted(0), "MY_SETTING": "42"},
            },
            {
                "slug": "orphan",
                "image": "registry.example/worker:1",
                "env": scripted(0),
                "command": "worker",
            },
        ],
    )
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: harness.done(ids["child"]) and harness.done(ids["orphan"]))

    by_task = {
        tid: [i for i in admin.instances() if tid in (i["label"] or "")]
        for tid in (ids["child"], ids["orphan"])
    }
    assert all(len(found) == 1 for found in by_task.values()), by_task
    child, orphan = by_task[ids["child"]][0], by_task[ids["orphan"]][0]
    assert json.loads(child["env"]["TASK_PARENTS"]) == {ids["parent"]: "parent"}
    assert orphan["env"]["TASK_PARENTS"] == "{}"
    for inst, tid in ((child, ids["child"]), (orphan, ids["orphan"])):
        env = inst["env"]
        assert env["TASK_BOOTSTRAP"] == "true"
        assert env["PONOS_TASK"] == tid
        assert env["ARKINDEX_TASK_TOKEN"]  # the definition's env is passed on
        assert inst["num_gpus"] == 1
        assert inst["image_runtype"] == "args"
        info = parse_label(inst["label"])
        assert info is not None and inst["label"] == f"ponos-{ctx.agent_short_id()}-{tid}-1"
        assert (info.task_id, info.attempt) == (tid, 1)
    assert child["env"]["MY_SETTING"] == "42"
    # the task's command, wrapped: sh -c <wrapper> ponos-task <argv...>
    assert child["command"][0] == "sh" and child["command"][-3:] == [
        "worker",
        "--flag",
        "two words",
    ]
    query = build_query(ctx.config.vast_api.offer_filters, disk_gb=ctx.config.vast_api.disk_gb)
    assert query["num_gpus"] == {"eq": 1}


# --------------------------------------------------------------------------- offer choice


def _expected_ranking(ctx, admin) -> list[dict]:
    """The market's offers that match the agent's query, ranked with the price at our disk."""
    vast = ctx.config.vast_api
    query = build_query(
        vast.offer_filters, disk_gb=vast.disk_gb, max_dph=ctx.config.budget.max_dph_per_instance
    )
    filters = {
        k: v for k, v in query.items() if k not in ("order", "type", "allocated_storage", "limit")
    }
    rows = []
    for offer in admin.offers():
        if offer_matches(filters, offer):
            price = offer["dph_base"] + offer["storage_cost"] * vast.disk_gb / 720.0
            rows.append({**offer, "dph_total": price})
    return rank_offers(rows)


def test_cheapest_matching_offer_is_rented(contexts, admin):
    ctx = contexts(vast_api={"offer_filters": {"gpu_ram": {"gte": 20000}}})
    task_id = admin.one_task(env=scripted(0), command="worker")
    ranking = _expected_ranking(ctx, admin)
    assert len(ranking) >= 2
    start_and_finish(ctx, task_id)
    [row] = admin.rows_for(task_id)
    assert row["offer_id"] == ranking[0]["id"]
    assert ctx.store.get(task_id).offer_id == ranking[0]["id"]


# --------------------------------------------------------------------------- faults


def first_attempt(ctx, task_id: str) -> str:
    return f"^ponos-{ctx.agent_short_id()}-{re.escape(task_id)}-1$"


def test_offer_vanished_takes_next_offer(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "offer_vanished", "label": task_id, "times": 1})
    ranking = _expected_ranking(ctx, admin)
    harness = start_and_finish(ctx, task_id)
    [row] = admin.rows_for(task_id)
    assert row["offer_id"] == ranking[1]["id"]
    assert ctx.store.get(task_id).final_state == "completed"
    assert "was taken before we could rent it" in admin.task_log(task_id)
    assert harness.steps_of(task_id).count(StepName.CREATE_INSTANCE) == 1
    assert ctx.metric_store.read().start_failures == {"offer_gone": 1}


def test_create_lost_adopts_by_label_no_duplicate(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "create_lost", "label": task_id, "times": 1})
    harness = start_and_finish(ctx, task_id)
    rows = admin.rows_for(task_id)
    assert len(rows) == 1, rows
    label = rows[0]["label"]
    assert admin.stats()["max_live_per_label"][label] == 1
    created = [e for e in admin.events() if e["event"] == "created" and e["label"] == label]
    assert len(created) == 1
    record = ctx.store.get(task_id)
    assert record.final_state == "completed" and record.attempt == 1
    assert record.instance_id == rows[0]["id"]
    assert harness.steps_of(task_id).count(StepName.CREATE_INSTANCE) >= 2  # the second one adopted
    assert "adopted existing" in admin.task_log(task_id)


def test_create_stopped_destroyed_and_other_offer(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "create_stopped", "label": task_id, "times": 1})
    start_and_finish(ctx, task_id)
    rows = sorted(admin.rows_for(task_id), key=lambda r: r["id"])
    assert len(rows) == 2, rows
    assert all(r["destroyed_at"] is not None for r in rows)
    assert rows[0]["machine_id"] != rows[1]["machine_id"]
    assert rows[0]["offer_id"] != rows[1]["offer_id"]
    assert rows[0]["destroyed_at"] <= rows[1]["created_at"]
    assert max(admin.stats()["max_live_per_label"][r["label"]] for r in rows) == 1
    assert ctx.store.get(task_id).final_state == "completed"
    assert admin.task(task_id)["state"] == "completed"
    assert ctx.metric_store.read().start_failures == {"created_stopped": 1}


START_FAILURE_KINDS = {
    "stuck_loading": "loading_deadline",
    "oci_failure": "start_failed",
    "unexpected_exit": "exited_early",
}


@pytest.mark.parametrize("fault", ["stuck_loading", "oci_failure", "unexpected_exit"])
def test_failed_start_retries_on_another_machine(contexts, admin, fault):
    ctx = contexts(vast_api={"loading_deadline": 1.0})
    task_id = admin.one_task(env=scripted(0), command="worker")
    rule = {"fault": fault, "label": first_attempt(ctx, task_id), "times": 1}
    if fault == "unexpected_exit":
        rule["after"] = 5  # sim s after running, before the scripted end (20 s)
    admin.faults(rule)
    start_and_finish(ctx, task_id)

    record = ctx.store.get(task_id)
    rows = sorted(admin.rows_for(task_id), key=lambda r: r["id"])
    assert [parse_label(r["label"]).attempt for r in rows] == [1, 2]
    assert all(r["destroyed_at"] is not None for r in rows)
    assert rows[0]["machine_id"] != rows[1]["machine_id"]
    assert record.failed_machines == [rows[0]["machine_id"]]
    assert record.attempt == 2 and record.final_state == "completed"
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    log = admin.task_log(task_id)
    assert "attempt 1 failed on machine" in log
    measured = ctx.metric_store.read()
    assert measured.start_failures == {START_FAILURE_KINDS[fault]: 1}
    # One wait to run (whatever the attempts), one end: the failed attempt's instance is
    # not the task's end.
    assert measured.histograms["task_pending_to_running_seconds"].count == 1
    assert measured.histograms["task_end_to_destroy_seconds"].count == 1


def test_read_lag_after_create_is_not_a_vanished_instance(contexts, admin):
    """Vast.ai's reads lag a create: a new instance can be missing from show/list for a few
    seconds (here 20, the fault pins it). One instance, completed, no retry."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "read_lag", "label": first_attempt(ctx, task_id), "seconds": 20})
    harness = Harness(ctx)
    harness.sync()
    # The sync loop lists every sync_interval: snapshots taken during the lag miss it.
    harness.run(until=lambda: harness.done(task_id), timeout=30, sync_every=0.02)
    assert ctx.store.get(task_id).final_state == "completed"
    assert [parse_label(r["label"]).attempt for r in admin.rows_for(task_id)] == [1]


def test_attempts_exhausted_error_with_reason(contexts, admin):
    ctx = contexts(vast_api={"loading_deadline": 0.8, "start_attempts": 2})
    task_id = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "stuck_loading", "label": task_id})
    start_and_finish(ctx, task_id)
    record = ctx.store.get(task_id)
    assert record.final_state == "error" and record.attempt == 2
    rows = admin.rows_for(task_id)
    assert len(rows) == 2 and all(r["destroyed_at"] is not None for r in rows)
    assert admin.task(task_id)["state"] == "error"
    log = admin.task_log(task_id)
    assert "no instance could run the task in 2 attempt(s)" in log
    assert "loading deadline" in log
    # It never ran: Arkindex is told `error`, never `running`.
    assert admin.accepted_agent_states(task_id) == ["error"]
    measured = ctx.metric_store.read()
    assert measured.start_failures == {"loading_deadline": 2}
    assert measured.histograms["task_pending_to_running_seconds"].count == 0


def test_no_matching_offer_waits_then_error(contexts, admin):
    ctx = contexts(vast_api={"offer_filters": {"gpu_ram": {"gte": 10_000_000}}, "offer_wait": 1.0})
    task_id = admin.one_task(env=scripted(0), command="worker")
    harness = start_and_finish(ctx, task_id)
    assert harness.steps_of(task_id).count(StepName.CHOOSE_OFFER) >= 3  # it waited
    record = ctx.store.get(task_id)
    assert record.final_state == "error" and record.attempt == 0
    assert admin.rows_for(task_id) == []
    log = admin.task_log(task_id)
    assert "no Vast.ai offer matched the filters within 1 s" in log
    assert admin.task(task_id)["state"] == "error"
    assert admin.accepted_agent_states(task_id) == ["error"]
    # Every search Vast.ai answered matched nothing (one observation each: a shared answer
    # read by a later step is not observed again); no instance, no end-to-destroy to measure.
    read = ctx.metric_store.read()
    measured = read.histograms
    searches = read.api_calls[("vast", "search")] - read.api_rate_limited.get(("vast", "search"), 0)
    assert searches >= 1
    assert measured["offers_matched"].count == searches
    assert measured["offers_matched"].buckets[0] == (0.0, searches)  # le="0"
    assert measured["task_end_to_destroy_seconds"].count == 0


# --------------------------------------------------------------------------- stop


def test_stop_while_running(contexts, admin):
    ctx = contexts()
    # A long task (2000 sim s = 20 real s, a log line every 100 sim s) stopped once it ran
    # long enough to print something.
    task_id = admin.one_task(
        env={**scripted(0), "SIM_DURATION": "2000", "SIM_LOG_LINES": "19"}, command="worker"
    )
    harness = Harness(ctx)
    harness.sync()

    def printed() -> bool:
        found = [i for i in admin.instances() if task_id in (i["label"] or "")]
        return bool(found) and any("sim log line" in line for line in found[0]["log"])

    harness.run(
        until=lambda: ctx.store.get(task_id).phase == Phase.RUNNING and printed(), timeout=10
    )
    assert admin.task(task_id)["state"] == "running"
    admin.stop_task(task_id)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=15)

    stops = [
        s
        for r in harness.syncs
        for s in r.steps
        if type(s).__name__ == "StopTask" and s.task_id == task_id
    ]
    assert stops and stops[0].has_record
    record = ctx.store.get(task_id)
    assert record.final_state == "stopped" and record.stop_requested
    assert admin.task(task_id)["state"] == "stopped"
    assert admin.accepted_agent_states(task_id) == ["running", "stopped"]
    assert admin.refused_agent_states(task_id) == []
    [row] = admin.rows_for(task_id)
    assert row["destroyed_at"] is not None
    log = admin.task_log(task_id)
    assert "stop requested by Arkindex" in log
    assert "sim log line" in log  # the instance's output so far was published
    assert harness.steps_of(task_id).count(StepName.REPORT_STATE) == 1


def test_stop_before_any_instance(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    harness = Harness(ctx)
    harness.sync()  # accepted; its chain is queued but has not run
    assert ctx.store.get(task_id).phase == Phase.ACCEPTED
    harness.queue.clear()  # the chain's message is late: the stop wins the race
    admin.stop_task(task_id)
    assert admin.task(task_id)["state"] == "stopping"
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=10)
    assert ctx.store.get(task_id).final_state == "stopped"
    assert admin.task(task_id)["state"] == "stopped"
    assert admin.accepted_agent_states(task_id) == ["stopped"]
    assert admin.rows_for(task_id) == []
    assert "stop requested by Arkindex" in (admin.task_log(task_id) or "")
    # The late start message finds the task done and does nothing.
    assert steps.start(ctx, task_id) is None
    assert admin.rows_for(task_id) == []


def test_stop_without_record(contexts, admin):
    """Memory lost after the task was assigned: the stop is honoured all the same."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    Harness(ctx).sync()  # assigned to us, accepted, chain never ran
    wipe(ctx)
    admin.stop_task(task_id)
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    harness = Harness(reborn)
    result = harness.sync()
    assert [(type(s).__name__, s.has_record) for s in result.steps if s.task_id == task_id] == [
        ("StopTask", False)
    ]
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=10)
    assert admin.task(task_id)["state"] == "stopped"
    assert admin.accepted_agent_states(task_id) == ["stopped"]
    assert admin.rows_for(task_id) == []
    assert "stop requested by Arkindex" in (admin.task_log(task_id) or "")


# --------------------------------------------------------------------------- restart


@pytest.mark.parametrize("lost_in", [Phase.LOADING, Phase.RUNNING])
def test_total_memory_loss_readopts_instance(stack, contexts, admin, lost_in):
    ctx = contexts()
    task_id = admin.one_task(env={**scripted(0), "SIM_DURATION": "150"}, command="worker")
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: ctx.store.get(task_id).phase == lost_in)
    instance_id = ctx.store.get(task_id).instance_id
    # Adoption lists instances: wait out the create's read lag (tested on its own above).
    wait_visible(stack, instance_id)
    assert wipe(ctx) > 0  # Redis lost: records, credentials, snapshot, logs, locks
    assert list(ctx.redis.scan_iter(match=ctx.prefix + "*")) == []

    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    assert reborn.agent_short_id() == ctx.agent_short_id()  # the same agent again
    again = Harness(reborn)
    again.sync()
    adopts = [s for s in again.syncs[0].steps if type(s).__name__ == "AdoptInstance"]
    assert [(s.task_id, s.instance_id) for s in adopts] == [(task_id, instance_id)]
    again.run(until=lambda: again.done(task_id), sync_every=0.3, timeout=20)

    record = reborn.store.get(task_id)
    assert record.adopted and record.instance_id == instance_id
    assert record.final_state == "completed"
    assert admin.task(task_id)["state"] == "completed"
    assert admin.accepted_agent_states(task_id).count("completed") == 1
    assert admin.accepted_agent_states(task_id).count("running") == 1
    rows = admin.rows_for(task_id)
    assert [r["id"] for r in rows] == [instance_id]  # no second instance
    assert rows[0]["destroyed_at"] is not None
    assert "re-adopted instance" in admin.task_log(task_id)
    assert admin.refused_agent_states(task_id) == []  # no `running` sent twice


def test_logs_published_while_running(contexts, admin):
    ctx = contexts(logs_interval=0.3)
    task_id = admin.one_task(
        env={**scripted(0), "SIM_DURATION": "300", "SIM_LOG_LINES": "5"}, command="worker"
    )
    harness = Harness(ctx)
    harness.sync()
    seen: list[str] = []

    def look(_harness) -> None:
        if ctx.store.get(task_id).phase == Phase.RUNNING:
            seen.append(admin.task_log(task_id) or "")

    harness.run(until=lambda: harness.done(task_id), on_step=look, timeout=15)
    interim = [
        text for text in seen if "sim log line 1/5" in text and "PONOS_EXIT_CODE" not in text
    ]
    assert interim, "no log published while the task ran"
    final = admin.task_log(task_id)
    assert "sim log line 5/5" in final and "PONOS_EXIT_CODE=0" in final


# --------------------------------------------------------------------------- sync loop


def test_sync_accepts_then_starts_within_capacity(contexts, admin):
    ctx = contexts(vast_api={"max_instances": 1})
    first = admin.one_task(env=scripted(0), command="worker")
    harness = Harness(ctx)
    result = harness.sync()
    kinds = [(type(s).__name__, s.task_id) for s in result.steps]
    assert ("AcceptTask", first) in kinds and ("StartChain", first) in kinds
    assert kinds.index(("AcceptTask", first)) < kinds.index(("StartChain", first))
    assert (first, Next(StepName.START)) in result.enqueue
    assert ctx.store.get(first).phase == Phase.ACCEPTED
    # A second sync does not start the chain twice (enqueue de-duplication).
    assert harness.sync().enqueue == []
    harness.run(
        until=lambda: (
            ctx.store.get(first).phase == Phase.LOADING
            or ctx.store.get(first).phase == Phase.RUNNING
        )
    )
    # One slot, taken: the next task is accepted... by capacity 0 it is not even assigned.
    second = admin.one_task(env=scripted(0), command="worker")
    assert not any(s.task_id == second for s in harness.sync().steps)
    harness.run(until=lambda: harness.done(first) and harness.done(second), sync_every=0.2)
    assert admin.task(second)["state"] == "completed"


def test_sync_destroys_orphan_of_done_task(stack, contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    start_and_finish(ctx, task_id)
    # An instance carrying our label for the finished task (a create whose answer we lost
    # after the task ended, say).
    offer = _expected_ranking(ctx, admin)[0]
    label = f"ponos-{ctx.agent_short_id()}-{task_id}-1"
    created = ctx.vast.create_instance(
        offer["id"],
        image="registry.example/worker:1",
        label=label,
        env={},
        disk=16,
        runtype="args",
        onstart="sh",
        args=["-c", "sleep 1"],
    )
    # Vast.ai's reads lag a create by a few seconds: the sync can only see it after that.
    wait_visible(stack, created.id)
    harness = Harness(ctx)
    result = harness.sync()
    destroys = [s for s in result.steps if type(s).__name__ == "DestroyInstance"]
    assert [(s.instance_id, s.cause) for s in destroys] == [(created.id, "orphan")]
    harness.run()
    row = next(r for r in admin.ledger() if r["id"] == created.id)
    assert row["destroyed_at"] is not None
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]  # untouched


# --------------------------------------------------------------------------- no command


def test_no_command_wraps_the_image_entrypoint_from_its_registry(contexts, admin):
    """A task without a command runs the image's Entrypoint + Cmd, read from its registry
    (Docker Registry v2 on loopback), inside the exit-code wrapper."""
    from ponos_tasks.simulators.registry import RegistrySimulator

    with RegistrySimulator() as registry:
        registry.add_image(
            "teklia/worker", "1.0", entrypoint=["python3", "-m", "worker"], cmd=["--run", "all"]
        )
        ctx = contexts()
        task_id = admin.one_task(
            image=f"{registry.host}/teklia/worker:1.0", command=None, env=scripted(0)
        )
        start_and_finish(ctx, task_id)
        assert any("/v2/teklia/worker/manifests/1.0" in str(r) for r in registry.requests)

    [instance] = [i for i in admin.instances() if task_id in (i["label"] or "")]
    assert instance["command"][0] == "sh"
    assert instance["command"][-5:] == ["python3", "-m", "worker", "--run", "all"]
    record = ctx.store.get(task_id)
    assert record.inferred is False and record.final_state == "completed"
    assert "image command from the registry" in admin.task_log(task_id)


@pytest.mark.parametrize(
    "final_lines,state",
    [
        ("all good", "completed"),
        ('Traceback (most recent call last):\n  File "w.py", line 1\nValueError: boom', "failed"),
    ],
)
def test_no_command_unreachable_registry_runs_unwrapped_and_infers(
    contexts, admin, final_lines, state
):
    """Registry unreachable: the image runs as it is (no wrapper, no marker); the instance
    stopped itself, so completed unless its log ends in a traceback; the log says inferred."""
    ctx = contexts()
    task_id = admin.one_task(
        image="127.0.0.1:9/teklia/worker:1.0",
        command=None,
        env={**FAST, "SIM_FINAL_LINES": final_lines, "SIM_SELF_STOP": "true"},
    )
    start_and_finish(ctx, task_id)

    [instance] = [i for i in admin.instances() if task_id in (i["label"] or "")]
    assert "sh" not in (instance["command"] or [])[:1]  # not wrapped
    record = ctx.store.get(task_id)
    assert record.inferred is True and record.final_state == state
    assert admin.task(task_id)["state"] == state
    log = admin.task_log(task_id)
    assert "running the image unwrapped" in log and "inferred" in log


def test_the_log_is_published_again_with_its_last_lines(contexts, admin):
    """After the destroy, the published log tells the whole story (state reported, instance
    destroyed), its instance output intact; without the final upload's instance log kept,
    nothing is published again (never less than was published)."""
    ctx = contexts(logs_interval=3600)
    task_id = admin.one_task(env=scripted(0))
    start_and_finish(ctx, task_id)
    record = ctx.store.get(task_id)
    text = admin.task_log(task_id)
    lines = agent_lines(ctx, text)
    assert lines[-2].endswith("reported `completed` to Arkindex")
    assert lines[-1].endswith(f"instance {record.instance_id} destroyed")
    assert "PONOS_EXIT_CODE=0" in text
    assert ctx.store.ended_log(task_id, record.attempt) is None  # dropped once published

    ctx.logbook.add(task_id, "INFO", "a line written after everything")
    steps._publish_last_lines(ctx, record)  # the kept instance log is gone: nothing sent
    assert admin.task_log(task_id) == text


def test_one_search_answer_serves_the_tasks_that_launch_meanwhile(contexts, admin):
    # A burst searched once per task and step: the search bucket (2 s, ten a minute), not the
    # create, bounded the launches. Within offer_search_reuse, one answer serves them all.
    ctx = contexts()
    ctx.settings = ctx.settings.but(offer_search_reuse=60.0)
    first, second = (admin.one_task(env=scripted(0), command="worker") for _ in range(2))
    searches = admin.stats()["calls"].get("search", 0)
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: harness.done(first) and harness.done(second), timeout=30.0)
    assert admin.stats()["calls"].get("search", 0) - searches == 1
    rows = {t: admin.rows_for(t) for t in (first, second)}
    assert all(len(r) == 1 for r in rows.values()), rows
    # The second task passed over the offers of the first one's machine (their ids changed
    # when it was rented): no create was wasted on a no_such_ask.
    assert rows[first][0]["offer_id"] != rows[second][0]["offer_id"]
    for task_id in (first, second):
        assert "was taken before we could rent it" not in admin.task_log(task_id)
    assert ctx.metric_store.read().start_failures == {}


def test_start_up_names_a_registration_held_up_by_another_worker(contexts, monkeypatch):
    """A worker whose registration waits past LOCK_WAIT for another's says so on one line
    (the start-up check's verdict), instead of dying on a traceback."""
    from ponos_tasks.agent import service_problem
    from ponos_tasks.state import RedisCredentialStore

    ctx = contexts()
    monkeypatch.setattr(RedisCredentialStore, "LOCK_WAIT", 0.5)
    with RedisCredentialStore(ctx.redis, ctx.keys).lock():  # another worker, stuck
        problem = service_problem(ctx, vast=False)
    assert problem == (
        "url: registration on Arkindex did not complete: "
        "the Arkindex credentials lock is held over 0.5 s"
    )
