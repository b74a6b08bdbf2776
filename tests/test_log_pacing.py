"""Periodic log reads are paced so that the reads at a task's end never queue behind them
(ponos_tasks/log_pacing.py): a gate of their own in the shared rate limiter, never waited
for, and a period that stretches with the number of running tasks. Against the simulators
and a real Redis, with the fixtures of test_steps."""

import time

import pytest

from ponos_tasks import log_pacing, steps
from ponos_tasks.lifecycle import Phase
from ponos_tasks.log_reads import Pending, read_instance_log
from ponos_tasks.models import Next, StepName
from tests.test_evidence import run_until_phase
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
)


def test_the_period_stretches_past_what_the_gate_can_serve():
    assert log_pacing.periodic_interval(60.0, 0, 2.2) == 60.0
    assert log_pacing.periodic_interval(60.0, 27, 2.2) == 60.0
    assert log_pacing.periodic_interval(60.0, 100, 2.2) == pytest.approx(220.0)
    assert log_pacing.periodic_interval(60.0, 1000, 2.2) == pytest.approx(2200.0)


def test_the_gate_keeps_half_of_the_log_endpoint():
    from ponos_tasks.ratelimit import DEFAULT_INTERVALS

    assert DEFAULT_INTERVALS[log_pacing.GATE] == DEFAULT_INTERVALS["logs"] * 2


def log_asks(stack) -> int:
    return stack.vast.state.stats()["calls"].get("logs", 0)


def publish_due(follow) -> bool:
    return any(
        n.step == StepName.PUBLISH_LOGS and n.kwargs.get("final") is False for n in follow or []
    )


def test_a_watch_spaces_periodic_reads_by_the_number_of_running_tasks(contexts, admin):
    """With many tasks running, a task's live log is read every N x the gate's interval,
    not every logs_interval: the due reads then fit through the gate."""
    ctx = contexts(logs_interval=0.3)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    record = ctx.store.get(task_id)
    ctx.store.touch(task_id, logs_published_at=ctx.now() - 1.0)  # over logs_interval ago
    ctx.store.save_running_count(1)
    assert publish_due(steps.watch(ctx, task_id, chain=record.watch_chain))
    # 1000 running: 1000 x the gate's interval (2.2 s, scaled) is far over 1 s.
    ctx.store.save_running_count(1000)
    gate = ctx.limiter.interval(log_pacing.GATE)
    assert 1000 * gate > 1.0
    assert not publish_due(steps.watch(ctx, task_id, chain=record.watch_chain))
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), timeout=60)


def test_periodic_reads_pass_the_gate_one_at_a_time_and_end_reads_do_not_wait(
    contexts, admin, stack
):
    """Two running tasks due at once: the first periodic read asks Vast.ai, the second is
    skipped (no call, no read kept) until the gate's interval has passed; a read at an end
    asks at once, whatever the gate says."""
    ctx = contexts(logs_interval=3600)
    first = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    second = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = run_until_phase(ctx, first, Phase.RUNNING)
    harness.run(until=lambda: ctx.store.get(second).phase == Phase.RUNNING, timeout=30)
    gate = ctx.limiter.interval(log_pacing.GATE)
    time.sleep(gate)  # a read of the start may have taken the gate
    before = log_asks(stack)
    assert isinstance(steps.publish_logs(ctx, first, final=False), Next)  # asked: Pending
    assert log_asks(stack) == before + 1
    assert steps.publish_logs(ctx, second, final=False) is None  # the gate is taken
    record = ctx.store.get(second)
    assert ctx.store.log_read(second, record.attempt, "running") is None
    assert log_asks(stack) == before + 1
    # A read at the task's end is not gated.
    assert isinstance(read_instance_log(ctx, record, "final"), Pending)
    assert log_asks(stack) == before + 2
    time.sleep(gate)
    assert isinstance(steps.publish_logs(ctx, second, final=False), Next)
    assert log_asks(stack) == before + 3
    for task_id in (first, second):
        harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(first) and harness.done(second), timeout=60)


def test_the_sync_counts_the_running_tasks(contexts, admin):
    ctx = contexts()
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = run_until_phase(ctx, task_id, Phase.RUNNING)
    ctx.store.save_running_count(0)
    harness.sync()
    assert ctx.store.running_count() == 1
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), timeout=60)
