"""The log text published for a task: the agent's own lines, then the instance's log.

The agent's lines about a task (offer chosen, instance created, retries, why it failed) are
kept in Redis by whichever Celery worker handled the step (`state.TaskLogBook`), and formatted at
publication time with `logging.task_format` through a real `logging.Formatter`, so the
format accepts everything a Python logging format does and the time is the event's time.
Every secret value the agent knows is replaced by `[REDACTED]` in the whole text.

Secrets outside the published log (issue 8, §2.10) are handled here too, in one place:
- `strip_url_queries`: the query string of every URL the agent writes (a pre-signed S3 URL's
  signature is its query), used by the clients' exception messages and, through a log record
  factory (`install_log_scrubbing`), by every log line of the process, libraries included
  (tenacity's retry lines, urllib3's retry warnings quote the URL of a failed request);
- `scrub_event`: a Sentry event with every known secret replaced and URL queries stripped,
  the `before_send` of app.py; the known secrets are the configuration's and those
  `remember_secrets` was told about (task tokens, instance keys), a bounded process-wide set.
"""

import logging
import re
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterable
from typing import Any

DEFAULT_TASK_FORMAT = "[agent %(levelname)s %(asctime)s] %(message)s"
REDACTED = "[REDACTED]"
# Shorter values are not redacted: replacing every "1" or "on" would destroy the log, and a
# secret that short protects nothing anyway (config validation should reject it).
MIN_SECRET_LENGTH = 4


def level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    return number if isinstance(number, int) else logging.INFO


def format_agent_line(
    level: int | str, message: str, created: float, task_format: str = DEFAULT_TASK_FORMAT
) -> str:
    """One agent line, formatted by `logging.Formatter(task_format)` at time `created`."""
    record = logging.LogRecord(
        name="ponos.task",
        level=level_number(level),
        pathname=__file__,
        lineno=0,
        msg=message,
        args=None,
        exc_info=None,
    )
    # LogRecord stamps "now"; the line must carry the time of the event it reports.
    record.created = created
    record.msecs = (created - int(created)) * 1000
    return strip_url_queries(logging.Formatter(task_format).format(record))


def _text(value: str | bytes | None) -> str:
    if value is None:
        return ""
    if isinstance(value, bytes):
        return value.decode("utf-8", errors="replace")
    return value


def redact(text: str | bytes | None, secrets: Iterable[str | None]) -> str:
    """`text` with every secret value (at least MIN_SECRET_LENGTH long) replaced.

    One regular expression with the longest values first, so that a secret containing
    another one is replaced whole, and a replacement is never scanned again.
    """
    text = _text(text)
    values = sorted(
        {str(s) for s in secrets if s is not None and len(str(s)) >= MIN_SECRET_LENGTH},
        key=len,
        reverse=True,
    )
    if not values or not text:
        return text
    pattern = re.compile("|".join(re.escape(value) for value in values))
    return pattern.sub(REDACTED, text)


def build_task_log(
    agent_lines: Iterable[str], instance_log: str | bytes | None, secrets: Iterable[str | None]
) -> str:
    """The agent's lines, then the instance's log text, redacted as a whole.

    ANSI escapes and odd bytes of the instance log are kept (undecodable bytes become U+FFFD).
    """
    head = "".join(line.rstrip("\n") + "\n" for line in agent_lines)
    return redact(head + _text(instance_log), secrets)


# ------------------------------------------------------------------ beyond the published log

# A URL with a scheme, or an absolute path as requests/urllib3 quote it ("url: /key?X-Amz-..."),
# then its query string (up to a space, a quote, a bracket or a fragment).
_URL_QUERY = re.compile(
    r"(?P<keep>(?:\b[a-zA-Z][a-zA-Z0-9+.-]*://|(?<![\w/.?=&%-])/)[^\s?#'\"<>]*)\?[^\s#'\"<>)\]]+"
)


def strip_url_queries(text: str) -> str:
    """`text` with the query string of every URL (and absolute path) replaced by [REDACTED]."""
    if "?" not in text:
        return text
    return _URL_QUERY.sub(lambda m: m.group("keep") + "?" + REDACTED, text)


_factory_lock = threading.Lock()
_installed = False


def install_log_scrubbing() -> None:
    """Strip URL queries from every log record this process creates (idempotent).

    A record factory rather than a handler filter: it sees the records of every logger,
    whatever handlers Celery or the test harness set up later. Records whose message holds
    no "?" are left untouched (their msg and args keep their structure)."""
    global _installed
    with _factory_lock:
        if _installed:
            return
        previous = logging.getLogRecordFactory()

        def factory(*args, **kwargs):
            record = previous(*args, **kwargs)
            try:
                message = record.getMessage()
            except Exception:  # a bad format string: logging reports it when it formats
                return record
            stripped = strip_url_queries(message)
            if stripped != message:
                record.msg, record.args = stripped, None
            return record

        logging.setLogRecordFactory(factory)
        _installed = True


class _SeenSecrets:
    """The secrets this process has handled (task tokens, instance keys), most recent kept."""

    def __init__(self, limit: int = 2000):
        self.limit = limit
        self._values: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def add(self, values: Iterable[str | None]) -> None:
        with self._lock:
            for value in values:
                if value and len(str(value)) >= MIN_SECRET_LENGTH:
                    self._values[str(value)] = None
                    self._values.move_to_end(str(value))
            while len(self._values) > self.limit:
                self._values.popitem(last=False)

    def values(self) -> list[str]:
        with self._lock:
            return list(self._values)


_seen = _SeenSecrets()


def remember_secrets(values: Iterable[str | None]) -> None:
    """Tell the Sentry scrubber about secrets this process handles (bounded memory)."""
    _seen.add(values)


def seen_secrets() -> list[str]:
    return _seen.values()


def scrub_event(event: Any, secrets: Iterable[str | None]) -> Any:
    """A copy of a JSON-like Sentry event: every string (keys too) redacted and without URL
    queries."""
    values = [s for s in secrets if s]

    def clean(node: Any) -> Any:
        if isinstance(node, str):
            return strip_url_queries(redact(node, values))
        if isinstance(node, dict):
            return {clean(k) if isinstance(k, str) else k: clean(v) for k, v in node.items()}
        if isinstance(node, list | tuple):
            return [clean(item) for item in node]
        return node

    return clean(event)


def sentry_before_send(known: Callable[[], Iterable[str | None]]) -> Callable:
    """A Sentry `before_send` (and `before_send_transaction`) scrubbing `known()` secrets
    and those remembered by this process."""

    def before_send(event, hint):
        return scrub_event(event, [*known(), *seen_secrets()])

    return before_send


install_log_scrubbing()
