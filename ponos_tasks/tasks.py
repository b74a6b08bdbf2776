"""Celery tasks: one per registered step (steps.STEPS), made by one factory, plus the sync
loop. This is the only module that wires the steps to Celery.

Arguments are ids only (task ids, instance ids): Flower and the broker show task arguments,
so no secret ever travels in one. Every step is idempotent (it acts through CAS), which is
what makes acks_late and the retries below safe.
"""

import logging

from celery.exceptions import SoftTimeLimitExceeded

from ponos_tasks.agent import get_context
from ponos_tasks.app import app
from ponos_tasks.loop import check_ended as check_ended_step
from ponos_tasks.loop import message_headers
from ponos_tasks.loop import sync as sync_step
from ponos_tasks.models import SYNC_QUEUE, Next, StepName
from ponos_tasks.settings import SYNC_SOFT_TIME_LIMIT, SYNC_TIME_LIMIT
from ponos_tasks.steps import STEPS, TRANSIENT, Step, run_step

logger = logging.getLogger(__name__)


def enqueue(task_id: str, follow: list[Next]) -> None:
    """Send the steps a step (or the sync) said should run next."""
    for item in follow:
        STEP_TASKS[item.step].apply_async(
            args=(task_id,),
            kwargs=item.kwargs,
            countdown=item.countdown or None,
            queue=STEPS[item.step].queue,
            headers=message_headers(get_context(), task_id, item.step),
        )


def _celery_task(step: Step):
    """The Celery task of one step: its name, queue and retry policy from the registry;
    time limits from celery_settings."""

    def run(self, task_id, **kwargs):
        enqueue(task_id, run_step(get_context(), task_id, step.name, **kwargs))

    run.__name__ = run.__qualname__ = str(step.name)
    run.__doc__ = step.function.__doc__
    return app.task(
        run,
        name=step.task_name,
        queue=step.queue,
        bind=True,
        acks_late=True,
        autoretry_for=TRANSIENT,
        dont_autoretry_for=(SoftTimeLimitExceeded,),
        max_retries=step.retry.max_retries,
        retry_backoff=step.retry.backoff,
        retry_backoff_max=step.retry.backoff_max,
        retry_jitter=True,
        ignore_result=True,
    )


STEP_TASKS: dict[StepName, object] = {name: _celery_task(step) for name, step in STEPS.items()}


def _loop_task(name: str):
    """A task of Celery beat (the sync, the ended check). Not retried: the next beat tick
    does the same work. Its limits stay well under the beat's own cadence of a few
    intervals."""
    return app.task(
        name=name,
        queue=SYNC_QUEUE,
        bind=True,
        acks_late=True,
        max_retries=0,
        soft_time_limit=SYNC_SOFT_TIME_LIMIT,
        time_limit=SYNC_TIME_LIMIT,
        ignore_result=True,
    )


def _send_all(items: list[tuple[str, Next]]) -> None:
    for task_id, message in items:
        enqueue(task_id, [message])


@_loop_task("ponos.sync")
def sync(self):
    """The loop (Celery beat): poll Arkindex, list instances once, plan, enqueue."""
    result = sync_step(get_context(), send_now=_send_all)
    if not result.ran:
        logger.info("sync: another sync is running; skipped")
        return "skipped"  # in the worker log's "succeeded" line: not a sync that ran
    for task_id, message in result.enqueue:
        enqueue(task_id, [message])


@_loop_task("ponos.check_ended")
def check_ended(self):
    """Between two syncs (flat view): list the instances not running, wake their watchers."""
    for task_id, message in check_ended_step(get_context()):
        enqueue(task_id, [message])
