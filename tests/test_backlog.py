"""A backlogged steps queue does not feed itself: the sync does not send a stalled chain's
step again while the task's last message still waits in the queue (steps.HELD_WHILE_QUEUED).

Against the simulators, a private redis-server (the Celery queue is a plain list named
`steps`: a shared Redis may have a real agent's) and real Celery messages sent by a producer
that no worker consumes, as in a backlog.
"""

import time

import pytest
import redis
from celery import Celery

from ponos_tasks import steps
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import SENT_AT_HEADER, STEPS_QUEUE, Next, StepName
from ponos_tasks.simulators.stack import RedisProcess
from tests.agent_harness import Admin, Harness, make_context, wipe
from tests.test_steps import admin, scripted, stack  # noqa: F401 (fixtures)

pytestmark = pytest.mark.stack


@pytest.fixture
def private(tmp_path):
    server = RedisProcess(tmp_path).start()
    yield server
    server.stop()


def producer(url: str) -> Celery:
    app = Celery("backlog-test", broker=url, set_as_current=False)
    app.conf.broker_transport = "ponos_tasks.broker:Transport"
    return app


def send(app: Celery, ctx, task_id: str, item: Next) -> None:
    """What tasks.enqueue does, through this test's producer."""
    app.send_task(
        steps.STEPS[item.step].task_name,
        args=(task_id,),
        kwargs=item.kwargs,
        countdown=item.countdown or None,
        queue=STEPS_QUEUE,
        headers=steps.message_headers(ctx, task_id, item.countdown),
    )


def test_a_chain_waiting_its_turn_in_the_queue_is_not_sent_again(
    stack,  # noqa: F811
    admin: Admin,  # noqa: F811
    private,
):
    ctx = make_context(stack, private.url)
    app = producer(private.url)
    queue = redis.Redis.from_url(private.url)
    try:
        task_id = admin.one_task(env=scripted(0))
        Harness(ctx).sync()  # accepted, and its start planned (not run: no worker here)
        follow = steps.run_step(ctx, task_id, StepName.START)
        assert ctx.store.get(task_id).phase == Phase.WAITING_OFFER
        assert [item.step for item in follow] == [StepName.CHOOSE_OFFER]
        # The step's follow-up goes to Celery's queue behind a backlog: nobody takes it.
        send(app, ctx, task_id, follow[0])
        oldest = ctx.store.oldest_waiting_sent_at(STEPS_QUEUE)
        assert oldest is not None and oldest == ctx.store.queued_at(task_id)

        time.sleep(ctx.settings.heartbeat_stale + 0.5)  # the chain now looks stalled
        held = steps.sync(ctx)
        assert held.held == [task_id]
        assert [m for t, m in held.enqueue if t == task_id] == []
        assert queue.llen(STEPS_QUEUE) == 1

        # A worker takes the message (and dies with it): the queue has moved past it, the
        # stall is real, and the next sync resumes the chain.
        assert queue.rpop(STEPS_QUEUE) is not None
        resumed = steps.sync(ctx)
        assert resumed.held == []
        assert [m.step for t, m in resumed.enqueue if t == task_id] == [StepName.CHOOSE_OFFER]
    finally:
        wipe(ctx)
        ctx.redis.close()


def test_a_message_with_a_countdown_leaves_no_mark(stack, private):  # noqa: F811
    """A countdown message is taken by a worker at once and held until due: it never waits
    in the queue, so it holds nothing back; every message carries its send time."""
    ctx = make_context(stack, private.url)
    try:
        headers = steps.message_headers(ctx, "t-countdown", 5.0)
        assert ctx.store.queued_at("t-countdown") is None
        assert isinstance(headers[SENT_AT_HEADER], float)
        headers = steps.message_headers(ctx, "t-now", 0)
        assert ctx.store.queued_at("t-now") == headers[SENT_AT_HEADER]
    finally:
        wipe(ctx)
        ctx.redis.close()
