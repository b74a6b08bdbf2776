"""The Redis-shared rate limiter, alone and with four processes against the Vast simulator."""

import multiprocessing
import time

import pytest
import redis

from ponos_tasks.ratelimit import (
    DEFAULT_INTERVALS,
    PUBLISHED_INTERVALS,
    RateLimitTimeout,
    RedisRateLimiter,
)


def test_default_intervals_cover_every_client_endpoint_with_a_margin():
    names = {"search", "create", "list", "list_v0", "show", "update", "destroy", "logs", "account"}
    assert set(DEFAULT_INTERVALS) == names
    for name in names:
        assert DEFAULT_INTERVALS[name] > PUBLISHED_INTERVALS[name]
    assert DEFAULT_INTERVALS["create"] >= 4.5 and DEFAULT_INTERVALS["list"] >= 1.0


def test_first_call_is_free_then_calls_are_spaced(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"list": 0.1})
    started = time.monotonic()
    waits = [limiter.acquire("list") for _ in range(5)]
    elapsed = time.monotonic() - started
    assert waits[0] == 0
    assert all(0.05 < w <= 0.1 + 0.02 for w in waits[1:])
    assert 0.4 <= elapsed < 0.7


def test_buckets_are_per_endpoint(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"a": 5.0, "b": 5.0})
    assert limiter.acquire("a") == 0
    assert limiter.acquire("b") == 0  # not delayed by "a"
    assert redis_client.exists(key_prefix + "a") and redis_client.exists(key_prefix + "b")


def test_scale_and_margin(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 4.5},
                               scale=1 / 20, margin=0.01)
    assert limiter.interval("create") == pytest.approx(0.235)
    limiter.acquire("create")
    assert 0.2 < limiter.reserve("create") <= 0.236


def test_timeout_raises_without_reserving(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"create": 10.0})
    limiter.acquire("create")
    before = redis_client.get(key_prefix + "create")
    with pytest.raises(RateLimitTimeout, match="create"):
        limiter.acquire("create", timeout=1.0)
    assert redis_client.get(key_prefix + "create") == before  # the refused slot was not taken


def test_unknown_endpoint_is_an_error(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix)
    with pytest.raises(ValueError, match="unknown rate-limit endpoint 'lst'"):
        limiter.acquire("lst")


def test_keys_expire(redis_client, key_prefix):
    limiter = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"x": 0.5})
    limiter.acquire("x")
    assert 0 < redis_client.pttl(key_prefix + "x") <= 1500


# --------------------------------------------------------------- several processes


def _acquire_many(redis_url, prefix, interval, count, queue):
    limiter = RedisRateLimiter(redis.Redis.from_url(redis_url), prefix=prefix,
                               intervals={"list": interval})
    times = []
    for _ in range(count):
        limiter.acquire("list")
        times.append(time.time())  # same machine: one clock for every process
    queue.put(times)


def test_four_processes_share_one_bucket(redis_url, key_prefix):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    interval, count = 0.05, 8
    procs = [ctx.Process(target=_acquire_many, args=(redis_url, key_prefix, interval, count, queue))
             for _ in range(4)]
    for proc in procs:
        proc.start()
    times = sorted(t for _ in procs for t in queue.get(timeout=60))
    for proc in procs:
        proc.join(timeout=10)
    assert len(times) == 32
    gaps = [b - a for a, b in zip(times, times[1:], strict=False)]
    # slots are exactly `interval` apart on the Redis clock; wake-ups jitter a little
    assert min(gaps) > interval * 0.5
    assert times[-1] - times[0] >= interval * 31 * 0.95
