"""Pytest fixtures for the whole local stack (import them from conftest.py).

- `local_stack`: one LocalStack for the test session (time_scale 20, scripted instances),
  using the session's Redis. Tests must not change its global knobs (faults): use
  `make_local_stack` for that.
- `make_local_stack`: a factory `make_local_stack(**LocalStack kwargs)` for a private stack,
  stopped at the end of the test.
- `running_stack`: a LocalStack on the session's Redis for a module's own fixture (its own
  time_scale, offers put on the market).
"""

import contextlib
from collections.abc import Iterator

import pytest
import requests

from ponos_tasks.simulators.stack import LocalStack


@contextlib.contextmanager
def running_stack(
    redis_url: str, time_scale: float, offers: list[dict] | None = None
) -> Iterator[LocalStack]:
    stack = LocalStack(redis_url, time_scale=time_scale, start_redis=False)
    stack.start()
    try:
        if offers is not None:
            requests.post(
                stack.vast_url + "/_sim/offers", json={"offers": offers}, timeout=30
            ).raise_for_status()
        yield stack
    finally:
        stack.stop()


@pytest.fixture(scope="session")
def local_stack(redis_url):
    with running_stack(redis_url, 20.0) as stack:
        yield stack


@pytest.fixture
def make_local_stack(redis_url):
    stacks = []

    def make(**kwargs):
        kwargs.setdefault("start_redis", False)
        stack = LocalStack(kwargs.pop("redis_url", redis_url), **kwargs)
        stacks.append(stack)
        return stack.start()

    yield make
    for stack in reversed(stacks):
        stack.stop()
