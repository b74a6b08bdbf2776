"""Shared fixtures: a real Redis on loopback and helpers for ephemeral ports.

Redis: REDIS_URL when it answers (the Makefile makes sure it does), otherwise a private
`redis-server` started on a free loopback port for this session. Each test gets its own key
prefix so that two test runs can share one Redis.

The `stack` marker: tests that need Redis, the simulators or the local stack, sockets or
child processes are marked `stack` here at collection (by fixture, folder or module), so that
`pytest -m "not stack"` (make test-fast) runs the pure tests in seconds. A test left unmarked
that opens a socket or starts a process fails with a message saying how to mark it.
"""

import os
import shutil
import socket
import subprocess
import threading
import time
import uuid
from pathlib import Path

import pytest
import redis

from tests.fixtures_stack import local_stack, make_local_stack  # noqa: F401


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory):
    url = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
    if _answers(url):
        yield url
        return
    if shutil.which("redis-server") is None:
        pytest.fail(
            f"no Redis answers at {url} and redis-server is not installed (run `make test`)"
        )
    port = free_port()
    workdir = tmp_path_factory.mktemp("redis")
    proc = subprocess.Popen(
        [
            "redis-server",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            str(workdir),
        ],
        stdout=subprocess.DEVNULL,
    )
    url = f"redis://127.0.0.1:{port}/0"
    for _ in range(100):
        if _answers(url):
            break
        time.sleep(0.05)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture
def redis_client(redis_url):
    client = redis.Redis.from_url(redis_url)
    yield client
    client.close()


@pytest.fixture
def key_prefix(redis_client):
    """A unique Redis key prefix for one test; its keys are deleted afterwards."""
    prefix = f"test-{uuid.uuid4().hex[:12]}:"
    yield prefix
    for key in redis_client.scan_iter(match=prefix + "*"):
        redis_client.delete(key)


# --------------------------------------------------------------------- the `stack` marker

TESTS_DIR = Path(__file__).resolve().parent
# Fixtures that give a test Redis or a running simulator / stack.
STACK_FIXTURES = {
    "redis_url",
    "redis_client",
    "key_prefix",
    "local_stack",
    "make_local_stack",
    "private_redis",
    "make_sim",
    "sim",
    "api",
    "s3_server",
}
# Folders whose tests all run simulators or real processes.
STACK_DIRS = {TESTS_DIR / "simulators", TESTS_DIR / "e2e"}
# Markers that imply real processes.
STACK_MARKERS = {"e2e", "vastai_cli", "base_worker"}
# Modules whose tests start simulators, HTTP servers or processes through their own module
# fixtures or inline (the socket/process guard below finds any that is missing here).
STACK_MODULES = {
    "test_arkindex_client.py",
    "test_bad_tasks.py",
    "test_commands.py",
    "test_demo.py",
    "test_deploy.py",
    "test_metrics.py",
    "test_offers_simulator.py",
    "test_offers_vastai_parity.py",
    "test_ratelimit.py",
    "test_registry_client.py",
    "test_secret_places.py",
    "test_secrets.py",
    "test_sim_extra.py",
    "test_startup.py",
    "test_status.py",
    "test_steps.py",
    "test_vast_client.py",
    "test_wrapper.py",
}
# Single tests of otherwise pure modules: a subprocess (a clean interpreter or the CLI) or a
# loopback socket.
STACK_TESTS = {
    "test_config.py::test_check_config_command_exits_2_one_line_per_problem",
    "test_doctor.py::test_doctor_runs_without_the_simulators",
    "test_offers.py::test_module_is_pure",
    "test_overview.py::test_view_modules_are_pure",
    "test_reconcile.py::test_pure_modules_import_no_redis_celery_or_requests",
    "test_vast_client_units.py::test_never_sent_distinguishes_refused_connections_from_lost_answers",
}


def _needs_stack(item) -> bool:
    path = Path(str(item.fspath)).resolve()
    if any(d in path.parents for d in STACK_DIRS) or path.name in STACK_MODULES:
        return True
    if f"{path.name}::{getattr(item, 'originalname', item.name)}" in STACK_TESTS:
        return True
    if STACK_FIXTURES & set(getattr(item, "fixturenames", ())):
        return True
    return any(item.get_closest_marker(name) for name in STACK_MARKERS)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if _needs_stack(item):
            item.add_marker(pytest.mark.stack)


class _NotInFastTests(RuntimeError):
    pass


@pytest.fixture(autouse=True)
def _fast_tests_stay_pure(request, monkeypatch):
    """A test not marked `stack` may not open a socket or start a process.

    Only the test's own thread is refused: threads of session fixtures (a simulator serving,
    a Redis client) keep working while a fast test runs in a full run.
    """
    if request.node.get_closest_marker("stack"):
        yield
        return
    where = request.node.nodeid
    test_thread = threading.current_thread()

    def refuse(what, original):
        def guard(*args, **kwargs):
            if threading.current_thread() is not test_thread:
                return original(*args, **kwargs)
            raise _NotInFastTests(
                f"{where} {what} but is not marked `stack`: use a stack fixture, or add its "
                f"module to STACK_MODULES (or the test to STACK_TESTS) in tests/conftest.py"
            )

        return guard

    for name in ("connect", "connect_ex", "bind"):
        monkeypatch.setattr(
            socket.socket, name, refuse(f"calls socket.{name}", getattr(socket.socket, name))
        )
    monkeypatch.setattr(
        subprocess.Popen,
        "_execute_child",
        refuse("starts a process", subprocess.Popen._execute_child),
    )
    monkeypatch.setattr(os, "fork", refuse("forks", os.fork))
    yield
