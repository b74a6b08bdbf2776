"""Pure lifecycle rules: labels, phase table, instance conditions, outcomes, start failures."""

import uuid
from dataclasses import replace

import pytest

from ponos_tasks.lifecycle import (
    TRANSITIONS,
    Condition,
    LabelInfo,
    Outcome,
    Phase,
    StartFailureKind,
    TransitionError,
    agent_short_id,
    check_transition,
    classify_instance,
    ends_with_traceback,
    final_state,
    make_label,
    next_attempt_allowed,
    offer_wait_expired,
    parse_label,
    start_failure,
    start_failure_kind,
)
from ponos_tasks.models import Instance, TaskRecord

AGENT = "1f2e3d4c"
TASK = "8c1d2f7e-0a4b-4c3d-9e8f-123456789abc"


# ---------------------------------------------------------------------------- labels


def test_label_round_trip():
    label = make_label(AGENT, TASK, 3)
    assert label == f"ponos-1f2e3d4c-{TASK}-3"
    assert parse_label(label) == LabelInfo(AGENT, TASK, 3)
    assert parse_label(f"  {label}\n") == LabelInfo(AGENT, TASK, 3)


def test_label_attempts_above_nine_and_random_uuids():
    for attempt in (1, 9, 10, 123):
        task = str(uuid.uuid4())
        assert parse_label(make_label(AGENT, task, attempt)) == LabelInfo(AGENT, task, attempt)


@pytest.mark.parametrize(
    "label",
    [
        None,
        "",
        "   ",
        42,
        "ponos",
        "ponos-1f2e3d4c",
        f"ponos-1f2e3d4c-{TASK}",
        f"ponos-1f2e3d4c-{TASK}-",
        f"ponos-1f2e3d4c-{TASK}-x",
        f"ponos-1f2e3d4-{TASK}-1",
        f"ponos-1f2e3d4g-{TASK}-1",
        f"skypilot-1f2e3d4c-{TASK}-1",
        f"ponos-1f2e3d4c-{TASK}-0",
        f"xponos-1f2e3d4c-{TASK}-1",
        "ponos-1f2e3d4c--1",
        "dstack-proj-job-abcdefgh",
    ],
)
def test_parse_label_rejects_foreign_and_garbage(label):
    assert parse_label(label) is None


def test_agent_short_id():
    agent_id = "1F2E3D4C-5b6a-4c3d-9e8f-0123456789ab"
    assert agent_short_id(agent_id) == "1f2e3d4c"
    with pytest.raises(ValueError):
        agent_short_id("xyz")


def test_make_label_refuses_bad_parts():
    with pytest.raises(ValueError):
        make_label("short", TASK, 1)
    with pytest.raises(ValueError):
        make_label(AGENT, TASK, 0)
    with pytest.raises(ValueError):
        make_label(AGENT, "bad id with spaces", 1)


# ---------------------------------------------------------------------------- phases


def test_happy_path_and_retry_transitions_allowed():
    path = [
        "accepted",
        "waiting_offer",
        "creating",
        "loading",
        "running",
        "finishing",
        "destroying",
        "done",
    ]
    for src, dst in zip(path, path[1:], strict=False):
        check_transition(src, dst)
    for src, dst in [
        ("loading", "retrying"),
        ("retrying", "creating"),
        ("creating", "creating"),
        ("retrying", "finishing"),
        ("accepted", "finishing"),
        ("creating", "running"),
        ("loading", "finishing"),
    ]:
        check_transition(src, dst)


@pytest.mark.parametrize(
    "src,dst",
    [
        ("done", "accepted"),
        ("done", "done"),
        ("finishing", "running"),
        ("destroying", "creating"),
        ("running", "loading"),
        ("accepted", "running"),
        ("accepted", "done"),
        ("bogus", "done"),
        ("running", "bogus"),
    ],
)
def test_forbidden_transitions(src, dst):
    with pytest.raises(TransitionError):
        check_transition(src, dst)


def test_every_phase_reaches_done():
    for phase in Phase:
        seen, todo = {phase}, [phase]
        while todo:
            for nxt in TRANSITIONS[todo.pop()]:
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert Phase.DONE in seen, phase


# ---------------------------------------------------------------------------- conditions

OCI = (
    "Error response from daemon: failed to create task for container: failed to create "
    "shim task: OCI runtime create failed: runc create failed"
)


@pytest.mark.parametrize(
    "fields,expected",
    [
        (None, Condition.GONE),
        ({}, Condition.PROVISIONING),
        ({"actual_status": None, "intended_status": "running"}, Condition.PROVISIONING),
        ({"actual_status": "created", "intended_status": "running"}, Condition.PROVISIONING),
        ({"actual_status": "loading", "intended_status": "running"}, Condition.LOADING),
        ({"actual_status": "LOADING ", "intended_status": "running"}, Condition.LOADING),
        (
            {
                "actual_status": "running",
                "intended_status": "running",
                "status_msg": "success, running img/ssh",
            },
            Condition.RUNNING,
        ),
        ({"actual_status": "running", "intended_status": "stopped"}, Condition.RUNNING),
        # normal stop (by itself, by us, outbid)
        (
            {"actual_status": "exited", "intended_status": "stopped", "cur_state": "stopped"},
            Condition.STOPPED,
        ),
        ({"actual_status": "stopped", "intended_status": "stopped"}, Condition.STOPPED),
        (
            {
                "actual_status": "exited",
                "intended_status": "stopped",
                "cur_state": "stopped",
                "next_state": "stopped",
                "status_msg": "success, running x",
            },
            Condition.STOPPED,
        ),
        # created stopped / create-start race
        (
            {"actual_status": "created", "intended_status": "stopped", "cur_state": "stopped"},
            Condition.STOPPED,
        ),
        (
            {"actual_status": "loading", "intended_status": "stopped", "cur_state": "stopped"},
            Condition.STOPPED,
        ),
        # container ended without stopping its instance
        (
            {"actual_status": "exited", "intended_status": "running", "cur_state": "running"},
            Condition.EXITED,
        ),
        # abandoned start (dstack's fatal case)
        (
            {
                "actual_status": "created",
                "intended_status": "stopped",
                "cur_state": "stopped",
                "next_state": "stopped",
                "status_msg": OCI,
            },
            Condition.START_FAILED,
        ),
        (
            {
                "actual_status": "loading",
                "status_msg": "pull access denied for x, repository does not "
                "exist: Permission Denied",
            },
            Condition.START_FAILED,
        ),
        ({"actual_status": "offline", "intended_status": "running"}, Condition.OFFLINE),
        ({"actual_status": "offline", "intended_status": "stopped"}, Condition.OFFLINE),
        ({"actual_status": "unknown"}, Condition.OFFLINE),
        (
            {"actual_status": "running", "cur_state": "unloaded", "next_state": "unloaded"},
            Condition.GONE,
        ),
        ({"actual_status": "exited", "next_state": "unloaded"}, Condition.GONE),
        ({"actual_status": "hibernating", "intended_status": "running"}, Condition.UNKNOWN),
        ({"actual_status": 17, "intended_status": ["x"]}, Condition.UNKNOWN),
    ],
)
def test_classify_instance(fields, expected):
    instance = None if fields is None else Instance.from_dict({"id": 1, **fields})
    assert classify_instance(instance) is expected


# ---------------------------------------------------------------------------- outcomes

TRACEBACK_LOG = """step 1
Traceback (most recent call last):
  File "/app/worker.py", line 3, in <module>
    main()
  File "/app/worker.py", line 2, in main
    raise ValueError("bad page")
ValueError: bad page

"""


@pytest.mark.parametrize(
    "args,expected_state",
    [
        ((0, Condition.STOPPED, False), "completed"),
        ((0, Condition.EXITED, False), "completed"),
        ((1, Condition.STOPPED, False), "failed"),
        ((137, Condition.GONE, False), "failed"),
        ((None, Condition.STOPPED, False), "error"),
        ((None, Condition.EXITED, False), "error"),
        ((None, Condition.GONE, False), "error"),
        ((None, Condition.OFFLINE, False), "error"),
        ((0, Condition.STOPPED, True), "stopped"),
        ((None, Condition.RUNNING, True), "stopped"),
    ],
)
def test_final_state_from_marker(args, expected_state):
    outcome = final_state(*args)
    assert isinstance(outcome, Outcome)
    assert outcome.state == expected_state
    assert outcome.reason


def test_final_state_error_reason_names_missing_exit_code():
    assert final_state(None, "stopped", False).reason == "instance ended without an exit code"
    assert "exit code 3" in final_state(3, "stopped", False).reason


def test_final_state_inferred():
    done = final_state(None, Condition.STOPPED, False, inferred=True, log_tail="all good\n")
    assert done.state == "completed" and "inferred" in done.reason
    crashed = final_state(None, Condition.STOPPED, False, inferred=True, log_tail=TRACEBACK_LOG)
    assert crashed.state == "failed" and "traceback" in crashed.reason
    exited = final_state(None, Condition.EXITED, False, inferred=True, log_tail="all good")
    assert exited.state == "error" and "inferred" in exited.reason
    # a marker, when there is one, still wins over inference
    assert final_state(2, Condition.STOPPED, False, inferred=True).state == "failed"
    assert final_state(None, Condition.STOPPED, True, inferred=True).state == "stopped"


def test_traceback_detection():
    assert ends_with_traceback(TRACEBACK_LOG)
    assert ends_with_traceback(
        'x\nTraceback (most recent call last):\n  File "a", line 1\nKeyboardInterrupt'
    )
    assert ends_with_traceback(
        '2024 ERROR Traceback (most recent call last):\n  File "a"\n'
        "arkindex_worker.ErrorResponse: 500: oops"
    )
    # a traceback followed by more work is not how the log ends
    assert not ends_with_traceback(TRACEBACK_LOG + "retrying\nprocessed 10 pages\nall done\nbye\n")
    assert not ends_with_traceback("all fine\n")
    assert not ends_with_traceback("")


# ---------------------------------------------------------------------------- start failures


def rec(phase="loading", **values):
    values.setdefault("attempt", 1)
    values.setdefault("phase_changed_at", 1000.0)
    return TaskRecord(task_id=TASK, phase=phase, **values)


@pytest.mark.parametrize(
    "record,condition,now,expected",
    [
        (rec(), Condition.LOADING, 1500.0, None),
        (rec(), Condition.LOADING, 1000.0 + 901, "stuck loading"),
        (rec(), Condition.PROVISIONING, 1000.0 + 901, "stuck provisioning"),
        (rec(), Condition.START_FAILED, 1001.0, "failed to start"),
        (rec(), Condition.GONE, 1001.0, "disappeared"),
        (rec("creating"), Condition.GONE, 1001.0, None),  # not listed yet
        (rec("creating"), Condition.GONE, 1000.0 + 901, "no instance appeared"),
        (rec(), Condition.EXITED, 1100.0, "exited without an exit code"),
        (rec(), Condition.STOPPED, 1100.0, "stopped before the task ran"),
        (rec(exit_code=0), Condition.STOPPED, 1100.0, None),  # ran to its end
        (rec(inferred=True), Condition.STOPPED, 1100.0, None),  # unwrapped: maybe it finished
        (rec(), Condition.OFFLINE, 1100.0, None),  # offline_since not recorded yet
        (rec(offline_since=1100.0), Condition.OFFLINE, 1100.0 + 599, None),
        (rec("running", offline_since=1100.0), Condition.OFFLINE, 1100.0 + 600, "offline"),
        (rec("running", running_since=1000.0), Condition.EXITED, 1010.0, "exited"),
        (rec("running", running_since=1000.0), Condition.EXITED, 1000.0 + 500, None),
        (rec("running", running_since=1000.0), Condition.RUNNING, 9999.0, None),
        (rec("running", running_since=1000.0), Condition.GONE, 1010.0, None),  # final: error
        (rec("finishing"), Condition.START_FAILED, 9999.0, None),
        (rec("accepted"), Condition.GONE, 9999.0, None),
    ],
)
def test_start_failure(record, condition, now, expected):
    reason = start_failure(
        record, condition, now, loading_deadline=900.0, offline_grace=600.0, early_exit_window=120.0
    )
    if expected is None:
        assert reason is None
    else:
        assert reason is not None and expected in reason


def test_start_failure_reason_carries_status_msg():
    reason = start_failure(
        rec(),
        Condition.START_FAILED,
        1001.0,
        900.0,
        offline_grace=600.0,
        early_exit_window=120.0,
        status_msg=OCI,
    )
    assert "OCI runtime create failed" in reason


def test_attempts_and_offer_wait():
    assert next_attempt_allowed(1, 3) and next_attempt_allowed(2, 3)
    assert not next_attempt_allowed(3, 3)
    assert not next_attempt_allowed(1, 1)
    waiting = rec("waiting_offer", waiting_since=100.0)
    assert not offer_wait_expired(waiting, 100.0 + 600, 600)
    assert offer_wait_expired(waiting, 100.0 + 601, 600)
    assert not offer_wait_expired(rec("waiting_offer"), 1e9, 600)


def test_a_start_that_shows_progress_goes_on_a_stalled_one_is_given_up():
    """A big image pulls for a long time: as long as its progress lines change it goes on
    (up to the loading deadline, the ceiling); no progress for pull_stall_timeout: given up."""
    kwargs = dict(offline_grace=600.0, early_exit_window=120.0, pull_stall_timeout=300.0)
    started = 1000.0
    pulling = TaskRecord(
        task_id="t",
        phase="loading",
        attempt=1,
        phase_changed_at=started,
        progress_at=started + 1500,
    )  # the last progress line changed then
    assert start_failure(pulling, Condition.LOADING, started + 1700, 7200.0, **kwargs) is None
    reason = start_failure(pulling, Condition.LOADING, started + 1801, 7200.0, **kwargs)
    assert reason is not None and "no progress for 301s" in reason
    # Progress or not, the ceiling holds.
    busy = replace(pulling, progress_at=started + 7199)
    assert "loading deadline" in start_failure(
        busy, Condition.LOADING, started + 7201, 7200.0, **kwargs
    )
    # Without any progress line since the create, the stall counts from the create.
    silent = replace(pulling, progress_at=None)
    assert start_failure(silent, Condition.PROVISIONING, started + 299, 7200.0, **kwargs) is None
    assert start_failure(silent, Condition.PROVISIONING, started + 301, 7200.0, **kwargs)


@pytest.mark.parametrize(
    "record,condition,now,stall,kind",
    [
        (rec(), Condition.LOADING, 1000.0 + 901, None, StartFailureKind.LOADING_DEADLINE),
        (rec(), Condition.PROVISIONING, 1000.0 + 301, 300.0, StartFailureKind.PULL_STALLED),
        (rec(), Condition.LOADING, 1000.0 + 901, 300.0, StartFailureKind.LOADING_DEADLINE),
        (rec(), Condition.START_FAILED, 1001.0, None, StartFailureKind.START_FAILED),
        (rec(), Condition.GONE, 1001.0, None, StartFailureKind.DISAPPEARED),
        (rec("creating"), Condition.GONE, 1000.0 + 901, None, StartFailureKind.DISAPPEARED),
        (rec(), Condition.EXITED, 1100.0, None, StartFailureKind.EXITED_EARLY),
        (rec(), Condition.STOPPED, 1100.0, None, StartFailureKind.STOPPED_BEFORE_RUNNING),
        (rec(offline_since=1.0), Condition.OFFLINE, 1000.0, None, StartFailureKind.HOST_OFFLINE),
        (rec("running", running_since=1000.0), Condition.EXITED, 1010.0, None, "exited_early"),
    ],
)
def test_every_start_failure_has_its_kind(record, condition, now, stall, kind):
    """The metric's label for each reason start_failure() gives (a reason worded anew must
    keep its kind: the stall and the deadline differ only by their words)."""
    reason = start_failure(
        record,
        condition,
        now,
        loading_deadline=900.0,
        offline_grace=600.0,
        early_exit_window=120.0,
        pull_stall_timeout=stall,
    )
    assert reason is not None
    assert start_failure_kind(condition, reason) == kind
