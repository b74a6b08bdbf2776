"""Client-side pacing for tests that call the Vast.ai simulator with its rate limits on.

The simulator refuses (429) a call made by the same identity (API key, or the client address
without one) to the same endpoint sooner than the endpoint's minimum interval after the last
call it let through (ponos_tasks/simulators/vast/ratelimit.py, MIN_INTERVALS). The intervals
are simulated seconds, so in real time they are divided by the simulator's time scale. A test
client must space its calls like a real client of Vast.ai; `Pacer` does that, from the table
the simulator itself uses, so it cannot drift from it.

A call is recorded as made when its answer came back (the server recorded it before), and the
next one waits until `interval / time_scale + margin` after that: the gap the server measures
is then at least the interval whatever the request's latency. Burst limits (at most N calls
in any period, BURSTS) are kept the same way: a call waits until the N-th last one it made is
a period (plus the margin) old.
"""

from __future__ import annotations

import re
import threading
import time
from collections.abc import Callable

from ponos_tasks.simulators.vast.ratelimit import BURSTS, MIN_INTERVALS

# (method, path pattern, endpoint name), as the routes of ponos_tasks/simulators/vast/server.py
# name them. Anything else (/_sim/ admin, the fake S3 bucket, gpu_names) is not rate limited.
_ROUTES = [
    ({"GET", "POST"}, r"/api/v0/bundles/?", "search"),
    ({"PUT", "POST"}, r"/api/v0/search/asks/?", "search"),
    ({"PUT"}, r"/api/v0/asks/[^/]+/?", "create"),
    ({"GET"}, r"/api/v1/instances/?", "list"),
    ({"GET"}, r"/api/v0/instances/?", "list_v0"),
    ({"GET"}, r"/api/v0/instances/filters/?", "filters"),
    ({"PUT", "POST"}, r"/api/v0/instances/request_logs/[^/]+/?", "logs"),
    ({"GET"}, r"/api/v0/instances/[^/]+/?", "show"),
    ({"PUT"}, r"/api/v0/instances/[^/]+/?", "update"),
    ({"DELETE"}, r"/api/v0/instances/[^/]+/?", "destroy"),
    ({"GET"}, r"/api/v0/users/current/?", "account"),
]
_COMPILED = [(methods, re.compile(pattern), name) for methods, pattern, name in _ROUTES]


def endpoint_for(method: str, path: str) -> str | None:
    """The simulator's rate-limit endpoint name for a request, or None if it has none."""
    path = path.split("?", 1)[0]
    for methods, pattern, name in _COMPILED:
        if method.upper() in methods and pattern.fullmatch(path):
            return name
    return None


class Pacer:
    """Spaces calls per (identity, endpoint) by the simulator's minimum intervals and bursts."""

    def __init__(
        self,
        time_scale: float,
        intervals: dict[str, float] | None = None,
        *,
        bursts: dict[str, tuple[int, float]] | None = None,
        enabled: bool = True,
        margin: float = 0.005,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ):
        if time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        table = MIN_INTERVALS if intervals is None else intervals
        self.real_intervals = {name: seconds / time_scale for name, seconds in table.items()}
        self.real_bursts = {
            name: (int(calls), period / time_scale)
            for name, (calls, period) in (BURSTS if bursts is None else bursts).items()
        }
        self._history: dict[tuple[str, str], list[float]] = {}
        self.enabled = enabled
        self.margin = margin
        self.clock = clock
        self.sleep = sleep
        self._last: dict[tuple[str, str], float] = {}
        self._lock = threading.Lock()

    @classmethod
    def for_sim(cls, sim, **kwargs) -> Pacer:
        """A pacer matching a running VastSimulator (a no-op when its limits are off)."""
        limiter = sim.state.limiter
        return cls(
            sim.state.clock.time_scale,
            limiter.intervals,
            bursts=limiter.bursts,
            enabled=limiter.enabled,
            **kwargs,
        )

    def delay(self, identity: str, endpoint: str) -> float:
        """Real seconds to wait before this identity may call this endpoint."""
        interval = self.real_intervals.get(endpoint, 0.0)
        if not self.enabled or interval <= 0:
            return 0.0
        with self._lock:
            last = self._last.get((identity, endpoint))
            history = list(self._history.get((identity, endpoint), ()))
        now = self.clock()
        wait = 0.0 if last is None else last + interval + self.margin - now
        burst = self.real_bursts.get(endpoint)
        if burst is not None and len(history) >= burst[0]:
            wait = max(wait, history[-burst[0]] + burst[1] + self.margin - now)
        return max(0.0, wait)

    def wait(self, identity: str, endpoint: str) -> None:
        delay = self.delay(identity, endpoint)
        if delay > 0:
            self.sleep(delay)

    def wait_all(self, identity: str) -> None:
        """Wait until every endpoint is free for this identity (before an opaque client)."""
        delay = max((self.delay(identity, name) for name in self.real_intervals), default=0.0)
        if delay > 0:
            self.sleep(delay)

    def done(self, identity: str, endpoint: str) -> None:
        """Record that a call has just been answered."""
        with self._lock:
            now = self.clock()
            self._last[(identity, endpoint)] = now
            burst = self.real_bursts.get(endpoint)
            if burst is not None:
                history = self._history.setdefault((identity, endpoint), [])
                history.append(now)
                del history[: -burst[0]]

    def paced_command(
        self, identity: str, run: Callable[[], object], calls: Callable[[], dict[str, int]]
    ):
        """Run an opaque client (the vastai CLI) that calls the simulator as `identity`.

        Before: every endpoint it might call is waited for. After: the endpoints it did call,
        read from the simulator's call counters (`calls`, e.g. /_sim/stats, not rate limited),
        are recorded as called when it ended. Returns what `run` returns.
        """
        self.wait_all(identity)
        before = calls() if self.enabled else {}
        try:
            return run()
        finally:
            if self.enabled:
                after = calls()
                for name, count in after.items():
                    if count > before.get(name, 0):
                        self.done(identity, name)
