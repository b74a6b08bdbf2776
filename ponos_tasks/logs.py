"""The log text published for a task: the agent's own lines, then the instance's log.

The agent's lines about a task (offer chosen, instance created, retries, why it failed) are
kept in Redis by whichever Celery worker handled the step (`TaskLogBook`), and formatted at
publication time with `logging.task_format` through a real `logging.Formatter`, so the
format accepts everything a Python logging format does and the time is the event's time.
Every secret value the agent knows is replaced by `[REDACTED]` in the whole text.
"""

import json
import logging
import re
import time
from collections.abc import Iterable

DEFAULT_TASK_FORMAT = "[agent %(levelname)s %(asctime)s] %(message)s"
REDACTED = "[REDACTED]"
# Shorter values are not redacted: replacing every "1" or "on" would destroy the log, and a
# secret that short protects nothing anyway (config validation should reject it).
MIN_SECRET_LENGTH = 4


def _level_number(level: int | str) -> int:
    if isinstance(level, int):
        return level
    number = logging.getLevelName(str(level).upper())
    return number if isinstance(number, int) else logging.INFO


def format_agent_line(
    level: int | str, message: str, created: float, task_format: str = DEFAULT_TASK_FORMAT
) -> str:
    """One agent line, formatted by `logging.Formatter(task_format)` at time `created`."""
    record = logging.LogRecord(
        name="ponos.task", level=_level_number(level), pathname=__file__, lineno=0,
        msg=message, args=None, exc_info=None,
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


class TaskLogBook:
    """Per-task agent lines kept in Redis (any worker can add, the publisher reads them).

    Each task keeps its last `max_lines` entries (a Redis list trimmed on every add) and a
    count of the dropped ones; keys expire `ttl` seconds after the last add.
    """

    def __init__(
        self,
        redis,
        prefix: str = "ponos:tasklog:",
        *,
        task_format: str = DEFAULT_TASK_FORMAT,
        max_lines: int = 500,
        ttl: int = 14 * 24 * 3600,
    ):
        self.redis = redis
        self.prefix = prefix
        self.task_format = task_format
        self.max_lines = max_lines
        self.ttl = ttl

    def _keys(self, task_id: str) -> tuple[str, str]:
        return f"{self.prefix}{task_id}", f"{self.prefix}{task_id}:dropped"

    def add(self, task_id: str, level: int | str, message: str, *, created: float | None = None):
        key, dropped_key = self._keys(task_id)
        entry = json.dumps({
            "t": time.time() if created is None else created,
            "level": logging.getLevelName(_level_number(level)),
            "msg": str(message),
        })
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, entry)
        pipe.ltrim(key, -self.max_lines, -1)
        pipe.expire(key, self.ttl)
        length = pipe.execute()[0]
        if length > self.max_lines:
            pipe = self.redis.pipeline(transaction=True)
            pipe.incrby(dropped_key, length - self.max_lines)
            pipe.expire(dropped_key, self.ttl)
            pipe.execute()

    def lines(self, task_id: str) -> list[str]:
        """The formatted lines, oldest first (with a note first when some were dropped)."""
        key, dropped_key = self._keys(task_id)
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(key, 0, -1)
        pipe.get(dropped_key)
        raw_entries, dropped = pipe.execute()
        lines = []
        if dropped and int(dropped):
            lines.append(f"[agent] ... {int(dropped)} earlier agent lines dropped ...")
        for raw in raw_entries:
            entry = json.loads(raw)
            lines.append(
                format_agent_line(entry["level"], entry["msg"], entry["t"], self.task_format)
            )
        return lines

    def clear(self, task_id: str) -> None:
        self.redis.delete(*self._keys(task_id))
