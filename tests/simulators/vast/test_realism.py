"""The simulator's defaults behave as Vast.ai does (docs/reference.md §1.5).

Most tests drive VastState directly on a hand-moved clock: simulated minutes pass at once,
with the simulator's own code and no HTTP. The HTTP-level behaviour (429 shapes, penalty,
burst, quota, tail over HTTP) is in test_ratelimit.py and test_instances.py.
"""

import statistics

import pytest

from ponos_tasks.simulators.vast.clock import SimClock
from ponos_tasks.simulators.vast.images import default_size_gb
from ponos_tasks.simulators.vast.state import VastState

KEY = "realism-key"
ACCOUNT = ("account", None)


class HandClock(SimClock):
    """Simulated time that moves only when the test says so."""

    def __init__(self):
        super().__init__(1.0)
        self.t = 0.0

    def now(self) -> float:
        return self.t


def make_state(**kwargs) -> VastState:
    state = VastState(seed=3, api_key=KEY, **kwargs)
    state.clock = state.fleet.clock = HandClock()
    return state


def offer(state, **fields) -> int:
    return state.market.add_offer({"num_gpus": 1, **fields})


def create(state, offer_id, **body) -> int:
    body.setdefault("image", "registry.example.com/worker:1")
    body.setdefault("disk", 10)
    status, answer, _ = state.create(offer_id, body)
    assert status == 200, answer
    return answer["new_contract"]


def row(state, iid) -> dict | None:
    return state.show(iid)[1]["instances"]


def run_until(state, iid, predicate, limit=20_000.0, step=1.0) -> float:
    """Advance the clock until the instance's row matches; returns the simulated time."""
    start = state.clock.t
    while state.clock.t - start < limit:
        state.clock.t += step
        current = row(state, iid)
        if current is not None and predicate(current):
            return state.clock.t
    raise AssertionError(f"never matched within {limit} s: {row(state, iid)}")


def test_an_instance_without_knobs_runs_until_stopped():
    """Before: a scripted instance stopped itself after 60 s (intended_status stopped)."""
    state = make_state(cached_images=["registry.example.com/worker:1"])
    iid = create(state, offer(state))
    run_until(state, iid, lambda r: r["actual_status"] == "running")
    state.clock.t += 3 * 86400
    current = row(state, iid)
    assert (current["actual_status"], current["intended_status"]) == ("running", "running")
    assert isinstance(current["status_msg"], str)


def test_a_command_that_ends_leaves_exited_with_intent_running_then_restarts():
    state = make_state(cached_images=["img:1"])
    iid = create(state, offer(state), image="img:1", env={"SIM_DURATION": "100"})
    run_until(state, iid, lambda r: r["actual_status"] == "running")
    exited_at = run_until(state, iid, lambda r: r["actual_status"] == "exited")
    current = row(state, iid)
    assert (current["intended_status"], current["cur_state"]) == ("running", "running")
    loading_at = run_until(state, iid, lambda r: r["actual_status"] == "loading")
    assert loading_at - exited_at == pytest.approx(20, abs=1.01)
    run_until(state, iid, lambda r: r["actual_status"] == "running")
    second_exit = run_until(state, iid, lambda r: r["actual_status"] == "exited")
    second_loading = run_until(state, iid, lambda r: r["actual_status"] == "loading")
    assert second_loading - second_exit == pytest.approx(40, abs=1.01)  # backoff doubles


def test_status_msg_is_always_a_string():
    """Before: null while the instance was being created."""
    state = make_state()
    iid = create(state, offer(state))
    seen = set()
    for _ in range(200):
        state.clock.t += 0.5
        current = row(state, iid)
        if current is not None:
            assert isinstance(current["status_msg"], str), current["actual_status"]
            seen.add(current["actual_status"])
    assert "loading" in seen


def test_a_new_instance_may_be_missing_from_reads_for_a_few_seconds():
    """Before: visible at once."""
    state = make_state()
    lags = []
    for _ in range(20):
        start = state.clock.t
        iid = create(state, offer(state))
        while row(state, iid) is None:
            state.clock.t += 0.1
            assert state.clock.t - start <= 5.0 + 1e-9
        listed = {r["id"] for r in state.list_v1({"limit": "25"})[1]["instances"]}
        assert iid in listed
        lags.append(state.clock.t - start)
        state.clock.t += 5.0
    assert max(lags) > 1.0 and min(lags) < 4.0


def pull_seconds(state, iid) -> float:
    start = run_until(state, iid, lambda r: r["actual_status"] == "loading", step=0.5)
    end = run_until(state, iid, lambda r: r["actual_status"] == "running", step=0.5)
    return end - start


def test_pull_time_depends_on_size_bandwidth_and_the_host_cache():
    """Before: every pull took SIM_PULL_SECONDS, 30 s by default."""
    state = make_state()
    slow = offer(state, inet_down=100.0)
    big = "registry.example.com/big-cuda-devel:1"
    assert default_size_gb(big) == 9.0
    first = create(state, slow, image=big)
    fresh = pull_seconds(state, first)
    assert 20 * 60 <= fresh <= 40 * 60  # 9 GB at 100 Mbit/s: tens of minutes
    fast = offer(state, inet_down=8000.0)
    quick = pull_seconds(state, create(state, fast, image=big))
    assert 90 <= quick <= 5 * 60  # the registry, not the line, is the limit
    state2 = make_state(cached_images=[big])
    cached = pull_seconds(state2, create(state2, offer(state2, inet_down=100.0), image=big))
    assert 20 <= cached <= 40  # ~30 s: the host has it


def test_a_host_keeps_the_images_it_pulled():
    state = make_state(image_sizes={"img:2": 2.0})
    machine_offer = offer(state, inet_down=200.0, machine_gpus=2)
    machine = state.market.offers[machine_offer].machine_id
    first = create(state, machine_offer, image="img:2")
    assert pull_seconds(state, first) > 150  # 2 GB at 200 Mbit/s: about 3 minutes
    assert "img:2" in state.admin_images()["cached_by_machine"][str(machine)]
    second_offer = next(o.id for o in state.market.offers.values() if o.machine_id == machine)
    second = create(state, second_offer, image="img:2")
    assert pull_seconds(state, second) <= 40


def test_image_size_knob_in_env_and_progress_in_status_msg():
    state = make_state()
    iid = create(state, offer(state, inet_down=400.0), env={"SIM_IMAGE_SIZE_GB": "4"})
    run_until(state, iid, lambda r: r["actual_status"] == "loading", step=0.5)
    messages = []
    while row(state, iid)["actual_status"] == "loading":
        messages.append(row(state, iid)["status_msg"])
        state.clock.t += 5
    downloading = [m for m in messages if ": Downloading [" in m]
    assert len(set(downloading)) > 10 and any(": Extracting [" in m for m in messages)
    assert "GB/1.00GB" in downloading[-1] or "MB/1.00GB" in downloading[-1]


def test_a_stalled_pull_makes_no_progress():
    state = make_state(
        faults=[{"fault": "pull_stall", "label": "^stall", "at": 0.5, "duration": None}]
    )
    iid = create(state, offer(state, inet_down=400.0), label="stall-1")
    run_until(state, iid, lambda r: r["actual_status"] == "loading", step=0.5)
    state.clock.t += 3600
    frozen = row(state, iid)["status_msg"]
    state.clock.t += 3600
    current = row(state, iid)
    assert current["actual_status"] == "loading" and current["status_msg"] == frozen
    assert "Downloading" in frozen


def test_stop_takes_effect_seconds_after_the_call():
    state = make_state(cached_images=["img:3"])
    iid = create(state, offer(state), image="img:3")
    run_until(state, iid, lambda r: r["actual_status"] == "running")
    called = state.clock.t
    assert state.update(iid, {"state": "stopped"}, ACCOUNT)[0] == 200
    current = row(state, iid)
    assert (current["actual_status"], current["intended_status"]) == ("running", "stopped")
    done = run_until(state, iid, lambda r: r["cur_state"] == "stopped", step=0.1)
    assert 2.0 <= done - called <= 8.1
    assert row(state, iid)["actual_status"] == "exited"


def test_log_delay_is_seconds_usually_with_a_tail_of_minutes():
    state = make_state()
    delays = [state._log_delay() for _ in range(4000)]
    assert 2.0 <= statistics.median(delays) <= 4.0
    minutes = [d for d in delays if d >= 30]
    assert 0.02 <= len(minutes) / len(delays) <= 0.09 and max(minutes) > 120


def test_logs_default_to_the_last_1000_lines_and_honour_tail():
    """Before: without `tail` every line came back."""
    state = make_state(cached_images=["img:4"])
    iid = create(state, offer(state), image="img:4", env={"SIM_LOG_LINES": "1500"})
    run_until(state, iid, lambda r: r["actual_status"] == "running")
    state.clock.t += 20_000
    for body, expected in (({}, 1000), ({"tail": "1400"}, 1400), ({"tail": "5"}, 5)):
        answer = state.request_logs(iid, body, "http://sim")[1]
        key = answer["result_url"].rsplit("/", 1)[1].removesuffix(".log")
        state.clock.t += 400
        text = state.log_object(key)
        lines = text.splitlines()
        assert len(lines) == expected and lines[-1] == "sim log line 1500/1500"


def test_logs_never_come_for_an_offline_host_or_a_container_that_never_started():
    state = make_state(
        faults=[
            {"fault": "oci_failure", "label": "^oci"},
            {"fault": "offline", "label": "^off", "after": 100},
        ],
        cached_images=["img:5"],
    )
    never_started = create(state, offer(state), label="oci-1", image="img:5")
    offline = create(state, offer(state), label="off-1", image="img:5")
    run_until(state, offline, lambda r: r["actual_status"] == "offline")
    keys = []
    for iid in (never_started, offline):
        answer = state.request_logs(iid, {}, "http://sim")[1]
        assert answer["success"]  # the request is accepted; the upload never comes
        keys.append(answer["result_url"].rsplit("/", 1)[1].removesuffix(".log"))
    state.clock.t += 86000
    state.tick()
    assert [state.log_object(key) for key in keys] == [None, None]
