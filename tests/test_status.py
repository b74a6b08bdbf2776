"""`ponos-vast status` (overview, TASK_ID, --json, --watch) against a real Redis.

The records are written through the agent's own store (what the workers write); expected
figures are worked out by hand from the times written here.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import pty
import select
import signal
import subprocess
import sys
import time

import pytest
from click.testing import CliRunner

from ponos_tasks.commands import status_command
from ponos_tasks.config import ENV_VARS, GENERIC_ENV_PREFIX
from ponos_tasks.models import Instance, Snapshot, TaskRecord
from ponos_tasks.state import Keyspace, TaskLogBook, TaskStore
from tests.conftest import free_port


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No configuration override from the caller's environment (REDIS_URL, VAST_API_KEY...)."""
    names = {name for names in ENV_VARS.values() for name in names}
    names |= {name for name in os.environ if name.upper().startswith(GENERIC_ENV_PREFIX)}
    for name in names | {"PONOS_CONFIG"}:
        monkeypatch.delenv(name, raising=False)


def write_config(tmp_path, redis_url, *, api_key="sim-key", seed="farm-seed-1234"):
    lines = [
        "url: http://127.0.0.1:9/",
        "farm_id: 00000000-0000-4000-8000-000000000000",
        f"seed: {seed}",
        "vast_api:",
        "  url: http://127.0.0.1:9",
    ]
    if api_key is not None:
        lines.append(f"  api_key: {api_key}")
    lines.append(f"redis_url: {redis_url}")
    path = tmp_path / "agent.yml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def running_instance(instance_id, label, gpu, dph, status="running", machine=None):
    return {
        "id": instance_id,
        "label": label,
        "actual_status": status,
        "intended_status": "running",
        "cur_state": "running",
        "next_state": "running",
        "gpu_name": gpu,
        "dph_total": dph,
        "machine_id": machine,
    }


def populate(redis_client, prefix, now):
    """Five tasks in five phases, three snapshot instances (one destroyed), counters and the
    last sync's report (one task held by capacity)."""
    store = TaskStore(redis_client, Keyspace(prefix), clock=lambda: now)
    assert store.create_if_absent(TaskRecord.new("t-accepted", now - 50, phase_changed_at=now - 40))
    assert store.create_if_absent(
        TaskRecord.new(
            "t-waiting",
            now - 70,
            phase="waiting_offer",
            attempt=1,
            failed_machines=[7, 8, 7],
            attempt_reasons=["OCI runtime create failed"],
            waiting_since=now - 30,
            phase_changed_at=now - 30,
        )
    )
    assert store.create_if_absent(
        TaskRecord.new(
            "t-running",
            now - 300,
            phase="running",
            attempt=2,
            label="ponos-0123abcd-t-running-2",
            instance_id=1002,
            machine_id=5002,
            gpu_name="RTX 4090",
            dph_total=0.5,
            instance_created_at=now - 180,
            phase_changed_at=now - 120,
        )
    )
    assert store.create_if_absent(
        TaskRecord.new(
            "t-loading",
            now - 200,
            phase="loading",
            attempt=1,
            label="ponos-0123abcd-t-loading-1",
            instance_id=1003,
            machine_id=5003,
            gpu_name="RTX 3090",
            dph_total=0.25,
            instance_created_at=now - 60,
            start_status="3f2a: Downloading [==>   ] 1.2MB/10MB",
            phase_changed_at=now - 60,
        )
    )
    assert store.create_if_absent(
        TaskRecord.new(
            "t-failed",
            now - 900,
            phase="destroying",
            attempt=1,
            instance_id=1001,
            machine_id=5001,
            gpu_name="A100",
            dph_total=1.5,
            instance_created_at=now - 600,
            final_state="failed",
            reason="exit code 3",
        )
    )
    assert store.cas(
        "t-failed",
        expect_phase="destroying",
        expect_attempt=1,
        phase="done",
        phase_changed_at=now - 10,
    )
    store.save_snapshot(
        Snapshot(
            tuple(
                Instance.from_dict(row)
                for row in (
                    running_instance(
                        1002, "ponos-0123abcd-t-running-2", "RTX 4090", 0.5, machine=5002
                    ),
                    dict(
                        running_instance(
                            1003, "ponos-0123abcd-t-loading-1", "RTX 3090", 0.25, "loading", 5003
                        ),
                        status_msg="3f2a: Downloading [==>   ] 1.2MB/10MB",
                    ),
                    dict(
                        running_instance(1001, "ponos-0123abcd-t-failed-1", "A100", 1.5, "exited"),
                        cur_state="unloaded",
                        next_state="unloaded",
                    ),
                )
            ),
            taken_at=now - 5,
        )
    )
    store.mark_synced(now - 7)
    store.save_sync_report(
        {
            "at": now - 7,
            "asked": 0,
            "max_instances": 4,
            "sync_interval": 10,
            "waiting": {"t-accepted": "4 instances at most; 4 in use, position 1 in the queue"},
        }
    )
    store.count_destroyed("orphan", 2)
    store.count_destroyed("duplicate", 1)


def invoke(*args):
    result = CliRunner().invoke(status_command, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def spent_today(now, start, end, dph):
    """Hand-written: dph over the part of [start, end] after midnight UTC of `now`."""
    midnight = dt.datetime.combine(
        dt.datetime.fromtimestamp(now, dt.UTC).date(), dt.time(), tzinfo=dt.UTC
    ).timestamp()
    return max(0.0, end - max(start, midnight)) / 3600 * dph


def test_status_json(redis_client, redis_url, key_prefix):
    now = time.time()
    populate(redis_client, key_prefix, now)
    doc = json.loads(invoke("--redis-url", redis_url, "--prefix", key_prefix, "--json"))
    tasks = {t["id"]: t for t in doc["tasks"]}
    # Oldest accepted first.
    assert [t["id"] for t in doc["tasks"]] == [
        "t-failed",
        "t-running",
        "t-loading",
        "t-waiting",
        "t-accepted",
    ]
    assert {tid: t["age_in_phase_s"] for tid, t in tasks.items()} == pytest.approx(
        {"t-failed": 10, "t-running": 120, "t-loading": 60, "t-waiting": 30, "t-accepted": 40},
        abs=2,
    )
    assert {tid: t["age_s"] for tid, t in tasks.items()} == pytest.approx(
        {"t-failed": 900, "t-running": 300, "t-loading": 200, "t-waiting": 70, "t-accepted": 50},
        abs=2,
    )
    # Spend: the attempt's dph_total from its create to now, or to the close of a done task.
    assert {tid: t["spend_usd"] for tid, t in tasks.items()} == pytest.approx(
        {
            "t-failed": 1.5 * 590 / 3600,
            "t-running": 0.5 * 180 / 3600,
            "t-loading": 0.25 * 60 / 3600,
            "t-waiting": None,
            "t-accepted": None,
        },
        abs=1e-3,
    )
    assert tasks["t-running"] | {"age_s": 0, "age_in_phase_s": 0, "spend_usd": 0} == {
        "id": "t-running",
        "phase": "running",
        "attempt": 2,
        "instance_id": 1002,
        "machine_id": 5002,
        "gpu_name": "RTX 4090",
        "dph_total": 0.5,
        "age_s": 0,
        "age_in_phase_s": 0,
        "spend_usd": 0,
        "waiting_reason": None,
        "detail": None,
        "final_state": None,
        "reason": None,
    }
    # Why each waiting task waits; what the agent does with the others.
    assert tasks["t-accepted"]["waiting_reason"] == (
        "capacity: 4 instances at most; 4 in use, position 1 in the queue"
    )
    assert tasks["t-waiting"]["waiting_reason"] == (
        "no offer matches the filters for 30s (2 machine(s) that failed this task left out)"
    )
    assert tasks["t-loading"]["waiting_reason"] is None
    assert tasks["t-loading"]["detail"] == "starting: 3f2a: Downloading [==>   ] 1.2MB/10MB"
    assert tasks["t-failed"]["detail"] == "failed: exit code 3"

    instances = [(i["id"], i["task_id"], i["attempt"], i["live"]) for i in doc["instances"]]
    assert instances == [
        (1002, "t-running", 2, True),
        (1003, "t-loading", 1, True),
        (1001, "t-failed", 1, False),
    ]
    assert doc["snapshot_age_s"] == pytest.approx(5, abs=2)
    sync = doc["sync"]
    assert sync.pop("last_sync_age_s") == pytest.approx(7, abs=2)
    assert sync == {
        "sync_interval_s": 10,
        "stale": False,
        "asked_for_tasks": 0,
        "max_instances": 4,
    }
    totals = doc["totals"]
    assert totals.pop("last_sync_age_s") == pytest.approx(7, abs=2)
    assert totals.pop("spend_today_usd") == pytest.approx(
        spent_today(now, now - 600, now - 10, 1.5)
        + spent_today(now, now - 180, now, 0.5)
        + spent_today(now, now - 60, now, 0.25),
        abs=1e-3,
    )
    assert totals == {
        "tasks_per_phase": {
            "accepted": 1,
            "waiting_offer": 1,
            "loading": 1,
            "running": 1,
            "done": 1,
        },
        "active_tasks": 4,
        "waiting_tasks": 2,
        "live_instances": 2,
        "spend_per_hour": 0.75,
        "destroyed_by_cause": {"orphan": 2, "duplicate": 1},
    }


def test_status_text(redis_client, redis_url, key_prefix, tmp_path):
    now = time.time()
    populate(redis_client, key_prefix, now)
    # Through the config file this time (its redis_url); Vast.ai and Arkindex are unreachable.
    config = write_config(tmp_path, redis_url)
    out = invoke("--config", config, "--prefix", key_prefix)
    assert "Tasks (5)" in out
    rows = {
        cells[0]: cells
        for line in out.splitlines()
        if line.startswith("│")
        for cells in [[c.strip() for c in line.strip("│").split("│")]]
    }
    running = rows["t-running"]
    assert running[:6] == ["t-running", "running", "2", "5002", "RTX 4090", "$0.500"]
    assert running[7] in ("2m00s", "2m01s")
    assert running[8] == "$0.0250"
    assert rows["t-accepted"][-1] == (
        "capacity: 4 instances at most; 4 in use, position 1 in the queue"
    )
    assert rows["t-waiting"][-1].startswith("no offer matches the filters for 3")
    assert rows["t-failed"][-1] == "failed: exit code 3"
    assert rows["1001"][3] == "exited → running (destroyed)"
    assert rows["1003"][-1].startswith("3f2a: Downloading")
    assert (
        "Instances in the last snapshot (3, taken 5s ago)" in out
        or "Instances in the last snapshot (3, taken 6s ago)" in out
    )
    assert "Tasks per phase: accepted 1, waiting_offer 1, loading 1, running 1, done 1" in out
    assert "2 waiting" in out
    assert "Live instances: 2, spending $0.7500/h" in out
    assert (
        "Capacity: full: the last sync asked Arkindex for no task; 4 active now, max_instances 4"
        in out
    )
    assert "Destroyed by the sync loop: duplicate 1, orphan 2" in out
    assert "Last sync: 7s ago" in out or "Last sync: 8s ago" in out
    assert "late" not in out


def test_status_empty_prefix_says_never(redis_url, key_prefix):
    out = invoke("--redis-url", redis_url, "--prefix", key_prefix)
    assert "Tasks (0)" in out
    assert "(0, taken never)" in out
    assert "Last sync: never (late: a sync is due every 10 s)" in out
    assert "Live instances: 0, spending $0.0000/h" in out
    assert "Capacity" not in out  # no sync report: nothing known


def test_status_redis_down_and_bad_config(tmp_path):
    result = CliRunner().invoke(
        status_command, ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]
    )
    assert result.exit_code == 1
    assert "cannot read Redis" in result.stderr
    config = write_config(tmp_path, "redis://127.0.0.1:6379/0", api_key=None)
    result = CliRunner().invoke(status_command, ["--config", config])
    assert result.exit_code == 2
    assert result.stderr.startswith("vast_api.api_key: missing")
    result = CliRunner().invoke(status_command, ["--config", config, "--watch", "--json"])
    assert result.exit_code == 2
    assert "--watch draws a live view; --json prints one document" in result.stderr


def test_status_as_subprocess(redis_client, redis_url, key_prefix):
    populate(redis_client, key_prefix, time.time())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "status",
            "--redis-url",
            redis_url,
            "--prefix",
            key_prefix,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["totals"]["live_instances"] == 2


# ---------------------------------------------------------------------------------- TASK_ID


def write_timeline(redis_client, prefix, task_id, now, entries):
    book = TaskLogBook(redis_client, Keyspace(prefix), task_format="%(message)s")
    for offset, level, message in entries:
        book.add(task_id, level, message, created=now + offset)


def test_status_task_id_shows_the_timeline(redis_client, redis_url, key_prefix, tmp_path):
    now = time.time()
    populate(redis_client, key_prefix, now)
    instance_key = "inst-key-" + "9" * 24
    store = TaskStore(redis_client, Keyspace(key_prefix))
    store.remember_instance_key("t-running", 2, instance_key)
    write_timeline(
        redis_client,
        key_prefix,
        "t-running",
        now - 300,
        [
            (0, "INFO", "task accepted by agent a; looking for a Vast.ai offer"),
            (1, "INFO", "attempt 1: 3 offer(s) match the filters; cheapest first: offer 11"),
            (40, "WARNING", "attempt 1 failed on machine 7: OCI runtime create failed"),
            (41.5, "INFO", f"a line quoting the instance key {instance_key} by mistake"),
            (42, "INFO", "seed farm-seed-1234 quoted by mistake"),
        ],
    )
    config = write_config(tmp_path, redis_url)
    # A prefix of the id is enough (the views shorten long ids).
    doc = json.loads(invoke("--config", config, "--prefix", key_prefix, "t-runn", "--json"))
    assert doc["id"] == "t-running"
    assert doc["summary"]["phase"] == "running" and doc["summary"]["attempt"] == 2
    assert doc["record"]["label"] == "ponos-0123abcd-t-running-2"
    assert doc["instance"]["id"] == 1002
    assert [(e["level"], e["t"] - (now - 300)) for e in doc["timeline"]] == [
        ("INFO", pytest.approx(0)),
        ("INFO", pytest.approx(1)),
        ("WARNING", pytest.approx(40)),
        ("INFO", pytest.approx(41.5)),
        ("INFO", pytest.approx(42)),
    ]
    text = json.dumps(doc)
    assert instance_key not in text and "farm-seed-1234" not in text
    assert doc["timeline"][3]["message"] == "a line quoting the instance key [REDACTED] by mistake"
    assert doc["timeline"][0]["time"] == dt.datetime.fromtimestamp(now - 300, dt.UTC).isoformat(
        timespec="milliseconds"
    )

    out = invoke("--config", config, "--prefix", key_prefix, "t-running")
    assert out.startswith("Task t-running  running  attempt 2  instance 1002  machine 5002")
    lines = [line for line in out.splitlines() if line.startswith("│")]
    assert len(lines) == 5
    assert "40s" in lines[2] and "WARNING" in lines[2] and "OCI runtime create failed" in lines[2]


def test_status_task_id_unknown_and_expired_record(redis_client, redis_url, key_prefix):
    now = time.time()
    # The record's tombstone expired; its timeline (kept 14 days) is still there.
    write_timeline(
        redis_client, key_prefix, "t-old", now - 3600, [(0, "INFO", "reported `completed`")]
    )
    doc = json.loads(invoke("--redis-url", redis_url, "--prefix", key_prefix, "t-old", "--json"))
    assert doc["summary"] is None and doc["record"] is None
    assert [e["message"] for e in doc["timeline"]] == ["reported `completed`"]
    out = invoke("--redis-url", redis_url, "--prefix", key_prefix, "t-nobody")
    assert "Task t-nobody  (no record" in out
    assert "no entry (kept 14 days after the last one)" in out


# ---------------------------------------------------------------------------------- --watch


def wait_draining(pid: int, fd: int, timeout: float = 30.0) -> int:
    """waitpid, reading the pty meanwhile: a child whose redraws filled the pty's buffer
    blocks in its write until someone reads, and never gets to exit (a real terminal
    always reads)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return status
        ready, _, _ = select.select([fd], [], [], 0.1)
        if ready:
            with contextlib.suppress(OSError):  # the child closed its end: nothing to read
                os.read(fd, 65536)
    raise AssertionError(f"the status view did not exit within {timeout:g} s of Ctrl-C")


def test_status_watch_in_a_terminal(redis_client, redis_url, key_prefix):
    """The live view in a real pseudo-terminal: drawn, redrawn with what changed, Ctrl-C
    ends it with status 0."""
    now = time.time()
    populate(redis_client, key_prefix, now)
    pid, fd = pty.fork()
    if pid == 0:  # the child: the command, its terminal the pty
        os.environ.update(COLUMNS="160", LINES="50", TERM="xterm-256color")
        # Ctrl-C as a shell would deliver it: an ignored or blocked SIGINT is kept across
        # exec, and a test earlier in the run may have left the pytest process so.
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        os.execv(
            sys.executable,
            [
                sys.executable,
                "-m",
                "ponos_tasks.cli",
                "status",
                "--redis-url",
                redis_url,
                "--prefix",
                key_prefix,
                "--watch",
                "--interval",
                "0.3",
            ],
        )
    screen = b""

    def read_until(marker: bytes, timeout: float = 30.0) -> None:
        nonlocal screen
        deadline = time.monotonic() + timeout
        while marker not in screen:
            assert time.monotonic() < deadline, f"{marker!r} never shown:\n{screen[-3000:]!r}"
            ready, _, _ = select.select([fd], [], [], 0.2)
            if ready:
                try:
                    screen += os.read(fd, 65536)
                except OSError:
                    break

    try:
        read_until(b"Tasks (5)")
        assert b"\x1b[?1049h" in screen  # the alternate screen: the view is redrawn in place
        # A new task appears at the next redraw.
        TaskStore(redis_client, Keyspace(key_prefix)).create_if_absent(
            TaskRecord.new("t-new-one", time.time())
        )
        read_until(b"Tasks (6)")
        read_until(b"t-new-one")
        os.kill(pid, signal.SIGINT)
        status = wait_draining(pid, fd)
        pid = 0
        assert os.waitstatus_to_exitcode(status) == 0
    finally:
        if pid:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
        os.close(fd)


def test_status_shows_the_metered_spend_once_the_meter_runs(redis_client, redis_url, key_prefix):
    """The budget's meter (what the Vast.ai ledger would bill) replaces the estimates from
    the records, and `--json` carries the budget's figures."""
    from ponos_tasks.budget import utc_day

    now = time.time()
    populate(redis_client, key_prefix, now)
    keys = Keyspace(key_prefix)
    before = json.loads(invoke("--redis-url", redis_url, "--prefix", key_prefix, "--json"))
    assert before["budget"]["metering"] is False
    redis_client.set(keys.spend_epoch, repr(now - 600))
    redis_client.set(keys.spend_task("t-running"), "0.125")
    redis_client.set(keys.spend_day(utc_day(now)), "0.5")
    doc = json.loads(invoke("--redis-url", redis_url, "--prefix", key_prefix, "--json"))
    assert doc["totals"]["spend_today_usd"] == 0.5 != before["totals"]["spend_today_usd"]
    running = next(t for t in doc["tasks"] if t["id"] == "t-running")
    assert running["spend_usd"] == 0.125
    assert doc["budget"]["task_spend"] == {"t-running": 0.125}
