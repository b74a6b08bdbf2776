"""The status documents (overview.py) and their terminal views (status_view.py): pure, no
Redis, no terminal (rich prints to a recording Console)."""

from __future__ import annotations

import datetime as dt
import io
import subprocess
import sys

import pytest
from rich.console import Console

from ponos_tasks.metrics import AgentState
from ponos_tasks.models import Instance, TaskRecord
from ponos_tasks.overview import (
    attempt_spend,
    resolve_task_id,
    status_document,
    task_document,
    waiting_reason,
)
from ponos_tasks.status_view import render_status, render_task, watch

# 2026-03-01 00:10:00 UTC: ten minutes into a day.
NOW = dt.datetime(2026, 3, 1, 0, 10, tzinfo=dt.UTC).timestamp()
UUID = "3f2a9c1e-0b7d-4e59-9a63-2d1c5e8f7a10"


def state(*records, instances=(), last_sync=NOW - 2, report_interval=None) -> AgentState:
    return AgentState(
        now=NOW,
        records={r.task_id: r for r in records},
        instances=list(instances),
        snapshot_taken_at=NOW - 1,
        last_sync_at=last_sync,
    )


def text_of(renderable, width=160) -> str:
    console = Console(file=io.StringIO(), width=width, record=True, color_system=None)
    console.print(renderable)
    return console.export_text()


# ------------------------------------------------------------------------- why a task waits


def test_waiting_reasons_by_phase():
    accepted = TaskRecord.new("a", NOW - 5)
    assert waiting_reason(accepted, NOW) == "accepted; its chain starts at the next sync"
    assert waiting_reason(accepted, NOW, "4 instances at most") == "capacity: 4 instances at most"
    looking = TaskRecord.new("b", NOW - 5, phase="waiting_offer")
    assert waiting_reason(looking, NOW) == "looking for an offer"
    none_match = TaskRecord.new("c", NOW - 500, phase="waiting_offer", waiting_since=NOW - 150)
    assert waiting_reason(none_match, NOW) == "no offer matches the filters for 2m30s"
    retrying = TaskRecord.new(
        "d", NOW - 500, phase="retrying", attempt=2, attempt_reasons=["a", "stuck loading"]
    )
    assert waiting_reason(retrying, NOW) == (
        "attempt 2 failed (stuck loading); a new one follows on another machine"
    )
    for phase in ("creating", "loading", "running", "finishing", "destroying", "done"):
        assert waiting_reason(TaskRecord.new("e", NOW, phase=phase), NOW, "cap") is None


def test_a_reason_the_record_carries_wins():
    """A part of the agent that holds tasks back (a budget) says why on the record."""
    record = TaskRecord.new("a", NOW - 5, phase="waiting_offer", waiting_since=NOW - 5)
    record.held_by, record.waiting_for = "max_spend_per_day", "$2 a day: $0.01 left today"
    assert waiting_reason(record, NOW) == "max_spend_per_day: $2 a day: $0.01 left today"
    record.held_by = None  # a reason with no limit named (no offer matches, say)
    assert waiting_reason(record, NOW) == "$2 a day: $0.01 left today"


def test_a_create_waiting_for_its_turn_says_when_it_comes():
    waiting = TaskRecord.new("a", NOW - 5, phase="creating", create_turn_at=NOW + 150)
    renting = TaskRecord.new("b", NOW - 5, phase="creating", create_turn_at=NOW - 1)
    sent = TaskRecord.new("c", NOW - 5, phase="creating", create_sent_at=NOW - 1)
    details = {
        t["id"]: t["detail"] for t in status_document(state(waiting, renting, sent))["tasks"]
    }
    assert details == {
        "a": "in the line of creates: its turn comes in 2m30s",
        "b": "renting an instance",
        "c": "a create was sent: waiting for its instance to show",
    }


# ------------------------------------------------------------------------- spend


def test_attempt_spend_runs_until_the_record_closes():
    live = TaskRecord.new(
        "a",
        NOW - 7200,
        phase="running",
        instance_id=1,
        dph_total=0.36,
        instance_created_at=NOW - 3600,
    )
    assert attempt_spend(live, NOW) == pytest.approx(0.36)
    # Only today's part: the instance was created 50 minutes before midnight.
    assert attempt_spend(live, NOW, since=NOW - 600) == pytest.approx(0.06)
    done = TaskRecord.new(
        "b",
        NOW - 7200,
        phase="done",
        instance_id=2,
        dph_total=1.2,
        instance_created_at=NOW - 3600,
        phase_changed_at=NOW - 1800,
    )
    assert attempt_spend(done, NOW) == pytest.approx(0.6)
    assert attempt_spend(done, NOW, since=NOW - 600) == 0.0  # closed before midnight
    assert attempt_spend(TaskRecord.new("c", NOW, phase="waiting_offer"), NOW) is None


def test_spend_today_counts_from_midnight_utc():
    yesterday_to_now = TaskRecord.new(
        "a",
        NOW - 7200,
        phase="running",
        instance_id=1,
        dph_total=0.36,
        instance_created_at=NOW - 3600,
    )
    today_only = TaskRecord.new(
        "b",
        NOW - 300,
        phase="loading",
        instance_id=2,
        dph_total=0.72,
        instance_created_at=NOW - 300,
    )
    doc = status_document(state(yesterday_to_now, today_only))
    assert doc["totals"]["spend_today_usd"] == pytest.approx(0.36 * 600 / 3600 + 0.72 * 300 / 3600)
    assert [t["spend_usd"] for t in doc["tasks"]] == pytest.approx([0.36, 0.06])


# ------------------------------------------------------------------------- sync, ids


def test_a_late_sync_is_flagged():
    assert not status_document(state(last_sync=NOW - 39))["sync"]["stale"]  # 3 x 10 s + 10
    assert status_document(state(last_sync=NOW - 41))["sync"]["stale"]
    report = {"sync_interval": 0.5, "asked": 2, "max_instances": 4, "waiting": {}}
    assert status_document(state(last_sync=NOW - 12), report)["sync"]["stale"]
    assert status_document(state(last_sync=None))["sync"]["stale"]


def test_resolve_task_id():
    known = [UUID, "3f2a0000-1111", "zz"]
    assert resolve_task_id(UUID, known) == UUID
    assert resolve_task_id("3f2a9", known) == UUID
    assert resolve_task_id("3f2a", known) is None  # two match
    assert resolve_task_id("nope", known) is None


# ------------------------------------------------------------------------- the views


def test_view_shortens_ids_and_shows_why_a_task_waits():
    running = TaskRecord.new(
        UUID,
        NOW - 600,
        phase="running",
        attempt=2,
        instance_id=77,
        machine_id=5001,
        gpu_name="RTX 4090",
        dph_total=0.4,
        instance_created_at=NOW - 360,
    )
    waiting = TaskRecord.new(
        "b1c2d3e4-0000-4000-8000-000000000000",
        NOW - 100,
        phase="waiting_offer",
        waiting_since=NOW - 90,
    )
    instance = Instance.from_dict(
        {
            "id": 77,
            "label": f"ponos-0123abcd-{UUID}-2",
            "actual_status": "running",
            "intended_status": "running",
            "machine_id": 5001,
            "gpu_name": "RTX 4090",
            "dph_total": 0.4,
        }
    )
    doc = status_document(state(running, waiting, instances=[instance]))
    out = text_of(render_status(doc))
    task_line = next(line for line in out.splitlines() if "3f2a9c1e " in line)
    assert UUID not in out  # shortened to its first 8 characters, in both tables
    assert "running" in task_line and "5001" in task_line and "$0.0400" in task_line
    assert "no offer matches the filters for 90s" in out
    instance_line = next(line for line in out.splitlines() if line.startswith("│ 77 "))
    assert "3f2a9c1e" in instance_line and "running" in instance_line
    assert "Live instances: 1, spending $0.4000/h" in out
    assert "Last sync: 2s ago" in out and "late" not in out


def test_view_keeps_the_recent_finished_tasks_and_flags_a_late_sync():
    finished = [
        TaskRecord.new(
            f"t{n}", NOW - 1000 + n, phase="done", final_state="completed", reason="exit code 0"
        )
        for n in range(12)
    ]
    doc = status_document(state(*finished, last_sync=NOW - 300))
    out = text_of(render_status(doc, max_finished=3))
    assert "9 older finished task(s) not shown" in out
    shown = [line.split()[1] for line in out.splitlines() if line.startswith("│ t")]
    assert shown == ["t11", "t10", "t9"]
    assert "Last sync: 5m00s ago (late: a sync is due every 10 s)" in out


def test_task_view_lists_the_timeline_with_offsets():
    record = TaskRecord.new("t1", NOW - 60, phase="done", final_state="error", reason="gone")
    entries = [
        {"t": NOW - 60, "level": "INFO", "msg": "task accepted"},
        {"t": NOW - 15, "level": "ERROR", "msg": "no Vast.ai offer matched the filters"},
    ]
    doc = task_document("t1", state(record), entries, dropped=3)
    out = text_of(render_task(doc))
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert lines[0].split("│")[1].strip() == "2026-03-01 00:09:00.000"
    assert "45s" in lines[1] and "ERROR" in lines[1] and "no Vast.ai offer" in lines[1]
    assert "3 earlier entries dropped" in out
    assert "error: gone" in out


def test_watch_redraws_and_survives_a_failing_read():
    """Three redraws; the second read fails: the error shows above the last good view."""
    reads = iter([{"n": 1}, None, {"n": 3}])

    def read():
        doc = next(reads)
        if doc is None:
            raise ConnectionError("Redis went away")
        return doc

    seen = []

    def render(doc):
        seen.append(doc["n"])
        from rich.text import Text

        return Text(f"view {doc['n']}")

    stream = io.StringIO()
    console = Console(file=stream, force_terminal=True, width=80, color_system=None)
    watch(read, render, interval=0.01, console=console, errors=(ConnectionError,), rounds=3)
    out = stream.getvalue()
    assert seen == [1, 3]
    assert out.index("cannot read the agent's state: Redis went away") < out.index("view 3")
    assert out.index("view 1") < out.index("cannot read the agent's state")


def test_view_modules_are_pure():
    code = (
        "import sys, ponos_tasks.overview, ponos_tasks.status_view; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'celery', "
        "'requests', 'prometheus_client'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
