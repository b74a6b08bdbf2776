"""The flat instance view (ponos_tasks/view.py, `vast_api.instance_reads: flat`): a sync's
list calls do not grow with the fleet, "gone" comes only from a full listing that covered
the instance, a status change is seen at the next sync, a refused or failing filtered call
is never "nothing there". Against a private simulator stack (it fills the market) and a
real Redis; the simulator's filter semantics (SQL NULLs, stored status) alongside.
"""

import json
import time
from dataclasses import replace

import pytest
import requests

from ponos_tasks import loop, steps, view
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Instance, Next, StepName
from ponos_tasks.simulators.harness import ONE_GPU_MACHINE
from ponos_tasks.simulators.stack import LocalStack
from ponos_tasks.vast import VastError
from ponos_tasks.view import PassState, page_removals, to_check
from tests.agent_harness import Admin, Harness
from tests.fixtures_stack import running_stack

# The fixtures of test_steps, over this module's own stack; ruff: F401/F811 ignored here.
from tests.test_steps import admin, contexts, scripted

TIME_SCALE = 100.0
LONG = {"SIM_DURATION": "10000000", "SIM_PULL_SECONDS": "2", "SIM_LOG_LINES": "1"}
MACHINE = ONE_GPU_MACHINE


@pytest.fixture(scope="module")
def stack(redis_url):
    with running_stack(redis_url, TIME_SCALE, offers=[MACHINE] * 90) as stack:
        yield stack


def sim_create(stack, label: str, env: dict | None = None) -> int:
    """An instance rented in-process (the simulator's own state: no rate-limited call)."""
    state = stack.vast.state
    offer_id = min(
        o["id"] for o in state.admin_offers()["offers"] if o.get("gpu_name") == "RTX 3090"
    )
    status, body, _drop = state.create(
        offer_id, {"image": "example.org/w:1", "label": label, "env": env or LONG, "disk": 16}
    )
    assert status == 200, body
    return int(body["new_contract"])


def sim_destroy(stack, instance_id: int) -> None:
    state = stack.vast.state
    status, body = state.destroy(instance_id, state.identify(stack.vast_api_key))
    assert status == 200, body


def fleet(stack, n: int, tag: str) -> list[int]:
    """n running instances of another user of the account (labels the agent ignores)."""
    ids = [sim_create(stack, f"other-{tag}-{i}") for i in range(n)]
    deadline = time.monotonic() + 30
    while True:
        rows = {r["id"]: r for r in Admin(stack).instances()}
        if all(rows[i]["actual_status"] == "running" for i in ids):
            return ids
        assert time.monotonic() < deadline, "the fleet never ran"
        time.sleep(0.1)


def list_calls(admin) -> int:
    return admin.stats()["calls"].get("list", 0)


def steady_list_calls(ctx, admin, syncs: int = 4) -> list[int]:
    """List calls of each of `syncs` syncs, after one that completes the first full pass."""
    assert loop.sync(ctx).ran
    counts = []
    for _ in range(syncs):
        before = list_calls(admin)
        assert loop.sync(ctx).ran
        counts.append(list_calls(admin) - before)
    return counts


# --------------------------------------------------------------------------- pure parts


def test_absence_needs_a_full_page_covering_the_id_after_the_create_and_grace():
    state = PassState(cursor=100, started_at=50.0, done_started_at=20.0)
    assert state.covered_at(90) == 50.0  # covered by the pass in progress
    assert state.covered_at(150) == 20.0  # not yet: by the last complete pass
    assert PassState().covered_at(1) is None  # never listed in full: nothing is gone
    # Created at 10, grace 30: a listing at 20 is inside the read lag, at 50 it is not.
    assert state.absence_seen_at(150, created_at=10.0, grace=30.0) is None
    assert state.absence_seen_at(90, created_at=10.0, grace=30.0) == 50.0
    assert state.absence_seen_at(90, created_at=45.0, grace=0.0) == 50.0
    assert state.absence_seen_at(90, created_at=51.0, grace=0.0) is None


def test_a_pass_is_spread_so_that_it_takes_the_resync_interval_at_most():
    assert PassState().pages_this_refresh(10, 300) >= 1000  # the first pass is whole
    done = PassState(done_started_at=1.0, last_pass_pages=40)  # 1000 instances
    assert done.pages_this_refresh(10, 300) == 2  # 30 syncs a pass: 2 pages each
    assert done.pages_this_refresh(10, 600) == 1
    assert done.pages_this_refresh(400, 300) == 40  # a sync slower than the pass: whole


def instance(i: int, status: str | None = "running") -> Instance:
    return Instance.from_dict({"id": i, "label": f"ponos-a-t{i}-1", "actual_status": status})


def test_a_page_removes_only_what_it_covers_and_does_not_list():
    entries = [3, 5, 8, 12, 40]
    assert page_removals(entries, 4, 12, [instance(5), instance(12)]) == {8}
    assert page_removals(entries, 12, None, []) == {40}  # the last page covers the rest


def test_b_checks_what_a_cannot_vouch_for():
    entries = {
        1: instance(1),
        2: instance(2, "loading"),
        3: instance(3, None),
        4: instance(4, "offline"),
        5: instance(5, "exited"),
    }
    # 5 was listed by A (not running now); 2, 3, 4 were not: they may run now. 9 is a
    # record's instance the view does not hold yet.
    assert to_check(entries, {5}, {1, 9}) == [2, 3, 4, 9]
    assert to_check({1: instance(1)}, set(), {1}) == []  # steady state: no call


# --------------------------------------------------------------------------- simulator


def v1(stack, filters: dict) -> tuple[int, dict]:
    return stack.vast.state.list_v1({"select_filters": json.dumps(filters), "limit": "25"})


def test_simulator_filters_follow_sql_on_the_stored_status(stack):
    state = stack.vast.state
    fresh = sim_create(stack, "other-null-1", {**LONG, "SIM_PULL_SECONDS": "100000"})
    with state.lock:
        inst = state.fleet.instances[fresh]
        inst.visible_at = 0.0
        inst.actual_status = None  # just created: null
    status, body = v1(stack, {"actual_status": {"neq": "running"}, "id": {"eq": fresh}})
    assert status == 200 and body["instances"] == []  # NULL <> 'running' is not true
    status, body = v1(stack, {"actual_status": {"eq": None}, "id": {"eq": fresh}})
    assert [r["id"] for r in body["instances"]] == [fresh]
    status, body = v1(stack, {"actual_status": {"notin": ["exited"]}, "id": {"eq": fresh}})
    assert body["instances"] == []
    # A host gone offline: shown `offline`, stored `running`; a filter sees the stored one.
    [running] = fleet(stack, 1, "offline")
    with state.lock:
        state.fleet.instances[running].offline = True
    try:
        status, body = v1(stack, {"id": {"eq": running}})
        assert body["instances"][0]["actual_status"] == "offline"
        status, body = v1(stack, {"actual_status": {"neq": "running"}, "id": {"eq": running}})
        assert body["instances"] == []
    finally:
        with state.lock:
            state.fleet.instances[running].offline = False
        sim_destroy(stack, running)
        sim_destroy(stack, fresh)
    status, body = v1(stack, {"dph_total": {"lt": 1}})  # computed: refused
    assert status == 400


def test_a_refused_filter_raises_it_is_never_an_empty_listing(contexts):
    ctx = contexts()
    with pytest.raises(VastError) as refused:
        ctx.vast.list_instances(select_filters={"dph_total": {"lt": 1}})
    assert refused.value.status == 400


def test_b_is_read_in_chunks_a_front_proxy_takes(contexts):
    """A burst: a thousand records whose instances the view has not seen yet. One `id in`
    with all of them is a request line over 8 KB, which the simulator refuses as a front proxy
    does (414); the refresh asks in chunks and reads them all."""
    ctx = contexts(vast_api={"instance_reads": "flat"})
    ids = list(range(10_000_000, 10_001_000))
    with pytest.raises(VastError) as too_long:
        ctx.vast.list_instances(select_filters={"id": {"in": ids}})
    assert too_long.value.status == 414
    state = view.refresh(ctx, ctx.settings.sync_interval, set(ids))
    assert state.refreshed_at > 0
    assert ctx.store.view_entries() == {}


# --------------------------------------------------------------------------- the agent


def test_a_flat_sync_costs_the_same_calls_at_10_and_60_instances(contexts, admin, stack):
    """The call count at steady state is flat in N; a full listing's grows (the baseline)."""
    counts = {}
    ids = fleet(stack, 10, "n10")
    flat = contexts(vast_api={"instance_reads": "flat"})
    full = contexts(vast_api={"instance_reads": "full_list"})
    counts[("flat", 10)] = steady_list_calls(flat, admin)
    counts[("full", 10)] = steady_list_calls(full, admin)
    ids += fleet(stack, 50, "n60")
    counts[("flat", 60)] = steady_list_calls(flat, admin)
    counts[("full", 60)] = steady_list_calls(full, admin)
    for i in ids:
        sim_destroy(stack, i)
    assert max(counts[("flat", 60)]) <= 3, counts
    assert max(counts[("flat", 60)]) == max(counts[("flat", 10)]), counts
    assert min(counts[("full", 60)]) > max(counts[("full", 10)]), counts  # grows with N


def in_phase(ctx, task_id: str, phase: Phase) -> bool:
    record = ctx.store.get(task_id)
    return record is not None and record.phase == phase


def watch_once(ctx, task_id: str) -> list:
    chain = ctx.store.get(task_id).watch_chain
    return steps.run_step(ctx, task_id, StepName.WATCH, chain=chain)


def bring_to_running(ctx, task_id: str) -> Harness:
    harness = Harness(ctx)
    harness.sync()

    def running():
        record = ctx.store.get(task_id)
        return record is not None and record.phase == Phase.RUNNING

    harness.run(until=running, timeout=30)
    return harness


def test_a_vanished_instance_is_gone_only_once_a_full_page_covered_it(contexts, admin, stack):
    others = fleet(stack, 60, "vanish")  # 3 pages or more: a pass spans several syncs
    # A visibility grace of 5 s (it is at most loading_deadline): the watcher's end comes soon.
    ctx = contexts(
        vast_api={"instance_reads": "flat", "full_resync_interval": 1000, "loading_deadline": 5}
    )
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="1000000"))
    bring_to_running(ctx, task_id)
    record = ctx.store.get(task_id)
    sim_destroy(stack, record.instance_id)  # behind the agent's back
    destroyed_at = ctx.now()
    pages = ctx.store.load_view_meta().last_pass_pages
    assert pages >= 3
    seen_gone = None
    before = ctx.store.load_view_meta()
    for n in range(pages + 2):
        state = steps.refresh_view(ctx)
        entry = ctx.store.view_entry(record.instance_id)
        # Did a full page cover the id in this refresh? A pass ended, or its cursor passed it.
        covered = state.done_started_at != before.done_started_at or (
            state.started_at is not None
            and state.cursor >= record.instance_id
            and (before.started_at != state.started_at or before.cursor < record.instance_id)
        )
        if entry is None and seen_gone is None:
            assert covered, f"gone at refresh {n} before a full page covered it"
            assert state.covered_at(record.instance_id) >= destroyed_at - 2.0
            seen_gone = n
        before = state
    assert seen_gone is not None and seen_gone <= pages, "not gone within one pass"
    # The watcher then asks by id and ends the attempt (no instance left behind).
    harness = Harness(ctx)
    harness.push(task_id, [Next(StepName.WATCH)])
    harness.run(
        until=lambda: ctx.store.get(task_id).attempt > 1 or harness.done(task_id), timeout=30
    )
    for i in others:
        sim_destroy(stack, i)
    admin.stop_task(task_id)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=30)


def test_an_exited_instance_is_seen_at_the_next_sync_and_acted_on(contexts, admin, stack):
    others = fleet(stack, 60, "exit")
    ctx = contexts(vast_api={"instance_reads": "flat", "full_resync_interval": 1000})
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="120"))
    harness = bring_to_running(ctx, task_id)
    record = ctx.store.get(task_id)
    deadline = time.monotonic() + 30
    while stack.vast.state.show(record.instance_id)[1]["instances"]["actual_status"] == "running":
        assert time.monotonic() < deadline
        time.sleep(0.05)
    before = list_calls(admin)
    result = loop.sync(ctx)
    assert list_calls(admin) - before <= 3
    # The sync wakes the watcher at once (it may be half a sync away).
    assert (task_id, Next(StepName.WATCH)) in result.enqueue
    entry = ctx.store.view_entry(record.instance_id)
    assert entry.actual_status != "running"  # seen by A, whatever the full pass's cursor
    harness.queue.clear()  # this test's own watch below is the one that looks
    harness.push(task_id, watch_once(ctx, task_id))
    # Acted on: the watch asked Vast.ai for the ended instance's log (it reads it when
    # the upload lands, in the next runs of the same watch).
    assert ctx.store.log_read(task_id, record.attempt, "watch") is not None
    harness.run(until=lambda: harness.done(task_id), timeout=30)
    assert ctx.store.get(task_id).final_state == "completed"
    for i in others:
        sim_destroy(stack, i)


def test_a_failing_filtered_call_keeps_the_view(contexts, admin, stack):
    others = fleet(stack, 60, "stale")
    ctx = contexts(vast_api={"instance_reads": "flat"})
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="1000000"))
    harness = bring_to_running(ctx, task_id)
    record = ctx.store.get(task_id)
    assert ctx.store.view_entry(record.instance_id) is not None
    # A watcher whose view is stale (the sync stalled) refreshes it with the flat calls,
    # not a full listing (60 instances and more: 3 pages).
    ctx.store.save_view_meta(replace(ctx.store.load_view_meta(), refreshed_at=0.0))
    before = list_calls(admin)
    watch_once(ctx, task_id)
    assert 1 <= list_calls(admin) - before <= 2
    assert ctx.now() - ctx.store.load_view_meta().refreshed_at < 5
    for i in others:
        sim_destroy(stack, i)
    admin.faults({"fault": "http_5xx", "endpoint": "list", "status": 503, "times": 40})
    with pytest.raises(VastError):
        steps.refresh_view(ctx)
    admin.clear_faults()
    assert ctx.store.view_entry(record.instance_id) is not None  # unknown is not gone
    admin.stop_task(task_id)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=30)


def test_a_new_instance_hidden_by_the_read_lag_is_not_gone(contexts, admin):
    ctx = contexts(vast_api={"instance_reads": "flat"})
    admin.faults({"fault": "read_lag", "seconds": 3000})  # 30 s at time scale 100
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="1000000"))
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: in_phase(ctx, task_id, Phase.LOADING), timeout=30)
    admin.clear_faults()
    record = ctx.store.get(task_id)
    for _ in range(3):
        loop.sync(ctx)  # full passes that cover its id while it is hidden
        instance, taken_at = steps.view_for_watch(ctx, record)
        assert instance is None and taken_at < record.instance_created_at
        watch_once(ctx, task_id)
        assert ctx.store.get(task_id).attempt == 1
        assert ctx.store.get(task_id).phase == Phase.LOADING
    admin.stop_task(task_id)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=60)


def test_filters_refused_mid_run_fall_back_to_full_listings(contexts, admin, stack, caplog):
    """Vast.ai starts refusing select_filters (400) while tasks run: the sync and the
    watchers read full listings for a while, say so, and the task still ends; afterwards
    the flat view is tried again."""
    ctx = contexts(vast_api={"instance_reads": "flat"})
    # Runs 6 real s: a watcher refreshes the view every 1.5 sync intervals, and a shorter
    # run could end between two refreshes, never seen `running` by bring_to_running.
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="600"))
    harness = bring_to_running(ctx, task_id)
    stack.vast.state.select_filters = False
    try:
        with caplog.at_level("ERROR", logger="ponos_tasks.steps"):
            assert loop.sync(ctx).ran  # before: the refused call stalled every sync
        assert "refused a filtered instance listing" in caplog.text
        assert steps.instance_reads(ctx) == "full_list"
        assert ctx.store.load_snapshot().find(ctx.store.get(task_id).instance_id) is not None
        harness.run(until=lambda: harness.done(task_id), timeout=30, sync_every=0.2)
        assert admin.task(task_id)["state"] == "completed"
    finally:
        stack.vast.state.select_filters = True
    ctx.redis.delete(ctx.keys.view_refused)  # the fallback's time is up
    assert steps.instance_reads(ctx) == "flat"
    refreshed = ctx.store.load_view_meta().refreshed_at
    assert loop.sync(ctx).ran
    assert ctx.store.load_view_meta().refreshed_at > refreshed
