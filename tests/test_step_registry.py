"""The step registry is the one home of a step: every step has a Celery task, every Celery
task a step, each with the queue and retry policy the registry gives."""

import ponos_tasks.tasks as tasks
from ponos_tasks.app import app
from ponos_tasks.models import QUEUES, StepName
from ponos_tasks.reconcile import AdoptInstance, DestroyInstance, ResumeStep, StartChain, StopTask
from ponos_tasks.steps import STEPS


def test_every_step_name_is_registered():
    assert set(STEPS) == set(StepName)


def test_every_celery_task_is_a_step_and_every_step_a_task():
    ours = {name for name in app.tasks if name.startswith("ponos.")}
    assert ours - {"ponos.sync", "ponos.check_ended"} == {step.task_name for step in STEPS.values()}
    for name, step in STEPS.items():
        task = app.tasks[step.task_name]
        assert tasks.STEP_TASKS[name].name == step.task_name
        assert task.queue == step.queue and step.queue in QUEUES
        assert task.max_retries == step.retry.max_retries
        assert task.acks_late and task.ignore_result


def test_plan_steps_send_registered_steps():
    messages = [
        StartChain("t", "r").message(),
        ResumeStep("t", StepName.PUBLISH_LOGS, "finishing", 1, "r").message(),
        StopTask("t", True, "r").message(),
        DestroyInstance(1, "l", "t", "orphan", "r").message(),
        AdoptInstance("t", 1, 1, "l", None, None, "r").message(),
    ]
    for message in messages:
        assert message.step in STEPS
    assert messages[1].kwargs == {"final": True}
