"""Run the agent's steps in-process, without Celery, against a LocalStack and a real Redis.

    ctx = make_context(stack, redis_url)           # unique Redis prefix and agent name
    harness = Harness(ctx)
    harness.sync()                                  # loop.sync + queue what it enqueues
    harness.run(until=lambda: harness.done(task_id))

`Harness.run` executes queued `Next` steps in due order, like Celery would with countdowns,
but sleeps at most `max_sleep` real seconds per wait: every step is idempotent and re-reads
its record, so running a watch early only re-checks (the simulators run on scaled time).
"""

from __future__ import annotations

import heapq
import itertools
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field, replace

from ponos_tasks import loop, steps
from ponos_tasks.agent import AgentContext
from ponos_tasks.config import AgentConfig
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Next, StepName
from ponos_tasks.simulators.harness import SimAdmin


def make_config(
    stack, redis_url: str, *, agent_name: str | None = None, **overrides
) -> AgentConfig:
    """An agent config for `stack`; `vast_api` overrides merge into the Vast section."""
    vast = {
        "url": stack.vast_url,
        "api_key": stack.vast_api_key,
        "offer_filters": {},
        "disk_gb": 16,
        "loading_deadline": 30,
        "start_attempts": 3,
        "offer_wait": 30,
        # The simulator's rate limits shrink with its time scale; so do ours.
        "rate_limit_scale": 1.0 / stack.time_scale,
    }
    vast.update(overrides.pop("vast_api", {}))
    # The simulator bills on its clock (time_scale times the agent's).
    budget = {"max_instances": 4, "billing_time_scale": stack.time_scale}
    if "max_instances" in vast:  # the old spelling, still accepted: one home here
        budget["max_instances"] = vast.pop("max_instances")
    budget.update(overrides.pop("budget", {}))
    data = {
        "url": stack.arkindex_url,
        "farm_id": stack.farm_id,
        "seed": stack.seed,
        "agent_name": agent_name or f"test-{uuid.uuid4().hex[:10]}",
        "redis_url": redis_url,
        "sync_interval": 0.5,
        "logs_interval": 60,
        "vast_api": vast,
        "budget": budget,
    }
    data.update(overrides)
    return AgentConfig.model_validate(data)


def make_context(
    stack, redis_url: str, *, prefix: str | None = None, agent_name: str | None = None, **overrides
) -> AgentContext:
    """A context with its own Redis key prefix and (by default) its own agent identity, so
    that several tests can share one stack without seeing each other's tasks."""
    config = make_config(stack, redis_url, agent_name=agent_name, **overrides)
    return AgentContext(config, prefix=prefix or f"test-steps-{uuid.uuid4().hex[:10]}:")


def wipe(ctx: AgentContext) -> int:
    """Delete every Redis key of this context (a total loss of the agent's memory)."""
    keys = list(ctx.redis.scan_iter(match=ctx.keys.pattern()))
    if keys:
        ctx.redis.delete(*keys)
    return len(keys)


RETRY_DELAY = 0.2  # s before a step that failed transiently runs again (Celery: backoff)


@dataclass(order=True)
class _Queued:
    due: float
    seq: int
    task_id: str = field(compare=False)
    next: Next = field(compare=False)


class Harness:
    """A tiny in-process stand-in for Celery: a due-time queue of (task id, Next)."""

    def __init__(self, ctx: AgentContext, *, max_sleep: float = 0.05):
        self.ctx = ctx
        self.max_sleep = max_sleep
        self.queue: list[_Queued] = []
        self.trace: list[tuple[str, str]] = []  # (step, task id) in the order they ran
        self.retries: dict[tuple[str, str], int] = {}  # (task id, step) -> transient failures
        self.syncs: list[loop.SyncResult] = []
        self._seq = itertools.count()

    # ------------------------------------------------------------------ queueing

    def push(self, task_id: str, follow: list[Next]) -> None:
        for item in follow:
            # Compressed countdown: due soon, but after what is due now.
            due = time.monotonic() + min(item.countdown, self.max_sleep)
            heapq.heappush(self.queue, _Queued(due, next(self._seq), task_id, item))

    def sync(self) -> loop.SyncResult:
        result = loop.sync(self.ctx)
        self.syncs.append(result)
        for task_id, message in result.enqueue:
            self.push(task_id, [message])
        return result

    # ------------------------------------------------------------------ running

    def execute(self, task_id: str, item: Next) -> list[Next]:
        """Run one step from the registry, as tasks.py does, and return what comes next."""
        self.trace.append((item.step, task_id))
        return steps.run_step(self.ctx, task_id, item.step, **item.kwargs)

    def step_once(self) -> bool:
        """Run the next due step (sleeping until it is due); False when the queue is empty.

        A transient failure (steps.TRANSIENT) runs the step again shortly, as Celery's
        autoretry does, up to the step's max_retries; then the step is dropped, as Celery
        drops it (the sync loop repairs a stalled chain)."""
        if not self.queue:
            return False
        queued = heapq.heappop(self.queue)
        delay = queued.due - time.monotonic()
        if delay > 0:
            time.sleep(delay)
        try:
            follow = self.execute(queued.task_id, queued.next)
        except steps.TRANSIENT:
            key = (queued.task_id, queued.next.step)
            self.retries[key] = self.retries.get(key, 0) + 1
            if self.retries[key] <= steps.STEPS[queued.next.step].retry.max_retries:
                follow = [replace(queued.next, countdown=RETRY_DELAY)]
            else:
                follow = []
        self.push(queued.task_id, follow)
        return True

    def run(
        self,
        until: Callable[[], bool] | None = None,
        *,
        timeout: float = 30.0,
        sync_every: float | None = None,
        on_step: Callable[[Harness], None] | None = None,
    ) -> None:
        """Run queued steps until `until()` holds (or the queue is empty without `until`).

        `sync_every`: also run the sync loop every so many real seconds (stalled chains,
        stops, orphans are the sync loop's business). Raises TimeoutError after `timeout`.
        """
        deadline = time.monotonic() + timeout
        last_sync = time.monotonic()
        while True:
            if until is not None and until():
                return
            if time.monotonic() > deadline:
                raise TimeoutError(
                    f"not done after {timeout}s; last steps: {self.trace[-8:]}; "
                    f"records: {self.ctx.store.all_records()}"
                )
            if sync_every is not None and time.monotonic() - last_sync >= sync_every:
                self.sync()
                last_sync = time.monotonic()
            if not self.step_once():
                if until is None:
                    return
                if sync_every is None:
                    raise AssertionError(
                        f"queue empty before the goal; trace {self.trace}; "
                        f"records: {self.ctx.store.all_records()}"
                    )
                time.sleep(min(self.max_sleep, sync_every))
            if on_step is not None:
                on_step(self)

    # ------------------------------------------------------------------ checks

    def done(self, task_id: str) -> bool:
        record = self.ctx.store.get(task_id)
        return record is not None and record.phase == Phase.DONE

    def steps_of(self, task_id: str) -> list[str]:
        return [step for step, tid in self.trace if tid == task_id]


def drive(
    ctx: AgentContext,
    task_id: str,
    *,
    first: Next | None = None,
    timeout: float = 30.0,
    max_sleep: float = 0.05,
) -> Harness:
    """Run the task's chain from `first` (default: start) until its record is done."""
    harness = Harness(ctx, max_sleep=max_sleep)
    harness.push(task_id, [first or Next(StepName.START)])
    harness.run(until=lambda: harness.done(task_id), timeout=timeout)
    return harness


def run_sync(
    ctx: AgentContext,
    *,
    until: Callable[[], bool] | None = None,
    timeout: float = 30.0,
    sync_every: float | None = None,
    max_sleep: float = 0.05,
) -> Harness:
    """loop.sync once, then run what it enqueued (and what those steps enqueue)."""
    harness = Harness(ctx, max_sleep=max_sleep)
    harness.sync()
    harness.run(until=until, timeout=timeout, sync_every=sync_every)
    return harness


# ---------------------------------------------------------------------- simulator admin

# The simulators' admin APIs of one LocalStack: `Admin(stack)` (the shared client).
Admin = SimAdmin
