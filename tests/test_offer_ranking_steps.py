# ruff: noqa: F811  (the fixtures imported from test_steps are parameters here)
"""The create step orders offers by the configured policy (ranking.py), with the image's size
from its registry manifest, and records where an image ran and how long its tasks run."""

import pytest

from ponos_tasks.simulators.registry import RegistrySimulator
from tests.test_steps import admin, contexts, scripted, stack, start_and_finish  # noqa: F401

SLOW, FAST = 93_001, 93_002  # machine ids
IMAGE_BYTES = [4_000_000_000, 4_000_000_000]  # 8 GB of layers in the manifest


def machine(machine_id: int, price: float, inet_down: float, reliability: float) -> dict:
    return {
        "machine_id": machine_id,
        "num_gpus": 1,
        "dph_base": price,
        "verified": True,
        "verification": "verified",
        "vericode": 1,
        "external": False,
        "reliability": reliability,
        "reliability2": reliability,
        "inet_down": inet_down,
        "storage_cost": 0.1,
        "gpu_name": "RTX 3090",
        "gpu_ram": 24576,
        "disk_space": 500.0,
    }


@pytest.fixture
def slow_cheap_market(admin):
    admin.clear_offers()
    # The same price; the slow host is the more reliable (cheapest_hourly's tie-break), but
    # pulls 8 GB at 30 Mbit/s (about an hour of storage billed) where the other takes 2 min.
    admin.add_offers([machine(SLOW, 0.20, 30.0, 0.995), machine(FAST, 0.20, 2000.0, 0.99)])
    with RegistrySimulator() as registry:
        registry.add_image("team/big", "1", entrypoint=["worker"], layer_sizes=IMAGE_BYTES)
        yield f"{registry.host}/team/big:1"


def run_one(ctx, admin, image: str) -> str:
    # The simulator's pull takes a fixed 20 s here: the test is about the agent's choice.
    task_id = admin.one_task(
        image=image, command=None, env=scripted(0, SIM_PULL_SECONDS="20", SIM_DURATION="300")
    )
    start_and_finish(ctx, task_id)
    return task_id


def rented_machine(admin, task_id: str) -> int:
    [row] = admin.rows_for(task_id)
    return row["machine_id"]


def test_expected_cost_rents_the_fast_host_and_says_why(contexts, admin, slow_cheap_market):
    ctx = contexts()
    task_id = run_one(ctx, admin, slow_cheap_market)
    assert rented_machine(admin, task_id) == FAST
    log = admin.task_log(task_id)
    assert "lowest expected bill first: offer" in log
    assert "(8.0 GB at 30 Mbit/s)" in log and "(8.0 GB at 2000 Mbit/s)" in log
    assert "the lowest expected bill [offer" in log
    # Where the image ran (its host has it cached now) and how long the task ran.
    assert ctx.store.image_hosts(slow_cheap_market, 3600) == {FAST}
    assert len(ctx.store.recent_run_seconds(slow_cheap_market)) == 1


def test_cheapest_hourly_rents_the_cheapest_then_most_reliable_host(
    contexts, admin, slow_cheap_market
):
    ctx = contexts(vast_api={"offer_ranking": "cheapest_hourly"})
    task_id = run_one(ctx, admin, slow_cheap_market)
    assert rented_machine(admin, task_id) == SLOW
    assert "cheapest first (then most reliable)" in admin.task_log(task_id)
    assert "the cheapest matching offer" in admin.task_log(task_id)


def test_a_host_that_ran_the_image_recently_wins(contexts, admin, slow_cheap_market):
    ctx = contexts()
    # This agent ran the image on the slow host: no pull there at all.
    ctx.store.remember_image_host(slow_cheap_market, SLOW, 3600)
    task_id = run_one(ctx, admin, slow_cheap_market)
    assert rented_machine(admin, task_id) == SLOW
    assert "image cached on machine" in admin.task_log(task_id)
