"""`ponos-vast sim arkindex` in the foreground: prints its URL, farm and seed; SIGTERM stops it."""

import signal
import subprocess
import sys
import time

import requests

from .helpers import registration


class _Printed:
    """What the command printed, read until the seed line."""

    def __init__(self, stdout):
        self.values = {}
        deadline = time.monotonic() + 30
        while "seed" not in self.values and time.monotonic() < deadline:
            line = stdout.readline()
            if not line:
                break
            key, _, value = line.partition(":")
            self.values[key.strip()] = value.strip()


def test_sim_arkindex_command(tmp_path):
    farm = "3b6fb2c5-7d83-4c1c-a9f5-000000000001"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-u",
            "-m",
            "ponos_tasks.cli",
            "sim",
            "arkindex",
            "--port",
            "0",
            "--farm-id",
            farm,
            "--seed",
            "cafe" * 16,
            "--fault",
            "html_502,operation=CreateAgent,times=1",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        printed = _Printed(proc.stdout).values
        assert printed["farm id"] == farm and printed["seed"] == "cafe" * 16
        url = printed["Arkindex simulator"]
        assert url.startswith("http://127.0.0.1:")
        assert printed["S3 endpoint"].startswith("http://127.0.0.1:")

        class Sim:  # what registration() reads
            farm_id, seed = farm, "cafe" * 16

        Sim.url = url

        # The --fault rule answers the first registration with a load balancer's page.
        response = requests.post(f"{url}/api/v1/agent/", json=registration(Sim), timeout=10)
        assert response.status_code == 502 and "Bad Gateway" in response.text
        response = requests.post(f"{url}/api/v1/agent/", json=registration(Sim), timeout=10)
        assert response.status_code == 200, response.text
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
