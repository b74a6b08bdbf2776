"""The line of creates: a burst's creates wait for their turn in Celery, not in a worker.

Vast.ai allows one create every 4.5 s per account. A burst of N tasks used to put every
worker process to sleep in the create limiter (one slot every 4.6 s each), while the watches,
log reads and reports of the running tasks waited behind them in the queue. Now a new attempt
takes a turn (ratelimit.take_turn) and its step comes back shortly before it.
"""

import math
import time

import pytest

from ponos_tasks import reconcile, steps
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import StepName
from ponos_tasks.ratelimit import RedisRateLimiter
from ponos_tasks.simulators.stack import LocalStack
from tests.agent_harness import Admin, Harness, make_context, wipe

TIME_SCALE = 100.0
FAST = {
    "SIM_DURATION": "20",
    "SIM_PULL_SECONDS": "5",
    "SIM_LOG_LINES": "3",
    "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0",
    "SIM_SELF_STOP": "true",
}


def test_turns_follow_each_other_and_the_last_reserved_slot(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    assert limiter.take_turn("create") == pytest.approx(0.0, abs=0.01)  # an empty line
    assert limiter.take_turn("create") == pytest.approx(1.0, abs=0.01)
    assert limiter.take_turn("create") == pytest.approx(2.0, abs=0.01)
    # A turn reserves no slot: the bucket's next slot is free now...
    assert limiter.reserve("create") == pytest.approx(0.0, abs=0.01)
    assert limiter.reserve("create") == pytest.approx(1.0, abs=0.01)
    # ...and a turn taken after slots were reserved comes after them and after the line.
    limiter.reserve("create")
    limiter.reserve("create")
    limiter.reserve("create")  # the bucket's last slot is now 4 s away
    assert limiter.take_turn("create") == pytest.approx(5.0, abs=0.01)
    assert limiter.take_turn("create") == pytest.approx(6.0, abs=0.01)


def test_a_penalty_pushes_the_line_back(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    limiter.penalize("create")  # 12 s to 18 s (random, so that two users do not lock step)
    assert 12.0 - 0.01 <= limiter.take_turn("create") <= 18.0 + 0.01


@pytest.fixture(scope="module")
def stack(redis_url):
    stack = LocalStack(redis_url, time_scale=TIME_SCALE, start_redis=False)
    stack.start()
    yield stack
    stack.stop()


@pytest.fixture
def ctx(stack, redis_url):
    ctx = make_context(stack, redis_url)
    yield ctx
    wipe(ctx)
    ctx.redis.close()


def test_a_create_far_from_its_turn_waits_in_celery_then_creates_once(stack, ctx):
    admin = Admin(stack)
    task_id = admin.one_task(env=FAST, command="worker")
    harness = Harness(ctx)
    harness.sync()  # accepts the task
    interval = ctx.limiter.interval("create")
    stale = ctx.settings.stale_after(Phase.CREATING)
    # Tasks ahead in the line: the turn comes after the record would look stalled.
    for _ in range(math.ceil((stale + 2.0) / interval)):
        ctx.limiter.take_turn("create")
    calls = dict(admin.stats()["calls"])

    follow = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)

    record = ctx.store.get(task_id)
    assert record.phase == Phase.CREATING and record.attempt == 1
    turn_in = record.create_turn_at - ctx.now()
    assert stale < turn_in < stale + 2.0 + 2 * interval
    [again] = follow
    assert again.step == StepName.CREATE_INSTANCE
    assert again.countdown == pytest.approx(turn_in - steps.create_lead(ctx), abs=0.5)
    # Nothing reached Vast.ai: no create, not even the label lookup.
    assert admin.stats()["calls"] == calls
    assert "waiting for a create slot" in "\n".join(ctx.logbook.lines(task_id))
    # The sync does not take the waiting chain for a stalled one, even past `stale`.
    later = record.heartbeat_at + stale + 1.0
    assert later < record.create_turn_at
    assert not reconcile.is_stalled(record, later, ctx.settings)

    harness.push(task_id, follow)
    harness.run(until=lambda: harness.done(task_id), timeout=60.0)
    assert ctx.store.get(task_id).final_state == "completed"
    rows = admin.rows_for(task_id)
    assert len(rows) == 1, rows
    # The create left at its turn, not before it.
    assert time.time() >= record.create_turn_at - 0.2
