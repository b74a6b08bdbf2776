"""The Celery application of ponos-vast (settings in celeryconfig.py, tasks in tasks.py).

The beat entry comes from the agent's configuration (`sync_interval`); worker and beat
refuse to start on a bad configuration (exit status 2, one line per problem), and a worker
registers with Arkindex and checks its Vast.ai key before taking any task.
"""

import logging
import os
import sys

from celery import Celery, signals

from ponos_tasks.config import ConfigError, load_config

app = Celery("ponos_tasks")
app.config_from_object("celeryconfig")
app.conf.include = ["ponos_tasks.tasks"]

logger = logging.getLogger(__name__)


def _config_or_none():
    try:
        return load_config(os.environ.get("PONOS_CONFIG"))
    except ConfigError:
        return None  # reported (and fatal) in the worker/beat init signals below


_config = _config_or_none()
if _config is not None:
    app.conf.broker_url = _config.redis_url
    SYNC_INTERVAL = _config.sync_interval
else:
    SYNC_INTERVAL = 10.0
app.conf.beat_schedule = {
    "ponos-sync": {
        "task": "ponos.sync",
        "schedule": SYNC_INTERVAL,
        # A tick nobody ran in time is worthless: the next one does the same work.
        "options": {"queue": "sync", "expires": SYNC_INTERVAL},
    },
}


def _fatal_config():
    try:
        config = load_config(os.environ.get("PONOS_CONFIG"))
    except ConfigError as error:
        for problem in error.problems:
            print(problem, file=sys.stderr)
        sys.stderr.flush()
        os._exit(2)
    logging.getLogger("ponos_tasks").setLevel(config.logging.level)
    if config.sentry.dsn:
        import sentry_sdk
        from sentry_sdk.integrations.celery import CeleryIntegration

        sentry_sdk.init(dsn=config.sentry.dsn, environment=config.sentry.environment,
                        integrations=[CeleryIntegration()], send_default_pii=False)
    return config


@signals.beat_init.connect
def _check_beat(**_):
    _fatal_config()


@signals.worker_init.connect
def _set_up_worker(**_):
    """Set-up (DESIGN §1): config, Arkindex registration, one authenticated Vast.ai call."""
    _fatal_config()
    from ponos_tasks.agent import get_context
    from ponos_tasks.arkindex import ArkindexError
    from ponos_tasks.vast import VastError

    context = get_context()
    try:
        context.agent_short_id()  # registers (or reuses the stored credentials)
        context.vast.check_auth()
    except (ArkindexError, VastError) as error:
        print(f"ponos-vast: cannot start: {error}", file=sys.stderr)
        sys.stderr.flush()
        os._exit(1)
    logger.info("agent %s ready: %s", context.config.agent_name,
                "; ".join(context.config.summary()))
