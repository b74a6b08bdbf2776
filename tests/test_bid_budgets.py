# ruff: noqa: F811
"""Budgets meet interruptible instances (README "Budgets", "Interruptible"): a bid instance
costs its bid plus storage, within every cap; a stray created stopped is never adopted. Found
by an adversarial review (each test failed before the fix); in-process against the simulators."""

from ponos_tasks.offers import build_query
from tests.agent_harness import Harness

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (  # noqa: F401
    admin,
    contexts,
    scripted,
    stack,
    start_and_finish,
)

BIG_MARGIN = 20.0


def cheapest_bid_offer(ctx):
    query = build_query({}, disk_gb=ctx.config.vast_api.disk_gb, offer_type="bid")
    offers = [o for o in ctx.vast.search_offers(query) if o.dph_total is not None]
    return min(offers, key=lambda o: o.dph_total)


def test_bid_margin_pushes_live_dph_above_max_dph_total(contexts, admin):
    margin = 0.2
    probe = contexts(vast_api={"interruptible": {"enabled": True}})
    cheapest = cheapest_bid_offer(probe)
    limit = round(cheapest.dph_total + margin / 2, 6)
    ctx = contexts(
        vast_api={"interruptible": {"enabled": True, "bid_margin": margin}},
        budget={"max_dph_total": limit},
    )
    task_id = admin.one_task(env=scripted(0))
    start_and_finish(ctx, task_id, timeout=60)
    rows = admin.rows_for(task_id)
    assert rows and all(row["is_bid"] for row in rows)
    over = [(row["id"], row["dph_total"]) for row in rows if row["dph_total"] > limit + 1e-9]
    assert over == [], f"max_dph_total {limit}: instances above it {over}"


def test_bid_instance_passes_max_spend_per_task(contexts, admin):
    cap = 0.3
    ctx = contexts(
        vast_api={"interruptible": {"enabled": True, "bid_margin": BIG_MARGIN}},
        budget={"max_spend_per_task": cap},
    )
    # Runs until stopped (no SIM_DURATION).
    task_id = admin.one_task(env={"SIM_PULL_SECONDS": "5", "SIM_LOG_LINES": "3"})
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=90, sync_every=0.5)
    record = ctx.store.get(task_id)
    assert record.final_state == "error" and "max_spend_per_task" in (record.reason or "")
    rows = admin.rows_for(task_id)
    cost = sum(row["cost"] for row in rows)
    assert cost <= cap + 1e-9, f"ledger cost {cost:.4f} > max_spend_per_task {cap}: {rows}"


def test_bid_too_low_stray_whose_destroy_fails_is_adopted(contexts, admin):
    ctx = contexts(
        vast_api={
            "interruptible": {"enabled": True, "bid_margin": 0.01, "fallback_after": 60.0},
            "start_attempts": 1,
            "log_read_deadline": 2,
        }
    )
    task_id = admin.one_task(env=scripted(0))
    admin.faults(
        {"fault": "bid_raised", "label": task_id, "times": 1, "factor": 3},
        # Enough 5xx on destroy to outlast the client's own retries of that one call.
        {"fault": "http_5xx", "endpoint": "destroy", "times": 6},
    )
    harness = Harness(ctx)
    harness.sync()
    try:
        harness.run(until=lambda: harness.done(task_id), timeout=120, sync_every=0.5)
    except TimeoutError:
        print("DBG REC", ctx.store.get(task_id))
        print("DBG LOG", "\n".join(ctx.logbook.lines(task_id)[-25:]))
        print("DBG TRACE", harness.trace[-15:])
        raise
    record = ctx.store.get(task_id)
    rows = sorted(admin.rows_for(task_id), key=lambda row: row["created_at"])
    assert record.final_state == "completed", (
        record.reason,
        [(r["id"], r["is_bid"], r["gpu_seconds"], r["destroyed_at"]) for r in rows],
    )


def test_outbid_fallback_whose_destroy_fails_keeps_one_live_instance(contexts, admin):
    """Held: the fallback's destroy of the paused instance fails (5xx) a few times; the
    fixture checks from the simulator's timeline that the task never had two live
    instances, and the task completes on an on-demand instance, not failed."""
    ctx = contexts(
        vast_api={
            "interruptible": {"enabled": True, "bid_margin": 0.01, "fallback_after": 1.0},
        }
    )
    task_id = admin.one_task(env=scripted(0))
    admin.faults(
        {"fault": "outbid", "label": task_id, "times": 1, "after": 5},
        {"fault": "http_5xx", "endpoint": "destroy", "times": 6},
    )
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=90, sync_every=0.5)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason
    rows = sorted(admin.rows_for(task_id), key=lambda row: row["created_at"])
    assert [row["is_bid"] for row in rows] == [True, False]
    assert rows[0]["destroyed_at"] <= rows[1]["created_at"]
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]


def test_bid_instance_passes_max_spend_per_day(contexts, admin):
    day = 0.3
    ctx = contexts(
        vast_api={"interruptible": {"enabled": True, "bid_margin": BIG_MARGIN}},
        budget={"max_spend_per_day": day, "max_spend_per_task": day},
    )
    task_id = admin.one_task(env={"SIM_PULL_SECONDS": "5", "SIM_LOG_LINES": "3"})
    harness = Harness(ctx)
    harness.sync()
    harness.run(until=lambda: harness.done(task_id), timeout=90, sync_every=0.5)
    # The agent (a fresh one) had no other instance today: this task's ledger is its day.
    cost = sum(row["cost"] for row in admin.rows_for(task_id))
    assert cost <= day + 1e-9, f"the day's ledger spend {cost:.4f} > max_spend_per_day {day}"
