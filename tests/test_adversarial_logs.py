"""Adversarial review of the non-blocking log reads (ponos_tasks/log_reads.py) and of the
flat view's fallback to full listings: fault combinations that break a guarantee.

Each test drives the agent's steps in-process against the simulators and a real Redis, as
tests/test_adversarial.py does. A test marked xfail(strict=True) shows a break not fixed yet.
"""

import time

import pytest

from ponos_tasks import steps
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Next, StepName
from tests.agent_harness import Harness

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_log_reads import log_requests, log_uploads_take
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
)


def _instance_of(admin, task_id: str) -> dict | None:
    found = [i for i in admin.instances() if task_id in (i["label"] or "")]
    return found[0] if found else None


def _running_then_ended(ctx, admin, task_id: str) -> Harness:
    """Run the chain until the task is seen running, then leave it (no step runs) until
    its instance has ended: what a backed-up queue would do."""
    harness = Harness(ctx)
    harness.sync()
    harness.run(
        until=lambda: ctx.store.get(task_id).phase == Phase.RUNNING, timeout=30, sync_every=0.5
    )
    deadline = time.monotonic() + 20
    while (_instance_of(admin, task_id) or {}).get("actual_status") not in ("stopped", "exited"):
        assert time.monotonic() < deadline, _instance_of(admin, task_id)
        time.sleep(0.1)
    # The agent's own listing shows the end too: on a loaded machine the last sync's can
    # still be younger than snapshot_max_age and older than the end (a watch then waits).
    harness.sync()
    return harness


def _run_to_the_end(harness: Harness, task_id: str) -> None:
    """Let the chain run at its own pace until the task is done (a watch taking it over)."""
    harness.queue.clear()
    harness.push(task_id, [Next(StepName.WATCH)])
    harness.run(until=lambda: harness.done(task_id), timeout=60, sync_every=0.5)


@pytest.mark.stack
def test_a_watch_that_comes_back_late_still_reads_the_log_it_asked_for(stack, contexts, admin):
    """Each run of the watch comes back later than log_read_wait after the previous one (a
    queue backed up behind slow steps: Celery runs a countdown when a worker is free). The
    log was uploaded seconds after the ask, yet every late run took the read for abandoned
    and asked Vast.ai anew: a Pending loop that never ends, the instance of a finished task
    billing on, and one more request_logs per run when the queue is already slow."""
    ctx = contexts()
    ctx.settings = ctx.settings.but(log_read_wait=1.0)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="100"))
    harness = _running_then_ended(ctx, admin, task_id)
    try:
        follow = steps.watch(ctx, task_id)  # chain None: this chain takes the task over
        runs = 1
        while follow and follow[0].step == StepName.WATCH and runs < 6:
            time.sleep(ctx.settings.log_read_wait + 0.3)
            follow = steps.watch(ctx, task_id, **follow[0].kwargs)
            runs += 1
        record = ctx.store.get(task_id)
        assert record.phase == Phase.FINISHING, (runs, record)
        assert record.final_state == "completed", record
        assert len(log_requests(stack, {record.instance_id})) == 1
    finally:
        _run_to_the_end(harness, task_id)
    assert admin.task(task_id)["state"] == "completed"


@pytest.mark.stack
def test_an_instance_destroyed_while_its_log_is_awaited_still_ends_by_its_marker(
    stack, contexts, admin
):
    """The task's command printed its exit marker and stopped its instance; the watch asked
    for the log, whose upload takes a while. Meanwhile a user (a cleanup script of the
    account) destroys the stopped instance. The log asked for is still uploaded to its
    result_url: it is the positive fact the task completed. The watch took the instance's
    absence for an end without exit code (`error`), and the final upload, asking anew for the
    log of an instance now gone, published none of the task's output."""
    ctx = contexts(vast_api={"instance_reads": "full_list"})  # absence shows at the next sync
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="100"))
    harness = _running_then_ended(ctx, admin, task_id)
    with log_uploads_take(stack, 200.0):  # 2 s at this stack's clock
        follow = steps.watch(ctx, task_id)
        assert [n.step for n in follow] == [StepName.WATCH]  # asked; the upload is awaited
        ctx.vast.destroy_instance(ctx.store.get(task_id).instance_id)  # the user's destroy
        harness.queue.clear()
        harness.push(task_id, follow)
        harness.run(until=lambda: harness.done(task_id), timeout=60, sync_every=0.5)
    assert admin.task(task_id)["state"] == "completed", ctx.store.get(task_id).reason
    assert "PONOS_EXIT_CODE=0" in admin.task_log(task_id)


@pytest.mark.stack
def test_a_log_asked_for_at_an_end_is_dropped_when_the_container_runs_again(stack, contexts, admin):
    """A watch asked for the log at an end (a crash) and Vast.ai restarted the container
    before the upload was read: the watch then sees the instance running again. That read
    holds the crashed run's output; kept, it answered the read at the real end, which was
    decided on it (no exit marker: an error) though the task completed. Here the ask is
    made while the instance runs (the state a restart leaves), then the task ends normally."""
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="300"))
    harness = Harness(ctx)
    harness.sync()
    harness.run(
        until=lambda: ctx.store.get(task_id).phase == Phase.RUNNING, timeout=30, sync_every=0.5
    )
    record = ctx.store.get(task_id)
    asked = steps.read_instance_log(ctx, record, "watch")  # the read a crash had asked for
    assert isinstance(asked, steps.Pending)
    time.sleep(0.5)  # its upload lands: the log of a run without its exit marker
    harness.queue.clear()
    harness.push(task_id, steps.watch(ctx, task_id))  # sees the instance running
    assert ctx.store.get(task_id).phase == Phase.RUNNING
    assert ctx.store.log_read(task_id, record.attempt, "watch") is None
    harness.run(until=lambda: harness.done(task_id), timeout=60, sync_every=0.5)
    assert ctx.store.get(task_id).final_state == "completed", ctx.store.get(task_id).reason
    assert admin.task(task_id)["state"] == "completed"
