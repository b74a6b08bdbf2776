"""The log text published for a task: the agent's own lines, then the instance's log.

The agent's lines about a task (offer chosen, instance created, retries, why it failed) are
kept in Redis by whichever Celery worker handled the step (`state.TaskLogBook`), and formatted at
publication time with `logging.task_format` through a real `logging.Formatter`, so the
format accepts everything a Python logging format does and the time is the event's time.
Every secret value the agent knows is replaced by `[REDACTED]` in the whole text.
"""

import logging
import re
from collections.abc import Iterable

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
    return logging.Formatter(task_format).format(record)


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
