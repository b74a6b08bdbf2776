"""The agent decides on evidence: regression tests for the defects where it took an
irreversible step (a final state, a destroy, a second run) on missing evidence, or where a
fault made it lose or overwrite something. Steps run in-process (tests/agent_harness.py)
against the simulators over HTTP and a real Redis; faults come from the simulators' knobs.
"""

import contextlib
import threading
import time

import pytest

from ponos_tasks import loop, steps
from ponos_tasks.lifecycle import Phase, parse_label
from ponos_tasks.models import Next, StepName
from ponos_tasks.state import kept_alive
from tests.agent_harness import Harness, wipe

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
    start_and_finish,
)


def created_labels(admin, task_id: str) -> list[str]:
    return [row["label"] for row in admin.rows_for(task_id)]


def run_until_phase(ctx, task_id: str, phase: Phase, timeout: float = 30.0) -> Harness:
    """Sync until Arkindex hands us the task, then run its chain until it reaches `phase`."""
    harness = Harness(ctx)
    harness.sync()

    def reached():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == phase

    harness.run(until=reached, timeout=timeout)
    return harness


def test_an_unreadable_log_is_read_again_not_taken_for_no_marker(contexts, admin):
    """Vast.ai's log service fails for a while after the task ended with exit code 0: the
    agent keeps the instance and reads again, so the task ends completed, once."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    # Each agent-level read makes up to 4 tries (the client's own retries): 10 failures
    # make at least two reads fail.
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503, "times": 10})
    harness = start_and_finish(ctx, task_id, timeout=60)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    assert len(created_labels(admin, task_id)) == 1  # never rented and run a second time
    log = admin.task_log(task_id)
    assert "PONOS_EXIT_CODE=0" in log
    assert "its log could not be read" in log  # says why it waited
    assert harness.steps_of(task_id).count(StepName.CREATE_INSTANCE) == 1


def test_a_log_unreadable_past_the_deadline_gives_error_with_the_reason(contexts, admin):
    ctx = contexts(vast_api={"log_read_deadline": 1.0})
    task_id = admin.one_task(env=scripted(0))
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503})
    start_and_finish(ctx, task_id, timeout=60)
    admin.clear_faults()
    record = ctx.store.get(task_id)
    assert record.final_state == "error"
    assert "could not be read" in record.reason
    assert len(created_labels(admin, task_id)) == 1
    assert admin.task(task_id)["state"] == "error"


def test_a_stop_after_the_outcome_still_ends_the_task(contexts, admin):
    """The user stops a task whose outcome is decided (finishing): Arkindex then waits for
    `stopped`; the task must not stay `stopping`."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = run_until_phase(ctx, task_id, Phase.FINISHING)
    admin.stop_task(task_id)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=30)
    assert admin.task(task_id)["state"] == "stopped"  # not left `stopping`
    accepted = admin.accepted_agent_states(task_id)
    assert accepted[-1] == "stopped" and accepted.count("stopped") == 1, accepted
    assert "PONOS_EXIT_CODE=0" in admin.task_log(task_id)


def test_the_final_state_is_reported_before_the_instance_is_destroyed(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = start_and_finish(ctx, task_id)
    trace = harness.steps_of(task_id)
    assert trace.index(StepName.REPORT_STATE) < trace.index(StepName.DESTROY_INSTANCE)


def test_losing_redis_between_report_and_destroy_still_ends_everything(contexts, admin):
    """Redis lost right after the final report: the instance is the only trace left; the
    next sync sees its task terminal on Arkindex and destroys it."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = Harness(ctx)
    harness.sync()

    def reported():
        record = ctx.store.get(task_id)
        return record is not None and record.final_reported

    harness.run(until=reported, timeout=30)
    wipe(ctx)  # every record, lock and queued message of the agent is gone
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = Harness(reborn)

    def no_live_instance():
        return all(row["destroyed_at"] is not None for row in admin.rows_for(task_id))

    again.sync()
    again.run(until=no_live_instance, sync_every=0.2, timeout=30)
    assert admin.task(task_id)["state"] == "completed"
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    assert "PONOS_EXIT_CODE=0" in admin.task_log(task_id)


def test_late_resumes_never_multiply_watch_chains(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    for _ in range(3):  # three resumes by the sync of a chain it thought stalled
        harness.push(task_id, [Next(StepName.WATCH)])
    for _ in range(40):
        harness.step_once()
    queued = [q for q in harness.queue if q.task_id == task_id and q.next.step == StepName.WATCH]
    assert len(queued) == 1
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=30)


def test_a_periodic_upload_in_flight_never_overwrites_the_final_log(stack, contexts, admin):
    """A periodic upload reads the instance log (slow), the task ends meanwhile and its
    final log is published: the periodic one must not land on top of it."""
    ctx = contexts(logs_interval=3600)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="200"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    # The periodic upload's log read takes 4 s; the task ends after 2 s and its final log
    # reuses the ended log.
    admin.faults({"fault": "slow", "endpoint": "logs", "delay": 4.0, "times": 1})
    late = threading.Thread(target=steps.publish_logs, args=(ctx, task_id), kwargs={"final": False})
    late.start()
    time.sleep(0.5)  # the periodic upload is now reading the log
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=60)
    final_published_at = time.time()
    late.join(timeout=30)
    s3 = stack.s3.client()
    objects = [
        (bucket, obj)
        for bucket in [b["Name"] for b in s3.list_buckets()["Buckets"]]
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", [])
        if task_id in obj["Key"]
    ]
    assert len(objects) == 1
    # Nothing was written after the final upload (the late one would land ~2 s later).
    assert objects[0][1]["LastModified"].timestamp() <= final_published_at + 0.5
    assert "PONOS_EXIT_CODE=0" in admin.task_log(task_id)


def test_a_log_that_cannot_be_published_does_not_keep_the_instance(stack, contexts, admin):
    """S3 refuses every upload (its bucket is gone): after a bounded number of tries the
    task goes on, its state is reported and its instance destroyed; the log is kept."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = run_until_phase(ctx, task_id, Phase.FINISHING)
    s3 = stack.s3.client()
    saved = {}
    buckets = [b["Name"] for b in s3.list_buckets()["Buckets"]]
    for bucket in buckets:
        for obj in s3.list_objects_v2(Bucket=bucket).get("Contents", []):
            saved[(bucket, obj["Key"])] = s3.get_object(Bucket=bucket, Key=obj["Key"])[
                "Body"
            ].read()
            s3.delete_object(Bucket=bucket, Key=obj["Key"])
        s3.delete_bucket(Bucket=bucket)
    try:
        harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=120)
        record = ctx.store.get(task_id)
        assert record.publish_failures == ctx.settings.publish_tries
        assert all(row["destroyed_at"] is not None for row in admin.rows_for(task_id))
        assert admin.task(task_id)["state"] == "completed"
        assert "PONOS_EXIT_CODE=0" in ctx.store.ended_log(task_id, record.attempt)
    finally:
        for bucket in buckets:  # empty ones too: later tests publish there
            with contextlib.suppress(Exception):
                s3.create_bucket(Bucket=bucket)
        for (bucket, key), body in saved.items():
            s3.put_object(Bucket=bucket, Key=key, Body=body)


def test_a_create_whose_lock_lapsed_is_never_sent(contexts, admin):
    """The create lock can lapse during one create call (a long rate-limiter wait): the
    ownership is checked right before the request is sent, so nothing is sent."""
    from redis.exceptions import LockNotOwnedError

    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    offer = admin.offers()[0]
    mine = ctx.store.create_lock(task_id, timeout=0.2)
    assert mine.acquire()
    time.sleep(0.3)  # lapsed...
    theirs = ctx.store.create_lock(task_id, timeout=60)
    assert theirs.acquire()  # ...and another worker took it over
    label = f"ponos-{ctx.agent_short_id()}-{task_id}-1"
    with pytest.raises(LockNotOwnedError):
        ctx.vast.create_instance(
            offer["id"], image="img:1", label=label, env={}, disk=16, before_send=mine.reacquire
        )
    theirs.release()
    assert admin.rows_for(task_id) == []


def test_a_sync_keeps_its_lock_while_it_runs_and_a_killed_one_frees_it_soon(contexts):
    """Two syncs must never overlap (they would over-ask Arkindex for tasks), yet a sync
    whose worker is SIGKILLed must not stall the loop until its longest allowed run is over
    (the lock used to live 130 s: the chaos suite saw no sync for two minutes after killing
    every worker). The lock is renewed while its holder runs, and lapses soon after."""
    ctx = contexts()
    lock = ctx.store.sync_lock(timeout=0.6)
    assert lock.acquire()
    with kept_alive(lock, every=0.2):
        time.sleep(1.5)  # a sync longer than the lock's timeout
        assert not ctx.store.sync_lock(timeout=0.6).acquire()  # still single-flight
    # The holder is gone without releasing it (SIGKILL): free again within one timeout.
    time.sleep(0.7)
    assert ctx.store.sync_lock(timeout=0.6).acquire()
    # The configured lock: a killed sync stalls the loop 15 s (or 3 intervals) at most.
    from ponos_tasks.config import AgentConfig
    from ponos_tasks.settings import Settings
    from tests.settings_helper import MINIMAL_CONFIG

    for interval, stall in ((1, 15.0), (10, 30.0)):
        config = AgentConfig.model_validate({**MINIMAL_CONFIG, "sync_interval": interval})
        assert Settings.from_config(config).sync_lock_timeout == stall


def test_a_snapshot_is_stamped_when_its_listing_starts(contexts, admin):
    """An instance created while the pages are read may be missing from the snapshot; the
    snapshot must look older than it, so that a watcher does not take it for gone."""
    ctx = contexts()
    ctx.agent_short_id()
    admin.faults({"fault": "slow", "endpoint": "list", "delay": 1.5, "times": 1})
    before = ctx.now()
    assert loop.sync(ctx).ran
    snapshot = ctx.store.load_snapshot()
    assert snapshot.taken_at - before < 1.0  # before the slow listing, not after it


def test_an_adopted_unwrapped_instance_is_still_judged_by_how_it_ends(contexts, admin):
    """After a total loss of memory, an instance that runs its image unwrapped (no
    registry answered) is adopted as such: its outcome is inferred, not retried."""
    ctx = contexts()
    task_id = admin.one_task(
        image="127.0.0.1:9/teklia/worker:1.0",
        command=None,
        env={
            **scripted(0),
            "SIM_DURATION": "300",
            "SIM_SELF_STOP": "true",
            "SIM_FINAL_LINES": "done",
        },
    )
    harness = Harness(ctx)
    harness.sync()

    def has_instance():
        record = ctx.store.get(task_id)
        return record is not None and record.phase in (Phase.LOADING, Phase.RUNNING)

    harness.run(until=has_instance, timeout=30)
    record = ctx.store.get(task_id)
    assert record.inferred is True
    deadline = time.monotonic() + 10
    while not ctx.vast.list_instances(label=record.label):  # Vast.ai's reads lag a create
        assert time.monotonic() < deadline
        time.sleep(0.2)
    wipe(ctx)
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = Harness(reborn)
    again.sync()
    again.run(until=lambda: again.done(task_id), sync_every=0.2, timeout=60)
    record = reborn.store.get(task_id)
    assert record.adopted and record.inferred
    assert record.final_state == "completed" and record.attempt == 1
    assert len(created_labels(admin, task_id)) == 1


def test_a_long_log_is_published_whole(contexts, admin):
    """Vast.ai sends only the last 1000 lines of a log unless asked for more: the agent
    asks for all of it."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_LOG_LINES="3000"))
    start_and_finish(ctx, task_id)
    log = admin.task_log(task_id)
    assert "sim log line 1/3000" in log and "sim log line 3000/3000" in log
    assert "PONOS_EXIT_CODE=0" in log and "[log cut" not in log


def test_a_huge_log_keeps_its_tail_within_the_bound(contexts, admin):
    """Memory is bounded: past logs_max_mb only the end of the log is kept, with a line
    saying how much was cut (the exit marker, at the end, is always kept)."""
    ctx = contexts(logs_max_mb=0.02)  # 20 KiB
    task_id = admin.one_task(env=scripted(0, SIM_LOG_LINES="5000"))
    start_and_finish(ctx, task_id)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed"
    log = admin.task_log(task_id)
    assert "[log cut: the first" in log
    assert "sim log line 5000/5000" in log and "sim log line 1/5000" not in log
    assert len(log.encode()) < 0.02 * 1024 * 1024 + 8192  # the bound, plus the agent's lines


def test_a_machine_that_failed_a_start_is_avoided_by_every_task(contexts, admin):
    """A start failed on a machine (OCI failure): not only that task but every task of the
    agent avoids the machine for machine_cooldown."""
    from tests.test_steps import first_attempt

    ctx = contexts(vast_api={"loading_deadline": 1.0})
    first = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "oci_failure", "label": first_attempt(ctx, first), "times": 1})
    start_and_finish(ctx, first)
    failed_row = min(admin.rows_for(first), key=lambda r: r["id"])
    bad = failed_row["machine_id"]
    assert ctx.store.get(first).failed_machines == [bad]
    assert bad in ctx.store.avoided_machines()
    # The first task's 30 s claim on that offer is over (it would hide the machine anyway).
    ctx.redis.delete(ctx.keys.once(f"offer:{failed_row['offer_id']}"))
    second = admin.one_task(env=scripted(0), command="worker")
    start_and_finish(ctx, second)
    assert [r["machine_id"] for r in admin.rows_for(second)] != [bad]
    assert ctx.store.get(second).final_state == "completed"


def test_a_task_deleted_while_it_runs_is_stopped_and_its_instance_destroyed(contexts, admin):
    """Arkindex answers 404 for a task deleted while it runs: a positive fact. The agent
    stops spending on it; nothing is left billing, no record stays open."""
    ctx = contexts(logs_interval=0.5)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="3000"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    admin.arkindex_delete_task(task_id)
    try:
        harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=30)
    finally:
        admin.clear_arkindex_faults()
    record = ctx.store.get(task_id)
    assert record.final_state == "error" and "deleted" in record.reason
    assert all(row["destroyed_at"] is not None for row in admin.rows_for(task_id))


def test_a_deleted_task_does_not_wait_for_its_log_before_its_instance_goes(contexts, admin):
    """A deleted task has nowhere to publish its log: its instance must go at once, not
    wait up to log_read_deadline for a log that Vast.ai cannot serve (the chaos suite,
    seed 3: the deletion cost a publish with 5 tries before the destroy)."""
    ctx = contexts(logs_interval=0.5, vast_api={"log_read_deadline": 600.0})
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="3000"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503})
    admin.arkindex_delete_task(task_id)
    try:
        harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=30)
    finally:
        admin.clear_arkindex_faults()
        admin.clear_faults()
    # Within the 30 s above, while log_read_deadline would have kept it 600 s.
    assert all(row["destroyed_at"] is not None for row in admin.rows_for(task_id))
    assert ctx.store.get(task_id).task_gone


def test_a_deleted_task_is_not_held_by_a_report_a_killed_worker_left(contexts, admin):
    """A worker killed inside the final report of a deleted task leaves a lease on that
    report (120 s). Arkindex said 404: there is nothing to report, so the instance goes at
    once instead of billing until the lease lapses (found by the chaos suite, seed 4). No
    sync runs here: the chain alone must destroy it."""
    ctx = contexts(logs_interval=0.5)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="3000"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    reported = ctx.arkindex.reported
    assert reported.claim(task_id, "error") == reported.CLAIMED  # then the worker died
    admin.arkindex_delete_task(task_id)
    try:
        harness.run(until=lambda: harness.done(task_id), timeout=20)
    finally:
        admin.clear_arkindex_faults()
    assert all(row["destroyed_at"] is not None for row in admin.rows_for(task_id))
    assert ctx.store.get(task_id).task_gone


def test_a_final_state_waits_for_the_running_another_worker_is_still_sending(contexts, admin):
    """Arkindex accepts completed/failed only from running. While another worker is still
    sending `running` (its lease), the final report must wait for it, not go ahead (it would
    be refused and the task end `error`: the chaos suite's 200-task run, seed 1)."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    reported = ctx.arkindex.reported
    harness = Harness(ctx)
    harness.sync()
    assert reported.claim(task_id, "running") == reported.CLAIMED  # the other worker's send

    def other_worker_gives_up(h):
        if h.retries.get((task_id, StepName.REPORT_STATE), 0) >= 2:
            reported.release(task_id, "running")  # its request failed: unknown again

    harness.run(
        until=lambda: harness.done(task_id),
        timeout=60,
        sync_every=0.5,
        on_step=other_worker_gives_up,
    )
    assert admin.refused_agent_states(task_id) == []
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]


def test_a_task_deleted_before_its_report_still_gets_its_instance_destroyed(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = run_until_phase(ctx, task_id, Phase.DESTROYING)
    admin.arkindex_delete_task(task_id)
    try:
        harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=30)
    finally:
        admin.clear_arkindex_faults()
    assert all(row["destroyed_at"] is not None for row in admin.rows_for(task_id))


def run_until_between_attempts(ctx, task_id: str) -> None:
    """Drive the task until its first attempt failed and it waits for an offer again."""
    harness = Harness(ctx)
    harness.sync()

    def between_attempts():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == Phase.WAITING_OFFER and record.attempt == 1

    harness.run(until=between_attempts, timeout=60, sync_every=0.5)


def test_losing_redis_between_two_attempts_of_a_running_task_still_ends_it(contexts, admin):
    """The task is `running` on Arkindex (no action lists it any more) and its first attempt
    failed: between two attempts its stopped instance is its only trace. Redis lost then,
    the next agent adopts that trace, tries again and ends the task."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="2000"))
    # Attempt 1 crashes 300 sim s (3 s) after it runs: an early exit, retried.
    admin.faults({"fault": "unexpected_exit", "label": f"{task_id}-1$", "after": 300})
    run_until_between_attempts(ctx, task_id)
    assert admin.task(task_id)["state"] == "running"
    kept = ctx.store.get(task_id).kept_instance_id
    assert [r["id"] for r in admin.rows_for(task_id) if r["destroyed_at"] is None] == [kept]
    wipe(ctx)
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = Harness(reborn)
    again.sync()
    again.run(until=lambda: again.done(task_id), sync_every=0.3, timeout=90)
    record = reborn.store.get(task_id)
    assert record.adopted and not record.inferred  # the wrapper's marker decides
    assert admin.task(task_id)["state"] == "completed", record.reason
    assert [parse_label(r["label"]).attempt for r in admin.rows_for(task_id)] == [1, 2]
    assert admin.refused_agent_states(task_id) == []
    deadline = time.monotonic() + 20
    while any(r["destroyed_at"] is None for r in admin.rows_for(task_id)):
        assert time.monotonic() < deadline, "an instance was left behind"
        again.sync()
        time.sleep(0.3)


def test_losing_redis_after_a_start_that_never_ran_starts_the_task_again(contexts, admin):
    """The first attempt never ran (stuck loading, given up): Arkindex still shows the task
    pending, so its actions list it again after a loss of Redis. The failed instance is not
    kept as a trace: adopted, it could only end as a task whose log no one can read
    (`error`, the chaos suite's quick run, seed 1). The task completes on a new attempt."""
    ctx = contexts(vast_api={"loading_deadline": 1.0})
    task_id = admin.one_task(env=scripted(0), command="worker")
    admin.faults({"fault": "stuck_loading", "label": f"{task_id}-1$", "times": 1})
    run_until_between_attempts(ctx, task_id)
    assert admin.task(task_id)["state"] == "pending"
    assert all(r["destroyed_at"] is not None for r in admin.rows_for(task_id))
    wipe(ctx)
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = Harness(reborn)
    again.sync()
    again.run(until=lambda: again.done(task_id), sync_every=0.3, timeout=90)
    assert admin.task(task_id)["state"] == "completed", reborn.store.get(task_id).reason
    assert admin.refused_agent_states(task_id) == []


def test_a_stop_no_sync_saw_before_the_report_is_reported_without_refusals(contexts, admin):
    """The user stops the task while its outcome is being published and no sync runs before
    the report: the agent reads the task's state first and reports `stopped` at once."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = run_until_phase(ctx, task_id, Phase.FINISHING)
    admin.stop_task(task_id)
    harness.run(until=lambda: harness.done(task_id), timeout=30)  # no sync
    assert admin.task(task_id)["state"] == "stopped"
    assert admin.refused_agent_states(task_id) == []
