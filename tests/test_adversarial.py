"""Adversarial review: fault combinations that break one of the agent's guarantees.

Each test drives the chain's steps in-process (tests/agent_harness.py) against the
simulators and a real Redis, like tests/test_evidence.py. A test marked xfail(strict=True)
documents a break that is not fixed yet.
"""

import contextlib

import pytest

from ponos_tasks.lifecycle import Phase
from tests.agent_harness import Harness

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
)


class RetryingHarness(Harness):
    """The harness (which retries a step on steps.TRANSIENT, as Celery does)."""


def run_until(ctx, task_id, reached, timeout=30.0, **kwargs) -> Harness:
    harness = RetryingHarness(ctx, max_sleep=0.2)
    harness.sync()
    harness.run(until=reached, timeout=timeout, **kwargs)
    return harness


def test_a_running_report_left_in_flight_never_turns_completed_into_error(contexts, admin):
    """A worker SIGKILLed while it reported `running` (before the request reached Arkindex)
    leaves a 120 s lease on that report. A short task ends within the lease: the final
    report must not send `completed` over a task Arkindex still has `pending` (refused),
    then fall back to `error` for a task that exited 0."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))

    def loading():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == Phase.LOADING

    harness = run_until(ctx, task_id, loading)
    reported = ctx.arkindex.reported
    # The worker that moved it to running claimed the report, then died before sending it.
    assert reported.claim(task_id, "running") == reported.CLAIMED
    # Its lease (120 s) lapses 3 s from now here, to keep the test short.
    ctx.redis.pexpire(ctx.keys.reported(task_id, "running"), 3000)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60)
    assert admin.refused_agent_states(task_id) == []
    assert admin.task(task_id)["state"] == "completed", admin.accepted_agent_states(task_id)


def instance_printed(admin, task_id: str) -> bool:
    found = [i for i in admin.instances() if task_id in (i["label"] or "")]
    return bool(found) and any("sim log line" in line for line in found[0]["log"])


def _a_long_task_that_printed(ctx, admin):
    """A task running a long command that has printed its first lines: (task id, harness)."""
    task_id = admin.one_task(
        env={**scripted(0), "SIM_DURATION": "2000", "SIM_LOG_LINES": "19"}, command="worker"
    )

    def running_and_printed():
        record = ctx.store.get(task_id)
        return (
            record is not None
            and record.phase == Phase.RUNNING
            and instance_printed(admin, task_id)
        )

    return task_id, run_until(ctx, task_id, running_and_printed)


def test_a_stop_while_the_log_read_fails_still_publishes_the_instance_log(contexts, admin):
    """The user stops a running task while Vast.ai's log service fails for a few seconds:
    the instance is the only place its output lives, so it must not be destroyed on a
    read that failed; the published log must carry what the task printed."""
    ctx = contexts()
    task_id, harness = _a_long_task_that_printed(ctx, admin)
    # Three agent-level reads fail (each makes up to 4 tries), then the service is back.
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503, "times": 12})
    admin.stop_task(task_id)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=60)
    assert admin.task(task_id)["state"] == "stopped"
    log = admin.task_log(task_id)
    assert "sim log line" in log, log
    # While its log was awaited the instance was stopped (the user asked it), not left
    # running the task and billing its GPU.
    assert any(
        e.get("intended_status") == "stopped"
        for e in admin.events()
        if e["event"] == "status" and task_id in (e.get("label") or "")
    )


def test_a_marker_found_while_running_survives_a_failed_read_at_the_final_upload(contexts, admin):
    """The periodic upload spots the exit marker (the instance could not stop itself yet)
    and publishes it; then Vast.ai's log service fails for a few seconds. The final upload
    must not overwrite the published log with one that lost the task's output and marker."""
    import time

    from ponos_tasks import steps

    ctx = contexts(logs_interval=3600)  # periodic uploads only when this test says so
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="200"))

    def running():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == Phase.RUNNING

    harness = run_until(ctx, task_id, running)
    deadline = time.monotonic() + 20
    while not any(
        task_id in (i["label"] or "") and any("PONOS_EXIT_CODE" in line for line in i["log"])
        for i in admin.instances()
    ):
        assert time.monotonic() < deadline
        time.sleep(0.1)
    # The periodic upload runs before any watch saw the end: it publishes the log and
    # records the exit code.
    follow = steps.publish_logs(ctx, task_id, final=False)
    while follow is not None:  # the log is asked for, then read once Vast.ai uploaded it
        time.sleep(follow.countdown)
        follow = steps.publish_logs(ctx, task_id, **follow.kwargs)
    assert ctx.store.get(task_id).exit_code == 0
    assert "PONOS_EXIT_CODE=0" in admin.task_log(task_id)
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503, "times": 12})
    harness.run(until=lambda: harness.done(task_id), sync_every=0.2, timeout=60)
    assert admin.task(task_id)["state"] == "completed"
    log = admin.task_log(task_id)
    assert "PONOS_EXIT_CODE=0" in log, log


@pytest.mark.xfail(
    strict=True,
    reason="guarantee 2: the failed attempt's kept instance (the task's only trace outside "
    "Redis) is destroyed before the next create succeeds; no offer then -> no trace, and "
    "Redis lost leaves the task `running` on Arkindex forever",
)
def test_losing_redis_after_a_retry_found_no_offer_still_ends_the_task(contexts, admin):
    """Attempt 1 of a running task exits early (retried). The retry's create destroys the
    kept instance, then every offer it tries vanishes (or a 429 penalty, a 5xx...): the task
    waits for an offer with nothing of it left at Vast.ai. Redis is lost then: the task
    is `running` on Arkindex (no action lists it) and must still end."""
    from tests.agent_harness import wipe

    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="2000"))
    admin.faults({"fault": "unexpected_exit", "label": f"{task_id}-1$", "after": 300})
    # Every offer the second attempt's create tries is gone before it lands.
    admin.faults({"fault": "offer_vanished", "label": f"{task_id}-2$", "times": 5})

    def waiting_again():
        record = ctx.store.get(task_id)
        return (
            record is not None
            and record.phase == Phase.WAITING_OFFER
            and record.attempt == 1
            and record.kept_instance_id is None
        )

    run_until(ctx, task_id, waiting_again, timeout=60, sync_every=0.5)
    assert admin.task(task_id)["state"] == "running"
    wipe(ctx)
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = RetryingHarness(reborn, max_sleep=0.2)
    again.sync()

    def terminal():
        return admin.task(task_id)["state"] in ("completed", "failed", "error", "stopped")

    with contextlib.suppress(TimeoutError, AssertionError):  # the check is the line below
        again.run(until=terminal, sync_every=0.3, timeout=12)
    assert terminal(), admin.task(task_id)["state"]


@pytest.mark.parametrize("spoiled", [1, 2], ids=["running", "running-and-completed"])
def test_a_state_update_whose_answer_was_spoiled_is_not_sent_again(contexts, admin, spoiled):
    """Arkindex applies a state update, then its answer is cut (a proxy, a dropped
    connection): the outcome is unknown, so the agent must look before sending it again,
    never repeat an update Arkindex's table refuses."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    # The next `spoiled` answers to this task's state updates are cut in half.
    admin.arkindex_malformed(operation="PartialUpdateTask", task=task_id, times=spoiled)
    harness = RetryingHarness(ctx, max_sleep=0.2)
    harness.sync()
    try:
        harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60)
    finally:
        admin.clear_arkindex_faults()
    assert admin.task(task_id)["state"] == "completed"
    assert admin.refused_agent_states(task_id) == []


@pytest.mark.parametrize("state", ["running", "completed"])
def test_a_report_a_killed_worker_had_applied_is_not_sent_again(contexts, admin, state):
    """The chaos suite's kill: every worker dies the moment a state update took effect, its
    answer still on the way. The lease it left lapses; whoever reports next must find the
    state on Arkindex instead of sending it again (a refused update)."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="300"))
    phase = Phase.LOADING if state == "running" else Phase.DESTROYING

    def reached():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == phase

    harness = run_until(ctx, task_id, reached, timeout=60)
    reported = ctx.arkindex.reported
    assert reported.claim(task_id, state) == reported.CLAIMED
    # The killed worker's request reached Arkindex and was applied.
    ctx.arkindex._call("PartialUpdateTask", id=task_id, body={"state": state})
    assert admin.task(task_id)["state"] == state
    # Its lease (120 s) lapses 2 s from now here.
    for key in (ctx.keys.reported(task_id, state), ctx.keys.reported(task_id, "terminal")):
        ctx.redis.pexpire(key, 2000)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60)
    assert admin.task(task_id)["state"] == "completed"
    assert admin.refused_agent_states(task_id) == []


def test_the_upload_lock_outlives_one_upload_with_its_retries():
    """The periodic upload checks that the task still runs, then PUTs under the upload lock;
    the final upload waits for that lock. If the lock lapses while the periodic PUT is still
    being tried (S3 slow or hanging: each try may take its connect + read timeouts), the
    final log is uploaded meanwhile and the periodic one may land after it."""
    from ponos_tasks import celery_settings
    from ponos_tasks.arkindex import HTTP_TIMEOUT, ArkindexAgentClient, MemoryCredentialStore
    from tests.settings_helper import settings_with

    client = ArkindexAgentClient("http://127.0.0.1:1", "farm", "seed", MemoryCredentialStore())
    waits = sum(min(client.max_wait, 0.5 * 2**n) for n in range(client.max_attempts - 1))
    one_upload = client.max_attempts * sum(HTTP_TIMEOUT) + waits
    assert settings_with().upload_lock_timeout > one_upload, one_upload
    # Nor while the step holding it may still run (it is killed at its hard time limit).
    assert settings_with().upload_lock_timeout > celery_settings.task_time_limit


@pytest.fixture
def bare_contexts(stack, redis_url):
    """make(**overrides) -> AgentContext, wiped afterwards; unlike `contexts`, its teardown
    checks nothing (for the xfail tests whose break *is* two live instances)."""
    from tests.agent_harness import make_context, wipe

    made = []

    def make(**overrides):
        ctx = make_context(stack, redis_url, **overrides)
        made.append(ctx)
        return ctx

    yield make
    for ctx in made:
        wipe(ctx)
        ctx.redis.close()


@pytest.mark.xfail(
    strict=True,
    reason="guarantee 1: Redis lost right after a create, while Vast.ai's reads still lag "
    "it: the task (still pending on Arkindex) is accepted again and its label lookup misses "
    "the lagging instance, so a second instance is rented and the command runs twice",
)
def test_losing_redis_while_a_new_instance_is_not_listed_yet_rents_no_second_one(
    bare_contexts, admin
):
    import time

    from ponos_tasks.lifecycle import parse_label
    from tests.agent_harness import wipe
    from tests.test_steps import first_attempt

    ctx = bare_contexts()
    task_id = admin.one_task(env=scripted(0), command="worker")
    # The new instance is missing from every read for 15 s (1500 simulated s).
    admin.faults({"fault": "read_lag", "label": first_attempt(ctx, task_id), "seconds": 1500})

    def loading():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == Phase.LOADING

    run_until(ctx, task_id, loading)
    wipe(ctx)  # Redis lost: every record, lock and queued message of the agent
    reborn = bare_contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = RetryingHarness(reborn, max_sleep=0.2)
    again.sync()
    with contextlib.suppress(TimeoutError, AssertionError):
        again.run(until=lambda: again.done(task_id), sync_every=0.3, timeout=25)
    rows = admin.rows_for(task_id)
    # Leave nothing behind whatever happened (the duplicate goes by the sync loop).
    deadline = time.monotonic() + 30
    while any(r["destroyed_at"] is None for r in admin.rows_for(task_id)):
        if time.monotonic() > deadline:
            break
        again.sync()
        again.run(until=lambda: not again.queue, timeout=10)
        time.sleep(0.3)
    assert [parse_label(r["label"]).attempt for r in rows] == [1], rows


def test_a_stop_after_losing_redis_still_publishes_what_the_task_printed(contexts, admin):
    """Redis is lost while a task runs, and the user stops it before the agent adopted its
    instance again: the instance holds everything the task printed; it must be read before
    the instance goes."""
    from tests.agent_harness import wipe

    ctx = contexts()
    task_id, _ = _a_long_task_that_printed(ctx, admin)
    wipe(ctx)
    admin.stop_task(task_id)
    reborn = contexts(agent_name=ctx.config.agent_name, prefix=ctx.prefix)
    again = RetryingHarness(reborn, max_sleep=0.2)
    again.sync()
    again.run(until=lambda: again.done(task_id), sync_every=0.3, timeout=30)
    assert admin.task(task_id)["state"] == "stopped"
    assert admin.refused_agent_states(task_id) == []
    assert "sim log line" in (admin.task_log(task_id) or ""), admin.task_log(task_id)


def reached_phase(ctx, task_id, phase, **fields):
    def check():
        record = ctx.store.get(task_id)
        return (
            record is not None
            and record.phase == phase
            and all(getattr(record, k) == v for k, v in fields.items())
        )

    return check


def test_a_log_s3_refused_until_the_end_is_published_once_s3_is_back(contexts, admin):
    """S3 is down for longer than the final upload's tries and the report and destroy that
    follow: the log is kept in Redis. Once S3 answers again, it must be published."""
    import time

    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = run_until(ctx, task_id, reached_phase(ctx, task_id, Phase.FINISHING))
    admin.s3_down(3600)
    try:
        harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=90)
        assert ctx.store.get(task_id).publish_failures == ctx.settings.publish_tries
    finally:
        admin.s3_up()
    assert admin.task_log(task_id) is None  # kept in Redis, not published yet
    deadline = time.monotonic() + 20  # the agent goes on syncing; S3 is back
    while admin.task_log(task_id) is None and time.monotonic() < deadline:
        harness.run(until=lambda: not harness.queue, sync_every=0.3, timeout=5)
        harness.sync()
        time.sleep(0.3)
    assert "PONOS_EXIT_CODE=0" in (admin.task_log(task_id) or "")


def test_a_worker_killed_before_the_kept_log_is_published_loses_nothing(
    contexts, admin, monkeypatch
):
    """S3 down during the final upload's tries (the log is kept), back by the end; the worker
    that destroys the instance is killed right after closing the record, before its last
    try at the kept log. The log must still be published."""
    import time

    from ponos_tasks import steps

    ctx = contexts()
    task_id = admin.one_task(env=scripted(0))
    harness = run_until(ctx, task_id, reached_phase(ctx, task_id, Phase.FINISHING))
    admin.s3_down(3600)
    try:
        harness.run(
            until=reached_phase(ctx, task_id, Phase.DESTROYING, final_reported=True), timeout=90
        )
    finally:
        admin.s3_up()

    class Killed(BaseException):
        pass

    def killed(*args, **kwargs):
        raise Killed("SIGKILL")

    monkeypatch.setattr(steps, "_publish_kept_log", killed)
    with contextlib.suppress(Killed):
        harness.run(until=lambda: harness.done(task_id), timeout=30)
    monkeypatch.undo()
    assert harness.done(task_id)
    # The message is delivered again (acks_late); the sync loop goes on.
    from ponos_tasks.models import Next, StepName

    harness.push(task_id, [Next(StepName.DESTROY_INSTANCE)])
    deadline = time.monotonic() + 15
    while admin.task_log(task_id) is None and time.monotonic() < deadline:
        harness.run(until=lambda: not harness.queue, sync_every=0.3, timeout=5)
        harness.sync()
        time.sleep(0.3)
    assert "PONOS_EXIT_CODE=0" in (admin.task_log(task_id) or "")


def test_an_unread_log_of_a_failed_attempt_does_not_shorten_the_next_attempts_wait(contexts, admin):
    """Attempt 1 exits early; its log could not be read at first (read again, fine), and the
    attempt is retried. Attempt 2 runs to exit 0, and one read of its log fails: the agent
    must read it again (log_read_deadline from *that* failure), not give up at once."""
    ctx = contexts(logs_interval=3600, vast_api={"log_read_deadline": 5.0})
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="2000"))
    admin.faults({"fault": "unexpected_exit", "label": f"{task_id}-1$", "after": 300})

    def first_upload_done():
        record = ctx.store.get(task_id)
        return record is not None and record.logs_published_at is not None

    harness = run_until(ctx, task_id, first_upload_done, timeout=60)
    # The next agent-level log read (attempt 1's end) fails: 4 tries.
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503, "times": 4})
    harness.run(
        until=reached_phase(ctx, task_id, Phase.RUNNING, attempt=2), timeout=60, sync_every=0.5
    )
    # Attempt 1's log could not be read at first (then it was, and had no marker).
    assert any("its log could not be read" in line for line in ctx.logbook.lines(task_id))
    # Attempt 2's end: one read fails, the next would succeed.
    admin.faults({"fault": "http_5xx", "endpoint": "logs", "status": 503, "times": 4})
    harness.run(until=lambda: harness.done(task_id), sync_every=0.5, timeout=90)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason


def test_a_failed_start_after_a_retry_is_retried_again_not_ended_error(contexts, admin):
    """Attempt 1 runs and exits early (retried); attempt 2's container fails to start (an
    OCI error), later than early_exit_window after attempt 1 was seen running. Attempt 2
    never ran: it is a failed start, so a third attempt runs the task."""
    ctx = contexts(vast_api={"early_exit_window": 2.0, "start_attempts": 3})
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="1000"), command="worker")
    admin.faults({"fault": "unexpected_exit", "label": f"{task_id}-1$", "after": 120})
    admin.faults({"fault": "oci_failure", "label": f"{task_id}-2$"})
    # Creates answer 3 s late (a loaded API): attempt 2 fails to start more than
    # early_exit_window after attempt 1 was seen running.
    admin.faults({"fault": "slow", "endpoint": "create", "delay": 3.0, "times": 2})
    harness = RetryingHarness(ctx, max_sleep=0.2)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), sync_every=0.5, timeout=60)
    record = ctx.store.get(task_id)
    assert record.attempt == 3 and record.final_state == "completed", record.reason
