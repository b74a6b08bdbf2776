"""Adversarial review: fault combinations that break one of the agent's guarantees.

Each test drives the chain's steps in-process (tests/agent_harness.py) against the
simulators and a real Redis, like tests/test_evidence.py. A test marked xfail(strict=True)
documents a break that is not fixed yet.
"""

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


def run_until(ctx, task_id, reached, timeout=30.0, **kwargs) -> Harness:
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=reached, timeout=timeout, **kwargs)
    return harness


@pytest.mark.xfail(
    strict=True,
    reason="guarantee 2: the final report swallows ReportInFlight for `running`, sends "
    "`completed` over `pending` (refused) and falls back to `error`",
)
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
    harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60)
    assert admin.refused_agent_states(task_id) == []
    assert admin.task(task_id)["state"] == "completed", admin.accepted_agent_states(task_id)
