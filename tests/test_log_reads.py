"""Log reads that hold no worker (ponos_tasks/log_reads.py): a step asks Vast.ai for the
log, returns, and comes back to read it once it is uploaded."""

import contextlib
import time

import pytest

from ponos_tasks import log_reads
from ponos_tasks.lifecycle import Phase
from ponos_tasks.log_reads import Pending, poll_delay, read_instance_log
from tests.agent_harness import Harness

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
)


def test_polls_start_soon_and_settle_at_the_longest_gap():
    delays = [poll_delay(n) for n in range(10)]
    assert delays[0] == log_reads.FIRST_POLL
    assert delays == sorted(delays)
    assert delays[-1] == log_reads.LONGEST_POLL


@contextlib.contextmanager
def log_uploads_take(stack, sim_seconds: float):
    """Vast.ai's log uploads take about this long (the simulator's median) meanwhile."""
    state = stack.vast.state
    before = state.log_delay
    state.log_delay = sim_seconds
    try:
        yield
    finally:
        state.log_delay = before


def log_requests(stack, instance_ids) -> list[dict]:
    with stack.vast.state.lock:
        return [
            {"inst": e["inst"].id, "asked_at": e["asked_at"], "ready_at": e["ready_at"]}
            for e in stack.vast.state.logs.values()
            if e["inst"].id in instance_ids
        ]


@pytest.mark.stack
def test_two_ended_tasks_wait_for_their_logs_side_by_side_in_one_worker(stack, contexts, admin):
    """The harness runs one step at a time, as a single Celery worker would: a step that
    waited for Vast.ai's upload would make the second task's log request wait for the
    first's upload to land. Here the second log is asked for while the first is awaited."""
    ctx = contexts()
    tasks = [admin.one_task(env=scripted(0)) for _ in range(2)]
    harness = Harness(ctx)
    with log_uploads_take(stack, 200.0):  # 2 s at this stack's clock: minutes, rarely
        harness.sync()
        harness.run(until=lambda: all(harness.done(t) for t in tasks), timeout=90, sync_every=0.5)
    assert [admin.task(t)["state"] for t in tasks] == ["completed", "completed"]
    instances = {ctx.store.get(t).instance_id for t in tasks}
    firsts = {}
    for request in sorted(log_requests(stack, instances), key=lambda r: r["asked_at"]):
        firsts.setdefault(request["inst"], request)
    assert len(firsts) == 2, firsts
    first, second = sorted(firsts.values(), key=lambda r: r["asked_at"])
    assert second["asked_at"] < first["ready_at"], (first, second)
    # Each log was asked for once: the polls read the same upload, they do not ask again.
    assert len(log_requests(stack, instances)) == 2


@pytest.mark.stack
def test_a_log_never_uploaded_is_unread_after_the_wait_and_asked_again(stack, contexts, admin):
    """An upload that never lands (Vast.ai's tail: minutes) is "could not read" once
    log_read_wait has passed since the ask: None, never "no log"; the next read asks anew."""
    ctx = contexts()
    ctx.settings = ctx.settings.but(log_read_wait=1.0)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="2000"))
    harness = Harness(ctx)
    harness.sync()
    harness.run(
        until=lambda: ctx.store.get(task_id).phase == Phase.RUNNING, timeout=30, sync_every=0.5
    )
    record = ctx.store.get(task_id)
    with log_uploads_take(stack, 1e7):
        answers = [read_instance_log(ctx, record, "test")]
        while isinstance(answers[-1], Pending):
            time.sleep(answers[-1].delay)
            answers.append(read_instance_log(ctx, record, "test"))
        assert answers[-1] is None and len(answers) >= 2
        assert ctx.store.log_read(task_id, record.attempt, "test") is None
        assert isinstance(read_instance_log(ctx, record, "test"), Pending)  # asked anew
    assert len(log_requests(stack, {record.instance_id})) == 2
    admin.stop_task(task_id)
    harness.run(until=lambda: harness.done(task_id), timeout=30, sync_every=0.5)
