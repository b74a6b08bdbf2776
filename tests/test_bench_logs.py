"""The benchmarks read the worker log: a sync that found another one running is not counted
as a sync (its 0.0004 s would halve the p50 of an agent whose syncs overrun their interval,
and its calls would be divided over syncs that made none)."""

from benchmarks.common import ended_checks, sync_durations

LOG = """\
[2026-12-07 11:55:01,000: INFO/ForkPoolWorker-2] sync: another sync is running; skipped
[2026-12-07 11:55:01,001: INFO/ForkPoolWorker-2] Task ponos.sync[a1] succeeded in 0.0004s: 'skipped'
[2026-12-07 11:55:30,000: INFO/ForkPoolWorker-1] Task ponos.sync[a2] succeeded in 33.5s: None
[2026-12-07 11:55:31,000: INFO/ForkPoolWorker-3] ended check: listed 2 instance(s) not running
[2026-12-07 11:55:32,000: INFO/ForkPoolWorker-3] Task ponos.sync[a3] succeeded in 1.25s: None
"""


def test_skipped_syncs_are_not_syncs():
    assert sync_durations(LOG) == [33.5, 1.25]


def test_ended_checks_are_counted_by_their_listing():
    assert ended_checks(LOG) == 1
