"""Worker, beat and `check-config --connect` against services that do not answer: exit status
1 and one line naming the key to fix, instead of Celery retrying a dead broker forever.

Real processes (a clean environment: REDIS_URL of the test run must not override the file).
"""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
FARM = "2c3d0f4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"

pytestmark = pytest.mark.stack


def config_file(tmp_path, *, redis_url: str, arkindex_url: str) -> str:
    path = tmp_path / "agent.yml"
    path.write_text(
        textwrap.dedent(
            f"""
            url: {arkindex_url}
            farm_id: {FARM}
            seed: seed-0123456789abcdef
            redis_url: {redis_url}
            vast_api:
              url: http://127.0.0.1:{free_port()}
              api_key: vast-key-abcdef
            """
        )
    )
    return str(path)


def run(args: list[str], config: str, tmp_path, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), "PONOS_CONFIG": config},
        timeout=timeout,
    )


@pytest.mark.parametrize(
    "argv",
    [
        ["-m", "celery", "-A", "ponos_tasks.app", "worker", "--pool", "solo"],
        ["-m", "celery", "-A", "ponos_tasks.app", "beat", "--schedule", "{tmp}/beat-schedule"],
    ],
    ids=["worker", "beat"],
)
def test_worker_and_beat_exit_1_when_no_redis_answers(tmp_path, argv):
    port = free_port()  # nothing listens there
    config = config_file(
        tmp_path, redis_url=f"redis://127.0.0.1:{port}/0", arkindex_url="http://127.0.0.1:1"
    )
    result = run([a.replace("{tmp}", str(tmp_path)) for a in argv], config, tmp_path)
    assert result.returncode == 1, result.stderr[-2000:]
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith(
        f"ponos-vast: cannot start: redis_url: no usable Redis at redis://127.0.0.1:{port}/0 ("
    ), last


@pytest.mark.parametrize(
    ("redis", "arkindex", "expected"),
    [
        ("closed", "closed", "redis_url: no usable Redis at redis://127.0.0.1:{port}/0 (Error 111"),
        ("test", "closed", "url: Arkindex URL http://127.0.0.1:{port}/: nothing answers there"),
    ],
)
def test_check_config_connect_names_the_service_that_does_not_answer(
    tmp_path, redis_url, redis, arkindex, expected
):
    port = free_port()
    config = config_file(
        tmp_path,
        redis_url=redis_url if redis == "test" else f"redis://127.0.0.1:{port}/0",
        arkindex_url=f"http://127.0.0.1:{port}" if arkindex == "closed" else "",
    )
    result = run(["-m", "ponos_tasks.cli", "check-config", "--connect", config], config, tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected.format(port=port)), lines


@pytest.mark.parametrize(("reads", "checks"), [("flat", True), ("full_list", False)])
def test_beat_schedules_the_ended_check_midway_with_the_flat_view(tmp_path, reads, checks):
    config = config_file(tmp_path, redis_url="redis://127.0.0.1:1/0", arkindex_url="http://x")
    with open(config, "a") as file:
        file.write(f"  instance_reads: {reads}\nsync_interval: 8\n")
    probe = (
        "from ponos_tasks.app import app\n"
        "for name, entry in sorted(app.conf.beat_schedule.items()):\n"
        "    print(name, entry['task'], entry['schedule'], entry['options']['expires'])\n"
    )
    result = run(["-c", probe], config, tmp_path)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert "ponos-sync ponos.sync 8.0 8.0" in lines
    assert ("ponos-check-ended ponos.check_ended 4.0 4.0" in lines) is checks
    assert len(lines) == 1 + checks
