"""A rate limiter shared through Redis: one bucket per Vast.ai endpoint, for every worker.

Vast.ai enforces a *minimum interval* between two calls to the same endpoint by the same
account (docs/reference.md §1.2), whatever machine they come from. Every worker of every
machine therefore reserves its call's time slot in one Redis key per endpoint; a Lua script
does it atomically: ``slot = max(now, last_slot + interval)``. ``now`` is Redis server TIME,
so the clocks of the workers' machines play no part: the script answers how long to wait and
the caller sleeps that long.

Hand-written rather than a library: the usual Redis rate-limit packages count calls in a
window (bursts at window edges would still trip Vast's minimum-interval check), whereas this
spaces calls evenly, which is what Vast measures.
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections.abc import Callable, Mapping

import redis

from ponos_tasks import log_pacing

log = logging.getLogger(__name__)

# Minimum intervals (seconds) Vast.ai publishes per endpoint (docs/reference.md §1.2), times a
# 10 % safety margin (create: see below). `logs` and `account` have no published threshold: one call a second is a
# guess that stays well clear of trouble for endpoints the agent calls rarely.
SAFETY_MARGIN = 1.10
PUBLISHED_INTERVALS: dict[str, float] = {
    "search": 2.0,  # POST /bundles/ (low_volume_burst, threshold 2)
    "create": 4.5,  # PUT /asks/{id}/
    "list": 1.0,  # GET /api/v1/instances/
    "list_v0": 20.0,  # GET /api/v0/instances/ (legacy_deprecating)
    "show": 2.0,  # GET /api/v0/instances/{id}/
    "update": 1.0,  # PUT /api/v0/instances/{id}/
    "destroy": 3.0,  # DELETE /api/v0/instances/{id}/
    "logs": 1.0,  # PUT /api/v0/instances/request_logs/{id}/ (not published)
    "account": 1.0,  # GET /api/v0/users/current/ (not published)
}
# Create is the exception: its interval is the launch rate's only bound in a burst, and 10 %
# (0.45 s) would cap launches at 0.91 of it. What can make two creates reach Vast.ai closer
# than their slots is the difference between their send delays (the sleep's overshoot, the
# network path): tens of milliseconds. 100 ms absolute covers that several times (0.98 of the
# bound; scaled down, the agent's limiter adds SCALED_MARGIN_S), and an early create costs a
# 12 s penalty that the simulator enforces (the launch tests would show it).
CREATE_MARGIN_S = 0.10
DEFAULT_INTERVALS: dict[str, float] = {
    name: round(seconds * SAFETY_MARGIN, 3) for name, seconds in PUBLISHED_INTERVALS.items()
}
DEFAULT_INTERVALS["create"] = PUBLISHED_INTERVALS["create"] + CREATE_MARGIN_S
# Seconds Vast.ai refuses an endpoint to the account after a refused call, each refused call
# in it restarting it (create's spec publishes `penalty: 12`). A 429 on create is therefore
# not "try again in a moment": every worker that sends a create within 12 s of it gets
# another 429 and restarts the penalty, and creates spaced at 4.6 s never get through again
# (a benchmark at 1000 tasks stalled so, at 561 launched). `penalize` holds the bucket until
# the penalty is over, for every worker.
PUBLISHED_PENALTIES: dict[str, float] = {"create": 12.0}
# Not a Vast.ai endpoint: the gate of the periodic log reads (log_pacing.py), which keeps the
# rest of the log endpoint for the reads at a task's end.
DEFAULT_INTERVALS[log_pacing.GATE] = round(DEFAULT_INTERVALS["logs"] / log_pacing.PERIODIC_SHARE, 3)

# KEYS[1]: bucket; ARGV: interval µs, longest acceptable wait µs.
# Returns {wait µs, reserved slot µs}, or {-1, wait µs} without reserving when the wait would
# be longer than acceptable (so a caller that gives up does not push everybody else back).
# Microseconds since the epoch (~1.8e15) are exact in Lua's doubles (< 2^53); '%.0f' keeps
# them exact in the stored string (tostring would round to 14 digits).
_RESERVE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local max_wait = tonumber(ARGV[2])
local last = tonumber(redis.call('GET', KEYS[1]))
local slot = now
if last and last + interval > now then
  slot = last + interval
end
local wait = slot - now
if wait > max_wait then
  return {-1, wait}
end
local ttl_ms = math.floor((wait + interval) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', slot), 'PX', ttl_ms)
return {wait, slot}
"""


# KEYS[1]: the endpoint's last send (µs, Redis TIME); ARGV: interval µs, tolerance µs.
# The send gate: a slot says when a call may leave, but a process that wakes late from its
# sleep (a loaded machine) sends late, and the call whose slot came next, on time, then
# reaches Vast.ai less than an interval after it (the likely cause of a 429 on logs seen at
# time_scale 3 on a loaded machine). Returns 0 and stamps now when the last send is an interval ago (less the
# tolerance), else the µs still to wait (nothing stamped).
_SEND_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local last = tonumber(redis.call('GET', KEYS[1]))
if last and last + interval - tonumber(ARGV[2]) > now then
  return last + interval - now
end
redis.call('SET', KEYS[1], string.format('%.0f', now), 'PX', math.floor(interval / 1000) + 1000)
return 0
"""
# Shortfalls below this are let through: a few ms is inside the intervals' own margins, and
# waiting for them would add a sleep and a round trip to most calls.
SEND_TOLERANCE_S = 0.005


# KEYS[1]: bucket, KEYS[2]: its penalty's end; ARGV: penalty µs, interval µs.
# Sets the penalty's end to now + penalty (never earlier than one already set) and moves the
# bucket so that its next slot is no earlier than that end. Returns the end (µs).
_PENALIZE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local penalty = tonumber(ARGV[1])
local interval = tonumber(ARGV[2])
local ends = now + penalty
local set = tonumber(redis.call('GET', KEYS[2]))
if set and set > ends then
  ends = set
end
local ttl_ms = math.floor((ends - now + interval) / 1000) + 1000
redis.call('SET', KEYS[2], string.format('%.0f', ends), 'PX', ttl_ms)
local last = tonumber(redis.call('GET', KEYS[1]))
if not last or last + interval < ends then
  redis.call('SET', KEYS[1], string.format('%.0f', ends - interval), 'PX', ttl_ms)
end
return ends
"""


# KEYS[1]: the endpoint's line (a sorted set: claimants by arrival), KEYS[2]: its bucket,
# KEYS[3]: the claimants whose turn came and who have no slot yet (by when their turn came),
# KEYS[4]: when each claimant in the line promised to look again (promise_look);
# ARGV: the claimant, interval µs, the keys' lifetime ms, grace µs.
# Puts the claimant in the line if it is not there yet (its place is kept) and returns {how
# many are ahead, how far its turn is (µs)}: that many intervals after the bucket's next free
# slot. Counted ahead: the claimants before it in the line that keep their promise to look
# again (within the grace; one whose step was lost would hold everyone back until the sync
# resumes it), and those whose turn came within the grace and who have no slot yet (past
# the grace, their worker is presumed dead). Computed afresh at each look, from Redis TIME:
# claimants that left move everyone behind them forward, and no host's clock plays a part.
# A claimant whose turn came already (a step run again) is told so: {0, 0}.
_LINE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[2])
local lifetime = tonumber(ARGV[3])
local grace = tonumber(ARGV[4])
if redis.call('ZSCORE', KEYS[3], ARGV[1]) then
  return {0, 0}
end
redis.call('ZADD', KEYS[1], 'NX', now, ARGV[1])
redis.call('ZADD', KEYS[4], 'NX', now, ARGV[1])
redis.call('PEXPIRE', KEYS[1], lifetime)
redis.call('PEXPIRE', KEYS[4], lifetime)
redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', '(' .. string.format('%.0f', now - grace))
local ahead = redis.call('ZCARD', KEYS[3])
local rank = redis.call('ZRANK', KEYS[1], ARGV[1])
if rank > 0 then
  for _, other in ipairs(redis.call('ZRANGE', KEYS[1], 0, rank - 1)) do
    local due = tonumber(redis.call('ZSCORE', KEYS[4], other))
    if not due or due + grace >= now then
      ahead = ahead + 1
    end
  end
end
local free = now
local last = tonumber(redis.call('GET', KEYS[2]))
if last and last + interval > free then
  free = last + interval
end
return {ahead, free - now + ahead * interval}
"""
# KEYS[1]: promises to look again; ARGV: the claimant, in how long (µs). Only for a claimant
# still in the line (XX): one dropped meanwhile is not put back.
_PROMISE_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZADD', KEYS[1], 'XX', now + tonumber(ARGV[2]), ARGV[1])
"""
# KEYS[1]: the line, KEYS[2]: the claimants whose turn came, KEYS[3]: promises to look again;
# ARGV: the claimant, lifetime ms.
_TURN_CAME_SCRIPT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('ZREM', KEYS[3], ARGV[1])
redis.call('ZADD', KEYS[2], now, ARGV[1])
redis.call('PEXPIRE', KEYS[2], tonumber(ARGV[2]))
"""
# KEYS[1]: a line, KEYS[2]: its promises; ARGV: claimant, score, claimant, score... Removes
# each claimant whose place (its arrival) is still the one read: one that left and came back
# meanwhile (a new claim of the same attempt number) keeps its new place.
_LEAVE_IF_SAME_SCRIPT = """
local removed = 0
for i = 1, #ARGV, 2 do
  if redis.call('ZSCORE', KEYS[1], ARGV[i]) == ARGV[i + 1] then
    removed = removed + redis.call('ZREM', KEYS[1], ARGV[i])
    redis.call('ZREM', KEYS[2], ARGV[i])
  end
end
return removed
"""
# A line nobody looked at for a day belongs to an agent that is gone.
LINE_LIFETIME_MS = 24 * 3600 * 1000


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RateLimitTimeout(TimeoutError):
    """The endpoint's next free slot is further away than the caller accepts to wait."""


# Scaled down (a simulator's accelerated clock), the intervals' own margins shrink with them
# (10 to 30 ms at time_scale 10) while the machine's send jitter stays tens of real ms: the
# agent's limiter then adds this many real seconds to every scaled interval. Not a floor
# over the scaled published interval: that floor (068dcee) launched at 0.968 of the create
# bound at time_scale 3 instead of 0.947, but left list 50 ms of slack instead of 83 and drew
# a 429 on it (BENCHMARKS.md, launches). Unscaled, as against Vast.ai, this plays no part.
SCALED_MARGIN_S = 0.05


class RedisRateLimiter:
    """Spaces calls per endpoint across all processes sharing one Redis.

    ``scale`` multiplies every interval: a simulator running ``time_scale`` times faster than
    real time divides its own intervals by ``time_scale``, so the agent pointed at it uses
    ``scale=1/time_scale``. ``margin`` (seconds) is added after scaling; it absorbs network
    and scheduling jitter when scaled intervals become a few tens of milliseconds.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        *,
        prefix: str,  # state.Keyspace.ratelimit_prefix
        intervals: Mapping[str, float] = DEFAULT_INTERVALS,
        scale: float = 1.0,
        margin: float = 0.0,
    ) -> None:
        if scale <= 0:
            raise ValueError("scale must be positive")
        self.redis = redis_client
        self.prefix = prefix
        self.intervals = {name: seconds * scale + margin for name, seconds in intervals.items()}
        self.penalties = {
            name: seconds * scale + margin for name, seconds in PUBLISHED_PENALTIES.items()
        }
        self._reserve = redis_client.register_script(_RESERVE_SCRIPT)
        self._penalize = redis_client.register_script(_PENALIZE_SCRIPT)
        self._send = redis_client.register_script(_SEND_SCRIPT)
        self._line = redis_client.register_script(_LINE_SCRIPT)
        self._leave_if_same = redis_client.register_script(_LEAVE_IF_SAME_SCRIPT)
        self._turn_came = redis_client.register_script(_TURN_CAME_SCRIPT)
        self._promise = redis_client.register_script(_PROMISE_SCRIPT)

    @classmethod
    def for_agent(cls, redis_client: redis.Redis, *, prefix: str, scale: float):
        """The agent's limiter: DEFAULT_INTERVALS times `scale` (vast_api.rate_limit_scale),
        plus SCALED_MARGIN_S when scaled down. Unscaled, DEFAULT_INTERVALS already carry
        their margins."""
        margin = SCALED_MARGIN_S if scale < 1 else 0.0
        return cls(redis_client, prefix=prefix, scale=scale, margin=margin)

    def interval(self, endpoint: str) -> float:
        try:
            return self.intervals[endpoint]
        except KeyError:
            known = ", ".join(sorted(self.intervals))
            raise ValueError(f"unknown rate-limit endpoint {endpoint!r} (known: {known})") from None

    def _reserve_slot(self, endpoint: str, timeout: float) -> tuple[float, int]:
        interval_us = math.ceil(self.interval(endpoint) * 1_000_000)
        max_wait_us = math.floor(timeout * 1_000_000)
        wait_us, other = self._reserve(
            keys=[self.prefix + endpoint], args=[interval_us, max_wait_us]
        )
        if wait_us < 0:  # `other` is then the wait that was refused
            raise RateLimitTimeout(
                f"rate limiter: next {endpoint!r} slot is {other / 1e6:.1f}s away (> {timeout}s)"
            )
        return wait_us / 1_000_000, int(other)

    def reserve(self, endpoint: str, timeout: float = 60.0) -> float:
        """Reserve the endpoint's next slot without sleeping; return the seconds until it."""
        return self._reserve_slot(endpoint, timeout)[0]

    def acquire(
        self,
        endpoint: str,
        timeout: float = 60.0,
        on_reserved: Callable[[], None] | None = None,
    ) -> float:
        """Wait for the endpoint's next slot; return the seconds waited. A slot that a
        penalty (penalize) covered while the caller slept is not used: the caller takes the
        first slot after the penalty instead of restarting it. `on_reserved` runs once a
        slot is reserved, before the wait (the slot counts for others from then on)."""
        waited = 0.0
        while True:
            wait, slot_us = self._reserve_slot(endpoint, max(0.0, timeout - waited))
            if on_reserved is not None:
                on_reserved()
            if wait > 0:
                log.debug("rate limiter: waiting %.3fs for %s", wait, endpoint)
                time.sleep(wait)
            waited += wait
            if endpoint not in self.penalties:
                return waited + self.wait_send_gap(endpoint)
            ends = self.redis.get(self.prefix + endpoint + ":penalty")
            if ends is None or int(float(ends)) <= slot_us:
                return waited + self.wait_send_gap(endpoint)

    def wait_send_gap(self, endpoint: str) -> float:
        """Right before a call leaves: wait until the endpoint's last send (by any process)
        is an interval ago, and stamp this one; return the seconds waited (0 unless the
        previous call left late). Each wait is under one interval."""
        interval_us = math.ceil(self.interval(endpoint) * 1_000_000)
        tolerance_us = math.ceil(SEND_TOLERANCE_S * 1_000_000)
        waited = 0.0
        while True:
            wait_us = int(
                self._send(
                    keys=[self.prefix + endpoint + ":sent"], args=[interval_us, tolerance_us]
                )
            )
            if wait_us <= 0:
                return waited
            log.debug(
                "rate limiter: the last %s call left late; %.3fs more", endpoint, wait_us / 1e6
            )
            time.sleep(wait_us / 1_000_000)
            waited += wait_us / 1_000_000

    def place_in_line(self, endpoint: str, claimant: str, *, grace: float) -> tuple[int, float]:
        """Join the endpoint's line (or keep one's place in it); return how many claimants
        are ahead of `claimant` and the seconds until its turn.

        For calls that wait long (a burst of creates, one every 4.6 s): the caller goes away
        until about its turn (steps.create_instance hands its step back to Celery) instead of
        sleeping in `acquire` and keeping a worker process from every other step meanwhile,
        and says when it looks again (`promise_look`). The line holds places, not slots. A
        claimant whose turn came (`turn_came`) counts for those behind it until it has
        reserved its slot (`acquire`'s `on_reserved`: `leave_line`); one that broke its
        promise to look again stops counting: for both, `grace` seconds late at most (its
        worker may have died; the sync resumes its step later).
        """
        interval_us = math.ceil(self.interval(endpoint) * 1_000_000)
        ahead, wait_us = self._line(
            keys=[
                self._line_key(endpoint),
                self.prefix + endpoint,
                self._going_key(endpoint),
                self._due_key(endpoint),
            ],
            args=[claimant, interval_us, LINE_LIFETIME_MS, math.ceil(grace * 1_000_000)],
        )
        return int(ahead), int(wait_us) / 1_000_000

    def promise_look(self, endpoint: str, claimant: str, within: float) -> None:
        """`claimant` looks at its turn again within `within` seconds."""
        self._promise(
            keys=[self._due_key(endpoint)], args=[claimant, math.ceil(within * 1_000_000)]
        )

    def turn_came(self, endpoint: str, claimant: str) -> None:
        self._turn_came(
            keys=[self._line_key(endpoint), self._going_key(endpoint), self._due_key(endpoint)],
            args=[claimant, LINE_LIFETIME_MS],
        )

    def leave_line(self, endpoint: str, *claimants: str) -> None:
        if claimants:
            pipe = self.redis.pipeline(transaction=False)
            for key in (self._line_key, self._going_key, self._due_key):
                pipe.zrem(key(endpoint), *claimants)
            pipe.execute()

    def line(self, endpoint: str) -> dict[str, str]:
        """The endpoint's line: each claimant's place (its arrival, as Redis wrote it), first
        claimant first; for `leave_line_if_same`."""
        raw = self.redis.zrange(
            self._line_key(endpoint), 0, -1, withscores=True, score_cast_func=_text
        )
        return {_text(member): place for member, place in raw}

    def leave_line_if_same(self, endpoint: str, places: dict[str, str]) -> int:
        """Remove the claimants still at the places read (`line`); return how many left."""
        if not places:
            return 0
        args = [value for item in places.items() for value in item]
        return int(
            self._leave_if_same(keys=[self._line_key(endpoint), self._due_key(endpoint)], args=args)
        )

    def _line_key(self, endpoint: str) -> str:
        return self.prefix + endpoint + ":line"

    def _going_key(self, endpoint: str) -> str:
        return self.prefix + endpoint + ":going"

    def _due_key(self, endpoint: str) -> str:
        return self.prefix + endpoint + ":due"

    def penalize(self, endpoint: str) -> float:
        """Vast.ai refused a call (429): hold the endpoint for its published penalty, for
        every worker; return the penalty's seconds (0: the endpoint has none, a refused call
        does not count there and the next slot stands)."""
        penalty = self.penalties.get(endpoint)
        if not penalty:
            return 0.0
        # Up to half as long again, at random: another user of the key backing off exactly
        # the penalty from its own refusal would restart it in step with ours, forever.
        penalty *= 1 + random.uniform(0.0, 0.5)
        self._penalize(
            keys=[self.prefix + endpoint, self.prefix + endpoint + ":penalty"],
            args=[math.ceil(penalty * 1_000_000), math.ceil(self.interval(endpoint) * 1_000_000)],
        )
        log.warning(
            "rate limiter: Vast.ai refused a %s call; no %s call for %.1fs (its penalty)",
            endpoint,
            endpoint,
            penalty,
        )
        return penalty
