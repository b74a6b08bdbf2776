"""Adversarial review: fault combinations that break one of the agent's guarantees.

Each test drives the chain's steps in-process (tests/agent_harness.py) against the
simulators and a real Redis, like tests/test_evidence.py. A test marked xfail(strict=True)
documents a break that is not fixed yet.
"""

import pytest
import redis

from ponos_tasks.arkindex import ArkindexUnavailable
from ponos_tasks.lifecycle import Phase
from ponos_tasks.vast import VastBadAnswer, VastRateLimited, VastServerError, VastTransportError
from tests.agent_harness import Harness

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
)

# tasks.TRANSIENT: what Celery retries (tasks.py is not imported here: it builds the app).
TRANSIENT = (
    redis.exceptions.LockError,
    VastRateLimited,
    VastServerError,
    VastTransportError,
    VastBadAnswer,
    ArkindexUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
)


class RetryingHarness(Harness):
    """The harness, with Celery's autoretry: a step that raises a transient error is queued
    again (after `retry_delay` s, compressed like every countdown)."""

    retry_delay = 0.5

    def execute(self, task_id, item):
        try:
            return super().execute(task_id, item)
        except TRANSIENT:
            return [type(item)(item.step, self.retry_delay, dict(item.kwargs))]


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
