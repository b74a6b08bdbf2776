"""Celery settings of ponos-vast (the static ones; app.py adds the broker URL and the beat
entry from the agent's configuration). The top-level celeryconfig.py only imports this.

Why each setting:
- Redis is the broker; there is no result backend: the agent's own records in Redis are the
  job state, and nothing reads Celery results.
- Every step is idempotent by design (it acts through a compare-and-set on its task's record),
  so acks_late is safe everywhere; with prefetch 1 a killed worker strands at most the message
  it was running, plus the countdown messages it held (Celery fetches those early, whatever
  the prefetch): the sync resumes their chains once they look stalled (reconcile.py), and the
  broker redelivers them after the visibility timeout (a step that finds its work done does
  nothing).
- visibility_timeout (1 h) is far above the longest countdown (600 s, a create waiting for its
  turn: create_line.MAX_CREATE_DEFER) plus the longest hard time limit (180 s): a message is only
  redelivered when its worker really died. (Redis redelivers an unacknowledged message after
  this timeout, whatever the worker is doing.)
- Queues are declared and missing queues are an error, so a typo in a route fails loudly;
  the Procfile and docker-compose start workers on exactly these queues (a test checks it).
"""

from kombu import Queue

from ponos_tasks.models import QUEUES, SYNC_QUEUE

broker_connection_retry_on_startup = True
# kombu's Redis transport with the fix that keeps a worker alive through a Redis restart
# (Celery 5.7 closes a lost connection twice; see ponos_tasks/broker.py).
broker_transport = "ponos_tasks.broker:Transport"
broker_transport_options = {"visibility_timeout": 3600}

task_queues = tuple(Queue(name) for name in QUEUES)
task_default_queue = SYNC_QUEUE
task_create_missing_queues = False

task_ignore_result = True
task_acks_late = True
# Celery 5.7: a task whose pool process died is re-sent like a retry (bounded by max_retries),
# instead of being dropped (acks_late default) or redelivered forever (reject_on_worker_lost).
task_retry_on_worker_lost = True
worker_prefetch_multiplier = 1
# With REMAP_SIGTERM=SIGQUIT (Procfile/compose env), SIGTERM gives running tasks this long,
# a few seconds under Heroku's 30 s, then requeues them instead of stranding them for a
# visibility timeout.
worker_soft_shutdown_timeout = 25.0
# Every chain step runs under these limits (the sync task declares tighter ones, below its
# beat interval's multiple); a step that hits the soft limit is resumed by the sync loop.
task_soft_time_limit = 150
task_time_limit = 180

task_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
worker_hijack_root_logger = False
worker_send_task_events = True  # Flower shows tasks live
task_send_sent_event = True
