"""How often a running task's log is read while it runs, when many tasks run at once.

Vast.ai serves an instance's log through one endpoint (`request_logs`), about one call a
second per account (the simulator enforces 1 s; the agent's limiter spaces them 1.1 s). One
periodic read per running task every `logs_interval` (60 s by default) asks N calls a
minute: past about 50 running tasks the endpoint is saturated, the asks queue up in the
agent's limiter (each holding a Celery worker asleep for its slot), and the read that
matters most, the one at a task's end (its exit code, its final log), waits behind them.
BENCHMARKS.md measured it at 100 running tasks: 46 log asks a minute, and an ended instance
acted on 55 s after its end (p95) for a 10 s sync.

So the periodic reads are paced:
- they get at most PERIODIC_SHARE of the endpoint, through a gate of their own in the
  shared rate limiter (`periodic_logs`, interval = the logs interval / PERIODIC_SHARE). A
  periodic read never waits for the gate: one that finds it taken is skipped, and its task
  tries again at its next watch. The reads at an end (the watch's, the final upload's) do
  not pass the gate: they only wait for the endpoint's own slot, behind at most the few
  periodic reads the gate let through;
- each running task's period stretches to N x the gate's interval when that is longer than
  `logs_interval`, so that the reads due at any moment fit through the gate and every task
  gets its turn, rather than the watchers that happen to come first.

The cost: with N running tasks a task's live log is refreshed every max(logs_interval,
N x 2.2 s): 60 s up to 27 tasks, 220 s at 100, 37 minutes at 1000. That is the limit of one
Vast.ai account's log endpoint once half of it is kept for the ends; the final log of every
task is published whole, whatever N.
"""

from __future__ import annotations

PERIODIC_SHARE = 0.5  # of the log endpoint's calls, at most, for the periodic reads
GATE = "periodic_logs"  # the gate's bucket in the shared rate limiter (ratelimit.py)


def periodic_interval(logs_interval: float, running: int, gate_interval: float) -> float:
    """Seconds between two periodic reads of one task's log with `running` tasks running:
    `logs_interval`, or longer when the gate could not let that many reads through."""
    return max(logs_interval, running * gate_interval)
