"""The budget in the sync loop and the chain's steps, run in-process (tests/agent_harness.py)
against the simulators and a real Redis: a loss of Redis rebuilds the day's counter from
the instances still alive, never for less, and a task held by a limit says why in its
published log and in `status`, while Arkindex still shows it pending."""

from __future__ import annotations

import time

import pytest

from ponos_tasks import loop
from ponos_tasks.budget import MAX_SPEND_PER_DAY, headroom, spend_today, utc_day
from ponos_tasks.lifecycle import Phase
from tests.agent_harness import Admin, Harness, make_context, wipe
from tests.fixtures_stack import running_stack

TIME_SCALE = 100.0
# A scripted instance that runs until it is stopped (no SIM_DURATION), after a short pull.
FOREVER = {"SIM_PULL_SECONDS": "5", "SIM_LOG_LINES": "3"}
DAY, CAP = 5.0, 1.0


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
def ctx(stack, redis_url, admin):
    ctx = make_context(
        stack, redis_url, budget={"max_spend_per_day": DAY, "max_spend_per_task": CAP}
    )
    yield ctx
    try:
        prefix = ctx.label_prefix()
        left = [
            r["label"]
            for r in admin.ledger()
            if r["destroyed_at"] is None and (r["label"] or "").startswith(prefix)
        ]
        assert left == [], left
    finally:
        wipe(ctx)
        ctx.redis.close()


def running(ctx, task_id):
    record = ctx.store.get(task_id)
    return record is not None and record.phase == Phase.RUNNING


def test_a_loss_of_redis_rebuilds_the_day_and_holds_new_work(ctx, admin):
    first = admin.one_task(slug="first", env=FOREVER)
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: running(ctx, first), timeout=30, sync_every=0.3)
    spent_before = spend_today(ctx.budget, time.time())
    assert spent_before > 0  # the meter counts while it runs

    # A second task is taken from Arkindex (the day can afford it), but the message that
    # would start its chain is lost with Redis, which loses everything now.
    second = admin.one_task(slug="second", env=FOREVER)
    loop.sync(ctx)
    assert admin.task(second)["agent_id"] is not None and ctx.store.get(second) is not None
    wipe(ctx)

    after = Harness(ctx)
    after.sync()
    today = utc_day(time.time())
    # The instance of `first` is alive: the day may have cost up to DAY minus what `first`
    # may still cost (its cap): at least DAY - CAP is taken as spent, never less.
    assert ctx.budget.rebuilt(today)
    assert spend_today(ctx.budget, time.time()) >= DAY - CAP - 1e-9
    room = headroom(ctx.settings, ctx.budget, time.time())
    assert room.held_by == MAX_SPEND_PER_DAY, room
    # `second` comes back from Arkindex (assigned, pending) and waits, saying why: in its
    # record (`status`), its agent lines and its published log; nothing refused.
    record = ctx.store.get(second)
    assert record.phase == Phase.ACCEPTED and record.held_by == MAX_SPEND_PER_DAY
    assert record.waiting_for.startswith("max_spend_per_day $5:")
    after.run(until=lambda: bool(admin.task_log(second)), timeout=15, sync_every=0.3)
    assert "waiting: max_spend_per_day $5:" in admin.task_log(second)
    assert admin.task(second)["state"] == "pending"
    # A third task is not taken from Arkindex at all: it could not start.
    third = admin.one_task(slug="third", env=FOREVER)
    after.sync()
    assert admin.task(third)["agent_id"] is None

    # Clean up: the user stops the two tasks the agent holds; the third is left pending.
    admin.stop_task(first)
    admin.stop_task(second)
    admin.stop_task(third)
    after.run(
        until=lambda: all(admin.task(t)["state"] == "stopped" for t in (first, second)),
        timeout=30,
        sync_every=0.3,
    )
    after.run(until=lambda: after.done(first), timeout=30, sync_every=0.3)
