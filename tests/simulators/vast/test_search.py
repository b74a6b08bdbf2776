"""Search endpoints: operators, coercion, order, limit, type and storage pricing."""

import json

import pytest

from tests.simulators.vast.conftest import Api


def test_search_needs_no_auth_and_answers_exact_json(sim):
    anonymous = Api(sim.url, key=None)
    response = anonymous("POST", "/api/v0/bundles/", json={})
    assert response.status_code == 200
    assert response.headers["Content-Type"] == "application/json"
    offers = response.json()["offers"]
    assert len(offers) == 64  # the server's default cap
    offer = offers[0]
    for field in (
        "id",
        "machine_id",
        "host_id",
        "num_gpus",
        "gpu_name",
        "gpu_ram",
        "cpu_ram",
        "reliability",
        "geolocation",
        "cuda_max_good",
        "compute_cap",
        "driver_version",
        "disk_space",
        "dph_base",
        "storage_cost",
        "dph_total",
        "verified",
        "rentable",
        "external",
        "hosting_type",
        "score",
        "dlperf",
        "inet_up",
        "duration",
        "min_bid",
        "search",
        "verification",
        "direct_port_count",
        "pcie_bw",
    ):
        assert field in offer, field
    assert ", " in offer["geolocation"] and len(offer["geolocation"].rsplit(", ", 1)[1]) == 2


def test_market_is_realistic_and_seeded(make_sim):
    first = Api(make_sim(seed=7).url).search({"limit": 5000})
    again = Api(make_sim(seed=7).url).search({"limit": 5000})
    other = Api(make_sim(seed=8).url).search({"limit": 5000})
    assert [o["id"] for o in first] == [o["id"] for o in again]
    assert [o["id"] for o in first] != [o["id"] for o in other]
    names = {o["gpu_name"] for o in first}
    assert {"RTX 4090", "RTX 3090"} <= names and any(" " in name for name in names)
    by_machine = {}
    for offer in first:
        by_machine.setdefault(offer["machine_id"], set()).add(offer["num_gpus"])
    assert any(
        counts == set(range(1, max(counts) + 1)) and max(counts) > 1
        for counts in by_machine.values()
    )
    rtx4090 = next(o for o in first if o["gpu_name"] == "RTX 4090")
    assert 24000 <= rtx4090["gpu_ram"] <= 24576


def test_eight_operators_with_string_operands(api):
    offers = api.search({"limit": 5000})
    rows = api.search(
        {
            "num_gpus": {"eq": "1"},
            "gpu_ram": {"gte": "24000"},
            "reliability": {"gt": "0.95"},
            "dph_total": {"lt": "0.6"},
            "cpu_cores": {"lte": "256"},
            "verified": {"eq": "true"},
            "gpu_name": {"in": ["RTX 4090", "RTX 3090"], "neq": "RTX 3090"},
            "geolocation": {"notin": ["CN", "VN"]},
            "limit": 5000,
        }
    )
    expected = [
        o
        for o in offers
        if o["num_gpus"] == 1
        and o["gpu_ram"] >= 24000
        and o["reliability"] > 0.95
        and o["dph_total"] < 0.6
        and o["verified"]
        and o["gpu_name"] == "RTX 4090"
        and o["geolocation"][-2:] not in ("CN", "VN")
    ]
    assert rows and {o["id"] for o in rows} == {o["id"] for o in expected}


def test_geolocation_driver_datacenter_and_list_of_strings(api):
    rows = api.search({"geolocation": {"eq": "US"}, "limit": 5000})
    assert rows and all(o["geolocation"].endswith(", US") for o in rows)
    rows = api.search({"driver_version": {"gte": 560035003}, "limit": 5000})
    assert rows and all(int(o["driver_version"].split(".")[0]) >= 560 for o in rows)
    rows = api.search({"driver_version": {"lt": "545.29.06"}, "limit": 5000})
    assert rows and all(o["driver_version"] == "535.86.05" for o in rows)
    rows = api.search({"datacenter": {"eq": True}, "limit": 5000})
    assert rows and all(o["hosting_type"] == 1 for o in rows)
    rows = api.search({"num_gpus": {"in": ["2", "4"]}, "limit": 5000})
    assert rows and {o["num_gpus"] for o in rows} == {2, 4}


def test_order_multi_key_and_limit(api):
    rows = api.search({"order": [["num_gpus", "desc"], ["dph_total", "asc"]], "limit": 200})
    assert len(rows) == 200
    keys = [(-o["num_gpus"], o["dph_total"]) for o in rows]
    assert keys == sorted(keys)
    default = api.search({"limit": 30})
    assert [o["score"] for o in default] == sorted((o["score"] for o in default), reverse=True)
    assert len(api.search({"limit": 3})) == 3


def test_type_bid_reserved_and_allocated_storage(api):
    query = {"num_gpus": {"eq": 1}, "order": [["id", "asc"]], "limit": 1}
    small = api.search({**query, "allocated_storage": 10})[0]
    big = api.search({**query, "allocated_storage": 730})[0]
    disk_hour = small["storage_cost"] * 10 / 720
    assert small["dph_total"] == pytest.approx(small["dph_base"] + disk_hour)
    assert small["search"]["totalHour"] == pytest.approx(small["dph_total"])
    assert small["search"]["diskHour"] == pytest.approx(disk_hour)
    assert big["dph_total"] > small["dph_total"]
    bid = api.search({**query, "type": "bid", "allocated_storage": 10})[0]
    assert bid["is_bid"] and bid["dph_total"] == pytest.approx(bid["min_bid"] + disk_hour)
    ondemand = api.search({**query, "type": "ondemand", "allocated_storage": 10})[0]
    assert ondemand["dph_total"] == pytest.approx(small["dph_total"])
    reserved = api.search({**query, "type": "reserved", "allocated_storage": 10})[0]
    assert reserved["discounted_dph_total"] < reserved["dph_total"]


def test_get_with_q_and_new_search_endpoint(api):
    query = {"gpu_name": {"eq": "RTX 3090"}, "order": [["dph_total", "asc"]], "limit": 4}
    posted = api.search(query)
    got = api("GET", "/api/v0/bundles", params={"q": json.dumps(query)})
    assert got.status_code == 200 and got.json()["offers"] == posted
    new = api("PUT", "/api/v0/search/asks/", json={"select_cols": ["id", "gpu_name"], "q": query})
    assert new.status_code == 200
    assert new.json()["offers"] == [{"id": o["id"], "gpu_name": "RTX 3090"} for o in posted]


@pytest.mark.parametrize(
    "body, message",
    [
        ([1, 2], "must be dict"),
        ({"num_gpus": {"like": 1}}, "like"),
        ({"num_gpus": 1}, "num_gpus"),
        ({"type": "spot"}, "spot"),
        ({"warp_drive": {"eq": 1}}, "warp_drive"),
        ({"num_gpus": {"eq": "one"}}, "one"),
    ],
)
def test_bad_queries_are_refused(api, body, message):
    response = api("POST", "/api/v0/bundles/", json=body)
    assert response.status_code == 400
    assert message in response.json()["msg"]


def test_invalid_json_body(api):
    response = api(
        "POST", "/api/v0/bundles/", data="{not json", headers={"Content-Type": "application/json"}
    )
    assert response.status_code == 400
    assert response.json() == {"error": "invalid_request", "msg": "Invalid json body"}


def test_rented_offer_disappears_and_machine_is_hidden_unless_rented_true(api):
    offers = api.search({"num_gpus": {"eq": 1}, "order": [["id", "asc"]], "limit": 5000})
    machine_offers = {}
    for offer in api.search({"limit": 5000}):
        machine_offers.setdefault(offer["machine_id"], []).append(offer)
    target = next(o for o in offers if len(machine_offers[o["machine_id"]]) >= 2)
    assert api.create(target["id"]).status_code == 200
    ids = {o["id"] for o in api.search({"limit": 5000})}
    assert target["id"] not in ids
    assert not any(o["machine_id"] == target["machine_id"] for o in api.search({"limit": 5000}))
    mine = api.search(
        {"rented": {"eq": True}, "machine_id": {"eq": target["machine_id"]}, "limit": 5000}
    )
    free = len(machine_offers[target["machine_id"]]) - 1
    assert sorted(o["num_gpus"] for o in mine) == list(range(1, free + 1))
    assert all(o["rented"] for o in mine)
    again = api.create(target["id"])
    assert again.status_code == 404 and again.json()["error"] == "no_such_ask"
