"""`ponos-vast sim vast` in the foreground: prints URL and key, obeys --fault, stops on SIGTERM."""

import signal
import subprocess
import sys
import time

import requests

from tests.conftest import free_port


def test_sim_vast_command_runs_and_stops_on_sigterm():
    port = free_port()
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "sim",
            "vast",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--seed",
            "3",
            "--time-scale",
            "50",
            "--api-key",
            "k1",
            "--no-rate-limits",
            "--fault",
            "http_5xx,endpoint=account,status=503,times=1",
            "--fault",
            '{"fault": "slow", "endpoint": "list", "delay": 0.01}',
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        first = proc.stdout.readline()
        second = proc.stdout.readline()
        url = f"http://127.0.0.1:{port}"
        assert url in first and second.strip() == "API key: k1"
        headers = {"Authorization": "Bearer k1"}
        assert (
            requests.get(url + "/api/v0/users/current/", headers=headers, timeout=5).status_code
            == 503
        )
        assert (
            requests.get(url + "/api/v0/users/current/", headers=headers, timeout=5).status_code
            == 200
        )
        rules = requests.get(url + "/_sim/faults", timeout=5).json()["rules"]
        assert rules == [{"fault": "slow", "endpoint": "list", "delay": 0.01}]
        started = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=10) == 0
        assert time.monotonic() - started < 5
        assert "stopped" in proc.stdout.read()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


def test_sim_vast_command_rejects_bad_fault():
    result = subprocess.run(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "sim",
            "vast",
            "--port",
            "0",
            "--fault",
            "meteor_strike",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert result.returncode == 2 and "meteor_strike" in result.stderr


def test_churn_changes_offer_ids_over_time(make_sim):
    sim = make_sim(time_scale=3000.0, churn=True)  # a churn step every 0.02 real seconds
    url = sim.url + "/api/v0/bundles/"
    before = {o["id"] for o in requests.post(url, json={"limit": 5000}, timeout=5).json()["offers"]}
    time.sleep(0.5)
    after = {o["id"] for o in requests.post(url, json={"limit": 5000}, timeout=5).json()["offers"]}
    assert before != after and len(before & after) > len(before) / 2
