"""Celery settings of ponos-vast (static ones; the beat entry comes from the agent config).

Why each setting (see ../shared/reference/celery-practice.md for the evidence):
- Redis is broker; no result backend: the agent's own records in Redis are the job state,
  nothing reads Celery results.
- Every task is idempotent by design, so acks_late is safe everywhere; with prefetch 1 a
  killed worker strands at most the message it was running.
- visibility_timeout is far above the longest countdown (<= 60 s) plus the longest hard time
  limit (300 s): a message is only redelivered when its worker really died.
- Queues are declared and missing queues are an error, so a typo in a route fails loudly;
  the Procfile and docker-compose start workers on exactly these queues (a test checks it).
"""

import os

from kombu import Queue

broker_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
broker_connection_retry_on_startup = True
broker_transport_options = {"visibility_timeout": 3600}

QUEUES = ("sync", "vast", "arkindex")
task_queues = tuple(Queue(name) for name in QUEUES)
task_default_queue = "sync"
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
task_soft_time_limit = 240
task_time_limit = 300

task_serializer = "json"
accept_content = ["json"]
timezone = "UTC"
worker_hijack_root_logger = False
worker_send_task_events = True  # Flower shows tasks live
task_send_sent_event = True
