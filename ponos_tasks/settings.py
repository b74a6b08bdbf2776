"""Every timing and limit the agent runs by, derived once from the configuration.

`Settings.from_config(config)` is the only place where the configuration's values (whose
defaults live in config.py and config/agent.example.yml, nowhere else) become the numbers
the steps, the sync loop and `reconcile.plan()` use; the internal values that are not worth
a configuration key (lock timeouts, claim durations) are derived here too, each with why.
Frozen: a process reads one consistent set. Pure: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from ponos_tasks.budget import Limits

# The sync task's Celery time limits (tasks.py): its single-flight lock must outlive them, or
# a slow sync and the next one overlap (and over-ask Arkindex for tasks).
SYNC_SOFT_TIME_LIMIT = 100
SYNC_TIME_LIMIT = 120


@dataclass(frozen=True)
class Settings:
    # From the configuration (see config/agent.example.yml for each one's meaning).
    sync_interval: float
    logs_interval: float
    max_instances: int
    loading_deadline: float
    offer_wait: float
    max_attempts: int
    offline_grace: float
    early_exit_window: float
    log_read_deadline: float  # s to keep reading an ended instance's log before deciding
    machine_cooldown: float  # s every task avoids a machine that failed a start
    pull_stall_timeout: float  # s a start may show no progress before it is given up
    offer_ranking: str  # expected_cost | cheapest_hourly (ranking.py)
    expected_run_seconds: float  # a task's run time before any record of its image
    image_cache_seconds: float  # s a host is assumed to keep an image this agent ran on it
    budget: Limits  # the money limits (budget.py)
    # Derived.
    watch_interval: float  # s between two looks at a task's instance (from the snapshot)
    running_watch_interval: float  # the same while the instance runs (its end wakes the watch)
    heartbeat_stale: float  # s without progress before the sync loop resumes a chain
    running_stale: float  # the same for `running` (its watch looks less often)
    creating_stale: float  # the same for `creating` (a create call can take long)
    sync_lock_timeout: float  # the sync loop's single-flight lock
    snapshot_max_age: float  # a watcher lists again itself when the sync's list is older
    visibility_grace: float  # s after a create during which an unlisted instance is not gone
    instance_reads: str  # "flat" (view.py) or "full_list" (every instance each sync)
    full_resync_interval: float  # s a whole pass of the flat view's full listing takes
    create_lock_timeout: float
    create_unknown_delay: float  # s before looking up the label of a create with no answer
    offer_claim_seconds: float
    offer_search_reuse: float  # s one search's answer serves every task (steps._shared_search)
    offers_tried_per_create: int
    log_read_wait: float  # s to wait for Vast.ai's log result_url
    log_tail_lines: int  # lines asked of Vast.ai (it sends 1000 without `tail`)
    max_log_bytes: int  # the tail of an instance log kept (memory bound)
    ended_log_ttl: float
    publish_tries: int  # final log uploads tried before going on without it
    upload_lock_timeout: float
    unpublished_log_ttl: float
    tombstone_ttl: float
    spend_end_margin: float  # s of an instance's price kept in hand below max_spend_per_task
    start_note_interval: float  # s between two lines of a start's progress in a task's log

    @classmethod
    def from_config(cls, config: Any) -> Settings:
        vast = config.vast_api
        sync = float(config.sync_interval)
        # Half a sync: a change is seen at most one sync late; 0.5 to 30 s whatever the sync.
        watch = min(max(sync / 2, 0.5), 30.0)
        stale = max(6 * watch, 3 * sync, 5.0)
        # A running instance changes only by ending (or going offline, which has a grace of
        # minutes), and the sync and the ended check wake its watcher at its end
        # (loop._wake_watchers_of_ended): three syncs between two looks then only bound how
        # late an end whose wake was lost is seen, and cut the steps per running task (most
        # of the agent's CPU at N running: BENCHMARKS.md) by six. At most 90 s, as a
        # stalled pull's or an offline host's limits are minutes.
        running_watch = min(max(3 * sync, watch), 90.0)
        return cls(
            sync_interval=sync,
            logs_interval=float(config.logs_interval),
            max_instances=config.budget.max_instances,
            loading_deadline=float(vast.loading_deadline),
            offer_wait=float(vast.offer_wait),
            max_attempts=vast.start_attempts,
            offline_grace=float(vast.offline_grace),
            early_exit_window=float(vast.early_exit_window),
            log_read_deadline=float(vast.log_read_deadline),
            machine_cooldown=float(vast.machine_cooldown),
            pull_stall_timeout=float(vast.pull_stall_timeout),
            offer_ranking=vast.offer_ranking,
            expected_run_seconds=float(vast.expected_run_seconds),
            image_cache_seconds=float(vast.image_cache_seconds),
            budget=Limits.from_config(config.budget),
            watch_interval=watch,
            running_watch_interval=running_watch,
            heartbeat_stale=stale,
            # Two running looks missed, and a sync to see it.
            running_stale=max(stale, 2 * running_watch + sync),
            creating_stale=stale,
            # Renewed while the sync runs (state.kept_alive): a sync whose worker is killed
            # stalls the loop this long at most, while a slow one keeps it.
            sync_lock_timeout=max(15.0, 3 * sync),
            snapshot_max_age=1.5 * sync,
            # Vast.ai's reads lag a create by a few seconds; a minute covers that with room
            # (never more than the loading deadline, which bounds a start anyway).
            visibility_grace=min(60.0, float(vast.loading_deadline)),
            instance_reads=vast.instance_reads,
            full_resync_interval=float(vast.full_resync_interval),
            # Renewed right before each create try is sent (after the rate limiter's wait), it
            # must outlive one request (the client's connect + read timeouts, 35 s) with a
            # margin; a worker killed while holding it delays the task's next try by at most
            # this. The CAS on (phase, attempt) and the label lookup back it up.
            create_lock_timeout=60.0,
            create_unknown_delay=max(2.0, watch),
            # Workers creating at the same moment would all pick the same cheapest offer and
            # all but one get no_such_ask, wasting the create rate limit (BENCHMARKS.md).
            offer_claim_seconds=30.0,
            # Five search intervals (11 s unscaled): a burst then searches about 5 times a
            # minute, under Vast.ai's 10 a minute, whatever its launch rate (BENCHMARKS.md).
            offer_search_reuse=5 * 2.2 * float(vast.rate_limit_scale),
            offers_tried_per_create=5,  # offers that vanished under us before giving up
            log_read_wait=20.0,
            # As many lines as any task writes: max_log_bytes bounds what is kept.
            log_tail_lines=10_000_000,
            max_log_bytes=int(config.logs_max_mb * 1024 * 1024),
            ended_log_ttl=3600.0,
            # A log upload that keeps failing (expired URL, deleted task, S3 down) must not keep
            # the instance billing: a few tries (about 1.5 min in all), then the task goes on.
            publish_tries=5,
            # Held by the step that uploads: it must not lapse while that step still runs,
            # or the final upload goes first and a late periodic try lands on top of it.
            # Longer than one upload with its retries (4 x (5 + 30 s) + 3.5 s of waits) and
            # than a step's hard time limit (celery_settings.task_time_limit, 180 s).
            upload_lock_timeout=190.0,
            unpublished_log_ttl=7 * 24 * 3600.0,
            # A done record stays this long so that a late message cannot restart its task.
            tombstone_ttl=3 * 24 * 3600.0,
            # What ending a task costs after the decision to end it (max_spend_per_task): the
            # meter lags one sync, the watch of a running instance one interval, then the stop
            # and the final log take some seconds; the task is ended this much before its cap.
            spend_end_margin=2 * sync + running_watch + 10.0,
            # docker pull's progress changes on every look: one line a minute shows a slow
            # pull moving (or not) without flooding the log (an hour: 60 of its 500 lines).
            start_note_interval=60.0,
        )

    def stale_after(self, phase: str) -> float:
        if phase == "creating":
            return self.creating_stale
        if phase == "running":
            return self.running_stale
        return self.heartbeat_stale

    def but(self, **changes: Any) -> Settings:
        """A copy with some values changed (tests)."""
        return replace(self, **changes)
