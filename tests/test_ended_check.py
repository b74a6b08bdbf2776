"""The ended check (loop.check_ended, flat view): between two syncs, one filtered list call
(view.py's A) shows the instances that are not running, and the watcher of each ended one is
woken at once, so that an end waits about half a sync interval for a look, not a whole one.
It decides nothing, moves no cursor and removes no entry; it keeps out of a refresh's way.
Against a private simulator stack and a real Redis (test_flat_view's fixtures).
"""

import time
from dataclasses import replace

import pytest

from ponos_tasks import loop, steps, view
from ponos_tasks.models import Next, StepName
from ponos_tasks.vast import VastError

# The fixtures of test_flat_view (its own stack, with a market); ruff: F401/F811 ignored.
from tests.test_flat_view import (
    admin,
    bring_to_running,
    contexts,
    list_calls,
    stack,
    watch_once,
)
from tests.test_steps import scripted

FLAT = {"vast_api": {"instance_reads": "flat"}}


def midway(ctx) -> None:
    """Put the last refresh half a sync interval back: the check is due (the test does not
    sleep on a clock of its own)."""
    meta = ctx.store.load_view_meta()
    half = ctx.settings.sync_interval / 2
    ctx.store.save_view_meta(replace(meta, refreshed_at=ctx.now() - half))


def ended_instance(ctx, admin, stack, **extra):
    """A task brought to running whose instance has then exited (the view still says
    running: no refresh since). It runs 3 real s: a watcher refreshes the view every 1.5
    sync intervals (0.75 s), and a shorter run could end unseen by bring_to_running."""
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="300", **extra))
    harness = bring_to_running(ctx, task_id)
    record = ctx.store.get(task_id)
    if ctx.settings.instance_reads == "flat":
        assert ctx.store.view_entry(record.instance_id).actual_status == "running"
    deadline = time.monotonic() + 30
    while stack.vast.state.show(record.instance_id)[1]["instances"]["actual_status"] == "running":
        assert time.monotonic() < deadline, "the instance never ended"
        time.sleep(0.05)
    return task_id, record, harness


@pytest.mark.parametrize(
    ("since", "due"),
    [
        (0.0, False),
        (2.4, False),
        (2.5, True),
        (5.0, True),
        (7.5, True),
        (7.6, False),
        (12.5, False),
        (12.6, True),
        (600.0, True),
    ],
)
def test_the_check_runs_midway_between_refreshes_or_when_they_are_late(since, due):
    assert view.ended_check_due(since, 10.0) is due


def test_an_end_between_two_syncs_wakes_its_watcher_with_one_call(contexts, admin, stack):
    ctx = contexts(**FLAT)
    task_id, record, harness = ended_instance(ctx, admin, stack)
    meta = ctx.store.load_view_meta()
    midway(ctx)
    before = list_calls(admin)
    woken = loop.check_ended(ctx)
    assert list_calls(admin) - before == 1
    assert woken == [(task_id, Next(StepName.WATCH))]
    assert ctx.store.view_entry(record.instance_id).actual_status in ("exited", "stopped")
    # No refresh: the cursor and the pass evidence are the refreshes' alone.
    after = ctx.store.load_view_meta()
    assert (after.cursor, after.done_started_at) == (meta.cursor, meta.done_started_at)
    # Once per attempt: neither the next check nor the next sync wakes it again.
    midway(ctx)
    assert loop.check_ended(ctx) == []
    assert (task_id, Next(StepName.WATCH)) not in loop.sync(ctx).enqueue
    # The woken watch acts on the entry the check wrote: it asks for the log at the end.
    harness.queue.clear()
    harness.push(task_id, watch_once(ctx, task_id))
    assert ctx.store.log_read(task_id, record.attempt, "watch") is not None
    harness.run(until=lambda: harness.done(task_id), timeout=30)
    assert ctx.store.get(task_id).final_state == "completed"


def test_the_check_keeps_out_of_a_refresh_and_of_the_syncs_own_look(contexts, admin, stack):
    ctx = contexts(**FLAT)
    task_id, record, harness = ended_instance(ctx, admin, stack)
    before = list_calls(admin)
    # Right after a refresh: its A is that fresh.
    ctx.store.save_view_meta(replace(ctx.store.load_view_meta(), refreshed_at=ctx.now()))
    assert loop.check_ended(ctx) == []
    # A refresh in progress holds the snapshot lock: its A is this check.
    midway(ctx)
    lock = ctx.store.snapshot_lock(timeout=30)
    assert lock.acquire()
    try:
        assert loop.check_ended(ctx) == []
    finally:
        lock.release()
    assert list_calls(admin) == before
    # The watch stays to be woken by whoever looks next.
    assert (task_id, Next(StepName.WATCH)) in loop.sync(ctx).enqueue
    harness.run(until=lambda: harness.done(task_id), timeout=30)


def test_full_listings_make_no_check(contexts, admin, stack):
    ctx = contexts(vast_api={"instance_reads": "full_list"})
    task_id, _record, harness = ended_instance(ctx, admin, stack)
    midway(ctx)
    before = list_calls(admin)
    assert loop.check_ended(ctx) == []
    assert list_calls(admin) == before
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=30)


def test_a_failing_check_decides_nothing_and_says_so(contexts, admin, stack, caplog):
    ctx = contexts(**FLAT)
    task_id, record, harness = ended_instance(ctx, admin, stack)
    midway(ctx)
    admin.faults({"fault": "http_5xx", "endpoint": "list", "status": 503, "times": 40})
    with caplog.at_level("WARNING", logger="ponos_tasks.steps"):
        assert loop.check_ended(ctx) == []
    admin.clear_faults()
    assert "could not list instances not running" in caplog.text
    assert ctx.store.view_entry(record.instance_id).actual_status == "running"  # kept
    assert not ctx.store.claimed(f"ended:{task_id}:{record.attempt}")  # nobody woken
    midway(ctx)
    assert loop.check_ended(ctx) == [(task_id, Next(StepName.WATCH))]
    harness.run(until=lambda: harness.done(task_id), timeout=30)


def test_a_sync_wakes_an_ended_instance_before_it_reads_the_pass_pages(contexts, admin, stack):
    """The refresh's A comes first and its ended instances' watches leave at once: not after
    the pass's rate-limited pages (2 at 1000 instances, 2.2 s at Vast.ai's list interval)
    and the rest of the sync, which made the ends a sync saw wait longest."""
    ctx = contexts(**FLAT)
    task_id, record, harness = ended_instance(ctx, admin, stack)
    assert ctx.store.load_view_meta().done_started_at is not None  # pages every refresh now

    def pages() -> int:
        return admin.stats()["list_shapes"].get("id.gt", 0)

    sent: list[tuple[list, int]] = []
    before = pages()
    result = loop.sync(ctx, send_now=lambda items: sent.append((list(items), pages())))
    assert result.ran
    assert sent == [([(task_id, Next(StepName.WATCH))], before)]  # sent before any page
    assert pages() > before  # and the refresh did read its page after
    # Sent once: not again with the sync's own messages, nor by the next sync.
    assert (task_id, Next(StepName.WATCH)) not in result.enqueue
    assert (task_id, Next(StepName.WATCH)) not in loop.sync(ctx).enqueue
    harness.push(task_id, [Next(StepName.WATCH)])
    harness.run(until=lambda: harness.done(task_id), timeout=30)
    assert ctx.store.get(task_id).final_state == "completed"


def test_a_page_failing_after_the_early_wake_loses_no_wake(contexts, admin, stack):
    """The wake sent right after A stays sent when a page then fails (Vast.ai answers 503):
    the sync raises, as any unread listing makes it, and the woken watch acts on A's entry."""
    ctx = contexts(**FLAT)
    task_id, record, harness = ended_instance(ctx, admin, stack)
    sent = []

    def send_then_fail(items):
        sent.extend(items)
        admin.faults({"fault": "http_5xx", "endpoint": "list", "status": 503, "times": 40})

    try:
        with pytest.raises(VastError):
            loop.sync(ctx, send_now=send_then_fail)
    finally:
        admin.clear_faults()
    assert sent == [(task_id, Next(StepName.WATCH))]
    assert ctx.store.view_entry(record.instance_id).actual_status in ("exited", "stopped")
    harness.push(task_id, [Next(StepName.WATCH)])
    harness.run(until=lambda: harness.done(task_id), timeout=30)
    assert ctx.store.get(task_id).final_state == "completed"
