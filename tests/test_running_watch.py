"""A running instance is looked at every running_watch_interval (three syncs), not every half
sync: its end wakes its watcher (the sync's and the ended check's wake), so the slower look
only bounds how late a lost wake is seen, and the agent's steps per running task fall
sixfold. Against a private simulator stack and a real Redis (test_flat_view's fixtures)."""

from dataclasses import replace

import pytest

from ponos_tasks import loop, steps
from ponos_tasks.config import AgentConfig
from ponos_tasks.models import Instance, Next, StepName
from ponos_tasks.settings import Settings
from ponos_tasks.state import ended_wake
from tests.agent_harness import Harness
from tests.settings_helper import MINIMAL_CONFIG

# The fixtures of test_flat_view (its own stack, with a market); ruff: F401/F811 ignored.
from tests.test_ended_check import FLAT, ended_instance, midway
from tests.test_flat_view import (
    admin,
    bring_to_running,
    contexts,
    stack,
    watch_once,
)
from tests.test_steps import scripted


@pytest.mark.parametrize(
    ("sync", "watch", "running", "running_stale"),
    [(10.0, 5.0, 30.0, 70.0), (1.0, 0.5, 3.0, 7.0), (60.0, 30.0, 90.0, 240.0)],
)
def test_a_running_look_is_three_syncs_at_most_90_s(sync, watch, running, running_stale):
    settings = Settings.from_config(
        AgentConfig.model_validate({**MINIMAL_CONFIG, "sync_interval": sync})
    )
    assert settings.watch_interval == watch
    assert settings.running_watch_interval == running
    assert settings.running_stale == running_stale
    assert settings.stale_after("running") == running_stale
    assert settings.stale_after("loading") == settings.heartbeat_stale < running_stale
    # The spending cap keeps a running look in hand, not half a sync.
    assert settings.spend_end_margin == 2 * sync + running + 10.0


def look_in(follow) -> float:
    (look,) = [n.countdown for n in follow if n.step == StepName.WATCH]
    return look


def test_a_running_instance_is_looked_at_less_often_but_its_log_keeps_its_cadence(contexts, admin):
    ctx = contexts(**FLAT, logs_interval=3600)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = bring_to_running(ctx, task_id)
    settings = ctx.settings
    assert settings.running_watch_interval > settings.watch_interval
    ctx.store.touch(task_id, logs_published_at=ctx.now())
    assert look_in(watch_once(ctx, task_id)) == settings.running_watch_interval
    # The live log is due sooner than a running look: the watch comes back for it.
    due_in = settings.watch_interval + 0.4 * (
        settings.running_watch_interval - settings.watch_interval
    )
    ctx.store.touch(task_id, logs_published_at=ctx.now() - settings.logs_interval + due_in)
    assert look_in(watch_once(ctx, task_id)) == pytest.approx(due_in, abs=0.3)
    # Due now: the upload sent by this watch counts from now, the next look with it.
    ctx.store.touch(task_id, logs_published_at=ctx.now() - settings.logs_interval - 1.0)
    follow = watch_once(ctx, task_id)
    assert any(n.step == StepName.PUBLISH_LOGS for n in follow)
    assert look_in(follow) == settings.running_watch_interval  # logs_interval is longer
    # ... but never sooner than a look at a starting instance.
    ctx.store.touch(task_id, logs_published_at=ctx.now() - settings.logs_interval + 0.01)
    assert look_in(watch_once(ctx, task_id)) == settings.watch_interval
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), timeout=60)


def test_a_loading_instance_keeps_the_short_look(contexts, admin):
    ctx = contexts(**FLAT)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600", SIM_PULL_SECONDS="3600"))
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: ctx.store.get(task_id).phase == "loading", timeout=30)
    assert look_in(watch_once(ctx, task_id)) == ctx.settings.watch_interval
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), timeout=60)


def test_an_instance_running_again_after_an_end_is_woken_at_its_next_end(contexts, admin, stack):
    """Vast.ai restarted the container after the end whose wake was sent: the watch that sees
    it running re-arms the wake, so the next end is not left to a running look."""
    ctx = contexts(**FLAT)
    task_id, record, harness = ended_instance(ctx, admin, stack)
    midway(ctx)
    assert loop.check_ended(ctx) == [(task_id, Next(StepName.WATCH))]
    assert ctx.store.claimed(ended_wake(task_id, record.attempt))
    # Running again before the woken watch looked: its entry says so.
    entry = ctx.store.view_entry(record.instance_id)
    running = {**entry.raw, "actual_status": "running", "intended_status": "running"}
    ctx.store.put_view_entries([Instance.from_dict(running)], ctx.now())
    meta = ctx.store.load_view_meta()  # and the view is fresh: the watch reads the entry
    ctx.store.save_view_meta(replace(meta, refreshed_at=ctx.now()))
    harness.queue.clear()
    follow = watch_once(ctx, task_id)
    assert look_in(follow) == ctx.settings.running_watch_interval
    assert not ctx.store.claimed(ended_wake(task_id, record.attempt))
    # Its next end (the instance has really ended) wakes the watch again.
    midway(ctx)
    assert loop.check_ended(ctx) == [(task_id, Next(StepName.WATCH))]
    harness.push(task_id, watch_once(ctx, task_id))
    harness.run(until=lambda: harness.done(task_id), timeout=30)
    assert ctx.store.get(task_id).final_state == "completed"


def test_a_live_log_due_more_often_than_a_running_look_keeps_its_cadence(contexts, admin):
    """logs_interval shorter than a running look: the watch that sends an upload comes back
    logs_interval later (the upload counts from now), not a running look later."""
    ctx = contexts(**FLAT)
    settings = ctx.settings
    logs = (settings.watch_interval + settings.running_watch_interval) / 2
    ctx = contexts(**FLAT, logs_interval=logs)
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = bring_to_running(ctx, task_id)
    ctx.store.save_running_count(1)
    ctx.store.touch(task_id, logs_published_at=ctx.now() - logs - 1.0)
    follow = watch_once(ctx, task_id)
    assert any(n.step == StepName.PUBLISH_LOGS for n in follow)
    assert look_in(follow) == pytest.approx(logs, abs=0.05)
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), timeout=60)


@pytest.mark.parametrize("reads", ["flat", "full_list"])
def test_a_host_gone_offline_wakes_the_watch_of_a_running_instance(contexts, admin, stack, reads):
    """offline_grace counts from the look that first shows the host offline: the sync that
    lists it offline wakes the watch (not left to a running look), once, and the watch
    stamps offline_since."""
    ctx = contexts(vast_api={"instance_reads": reads})
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = bring_to_running(ctx, task_id)
    record = ctx.store.get(task_id)
    sim = stack.vast.state
    with sim.lock:
        sim.fleet.instances[record.instance_id].offline = True
    try:
        woken = False
        for _ in range(40):  # flat: the full listing's pass reaches it within a few syncs
            # A fresh heartbeat: no stalled-chain resume stands in for the wake.
            ctx.store.heartbeat(task_id, expect_attempt=record.attempt)
            if (task_id, Next(StepName.WATCH)) in loop.sync(ctx).enqueue:
                woken = True
                break
        assert woken, "no sync woke the watch of an instance gone offline"
        assert (task_id, Next(StepName.WATCH)) not in loop.sync(ctx).enqueue  # once
        harness.queue.clear()
        harness.push(task_id, steps.run_step(ctx, task_id, StepName.WATCH))
        assert ctx.store.get(task_id).offline_since is not None
    finally:
        with sim.lock:
            sim.fleet.instances[record.instance_id].offline = False
    harness.push(task_id, steps.run_step(ctx, task_id, StepName.STOP_TASK))
    harness.run(until=lambda: harness.done(task_id), timeout=60)
