"""The expected-cost ranking of offers (ponos_tasks/ranking.py): pure logic."""

import random

import pytest

from ponos_tasks import ranking
from ponos_tasks.models import Offer


def offer(oid, dph, *, machine=None, inet=1000.0, reliability=0.99, **extra):
    return Offer.from_dict(
        {
            "id": oid,
            "machine_id": machine if machine is not None else oid * 10,
            "dph_total": dph,
            "inet_down": inet,
            "reliability": reliability,
            **extra,
        }
    )


GB = 1e9


def test_a_slow_cheap_host_loses_to_a_fast_dearer_one():
    slow = offer(1, 0.30, inet=50)  # 8 GB at 25 Mbit/s effective: ~43 min
    fast = offer(2, 0.40, inet=2000)
    ranked = ranking.rank([slow, fast], image_bytes=8 * GB, run_s=600)
    assert [e.offer.id for e in ranked] == [2, 1]
    # The cheapest-hourly policy keeps the old order.
    hourly = ranking.rank(
        [slow, fast], policy=ranking.CHEAPEST_HOURLY, image_bytes=8 * GB, run_s=600
    )
    assert [e.offer.id for e in hourly] == [1, 2]


def test_a_cached_image_makes_the_pull_near_zero():
    cold = ranking.estimate(
        offer(1, 0.3, inet=100), image_bytes=8 * GB, cached_machines=(), run_s=0, failed_starts={}
    )
    warm = ranking.estimate(
        offer(1, 0.3, inet=100), image_bytes=8 * GB, cached_machines={10}, run_s=0, failed_starts={}
    )
    assert warm.pull_s == ranking.CACHED_START_S
    assert cold.pull_s > 20 * warm.pull_s
    # 8 GB at 0.5 × 100 Mbit/s = 1280 s download, + extraction + container start.
    assert cold.pull_s == pytest.approx(1280 + 8e9 / ranking.EXTRACT_BYTES_S + 30)


def test_failed_starts_and_low_reliability_lower_the_chance_of_success():
    assert ranking.success_probability(0.98, 0) == pytest.approx(0.98)
    assert ranking.success_probability(0.98, 1) == pytest.approx(0.49)
    assert ranking.success_probability(0.0, 0) == ranking.MIN_SUCCESS
    assert ranking.success_probability(None, 0) == ranking.UNKNOWN_RELIABILITY
    flaky = offer(1, 0.30, machine=7, reliability=0.99)
    sound = offer(2, 0.31, machine=8, reliability=0.99)
    ranked = ranking.rank([flaky, sound], image_bytes=4 * GB, run_s=60, failed_starts={7: 2})
    assert [e.offer.id for e in ranked] == [2, 1]


def test_the_pull_bills_storage_once_per_try_and_the_run_the_whole_price_once():
    e = ranking.estimate(
        offer(1, 0.36, reliability=0.5, storage_total_cost=0.06),
        image_bytes=0,
        cached_machines={10},
        run_s=3600,
        failed_starts={},
    )
    # Start 0.5; up through the hour's run 0.5 (uptime 0.5 an hour). One attempt: pull 30 s
    # at the storage's $0.06/h, and when the start works (0.5) the run at $0.36/h, all of it
    # when the host stays up, half of it when it goes down (3/4 on average); attempts until
    # one both starts and finishes: 1 / (0.5 x 0.5) = 4.
    one = 0.06 * 30 + 0.36 * 0.5 * 3600 * 0.75
    assert e.survival == pytest.approx(0.5)
    assert e.expected_bill == pytest.approx(one / 0.25 / 3600)
    assert e.expected_s == pytest.approx((30 + 0.5 * 3600 * 0.75) / 0.25)


def test_a_host_that_never_goes_down_pays_the_run_once():
    e = ranking.estimate(
        offer(1, 0.36, reliability=1.0, storage_total_cost=0.06),
        image_bytes=0,
        cached_machines={10},
        run_s=3600,
        failed_starts={10: 1},  # one failed start seen there: p = 0.5
    )
    assert e.survival == 1.0
    assert e.expected_bill == pytest.approx((0.06 * 30 / 0.5 + 0.36 * 3600) / 3600)
    assert e.expected_s == pytest.approx(30 / 0.5 + 3600)


def test_a_long_run_on_an_unreliable_host_costs_more_than_its_hourly_saving():
    """$0.30/h at uptime 0.80 against $0.36/h at 0.99, for a 4 h task: the cheap host's
    runs cut short cost more than the 17 % it saves an hour."""
    cheap = offer(1, 0.30, reliability=0.80, storage_total_cost=0.01)
    steady = offer(2, 0.36, reliability=0.99, storage_total_cost=0.01)
    ranked = ranking.rank([cheap, steady], run_s=4 * 3600, image_bytes=0, cached_machines={10})
    assert [e.offer.id for e in ranked] == [2, 1]
    short = ranking.rank([cheap, steady], run_s=60, image_bytes=0, cached_machines={10})
    assert [e.offer.id for e in short] == [1, 2]  # a minute's run: the host rarely matters


def test_the_storage_price_comes_from_the_row_else_the_whole_price():
    assert ranking.storage_price({"storage_total_cost": 0.02}, 0.5) == 0.02
    assert ranking.storage_price({"dph_total": 0.5, "dph_base": 0.45}, 0.5) == pytest.approx(0.05)
    assert ranking.storage_price({}, 0.5) == 0.5  # unknown: pessimistic


def test_unknown_size_and_line_count_pessimistically():
    known = ranking.pull_seconds(1 * GB, 1000, cached=False)
    unknown = ranking.pull_seconds(None, None, cached=False)
    assert unknown == ranking.pull_seconds(ranking.UNKNOWN_IMAGE_BYTES, 100, cached=False)
    assert unknown > known


def test_an_offer_without_a_price_is_not_ranked_and_the_price_can_be_the_bid():
    assert ranking.rank([offer(1, None)], run_s=10) == []
    bids = {1: 0.05, 2: 0.50}
    ranked = ranking.rank([offer(1, 0.9), offer(2, 0.1)], run_s=3600, price_of=lambda o: bids[o.id])
    assert [e.offer.id for e in ranked] == [1, 2]
    assert ranked[0].price == 0.05


def test_ties_are_broken_deterministically():
    offers = [offer(i, 0.2, machine=i, inet=500, reliability=0.95) for i in (5, 3, 9)]
    for _ in range(3):
        random.shuffle(offers)
        assert [e.offer.id for e in ranking.rank(offers, image_bytes=GB, run_s=60)] == [3, 5, 9]


def test_unknown_policy_is_refused():
    with pytest.raises(ValueError):
        ranking.rank([], policy="random")


def test_the_chosen_offer_has_the_lowest_expected_bill_ratio_one():
    rng = random.Random(11)
    for _ in range(200):
        offers = [
            offer(
                i,
                round(rng.uniform(0.1, 2.0), 3),
                machine=rng.randint(1, 30),
                inet=rng.choice([None, 20, 100, 500, 2000]),
                reliability=rng.choice([None, 0.7, 0.9, 0.99]),
            )
            for i in range(1, rng.randint(2, 15))
        ]
        kwargs = dict(
            image_bytes=rng.choice([None, 0.5 * GB, 9 * GB]),
            cached_machines={rng.randint(1, 30) for _ in range(3)},
            run_s=rng.uniform(0, 7200),
            failed_starts={rng.randint(1, 30): rng.randint(1, 3)},
        )
        ranked = ranking.rank(offers, **kwargs)
        every = [ranking.estimate(o, **kwargs) for o in offers]
        assert ranked[0].expected_bill / min(e.expected_bill for e in every) == pytest.approx(1.0)


def test_expected_run_seconds_is_the_median_of_recent_runs_else_the_default():
    assert ranking.expected_run_seconds([], 1800) == 1800
    assert ranking.expected_run_seconds([10, 1000, 30], 1800) == 30
    assert ranking.expected_run_seconds([10, 20], 1800) == 15


def test_the_log_line_gives_the_reasons():
    e = ranking.estimate(
        offer(12, 0.40, inet=900, reliability=0.97),
        image_bytes=8.1 * GB,
        cached_machines=(),
        run_s=2400,
        failed_starts={},
    )
    line = e.explain()
    assert line.startswith("offer 12 $0.400/h: pull ~")
    assert "(8.1 GB at 900 Mbit/s), run ~40 min, start 97 %, host up through the run 98 %: " in line
