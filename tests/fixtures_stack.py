"""Pytest fixtures for the whole local stack (import them from conftest.py).

- `local_stack`: one LocalStack for the test session (time_scale 20, scripted instances),
  using the session's Redis. Tests must not change its global knobs (faults): use
  `make_local_stack` for that.
- `make_local_stack`: a factory `make_local_stack(**LocalStack kwargs)` for a private stack,
  stopped at the end of the test.
"""

import pytest

from ponos_tasks.simulators.stack import LocalStack


@pytest.fixture(scope="session")
def local_stack(redis_url):
    stack = LocalStack(redis_url, time_scale=20.0, start_redis=False)
    stack.start()
    yield stack
    stack.stop()


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
