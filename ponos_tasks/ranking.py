"""Which offer to rent first: the one with the lowest expected bill for the task.

Pure logic (no Redis, no HTTP): the create step gathers the facts and calls `rank`.

The model, for one offer at `price` $/h:

- **Pull.** Before the task runs, the host pulls the image. Where this agent ran the same
  image on the same machine within `image_cache_seconds`, the host very likely still has it in
  its docker cache: the pull costs only the container's start (`CACHED_START_S`). Otherwise
  the compressed layers (the sum of `layers[].size` in the image's registry manifest) are
  downloaded at `PULL_EFFICIENCY` × the host's `inet_down` (an assumption: a docker pull rarely
  fills the line; half of it is what hosts are commonly seen to reach) and extracted at
  `EXTRACT_BYTES_S`, then the container starts. An unknown size counts as
  `UNKNOWN_IMAGE_BYTES`, an unknown `inet_down` as `UNKNOWN_INET_DOWN_MBIT` (both pessimistic
  rather than optimistic, so that a host that says nothing does not look fastest).
- **Run.** The expected run time of the task (the same on every offer: the filters already
  pick the GPU; a faster GPU is not modelled).
- **Start success.** The chance a start on this machine succeeds: its `reliability` (Vast.ai's
  own figure; `UNKNOWN_RELIABILITY` when missing), halved for each start this agent saw fail
  on that machine recently, never below `MIN_SUCCESS`.
- **Staying up.** Vast.ai's `reliability` is the machine's historical uptime. A host that
  goes down mid-run takes the run with it: the GPU time paid so far is lost and the task
  starts again elsewhere. Read as the chance the host stays up through an hour of running
  (an assumption: Vast.ai publishes no failure rate), the chance it stays up through the
  run is `reliability ** (run / 1 h)`; a run the host cuts short has paid, on average, half
  of its time.
- **Billing.** Vast.ai bills the GPU only while the instance is `running`; storage bills from
  the create to the destroy. So the pull costs the storage part of the price
  (`storage_total_cost`, else `dph_total − dph_base`, else, not knowing, the whole price) and
  the run costs the whole price.
- **A failed attempt** (the start failed, chance 1 − p; or the host went down mid-run, chance
  1 − u of a start that worked) is paid and the task starts again. Assuming the next try
  costs what this one did, the number of attempts is geometric with mean 1/(p × u):

      one attempt   = storage $/h × pull + p × price × run × (1 + u) / 2
      expected bill = one attempt / (p × u)
      expected time = (pull + p × run × (1 + u) / 2) / (p × u)

  With u = 1 that is storage × pull / p + price × run: the run paid once. A slow host costs
  little money while it pulls, but much time; an unreliable one costs its failed pulls and,
  far more, the GPU time of the runs it cuts short, and time. (What a container that exits
  early on a healthy host bills is not modelled: it is the task's, not the host's.)

Offers are ranked by expected bill, then $/h, then reliability (higher first), then offer id:
the order is deterministic. With the `cheapest_hourly` policy the estimates are still computed
(for the task's log) but offers are ranked by $/h, then reliability, then id.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

EXPECTED_COST = "expected_cost"
CHEAPEST_HOURLY = "cheapest_hourly"
POLICIES = (EXPECTED_COST, CHEAPEST_HOURLY)

PULL_EFFICIENCY = 0.5  # assumed fraction of inet_down a docker pull achieves
EXTRACT_BYTES_S = 150e6  # assumed layer extraction speed on the host's disk
CACHED_START_S = 30.0  # creating and starting a container whose image the host has
UNKNOWN_IMAGE_BYTES = 6e9  # an Arkindex GPU worker image (torch + CUDA): a few GB
UNKNOWN_INET_DOWN_MBIT = 100.0  # a host that does not say: assume a slow line
UNKNOWN_RELIABILITY = 0.9
MIN_SUCCESS = 0.05  # a floor, so that the estimate stays finite


@dataclass(frozen=True)
class Estimate:
    offer: Any
    price: float  # $/h the instance would cost (the bid for interruptible)
    loading_price: float  # $/h billed while it pulls (its storage)
    pull_s: float
    run_s: float
    success: float  # probability that a start succeeds
    cached: bool  # the host ran this image recently
    image_bytes: float
    inet_down_mbit: float
    survival: float = 1.0  # probability that the host stays up through the run

    @property
    def _run_paid_s(self) -> float:
        """Run seconds one attempt pays on average: all of a run the host survives, half
        of one it cuts short; only when the start worked."""
        return self.success * self.run_s * (1.0 + self.survival) / 2.0

    @property
    def expected_s(self) -> float:
        return (self.pull_s + self._run_paid_s) / (self.success * self.survival)

    @property
    def expected_bill(self) -> float:
        one_attempt = self.loading_price * self.pull_s + self.price * self._run_paid_s
        return one_attempt / (self.success * self.survival) / 3600

    def explain(self) -> str:
        """One line for the task's log, e.g. "offer 12 $0.400/h: pull ~3 min (8.1 GB at
        900 Mbit/s), run ~40 min, start 97 %: expected $0.29"."""
        if self.cached:
            pull = f"pull ~{_duration(self.pull_s)} (image cached on machine)"
        else:
            pull = (
                f"pull ~{_duration(self.pull_s)} ({self.image_bytes / 1e9:.1f} GB at "
                f"{self.inet_down_mbit:.0f} Mbit/s)"
            )
        return (
            f"offer {_get(self.offer, 'id')} ${self.price:.3f}/h: {pull}, "
            f"run ~{_duration(self.run_s)}, start {self.success * 100:.3g} %, "
            f"host up through the run {self.survival * 100:.3g} %: "
            f"expected ${self.expected_bill:.4f}"
        )


def pull_seconds(image_bytes: float | None, inet_down_mbit: float | None, cached: bool) -> float:
    if cached:
        return CACHED_START_S
    size = UNKNOWN_IMAGE_BYTES if image_bytes is None else max(0.0, float(image_bytes))
    line = UNKNOWN_INET_DOWN_MBIT if not inet_down_mbit else max(1.0, float(inet_down_mbit))
    download = size / (line * 1e6 / 8.0 * PULL_EFFICIENCY)
    return download + size / EXTRACT_BYTES_S + CACHED_START_S


def storage_price(offer: Any, price: float) -> float:
    """$/h the offer bills while the instance is not running (its disk)."""
    storage = _float(_get(offer, "storage_total_cost"))
    if storage is None:
        total, base = _float(_get(offer, "dph_total")), _float(_get(offer, "dph_base"))
        storage = None if total is None or base is None else total - base
    if storage is None or storage < 0:
        return price  # not knowing: as if the whole price billed (pessimistic)
    return min(storage, price)


def survival_probability(reliability: float | None, run_s: float) -> float:
    """The chance the host stays up through `run_s` of running (see the module's model)."""
    base = UNKNOWN_RELIABILITY if reliability is None else min(1.0, max(0.0, reliability))
    return max(MIN_SUCCESS, base ** (max(0.0, run_s) / 3600.0))


def success_probability(reliability: float | None, failed_starts: int) -> float:
    base = UNKNOWN_RELIABILITY if reliability is None else min(1.0, max(0.0, reliability))
    return max(MIN_SUCCESS, base * 0.5 ** max(0, failed_starts))


def estimate(
    offer: Any,
    *,
    image_bytes: float | None,
    cached_machines: Iterable[int],
    run_s: float,
    failed_starts: Mapping[int, int],
    price_of: Callable[[Any], float | None] | None = None,
) -> Estimate | None:
    """The estimate for one offer; None when its price is unknown (it cannot be ranked)."""
    price = price_of(offer) if price_of else _get(offer, "dph_total")
    if price is None:
        return None
    machine = _get(offer, "machine_id")
    cached = machine is not None and machine in set(cached_machines)
    inet = _float(_get(offer, "inet_down"))
    size = UNKNOWN_IMAGE_BYTES if image_bytes is None else float(image_bytes)
    return Estimate(
        offer=offer,
        price=float(price),
        loading_price=storage_price(offer, float(price)),
        pull_s=pull_seconds(image_bytes, inet, cached),
        run_s=max(0.0, float(run_s)),
        success=success_probability(
            _float(_get(offer, "reliability")), failed_starts.get(machine, 0)
        ),
        cached=cached,
        image_bytes=size,
        inet_down_mbit=inet or UNKNOWN_INET_DOWN_MBIT,
        survival=survival_probability(_float(_get(offer, "reliability")), run_s),
    )


def rank(
    offers: Iterable[Any],
    *,
    policy: str = EXPECTED_COST,
    image_bytes: float | None = None,
    cached_machines: Iterable[int] = (),
    run_s: float = 0.0,
    failed_starts: Mapping[int, int] | None = None,
    price_of: Callable[[Any], float | None] | None = None,
) -> list[Estimate]:
    """Every priced offer's estimate, best first under `policy`; offers with no price are
    dropped (nothing can be said of their bill)."""
    if policy not in POLICIES:
        raise ValueError(f"unknown offer ranking policy {policy!r}")
    cached = set(cached_machines)
    estimates = [
        e
        for e in (
            estimate(
                offer,
                image_bytes=image_bytes,
                cached_machines=cached,
                run_s=run_s,
                failed_starts=failed_starts or {},
                price_of=price_of,
            )
            for offer in offers
        )
        if e is not None
    ]

    def hourly(e: Estimate) -> tuple:
        return (e.price, -e.success, _get(e.offer, "id"))

    if policy == CHEAPEST_HOURLY:
        return sorted(estimates, key=hourly)
    return sorted(estimates, key=lambda e: (round(e.expected_bill, 9), *hourly(e)))


def expected_run_seconds(recent: Iterable[float], default: float) -> float:
    """The median of this image's recent run times, or the configured default without any."""
    values = sorted(float(v) for v in recent if v is not None and float(v) >= 0)
    if not values:
        return float(default)
    middle = len(values) // 2
    if len(values) % 2:
        return values[middle]
    return (values[middle - 1] + values[middle]) / 2.0


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.0f} min"
    return f"{seconds / 3600:.1f} h"


def _float(value: Any) -> float | None:
    try:
        return None if value is None else float(value)
    except (TypeError, ValueError):
        return None


def _get(offer: Any, name: str) -> Any:
    if isinstance(offer, Mapping):
        return offer.get(name)
    value = getattr(offer, name, None)
    if value is None:
        value = (getattr(offer, "raw", None) or {}).get(name)
    return value
