"""The line of creates: a burst's creates wait for their turn in Celery, not in a worker.

Vast.ai allows one create every 4.5 s per account. A burst of N tasks used to put every
worker process to sleep in the create limiter (one slot every 4.6 s each), while the watches,
log reads and reports of the running tasks waited behind them in the queue. Now a new attempt
takes a place in a line of creates (ratelimit.place_in_line) and its step comes back to Celery
until its turn is near.
"""

import math
import threading
import time

import pytest
import redis

from ponos_tasks import create_line, loop, overview, reconcile, steps
from ponos_tasks.arkindex import ArkindexUnavailable
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Next, StepName, TaskRecord
from ponos_tasks.ratelimit import RedisRateLimiter
from ponos_tasks.vast import VastError
from tests.agent_harness import Admin, Harness, make_context, wipe
from tests.fixtures_stack import running_stack

TIME_SCALE = 100.0
GRACE = 30.0  # how late a claimant may be and still count (create_line.line_grace)
FAST = {
    "SIM_DURATION": "20",
    "SIM_PULL_SECONDS": "5",
    "SIM_LOG_LINES": "3",
    "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0",
    "SIM_SELF_STOP": "true",
}


def turn(limiter, claimant: str) -> tuple[int, float]:
    return limiter.place_in_line("create", claimant, grace=GRACE)


def test_the_line_counts_places_after_the_buckets_next_free_slot(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    assert turn(limiter, "a:1") == (0, pytest.approx(0.0, abs=0.01))
    assert turn(limiter, "b:1") == (1, pytest.approx(1.0, abs=0.01))
    assert turn(limiter, "c:1") == (2, pytest.approx(2.0, abs=0.01))
    assert turn(limiter, "b:1") == (1, pytest.approx(1.0, abs=0.01))  # its place is kept
    assert list(limiter.line("create")) == ["a:1", "b:1", "c:1"]
    # The line holds places, not slots: the first one leaves it and takes its slot...
    limiter.leave_line("create", "a:1")
    assert limiter.reserve("create") == pytest.approx(0.0, abs=0.01)
    # ...and everyone behind it moves forward, after that slot.
    assert turn(limiter, "b:1") == (0, pytest.approx(1.0, abs=0.01))
    assert turn(limiter, "c:1") == (1, pytest.approx(2.0, abs=0.01))
    # A claimant that leaves from the middle (a stopped task) leaves no hole.
    limiter.leave_line("create", "b:1")
    assert turn(limiter, "c:1") == (0, pytest.approx(1.0, abs=0.01))


def test_a_claimant_that_came_back_keeps_its_new_place(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    for claimant in ("a:1", "b:1", "c:1"):
        turn(limiter, claimant)
    read = limiter.line("create")
    limiter.leave_line("create", "a:1")
    turn(limiter, "a:1")  # a new claim of the same attempt number
    assert limiter.leave_line_if_same("create", {c: read[c] for c in ("a:1", "b:1")}) == 1
    assert list(limiter.line("create")) == ["c:1", "a:1"]


def test_a_claimant_whose_turn_came_counts_until_its_slot_is_reserved(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    turn(limiter, "head:1")
    turn(limiter, "second:1")
    limiter.reserve("create")  # a create just went: the next free slot is 1 s away
    limiter.turn_came("create", "head:1")  # the head prepares its create
    assert limiter.line("create").keys() == {"second:1"}
    assert turn(limiter, "second:1") == (1, pytest.approx(2.0, abs=0.05))
    # The head's create reserves its slot and sleeps on it: counted once, in the bucket.
    reserved = []

    def on_reserved():  # what steps passes (on_slot), and a look of the second one
        limiter.leave_line("create", "head:1")
        reserved.append(turn(limiter, "second:1"))

    assert limiter.acquire("create", on_reserved=on_reserved) == pytest.approx(1.0, abs=0.05)
    assert reserved == [(0, pytest.approx(2.0, abs=0.05))]  # before the sleep, not after


def test_a_claimant_whose_turn_came_and_never_took_its_slot_stops_counting(
    redis_client, key_prefix
):
    """Its worker died after its turn came: those behind it wait `grace`, not until the
    sync resumes it (the create lock's timeout and a stale period: over a minute)."""
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    for claimant in ("dead1:1", "dead2:1", "dead3:1", "live:1"):
        limiter.place_in_line("create", claimant, grace=0.3)
    for claimant in ("dead1:1", "dead2:1", "dead3:1"):
        limiter.turn_came("create", claimant)
    assert limiter.place_in_line("create", "live:1", grace=0.3)[0] == 3
    time.sleep(0.35)
    assert limiter.place_in_line("create", "live:1", grace=0.3) == (
        0,
        pytest.approx(0.0, abs=0.01),
    )


def test_claimants_that_broke_their_promise_to_look_again_stop_counting(redis_client, key_prefix):
    """Their step's message was lost (a worker killed while it held the countdown messages):
    those behind them go on after `grace`, not when the sync resumes the lost ones."""
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    for claimant in ("lost1:1", "lost2:1", "lost3:1", "live:1"):
        limiter.place_in_line("create", claimant, grace=0.3)
        limiter.promise_look("create", claimant, 0.1)
    assert limiter.place_in_line("create", "live:1", grace=0.3)[0] == 3
    time.sleep(0.45)  # the promise (0.1 s) and the grace (0.3 s) are past
    assert limiter.place_in_line("create", "live:1", grace=0.3) == (
        0,
        pytest.approx(0.0, abs=0.01),
    )
    assert list(limiter.line("create"))[:3] == ["lost1:1", "lost2:1", "lost3:1"]  # kept
    # A lost one resumed by the sync looks again and is at the head at once.
    assert limiter.place_in_line("create", "lost1:1", grace=0.3)[0] == 0


def test_a_penalty_pushes_the_line_back(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 1.0})
    limiter.penalize("create")  # 12 s to 18 s (random, so that two users do not lock step)
    assert 12.0 - 0.01 <= turn(limiter, "a:1")[1] <= 18.0 + 0.01


def test_claimants_whose_attempt_no_longer_creates_leave_the_line():
    records = {
        "t1": TaskRecord.new("t1", 0.0, phase=Phase.CREATING, attempt=2),
        "t2": TaskRecord.new("t2", 0.0, phase=Phase.FINISHING, attempt=1),  # stopped
        "t3": TaskRecord.new("t3", 0.0, phase=Phase.WAITING_OFFER, attempt=0),
    }
    places = {c: str(i) for i, c in enumerate(["t1:1", "t1:2", "t2:1", "t3:1", "t4:1"])}
    assert list(create_line.left_the_line(places, records)) == ["t1:1", "t2:1", "t3:1", "t4:1"]


@pytest.fixture(scope="module")
def stack(redis_url):
    with running_stack(redis_url, TIME_SCALE) as stack:
        yield stack


@pytest.fixture
def ctx(stack, redis_url):
    ctx = make_context(stack, redis_url, budget={"max_instances": 40})
    yield ctx
    wipe(ctx)
    ctx.redis.close()


def fill_line(ctx, seconds: float) -> None:
    """Claimants ahead in the line for about `seconds` (no record: a sync would drop them),
    each promising to look again in an hour (so that they count)."""
    for i in range(math.ceil(seconds / ctx.limiter.interval("create"))):
        ctx.limiter.place_in_line("create", f"ahead-{i}:1", grace=GRACE)
        ctx.limiter.promise_look("create", f"ahead-{i}:1", 3600.0)


def creates_ahead(ctx) -> threading.Thread:
    """The claimants that `fill_line` put ahead take their turns: each leaves the line and
    takes its create slot from the bucket, as a create step does (no call is sent)."""

    def run():
        while (line := list(ctx.limiter.line("create"))) and line[0].startswith("ahead-"):
            ctx.limiter.leave_line("create", line[0])
            ctx.limiter.acquire("create")

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


def accepted(ctx, admin, n: int) -> list[str]:
    ids = [admin.one_task(env=FAST, command="worker") for _ in range(n)]
    Harness(ctx).sync()  # accepts them (the chains it plans are not run)
    assert all(ctx.store.get(t).phase == Phase.ACCEPTED for t in ids)
    return ids


def stop(ctx, admin, task_id: str) -> list:
    """Arkindex stops the task; the sync plans the stop and the stop step runs."""
    admin.stop_task(task_id)
    result = loop.sync(ctx)
    [message] = [m for t, m in result.enqueue if t == task_id and m.step == StepName.STOP_TASK]
    return steps.run_step(ctx, task_id, StepName.STOP_TASK, **message.kwargs)


def test_a_create_far_from_its_turn_waits_in_celery_then_creates_once(stack, ctx):
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    interval = ctx.limiter.interval("create")
    stale = ctx.settings.stale_after(Phase.CREATING)
    fill_line(ctx, stale + 2.0)  # the turn comes after the record would look stalled
    calls = dict(admin.stats()["calls"])

    follow = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)

    record = ctx.store.get(task_id)
    assert record.phase == Phase.CREATING and record.attempt == 1
    turn_in = record.create_turn_at - ctx.now()
    assert stale < turn_in < stale + 2.0 + 2 * interval
    [again] = follow
    assert again.step == StepName.CREATE_INSTANCE
    # It looks again after half the wait: the line may move faster than planned.
    wait = turn_in - create_line.create_lead(ctx)
    assert again.countdown == pytest.approx(wait / 2, abs=0.5)
    # Nothing reached Vast.ai: no create, not even the label lookup.
    assert admin.stats()["calls"] == calls
    assert "waiting for a create slot" in "\n".join(ctx.logbook.lines(task_id))
    # The sync does not take the waiting chain for a stalled one, even past `stale`.
    later = record.heartbeat_at + stale + 1.0
    assert later < record.create_turn_at
    assert not reconcile.is_stalled(record, later, ctx.settings)
    # Stalled only once its next look is a stale period late (its message lost).
    assert record.create_look_at == pytest.approx(record.heartbeat_at + again.countdown)
    assert not reconcile.is_stalled(record, record.create_look_at + stale - 0.5, ctx.settings)
    assert reconcile.is_stalled(record, record.create_look_at + stale + 0.5, ctx.settings)

    ahead = creates_ahead(ctx)
    harness = Harness(ctx)
    harness.push(task_id, follow)
    harness.run(until=lambda: harness.done(task_id), timeout=60.0)
    ahead.join(timeout=5.0)
    assert ctx.store.get(task_id).final_state == "completed"
    assert len(admin.rows_for(task_id)) == 1
    # The create left at its turn, not before it.
    assert time.time() >= record.create_turn_at - 0.2
    assert create_line.line_claimant(task_id, 1) not in ctx.limiter.line("create")  # it left


def test_tasks_stopped_in_the_line_leave_no_hole_and_end_at_once(stack, ctx):
    """Ten tasks wait in the line and are stopped before their turn: the task behind them
    creates without waiting their turns, and the stopped ones end promptly even when the
    message of their stop's chain is lost (their old turns play no part)."""
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0  # turns far from the harness's pace
    ids = accepted(ctx, admin, 11)
    ahead, newcomer = ids[:10], ids[10]
    fill_line(ctx, 30.0)
    for task_id in ahead:
        [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
        assert again.step == StepName.CREATE_INSTANCE  # in the line
        assert ctx.store.get(task_id).create_turn_at > ctx.now() + 29.0
    stopped_at = time.monotonic()
    for task_id in ahead:
        assert [n.step for n in stop(ctx, admin, task_id)] == [StepName.PUBLISH_LOGS]  # lost
    # The next sync drops the stopped ones from the line (each sync of `stop` dropped the
    # tasks stopped before it, and fill_line's claimants, which have no record).
    assert len(ctx.limiter.line("create")) == 1
    loop.sync(ctx)
    assert ctx.limiter.line("create") == {}

    follow = steps.run_step(ctx, newcomer, StepName.CREATE_INSTANCE)
    assert StepName.CREATE_INSTANCE not in [n.step for n in follow]
    assert len(admin.rows_for(newcomer)) == 1  # created at once

    harness = Harness(ctx)
    harness.push(newcomer, follow)
    harness.run(until=lambda: all(harness.done(t) for t in ids), sync_every=0.3, timeout=60.0)
    # Resumed once `stale` passed, not at their turns (30 s and more after the stop).
    assert time.monotonic() - stopped_at < 20.0
    for task_id in ahead:
        assert admin.task(task_id)["state"] == "stopped"
        assert admin.rows_for(task_id) == []


def test_a_worker_whose_clock_lags_creates_when_the_turn_has_come(stack, ctx, redis_url):
    """The turn is decided on Redis's clock: a worker 5 minutes behind does not hand the
    create back to Celery for 5 more minutes."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    fill_line(ctx, 4 * ctx.limiter.interval("create"))
    [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert again.step == StepName.CREATE_INSTANCE
    lagging = make_context(stack, redis_url, prefix=ctx.keys.prefix)
    lagging.config = ctx.config  # the same agent
    lagging.now = lambda: time.time() - 300.0
    try:
        ctx.limiter.leave_line("create", *[c for c in ctx.limiter.line("create") if "ahead" in c])
        follow = steps.run_step(lagging, task_id, StepName.CREATE_INSTANCE)
        assert [n.step for n in follow] == [StepName.WATCH]
    finally:
        lagging.redis.close()
    harness = Harness(ctx)
    harness.push(task_id, follow)
    harness.run(until=lambda: harness.done(task_id), timeout=60.0)
    assert len(admin.rows_for(task_id)) == 1


def test_a_step_run_again_after_its_turn_came_skips_the_line(stack, ctx, monkeypatch):
    """Its turn came, then the step failed before the create was sent (an Arkindex 503):
    Celery's retry does not wait behind the burst that joined the line meanwhile."""
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0
    [task_id] = accepted(ctx, admin, 1)
    definition = ctx.arkindex.task_definition

    def unavailable_once(tid):
        monkeypatch.setattr(ctx.arkindex, "task_definition", definition)
        fill_line(ctx, 60.0)  # a burst joins the line meanwhile
        raise ArkindexUnavailable("503 on every try")

    monkeypatch.setattr(ctx.arkindex, "task_definition", unavailable_once)
    with pytest.raises(ArkindexUnavailable):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert create_line.line_claimant(task_id, 1) not in ctx.limiter.line("create")
    follow = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)  # the retry
    assert StepName.CREATE_INSTANCE not in [n.step for n in follow]
    assert len(admin.rows_for(task_id)) == 1
    finish(ctx, task_id, follow)


def test_an_instance_created_before_a_failure_is_adopted_without_waiting(stack, ctx, monkeypatch):
    """Vast.ai created the instance, then the step failed (a Redis blip right after the
    answer, like a worker killed then): the step run again adopts it at once by its label,
    not after a wait in the line while the instance runs unwatched."""
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0
    [task_id] = accepted(ctx, admin, 1)
    remember = ctx.store.remember_instance_key

    def blip_once(*args, **kwargs):
        monkeypatch.setattr(ctx.store, "remember_instance_key", remember)
        fill_line(ctx, 60.0)
        raise redis.ConnectionError("connection reset")

    monkeypatch.setattr(ctx.store, "remember_instance_key", blip_once)
    with pytest.raises(redis.ConnectionError):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert len(admin.rows_for(task_id)) == 1
    # Run again at once (Celery's retry): Vast.ai's reads still lag the create, the label
    # lookup misses the instance, and the step must not create a second one; it looks again.
    harness = Harness(ctx)
    harness.push(task_id, [Next(StepName.CREATE_INSTANCE)])
    harness.run(until=lambda: harness.done(task_id), timeout=60.0)
    assert ctx.store.get(task_id).final_state == "completed"
    assert len(admin.rows_for(task_id)) == 1, admin.rows_for(task_id)
    assert "adopted existing" in "\n".join(ctx.logbook.lines(task_id))
    # Not after a wait in the line behind the burst: the turn had come for this attempt.
    assert "waiting for a create slot" not in "\n".join(ctx.logbook.lines(task_id))


def test_claimants_keep_their_place_until_their_create_takes_a_slot(ctx):
    """Ten claimants look at once (resumed together by a sync) while the bucket is idle:
    those whose turn is within the lead go, the others wait in Celery; one that went keeps
    its place until its create has a slot, so the next ones do not all see themselves first."""
    interval = ctx.limiter.interval("create")
    records = [
        TaskRecord.new(f"claimant{i}", ctx.now(), phase=Phase.CREATING, attempt=1)
        for i in range(10)
    ]
    for record in records:  # they join in this order
        ctx.limiter.place_in_line(
            "create", create_line.line_claimant(record.task_id, 1), grace=GRACE
        )
    went = [r.task_id for r in records if create_line.wait_for_turn(ctx, r, print) is None]
    assert went == [f"claimant{i}" for i in range(int(create_line.create_lead(ctx) / interval) + 1)]
    late = ctx.limiter.place_in_line("create", "late:1", grace=create_line.line_grace(ctx))
    assert late[0] == 10


def test_the_sync_keeps_a_claimant_that_came_back_while_it_read(stack, ctx, monkeypatch):
    """The sync reads the line; the task's attempt is given back (no offer) and claimed again
    at once, before the sync reads the records: the sync must not drop its new place."""
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0
    [task_id] = accepted(ctx, admin, 1)
    fill_line(ctx, 10.0)
    [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert again.step == StepName.CREATE_INSTANCE
    claimant = create_line.line_claimant(task_id, 1)
    all_records = ctx.store.all_records

    def racing(*args, **kwargs):
        monkeypatch.setattr(ctx.store, "all_records", all_records)
        ctx.limiter.leave_line("create", claimant)  # its turn came; no offer: given back
        assert ctx.store.cas(
            task_id,
            expect_phase=Phase.CREATING,
            expect_attempt=1,
            phase=Phase.WAITING_OFFER,
            attempt=0,
        )
        records = all_records(*args, **kwargs)
        fill_line(ctx, 10.0)  # an offer again, and the attempt is claimed anew
        [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
        assert again.step == StepName.CREATE_INSTANCE
        return records

    monkeypatch.setattr(ctx.store, "all_records", racing)
    loop.sync(ctx)
    assert claimant in ctx.limiter.line("create"), "the sync dropped a live claimant"
    stop(ctx, admin, task_id)
    harness = Harness(ctx)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60.0)


def test_status_says_in_the_line_only_while_the_task_is_in_it(stack, ctx):
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0
    [task_id] = accepted(ctx, admin, 1)
    fill_line(ctx, 3.0)
    steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    record = ctx.store.get(task_id)
    assert "in the line of creates" in overview.activity(record, ctx.now())
    ctx.limiter.leave_line("create", *[c for c in ctx.limiter.line("create") if "ahead" in c])
    looked_at = ctx.now()
    assert create_line.wait_for_turn(ctx, record, print) is None  # its turn came
    record = ctx.store.get(task_id)
    assert overview.activity(record, ctx.now()) == "renting an instance"
    # The step goes on to create: that is progress (the sync must not resume it meanwhile).
    assert record.heartbeat_at >= looked_at
    assert not reconcile.is_stalled(record, looked_at + 1.0, ctx.settings)
    stop(ctx, admin, task_id)
    harness = Harness(ctx)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60.0)


def finish(ctx, task_id: str, follow: list) -> None:
    harness = Harness(ctx)
    harness.push(task_id, follow)
    harness.run(until=lambda: harness.done(task_id), timeout=60.0)
    assert ctx.store.get(task_id).final_state == "completed"


def test_a_burst_whose_creates_prepare_within_the_lead_leaves_no_create_slot_idle(ctx):
    """Ten create steps of a burst, each a thread standing in for Celery and a worker: it
    looks at its turn, comes back after the countdown, prepares its create for 1.6 intervals
    (label lookup, definition, offer search: under the lead), then takes its slot as
    vast.create_instance does (acquire, leaving the line once the slot is reserved)."""
    interval = 0.5
    ctx.limiter.intervals["create"] = interval
    records = [
        TaskRecord.new(f"burst{i}", ctx.now(), phase=Phase.CREATING, attempt=1) for i in range(10)
    ]
    for record in records:  # they join in this order
        ctx.limiter.place_in_line(
            "create",
            create_line.line_claimant(record.task_id, 1),
            grace=create_line.line_grace(ctx),
        )
    sent: list[float] = []

    def create_step(record):
        claimant = create_line.line_claimant(record.task_id, 1)
        while (later := create_line.wait_for_turn(ctx, record, print)) is not None:
            time.sleep(later.countdown)
        time.sleep(1.6 * interval)
        ctx.limiter.acquire(
            "create", on_reserved=lambda: ctx.limiter.leave_line("create", claimant)
        )
        sent.append(time.monotonic())

    threads = [threading.Thread(target=create_step, args=(r,), daemon=True) for r in records]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60.0)
    sent.sort()
    gaps = [round(b - a, 2) for a, b in zip(sent, sent[1:], strict=False)]
    assert len(sent) == 10
    assert max(gaps) < 1.3 * interval, f"gaps between creates (interval {interval} s): {gaps}"


def test_a_failure_right_after_the_turn_came_does_not_send_the_attempt_to_the_back(
    stack, ctx, monkeypatch
):
    """A Redis blip (or a killed worker) between the record saying the turn came and the line
    knowing it: the step run again creates at once, it does not join the line anew."""
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0
    [task_id] = accepted(ctx, admin, 1)
    turn_came = ctx.limiter.turn_came

    def blip_once(*args):
        monkeypatch.setattr(ctx.limiter, "turn_came", turn_came)
        fill_line(ctx, 60.0)  # a burst joins the line meanwhile
        raise redis.ConnectionError("connection reset")

    monkeypatch.setattr(ctx.limiter, "turn_came", blip_once)
    with pytest.raises(redis.ConnectionError):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    follow = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)  # Celery's retry
    assert StepName.CREATE_INSTANCE not in [n.step for n in follow]
    assert len(admin.rows_for(task_id)) == 1
    assert create_line.line_claimant(task_id, 1) not in ctx.limiter.line("create")
    finish(ctx, task_id, follow)


def created_at_once_when_run_again(ctx, admin, task_id: str) -> None:
    """The create step failed on an answer that proves nothing was rented: the record does
    not say a create was sent, and the step run again (Celery's retry) creates at once,
    without waiting for Vast.ai's reads (visibility_grace)."""
    assert admin.rows_for(task_id) == []
    record = ctx.store.get(task_id)
    assert record.create_sent_at is None
    assert overview.activity(record, ctx.now()) == "renting an instance"
    follow = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert StepName.CREATE_INSTANCE not in [n.step for n in follow]
    assert len(admin.rows_for(task_id)) == 1
    finish(ctx, task_id, follow)


def test_a_create_refused_with_429_is_not_taken_for_one_that_may_exist(stack, ctx):
    """Every try of the create got a 429: Vast.ai said nothing was created. The step run
    again creates without waiting for Vast.ai's reads (visibility_grace), and the status
    does not say a create was sent."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    tries = ctx.vast.max_attempts
    admin.faults({"fault": "rate_limit", "endpoint": "create", "times": tries, "retry_after": 0})
    with pytest.raises(steps.VastRateLimited):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    created_at_once_when_run_again(ctx, admin, task_id)


def test_a_create_answer_that_proves_nothing_keeps_the_wait_for_reads(stack, ctx, monkeypatch):
    """Vast.ai rented the instance, but its 200 answer has no contract id: that is no proof
    nothing was created, so the step run again (within visibility_grace, while Vast.ai's
    reads still miss the instance) must not rent a second one."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    # Unseen for 15 real s, within visibility_grace (30 s here: loading_deadline).
    admin.faults({"fault": "read_lag", "seconds": 15 * TIME_SCALE})
    assert ctx.settings.visibility_grace > 20.0
    create = ctx.vast.create_instance

    def rented_without_contract_id(*args, **kwargs):
        monkeypatch.setattr(ctx.vast, "create_instance", create)
        create(*args, **kwargs)  # the simulator rents it...
        raise VastError("{'success': True}", status=200, context="PUT /api/v0/asks/1/")

    monkeypatch.setattr(ctx.vast, "create_instance", rented_without_contract_id)
    try:
        with pytest.raises(VastError):
            steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
        assert ctx.store.get(task_id).create_sent_at is not None
        [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)  # resumed
        assert again.step == StepName.CREATE_INSTANCE  # it looks again later
        assert len(admin.rows_for(task_id)) == 1
    finally:
        admin.clear_faults()
    finish(ctx, task_id, [again])  # adopted once the reads show it
    assert len(admin.rows_for(task_id)) == 1


def test_the_sync_wakes_the_claimants_left_asleep_past_their_turn(stack, ctx):
    """Twenty claimants ahead leave the line at once (their tasks stopped): the three tasks
    behind them sleep in Celery on countdowns of about ten create intervals, though their
    turn has come. The sync wakes them (once), and they create without waiting that long."""
    admin = Admin(stack)
    ctx.limiter.intervals["create"] = 1.0
    ids = accepted(ctx, admin, 3)
    fill_line(ctx, 20.0)  # no records: the next sync drops them, as it does stopped tasks
    for task_id in ids:
        [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
        assert again.step == StepName.CREATE_INSTANCE and again.countdown > 8.0
    result = loop.sync(ctx)
    woken = [(t, m.step) for t, m in result.enqueue if m.step == StepName.CREATE_INSTANCE]
    assert woken == [(t, StepName.CREATE_INSTANCE) for t in ids]
    assert list(ctx.limiter.line("create")) == [create_line.line_claimant(t, 1) for t in ids]
    again = loop.sync(ctx)  # once per promised look
    assert not [m for _, m in again.enqueue if m.step == StepName.CREATE_INSTANCE]
    started = time.monotonic()
    harness = Harness(ctx)
    for task_id, message in result.enqueue:
        if message.step == StepName.CREATE_INSTANCE:
            harness.push(task_id, [message])
    harness.run(until=lambda: all(ctx.store.get(t).phase != Phase.CREATING for t in ids))
    assert time.monotonic() - started < 8.0  # three creates a second apart, not ten seconds
    harness.run(until=lambda: all(harness.done(t) for t in ids), timeout=60.0)
    assert all(len(admin.rows_for(t)) == 1 for t in ids)


def test_a_late_look_of_the_line_never_claims_another_attempt(stack, ctx):
    """The old countdown message of a woken step (or any look of the line) runs after its
    attempt failed and the task waits for its retry: it does nothing, where a plain create
    step would claim the next attempt before retry_attempt kept the failed instance, and
    two instances of the task would live at once."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    fill_line(ctx, 5.0)
    [late] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert late.step == StepName.CREATE_INSTANCE and late.kwargs == {"attempt": 1}
    # The attempt moves on (its turn came, it was created and its start failed) and the
    # task waits for its retry.
    assert ctx.store.cas(task_id, expect_phase=Phase.CREATING, expect_attempt=1, phase="retrying")
    assert steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE, **late.kwargs) == []
    record = ctx.store.get(task_id)
    assert (record.phase, record.attempt) == ("retrying", 1)
    stop(ctx, admin, task_id)
    harness = Harness(ctx)
    harness.run(until=lambda: harness.done(task_id), sync_every=0.3, timeout=60.0)


def test_only_claimants_asleep_well_past_their_turn_are_woken():
    now = 1000.0
    records = {
        f"t{i}": TaskRecord.new(
            f"t{i}", 0.0, phase=Phase.CREATING, attempt=1, create_look_at=now + look
        )
        for i, look in enumerate([5.0, 1.0, 9.0, 9.0, 9.0])
    }
    records["gone"] = TaskRecord.new("gone", 0.0, phase=Phase.FINISHING, attempt=1)
    places = {c: "0" for c in ["gone:1", "t0:1", "t1:1", "t2:1", "t3:1", "t4:1"]}
    # Turns: t0 now, t1 in 1 s, t2 in 2 s... (interval 1 s, lead 2 s); t4 is past the count.
    asleep = create_line.asleep_at_the_head(places, records, now, interval=1.0, lead=2.0, count=4)
    assert asleep == ["t0", "t2", "t3"]


def test_a_create_whose_retry_found_no_slot_after_a_429_is_not_taken_for_one_that_may_exist(
    stack, ctx, monkeypatch
):
    """The create's first try got a 429 (nothing was created) and its next try found no slot
    before the limiter's timeout (Vast.ai's penalty holds the bucket): nothing was sent that
    may have rented, so the step run again creates without waiting for Vast.ai's reads."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    monkeypatch.setitem(ctx.limiter.penalties, "create", 3.0)  # real s, longer than the timeout
    monkeypatch.setattr(ctx.vast, "limiter_timeout", 1.0)
    admin.faults({"fault": "rate_limit", "endpoint": "create", "times": 1, "retry_after": 0})
    with pytest.raises(steps.RateLimitTimeout):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    monkeypatch.setattr(ctx.vast, "limiter_timeout", 60.0)
    created_at_once_when_run_again(ctx, admin, task_id)


def test_a_create_refused_for_the_api_key_is_not_taken_for_one_that_may_exist(stack, ctx):
    """Vast.ai refused the create's API key (401): nothing was created, and the step run
    again (the key fixed) creates without waiting for Vast.ai's reads."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    admin.faults({"fault": "http_5xx", "status": 401, "endpoint": "create", "times": 1})
    with pytest.raises(steps.VastAuthError):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    created_at_once_when_run_again(ctx, admin, task_id)


def test_a_step_whose_create_lock_lapsed_leaves_the_stamp_of_the_worker_that_took_it(
    stack, ctx, monkeypatch
):
    """The create's first try got a 429, and while its next try waits for a slot the step's
    create lock lapses (its worker stuck past create_lock_timeout): another worker takes the
    lock and sends a create for the attempt. The first step's RateLimitTimeout must not
    clear that worker's create_sent_at: the step run again would not wait for Vast.ai's
    reads and would rent a second instance for the attempt."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    monkeypatch.setitem(ctx.limiter.penalties, "create", 3.0)  # real s, longer than the timeout
    monkeypatch.setattr(ctx.vast, "limiter_timeout", 1.0)
    admin.faults({"fault": "rate_limit", "endpoint": "create", "times": 1, "retry_after": 0})
    penalize = ctx.limiter.penalize
    other = ctx.store.create_lock(task_id, timeout=ctx.settings.create_lock_timeout)
    stamps = []

    def penalized_then_the_lock_lapses(endpoint):
        seconds = penalize(endpoint)
        ctx.redis.delete(other.name)  # lapsed
        assert other.acquire(blocking=False)  # the other worker's step
        stamps.append(ctx.now())  # its before_send, right before its create is sent
        ctx.store.touch(task_id, expect_attempt=1, create_sent_at=stamps[0])
        return seconds

    monkeypatch.setattr(ctx.limiter, "penalize", penalized_then_the_lock_lapses)
    with pytest.raises(steps.RateLimitTimeout):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert ctx.store.get(task_id).create_sent_at == stamps[0]
    other.release()
    monkeypatch.setattr(ctx.vast, "limiter_timeout", 60.0)
    [again] = steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)  # Celery's retry
    assert again.step == StepName.CREATE_INSTANCE  # waits for Vast.ai's reads
    assert again.countdown == ctx.settings.create_unknown_delay
    assert admin.rows_for(task_id) == []


def test_a_refused_create_answered_after_the_lock_lapsed_leaves_the_other_workers_stamp(
    stack, ctx, monkeypatch
):
    """The create's answer, a 401 (nothing rented), comes after the step's create lock
    lapsed (a DNS hang, a slow answer: more than create_lock_timeout after its renewal), and
    another worker took the lock and sent a create meanwhile: the refusal must not clear that
    worker's create_sent_at, or its step run again would rent a second instance."""
    admin = Admin(stack)
    [task_id] = accepted(ctx, admin, 1)
    admin.faults({"fault": "http_5xx", "status": 401, "endpoint": "create", "times": 1})
    other = ctx.store.create_lock(task_id, timeout=ctx.settings.create_lock_timeout)
    stamps = []
    told = ctx.vast.on_call

    def answered_after_the_lock_lapsed(api, endpoint, status):
        if endpoint == "create" and not stamps:
            ctx.redis.delete(other.name)  # lapsed while the answer was awaited
            assert other.acquire(blocking=False)  # the other worker's step
            stamps.append(ctx.now())  # its before_send, right before its create is sent
            ctx.store.touch(task_id, expect_attempt=1, create_sent_at=stamps[0])
        told(api, endpoint, status)

    monkeypatch.setattr(ctx.vast, "on_call", answered_after_the_lock_lapsed)
    with pytest.raises(steps.VastAuthError):
        steps.run_step(ctx, task_id, StepName.CREATE_INSTANCE)
    assert ctx.store.get(task_id).create_sent_at == stamps[0]
    other.release()
