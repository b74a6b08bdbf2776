"""Local run mode: the instance's command runs as a real subprocess with the instance env."""

import os
import sys
import time

from tests.simulators.vast.conftest import Api

SELF_STOP = r"""
import json, os, urllib.request
print("id", os.environ["CONTAINER_ID"], "var", os.environ["MY_VAR"], flush=True)
print("url", os.environ["VAST_URL"], flush=True)
# base-worker's self-stop: no trailing slash, the instance's own key.
request = urllib.request.Request(
    f"{os.environ['VAST_URL']}/api/v0/instances/{os.environ['CONTAINER_ID']}",
    data=json.dumps({"state": "stopped"}).encode(), method="PUT",
    headers={"Authorization": "Bearer " + os.environ["CONTAINER_API_KEY"],
             "Content-Type": "application/json"})
print("stop", urllib.request.urlopen(request).status, flush=True)
import time; time.sleep(30)
print("never printed", flush=True)
"""


def _info(api, iid):
    return next(i for i in api.admin("GET", "instances")["instances"] if i["id"] == iid)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie still answers kill(0); look at its state.
    with open(f"/proc/{pid}/stat") as stat:
        return stat.read().split(")")[-1].split()[0] != "Z"


def test_local_process_env_log_and_self_stop(make_sim):
    sim = make_sim(run_mode="local", time_scale=100.0, log_delay=1.0)
    api = Api(sim.url)
    iid = api.create_visible(
        label="local",
        runtype="args",
        onstart=sys.executable,
        args=["-c", SELF_STOP],
        env={"MY_VAR": "hello world", "SIM_PULL_SECONDS": "5", "-p 8000:8000": "1"},
    ).json()["new_contract"]
    row = api.wait_for(iid, lambda r: r["cur_state"] == "stopped", timeout=20)
    assert (row["actual_status"], row["intended_status"]) == ("exited", "stopped")
    url = api("PUT", f"/api/v0/instances/request_logs/{iid}/", json={}).json()["result_url"]
    deadline = time.monotonic() + 5  # the upload's delay, up to 300 simulated s
    while (got := Api(sim.url, key=None)("GET", url.removeprefix(sim.url))).status_code != 200:
        assert time.monotonic() < deadline, got.text
        time.sleep(0.02)
    text = got.text
    assert f"id {iid} var hello world\nurl {sim.url}\nstop 200\n" == text
    info = _info(api, iid)
    assert info["command"] == [sys.executable, "-c", SELF_STOP] and info["process_pid"] is None


def test_local_exit_is_restarted_unless_stopped(make_sim):
    sim = make_sim(time_scale=100.0)
    api = Api(sim.url)
    iid = api.create_visible(
        runtype="args",
        onstart="sh",
        args=["-c", "echo run $CONTAINER_ID; exit 3"],
        env={"SIM_RUN_MODE": "local", "SIM_PULL_SECONDS": "5"},
    ).json()["new_contract"]
    exited = api.wait_for(iid, lambda r: r["actual_status"] == "exited", timeout=20)
    assert exited["intended_status"] == "running" and exited["status_msg"].endswith("code 3")
    deadline = time.monotonic() + 20
    while _info(api, iid)["runs"] < 2:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _info(api, iid)["exit_code"] in (None, 3)
    api("PUT", f"/api/v0/instances/{iid}/", json={"state": "stopped"})
    api.wait_for(iid, lambda r: r["cur_state"] == "stopped")
    runs = _info(api, iid)["runs"]
    time.sleep(1.0)  # 100 simulated seconds: longer than the restart delay (20 s, then 40 s)
    assert _info(api, iid)["runs"] == runs
    assert _info(api, iid)["log"][:2] == [f"run {iid}", f"run {iid}"]


def test_destroy_and_simulator_stop_kill_processes(make_sim):
    sim = make_sim(run_mode="local", time_scale=100.0)
    api = Api(sim.url)
    env = {"SIM_PULL_SECONDS": "1"}
    first = api.create_visible(runtype="args", onstart="sleep", args=["60"], env=env).json()[
        "new_contract"
    ]
    second = api.create_visible(runtype="args", onstart="sleep", args=["60"], env=env).json()[
        "new_contract"
    ]
    pids = {}
    deadline = time.monotonic() + 20
    while len(pids) < 2:
        assert time.monotonic() < deadline
        for iid in (first, second):
            pid = _info(api, iid)["process_pid"]
            if pid:
                pids[iid] = pid
        time.sleep(0.05)
    api("DELETE", f"/api/v0/instances/{first}/")
    deadline = time.monotonic() + 5
    while _alive(pids[first]):
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert _alive(pids[second])
    sim.stop()
    assert not _alive(pids[second])


def test_local_unexpected_exit_kills_the_container_at_once(make_sim):
    """unexpected_exit in local mode is a container crash: the process group is SIGKILLed,
    so a command that traps SIGTERM (like the agent's wrapper) gets no chance to print."""
    sim = make_sim(run_mode="local", time_scale=100.0, log_delay=1.0)
    api = Api(sim.url)
    api.admin(
        "POST",
        "faults",
        json={"rules": [{"fault": "unexpected_exit", "label": "crashing", "after": 100}]},
    )
    script = "trap 'echo got-term; exit 143' TERM; echo started; while :; do sleep 0.05; done"
    iid = api.create_visible(
        label="crashing",
        runtype="args",
        onstart="sh",
        args=["-c", script],
        env={"SIM_PULL_SECONDS": "5"},
    ).json()["new_contract"]
    row = api.wait_for(iid, lambda r: r["actual_status"] == "exited", timeout=20)
    assert row is not None and row["intended_status"] == "running"
    time.sleep(0.5)  # a SIGTERM trap would have printed by now
    url = api("PUT", f"/api/v0/instances/request_logs/{iid}/", json={}).json()["result_url"]
    deadline = time.monotonic() + 5  # the upload's delay, up to 300 simulated s
    while (got := Api(sim.url, key=None)("GET", url.removeprefix(sim.url))).status_code != 200:
        assert time.monotonic() < deadline, got.text
        time.sleep(0.02)
    text = got.text
    assert "started" in text and "got-term" not in text
