"""A burst launches at Vast.ai's create bound (benchmarks/launch.py's run_burst, small): real
worker and beat processes, the Vast.ai simulator's rate limits, penalties and search burst
limit as they are. The figures come from the simulator's records."""

from __future__ import annotations

import shutil

import pytest

from benchmarks.launch import CREATE_INTERVAL, run_burst

pytestmark = pytest.mark.e2e


@pytest.mark.timeout(240)
def test_a_burst_creates_at_the_bound_without_a_refused_or_wasted_call(tmp_path):
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    result = run_burst(16, time_scale=3.0, timeout=120, keep_logs=tmp_path)
    assert result["launched"] == 16, result
    # No 429 of any kind: the agent's own spacing (create, search and its burst limit) holds.
    assert result["rate_limited"] == {}, result
    # Every create call made an instance: none lost to no_such_ask or a penalty.
    assert result["create_calls"] == result["instances_created"] == 16, result
    assert result["no_such_ask"] == 0, result
    # One shared search answer serves several launches (it was about four searches each).
    assert result["calls_per_launch"]["search"] <= 1.0, result
    # Creates leave one after the other at the bound: a launch rate near it, and no gap
    # between two creates longer than two intervals (simulated seconds).
    assert result["launch_rate_vs_bound"] >= 0.85, result
    assert result["create_gap_max_sim_s"] <= 2 * CREATE_INTERVAL, result
