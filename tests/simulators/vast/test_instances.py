"""Create, lifecycle, list v1/v0, one instance, update, destroy, auth, logs and the ledger."""

import base64
import json
import time

import pytest
import requests

from tests.simulators.vast.conftest import API_KEY, FAST_ENV, Api


def _created(api, **body):
    response = api.create_visible(**body)
    assert response.status_code == 200, response.text
    answer = response.json()
    assert answer["success"] is True and len(answer["instance_api_key"]) == 64
    return answer["new_contract"], answer["instance_api_key"]


@pytest.mark.parametrize(
    "body, status, error",
    [
        ({"image": None}, 400, "invalid_args"),
        ({"env": "-e A=1 -p 22:22"}, 400, "invalid_args"),
        ({"disk": 4}, 400, "invalid_args"),
        ({"price": 500}, 400, "invalid_price"),
        ({"args": "not a list"}, 400, "invalid_args"),
        ({"label": "x" * 300}, 400, "label_too_long"),
    ],
)
def test_create_validation(api, body, status, error):
    response = api.create(**body)
    assert response.status_code == status
    assert response.json()["error"] == error and response.json()["success"] is False


def test_create_env_must_be_object_message(api):
    response = api.create(env="-e A=1")
    assert "env must be a dict" in response.json()["msg"]


def test_create_unknown_offer_and_bad_id(api):
    response = api("PUT", "/api/v0/asks/1/", json={"image": "alpine", "disk": 10})
    assert response.status_code == 404
    assert response.json() == {
        "success": False,
        "error": "no_such_ask",
        "msg": "No ask by id 1 is available.",
    }
    assert api("PUT", "/api/v0/asks/abc/", json={"image": "a"}).status_code == 400


def test_lifecycle_with_status_fields_and_object(api):
    env = {**FAST_ENV, "SIM_SELF_STOP": "true", "-p 8000:8000": "1", "HF_TOKEN": "x"}
    iid, _ = _created(
        api, label="life", env=env, runtype="args", onstart="python", args=["-c", "print(1)"]
    )
    first = api.show(iid)
    assert first["actual_status"] in (None, "created", "loading")
    assert first["intended_status"] == "running" and first["cur_state"] == "running"
    running = api.wait_for(iid, lambda r: r["actual_status"] == "running")
    assert running["status_msg"].startswith("success, running alpine:3")
    assert running["public_ipaddr"].endswith("\n")
    assert running["extra_env"] == [[k, v] for k, v in env.items()]
    assert running["ports"]["8000/tcp"][0]["HostPort"].isdigit()
    assert running["image_uuid"] == "alpine:3" and running["image_runtype"] == "args"
    assert running["label"] == "life" and running["gpu_name"] and running["machine_id"]
    assert running["start_date"] == pytest.approx(time.time(), abs=5)
    assert running["dph_total"] > 0
    # The command stops its own instance: intended_status at once, the container later.
    stopping = api.wait_for(iid, lambda r: r["intended_status"] == "stopped")
    assert stopping["next_state"] == "stopped"
    stopped = api.wait_for(iid, lambda r: r["cur_state"] == "stopped")
    assert (stopped["actual_status"], stopped["intended_status"], stopped["next_state"]) == (
        "exited",
        "stopped",
        "stopped",
    )
    assert stopped["ports"] is None
    events = api.admin("GET", "events")["events"]
    seen = [e["actual_status"] for e in events if e["instance_id"] == iid]
    assert seen[:4] == [None, "created", "loading", "running"] and seen[-1] == "exited"


def test_container_exit_is_restarted_when_not_self_stopping(api):
    env = {**FAST_ENV, "SIM_DURATION": "10", "SIM_SELF_STOP": "false", "SIM_EXIT_CODE": "3"}
    iid, _ = _created(api, env=env)
    exited = api.wait_for(iid, lambda r: r["actual_status"] == "exited")
    assert exited["intended_status"] == "running" and "3" in exited["status_msg"]
    api.wait_for(iid, lambda r: r["actual_status"] == "running")
    info = next(i for i in api.admin("GET", "instances")["instances"] if i["id"] == iid)
    assert info["runs"] >= 2


def test_stop_start_label_and_errors(api):
    iid, _ = _created(api, env={**FAST_ENV, "SIM_DURATION": "100000"})
    api.wait_for(iid, lambda r: r["actual_status"] == "running")
    response = api("PUT", f"/api/v0/instances/{iid}/", json={"state": "stopped"})
    assert response.status_code == 200 and response.json() == {"success": True}
    row = api.show(iid)
    # The request is taken at once; the host carries it out a few seconds later.
    assert (row["actual_status"], row["intended_status"], row["next_state"]) == (
        "running",
        "stopped",
        "stopped",
    )
    row = api.wait_for(iid, lambda r: r["cur_state"] == "stopped")
    assert (row["actual_status"], row["intended_status"]) == ("exited", "stopped")
    assert api("PUT", f"/api/v0/instances/{iid}", json={"state": "running"}).json()["success"]
    assert api.show(iid)["intended_status"] == "running"
    api.wait_for(iid, lambda r: r["actual_status"] == "running")
    response = api("PUT", f"/api/v0/instances/{iid}/", json={"label": "renamed"})
    assert response.json()["success"] and "renamed" in response.json()["msg"]
    assert api.show(iid)["label"] == "renamed"
    bad = api("PUT", f"/api/v0/instances/{iid}/", json={"state": "frozen-solid"})
    assert bad.status_code == 400 and bad.json()["msg"] == "Invalid target state"
    long = api("PUT", f"/api/v0/instances/{iid}/", json={"label": "x" * 1025})
    assert long.status_code == 400 and long.json()["error"] == "label_too_long"
    assert api("PUT", f"/api/v0/instances/{iid}/", json={}).status_code == 400
    missing = api("PUT", "/api/v0/instances/12/", json={"state": "stopped"})
    assert missing.status_code == 404 and missing.json()["error"] == "no_such_instance"


def test_destroy_then_gone(api):
    iid, _ = _created(api)
    response = api("DELETE", f"/api/v0/instances/{iid}/")
    assert response.status_code == 200 and response.json()["success"] is True
    assert api.show(iid) is None
    again = api("DELETE", f"/api/v0/instances/{iid}/")
    assert again.status_code == 404
    assert again.json() == {
        "success": False,
        "error": "no_such_instance",
        "msg": f"Instance {iid} not found.",
    }
    assert api("DELETE", "/api/v0/instances/xyz/").status_code == 400
    assert api("GET", "/api/v0/instances/xyz/").json()["error"] == "invalid_args"


def test_auth_bearer_query_param_and_401(sim):
    anonymous = Api(sim.url, key=None)
    for method, path in [
        ("GET", "/api/v1/instances/"),
        ("GET", "/api/v0/instances/"),
        ("GET", "/api/v0/instances/1/"),
        ("PUT", "/api/v0/asks/1/"),
        ("DELETE", "/api/v0/instances/1/"),
        ("GET", "/api/v0/users/current/"),
        ("PUT", "/api/v0/instances/request_logs/1/"),
    ]:
        response = anonymous(method, path, json={})
        assert response.status_code == 401, path
        assert response.json() == {
            "success": False,
            "error": "auth_error",
            "msg": "Invalid user key",
        }
    assert Api(sim.url, key="wrong")("GET", "/api/v0/users/current/").status_code == 401
    ok = anonymous("GET", "/api/v0/users/current", params={"api_key": API_KEY})
    assert ok.status_code == 200 and "balance" in ok.json() and "api_key" not in ok.json()


def test_instance_api_key_controls_only_its_instance(api, sim):
    mine, key = _created(api)
    other, _ = _created(api)
    own = Api(sim.url, key=key)
    assert own("PUT", f"/api/v0/instances/{mine}", json={"state": "stopped"}).status_code == 200
    assert own("PUT", f"/api/v0/instances/{mine}", json={"state": "running"}).status_code == 200
    for method, path, body in [
        ("PUT", f"/api/v0/instances/{other}/", {"state": "stopped"}),
        ("DELETE", f"/api/v0/instances/{other}/", {}),
        ("PUT", f"/api/v0/instances/{mine}/", {"label": "x"}),
        ("GET", f"/api/v0/instances/{mine}/", None),
        ("GET", "/api/v1/instances/", None),
    ]:
        assert own(method, path, json=body).status_code == 403, (method, path)
    assert own("DELETE", f"/api/v0/instances/{mine}/").status_code == 200
    # The key dies with its instance.
    assert own("PUT", f"/api/v0/instances/{mine}/", json={"state": "stopped"}).status_code == 401
    assert api.show(other) is not None


def test_v1_pagination_filters_order_and_columns(api):
    ids = []
    for index in range(30):
        ids.append(_created(api, label=f"job-{index % 3}" if index % 5 else None)[0])
    seen, token, pages = [], None, 0
    while True:
        params = {"limit": 25, "order_by": json.dumps([{"col": "id", "dir": "asc"}])}
        if token:
            params["after_token"] = token
        body = api("GET", "/api/v1/instances/", params=params).json()
        pages += 1
        assert body["success"] and body["total_instances"] == 30
        assert body["instances_found"] == len(body["instances"]) <= 25
        seen += [row["id"] for row in body["instances"]]
        token = body["next_token"]
        if not token:
            break
    assert pages == 2 and seen == sorted(ids)
    body = api("GET", "/api/v1/instances/", params={"limit": 100}).json()
    assert len(body["instances"]) == 25
    assert body["label_counts"] == {"job-0": 8, "job-1": 8, "job-2": 8, "": 6}
    unlabeled = api(
        "GET",
        "/api/v1/instances/",
        params={"select_filters": json.dumps({"label": {"in": [None]}})},
    ).json()
    assert unlabeled["total_instances"] == 6
    assert all(row["label"] is None for row in unlabeled["instances"])
    eq = api(
        "GET",
        "/api/v1/instances/",
        params={
            "select_filters": json.dumps({"label": {"eq": "job-1"}}),
            "order_by": json.dumps([{"col": "id", "dir": "desc"}]),
            "select_cols": json.dumps(["id", "label", "nonsense"]),
        },
    ).json()
    assert [row["id"] for row in eq["instances"]] == sorted(
        (row["id"] for row in eq["instances"]), reverse=True
    )
    assert eq["instances"][0] == {
        "id": eq["instances"][0]["id"],
        "label": "job-1",
        "nonsense": None,
    }
    desc = api(
        "GET",
        "/api/v1/instances/",
        params={"order_by": json.dumps([{"col": "label", "dir": "desc"}])},
    ).json()
    rest = api(
        "GET",
        "/api/v1/instances/",
        params={
            "order_by": json.dumps([{"col": "label", "dir": "desc"}]),
            "after_token": desc["next_token"],
        },
    ).json()
    both = [r["id"] for r in desc["instances"] + rest["instances"]]
    assert sorted(both) == sorted(ids) and len(both) == 30
    computed = api(
        "GET", "/api/v1/instances/", params={"select_filters": json.dumps({"dph_total": {"lt": 1}})}
    )
    assert computed.status_code == 400
    assert computed.json() == {
        "success": False,
        "error": "invalid_request",
        "msg": "Error in query parameters: dph_total is not a valid search key",
    }
    bad = api("GET", "/api/v1/instances/", params={"after_token": "garbage!"})
    assert bad.status_code == 400 and bad.json()["error"] == "invalid_token"
    legacy = api("GET", "/api/v0/instances/", params={"owner": "me"}).json()
    assert legacy["instances_found"] == 30 and len(legacy["instances"]) == 30
    filters = api("GET", "/api/v0/instances/filters/").json()["filters"]
    assert filters and {"actual_status", "verification", "gpu_name"} <= set(filters[0])
    assert base64.urlsafe_b64decode(desc["next_token"])
    # Each v1 list call is counted by its filters' shape, without their values (the fleet
    # benchmark tells the sync's own reads from lookups by it).
    shapes = api("GET", "/_sim/stats").json()["list_shapes"]
    assert shapes["label.in"] == 1 and shapes["label.eq"] == 1 and shapes["dph_total.lt"] == 1
    assert shapes["all"] >= 2 and not any("job" in shape for shape in shapes)


def _fetch_log(url: str, timeout: float = 5.0) -> requests.Response:
    """Polls a result_url until it answers 200 (5 real s = 500 simulated s at x100, more than
    the longest upload delay)."""
    deadline = time.monotonic() + timeout
    while True:
        response = requests.get(url, timeout=5)
        if response.status_code == 200 or time.monotonic() > deadline:
            assert response.status_code == 200, response.text
            return response
        time.sleep(0.02)


def test_logs_result_url_is_403_then_text_with_tail(make_sim):
    sim = make_sim(time_scale=100.0, log_delay=30.0)  # 0.3 real seconds
    api = Api(sim.url)
    iid, _ = _created(
        api,
        env={
            **FAST_ENV,
            "SIM_LOG_LINES": "4",
            "SIM_DURATION": "20",
            "SIM_FINAL_LINES": "all done\nexit 0",
            "SIM_SELF_STOP": "true",
        },
    )
    api.wait_for(iid, lambda r: r["intended_status"] == "stopped")
    response = api("PUT", f"/api/v0/instances/request_logs/{iid}", json={"tail": "3"})
    assert response.status_code == 200 and response.json()["success"]
    url = response.json()["result_url"]
    assert url.startswith(sim.url + "/s3/instance_logs/") and url.endswith(".log")
    pending = requests.get(url, timeout=5)
    assert pending.status_code == 403 and "<Code>AccessDenied</Code>" in pending.text
    ready = _fetch_log(url)
    assert ready.text == "sim log line 4/4\nall done\nexit 0\n"
    full = api("PUT", f"/api/v0/instances/request_logs/{iid}/", json={}).json()["result_url"]
    assert _fetch_log(full).text.count("\n") == 6
    missing = api("PUT", "/api/v0/instances/request_logs/5/", json={})
    assert missing.status_code == 404 and missing.json()["error"] == "invalid_id"


def test_ledger_bills_gpu_while_running_and_storage_until_destroy(api):
    iid, _ = _created(
        api,
        env={**FAST_ENV, "SIM_PULL_SECONDS": "20", "SIM_DURATION": "50", "SIM_SELF_STOP": "true"},
    )
    api.wait_for(iid, lambda r: r["cur_state"] == "stopped")
    time.sleep(0.2)
    assert api("DELETE", f"/api/v0/instances/{iid}/").status_code == 200
    ledger = api.admin("GET", "ledger")
    row = next(r for r in ledger["instances"] if r["id"] == iid)
    # 50 s of command, then the self-stop takes effect 2-8 s later: GPU billed until then.
    assert 52 - 0.01 <= row["gpu_seconds"] <= 58 + 0.01
    assert row["storage_seconds"] == pytest.approx(row["destroyed_at"] - row["created_at"])
    assert row["storage_seconds"] > 50 + 20 + 4
    assert row["cost"] == pytest.approx(row["gpu_cost"] + row["storage_cost"])
    assert ledger["total_cost"] == pytest.approx(sum(r["cost"] for r in ledger["instances"]))
    later = api.admin("GET", "ledger")
    assert next(r for r in later["instances"] if r["id"] == iid) == row  # frozen once destroyed


def test_stats_count_calls_and_max_live_per_label(api):
    first, _ = _created(api, label="a")
    second, _ = _created(api, label="a")
    api("DELETE", f"/api/v0/instances/{first}/")
    _created(api, label="a")
    api("GET", "/api/v1/instances/")
    stats = api.admin("GET", "stats")
    assert stats["max_live_per_label"]["a"] == 2
    assert stats["live_instances"] == 2
    assert stats["calls"]["create"] == 3 and stats["calls"]["destroy"] == 1
    assert stats["calls"]["list"] == 1 and stats["calls"]["search"] >= 3


def test_admin_offers_replace_the_market(api):
    api.admin("DELETE", "offers")
    assert api.search({}) == []
    added = api.admin(
        "POST",
        "offers",
        json={
            "offers": [
                {
                    "gpu_name": "RTX 4090",
                    "dph_base": 0.3,
                    "reliability": 0.99,
                    "geolocation": "Texas, US",
                },
                {"id": 777, "gpu_name": "H100 SXM", "num_gpus": 2, "dph_base": 4.0},
            ]
        },
    )
    assert added["ids"][1] == 777
    rows = api.search({"order": [["dph_total", "asc"]]})
    assert [(o["gpu_name"], o["num_gpus"]) for o in rows] == [("RTX 4090", 1), ("H100 SXM", 2)]
    assert rows[0]["dph_base"] == pytest.approx(0.3) and rows[0]["geolocation"] == "Texas, US"
    assert rows[1]["id"] == 777 and rows[1]["dph_base"] == pytest.approx(4.0)
    assert [o["id"] for o in api.admin("GET", "offers")["offers"]] == added["ids"]


def test_concurrent_creates_of_one_offer_rent_it_once(api):
    from concurrent.futures import ThreadPoolExecutor

    offer = api.search({"num_gpus": {"eq": 1}, "order": [["dph_total", "asc"]]})[0]["id"]
    with ThreadPoolExecutor(max_workers=8) as pool:
        statuses = list(
            pool.map(lambda i: api.create(offer, label=f"race-{i}").status_code, range(16))
        )
    assert sorted(statuses) == [200] + [404] * 15
    assert api.admin("GET", "stats")["live_instances"] == 1
