"""The line of creates: a burst's create steps wait for their turn in Celery, not in a worker.

Vast.ai allows one create every 4.5 s per account. Were every create step to wait for its
slot in the rate limiter, a burst of N tasks would put every worker process to sleep there
(one slot every 4.6 s each) while the watches, log reads and reports of the running tasks
waited behind them in the queue. Instead, a new attempt takes a place in a line (a Redis
sorted set by arrival: ratelimit.place_in_line); its turn is the create bucket's next free
slot plus one interval per claimant ahead, computed afresh at every look; while that turn is
more than a lead away, the step goes back to Celery with a countdown and promises when it
will look again. The sync drops claimants whose attempt no longer creates and wakes those
at the head that sleep past a turn that came early.
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ponos_tasks.agent import AgentContext
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Next, StepName, TaskRecord

# A create step whose turn is further away than this goes back to Celery until then; the
# longest countdown stays well under the broker's visibility timeout (celery_settings.py).
MAX_CREATE_DEFER = 600.0


def line_grace(ctx: AgentContext) -> float:
    """How late a claimant of the line of creates may be and still count for those behind
    it: an attempt whose turn came and has no slot yet (its label lookup, definition and
    search take seconds), or one that has not looked again when it said it would (Celery
    runs a countdown a little late). Later, its worker is presumed dead: the claimants behind
    it would otherwise wait for the sync to resume it, a stale period and more."""
    return 3 * create_lead(ctx)


def create_lead(ctx: AgentContext) -> float:
    """How long before its turn a create step comes back: two create intervals, time for its
    label lookup, definition and offer search, so that its create is ready when the slot
    comes (a launch gap otherwise), while at most two or so workers wait in the limiter."""
    return 2 * ctx.limiter.interval("create")


def line_claimant(task_id: str, attempt: int) -> str:
    """An attempt's name in the line of creates (task ids are UUIDs: no colon in them)."""
    return f"{task_id}:{attempt}"


def still_creating(record: TaskRecord | None, attempt: int | str) -> bool:
    """Whether the claimant of `attempt` (an int, or the text of a claimant's name) still
    waits to create: its task's record is `creating` at that attempt."""
    return (
        record is not None
        and record.phase == Phase.CREATING
        and str(record.attempt) == str(attempt)
    )


def left_the_line(places: dict[str, str], records: dict[str, TaskRecord]) -> dict[str, str]:
    """Claimants of the line of creates whose attempt no longer waits to create: stopped,
    refused, deleted, adopted, or moved on. They would hold everyone behind them back one
    create interval each. (`places` must be read before `records`: an attempt joins the line
    only once its record is `creating`, so a claimant read first is never judged on an older
    record; one that left and came back meanwhile has a new place, which is kept.)"""
    gone = {}
    for claimant, place in places.items():
        task_id, _, attempt = claimant.rpartition(":")
        if not still_creating(records.get(task_id), attempt):
            gone[claimant] = place
    return gone


def asleep_at_the_head(
    places: dict[str, str],
    records: dict[str, TaskRecord],
    now: float,
    *,
    interval: float,
    lead: float,
    count: int,
) -> list[str]:
    """The first `count` claimants of the line of creates whose step sleeps in Celery past
    about their turn: the line moved faster than they were told (tasks ahead stopped), and
    each would otherwise wake on its old countdown (up to MAX_CREATE_DEFER) while create
    slots go unused. Their turn is taken as rank × interval (the bucket's next slot left
    out, and the claimants the line no longer counts: a step woken early looks again and
    goes back to sleep, its old message still due too, a second look for that attempt
    only)."""
    asleep, rank = [], 0
    for claimant in places:
        if rank == count:
            break
        task_id, _, attempt = claimant.rpartition(":")
        record = records.get(task_id)
        if not still_creating(record, attempt):
            continue  # left the line (left_the_line)
        if (
            record.create_look_at is not None
            and record.create_look_at - now > rank * interval + lead
        ):
            asleep.append(task_id)
        rank += 1
    return asleep


def wake_the_head(
    ctx: AgentContext, places: dict[str, str], records: dict[str, TaskRecord], now: float
) -> list[tuple[str, Next]]:
    """A look now for the claimants at the head of the line that sleep past their turn,
    enough of them to cover a sync interval of creates; once per promised look."""
    interval = ctx.limiter.interval("create")
    woken = []
    for task_id in asleep_at_the_head(
        places,
        records,
        now,
        interval=interval,
        lead=create_lead(ctx),
        count=math.ceil(ctx.settings.sync_interval / interval) + 2,
    ):
        look_at = records[task_id].create_look_at
        if ctx.store.once(f"line-wake:{task_id}:{look_at}", ctx.settings.heartbeat_stale):
            attempt = records[task_id].attempt
            woken.append((task_id, Next(StepName.CREATE_INSTANCE, kwargs={"attempt": attempt})))
    return woken


def wait_for_turn(
    ctx: AgentContext, record: TaskRecord, note: Callable[[str], None]
) -> Next | None:
    """The step again closer to the attempt's turn, when that is still far: a worker never
    sleeps minutes in the create limiter while watches and log reads wait behind it (the
    N = 1000 burst of BENCHMARKS.md: every worker asleep there, load average 0.36). Nothing
    was sent for this attempt yet, so handing the step back loses nothing. None: its turn
    has come (the record says so from then on).

    The turn is computed afresh at each look (ratelimit.place_in_line): claimants that left
    the line ahead move this one forward. It looks again after half the wait (at least one
    lead, at most MAX_CREATE_DEFER), so a line that moved faster than planned costs little."""
    claimant = line_claimant(record.task_id, record.attempt)
    ahead, turn_in = ctx.limiter.place_in_line("create", claimant, grace=line_grace(ctx))
    lead = create_lead(ctx)
    now = ctx.now()
    if turn_in <= lead:
        # The record first: a step run again then skips the line, even if what follows
        # fails. The claimant counts for those behind it until its create has reserved a
        # slot (on_slot in _create_in_turn), the step ends (_create_locked), or line_grace.
        ctx.store.touch(
            record.task_id,
            expect_attempt=record.attempt,
            create_turn_at=None,
            create_look_at=None,
            create_turn_came=True,
            heartbeat_at=now,
        )
        ctx.limiter.turn_came("create", claimant)
        return None
    wait = turn_in - lead
    countdown = min(wait, max(lead, wait / 2), MAX_CREATE_DEFER)
    ctx.limiter.promise_look("create", claimant, countdown)
    ctx.store.touch(
        record.task_id,
        expect_attempt=record.attempt,
        create_turn_at=now + turn_in,
        create_look_at=now + countdown,
        heartbeat_at=now,
    )
    if record.create_turn_at is None:
        note(
            "waiting for a create slot: Vast.ai allows one create every "
            f"{ctx.limiter.interval('create'):g} s; {ahead} task(s) ahead, its turn in "
            f"{turn_in:.0f} s",
        )
    return Next(StepName.CREATE_INSTANCE, countdown=countdown, kwargs={"attempt": record.attempt})
