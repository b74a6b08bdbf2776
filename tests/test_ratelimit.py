"""The Redis-shared rate limiter, alone and with four processes against the Vast simulator."""

import multiprocessing
import time

import pytest
import redis
import requests

from ponos_tasks import log_pacing
from ponos_tasks.ratelimit import (
    DEFAULT_INTERVALS,
    PUBLISHED_INTERVALS,
    SCALED_MARGIN_S,
    RateLimitTimeout,
    RedisRateLimiter,
)


def test_default_intervals_cover_every_client_endpoint_with_a_margin():
    names = {"search", "create", "list", "list_v0", "show", "update", "destroy", "logs", "account"}
    # and one bucket that is no Vast.ai endpoint: the periodic log reads' gate (log_pacing.py)
    assert set(DEFAULT_INTERVALS) == names | {"periodic_logs"}
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
    limiter = RedisRateLimiter(
        redis_client, prefix=key_prefix, intervals={"create": 4.5}, scale=1 / 20, margin=0.01
    )
    assert limiter.interval("create") == pytest.approx(0.235)
    limiter.acquire("create")
    assert 0.2 < limiter.reserve("create") <= 0.236


def test_the_agents_scaled_intervals_keep_a_margin_over_every_scaled_one(redis_client, key_prefix):
    # Unscaled: the defaults as they are (their own margins).
    real = RedisRateLimiter.for_agent(redis_client, prefix=key_prefix, scale=1.0)
    assert real.intervals == pytest.approx(DEFAULT_INTERVALS)
    for scale in (1 / 3, 1 / 10, 1 / 50):
        scaled = RedisRateLimiter.for_agent(redis_client, prefix=key_prefix, scale=scale)
        for name, seconds in DEFAULT_INTERVALS.items():
            assert scaled.interval(name) == pytest.approx(seconds * scale + SCALED_MARGIN_S)
        assert scaled.penalties["create"] == pytest.approx(12.0 * scale + SCALED_MARGIN_S)
        # The periodic log reads' gate leaves the log endpoint its reads at a task's end.
        share = scaled.interval("logs") / scaled.interval(log_pacing.GATE)
        assert share < 1.0


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
    limiter = RedisRateLimiter(
        redis.Redis.from_url(redis_url), prefix=prefix, intervals={"list": interval}
    )
    times = []
    for _ in range(count):
        limiter.acquire("list")
        times.append(time.time())  # same machine: one clock for every process
    queue.put(times)


def test_four_processes_share_one_bucket(redis_url, key_prefix):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    interval, count = 0.05, 8
    procs = [
        ctx.Process(target=_acquire_many, args=(redis_url, key_prefix, interval, count, queue))
        for _ in range(4)
    ]
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


# --------------------------------------------------------------- against the simulator

SIM_KEY = "sim-key-ratelimit"
SIM_TIME_SCALE = 20.0
CALLS_PER_PROCESS = 10
# Absolute slack added to the scaled intervals (list: 1.1 s / 20 = 55 ms, +30 ms): the time
# between a slot in Redis and the simulator reading its clock jitters by a few tens of ms on a
# loaded 2-core machine; 10 ms was measured to give an occasional 429 (1 run in ~11).
SIM_MARGIN = 0.03


def _hammer(sim_url, redis_url, prefix, use_limiter, queue):
    from ponos_tasks.vast import VastClient, VastRateLimited

    limiter = None
    if use_limiter:
        limiter = RedisRateLimiter(
            redis.Redis.from_url(redis_url),
            prefix=prefix,
            scale=1 / SIM_TIME_SCALE,
            margin=SIM_MARGIN,
        )
    # one attempt per call: a 429 must show, not be hidden by the client's retries
    client = VastClient(sim_url, SIM_KEY, rate_limiter=limiter, max_attempts=1)
    refused = 0
    for _ in range(CALLS_PER_PROCESS):
        try:
            client.list_instances()
        except VastRateLimited:
            refused += 1
    queue.put(refused)


def _run_four(sim, redis_url, prefix, use_limiter):
    ctx = multiprocessing.get_context("spawn")
    queue = ctx.Queue()
    procs = [
        ctx.Process(target=_hammer, args=(sim.url, redis_url, prefix, use_limiter, queue))
        for _ in range(4)
    ]
    for proc in procs:
        proc.start()
    refused = sum(queue.get(timeout=120) for _ in procs)
    for proc in procs:
        proc.join(timeout=10)
    stats = requests.get(f"{sim.url}/_sim/stats", timeout=5).json()
    return refused, stats


@pytest.fixture
def limited_sim():
    from ponos_tasks.simulators.vast import VastSimulator

    with VastSimulator(
        seed=0,
        time_scale=SIM_TIME_SCALE,
        api_key=SIM_KEY,
        host="127.0.0.1",
        port=0,
        rate_limits=True,
    ) as sim:
        yield sim


def test_four_processes_through_the_limiter_get_no_429(limited_sim, redis_url, key_prefix):
    refused, stats = _run_four(limited_sim, redis_url, key_prefix, use_limiter=True)
    assert stats["calls"]["list"] == 4 * CALLS_PER_PROCESS
    assert (refused, stats["rate_limited"].get("list", 0)) == (0, 0), stats


def test_control_four_processes_without_the_limiter_get_429(limited_sim, redis_url, key_prefix):
    refused, stats = _run_four(limited_sim, redis_url, key_prefix, use_limiter=False)
    assert stats["rate_limited"].get("list", 0) > 0, stats
    assert refused == stats["rate_limited"]["list"]


def test_create_margin_leaves_launches_at_95_percent_of_the_bound():
    # 10 % on create (4.95 s) capped a burst's launches at 0.91 of Vast.ai's bound.
    assert PUBLISHED_INTERVALS["create"] / DEFAULT_INTERVALS["create"] >= 0.95


def test_a_penalty_holds_the_bucket_and_slots_reserved_before_it(redis_client, key_prefix):
    limiter = RedisRateLimiter(
        redis_client, prefix=key_prefix, intervals={"create": 4.5, "list": 1.0}, scale=1 / 30
    )
    assert limiter.acquire("create") == 0
    early = limiter.reserve("create")  # a worker's slot, 0.15 s away, taken before the 429
    assert 0.1 < early <= 0.15
    penalty = limiter.penalize("create")
    assert 0.4 <= penalty <= 0.6  # 12 s / 30, up to half as long again
    assert limiter.reserve("create") >= penalty - 0.02  # the bucket starts at its end
    # A slot reserved before the penalty is not used: acquire takes one after it.
    started = time.monotonic()
    limiter.acquire("create")
    assert time.monotonic() - started >= 0.4
    # No published penalty: a refused list does not count, the next slot stands.
    limiter.acquire("list")
    assert limiter.penalize("list") == 0.0
    assert limiter.reserve("list") <= 1.0 / 30 + 0.01


def _late_then_on_time(redis_client, key_prefix, late: float) -> float:
    """Two workers' calls in consecutive slots; the first wakes `late` s after its slot (a
    loaded machine), the second on time. Returns the gap between their sends."""
    interval = 0.3
    first = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"logs": interval})
    second = RedisRateLimiter(redis_client, prefix=key_prefix, intervals={"logs": interval})
    start = time.monotonic()
    assert first.reserve("logs") == 0  # its slot: now
    assert second.reserve("logs") == pytest.approx(interval, abs=0.02)  # the next one
    time.sleep(late)  # the first worker's sleep overshot its slot
    first.wait_send_gap("logs")
    sent_first = time.monotonic()
    time.sleep(max(0.0, start + interval - time.monotonic()))  # the second wakes on time
    second.wait_send_gap("logs")
    return time.monotonic() - sent_first


def test_a_call_after_one_that_left_late_still_leaves_an_interval_after_it(
    redis_client, key_prefix
):
    # Without the send gate the second call left 0.2 s after the first, under the interval
    # Vast.ai measures: a 429.
    assert _late_then_on_time(redis_client, key_prefix, late=0.1) >= 0.3 - 0.01


def test_calls_on_time_are_not_held_by_the_send_gate(redis_client, key_prefix):
    gap = _late_then_on_time(redis_client, key_prefix, late=0.0)
    assert 0.29 <= gap < 0.33
