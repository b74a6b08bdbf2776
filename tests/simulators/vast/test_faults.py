"""Every fault knob, set through the admin API and observed over real HTTP."""

import time

import pytest
import requests

from ponos_tasks.simulators.vast.instances import OCI_MESSAGE
from tests.simulators.vast.conftest import FAST_ENV, Api


def _faults(api, *rules):
    api.admin("POST", "faults", json={"rules": list(rules)})


def _cheapest(api):
    return api.search({"num_gpus": {"eq": 1}, "order": [["dph_total", "asc"]]})[0]["id"]


def test_faults_admin_set_list_clear_and_validation(api):
    _faults(api, {"fault": "slow", "delay": 0.01})
    assert api.admin("GET", "faults")["rules"] == [{"fault": "slow", "delay": 0.01}]
    bad = requests.post(api.url + "/_sim/faults", json={"rules": [{"fault": "meteor"}]}, timeout=5)
    assert bad.status_code == 400 and "meteor" in bad.json()["msg"]
    assert api.admin("DELETE", "faults")["rules"] == []


def test_offer_vanished_between_search_and_create(api):
    offer = _cheapest(api)
    _faults(api, {"fault": "offer_vanished", "label": "^vanish", "times": 1})
    response = api.create_visible(offer, label="vanish-1")
    assert response.status_code == 404 and response.json()["error"] == "no_such_ask"
    assert offer not in {o["id"] for o in api.search({"limit": 5000})}
    assert api.create_visible(label="vanish-2").status_code == 200  # times=1: used up


def test_double_rent_is_accepted_and_the_second_never_starts(api):
    offer = _cheapest(api)
    _faults(api, {"fault": "double_rent", "label": "^dup", "times": 1})
    first = api.create_visible(offer, label="dup-a", env=FAST_ENV)
    assert first.status_code == 200
    assert offer in {o["id"] for o in api.search({"limit": 5000, "rented": {"eq": True}})}
    second = api.create_visible(offer, label="other", env=FAST_ENV)
    assert second.status_code == 200 and second.json()["success"] is True
    a, b = first.json()["new_contract"], second.json()["new_contract"]
    api.wait_for(a, lambda r: r["actual_status"] == "running")
    doomed = api.wait_for(b, lambda r: r["actual_status"] == "created" and r["status_msg"])
    assert "port is already allocated" in doomed["status_msg"]
    assert api.show(b)["machine_id"] == api.show(a)["machine_id"]
    # Without the knob a rented offer is simply gone.
    assert api.create_visible(offer, label="third").status_code == 404


def test_double_rent_of_an_already_rented_offer(api):
    offer = _cheapest(api)
    assert api.create_visible(offer, label="x").status_code == 200
    _faults(api, {"fault": "double_rent", "label": "^race"})
    again = api.create_visible(offer, label="race-1")
    assert again.status_code == 200 and again.json()["new_contract"]


def test_create_lost_takes_effect_but_the_answer_never_comes(api):
    _faults(api, {"fault": "create_lost", "label": "^lost", "times": 1})
    with pytest.raises(requests.ConnectionError):
        api.create(label="lost-1")
    deadline = time.monotonic() + 5  # the list shows it once its read lag is over
    while True:
        rows = api(
            "GET", "/api/v1/instances/", params={"select_filters": '{"label": {"eq": "lost-1"}}'}
        ).json()["instances"]
        if rows or time.monotonic() > deadline:
            break
    assert len(rows) == 1 and rows[0]["intended_status"] == "running"


def test_create_stopped_answers_200_success_false(api):
    _faults(api, {"fault": "create_stopped", "label": "^cold"})
    response = api.create_visible(label="cold-1")
    assert response.status_code == 200
    body = response.json()
    assert body["success"] is False and body["new_contract"]
    row = api.show(body["new_contract"])
    assert (row["intended_status"], row["cur_state"], row["next_state"]) == ("stopped",) * 3


def test_bid_below_min_bid_is_created_stopped_or_410_with_cancel_unavail(api):
    offer = api.search({"num_gpus": {"eq": 1}, "type": "bid", "order": [["min_bid", "desc"]]})[0]
    low = offer["min_bid"] / 2
    refused = api.create_visible(offer["id"], price=low, cancel_unavail=True)
    assert refused.status_code == 410 and refused.json()["error"] == "no_such_ask"
    stopped = api.create_visible(offer["id"], price=low)
    assert stopped.status_code == 200 and stopped.json()["success"] is False
    row = api.show(stopped.json()["new_contract"])
    assert row["is_bid"] and row["intended_status"] == "stopped"
    offer = api.search({"num_gpus": {"eq": 1}, "type": "bid", "order": [["min_bid", "asc"]]})[0]
    ok = api.create_visible(offer["id"], price=offer["min_bid"] * 1.5)
    assert ok.json()["success"] is True
    assert api.show(ok.json()["new_contract"])["dph_base"] == pytest.approx(offer["min_bid"] * 1.5)


def test_stuck_loading(api):
    _faults(api, {"fault": "stuck_loading", "label": "stuck"})
    iid = api.create_visible(label="stuck", env={**FAST_ENV, "SIM_PULL_SECONDS": "5"}).json()[
        "new_contract"
    ]
    api.wait_for(iid, lambda r: r["actual_status"] == "loading")
    time.sleep(0.5)  # 50 simulated seconds, ten times the pull time
    assert api.show(iid)["actual_status"] == "loading"


def test_oci_failure(api):
    _faults(api, {"fault": "oci_failure", "label": "oci"})
    iid = api.create_visible(label="oci", env=FAST_ENV).json()["new_contract"]
    row = api.wait_for(iid, lambda r: r["actual_status"] == "created" and r["status_msg"])
    assert ": OCI runtime create failed:" in row["status_msg"] and row["status_msg"] == OCI_MESSAGE
    assert (row["intended_status"], row["cur_state"], row["next_state"]) == ("stopped",) * 3


def test_unexpected_exit(api):
    _faults(api, {"fault": "unexpected_exit", "label": "crash", "after": 5})
    iid = api.create_visible(label="crash", env={**FAST_ENV, "SIM_DURATION": "1000"}).json()[
        "new_contract"
    ]
    row = api.wait_for(iid, lambda r: r["actual_status"] == "exited")
    assert row["intended_status"] == "running" and "137" in row["status_msg"]
    time.sleep(0.3)
    assert api.show(iid)["actual_status"] == "exited"  # not restarted by default


def test_offline_then_back_and_not_billed(api):
    _faults(api, {"fault": "offline", "label": "net", "after": 20, "duration": 40})
    iid = api.create_visible(label="net", env={**FAST_ENV, "SIM_DURATION": "1000"}).json()[
        "new_contract"
    ]
    api.wait_for(iid, lambda r: r["actual_status"] == "offline")
    api.wait_for(iid, lambda r: r["actual_status"] == "running")
    api("DELETE", f"/api/v0/instances/{iid}/")
    row = next(r for r in api.admin("GET", "ledger")["instances"] if r["id"] == iid)
    lifetime = row["destroyed_at"] - row["created_at"]
    assert row["storage_seconds"] == pytest.approx(lifetime - 40, abs=0.01)


def test_outbid_sets_three_state_fields_stopped(api):
    _faults(api, {"fault": "outbid", "label": "spot", "after": 5})
    iid = api.create_visible(label="spot", env={**FAST_ENV, "SIM_DURATION": "1000"}).json()[
        "new_contract"
    ]
    row = api.wait_for(iid, lambda r: r["cur_state"] == "stopped")
    assert row["cur_state"] == row["intended_status"] == row["next_state"] == "stopped"


def test_outbid_with_resume_after_comes_back_and_runs_its_command_again(api):
    _faults(api, {"fault": "outbid", "label": "^back", "after": 5, "resume_after": 20})
    offer = api.search({"num_gpus": {"eq": 1}, "type": "bid", "order": [["min_bid", "asc"]]})[0]
    iid = api.create_visible(
        offer["id"], label="back", price=offer["min_bid"], env={**FAST_ENV, "SIM_DURATION": "1000"}
    ).json()["new_contract"]
    api.wait_for(iid, lambda r: "outbid" in r["status_msg"] and r["cur_state"] == "stopped")
    row = api.wait_for(iid, lambda r: r["actual_status"] == "running", timeout=20)
    assert row["intended_status"] == row["cur_state"] == "running"
    # Once per instance: it is not outbid again after it came back.
    time.sleep(0.3)  # 30 simulated s, more than `after`
    assert api.show(iid)["actual_status"] == "running"


def test_outbid_during_loading_without_resume_stays_stopped(api):
    _faults(api, {"fault": "outbid", "label": "^pull", "during": "loading", "after": 1})
    iid = api.create_visible(
        label="pull", env={**FAST_ENV, "SIM_PULL_SECONDS": "60", "SIM_DURATION": "1000"}
    ).json()["new_contract"]
    row = api.wait_for(iid, lambda r: r["cur_state"] == "stopped")
    assert "outbid" in row["status_msg"] and row["actual_status"] == "stopped"
    time.sleep(0.8)  # 80 simulated s: the pull would have ended by now
    assert api.show(iid)["actual_status"] == "stopped"


def test_bid_raised_between_search_and_create_makes_the_bid_too_low(api):
    offer = api.search({"num_gpus": {"eq": 1}, "type": "bid", "order": [["min_bid", "asc"]]})[0]
    _faults(api, {"fault": "bid_raised", "label": "^raised", "factor": 3, "times": 1})
    answer = api.create_visible(offer["id"], label="raised", price=offer["min_bid"] * 1.5).json()
    assert answer["success"] is False
    row = api.show(answer["new_contract"])
    assert row["intended_status"] == "stopped" and row["min_bid"] == pytest.approx(
        offer["min_bid"] * 3, rel=1e-3
    )


@pytest.mark.parametrize(
    "shape, retry_after, content_type, marker",
    [
        ("text", None, "text/plain", "API requests too frequent"),
        ("detail", 1, "application/json", '"detail"'),
        ("json", 0.5, "application/json", '"rate_limit_exceeded"'),
    ],
)
def test_rate_limit_fault_shapes(api, shape, retry_after, content_type, marker):
    _faults(
        api,
        {
            "fault": "rate_limit",
            "endpoint": "list",
            "shape": shape,
            "retry_after": retry_after,
            "times": 2,
        },
    )
    for _ in range(2):
        response = api("GET", "/api/v1/instances/")
        assert response.status_code == 429
        assert response.headers["Content-Type"].startswith(content_type)
        assert marker in response.text and "threshold=" in response.text
        assert response.headers.get("Retry-After") == (
            None if retry_after is None else str(retry_after)
        )
    assert api("GET", "/api/v1/instances/").status_code == 200
    assert api.admin("GET", "stats")["rate_limited"]["list"] == 2


def test_http_5xx_and_html_error_pages(api):
    _faults(
        api,
        {"fault": "http_5xx", "endpoint": "show", "status": 503, "times": 1},
        {"fault": "html_error", "endpoint": "destroy", "status": 502, "times": 1},
    )
    response = api("GET", "/api/v0/instances/1/")
    assert response.status_code == 503 and response.json()["success"] is False
    assert api("GET", "/api/v0/instances/1/").status_code == 200
    page = api("DELETE", "/api/v0/instances/1/")
    assert page.status_code == 502 and page.headers["Content-Type"].startswith("text/html")
    assert "<html>" in page.text


def test_slow_answers(api):
    _faults(api, {"fault": "slow", "endpoint": "search", "delay": 0.4, "times": 1})
    started = time.monotonic()
    Api(api.url, key=None)("POST", "/api/v0/bundles/", json={"limit": 1})
    assert time.monotonic() - started >= 0.4
    with pytest.raises(requests.Timeout):
        _faults(api, {"fault": "slow", "endpoint": "account", "delay": 0.5, "times": 1})
        requests.get(
            api.url + "/api/v0/users/current/",
            timeout=0.2,
            headers={"Authorization": "Bearer test-key"},
        )


def test_faults_given_at_construction(make_sim):
    sim = make_sim(faults=[{"fault": "http_5xx", "endpoint": "account", "status": 500}])
    assert Api(sim.url)("GET", "/api/v0/users/current/").status_code == 500


def test_slow_after_the_effect_a_create_rents_while_its_answer_is_late(api):
    """`slow` with `after`: the create took effect (the ledger has the instance) while its
    client, which gave up waiting, never saw the answer (the window a worker can die in)."""
    _faults(api, {"fault": "slow", "endpoint": "create", "delay": 1.5, "after": True, "times": 1})
    before = len(api.admin("GET", "ledger")["instances"])
    offer = _cheapest(api)
    body = {"image": "alpine:3", "disk": 10, "label": "late-answer"}
    with pytest.raises(requests.ReadTimeout):
        api("PUT", f"/api/v0/asks/{offer}/", json=body, timeout=0.5)
    assert len(api.admin("GET", "ledger")["instances"]) == before + 1
    assert api.admin("GET", "faults")["rules"] == []  # times=1: used up
    started = time.monotonic()
    assert api.create(label="prompt").status_code == 200
    assert time.monotonic() - started < 1.0
