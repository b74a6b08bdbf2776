"""A backlogged steps queue does not feed itself: the sync does not send a stalled chain's
step again while the task's last message still waits in the queue (loop.HELD_WHILE_QUEUED).

Against the simulators, a private redis-server (the Celery queue is a plain list named
`steps`: a shared Redis may have a real agent's) and real Celery messages sent by a producer
that no worker consumes, as in a backlog.
"""

import time

import pytest
import redis
from celery import Celery

from ponos_tasks import loop, steps
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import SENT_AT_HEADER, SEQ_HEADER, STEPS_QUEUE, Next, StepName
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
        headers=loop.message_headers(ctx, task_id, item.step),
    )


def send_other(app: Celery, ctx, task_id: str, sent_at: float) -> None:
    """Another task's chain message, stamped `sent_at` by the clock of the host sending it."""
    headers = loop.message_headers(ctx, task_id, StepName.WATCH)
    app.send_task(
        steps.STEPS[StepName.WATCH].task_name,
        args=(task_id,),
        queue=STEPS_QUEUE,
        headers={**headers, SENT_AT_HEADER: sent_at},
    )


def resumed(result, task_id: str, step: StepName) -> bool:
    return any(t == task_id and m.step == step for t, m in result.enqueue)


def waiting_offer_with_lost_message(ctx, app, queue, admin: Admin) -> str:  # noqa: F811
    """A task in waiting_offer whose CHOOSE_OFFER was sent, then taken by a worker that died
    with it (acks_late: it sits in kombu's unacked hash for an hour, not in the list)."""
    task_id = admin.one_task(env=scripted(0))
    Harness(ctx).sync()  # accepted, its start planned
    follow = steps.run_step(ctx, task_id, StepName.START)
    assert ctx.store.get(task_id).phase == Phase.WAITING_OFFER
    assert [item.step for item in follow] == [StepName.CHOOSE_OFFER]
    send(app, ctx, task_id, follow[0])
    assert queue.rpop(STEPS_QUEUE) is not None  # taken; the worker dies: lost
    assert queue.llen(STEPS_QUEUE) == 0
    return task_id


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
        oldest = ctx.store.oldest_waiting_seq(STEPS_QUEUE)
        assert oldest is not None
        assert oldest == ctx.store.queued_seq(task_id, StepName.CHOOSE_OFFER)

        time.sleep(ctx.settings.heartbeat_stale + 0.5)  # the chain now looks stalled
        held = loop.sync(ctx)
        assert held.held == [task_id]
        assert [m for t, m in held.enqueue if t == task_id] == []
        assert queue.llen(STEPS_QUEUE) == 1

        # A worker takes the message (and dies with it): the queue has moved past it, the
        # stall is real, and the next sync resumes the chain.
        assert queue.rpop(STEPS_QUEUE) is not None
        resumed = loop.sync(ctx)
        assert resumed.held == []
        assert [m.step for t, m in resumed.enqueue if t == task_id] == [StepName.CHOOSE_OFFER]
    finally:
        wipe(ctx)
        ctx.redis.close()


def test_every_message_is_numbered_and_marks_its_task_and_step(stack, private):  # noqa: F811
    """Every message, a countdown's too (a busy worker leaves it in the queue), carries its
    send time and a number from one counter; the number is the mark of (task, step)."""
    ctx = make_context(stack, private.url)
    try:
        first = loop.message_headers(ctx, "t", StepName.WATCH)
        second = loop.message_headers(ctx, "t", StepName.PUBLISH_LOGS)
        assert isinstance(first[SENT_AT_HEADER], float)
        assert second[SEQ_HEADER] == first[SEQ_HEADER] + 1
        assert ctx.store.queued_seq("t", StepName.WATCH) == first[SEQ_HEADER]
        assert ctx.store.queued_seq("t", StepName.PUBLISH_LOGS) == second[SEQ_HEADER]
        assert ctx.store.queued_seq("t", StepName.CHOOSE_OFFER) is None
    finally:
        wipe(ctx)
        ctx.redis.close()


@pytest.fixture
def lost_chain(stack, admin, private):  # noqa: F811
    """(context, producer, queue, task id): a task whose CHOOSE_OFFER was lost, now stalled."""
    ctx = make_context(stack, private.url)
    app = producer(private.url)
    queue = redis.Redis.from_url(private.url)
    try:
        task_id = waiting_offer_with_lost_message(ctx, app, queue, admin)
        time.sleep(ctx.settings.heartbeat_stale + 0.5)  # the chain now looks stalled
        yield ctx, app, queue, task_id
    finally:
        wipe(ctx)
        ctx.redis.close()


def test_a_lost_chain_is_resumed_although_a_lagging_host_keeps_the_queue_busy(lost_chain):
    """Found by an adversarial review of the hold: it compared the task's mark (the clock of
    the host that sent its message) with the send time of the queue's oldest message (the
    clock of whichever host sent that one). A host whose clock runs 10 minutes behind sends
    messages that look 10 minutes old; every one was sent after the task's message left the
    queue, yet the lost chain was held for as long as that host kept the queue busy."""
    ctx, app, _, task_id = lost_chain
    send_other(app, ctx, "other", time.time() - 600.0)  # sent now, by a lagging clock
    result = loop.sync(ctx)
    assert result.held == []
    assert resumed(result, task_id, StepName.CHOOSE_OFFER)


def test_a_lost_chain_is_not_held_by_the_tasks_other_messages(lost_chain):
    """Found by an adversarial review of the hold: its mark was per task, and every message
    for the task moved it, such as a destroy of a duplicate that the sync sends again every
    heartbeat_stale while Vast.ai refuses it. In a backlog slower than heartbeat_stale, the
    lost chain was held as long as the destroy kept failing, with nothing of it left to run.
    The mark is now per (task, step): the destroy's copies wait, the chain is resumed."""
    ctx, app, queue, task_id = lost_chain
    # The sync's destroy of a duplicate, sent after the chain's message was lost, still
    # waits in the backlog.
    send(app, ctx, task_id, Next(StepName.DESTROY_UNWANTED, kwargs={"instance_id": 1}))
    result = loop.sync(ctx)
    assert result.held == []
    assert resumed(result, task_id, StepName.CHOOSE_OFFER)
    assert queue.llen(STEPS_QUEUE) == 1  # the destroy still waits: it was not taken


def test_marks_do_not_collide_with_an_older_agents_string_mark(stack, private):  # noqa: F811
    """An agent of 281e277 kept its per-task mark as a string under queued:<id>; a newer
    agent sharing its Redis during an upgrade still numbers and marks its messages."""
    ctx = make_context(stack, private.url)
    try:
        ctx.redis.set(f"{ctx.keys.prefix}queued:t", "1796578334.2")
        headers = loop.message_headers(ctx, "t", StepName.WATCH)
        assert ctx.store.queued_seq("t", StepName.WATCH) == headers[SEQ_HEADER]
    finally:
        wipe(ctx)
        ctx.redis.close()
