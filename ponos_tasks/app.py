"""The Celery application of ponos-vast (settings in celery_settings.py, tasks in tasks.py).

The configuration is read once per process, when this module is imported: it gives the
broker (the agent's Redis) and the beat entry (`sync_interval`). An unusable configuration
does not stop the import (Flower, `celery inspect` and tests import the app), but worker and
beat refuse to start on it: exit status 2, one line per problem. A worker then registers with
Arkindex and checks its Vast.ai key before taking any task.
"""

import logging
import os
import sys

from celery import Celery, signals

from ponos_tasks.config import ConfigError, current_config, redis_url_from_environment
from ponos_tasks.models import SYNC_QUEUE

app = Celery("ponos_tasks")
app.config_from_object("ponos_tasks.celery_settings")
app.conf.include = ["ponos_tasks.tasks"]

logger = logging.getLogger(__name__)

try:
    _config, _config_error = current_config(), None
except ConfigError as error:
    _config, _config_error = None, error

if _config is not None:
    app.conf.broker_url = _config.redis_url
    app.conf.beat_schedule = {
        "ponos-sync": {
            "task": "ponos.sync",
            "schedule": _config.sync_interval,
            # A tick nobody ran in time is worthless: the next one does the same work.
            "options": {"queue": SYNC_QUEUE, "expires": _config.sync_interval},
        },
    }
    if _config.vast_api.instance_reads == "flat":
        # Ended instances seen midway between two syncs (loop.check_ended).
        app.conf.beat_schedule["ponos-check-ended"] = {
            "task": "ponos.check_ended",
            "schedule": _config.sync_interval / 2,
            "options": {"queue": SYNC_QUEUE, "expires": _config.sync_interval / 2},
        }
else:
    # Only for the processes that merely inspect the app; worker and beat exit below.
    app.conf.broker_url = redis_url_from_environment()


# The real stderr: beat redirects sys.stderr into its log (a "WARNING" line) by then.
_STDERR = sys.__stderr__


def _require_config():
    """The configuration, or exit 2 with its problems (worker and beat only)."""
    if _config_error is not None:
        for problem in _config_error.problems:
            print(problem, file=_STDERR)
        _STDERR.flush()
        os._exit(2)
    logging.getLogger("ponos_tasks").setLevel(_config.logging.level)
    if _config.sentry.dsn:
        init_sentry(_config)
    return _config


def init_sentry(config, **options) -> None:
    """Sentry for worker and beat, without any secret (issue 8, §2.10).

    The clients' frames hold task tokens, pre-signed URLs and registry passwords in local
    variables: none is sent (include_local_variables=False). Every event then goes through a
    scrubber that replaces each secret the process knows (the configuration's, the task tokens
    and instance keys it handled) and strips URL query strings. `options` are for tests (a
    local transport)."""
    import sentry_sdk
    from sentry_sdk.integrations.celery import CeleryIntegration

    from ponos_tasks.logs import sentry_before_send

    scrub = sentry_before_send(config.secrets)
    sentry_sdk.init(
        dsn=config.sentry.dsn,
        environment=config.sentry.environment,
        integrations=[CeleryIntegration()],
        send_default_pii=False,
        include_local_variables=False,
        before_send=scrub,
        before_send_transaction=scrub,
        **options,
    )


def _require_services(**checks) -> None:
    """Exit 1 with one line naming the service that cannot be used (instead of Celery retrying
    an unreachable broker forever, or a traceback)."""
    from ponos_tasks.agent import get_context, service_problem

    problem = service_problem(get_context(), **checks)
    if problem is not None:
        print(f"ponos-vast: cannot start: {problem}", file=_STDERR)
        _STDERR.flush()
        os._exit(1)


@signals.beat_init.connect
def _check_beat(**_):
    _require_config()
    _require_services(arkindex=False, vast=False)  # beat only talks to Redis


@signals.worker_init.connect
def _set_up_worker(**_):
    """Set-up: configuration, Redis, Arkindex registration, one authenticated Vast.ai call."""
    _require_config()
    from ponos_tasks.agent import get_context

    _require_services()
    context = get_context()
    logger.info(
        "agent %s ready: %s", context.config.agent_name, "; ".join(context.config.summary())
    )
