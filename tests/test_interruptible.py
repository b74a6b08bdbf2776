"""Interruptible (bid) instances end to end through the steps (tests/agent_harness.py), with
the Vast.ai simulator's outbid and bid_raised faults: an outbid is a pause, a resume goes on,
a long pause falls back to on-demand elsewhere, a bid found too low at create is dropped.
Each test checks the simulator's ledger and timeline (the `contexts` fixture also checks that
a task never had two live instances) and the task's published log.
"""

from ponos_tasks.lifecycle import parse_label

# The fixtures of test_steps (one stack for this module); ruff: F401/F811 ignored here.
from tests.test_steps import (
    admin,
    contexts,
    scripted,
    stack,
    start_and_finish,
)


def bidding(contexts, fallback_after: float = 60.0, **vast):
    return contexts(
        vast_api={
            "interruptible": {
                "enabled": True,
                "bid_margin": 0.01,
                "fallback_after": fallback_after,
            },
            **vast,
        }
    )


def status_events(admin, label: str) -> list[dict]:
    return [e for e in admin.events() if e.get("label") == label and e["event"] == "status"]


def runs(events: list[dict]) -> int:
    """How many times the container started running (status events repeat a status)."""
    statuses = [e["actual_status"] for e in events]
    return sum(1 for i, s in enumerate(statuses) if s == "running" and statuses[i - 1] != "running")


def outbid_fault(task_id: str, **params) -> dict:
    # times=1: only the task's first instance is outbid.
    return {"fault": "outbid", "label": task_id, "times": 1, **params}


def test_outbid_then_resumed_is_a_pause_and_the_task_completes_on_the_same_instance(
    contexts, admin
):
    ctx = bidding(contexts)
    # Outbid 100 s (simulated; 1 s here) into its run: the agent has seen it running.
    task_id = admin.one_task(env=scripted(0, SIM_DURATION="300"))
    admin.faults(outbid_fault(task_id, after=100, resume_after=200))
    start_and_finish(ctx, task_id, timeout=60)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason
    rows = admin.rows_for(task_id)
    assert len(rows) == 1 and rows[0]["is_bid"] and rows[0]["destroyed_at"] is not None
    # The instance was really outbid, then ran again (two runs: "running" twice).
    events = status_events(admin, rows[0]["label"])
    assert any("outbid" in e.get("status_msg", "") for e in events)
    assert runs(events) == 2
    # While stopped, storage billed and GPU did not: storage time exceeds GPU time by the pause.
    assert rows[0]["storage_seconds"] - rows[0]["gpu_seconds"] >= 200
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    log = admin.task_log(task_id)
    assert "was outbid" in log and "command was cut" in log and "resumed by Vast.ai" in log
    assert "interruptible: bid $" in log


def test_outbid_for_fallback_after_moves_to_on_demand_on_another_machine(contexts, admin):
    ctx = bidding(contexts, fallback_after=1.0)
    task_id = admin.one_task(env=scripted(0))
    admin.faults(outbid_fault(task_id, after=5))  # never resumed
    start_and_finish(ctx, task_id, timeout=60)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason
    rows = sorted(admin.rows_for(task_id), key=lambda row: row["created_at"])
    assert [row["is_bid"] for row in rows] == [True, False]
    assert [parse_label(row["label"]).attempt for row in rows] == [1, 2]
    assert rows[0]["machine_id"] != rows[1]["machine_id"]
    # The paused instance was destroyed before its successor was created.
    assert rows[0]["destroyed_at"] <= rows[1]["created_at"]
    assert record.on_demand_only and "outbid for" in record.attempt_reasons[0]
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    log = admin.task_log(task_id)
    assert "was outbid" in log and "on an on-demand instance on another machine" in log


def test_outbid_during_loading_then_resumed(contexts, admin):
    ctx = bidding(contexts, loading_deadline=600)
    task_id = admin.one_task(env=scripted(0, SIM_PULL_SECONDS="30"))
    admin.faults(outbid_fault(task_id, during="loading", after=5, resume_after=200))
    start_and_finish(ctx, task_id, timeout=60)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason
    rows = admin.rows_for(task_id)
    assert len(rows) == 1 and rows[0]["is_bid"]
    events = status_events(admin, rows[0]["label"])
    outbid_at = next(i for i, e in enumerate(events) if "outbid" in e.get("status_msg", ""))
    assert events[outbid_at - 1]["actual_status"] == "loading"  # it never ran before
    assert runs(events) == 1
    assert admin.accepted_agent_states(task_id) == ["running", "completed"]
    log = admin.task_log(task_id)
    assert (
        "was outbid" in log and "had not seen the task's command start" in log and "resumed" in log
    )


def test_a_bid_too_low_at_create_is_destroyed_at_once_and_the_next_offer_taken(contexts, admin):
    ctx = bidding(contexts)
    task_id = admin.one_task(env=scripted(0))
    admin.faults({"fault": "bid_raised", "label": task_id, "times": 1, "factor": 3})
    start_and_finish(ctx, task_id, timeout=60)
    record = ctx.store.get(task_id)
    assert record.final_state == "completed", record.reason
    rows = sorted(admin.rows_for(task_id), key=lambda row: row["created_at"])
    assert len(rows) == 2 and all(row["is_bid"] for row in rows)
    stray, used = rows
    assert stray["gpu_seconds"] == 0 and stray["destroyed_at"] <= used["created_at"]
    assert stray["machine_id"] != used["machine_id"]
    log = admin.task_log(task_id)
    assert "is below its minimum now" in log
