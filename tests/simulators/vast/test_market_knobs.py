"""The market knobs for the offer-ranking benchmark: slow cheap hosts, failures that follow
reliability (ponos_tasks/simulators/vast/simulator.py)."""

from ponos_tasks.simulators.vast.state import VastState
from tests.simulators.vast.test_realism import create, make_state, offer, run_until


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
        faults = set(state.fleet.instances[iid].faults)
        kinds |= faults
        failed += bool(faults)
    assert kinds == {"oci_failure", "pull_stall"}
    # 1 x (1 - 0.5): half of the starts fail (binomial, 200 tries: 3 sigma is ±21).
    assert 100 - 25 <= failed <= 100 + 25


def test_without_the_knob_an_unreliable_host_starts():
    state = make_state(cached_images=["img:1"])
    iid = create(state, offer(state, reliability=0.1, reliability2=0.1), image="img:1")
    run_until(state, iid, lambda r: r["actual_status"] == "running")
