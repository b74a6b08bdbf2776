"""Per-(identity, endpoint) minimum intervals between calls, on simulated time.

Vast.ai enforces rate limits "as a minimum interval between requests" per endpoint and
identity (docs/reference.md §1.2). The published thresholds are read as seconds; they are
simulated seconds here, so they shrink in real time with `time_scale` like everything else.
Only calls that were let through count as the previous call.
"""

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

# Which of the three 429 body shapes each endpoint answers with (as the specs show them).
SHAPES = {"create": "detail", "show": "detail", "update": "detail", "destroy": "json"}


class MinIntervalLimiter:
    def __init__(self, intervals: dict | None = None, enabled: bool = True):
        self.intervals = dict(MIN_INTERVALS if intervals is None else intervals)
        self.enabled = enabled
        self._last: dict[tuple[str, str], float] = {}

    def check(self, identity: str, endpoint: str, now: float) -> float | None:
        """None if the call may go through (and records it), else the threshold violated."""
        interval = self.intervals.get(endpoint, 0.0)
        if not self.enabled or interval <= 0:
            return None
        key = (identity, endpoint)
        last = self._last.get(key)
        if last is not None and now - last < interval:
            return interval
        self._last[key] = now
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
