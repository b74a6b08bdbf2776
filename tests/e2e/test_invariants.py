"""The invariant checkers of the end-to-end tests catch what they are meant to catch
(fast, no processes: synthetic simulator records)."""

import pytest

from tests.e2e.helpers import cheapest_violations, max_live_per_task

pytestmark = pytest.mark.e2e

PRICES = {1: 0.10, 2: 0.20, 3: 0.30}


def _events(*spans):
    """spans: (instance id, label, machine, created t, destroyed t | None)."""
    events = []
    for instance_id, label, _machine, start, end in spans:
        events.append({"t": start, "event": "created", "instance_id": instance_id, "label": label})
        if end is not None:
            events.append(
                {"t": end, "event": "destroyed", "instance_id": instance_id, "label": label}
            )
    return sorted(events, key=lambda e: e["t"])


def _ledger(*spans):
    return [{"id": i, "label": label, "machine_id": machine} for i, label, machine, *_ in spans]


def _label(task: str, attempt: int = 1) -> str:
    return f"ponos-0123abcd-{task}-{attempt}"


def test_cheapest_flags_a_dearer_choice_while_a_cheaper_machine_was_free():
    spans = [(10, _label("a"), 2, 100.0, 200.0)]
    problems = cheapest_violations(
        _events(*spans), _ledger(*spans), PRICES, vanished=set(), slack=40.0
    )
    assert len(problems) == 1 and "machine 2" in problems[0]


def test_cheapest_accepts_busy_released_late_failed_or_vanished_machines():
    busy = [(1, _label("x"), 1, 50.0, 300.0), (2, _label("a"), 2, 100.0, 200.0)]
    released_late = [(1, _label("x"), 1, 50.0, 90.0), (2, _label("a"), 2, 100.0, 200.0)]
    failed = [(1, _label("a", 1), 1, 10.0, 60.0), (2, _label("a", 2), 2, 100.0, 200.0)]
    for spans in (busy, released_late, failed):
        assert (
            cheapest_violations(
                _events(*spans), _ledger(*spans), PRICES, vanished=set(), slack=40.0
            )
            == []
        )
    spans = [(2, _label("a"), 2, 100.0, 200.0)]
    assert (
        cheapest_violations(_events(*spans), _ledger(*spans), PRICES, vanished={1}, slack=40.0)
        == []
    )


def test_max_live_per_task_sees_overlap_but_not_succession():
    overlap = _events((1, _label("a", 1), 1, 0.0, 50.0), (2, _label("a", 2), 2, 40.0, 90.0))
    succession = _events((1, _label("a", 1), 1, 0.0, 50.0), (2, _label("a", 2), 2, 50.0, 90.0))
    assert max_live_per_task(overlap) == {"a": 2}
    assert max_live_per_task(succession) == {"a": 1}
