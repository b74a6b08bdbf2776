"""Celery settings of ponos-vast: the documented entry point, for `celery --config`.

The settings live in the package (ponos_tasks/celery_settings.py, with why each one), so
that the app imports from any working directory; ponos_tasks/app.py loads them from there.
"""

from ponos_tasks.celery_settings import *  # noqa: F403
