"""The local stack: starts, answers on every URL, stops cleanly (in-process and as a command)."""

import os
import re
import signal
import subprocess
import sys
import threading
import time

import pytest
import redis
import requests

from ponos_tasks.simulators.s3 import s3_client
from ponos_tasks.simulators.stack import LocalStack, redis_answers
from tests.conftest import free_port


def answers(url: str) -> bool:
    try:
        requests.get(url, timeout=2)
        return True
    except requests.ConnectionError:
        return False


def check_urls_answer(stack) -> None:
    schema = requests.get(f"{stack.arkindex_url}/api/v1/openapi/?format=json", timeout=10)
    assert schema.status_code == 200 and "CreateAgent" in schema.text
    account = requests.get(
        f"{stack.vast_url}/api/v0/users/current/",
        timeout=10,
        headers={"Authorization": f"Bearer {stack.vast_api_key}"},
    )
    assert account.status_code == 200, account.text
    s3_client(stack.s3_url).list_buckets()  # raises if S3 does not answer
    if stack.redis_url:
        assert redis.Redis.from_url(stack.redis_url).ping()


def test_fixture_stack_urls_answer(local_stack):  # noqa: F811
    check_urls_answer(local_stack)
    env = local_stack.env()
    assert env["PONOS_ARKINDEX_URL"] == local_stack.arkindex_url
    assert env["PONOS_FARM_ID"] == local_stack.farm_id
    assert env["PONOS_VAST_API_KEY"] == local_stack.vast_api_key
    config = local_stack.config_yaml()
    assert local_stack.seed in config and local_stack.vast_url in config
    for url in (local_stack.arkindex_url, local_stack.vast_url, local_stack.s3_url):
        assert url.startswith("http://127.0.0.1:")


def test_printed_config_and_env_are_accepted_by_the_agent_config(local_stack, tmp_path):  # noqa: F811
    from ponos_tasks.config import load_config

    path = tmp_path / "agent.yml"
    path.write_text(local_stack.config_yaml())
    for config in (
        load_config(str(path), environ={}),
        load_config(None, environ=local_stack.env()),
    ):
        assert config.url == local_stack.arkindex_url
        assert str(config.farm_id) == local_stack.farm_id and config.seed == local_stack.seed
        assert config.vast_api.url == local_stack.vast_url
        assert config.vast_api.api_key == local_stack.vast_api_key
        assert config.redis_url == local_stack.redis_url


def test_stack_starts_its_own_redis_and_stops_everything(redis_url):
    threads_before = set(threading.enumerate())
    missing_redis = f"redis://127.0.0.1:{free_port()}/0"  # nothing answers there
    stack = LocalStack(missing_redis, time_scale=50.0)
    stack.start()
    try:
        assert stack.redis_process is not None and stack.redis_url != missing_redis
        check_urls_answer(stack)
        urls = [stack.arkindex_url, stack.vast_url, stack.s3_url]
        redis_url_started = stack.redis_url
        proc = stack.redis_process.proc
    finally:
        stack.stop()
    assert proc.poll() is not None  # redis-server exited
    assert not redis_answers(redis_url_started)
    assert not any(answers(url) for url in urls)
    # No thread left behind (servers joined); give exiting threads a moment to finish.
    deadline = time.monotonic() + 5
    while set(threading.enumerate()) - threads_before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert set(threading.enumerate()) - threads_before == set()
    stack.stop()  # idempotent


def test_two_stacks_side_by_side(make_local_stack):  # noqa: F811
    first, second = make_local_stack(), make_local_stack()
    assert len({first.arkindex_url, second.arkindex_url, first.vast_url, second.vast_url}) == 4
    check_urls_answer(second)
    assert first.farm_id != second.farm_id


def _run_command(sig, tmp_path):
    missing_redis = f"redis://127.0.0.1:{free_port()}/0"
    env_file = tmp_path / "stack.env"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ponos_tasks.simulators.stack",
            "--redis-url",
            missing_redis,
            "--env-file",
            str(env_file),
            "--time-scale",
            "50",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=dict(os.environ, PYTHONUNBUFFERED="1"),
    )
    lines = []
    try:
        deadline = time.monotonic() + 60
        for line in proc.stdout:
            lines.append(line)
            if "Local stack ready" in line or time.monotonic() > deadline:
                break
        output = "".join(lines)
        assert "Local stack ready" in output, output
        urls = dict(re.findall(r"^export (PONOS_\w+_URL|REDIS_URL)=(\S+)$", output, re.M))
        assert set(urls) >= {"PONOS_ARKINDEX_URL", "PONOS_VAST_URL", "PONOS_S3_URL", "REDIS_URL"}
        assert env_file.read_text().count("export ") >= 6
        assert "url: " + urls["PONOS_ARKINDEX_URL"] in output  # the YAML config snippet
        for name in ("PONOS_ARKINDEX_URL", "PONOS_VAST_URL", "PONOS_S3_URL"):
            assert answers(urls[name]), name
        assert redis_answers(urls["REDIS_URL"])

        proc.send_signal(sig)
        rest, _ = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, rest
    assert "Local stack stopped." in rest
    assert "Traceback" not in rest
    assert not redis_answers(urls["REDIS_URL"])  # its redis-server was stopped too
    assert not any(
        answers(urls[n]) for n in ("PONOS_ARKINDEX_URL", "PONOS_VAST_URL", "PONOS_S3_URL")
    )


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "Ctrl-C"])
def test_stack_command_prints_urls_and_stops_on_signal(sig, tmp_path):
    _run_command(sig, tmp_path)
