"""Celery tasks: thin wrappers around ponos_tasks.steps, and the only place that wires them.

Arguments are ids only (task ids, instance ids): Flower and the broker show task arguments,
so no secret ever travels in one. Every task is idempotent (steps act through CAS), which is
what makes acks_late and the retries below safe. A step whose retries run out is not lost:
the sync loop sees its task's heartbeat go stale and enqueues the step again.
"""

import logging

import redis
from celery.exceptions import SoftTimeLimitExceeded

from ponos_tasks import steps
from ponos_tasks.agent import get_context
from ponos_tasks.app import app
from ponos_tasks.arkindex import ArkindexUnavailable
from ponos_tasks.reconcile import AdoptInstance, DestroyInstance
from ponos_tasks.vast import VastRateLimited, VastServerError, VastTransportError

logger = logging.getLogger(__name__)

# Transient failures worth a Celery retry (the clients already retried a few times inside).
TRANSIENT = (VastRateLimited, VastServerError, VastTransportError, ArkindexUnavailable,
             redis.ConnectionError, redis.TimeoutError)

STEP_POLICY = dict(
    bind=True,
    acks_late=True,
    autoretry_for=TRANSIENT,
    dont_autoretry_for=(SoftTimeLimitExceeded,),
    max_retries=5,
    retry_backoff=2,
    retry_backoff_max=60,
    retry_jitter=True,
    soft_time_limit=150,
    time_limit=180,
    ignore_result=True,
)

QUEUE_OF_STEP = {
    steps.START: "vast",
    steps.CHOOSE_OFFER: "vast",
    steps.CREATE: "vast",
    steps.WATCH: "vast",
    steps.RETRY: "vast",
    steps.DESTROY: "vast",
    steps.DESTROY_INSTANCE: "vast",
    steps.ADOPT: "vast",
    steps.PUBLISH_LOGS: "arkindex",
    steps.REPORT: "arkindex",
    steps.STOP: "arkindex",
}


def enqueue(task_id: str, follow) -> None:
    """Send the step(s) a step said should run next."""
    if follow is None:
        return
    for item in follow if isinstance(follow, list) else [follow]:
        STEP_TASKS[item.step].apply_async(
            args=(task_id,), kwargs=item.kwargs, countdown=item.countdown or None,
            queue=QUEUE_OF_STEP[item.step])


@app.task(name="ponos.sync", queue="sync", **{**STEP_POLICY, "max_retries": 0,
                                               "soft_time_limit": 100, "time_limit": 120})
def sync(self):
    """The loop (Celery beat): poll Arkindex, list instances once, plan, enqueue."""
    result = steps.sync(get_context())
    if not result.ran:
        logger.info("sync: another sync is running; skipped")
        return
    for _kind, task_id, follow in result.enqueue:
        enqueue(task_id, follow)


@app.task(name="ponos.start", queue="vast", **STEP_POLICY)
def start(self, task_id):
    enqueue(task_id, steps.start(get_context(), task_id))


@app.task(name="ponos.choose_offer", queue="vast", **STEP_POLICY)
def choose_offer(self, task_id):
    enqueue(task_id, steps.choose_offer(get_context(), task_id))


@app.task(name="ponos.create_instance", queue="vast", **STEP_POLICY)
def create_instance(self, task_id):
    enqueue(task_id, steps.create(get_context(), task_id))


@app.task(name="ponos.watch", queue="vast", **STEP_POLICY)
def watch(self, task_id):
    enqueue(task_id, steps.watch(get_context(), task_id))


@app.task(name="ponos.retry_attempt", queue="vast", **STEP_POLICY)
def retry_attempt(self, task_id):
    enqueue(task_id, steps.retry(get_context(), task_id))


@app.task(name="ponos.publish_logs", queue="arkindex", **STEP_POLICY)
def publish_logs(self, task_id, final=True):
    enqueue(task_id, steps.publish_logs(get_context(), task_id, final=final))


@app.task(name="ponos.destroy_instance", queue="vast", **STEP_POLICY)
def destroy_instance(self, task_id):
    enqueue(task_id, steps.destroy(get_context(), task_id))


@app.task(name="ponos.report_state", queue="arkindex", **STEP_POLICY)
def report_state(self, task_id):
    enqueue(task_id, steps.report(get_context(), task_id))


@app.task(name="ponos.stop_task", queue="arkindex", **STEP_POLICY)
def stop_task(self, task_id, has_record=True):
    enqueue(task_id, steps.stop(get_context(), task_id, has_record))


@app.task(name="ponos.adopt_instance", queue="vast", **STEP_POLICY)
def adopt_instance(self, task_id, instance_id, attempt, label, from_phase, from_attempt,
                   reason):
    step = AdoptInstance(task_id, instance_id, attempt, label, from_phase, from_attempt, reason)
    enqueue(task_id, steps.adopt(get_context(), step))


@app.task(name="ponos.destroy_unwanted", queue="vast", **STEP_POLICY)
def destroy_unwanted(self, task_id, instance_id, label, cause, reason):
    steps.destroy_unwanted(get_context(),
                           DestroyInstance(instance_id, label, task_id, cause, reason))


STEP_TASKS = {
    steps.START: start,
    steps.CHOOSE_OFFER: choose_offer,
    steps.CREATE: create_instance,
    steps.WATCH: watch,
    steps.RETRY: retry_attempt,
    steps.PUBLISH_LOGS: publish_logs,
    steps.DESTROY: destroy_instance,
    steps.REPORT: report_state,
    steps.STOP: stop_task,
    steps.ADOPT: adopt_instance,
    steps.DESTROY_INSTANCE: destroy_unwanted,
}
