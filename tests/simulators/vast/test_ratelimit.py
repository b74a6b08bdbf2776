"""Per-endpoint minimum intervals (MIN_INTERVALS in ponos_tasks/simulators/vast/ratelimit.py),
on simulated time, on by default."""

import threading
import time

from tests.simulators.vast.conftest import Api


def test_minimum_intervals_per_endpoint_and_identity(make_sim):
    sim = make_sim(time_scale=10.0, rate_limits=True)  # 1 s threshold = 0.1 real s
    api = Api(sim.url, paced=False)  # this test wants the 429s
    assert api("GET", "/api/v1/instances/").status_code == 200
    limited = api("GET", "/api/v1/instances/")
    assert limited.status_code == 429
    assert limited.text == "API requests too frequent endpoint threshold=1.0"
    assert "Retry-After" not in limited.headers
    assert api("GET", "/api/v0/users/current/").status_code == 200  # other endpoint
    time.sleep(0.11)
    assert api("GET", "/api/v1/instances/").status_code == 200
    assert api("DELETE", "/api/v0/instances/1/").status_code == 404
    destroy = api("DELETE", "/api/v0/instances/1/")
    assert destroy.status_code == 429 and destroy.json() == {
        "success": False,
        "error": "rate_limit_exceeded",
        "msg": "API requests too frequent endpoint threshold=3.0",
    }
    assert api("GET", "/api/v0/instances/1/").status_code == 200
    show = api("GET", "/api/v0/instances/1/")
    assert show.status_code == 429
    assert show.json() == {"detail": "API requests too frequent endpoint threshold=2.0"}
    # Another identity has its own budget.
    anonymous = Api(sim.url, key=None, paced=False)
    assert anonymous("POST", "/api/v0/bundles/", json={"limit": 1}).status_code == 200
    assert api("POST", "/api/v0/bundles/", json={"limit": 1}).status_code == 200
    assert api("POST", "/api/v0/bundles/", json={"limit": 1}).status_code == 429
    stats = api.admin("GET", "stats")
    assert stats["rate_limited"] == {"list": 1, "destroy": 1, "show": 1, "search": 1}
    assert stats["calls"]["list"] == 3


def test_create_interval_scales_with_time(make_sim):
    sim = make_sim(time_scale=45.0, rate_limits=True)  # 4.5 s threshold = 0.1 real s
    api = Api(sim.url, paced=False)
    offers = api.search({"num_gpus": {"eq": 1}, "limit": 3})
    assert api.create(offers[0]["id"]).status_code == 200
    second = api.create(offers[1]["id"])
    assert second.status_code == 429
    assert second.json() == {"detail": "API requests too frequent endpoint threshold=4.5"}
    # A refused create adds create's published penalty (12 s): 4.5 s is no longer enough...
    time.sleep(0.11)
    assert api.create(offers[1]["id"]).status_code == 429
    # ...12 s after the last refused one is.
    time.sleep(12.5 / 45)
    assert api.create(offers[1]["id"]).status_code == 200


def test_search_burst_limit(make_sim):
    """At most 10 searches in any minute, even spaced by search's 2 s interval."""
    sim = make_sim(time_scale=100.0, rate_limits=True)  # 2 s = 0.02 real s, 60 s = 0.6 s
    api = Api(sim.url, paced=False)
    start = time.monotonic()
    for _ in range(10):
        assert api("POST", "/api/v0/bundles/", json={"limit": 1}).status_code == 200
        time.sleep(0.025)
    refused = api("POST", "/api/v0/bundles/", json={"limit": 1})
    assert refused.status_code == 429 and "threshold=2.0" in refused.text
    time.sleep(max(0.0, start + 0.62 - time.monotonic()))
    assert api("POST", "/api/v0/bundles/", json={"limit": 1}).status_code == 200


def test_daily_search_quota(make_sim):
    sim = make_sim(time_scale=100.0, rate_limits=True, search_quota=3)
    api = Api(sim.url)
    for _ in range(3):
        api.search({"limit": 1})
    api.pacer.wait(api.identity, "search")
    spent = api("POST", "/api/v0/bundles/", json={"limit": 1})
    assert spent.status_code == 429
    assert spent.json()["error"] == "search_quota_exceeded"
    # UTC midnight of the simulated calendar, as a wall-clock instant.
    reset = int(spent.headers["X-RateLimit-Reset"])
    clock = sim.state.clock
    sim_wall_reset = clock.epoch(0) + (reset - clock.epoch(0)) * clock.time_scale
    assert abs(sim_wall_reset % 86400) < 100 or abs(sim_wall_reset % 86400 - 86400) < 100
    assert time.time() < reset <= time.time() + 86400 / clock.time_scale + 1


def test_paced_api_back_to_back_gets_no_429(make_sim):
    """The test helpers' pacing (pacing.py) keeps every endpoint under its threshold."""
    sim = make_sim(time_scale=50.0, rate_limits=True)
    api = Api(sim.url)
    offers = api.search({"num_gpus": {"eq": 1}, "limit": 3})
    iid = None
    for offer in offers[:2]:
        created = api.create(offer["id"], label="paced")
        assert created.status_code == 200, created.text
        iid = created.json()["new_contract"]
    for _ in range(3):
        api.show(iid)
        assert api("GET", "/api/v1/instances/").status_code == 200
        assert api("PUT", f"/api/v0/instances/{iid}/", json={"label": "x"}).status_code == 200
        assert api("PUT", f"/api/v0/instances/request_logs/{iid}/", json={}).status_code == 200
    assert api("GET", "/api/v0/instances/").status_code == 200
    assert api("GET", "/api/v0/instances/").status_code == 200
    assert api("DELETE", f"/api/v0/instances/{iid}/").status_code == 200
    assert api("DELETE", f"/api/v0/instances/{iid}/").status_code != 429
    assert not any(api.admin("GET", "stats")["rate_limited"].values())


def test_calls_are_timed_at_arrival_not_when_the_state_lock_frees(make_sim):
    """The simulator serves calls under one state lock (held meanwhile by a long listing, or
    by a harness reading the fleet), a wait of this one process: two calls that reached it
    2.5 sim s apart and both waited for that lock must not be timed as they left the wait,
    0 s apart (the second one refused)."""
    sim = make_sim(time_scale=10.0, rate_limits=True)  # list: 1 s = 0.1 real s
    answers: dict[str, int] = {}

    def call(name: str) -> None:
        answers[name] = Api(sim.url, paced=False)("GET", "/api/v1/instances/").status_code

    first, second = (threading.Thread(target=call, args=(n,)) for n in ("first", "second"))
    with sim.state.lock:
        first.start()
        time.sleep(0.25)
        second.start()
        time.sleep(0.25)
    first.join(10)
    second.join(10)
    assert answers == {"first": 200, "second": 200}
    # Calls that reach it closer than the interval are still refused, lock or not.
    api = Api(sim.url, paced=False)
    time.sleep(0.15)
    with sim.state.lock:
        first, second = (threading.Thread(target=call, args=(n,)) for n in ("a", "b"))
        first.start()
        second.start()
        time.sleep(0.2)
    first.join(10)
    second.join(10)
    assert sorted((answers["a"], answers["b"])) == [200, 429]
    assert api.admin("GET", "stats")["rate_limited"] == {"list": 1}
