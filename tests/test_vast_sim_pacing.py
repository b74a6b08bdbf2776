"""The test helpers' pacing of Vast.ai simulator calls (tests/simulators/vast/pacing.py).

Pure: a fake clock, the simulator's own limiter class, and Flask's in-process test client (no
socket). These fail if the helpers (Api, the vastai CLI fixture) would call too fast.
"""

import random

import pytest

from ponos_tasks.simulators.vast.ratelimit import MIN_INTERVALS, MinIntervalLimiter
from ponos_tasks.simulators.vast.server import create_app
from ponos_tasks.simulators.vast.state import VastState
from tests.simulators.vast.pacing import Pacer, endpoint_for

KEY = "k"


class FakeClock:
    def __init__(self):
        self.t = 100.0

    def __call__(self) -> float:
        return self.t

    def sleep(self, seconds: float) -> None:
        assert seconds >= 0
        self.t += seconds


def make_pacer(time_scale=50.0, **kwargs):
    clock = FakeClock()
    return Pacer(time_scale, clock=clock, sleep=clock.sleep, **kwargs), clock


SAMPLES = [
    ("POST", "/api/v0/bundles/"),
    ("GET", "/api/v0/bundles/?q={}"),
    ("PUT", "/api/v0/search/asks/"),
    ("PUT", "/api/v0/asks/12/"),
    ("GET", "/api/v1/instances/"),
    ("GET", "/api/v0/instances/"),
    ("GET", "/api/v0/instances/filters/"),
    ("GET", "/api/v0/instances/7/"),
    ("PUT", "/api/v0/instances/7/"),
    ("DELETE", "/api/v0/instances/7/"),
    ("PUT", "/api/v0/instances/request_logs/7/"),
    ("GET", "/api/v0/users/current/"),
]


@pytest.mark.parametrize(("method", "path"), SAMPLES)
def test_endpoint_names_match_the_simulator_routes(method, path):
    state = VastState(seed=0, time_scale=50.0, api_key=KEY, rate_limits=False)
    client = create_app(state).test_client()
    client.open(path, method=method, headers={"Authorization": f"Bearer {KEY}"}, json={})
    assert list(state.calls) == [endpoint_for(method, path)]


def test_admin_and_s3_routes_are_not_rate_limited():
    state = VastState(seed=0, time_scale=1.0, api_key=KEY, rate_limits=True)
    client = create_app(state).test_client()
    for _ in range(5):
        for path in (
            "/_sim/stats",
            "/_sim/instances",
            "/_sim/ledger",
            "/_sim/events",
            "/_sim/offers",
            "/_sim/faults",
            "/api/v0/gpu_names/unique/",
        ):
            assert client.get(path).status_code == 200, path
            assert endpoint_for("GET", path) is None
    assert not state.calls and not state.rate_limited
    assert endpoint_for("GET", "/s3/instance_logs/abc.log") is None


def test_back_to_back_calls_wait_the_scaled_interval():
    pacer, clock = make_pacer(time_scale=50.0, margin=0.0)
    pacer.done(KEY, "show")
    start = clock.t
    pacer.wait(KEY, "show")
    assert clock.t - start == pytest.approx(MIN_INTERVALS["show"] / 50.0)  # 2 s / 50
    pacer.wait(KEY, "list")  # another endpoint is free
    pacer.wait("other-key", "show")  # another identity too
    assert clock.t - start == pytest.approx(0.04)


def test_disabled_pacer_never_waits():
    pacer, clock = make_pacer(enabled=False)
    pacer.done(KEY, "create")
    pacer.wait(KEY, "create")
    pacer.wait_all(KEY)
    assert clock.t == 100.0


def test_paced_calls_never_trip_the_simulator_limiter():
    """Random calls with random latencies, paced, checked by the simulator's own limiter."""
    time_scale = 50.0
    pacer, clock = make_pacer(time_scale=time_scale, margin=0.0)
    limiter = MinIntervalLimiter()
    rng = random.Random(7)
    names = sorted(MIN_INTERVALS)
    for _ in range(2000):
        identity = rng.choice([KEY, "127.0.0.1"])
        endpoint = rng.choice(names)
        pacer.wait(identity, endpoint)
        clock.t += rng.uniform(0.0, 0.01)  # request on the wire
        assert limiter.check(identity, endpoint, clock.t * time_scale) is None, endpoint
        clock.t += rng.uniform(0.0, 0.01)  # answer on the wire
        pacer.done(identity, endpoint)


def test_cli_helper_waits_before_and_records_what_the_cli_called():
    """paced_command, as the vastai fixture uses it: the CLI's calls are learned from the
    simulator's call counters and the next call to those endpoints waits for them."""
    time_scale = 50.0
    pacer, clock = make_pacer(time_scale=time_scale, margin=0.0)
    limiter = MinIntervalLimiter()
    counters = {"show": 0, "list": 0}

    def cli(*endpoints):
        def run():  # no start-up time: the first call may come at once
            for endpoint in endpoints:
                assert limiter.check(KEY, endpoint, clock.t * time_scale) is None, endpoint
                counters[endpoint] = counters.get(endpoint, 0) + 1
                clock.t += 0.001
            return "ok"

        return pacer.paced_command(KEY, run, lambda: dict(counters))

    def api_call(endpoint):
        pacer.wait(KEY, endpoint)
        assert limiter.check(KEY, endpoint, clock.t * time_scale) is None, endpoint
        pacer.done(KEY, endpoint)

    api_call("list_v0")
    assert cli("list_v0") == "ok"
    assert clock.t >= 100.0 + MIN_INTERVALS["list_v0"] / time_scale
    api_call("show")
    assert cli("show") == "ok"
    api_call("show")  # right after the CLI's show: waits
    assert cli("show", "list") == "ok"
    api_call("list")
    api_call("show")
    assert counters == {"show": 2, "list": 1, "list_v0": 1}
