"""Fixtures: an in-process Vast.ai simulator on an ephemeral loopback port."""

import time

import pytest
import requests

from ponos_tasks.simulators.vast import VastSimulator
from tests.simulators.vast.pacing import Pacer, endpoint_for

API_KEY = "test-key"

# One pacer per simulator started by `make_sim` (by URL), shared by every Api on it and by the
# vastai CLI fixture: they all call as API_KEY, so they share the simulator's rate-limit slots.
PACERS: dict[str, Pacer] = {}


class Api:
    """Tiny requests wrapper with the account key; returns raw responses.

    Calls to rate-limited endpoints are spaced by the simulator's minimum intervals (see
    pacing.py) when the simulator has its limits on; `paced=False` is for tests that want
    the 429s.
    """

    def __init__(self, url: str, key: str | None = API_KEY, paced: bool = True):
        self.url = url
        self.identity = key or "127.0.0.1"  # the simulator's identity for a keyless call
        self.pacer = PACERS.get(url) if paced else None
        self.session = requests.Session()
        if key:
            self.session.headers["Authorization"] = f"Bearer {key}"

    def __call__(self, method: str, path: str, **kwargs) -> requests.Response:
        endpoint = endpoint_for(method, path) if self.pacer else None
        if endpoint is not None:
            self.pacer.wait(self.identity, endpoint)
        try:
            kwargs.setdefault("timeout", 10)
            return self.session.request(method, self.url + path, **kwargs)
        finally:
            if endpoint is not None:
                self.pacer.done(self.identity, endpoint)

    def search(self, query: dict) -> list[dict]:
        response = self("POST", "/api/v0/bundles/", json=query)
        assert response.status_code == 200, response.text
        return response.json()["offers"]

    def create(self, offer_id=None, **body) -> requests.Response:
        if offer_id is None:
            offer_id = self.search({"num_gpus": {"eq": 1}, "order": [["dph_total", "asc"]]})[0][
                "id"
            ]
        body.setdefault("image", "alpine:3")
        body.setdefault("disk", 10)
        return self("PUT", f"/api/v0/asks/{offer_id}/", json=body)

    def create_visible(self, offer_id=None, **body) -> requests.Response:
        """create, then wait out the read lag: reads show a new instance a few seconds after
        its create answered (test_instances tests the lag itself)."""
        response = self.create(offer_id, **body)
        iid = response.json().get("new_contract") if response.status_code == 200 else None
        if iid is not None:
            deadline = time.monotonic() + 10
            while self.show(iid) is None:
                assert time.monotonic() < deadline, f"instance {iid} never became visible"
                time.sleep(0.01)
        return response

    def show(self, instance_id: int) -> dict | None:
        response = self("GET", f"/api/v0/instances/{instance_id}/")
        assert response.status_code == 200, response.text
        return response.json()["instances"]

    def wait_for(self, instance_id: int, predicate, timeout: float = 10.0) -> dict | None:
        deadline = time.monotonic() + timeout
        while True:
            row = self.show(instance_id)
            # None: not visible yet (a new instance is missing from reads for a few seconds).
            if row is not None and predicate(row):
                return row
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"instance {instance_id} never matched; last: "
                    f"{row and {k: row[k] for k in ('actual_status', 'intended_status', 'cur_state', 'status_msg')}}"
                )
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
        PACERS[sim.url] = Pacer.for_sim(sim)
        return sim

    yield factory
    for sim in sims:
        PACERS.pop(sim.url, None)
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
