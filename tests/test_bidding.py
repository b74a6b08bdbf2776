"""The pure decisions about interruptible (bid) instances (ponos_tasks/bidding.py)."""

import pytest

from ponos_tasks.bidding import OutbidAction, bid_price, is_outbid, outbid_decision
from ponos_tasks.lifecycle import Phase
from ponos_tasks.models import Instance, TaskRecord
from ponos_tasks.offers import OfferFilterError, build_query

OUTBID_MSG = "Instance stopped: outbid by a higher priority rental"


def offer(min_bid=0.2, storage=0.05):
    return {"id": 1, "min_bid": min_bid, "dph_total": min_bid + storage}


def instance(status="stopped", intended="stopped", msg=OUTBID_MSG, is_bid=True, cur=None):
    return Instance.from_dict(
        {
            "id": 7,
            "actual_status": status,
            "intended_status": intended,
            "cur_state": cur or intended,
            "next_state": cur or intended,
            "status_msg": msg,
            "is_bid": is_bid,
        }
    )


def record(**values):
    return TaskRecord.new("t1", 0.0, phase=Phase.RUNNING, attempt=1, instance_id=7, **values)


@pytest.mark.parametrize(
    "margin,cap,expected",
    [
        (0.03, None, 0.23),  # min_bid + margin
        (0.0, None, 0.2),
        (0.5, 0.3, 0.25),  # lowered so that bid + storage stays within the cap
        (0.03, 0.25, 0.2),  # exactly min_bid fits
        (0.03, 0.24, None),  # even min_bid + storage is above the cap: not rented
    ],
)
def test_bid_price_is_min_bid_plus_margin_within_the_cap(margin, cap, expected):
    assert bid_price(offer(), margin, cap) == (
        None if expected is None else pytest.approx(expected)
    )


@pytest.mark.parametrize(
    "row",
    [{"id": 1, "dph_total": 0.3}, offer(min_bid=0), {"id": 1, "min_bid": None, "dph_total": 0.3}],
)
def test_an_offer_without_a_usable_min_bid_gets_no_bid(row):
    assert bid_price(row, 0.1, None) is None


def test_outbid_needs_a_bid_instance_stopped_with_the_outbid_message():
    assert is_outbid(instance())
    assert not is_outbid(instance(is_bid=False))  # an on-demand instance is never outbid
    assert not is_outbid(instance(msg="success, running image"))  # its own stop
    # Still running, a stop in progress: not (yet) stopped.
    assert not is_outbid(instance(status="running", intended="stopped", cur="running"))
    assert not is_outbid(None)


def test_outbid_decision_pauses_waits_falls_back_and_resumes():
    assert outbid_decision(record(), instance(), 100.0, 60) == OutbidAction.PAUSED
    paused = record(outbid_since=100.0)
    assert outbid_decision(paused, instance(), 159.0, 60) == OutbidAction.WAIT
    assert outbid_decision(paused, instance(), 160.0, 60) == OutbidAction.FALLBACK
    back = instance(status="loading", intended="running", msg="Pulling image")
    assert outbid_decision(paused, back, 120.0, 60) == OutbidAction.RESUMED
    assert outbid_decision(record(), back, 120.0, 60) == OutbidAction.NONE
    # Resumed and already ended by its own stop between two looks: resumed all the same.
    ended = instance(status="exited", msg="success, running image")
    assert outbid_decision(paused, ended, 120.0, 60) == OutbidAction.RESUMED
    # Gone while paused: not a resume; the usual watch decides.
    assert outbid_decision(paused, None, 120.0, 60) == OutbidAction.NONE
    # A stop requested by Arkindex wins over the pause.
    assert outbid_decision(record(stop_requested=True), instance(), 100.0, 60) == (
        OutbidAction.NONE
    )


def test_the_search_asks_for_bid_offers_only_when_bidding():
    assert build_query({}, disk_gb=16)["type"] == "on-demand"
    query = build_query({}, disk_gb=16, max_dph=0.5, offer_type="bid")
    assert query["type"] == "bid" and query["dph_total"] == {"lte": 0.5}
    with pytest.raises(OfferFilterError):
        build_query({}, disk_gb=16, offer_type="reserved")
