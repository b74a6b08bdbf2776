"""The budget's arithmetic (ponos_tasks/budget.py) and how plan() uses it: pure, no Redis."""

from __future__ import annotations

import math
import random
from dataclasses import replace
from datetime import UTC, datetime

import pytest

from ponos_tasks.budget import (
    MAX_DPH_TOTAL,
    MAX_INSTANCES,
    MAX_SPEND_PER_DAY,
    Commitment,
    Limits,
    Metered,
    Observation,
    Rates,
    Room,
    Spending,
    instance_rates,
    meter_pass,
    over_task_cap,
    rebuilt_day_spend,
    room_for_new,
    seconds_to_midnight,
    spend_now,
    split_by_day,
    startable,
    task_commitments,
)
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Instance, TaskRecord
from ponos_tasks.reconcile import GrantAllowance, StartChain, WaitForCapacity, capacity, plan
from tests.settings_helper import settings_with

AGENT = "0a1b2c3d"
NOON = datetime(2026, 3, 10, 12, 0, tzinfo=UTC).timestamp()
RATES = Rates(gpu=0.9, storage=0.1)


def instance(iid, task, attempt=1, status="running", dph=1.0, gpu=None, storage=0.1, start=None):
    gpu = dph - storage if gpu is None else gpu
    return Instance.from_dict(
        {
            "id": iid,
            "label": f"ponos-{AGENT}-{task}-{attempt}",
            "actual_status": status,
            "intended_status": "running",
            "cur_state": "running",
            "next_state": "running",
            "dph_total": dph,
            "dph_base": gpu,
            "storage_total_cost": storage,
            "start_date": start,
        }
    )


def obs(iid, *, running, start=None, live=True, task="t1", status=None):
    status = status or ("running" if running else "loading")
    return Observation(iid, task, RATES, running, start, live, status)


# ------------------------------------------------------------------------------ UTC days


def test_split_by_day_cuts_at_utc_midnight():
    midnight = datetime(2026, 3, 11, tzinfo=UTC).timestamp()
    assert split_by_day(midnight - 90, midnight + 30) == [
        ("2026-03-10", 90.0),
        ("2026-03-11", 30.0),
    ]
    assert split_by_day(NOON, NOON) == []
    assert seconds_to_midnight(NOON) == 12 * 3600


def test_instance_rates_take_the_whole_price_for_a_missing_part():
    assert instance_rates(instance(1, "t1", dph=1.0, gpu=0.9, storage=0.1)) == Rates(0.9, 0.1)
    assert instance_rates(instance(1, "t1", dph=0.5)) == Rates(0.4, 0.1)
    row = Instance.from_dict({"id": 2, "dph_total": 0.5})
    assert instance_rates(row) == Rates(0.5, 0.5)  # too much rather than too little


# ------------------------------------------------------------------------------ the meter


def test_meter_charges_gpu_when_running_at_either_end_and_storage_always():
    meter = {
        1: Metered("t1", NOON, False, 0.9, 0.1, "loading"),  # running now
        2: Metered("t2", NOON, True, 0.9, 0.1, "running"),  # exited now
        3: Metered("t3", NOON, False, 0.9, 0.1, "loading"),  # loading then and now
        4: Metered("t4", NOON, False, 0.9, 0.1, "loading"),  # exited now: it ran meanwhile
    }
    observed = [
        obs(1, running=True, task="t1"),
        obs(2, running=False, task="t2", status="exited"),
        obs(3, running=False, task="t3"),
        obs(4, running=False, task="t4", status="exited"),
    ]
    result = meter_pass(meter, observed, now=NOON + 3600, epoch=NOON - 1, scale=1.0)
    assert result.tasks == pytest.approx({"t1": 1.0, "t2": 1.0, "t3": 0.1, "t4": 1.0})
    assert result.days == pytest.approx({"2026-03-10": 3.1})
    assert result.entries[1] == Metered("t1", NOON + 3600, True, 0.9, 0.1, "running")
    assert result.gone == []


def test_meter_charges_a_vanished_instance_up_to_the_listing_that_misses_it():
    meter = {7: Metered("t7", NOON, True, 0.9, 0.1)}
    result = meter_pass(meter, [], now=NOON + 1800, epoch=NOON - 1, scale=1.0)
    assert result.gone == [7] and result.tasks == pytest.approx({"t7": 0.5})
    # A destroyed instance still listed (next_state unloaded) counts as gone too.
    result = meter_pass(
        meter, [obs(7, running=True, live=False)], now=NOON + 1800, epoch=0, scale=1
    )
    assert result.gone == [7] and 7 not in result.entries


def test_meter_first_sight_from_start_date_and_gpu_all_along_before_the_epoch():
    # Created after the meter began, loading now: storage since its start only.
    result = meter_pass(
        {}, [obs(1, running=False, start=NOON)], now=NOON + 3600, epoch=NOON - 5, scale=1
    )
    assert result.tasks["t1"] == pytest.approx(0.1)
    # Created before the meter began (Redis lost): it may have run all along.
    result = meter_pass(
        {}, [obs(1, running=False, start=NOON)], now=NOON + 3600, epoch=NOON + 60, scale=1
    )
    assert result.tasks["t1"] == pytest.approx(1.0)
    # A start_date in the future (clock skew) charges nothing yet, never a negative amount.
    result = meter_pass(
        {}, [obs(1, running=True, start=NOON + 99)], now=NOON, epoch=NOON - 5, scale=1
    )
    assert result.tasks == {} and result.entries[1].until == NOON


def test_meter_scales_billed_seconds_and_splits_days():
    meter = {1: Metered("t1", seconds_before_midnight := NOON + 12 * 3600 - 60, True, 0.9, 0.1)}
    result = meter_pass(
        meter, [obs(1, running=True)], now=seconds_before_midnight + 120, epoch=0, scale=30
    )
    # 60 s each side of midnight, each billed as 30 minutes at $1/h.
    assert result.days == pytest.approx({"2026-03-10": 0.5, "2026-03-11": 0.5})


def test_meter_never_counts_less_than_the_ledger():
    """A random life (loading, running, exited, restarted after Vast.ai's restart delay, and
    so on), listed every `sync` s: the meter counts at least what Vast.ai bills, and at most
    one interval's full price more per status change (plus the last interval)."""
    rng = random.Random(7)
    for _ in range(300):
        sync = rng.uniform(1, 20)  # at most the restart delay and a cached image's start
        t, changes = NOON, []
        for _ in range(rng.randint(1, 4)):
            changes.append((t, "loading"))
            t += rng.uniform(20, 60)  # an image's start: 20-40 s with a cached image
            changes.append((t, "running"))
            t += rng.uniform(0.5, 200)
            changes.append((t, "exited"))
            t += rng.uniform(20, 40)  # Vast.ai's restart delay
        created, destroyed = NOON, t
        ledger_gpu = sum(
            changes[i + 1][0] - at for i, (at, status) in enumerate(changes) if status == "running"
        )
        exact = ((destroyed - created) * RATES.storage + ledger_gpu * RATES.gpu) / 3600

        def status_at(moment, changes=changes):
            return [status for at, status in changes if at <= moment][-1]

        meter: dict = {}
        counted, now = 0.0, created
        while True:
            now += sync
            live = now < destroyed
            status = status_at(now) if live else None
            seen = [obs(1, running=status == "running", start=created, status=status)]
            result = meter_pass(meter, seen if live else [], now=now, epoch=created - 1, scale=1)
            counted += sum(result.days.values())
            meter = {**{k: v for k, v in meter.items() if k not in result.gone}, **result.entries}
            if not live:
                break
        assert counted >= exact - 1e-9
        slack = (len(changes) + 1) * sync * (RATES.gpu + RATES.storage) / 3600
        assert counted <= exact + slack + 1e-9


# ------------------------------------------------------------------ commitments and room

DAY_LIMITS = Limits(max_spend_per_day=10.0, max_spend_per_task=1.0)


def test_room_under_max_dph_total():
    limits = Limits(max_dph_total=2.0)
    room = room_for_new(
        limits, [Commitment("a", 0.5), Commitment("b", 0.7)], spent_today=0, now=NOON
    )
    assert room.dph == pytest.approx(0.8) and room.limit == MAX_DPH_TOTAL
    full = room_for_new(limits, [Commitment("a", 2.5)], spent_today=0, now=NOON)
    assert full.dph == 0 and full.holds(None)
    assert room_for_new(Limits(), [Commitment("a", 9)], spent_today=0, now=NOON) == Room(None)


def test_room_under_max_spend_per_day_counts_what_live_tasks_may_still_cost():
    # Per-task cap $1: 7 live tasks with nothing spent may still cost $7; $2 spent: $1 left,
    # a whole new task ($1) still fits: no $/h ceiling.
    seven = [Commitment(str(i), 1.0) for i in range(7)]
    assert room_for_new(DAY_LIMITS, seven, spent_today=2.0, now=NOON).dph is None
    # $2.5 spent: $0.5 left today, less than a task's cap: $0.5 over the 12 h to midnight.
    room = room_for_new(DAY_LIMITS, seven, spent_today=2.5, now=NOON)
    assert room.limit == MAX_SPEND_PER_DAY and room.dph == pytest.approx(0.5 / 12)
    # What the live tasks spent is no longer theirs to spend.
    spent = [Commitment(str(i), 1.0, spent=0.5) for i in range(7)]
    assert room_for_new(DAY_LIMITS, spent, spent_today=5.0, now=NOON).dph is None


def test_room_under_max_spend_per_day_without_a_task_cap_guards_later_days():
    limits = Limits(max_spend_per_day=24.0)
    # Nothing live: a later day could see the new instance run all day: $1/h.
    assert room_for_new(limits, [], spent_today=0, now=NOON).dph == pytest.approx(1.0)
    # $0.25/h live: $0.75/h left for a whole day; today allows more (12 h left).
    room = room_for_new(limits, [Commitment("a", 0.25)], spent_today=0, now=NOON)
    assert room.dph == pytest.approx(0.75) and "a later day" in room.why
    # A billing clock 10 times faster: a day bills 240 h.
    fast = replace(limits, billing_time_scale=10.0)
    assert room_for_new(fast, [], spent_today=0, now=NOON).dph == pytest.approx(0.1)


def test_startable_counts_instances_at_the_cheapest_price():
    def count(limits, others=(), cheapest=0.3, slots=4, spent=0.0):
        return startable(
            limits, others, spent_today=spent, now=NOON, cheapest=cheapest, slots=slots
        )

    assert count(Limits()) == 4
    assert count(Limits(max_dph_total=1.0)) == 3
    assert count(Limits(max_dph_total=1.0), slots=2) == 2
    assert count(Limits(max_dph_total=1.0), [Commitment("a", 0.8)]) == 0
    assert count(Limits(max_dph_total=1.0), cheapest=None) == 1  # no price seen yet
    # Under a daily budget each new task commits its max_spend_per_task: $0.9 holds two.
    assert count(Limits(max_spend_per_day=0.9, max_spend_per_task=0.4)) == 2
    assert count(Limits(max_spend_per_day=0.9, max_spend_per_task=0.4), spent=0.2) == 1


def test_commitments_count_every_instance_and_allowances_of_tasks_about_to_rent():
    records = {
        # Retrying: its failed attempt's stopped instance goes right before the next is
        # created: the larger of the two counts, not both.
        "r": TaskRecord("r", phase=Phase.WAITING_OFFER, attempt=1, budget_allowance=0.6),
        # Loading, not listed yet (read lag): the recorded price counts.
        "l": TaskRecord("l", phase=Phase.LOADING, attempt=1, instance_id=50, dph_total=0.4),
        # Accepted and granted (its chain is about to start).
        "g": TaskRecord("g", phase=Phase.ACCEPTED, budget_allowance=0.2),
        # Accepted, waiting for room: nothing yet.
        "w": TaskRecord("w", phase=Phase.ACCEPTED),
    }
    listed = [
        instance(10, "r", attempt=1, status="exited", dph=0.5),
        instance(11, "orphan", attempt=2, dph=0.3),  # no record: bills until destroyed
    ]
    found = task_commitments(records, listed, {"r": 0.05})
    assert {t: round(c.dph, 6) for t, c in found.items()} == {
        "r": 0.6,
        "l": 0.4,
        "g": 0.2,
        "orphan": 0.3,
    }
    assert found["r"].spent == 0.05


def test_a_lost_day_counter_is_rebuilt_as_the_most_the_day_can_have_cost():
    live = [Commitment("a", 1.0, spent=0.2), Commitment("b", 1.0)]
    # Each live task may cost up to $1 more (its cap): the day may have cost $10 - $1.8.
    assert rebuilt_day_spend(DAY_LIMITS, 0.5, live, now=NOON) == pytest.approx(8.2)
    # What the instances show is kept when it is more.
    assert rebuilt_day_spend(DAY_LIMITS, 9.0, live, now=NOON) == 9.0
    assert rebuilt_day_spend(Limits(), 0.5, live, now=NOON) == 0.5
    # And the room it leaves is none: new instances wait for running tasks to end.
    rebuilt = rebuilt_day_spend(DAY_LIMITS, 0.5, live, now=NOON)
    assert room_for_new(DAY_LIMITS, live, spent_today=rebuilt, now=NOON).holds(None)


def test_task_cap_ends_the_task_with_the_margin_in_hand():
    limits = Limits(max_spend_per_task=1.0)
    # $0.9 metered an hour ago at $0.05/h: now $0.95; ending it takes 2 min more.
    spent = spend_now(0.9, NOON - 3600, 0.05, now=NOON, limits=limits)
    assert spent == pytest.approx(0.95)
    assert over_task_cap(spent, 0.05, margin=120, limits=limits) is None
    reason = over_task_cap(spent, 3.0, margin=120, limits=limits)  # 2 min at $3/h = $0.1
    assert reason.startswith("it reached its spending limit (max_spend_per_task $1)")
    assert over_task_cap(5.0, 1.0, margin=0, limits=Limits()) is None


# --------------------------------------------------------------------------- with plan()


def _plan(records, instances=(), actions=(), spending=None, **limits):
    settings = settings_with(
        max_instances=limits.pop("max_instances", 10),
        heartbeat_stale=1e9,
        budget=Limits(**limits),
    )
    return plan(
        now=NOON,
        agent_short_id=AGENT,
        records=records,
        instances=list(instances),
        actions=list(actions),
        settings=settings,
        spending=spending or Spending(cheapest=0.3),
    )


def accepted(task, at):
    return TaskRecord.new(task, at)


def test_plan_grants_room_in_arrival_order_and_holds_the_rest_behind_the_first_held():
    records = {t: accepted(t, NOON - 100 + i) for i, t in enumerate(["a", "b", "c", "d"])}
    running = [instance(1, "x", dph=0.8)]
    records["x"] = TaskRecord("x", phase=Phase.RUNNING, attempt=1, instance_id=1, dph_total=0.8)
    steps = _plan(records, running, max_dph_total=1.5)
    starts = [s for s in steps if isinstance(s, StartChain)]
    waits = [s for s in steps if isinstance(s, WaitForCapacity)]
    # $0.7/h left: the first task gets it all (it rents the cheapest offer within it, and
    # gives back the rest once rented); the others wait, in order, for max_dph_total.
    assert [(s.task_id, round(s.allowance, 6), s.limit) for s in starts] == [
        ("a", 0.7, MAX_DPH_TOTAL)
    ]
    assert [(w.task_id, w.limit) for w in waits] == [
        ("b", MAX_DPH_TOTAL),
        ("c", MAX_DPH_TOTAL),
        ("d", MAX_DPH_TOTAL),
    ]
    assert "max_dph_total $1.5/h" in waits[0].reason and "cheapest" in waits[0].reason


def test_plan_raises_the_allowance_of_a_waiting_task_when_room_returns():
    waiting = TaskRecord(
        "a", phase=Phase.WAITING_OFFER, attempt=0, accepted_at=NOON - 50, budget_allowance=0.2
    )
    steps = _plan({"a": waiting}, max_dph_total=1.5)
    grants = [s for s in steps if isinstance(s, GrantAllowance)]
    assert [(g.task_id, g.allowance, g.phase, g.attempt) for g in grants] == [
        ("a", 1.5, Phase.WAITING_OFFER, 0)
    ]
    # Never lowered: with less room than it holds, nothing is granted.
    busy = [instance(1, "x", dph=1.4)]
    assert not [
        s for s in _plan({"a": waiting}, busy, max_dph_total=1.5) if isinstance(s, GrantAllowance)
    ]


def test_plan_count_limit_comes_before_the_budget_and_is_named():
    records = {t: accepted(t, NOON - 10 + i) for i, t in enumerate(["a", "b"])}
    steps = _plan(records, max_instances=1, max_dph_total=5.0)
    assert [s.task_id for s in steps if isinstance(s, StartChain)] == ["a"]
    waits = [s for s in steps if isinstance(s, WaitForCapacity)]
    assert [(w.task_id, w.limit) for w in waits] == [("b", MAX_INSTANCES)]


def test_capacity_asks_arkindex_only_for_what_can_start():
    records = {"x": TaskRecord("x", phase=Phase.RUNNING, attempt=1, instance_id=1, dph_total=1.0)}
    running = [instance(1, "x", dph=1.0)]
    settings = settings_with(max_instances=10, budget=Limits(max_dph_total=2.0))
    # $1/h left at $0.3/h an instance: 3 tasks.
    assert capacity(records, running, settings, NOON, Spending(cheapest=0.3)) == 3
    # Two already accepted, waiting for their chain: 1 more.
    waiting = {t: accepted(t, NOON) for t in ("a", "b")}
    assert capacity({**records, **waiting}, running, settings, NOON, Spending(cheapest=0.3)) == 1
    # The day's budget spent: none, however many slots are free.
    day = settings_with(max_instances=10, budget=Limits(max_spend_per_day=1.0))
    assert capacity(records, running, day, NOON, Spending(spent_today=1.0, cheapest=0.3)) == 0
    # No limit shared by instances: the free slots.
    assert capacity(records, running, settings_with(max_instances=10), NOON, None) == 9


def test_plan_under_a_daily_budget_that_affords_whole_tasks():
    """$0.9 a day, $0.4 a task: the first two start with no $/h ceiling (each costs at most
    its cap), the third waits for max_spend_per_day."""
    records = {t: accepted(t, NOON - 10 + i) for i, t in enumerate(["a", "b", "c"])}
    steps = _plan(records, max_spend_per_day=0.9, max_spend_per_task=0.4)
    starts = [(s.task_id, s.allowance) for s in steps if isinstance(s, StartChain)]
    assert starts == [("a", math.inf), ("b", math.inf)]
    waits = [(w.task_id, w.limit) for w in steps if isinstance(w, WaitForCapacity)]
    assert waits == [("c", MAX_SPEND_PER_DAY)]
