"""The market knobs for the offer-ranking benchmark: slow cheap hosts, failures that follow
reliability (ponos_tasks/simulators/vast/simulator.py)."""

from ponos_tasks.simulators.vast.state import VastState
from tests.simulators.vast.test_realism import create, make_state, offer, row, run_until


def test_slow_cheap_hosts_are_the_cheapest_ones_and_pull_slowly():
    plain = VastState(seed=5, api_key="k")
    slow = VastState(seed=5, api_key="k", slow_cheap_hosts=0.25)
    machines = sorted(slow.market.machines.values(), key=lambda m: m.specs["dph_base_per_gpu"])
    quarter = len(machines) // 4
    for machine in machines[:quarter]:
        assert 20 <= machine.specs["inet_down"] <= 100
        assert 0.70 <= machine.specs["reliability"] <= 0.90
    for machine in machines[quarter:]:
        # The others are the seed's own market, untouched.
        assert machine.specs == plain.market.machines[machine.id].specs
    # Same machines, prices and offers as without the knob.
    assert sorted(slow.market.offers) == sorted(plain.market.offers)


def test_start_failures_follow_reliability():
    state = make_state(reliability_failures=1.0)
    failed = 0
    tries = 200
    kinds = set()
    for _ in range(tries):
        iid = create(state, offer(state, reliability=0.5, reliability2=0.5))
        faults = set(state.fleet.instances[iid].faults) - {"host_down"}
        kinds |= faults
        failed += bool(faults)
    assert kinds == {"oci_failure", "pull_stall"}
    # 1 x (1 - 0.5): half of the starts fail (binomial, 200 tries: 3 sigma is ±21).
    assert 100 - 25 <= failed <= 100 + 25


def test_without_the_knob_an_unreliable_host_starts():
    state = make_state(cached_images=["img:1"])
    iid = create(state, offer(state, reliability=0.1, reliability2=0.1), image="img:1")
    run_until(state, iid, lambda r: r["actual_status"] == "running")


def test_hosts_go_down_mid_run_as_often_as_their_uptime_says():
    """Reliability is historical uptime: at 0.5, half of the hosts that started the task go
    down within an hour of running (exponential, rate −ln 0.5 per hour)."""
    state = make_state(reliability_failures=1.0)
    afters = []
    for _ in range(400):
        iid = create(state, offer(state, reliability=0.5, reliability2=0.5))
        faults = state.fleet.instances[iid].faults
        if "host_down" in faults:
            afters.append(faults["host_down"]["after"])
    assert 200 - 45 <= len(afters) <= 200 + 45  # the starts that did not fail
    within_hour = sum(1 for a in afters if a < 3600) / len(afters)
    assert 0.40 <= within_hour <= 0.60
    # A reliable host is hit far less often: 0.99 → 1 % an hour.
    reliable = make_state(reliability_failures=1.0)
    hits = 0
    for _ in range(200):
        iid = create(reliable, offer(reliable, reliability=0.99, reliability2=0.99))
        down = reliable.fleet.instances[iid].faults.get("host_down")
        hits += down is not None and down["after"] < 3600
    assert hits <= 10


def test_a_host_down_mid_run_kills_the_run_and_stops_the_gpu_bill():
    state = make_state(cached_images=["img:1"])
    state.faults.set([{"fault": "host_down", "after": 100, "label": "down"}])
    iid = create(
        state,
        offer(state),
        image="img:1",
        label="down",
        env={"SIM_DURATION": "1000", "SIM_FINAL_LINES": "PONOS_EXIT_CODE=0"},
    )
    started = run_until(state, iid, lambda r: r["actual_status"] == "running")
    run_until(state, iid, lambda r: r["actual_status"] == "offline")
    gpu = state.fleet.instances[iid].gpu_seconds
    assert 95 <= gpu <= 105
    state.clock.t = started + 5000  # long past the run's end: it never ended, the host is down
    assert row(state, iid)["actual_status"] == "offline"
    assert state.fleet.instances[iid].gpu_seconds == gpu
    assert "PONOS_EXIT_CODE" not in "".join(line for _, line in state.fleet.instances[iid].log)
