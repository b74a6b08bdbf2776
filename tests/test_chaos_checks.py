"""The chaos suite's plan and invariant checks (benchmarks/chaos_plan.py, chaos_checks.py):
the plan is fixed by its seed, and each check catches the violation it is meant to catch
(synthetic simulator records; no process, no network)."""

from __future__ import annotations

import uuid

from benchmarks.chaos_checks import (
    Records,
    bill,
    blocked_tasks,
    commands_run_once,
    logs_whole,
    no_secret_shown,
    nothing_left,
    one_live_instance,
    terminal_states,
)
from benchmarks.chaos_plan import LABEL_FAULTS, ChaosPlan, ChaosTask, build_plan

AGENT = "0123abcd"


def _plan(*tasks: ChaosTask, faults=None) -> ChaosPlan:
    return ChaosPlan(1, list(tasks), dict(faults or {}), [], 60.0)


def _records(plan: ChaosPlan, **kwargs) -> Records:
    ids = {t.key: str(uuid.UUID(int=i + 1)) for i, t in enumerate(plan.tasks)}
    defaults = dict(
        plan=plan, ids=ids, tasks={}, logs={}, ledger=[], events=[], instances=[], sync_interval=1
    )
    defaults.update(kwargs)
    return Records(**defaults)


def _label(task_id: str, attempt: int = 1) -> str:
    return f"ponos-{AGENT}-{task_id}-{attempt}"


def _history(*states: str, refused: tuple[str, ...] = ()) -> list[dict]:
    out = [{"to": s, "accepted": True, "source": "agent"} for s in states]
    out += [{"to": s, "accepted": False, "source": "agent"} for s in refused]
    return out


OK = ChaosTask("p1", "t1", (), "complete", 2.0)
FAIL = ChaosTask("p1", "t2", ("t1",), "fail", 2.0, exit_code=3)


def test_the_plan_is_fixed_by_its_seed_and_uses_every_fault():
    one, again, other = build_plan(7, 60), build_plan(7, 60), build_plan(8, 60)
    assert one.tasks == again.tasks and one.injections == again.injections
    assert one.label_faults == again.label_faults
    assert one.tasks != other.tasks
    assert set(one.label_faults.values()) == set(LABEL_FAULTS)
    roles = {t.role for t in one.tasks}
    assert roles == {"complete", "fail", "stop", "delete"}
    # Only leaves fail, stop or are deleted: Arkindex schedules children of completed tasks.
    for task in one.tasks:
        if task.role != "complete":
            assert not any(task.slug in t.parents for t in one.tasks if t.process == task.process)
    # The baseline is the same workload without anything injected.
    base = build_plan(7, 60, faults=False)
    assert [t.key for t in base.tasks] == [t.key for t in one.tasks]
    assert base.label_faults == {} and base.injections == []


def test_terminal_states_flags_wrong_double_refused_and_unexcused_errors():
    plan = _plan(OK, FAIL)
    rec = _records(plan)
    a, b = rec.ids[OK.key], rec.ids[FAIL.key]
    rec.tasks = {
        a: {"state": "completed", "history": _history("running", "completed")},
        b: {"state": "failed", "history": _history("running", "failed")},
    }
    assert terminal_states(rec).holds
    rec.tasks[b] = {"state": "error", "history": _history("running", "error")}
    assert not terminal_states(rec).holds
    rec.tasks[b] = {
        "state": "failed",
        "history": _history("running", "failed", refused=("failed",)),
    }
    assert "refused" in terminal_states(rec).problems[0]
    rec.tasks[b] = {"state": "failed", "history": _history("running", "error", "failed")}
    assert "2 terminal states" in terminal_states(rec).problems[0]


def test_an_error_is_excused_only_by_a_fault_aimed_at_that_task():
    plan = _plan(OK, faults={OK.key: "offline"})
    rec = _records(plan)
    rec.tasks = {rec.ids[OK.key]: {"state": "error", "history": _history("running", "error")}}
    verdict = terminal_states(rec)
    assert verdict.holds and "1 excused" in verdict.figure
    rec.plan = _plan(OK, faults={OK.key: "read_lag"})
    assert not terminal_states(rec).holds


def test_children_of_a_task_that_did_not_complete_stay_unscheduled():
    child = ChaosTask("p1", "t3", ("t2",), "complete", 1.0)
    plan = _plan(OK, FAIL, child)
    assert blocked_tasks(plan, {FAIL.key: "failed"}) == {child.key}
    assert blocked_tasks(plan, {FAIL.key: "running"}) == set()


def test_one_live_instance_sees_overlap_not_succession():
    plan = _plan(OK)
    rec = _records(plan)
    tid = rec.ids[OK.key]

    def events(first_end, second_start):
        return [
            {"t": 0.0, "event": "created", "label": _label(tid, 1)},
            {"t": first_end, "event": "destroyed", "label": _label(tid, 1)},
            {"t": second_start, "event": "created", "label": _label(tid, 2)},
            {"t": 90.0, "event": "destroyed", "label": _label(tid, 2)},
        ]

    rec.events = events(50.0, 50.0)
    assert one_live_instance(rec).holds
    rec.events = events(50.0, 40.0)
    assert not one_live_instance(rec).holds


def test_a_command_run_twice_needs_a_fault_that_cut_it():
    plan = _plan(OK)
    rec = _records(plan)
    tid = rec.ids[OK.key]
    rec.instances = [
        {"label": _label(tid, 1), "runs": 1, "faults": []},
        {"label": _label(tid, 2), "runs": 1, "faults": []},
    ]
    assert not commands_run_once(rec).holds
    rec.instances[0]["faults"] = ["unexpected_exit"]
    assert commands_run_once(rec).holds


def test_nothing_left_and_drained_in_time():
    plan = _plan(OK)
    rec = _records(plan, drained_after=1.5)
    rec.ledger = [{"label": _label(rec.ids[OK.key]), "destroyed_at": 10.0, "cost": 0.1}]
    assert nothing_left(rec).holds
    rec.drained_after = 2.5
    assert not nothing_left(rec).holds
    rec.drained_after, rec.ledger[0]["destroyed_at"] = 1.0, None
    assert "never destroyed" in nothing_left(rec).problems[0]
    rec.ledger[0]["destroyed_at"], rec.deleted_destroyed_after = 10.0, 9.0
    assert nothing_left(rec).holds  # a deletion is seen at a periodic upload (5 s here)
    rec.deleted_destroyed_after = 11.0
    assert not nothing_left(rec).holds  # more than two logs intervals
    rec.deleted_excused = 1.5  # e.g. Arkindex down or no worker alive for 1.5 s of it
    assert nothing_left(rec).holds


def test_logs_whole_needs_the_marker_and_both_ends_of_the_output():
    plan = _plan(OK, FAIL)
    rec = _records(plan)
    a, b = rec.ids[OK.key], rec.ids[FAIL.key]
    rec.tasks = {a: {"state": "completed"}, b: {"state": "failed"}}
    rec.logs = {
        a: "[agent] started\nt1: starting\nt1: done\nPONOS_EXIT_CODE=0 nonce\n",
        b: "t2: starting\nt2: giving up\nPONOS_EXIT_CODE=3 nonce\n",
    }
    assert logs_whole(rec).holds
    rec.logs[b] = "t2: starting\nt2: giving up\nPONOS_EXIT_CODE=31 nonce\n"
    assert not logs_whole(rec).holds  # the marker must carry the task's own code
    rec.logs[b] = "t2: starting\n"  # a periodic upload replaced the final one
    assert not logs_whole(rec).holds


def test_no_secret_shown_finds_values_and_url_signatures():
    rec = _records(_plan(OK), secrets={"seed": "s33d-value-123"})
    rec.places = {"published logs": "nothing here"}
    assert no_secret_shown(rec).holds
    rec.places["broker messages"] = "... s33d-value-123 ..."
    rec.places["Flower pages"] = "http://s3/x?X-Amz-Signature=" + "ab" * 32
    problems = no_secret_shown(rec).problems
    assert len(problems) == 2 and "seed shown in broker messages" in problems


def test_bill_breaks_the_difference_down_and_holds_gpu_time_to_the_fault_free_run():
    plan = _plan(OK)
    tid = str(uuid.UUID(int=1))

    def row(iid, attempt, gpu_s, rate, st_s=100.0):
        cost = gpu_s / 3600 * rate + st_s / 3600 * 0.01
        return {
            "id": iid,
            "label": _label(tid, attempt),
            "gpu_seconds": gpu_s,
            "gpu_cost": gpu_s / 3600 * rate,
            "storage_seconds": st_s,
            "storage_cost": st_s / 3600 * 0.01,
            "cost": cost,
        }

    base = row(1, 1, 3600.0, 0.20)
    rec = _records(plan, baseline_bill=base["cost"], baseline_finals={OK.key: base})
    # A failed start (the fault's own cost), then the same GPU time on a dearer machine.
    rec.ledger = [row(5, 1, 0.0, 0.30, st_s=50.0), row(6, 2, 3600.0, 0.30)]
    verdict = bill(rec)
    assert verdict.holds, verdict.figure
    assert "+0.1000 price" in verdict.figure and "+0.0000 GPU time" in verdict.figure
    # The final instance ran an hour longer than without faults: money the agent wasted.
    rec.ledger = [row(6, 1, 7200.0, 0.20)]
    verdict = bill(rec)
    assert not verdict.holds and "GPU time beyond the fault-free run" in verdict.problems[0]


def test_an_unreadable_log_excuses_error_only_when_log_faults_were_injected():
    from benchmarks.chaos_plan import Injection

    plan = _plan(OK)
    rec = _records(plan)
    tid = rec.ids[OK.key]
    rec.tasks = {tid: {"state": "error", "history": _history("running", "error")}}
    rec.logs = {
        tid: "task ended: error (instance stopped, and its log could not be read within 30 s)"
    }
    assert not terminal_states(rec).holds  # no fault on Vast.ai's logs: not excused
    plan.injections.append(Injection(10.0, "vast_5xx", {"endpoint": "logs", "times": 6}))
    verdict = terminal_states(rec)
    assert verdict.holds and "1 excused" in verdict.figure
