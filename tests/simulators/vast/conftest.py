"""Fixtures: an in-process Vast.ai simulator on an ephemeral loopback port."""

import time

import pytest
import requests

from ponos_tasks.simulators.vast import VastSimulator

API_KEY = "test-key"


class Api:
    """Tiny requests wrapper with the account key; returns raw responses."""

    def __init__(self, url: str, key: str | None = API_KEY):
        self.url = url
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        return self.session.request(method, self.url + path, timeout=10, **kwargs)

    def search(self, query: dict) -> list[dict]:
        response = self("POST", "/api/v0/bundles/", json=query)
        assert response.status_code == 200, response.text
        return response.json()["offers"]

    def create(self, offer_id=None, **body) -> requests.Response:
        if offer_id is None:
            offer_id = self.search({"num_gpus": {"eq": 1}, "order": [["dph_total", "asc"]]})[0]["id"]
        body.setdefault("image", "alpine:3")
        body.setdefault("disk", 10)
        return self("PUT", f"/api/v0/asks/{offer_id}/", json=body)

    def show(self, instance_id: int) -> dict | None:
        response = self("GET", f"/api/v0/instances/{instance_id}/")
        assert response.status_code == 200, response.text
        return response.json()["instances"]

    def wait_for(self, instance_id: int, predicate, timeout: float = 10.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            row = self.show(instance_id)
            if predicate(row):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(f"instance {instance_id} never matched; last: "
                                     f"{row and {k: row[k] for k in ('actual_status', 'intended_status', 'cur_state', 'status_msg')}}")
            time.sleep(0.02)

    def admin(self, method: str, path: str, **kwargs):
        response = requests.request(method, self.url + "/_sim/" + path, timeout=10, **kwargs)
        assert response.status_code == 200, response.text
        return response.json()


def _start(**kwargs) -> VastSimulator:
    kwargs.setdefault("seed", 1)
    kwargs.setdefault("time_scale", 100.0)
    kwargs.setdefault("api_key", API_KEY)
    kwargs.setdefault("rate_limits", False)
    kwargs.setdefault("log_delay", 3.0)
    return VastSimulator(**kwargs).start()


@pytest.fixture
def make_sim():
    sims = []

    def factory(**kwargs) -> VastSimulator:
        sim = _start(**kwargs)
        sims.append(sim)
        return sim

    yield factory
    for sim in sims:
        sim.stop()


@pytest.fixture
def sim(make_sim):
    """Fast simulator (100 simulated seconds per real second), rate limits off."""
    return make_sim()


@pytest.fixture
def api(sim):
    return Api(sim.url)


# Short lifecycle knobs for scripted instances (simulated seconds).
FAST_ENV = {"SIM_PULL_SECONDS": "10", "SIM_DURATION": "30", "SIM_LOG_LINES": "3"}
