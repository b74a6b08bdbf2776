"""Celery settings for ponos-vast (filled in by the agent: queues, beat, time limits)."""

import os

broker_url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
task_ignore_result = True
