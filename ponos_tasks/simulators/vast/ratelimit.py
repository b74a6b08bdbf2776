"""Per-(identity, endpoint) rate limits on simulated time (docs/reference.md §1.2).

Vast.ai enforces rate limits "as a minimum interval between requests" per endpoint and
identity; some endpoints also have a penalty and burst (max-calls-per-period) limits. The
published figures are read as seconds; they are simulated seconds here, so they shrink in
real time with `time_scale` like everything else. Only calls that were let through count as
the previous call (or in a burst window).

- `MIN_INTERVALS`: the published `x-rateLimit` thresholds.
- `PENALTIES`: seconds an identity is refused that endpoint after a refused call (create's
  spec publishes `penalty: 12`); each refused call in the penalty restarts it.
- `BURSTS`: (calls, period): at most that many calls let through in any period. Search's
  current spec names a `low_volume_burst` profile without figures; its older spec said
  "10 per minute per IP", the figure used here.
- The daily search quota (`SearchQuota`): the number of searches per key per UTC day is not
  published (only the 429 `search_quota_exceeded` with `X-RateLimit-Reset`, known from the
  official client's code, which never retries it); default `SEARCH_QUOTA_PER_DAY`.
"""

import math
from collections import deque

# Endpoint names as server.py's routes use them (and the agent's ratelimit.py); logs and
# account have no published threshold.
MIN_INTERVALS = {
    "search": 2.0,
    "create": 4.5,
    "list": 1.0,
    "list_v0": 20.0,
    "show": 2.0,
    "update": 1.0,
    "destroy": 3.0,
    "logs": 1.0,
    "account": 0.0,
}
PENALTIES = {"create": 12.0}
BURSTS = {"search": (10, 60.0)}
SEARCH_QUOTA_PER_DAY = 10_000

# Which of the three 429 body shapes each endpoint answers with (as the specs show them).
SHAPES = {"create": "detail", "show": "detail", "update": "detail", "destroy": "json"}


class MinIntervalLimiter:
    def __init__(
        self,
        intervals: dict | None = None,
        enabled: bool = True,
        penalties: dict | None = None,
        bursts: dict | None = None,
    ):
        self.intervals = dict(MIN_INTERVALS if intervals is None else intervals)
        self.penalties = dict(PENALTIES if penalties is None else penalties)
        self.bursts = dict(BURSTS if bursts is None else bursts)
        self.enabled = enabled
        self._last: dict[tuple[str, str], float] = {}
        self._blocked_until: dict[tuple[str, str], float] = {}
        self._window: dict[tuple[str, str], deque] = {}

    def check(self, identity: str, endpoint: str, now: float) -> float | None:
        """None if the call may go through (and records it), else the threshold violated."""
        interval = self.intervals.get(endpoint, 0.0)
        if not self.enabled or interval <= 0:
            return None
        key = (identity, endpoint)
        last = self._last.get(key)
        refused = (last is not None and now - last < interval) or now < self._blocked_until.get(
            key, -math.inf
        )
        burst = self.bursts.get(endpoint)
        window = self._window.setdefault(key, deque()) if burst else None
        if burst and not refused:
            calls, period = burst
            while window and window[0] <= now - period:
                window.popleft()
            refused = len(window) >= calls
        if refused:
            penalty = self.penalties.get(endpoint)
            if penalty:
                self._blocked_until[key] = now + penalty
            return interval
        self._last[key] = now
        if window is not None:
            window.append(now)
        return None


class SearchQuota:
    """Searches per key per simulated UTC day; `check` answers the reset instant when spent."""

    def __init__(self, per_day: int | None = SEARCH_QUOTA_PER_DAY):
        self.per_day = per_day
        self._used: dict[tuple[str, int], int] = {}

    def check(self, identity: str, sim_wall: float) -> float | None:
        """None if the search may go (and counts it), else the wall second the quota resets
        (UTC midnight on the simulated calendar)."""
        if self.per_day is None:
            return None
        day = int(sim_wall // 86400)
        used = self._used.get((identity, day), 0)
        if used >= self.per_day:
            return (day + 1) * 86400.0
        self._used = {k: v for k, v in self._used.items() if k[1] >= day}
        self._used[(identity, day)] = used + 1
        return None


def body_for(shape: str, threshold: float) -> tuple[str, str]:
    """(body, content type) of a 429 in one of the three shapes Vast.ai uses."""
    import json

    message = f"API requests too frequent endpoint threshold={threshold}"
    if shape == "detail":
        return json.dumps({"detail": message}), "application/json"
    if shape == "json":
        return (
            json.dumps({"success": False, "error": "rate_limit_exceeded", "msg": message}),
            "application/json",
        )
    return message, "text/plain"
