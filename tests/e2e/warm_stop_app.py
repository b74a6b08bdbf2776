"""A Celery app with one slow task, for test_supervise's warm stop: the broker and queue come
from the environment, so that the test's worker and its sender share a private queue."""

import os
import time
from pathlib import Path

from celery import Celery

app = Celery("warm_stop", broker=os.environ["WARM_STOP_BROKER"])
app.conf.task_default_queue = os.environ["WARM_STOP_QUEUE"]
app.conf.worker_hijack_root_logger = False
# As the agent's steps (celery_settings): acknowledged once done, so that a step cut short
# goes back to its queue instead of being lost.
app.conf.task_acks_late = True
app.conf.task_reject_on_worker_lost = True
app.conf.worker_prefetch_multiplier = 1


@app.task(name="warm_stop.slow")
def slow(started: str, done: str, seconds: float) -> None:
    Path(started).write_text("started")
    time.sleep(seconds)
    Path(done).write_text("done")
