"""Reading an instance's log without holding a worker while Vast.ai uploads it.

Vast.ai serves a log in two moves: `PUT request_logs` asks the host to upload the log and
answers a `result_url`; the file appears there a few seconds later, sometimes minutes. A step
that waited for it held one of the few Celery workers for up to `log_read_wait` (20 s): a
handful of tasks ending together then held most workers, and the watches and creates queued
behind them (the end → action latency and the launch stalls in BENCHMARKS.md). Instead:

1. the step asks (`ask_logs`), keeps the `result_url` and the time in Redis, and returns a
   `Pending`: its caller schedules the same step again after `Pending.delay`;
2. each later run reads the URL once (`read_logs_at`, one GET, no wait): the text when it is
   there, `Pending` again while it is not;
3. when `log_read_wait` has passed since the ask, the read has failed: None, as a blocking
   read timing out was ("could not read", which the callers wait on, retry and say so; never
   "no log").

The URL is a pre-signed one: it is kept in its own Redis key, never in a step's arguments
nor in the task's record (which `status --json` shows). Reads are per task, attempt and
purpose (the watch's, the final upload's, the periodic upload's), so that two steps of a
task never take each other's text. A step that comes back late (a queue backed up behind
slow steps, a chain taken over, a stale resume) still reads the URL once before the
deadline applies: the file is usually there, and asking anew instead would start the
deadline over at every late run, a loop that never ends while the queue stays slow. Not
there either, the read has failed (None, counted against the caller's log_read_deadline),
and the next step asks anew.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from .vast import VastError

logger = logging.getLogger(__name__)

FIRST_POLL = 0.5  # s: the simulator's median upload takes 3 s of Vast.ai's time
POLL_GROWTH = 1.5
LONGEST_POLL = 2.0  # s: one GET every 2 s at most, as the blocking read did


@dataclass(frozen=True)
class Pending:
    """The log is not there yet: run the step again in `delay` seconds."""

    delay: float


def poll_delay(polls: int) -> float:
    """The wait before read number `polls` + 1 of one result_url."""
    return min(FIRST_POLL * POLL_GROWTH**polls, LONGEST_POLL)


def read_instance_log(
    ctx, record, purpose: str, *, gone_is_empty: bool = False
) -> str | None | Pending:
    """The instance's log ("" when there is no instance; `gone_is_empty`: also when Vast.ai
    answers 404 for it), `Pending` while its upload is awaited, None when it could not be
    read (a refused ask, or `log_read_wait` passed without the file)."""
    if record.instance_id is None or record.instance_destroyed:
        return ""
    store, settings, now = ctx.store, ctx.settings, ctx.now()
    task_id, attempt = record.task_id, record.attempt
    read = store.log_read(task_id, attempt, purpose)
    try:
        if read is None:
            url = ctx.vast.ask_logs(record.instance_id, tail=settings.log_tail_lines)
            read = {"url": url, "asked_at": now, "polls": 0}
            _keep(ctx, record, purpose, read)
            return Pending(poll_delay(0))
        text = ctx.vast.read_logs_at(read["url"], settings.max_log_bytes)
    except VastError as error:
        store.drop_log_read(task_id, attempt, purpose)
        if gone_is_empty and error.status == 404:
            return ""  # a positive fact: the instance is gone, and its log with it
        logger.warning(
            "task %s: could not read the logs of instance %s: %s",
            task_id,
            record.instance_id,
            error.msg,
        )
        return None
    if text is not None:
        store.drop_log_read(task_id, attempt, purpose)
        return text
    if now - read["asked_at"] >= settings.log_read_wait:
        store.drop_log_read(task_id, attempt, purpose)
        logger.warning(
            "task %s: the log of instance %s was not readable %.0f s after it was asked for",
            task_id,
            record.instance_id,
            now - read["asked_at"],
        )
        return None
    read = {**read, "polls": read["polls"] + 1}
    _keep(ctx, record, purpose, read)
    store.heartbeat(task_id, expect_attempt=attempt)  # waiting on Vast.ai is progress
    return Pending(poll_delay(read["polls"]))


def _keep(ctx, record, purpose: str, read: dict) -> None:
    # Outlives the read's deadline by a margin (a late step still finds it); then it expires.
    ttl = 2 * ctx.settings.log_read_wait + 60.0
    ctx.store.save_log_read(record.task_id, record.attempt, purpose, read, ttl)
