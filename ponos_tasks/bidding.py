"""Interruptible (bid) instances: the pure decisions (no Celery, no HTTP).

Vast.ai rents a machine's GPUs to the highest priority first: on-demand, then the higher
bids. An interruptible instance that loses its machine is *stopped*, not destroyed (its
storage still bills) and resumed by Vast.ai when its priority returns (docs/reference.md
§3.6); its container then starts again from the image, so a command cut by the outbid runs
again from its beginning. The agent therefore treats an outbid as a pause: it waits for the
resume up to `fallback_after` seconds, then gives the machine up and runs the task on an
on-demand instance elsewhere.

An outbid is recognised on evidence only: an interruptible instance (`is_bid`) stopped with
a status message that says so. Any other stop is what it always was (the task's own end).
"""

from __future__ import annotations

import math
from enum import StrEnum
from typing import Any

from ponos_tasks.lifecycle import Condition, classify_instance
from ponos_tasks.models import Instance, TaskRecord

#: Words of the status_msg Vast.ai sets on an instance stopped for a higher-priority rental.
OUTBID_WORDS = ("outbid",)
#: Vast.ai's accepted range for a bid ($/h, docs/reference.md §3.1: `price`).
BID_RANGE = (0.001, 128.0)


def price_cap(config) -> float | None:
    """The most one instance may cost, $/h with its disk (None: no cap). The one place that
    knows where the cap is configured."""
    return config.budget.max_dph_per_instance


def bids(config, record: TaskRecord) -> bool:
    """Whether this task's next instance is interruptible: enabled, and the task has not
    fallen back to on-demand after an outbid that lasted too long."""
    return bool(config.vast_api.interruptible.enabled) and not record.on_demand_only


def bid_price(offer: Any, margin: float, cap: float | None) -> float | None:
    """The bid for one `type=bid` offer row: its min_bid plus `margin`, lowered so that the
    instance's $/h (bid + storage) stays within `cap`. None when even min_bid is above the
    cap or the row has no usable min_bid (such an offer is not rented)."""
    raw = offer.raw if hasattr(offer, "raw") else offer
    try:
        min_bid = float(raw["min_bid"])
        # A bid row's dph_total is priced from min_bid: the rest is the disk's storage.
        storage = max(0.0, float(raw["dph_total"]) - min_bid)
    except (KeyError, TypeError, ValueError):
        return None
    if not min_bid > 0:
        return None
    bid = min_bid + max(0.0, margin)
    capped = cap is not None and cap - storage < bid
    if capped:
        bid = cap - storage
    # Six decimals; down when the cap bounds the bid (rounding up would pass the cap).
    bid = math.floor(bid * 1e6) / 1e6 if capped else round(bid, 6)
    bid = min(max(bid, BID_RANGE[0]), BID_RANGE[1])
    return bid if bid >= min_bid else None


def instance_dph(offer: Any, bid: float) -> float:
    """What an instance rented on a `type=bid` offer at `bid` costs, $/h: the bid plus the
    disk's storage (the row's dph_total is priced from min_bid)."""
    raw = offer.raw if hasattr(offer, "raw") else offer
    storage = max(0.0, float(raw["dph_total"]) - float(raw["min_bid"]))
    return bid + storage


def is_outbid(instance: Instance | None) -> bool:
    """An interruptible instance stopped because a higher-priority rental took its machine."""
    if instance is None or not instance.raw.get("is_bid"):
        return False
    message = (instance.status_msg or "").lower()
    return classify_instance(instance) is Condition.STOPPED and any(
        word in message for word in OUTBID_WORDS
    )


class OutbidAction(StrEnum):
    NONE = "none"  # not outbid, nor coming back from it: the usual watch decides
    PAUSED = "paused"  # just found outbid: the pause starts
    WAIT = "wait"  # still outbid, within fallback_after
    FALLBACK = "fallback"  # outbid for fallback_after: leave it for an on-demand instance
    RESUMED = "resumed"  # no longer outbid: Vast.ai resumed it, the pause ends


def outbid_decision(
    record: TaskRecord, instance: Instance | None, now: float, fallback_after: float
) -> OutbidAction:
    """What the watch step does about an outbid, before anything else it decides."""
    if record.stop_requested:
        return OutbidAction.NONE  # a stop ends the task whatever its instance does
    if is_outbid(instance):
        if record.outbid_since is None:
            return OutbidAction.PAUSED
        if now - record.outbid_since >= fallback_after:
            return OutbidAction.FALLBACK
        return OutbidAction.WAIT
    if record.outbid_since is not None and classify_instance(instance) is not Condition.GONE:
        # No longer parked by the outbid: resumed, even if its new run already ended
        # between two looks (the usual watch then reads how it ended).
        return OutbidAction.RESUMED
    return OutbidAction.NONE
