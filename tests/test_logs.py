"""Task log assembly: agent lines (formatted by logging.task_format, stored in Redis),
instance log, redaction."""

import logging
import time

import pytest

from ponos_tasks.logs import (
    DEFAULT_TASK_FORMAT,
    REDACTED,
    build_task_log,
    format_agent_line,
    redact,
)
from ponos_tasks.state import Keyspace, TaskLogBook

T0 = 1_700_000_000.25  # a fixed instant: the line must carry this time, not "now"


def expected_asctime(created: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created)) + ",250"


def test_format_uses_the_record_time_and_default_format():
    line = format_agent_line("info", "creating instance on offer 12", T0)
    assert line == f"[agent INFO {expected_asctime(T0)}] creating instance on offer 12"


def test_format_accepts_any_logging_format_and_percent_in_messages():
    line = format_agent_line(
        logging.WARNING, "disk 100% full", T0, "%(levelname)s|%(name)s|%(message)s"
    )
    assert line == "WARNING|ponos.task|disk 100% full"
    assert format_agent_line("nonsense", "m", T0, "%(levelname)s") == "INFO"


def test_redact_longest_first_and_short_values_ignored():
    secrets = ["abcd", "abcdefgh", "", None, "x", "key"]
    text = "token=abcdefgh other=abcd short=x key=key"
    assert redact(text, secrets) == f"token={REDACTED} other={REDACTED} short=x key=key"


def test_redact_special_characters_and_bytes():
    secret = "p@ss.w*rd(1)+[x]"
    assert redact(f"url=redis://:{secret}@h/0", [secret]) == f"url=redis://:{REDACTED}@h/0"
    assert redact(b"\xffseed-1234\n", ["seed-1234"]) == f"\ufffd{REDACTED}\n"
    assert redact(None, ["abcd"]) == ""
    assert redact("nothing", []) == "nothing"


def test_redact_does_not_rescan_replacements():
    # "REDACTED" itself as a secret must not loop or double-replace.
    assert redact("aREDACTEDb", ["REDACTED"]) == f"a{REDACTED}b"


def test_build_task_log_order_ansi_and_redaction():
    agent = ["[agent INFO] using key VASTKEY123", "[agent INFO] instance 5 created\n"]
    instance = b"\x1b[32mstarting\x1b[0m with token TASKTOKEN99\nPONOS_EXIT_CODE=0\n"
    text = build_task_log(agent, instance, ["VASTKEY123", "TASKTOKEN99"])
    assert text == (
        f"[agent INFO] using key {REDACTED}\n[agent INFO] instance 5 created\n"
        f"\x1b[32mstarting\x1b[0m with token {REDACTED}\nPONOS_EXIT_CODE=0\n"
    )
    assert build_task_log([], None, []) == ""
    assert build_task_log(["only agent"], "", []) == "only agent\n"


def test_log_book_roundtrip_in_redis(redis_client, key_prefix):
    book = TaskLogBook(
        redis_client, Keyspace(key_prefix), task_format="%(levelname)s %(asctime)s %(message)s"
    )
    book.add("task-1", "info", "chose offer 7 at $0.31/h", created=T0)
    book.add("task-1", logging.ERROR, "instance stuck in loading", created=T0 + 60)
    book.add("task-2", "warning", "other task", created=T0)
    assert book.lines("task-1") == [
        f"INFO {expected_asctime(T0)} chose offer 7 at $0.31/h",
        f"ERROR {expected_asctime(T0 + 60)} instance stuck in loading",
    ]
    assert len(book.lines("task-2")) == 1
    assert book.lines("unknown") == []
    book.clear("task-1")
    assert book.lines("task-1") == []
    assert redis_client.ttl(Keyspace(key_prefix).task_log("task-2")) > 0


def test_log_book_is_bounded(redis_client, key_prefix):
    book = TaskLogBook(
        redis_client, Keyspace(key_prefix), task_format=DEFAULT_TASK_FORMAT, max_lines=3
    )
    for number in range(7):
        book.add("t", "info", f"line {number}", created=T0)
    lines = book.lines("t")
    assert lines[0] == "[agent] ... 4 earlier agent lines dropped ..."
    assert [line.rsplit(" ", 2)[-2:] for line in lines[1:]] == [
        ["line", "4"],
        ["line", "5"],
        ["line", "6"],
    ]


def test_log_book_default_format_is_ponos_default(redis_client, key_prefix):
    book = TaskLogBook(redis_client, Keyspace(key_prefix), task_format=DEFAULT_TASK_FORMAT)
    assert book.task_format == DEFAULT_TASK_FORMAT
    book.add("t", "debug", "hello")
    (line,) = book.lines("t")
    assert line.startswith("[agent DEBUG ") and line.endswith("] hello")


@pytest.mark.parametrize("message", ["émoji 🚀", "\x1b[1mbold\x1b[0m", "multi\nline"])
def test_log_book_keeps_any_text(redis_client, key_prefix, message):
    book = TaskLogBook(redis_client, Keyspace(key_prefix), task_format="%(message)s")
    book.add("t", "info", message)
    assert book.lines("t") == [message]
