"""plan(): table-driven cases of desired state (records, actions) vs actual state (instances)."""

import random
import subprocess
import sys
from dataclasses import replace

import pytest

from ponos_tasks.lifecycle import make_label
from ponos_tasks.models import Instance, TaskRecord
from ponos_tasks.reconcile import (
    ABANDONED_ATTEMPT,
    DUPLICATE,
    ORPHAN,
    STALE_ATTEMPT,
    AcceptTask,
    AdoptInstance,
    DestroyInstance,
    ResumeStep,
    StartChain,
    StopTask,
    WaitForCapacity,
    plan,
    step_for,
    watch_decision,
)
from ponos_tasks.reconcile import WatchAction as A
from tests.settings_helper import settings_with

AGENT = "1f2e3d4c"
OTHER_AGENT = "99999999"
NOW = 10_000.0
T1 = "11111111-1111-4111-8111-111111111111"
T2 = "22222222-2222-4222-8222-222222222222"
T3 = "33333333-3333-4333-8333-333333333333"
T4 = "44444444-4444-4444-8444-444444444444"
SETTINGS = settings_with(max_instances=4, heartbeat_stale=100.0)

RUNNING = {
    "actual_status": "running",
    "intended_status": "running",
    "cur_state": "running",
    "next_state": "running",
}


def inst(task_id, attempt, instance_id, agent=AGENT, **status):
    fields = dict(RUNNING)
    fields.update(status)
    return Instance.from_dict(
        {"id": instance_id, "label": make_label(agent, task_id, attempt), **fields}
    )


def rec(task_id, phase, attempt=1, *, age=10.0, **values):
    """A record whose last progress was `age` seconds before NOW."""
    return TaskRecord(
        task_id=task_id,
        phase=phase,
        attempt=attempt,
        accepted_at=NOW - 1000,
        phase_changed_at=NOW - age,
        **values,
    )


def run(records=(), instances=(), actions=(), settings=SETTINGS, now=NOW):
    return plan(
        now=now,
        agent_short_id=AGENT,
        records={r.task_id: r for r in records},
        instances=list(instances),
        actions=list(actions),
        settings=settings,
    )


def kinds(steps):
    return [(type(s).__name__, getattr(s, "task_id", None)) for s in steps]


# ---------------------------------------------------------------------------- new tasks


def test_new_task_is_accepted_then_started():
    steps = run(actions=[("start_task", T1)])
    assert steps == [AcceptTask(T1, "new start_task"), StartChain(T1, "capacity slot free (1/4)")]


def test_repeated_start_of_a_known_task_does_nothing():
    assert run([rec(T1, "waiting_offer")], actions=[("start_task", T1)]) == []
    assert run([rec(T1, "running")], [inst(T1, 1, 5)], [("start_task", T1)]) == []


def test_start_of_a_finished_task_does_nothing():
    assert run([rec(T1, "done", final_state="completed")], actions=[("start_task", T1)]) == []


def test_duplicate_actions_give_one_step_each():
    steps = run(
        actions=[("start_task", T1), ("start_task", T1), ("stop_task", T2), ("stop_task", T2)]
    )
    assert kinds(steps) == [("StopTask", T2), ("AcceptTask", T1), ("StartChain", T1)]


# ---------------------------------------------------------------------------- stalled chains


@pytest.mark.parametrize(
    "phase,extra,with_instance,step",
    [
        ("waiting_offer", {}, False, "choose_offer"),
        ("creating", {}, False, "create_instance"),
        ("creating", {}, True, "create_instance"),  # the create step adopts it through its label
        ("loading", {"instance_id": 7}, True, "watch"),
        ("running", {"instance_id": 7}, True, "watch"),
        ("running", {"instance_id": 7}, False, "watch"),  # the watch sees it gone
        ("finishing", {"instance_id": 7, "final_state": "completed"}, True, "publish_logs"),
        # The final state is reported before the instance is destroyed.
        ("destroying", {"instance_id": 7}, True, "report_state"),
        ("destroying", {"instance_id": 7, "final_reported": True}, True, "destroy_instance"),
        ("retrying", {"instance_id": 7}, False, "retry_attempt"),
    ],
)
def test_stalled_chain_resumes_the_missing_step(phase, extra, with_instance, step):
    instances = [inst(T1, 1, 7)] if with_instance else []
    fresh = run([rec(T1, phase, age=99.0, **extra)], instances)
    assert fresh == []
    stalled = run([rec(T1, phase, age=101.0, **extra)], instances)
    assert len(stalled) == 1
    resume = stalled[0]
    assert isinstance(resume, ResumeStep)
    assert (resume.task_id, resume.step, resume.phase, resume.attempt) == (T1, step, phase, 1)
    assert "101s" in resume.reason
    assert resume.key == f"resume:{T1}:{step}:1"


def test_heartbeat_counts_as_progress():
    record = rec(T1, "running", age=5000.0, instance_id=7, heartbeat_at=NOW - 50)
    assert run([record], [inst(T1, 1, 7)]) == []


def test_creating_has_its_own_staleness():
    settings = settings_with(heartbeat_stale=100.0, creating_stale=300.0)
    assert run([rec(T1, "creating", age=200.0)], settings=settings) == []
    assert kinds(run([rec(T1, "creating", age=301.0)], settings=settings)) == [("ResumeStep", T1)]


def test_running_has_its_own_staleness():
    """A running task's watch looks every running_watch_interval: a heartbeat older than a
    loading task's staleness is not yet a stalled chain (no resume, no extra chain)."""
    settings = settings_with(heartbeat_stale=100.0).but(running_stale=300.0)
    running = rec(T1, "running", age=5000.0, instance_id=7, heartbeat_at=NOW - 200)
    assert run([running], [inst(T1, 1, 7)], settings=settings) == []
    loading = rec(T1, "loading", age=5000.0, instance_id=7, heartbeat_at=NOW - 200)
    assert kinds(run([loading], [inst(T1, 1, 7)], settings=settings)) == [("ResumeStep", T1)]
    stalled = rec(T1, "running", age=5000.0, instance_id=7, heartbeat_at=NOW - 301)
    assert kinds(run([stalled], [inst(T1, 1, 7)], settings=settings)) == [("ResumeStep", T1)]


def test_step_for_accepted_and_done_is_none():
    assert step_for(rec(T1, "accepted")) is None
    assert step_for(rec(T1, "done")) is None


# ---------------------------------------------------------------------------- sweeping


def test_orphan_of_a_done_task_is_destroyed():
    steps = run([rec(T1, "done", final_state="failed")], [inst(T1, 1, 7)])
    assert steps == [
        DestroyInstance(7, make_label(AGENT, T1, 1), T1, ORPHAN, "task is done (failed)")
    ]


def test_stale_attempt_is_destroyed_current_kept():
    steps = run([rec(T1, "running", attempt=2, instance_id=8)], [inst(T1, 1, 7), inst(T1, 2, 8)])
    assert len(steps) == 1
    assert isinstance(steps[0], DestroyInstance)
    assert (steps[0].instance_id, steps[0].cause) == (7, STALE_ATTEMPT)
    assert "attempt 1, record at attempt 2" in steps[0].reason


def test_duplicate_keeps_the_recorded_instance():
    steps = run(
        [rec(T1, "loading", instance_id=11)], [inst(T1, 1, 10), inst(T1, 1, 11), inst(T1, 1, 12)]
    )
    assert [(s.instance_id, s.cause) for s in steps] == [(10, DUPLICATE), (12, DUPLICATE)]
    assert all("instance 11" in s.reason for s in steps)


def test_duplicate_while_creating_keeps_the_oldest():
    steps = run([rec(T1, "creating")], [inst(T1, 1, 21), inst(T1, 1, 20)])
    assert [(s.instance_id, s.cause) for s in steps] == [(21, DUPLICATE)]


def test_abandoned_attempt_is_destroyed():
    # e.g. a create answered success:false but left a stopped contract behind
    steps = run(
        [rec(T1, "waiting_offer")],
        [inst(T1, 1, 7, actual_status="created", intended_status="stopped")],
    )
    assert [(s.instance_id, s.cause) for s in steps] == [(7, ABANDONED_ATTEMPT)]


def test_instances_being_destroyed_are_left_alone():
    gone = inst(T1, 1, 7, next_state="unloaded")
    assert run([rec(T1, "done")], [gone]) == []
    assert run(instances=[gone]) == []


def test_foreign_instances_are_never_touched_nor_counted():
    foreign = [
        inst(T1, 1, 1, agent=OTHER_AGENT),
        *(
            Instance.from_dict(row)
            for row in (
                {"id": 2, "label": None, **RUNNING},
                {"id": 3, **RUNNING},
                {"id": 4, "label": f"skypilot-{T1}-head", **RUNNING},
                {"id": 5, "label": f"ponos-{AGENT}-{T1}-x", **RUNNING},
                {"id": 6, "label": "garbage", **RUNNING},
            )
        ),
    ]
    assert run([rec(T1, "done")], foreign) == []
    steps = run(
        instances=foreign, actions=[("start_task", T3)], settings=settings_with(max_instances=1)
    )
    assert kinds(steps) == [("AcceptTask", T3), ("StartChain", T3)]


# ---------------------------------------------------------------------------- stops


def test_stop_of_a_running_task():
    steps = run(
        [rec(T1, "running", age=500.0, instance_id=7)], [inst(T1, 1, 7)], [("stop_task", T1)]
    )
    assert steps == [StopTask(T1, True, "stop_task while running")]  # no resume of the watch


def test_stop_of_a_waiting_task_and_of_an_accepted_one():
    steps = run(
        [rec(T1, "waiting_offer"), rec(T2, "accepted")],
        actions=[("stop_task", T1), ("stop_task", T2)],
    )
    assert kinds(steps) == [("StopTask", T1), ("StopTask", T2)]  # no StartChain for T2


def test_stop_of_a_task_we_never_saw():
    assert run(actions=[("stop_task", T1)]) == [
        StopTask(T1, False, "stop_task for a task without a record")
    ]
    # start and stop together: the stop wins
    assert kinds(run(actions=[("start_task", T1), ("stop_task", T1)])) == [("StopTask", T1)]


def test_stop_of_an_unrecorded_task_with_an_instance_adopts_it_to_read_its_log():
    """Its instance is not destroyed unread: adopted, then stopped through the chain (which
    publishes its log and destroys it); older attempts still go at once."""
    steps = run(instances=[inst(T1, 1, 6), inst(T1, 2, 7)], actions=[("stop_task", T1)])
    assert kinds(steps) == [("DestroyInstance", T1), ("AdoptInstance", T1)]
    assert steps[0].instance_id == 6 and steps[0].cause == STALE_ATTEMPT
    assert steps[1].instance_id == 7 and steps[1].from_phase is None


def test_stop_already_handled_is_not_repeated():
    record = rec(T1, "finishing", instance_id=7, stop_requested=True, final_state="stopped")
    assert run([record], [inst(T1, 1, 7)], [("stop_task", T1)]) == []


def test_stop_finishing_task_sets_stopped():
    record = rec(T1, "finishing", instance_id=7, final_state="completed")
    assert kinds(run([record], [inst(T1, 1, 7)], [("stop_task", T1)])) == [("StopTask", T1)]


def test_stop_requested_but_phase_not_moved_is_asked_again():
    # the StopTask's CAS lost a race; Arkindex no longer repeats the action
    record = rec(T1, "running", instance_id=7, stop_requested=True)
    assert kinds(run([record], [inst(T1, 1, 7)])) == [("StopTask", T1)]


def test_stop_of_a_done_task_does_nothing():
    assert run([rec(T1, "done", final_state="completed")], actions=[("stop_task", T1)]) == []


# ---------------------------------------------------------------------------- capacity


def test_capacity_limit_keeps_tasks_accepted():
    settings = settings_with(max_instances=2, heartbeat_stale=100.0)
    records = [rec(T1, "running", instance_id=7)]
    steps = run(
        records,
        [inst(T1, 1, 7)],
        [("start_task", T2), ("start_task", T3), ("start_task", T4)],
        settings,
    )
    assert kinds(steps) == [
        ("AcceptTask", T2),
        ("AcceptTask", T3),
        ("AcceptTask", T4),
        ("StartChain", T2),
        ("WaitForCapacity", T3),
        ("WaitForCapacity", T4),
    ]
    assert "position 1" in steps[4].reason and "position 2" in steps[5].reason


def test_older_accepted_tasks_start_first():
    settings = settings_with(max_instances=1)
    old = TaskRecord(
        task_id=T3, phase="accepted", accepted_at=NOW - 500, phase_changed_at=NOW - 500
    )
    newer = TaskRecord(
        task_id=T2, phase="accepted", accepted_at=NOW - 100, phase_changed_at=NOW - 100
    )
    steps = run([newer, old], actions=[("start_task", T1)], settings=settings)
    assert kinds(steps) == [
        ("AcceptTask", T1),
        ("StartChain", T3),
        ("WaitForCapacity", T2),
        ("WaitForCapacity", T1),
    ]


@pytest.mark.parametrize(
    "records,instances,free",
    [
        ([], [], 3),
        ([rec(T1, "waiting_offer")], [], 2),
        ([rec(T1, "creating")], [], 2),
        ([rec(T1, "creating")], [inst(T1, 1, 7)], 2),  # record and its instance count once
        ([rec(T1, "retrying")], [inst(T1, 1, 7)], 2),
        ([rec(T1, "finishing")], [inst(T1, 1, 7)], 2),  # still billed until destroyed
        ([rec(T1, "finishing")], [], 3),
        ([rec(T1, "done")], [inst(T1, 1, 7)], 2),  # an orphan being destroyed still counts
        ([rec(T1, "running", attempt=2)], [inst(T1, 1, 6), inst(T1, 2, 7)], 1),
        ([rec(T1, "running"), rec(T2, "loading"), rec(T4, "creating")], [], 0),
    ],
)
def test_capacity_counts_live_instances_and_slot_records(records, instances, free):
    settings = settings_with(max_instances=3)
    waiting = [
        TaskRecord(
            task_id=f"{i:08d}-aaaa-4aaa-8aaa-aaaaaaaaaaaa",
            phase="accepted",
            accepted_at=NOW - i,
            phase_changed_at=NOW - i,
        )
        for i in range(5)
    ]
    steps = run(records + waiting, instances, settings=settings)
    assert sum(isinstance(s, StartChain) for s in steps) == free
    assert sum(isinstance(s, WaitForCapacity) for s in steps) == 5 - free


# ---------------------------------------------------------------------------- adoption


def test_adoption_after_memory_loss():
    steps = run(instances=[inst(T1, 2, 7)])
    assert steps == [
        AdoptInstance(
            T1,
            7,
            2,
            make_label(AGENT, T1, 2),
            None,
            None,
            "instance of ours without a record (memory lost?)",
        )
    ]


def test_adoption_keeps_newest_attempt_and_destroys_the_rest():
    steps = run(
        instances=[inst(T1, 1, 5), inst(T1, 2, 9), inst(T1, 2, 8)], actions=[("start_task", T1)]
    )  # no AcceptTask: the instance is the task
    assert kinds(steps) == [("DestroyInstance", T1), ("DestroyInstance", T1), ("AdoptInstance", T1)]
    adopt = steps[2]
    assert (adopt.instance_id, adopt.attempt) == (8, 2)
    assert {(s.instance_id, s.cause) for s in steps[:2]} == {(5, STALE_ATTEMPT), (9, DUPLICATE)}


def test_adoption_when_the_record_is_behind_its_instance():
    steps = run([rec(T1, "waiting_offer", attempt=1)], [inst(T1, 2, 7)])
    assert steps == [
        AdoptInstance(
            T1,
            7,
            2,
            make_label(AGENT, T1, 2),
            "waiting_offer",
            1,
            "instance attempt 2 ahead of record attempt 1 (waiting_offer)",
        )
    ]


def test_instance_ahead_of_a_running_record_is_stale():
    steps = run([rec(T1, "running", attempt=1, instance_id=6)], [inst(T1, 1, 6), inst(T1, 2, 7)])
    assert [(s.instance_id, s.cause) for s in steps] == [(7, STALE_ATTEMPT)]


# ---------------------------------------------------------------------------- determinism


def _random_world(rng):
    tasks = [f"{i:08x}-0000-4000-8000-000000000000" for i in range(12)]
    phases = [
        "accepted",
        "waiting_offer",
        "creating",
        "loading",
        "running",
        "finishing",
        "destroying",
        "done",
        "retrying",
    ]
    records, instances, actions = [], [], []
    next_id = 100
    for task in tasks:
        if rng.random() < 0.7:
            records.append(
                rec(
                    task,
                    rng.choice(phases),
                    attempt=rng.randint(0, 3),
                    age=rng.choice([5.0, 500.0]),
                    stop_requested=rng.random() < 0.2,
                    instance_id=rng.choice([None, next_id]),
                )
            )
        for _ in range(rng.randint(0, 3)):
            agent = AGENT if rng.random() < 0.8 else OTHER_AGENT
            status = rng.choice(
                [
                    RUNNING,
                    {"actual_status": "loading"},
                    {"actual_status": "exited", "intended_status": "stopped"},
                    {"next_state": "unloaded"},
                ]
            )
            instances.append(inst(task, rng.randint(1, 3), next_id, agent, **status))
            next_id += 1
        if rng.random() < 0.4:
            actions.append((rng.choice(["start_task", "stop_task"]), task))
    return records, instances, actions


@pytest.mark.parametrize("seed", range(30))
def test_plan_is_idempotent_deterministic_and_safe(seed):
    rng = random.Random(seed)
    records, instances, actions = _random_world(rng)
    settings = settings_with(max_instances=rng.randint(1, 6), heartbeat_stale=100.0)
    first = run(records, instances, actions, settings)
    assert run(records, instances, actions, settings) == first
    shuffled = instances[:]
    rng.shuffle(shuffled)
    assert run(list(reversed(records)), shuffled, actions, settings) == first
    # never touches what is not ours, never destroys one instance twice
    ours = {i.id for i in instances if i.label.split("-")[1] == AGENT}
    destroyed = [s.instance_id for s in first if isinstance(s, DestroyInstance)]
    assert set(destroyed) <= ours and len(destroyed) == len(set(destroyed))
    adopted = [s.instance_id for s in first if isinstance(s, AdoptInstance)]
    assert not set(adopted) & set(destroyed)
    # never starts a chain while our live instances already fill the capacity
    live = [i for i in instances if i.id in ours and i.next_state != "unloaded"]
    if len(live) >= settings.max_instances:
        assert not any(isinstance(s, StartChain) for s in first)
    # every step explains itself and has a de-duplication key
    assert all(s.reason and s.key for s in first)
    keys = [s.key for s in first]
    assert len(keys) == len(set(keys))
    # at most one step per (task, kind) except destroys
    per_task = [(type(s).__name__, s.task_id) for s in first if not isinstance(s, DestroyInstance)]
    assert len(per_task) == len(set(per_task))


# ---------------------------------------------------------------------------- watch_decision

WATCH_SETTINGS = settings_with(loading_deadline=900.0, max_attempts=3, offline_grace=300.0)
STOPPED_FIELDS = {"actual_status": "exited", "intended_status": "stopped", "cur_state": "stopped"}
EXITED_FIELDS = {"actual_status": "exited", "intended_status": "running", "cur_state": "running"}


def watch(record, fields, **kwargs):
    instance = None if fields is None else Instance.from_dict({"id": 7, **fields})
    return watch_decision(record, instance, NOW, WATCH_SETTINGS, **kwargs)


def test_watch_loading_then_running():
    loading = rec(T1, "loading", age=100.0, instance_id=7)
    assert (
        watch(loading, {"actual_status": "loading", "intended_status": "running"}).action == A.WAIT
    )
    assert watch(loading, RUNNING).action == A.MARK_RUNNING
    running = rec(T1, "running", instance_id=7, running_since=NOW - 50)
    assert watch(running, RUNNING).action == A.WAIT


def test_watch_end_reads_logs_then_finishes_from_the_marker():
    running = rec(T1, "running", instance_id=7, running_since=NOW - 500)
    first = watch(running, STOPPED_FIELDS)
    assert first.action == A.READ_LOGS
    done = watch(running, STOPPED_FIELDS, logs_read=True, exit_code=0)
    assert (done.action, done.outcome.state) == (A.FINISH, "completed")
    failed = watch(running, STOPPED_FIELDS, logs_read=True, exit_code=3)
    assert failed.outcome.state == "failed"
    unknown = watch(running, STOPPED_FIELDS, logs_read=True)
    assert (unknown.action, unknown.outcome.state) == (A.FINISH, "error")
    lost = watch(running, None)
    assert (lost.action, lost.outcome.state) == (A.FINISH, "error")


def test_watch_inferred_outcome_for_unwrapped_images():
    running = rec(T1, "running", instance_id=7, running_since=NOW - 500, inferred=True)
    ok = watch(running, STOPPED_FIELDS, logs_read=True, log_tail="done\n")
    assert ok.outcome.state == "completed" and "inferred" in ok.outcome.reason
    crash = watch(
        running,
        STOPPED_FIELDS,
        logs_read=True,
        log_tail='Traceback (most recent call last):\n  File "x"\nOSError: disk\n',
    )
    assert crash.outcome.state == "failed"


@pytest.mark.parametrize(
    "record,fields,expected",
    [
        (rec(T1, "loading", age=901.0, instance_id=7), {"actual_status": "loading"}, "stuck"),
        (
            rec(T1, "loading", instance_id=7),
            {"actual_status": "created", "status_msg": "OCI runtime create failed: x"},
            "OCI",
        ),
        (rec(T1, "loading", instance_id=7), None, "disappeared"),
        (rec(T1, "running", instance_id=7, running_since=NOW - 10), EXITED_FIELDS, "exited"),
        (
            rec(T1, "running", instance_id=7, offline_since=NOW - 301),
            {"actual_status": "offline"},
            "offline",
        ),
    ],
)
def test_watch_start_failures_retry_then_give_up(record, fields, expected):
    logs_read = fields is not None and fields.get("actual_status") in ("exited", "created")
    decision = watch(record, fields, logs_read=logs_read)
    assert decision.action == A.RETRY_ATTEMPT and expected in decision.reason
    last = replace(record, attempt=3)
    decision = watch(last, fields, logs_read=logs_read)
    assert decision.action == A.GIVE_UP
    assert decision.outcome.state == "error" and "3 attempt(s)" in decision.outcome.reason


def test_watch_tracks_offline_since():
    running = rec(T1, "running", instance_id=7, running_since=NOW - 1000)
    first = watch(running, {"actual_status": "offline"})
    assert (first.action, first.offline_since) == (A.WAIT, NOW)
    still = watch(replace(running, offline_since=NOW - 100), {"actual_status": "offline"})
    assert (still.action, still.offline_since) == (A.WAIT, NOW - 100)
    back = watch(replace(running, offline_since=NOW - 100), RUNNING)
    assert (back.action, back.offline_since) == (A.WAIT, None)


def test_watch_snapshot_older_than_the_instance_waits():
    loading = rec(T1, "loading", instance_id=7, instance_created_at=NOW - 5)
    assert watch(loading, None, snapshot_taken_at=NOW - 10).action == A.WAIT
    # Vast.ai's reads lag a create: a new instance not listed yet is not gone...
    assert watch(loading, None, snapshot_taken_at=NOW - 1).action == A.WAIT
    # ...until the visibility grace has passed (the watch step then also asks by id).
    grace = WATCH_SETTINGS.visibility_grace
    old = rec(T1, "loading", instance_id=7, instance_created_at=NOW - grace - 1)
    assert watch(old, None, snapshot_taken_at=NOW - 1).action == A.RETRY_ATTEMPT


def test_watch_marker_or_stop_finishes_at_once():
    running = rec(T1, "running", instance_id=7, running_since=NOW - 100, exit_code=0)
    assert watch(running, RUNNING).outcome.state == "completed"
    stopping = rec(T1, "running", instance_id=7, stop_requested=True)
    assert watch(stopping, RUNNING).outcome.state == "stopped"


def test_pure_modules_import_no_redis_celery_or_requests():
    code = (
        "import sys, ponos_tasks.reconcile, ponos_tasks.lifecycle; "
        "print(sorted({m.split('.')[0] for m in sys.modules} & {'redis', 'celery', "
        "'requests'}))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True
    ).stdout
    assert out.strip() == "[]"
