"""build_query / offer_matches / rank_offers against the Vast.ai simulator over real HTTP.

The simulator evaluates queries independently of offers.py (it is an oracle), so agreement
between the server's answer and the local re-check is a real check of both: for each filter,
the offers the server returns are exactly the market offers offer_matches() accepts, in the
order rank_offers() gives.
"""

import pytest
import requests

from ponos_tasks.offers import build_query, offer_matches, rank_offers
from ponos_tasks.simulators.vast import VastSimulator
from ponos_tasks.vast import VastClient

NOT_FILTERS = ("order", "type", "limit", "allocated_storage")


@pytest.fixture(scope="module")
def sim():
    with VastSimulator(seed=0, api_key="sim-key", host="127.0.0.1", port=0, rate_limits=False) as s:
        yield s


@pytest.fixture(scope="module")
def market(sim):
    rows = requests.get(f"{sim.url}/_sim/offers", timeout=10).json()["offers"]
    assert len(rows) > 100  # a market big enough for the filters below to mean something
    return rows


@pytest.fixture(scope="module")
def client(sim):
    return VastClient(sim.url, "sim-key")


def _filters_of(query: dict) -> dict:
    return {key: value for key, value in query.items() if key not in NOT_FILTERS}


@pytest.mark.parametrize(
    "spec",
    [
        "",
        "gpu_ram>=24 reliability>0.95",
        "gpu_name=RTX_4090",
        'gpu_name in [RTX_4090,"A100 SXM4"] cuda_vers>=12',
        "geolocation in [US,DE] inet_down>500",
        "geolocation notin [US]",
        "driver_version>=550 datacenter=true",
        "ubuntu_version=22.04 has_avx=1 static_ip=true",
        "compute_cap>=890 cpu_ram>=64 disk_space>=500",
        "verified=any",
        {"gpu_ram": {"lt": 30000}, "num_gpus": {"gte": 1}},
    ],
)
def test_server_answer_is_what_offer_matches_selects(client, market, spec):
    query = build_query(spec, disk_gb=20, limit=1000)
    answer = client.search_offers(query)
    expected = {row["id"] for row in market if offer_matches(_filters_of(query), row)}
    assert expected, f"no market offer matches {spec!r}: the test would be vacuous"
    assert {offer.id for offer in answer} == expected
    assert all(offer.num_gpus == 1 for offer in answer)
    # the server orders by dph_total asc then reliability desc, as rank_offers does
    assert [(o.dph_total, o.reliability) for o in answer] == [
        (o.dph_total, o.reliability) for o in rank_offers(answer)
    ]


def test_price_cap_and_limit(client):
    answer = client.search_offers(build_query("gpu_ram>=16", disk_gb=50, max_dph=0.6, limit=5))
    assert 0 < len(answer) <= 5
    assert all(offer.dph_total <= 0.6 for offer in answer)
    cheapest = client.search_offers(build_query("gpu_ram>=16", disk_gb=50, limit=1))
    assert answer[0].id == cheapest[0].id


def test_disk_size_is_priced_in(client):
    small = {o.id: o.dph_total for o in client.search_offers(build_query("", disk_gb=5))}
    large = {o.id: o.dph_total for o in client.search_offers(build_query("", disk_gb=500))}
    common = set(small) & set(large)
    assert common
    assert all(large[i] > small[i] for i in common)
