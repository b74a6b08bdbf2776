"""`ponos-vast offers` against the Vast.ai simulator; `ponos-vast status` against a real Redis.

The simulator is an independent oracle: the expected ranking is computed from its market
(GET /_sim/offers) re-priced for the configured disk, filtered with offer_matches and
ordered with rank_offers, and compared with what the command prints.
"""

import json
import os
import subprocess
import sys
import time

import pytest
import requests
from click.testing import CliRunner

from ponos_tasks.budget import utc_day
from ponos_tasks.commands import offers_command, status_command
from ponos_tasks.config import ENV_VARS, GENERIC_ENV_PREFIX
from ponos_tasks.models import Instance, Snapshot, TaskRecord
from ponos_tasks.offers import build_query, offer_matches, rank_offers
from ponos_tasks.simulators.vast import VastSimulator
from ponos_tasks.state import Keyspace, TaskStore
from tests.conftest import free_port

NOT_FILTERS = ("order", "type", "limit", "allocated_storage")
DISK_GB = 40
FILTERS = "gpu_ram>=16 reliability>0.95"


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch):
    """No configuration override from the caller's environment (REDIS_URL, VAST_API_KEY...)."""
    names = {name for names in ENV_VARS.values() for name in names}
    names |= {name for name in os.environ if name.upper().startswith(GENERIC_ENV_PREFIX)}
    for name in names | {"PONOS_CONFIG"}:
        monkeypatch.delenv(name, raising=False)


@pytest.fixture(scope="module")
def sim():
    with VastSimulator(seed=0, api_key="sim-key", host="127.0.0.1", port=0, rate_limits=False) as s:
        yield s


def write_config(
    tmp_path,
    vast_url,
    *,
    filters=FILTERS,
    max_dph=None,
    api_key="sim-key",
    redis_url="redis://127.0.0.1:6379/0",
):
    lines = [
        "url: http://127.0.0.1:9/",
        "farm_id: 00000000-0000-4000-8000-000000000000",
        "seed: farm-seed",
        "vast_api:",
        f"  url: {vast_url}",
        f"  disk_gb: {DISK_GB}",
        f"  offer_filters: {json.dumps(filters)}",
        "  offer_wait: 600",
    ]
    if api_key is not None:
        lines.append(f"  api_key: {api_key}")
    if max_dph is not None:
        lines.append(f"  max_dph: {max_dph}")
    lines.append(f"redis_url: {redis_url}")
    path = tmp_path / "agent.yml"
    path.write_text("\n".join(lines) + "\n")
    return str(path)


def expected_ranking(sim, filters=FILTERS, max_dph=None):
    """Market offers matching the agent's query, priced for DISK_GB, ranked."""
    market = requests.get(f"{sim.url}/_sim/offers", timeout=10).json()["offers"]
    query = build_query(filters, disk_gb=DISK_GB, max_dph=max_dph)
    conditions = {k: v for k, v in query.items() if k not in NOT_FILTERS}
    rows = []
    for row in market:
        # The market lists prices for 8 GB; Vast prices storage per GB-month (/720 h).
        row = dict(row, dph_total=row["dph_base"] + row["storage_cost"] * DISK_GB / 720.0)
        if offer_matches(conditions, row):
            rows.append(row)
    return rank_offers(rows)


def run_offers(*args):
    result = CliRunner().invoke(offers_command, list(args), catch_exceptions=False)
    return result


def test_offers_json_is_the_ranking_of_matching_market_offers(sim, tmp_path):
    expected = expected_ranking(sim)
    assert len(expected) > 12  # enough offers for the order to mean something
    result = run_offers(write_config(tmp_path, sim.url), "--json", "--limit", "1000")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    assert [o["id"] for o in doc["offers"]] == [row["id"] for row in expected]
    assert doc["matched"] == len(expected)
    assert [o["dph_total"] for o in doc["offers"]] == pytest.approx(
        [row["dph_total"] for row in expected]
    )
    chosen = [o for o in doc["offers"] if o["chosen"]]
    assert [o["id"] for o in chosen] == [doc["chosen"]] == [expected[0]["id"]]
    assert chosen[0]["dph_total"] == min(o["dph_total"] for o in doc["offers"])
    assert doc["filters"] == "gpu_ram>=16 reliability>0.95"
    assert doc["query"]["allocated_storage"] == DISK_GB
    assert doc["query"]["gpu_ram"] == {"gte": 16000}


def test_offers_table_order_and_mark(sim, tmp_path):
    expected = expected_ranking(sim, max_dph=0.8)
    assert len(expected) > 5
    result = run_offers(write_config(tmp_path, sim.url, max_dph=0.8), "--limit", "5")
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "Filters: gpu_ram>=16 reliability>0.95"
    assert lines[1] == f"Disk {DISK_GB} GB per instance, at most $0.8/h"
    assert lines[2].startswith("Query sent to " + sim.url)
    assert json.loads(lines[2].split(": ", 1)[1])["dph_total"] == {"lte": 0.8}
    header = next(i for i, line in enumerate(lines) if line.lstrip().startswith("rank"))
    rows = [line.split() for line in lines[header + 1 : header + 6]]
    assert rows[0][0] == "*" and all(row[0] != "*" for row in rows[1:])
    shown = [int(row[2]) if row[0] == "*" else int(row[1]) for row in rows]
    assert shown == [row["id"] for row in expected[:5]]
    first = expected[0]
    assert f"${first['dph_total']:.4f}" in lines[header + 1]
    assert f"{first['gpu_ram'] / 1000:.1f}" in lines[header + 1]
    assert f"{len(expected)} offer(s) matched, 5 shown" in result.output
    assert f"would rent now ({first['id']})" in result.output


def test_offers_impossible_filter_says_so(sim, tmp_path):
    config = write_config(tmp_path, sim.url, filters="gpu_ram>=100000")
    result = run_offers(config)
    assert result.exit_code == 0, result.output
    assert "No offer matches these filters now" in result.output
    assert "wait up to 600 s" in result.output
    doc = json.loads(run_offers(config, "--json").output)
    assert doc["offers"] == [] and doc["chosen"] is None and doc["matched"] == 0


def test_offers_bad_config_exits_2_naming_the_keys(sim, tmp_path):
    config = write_config(tmp_path, sim.url, filters="gpu_ram>>16", api_key=None)
    result = CliRunner().invoke(offers_command, [config])
    assert result.exit_code == 2
    problems = result.stderr.splitlines()
    assert any(p.startswith("vast_api.api_key: missing") for p in problems), problems
    assert any(p.startswith("vast_api.offer_filters:") for p in problems), problems
    assert result.stdout == ""


def test_offers_vast_unreachable_is_a_clear_error(tmp_path):
    config = write_config(tmp_path, f"http://127.0.0.1:{free_port()}", api_key="secret-key")
    result = CliRunner().invoke(offers_command, [config])
    assert result.exit_code == 1
    assert result.stderr.startswith("Error: Vast.ai search failed at http://127.0.0.1:")
    assert "secret-key" not in result.output + result.stderr


def test_offers_as_subprocess(sim, tmp_path):
    expected = expected_ranking(sim)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "offers",
            write_config(tmp_path, sim.url),
            "--json",
            "--limit",
            "3",
        ],
        capture_output=True,
        text=True,
        timeout=60,
        env={k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "VAST_API_KEY")},
    )
    assert proc.returncode == 0, proc.stderr
    assert [o["id"] for o in json.loads(proc.stdout)["offers"]] == [
        row["id"] for row in expected[:3]
    ]


# ---------------------------------------------------------------------------------- status


def running_instance(instance_id, label, gpu, dph, status="running"):
    return {
        "id": instance_id,
        "label": label,
        "actual_status": status,
        "intended_status": "running",
        "cur_state": "running",
        "next_state": "running",
        "gpu_name": gpu,
        "dph_total": dph,
    }


def populate(redis_client, prefix, now):
    """Four tasks in four phases, three snapshot instances (one destroyed), counters."""
    store = TaskStore(redis_client, Keyspace(prefix), clock=lambda: now)
    assert store.create_if_absent(
        TaskRecord.new(
            "t-accepted",
            now - 50,
            phase_changed_at=now - 40,
            held_by="max_dph_total",
            waiting_for="max_dph_total $1/h: the live instances leave $0.25/h",
        )
    )
    # The meter's counters (state.BudgetStore), as the sync loop writes them.
    redis_client.set(Keyspace(prefix).spend_task("t-running"), "0.125")
    redis_client.set(Keyspace(prefix).spend_day(utc_day(now)), "0.5")
    assert store.create_if_absent(
        TaskRecord.new(
            "t-running",
            now - 300,
            phase="running",
            attempt=2,
            label="ponos-0123abcd-t-running-2",
            instance_id=1002,
            gpu_name="RTX 4090",
            dph_total=0.5,
            phase_changed_at=now - 120,
        )
    )
    assert store.create_if_absent(
        TaskRecord.new(
            "t-loading",
            now - 200,
            phase="loading",
            attempt=1,
            label="ponos-0123abcd-t-loading-1",
            instance_id=1003,
            gpu_name="RTX 3090",
            dph_total=0.25,
            phase_changed_at=now - 60,
        )
    )
    assert store.create_if_absent(
        TaskRecord.new(
            "t-failed",
            now - 900,
            phase="destroying",
            attempt=1,
            instance_id=1001,
            gpu_name="A100",
            dph_total=1.5,
            final_state="failed",
            reason="exit code 3",
        )
    )
    assert store.cas(
        "t-failed",
        expect_phase="destroying",
        expect_attempt=1,
        phase="done",
        phase_changed_at=now - 10,
    )
    store.save_snapshot(
        Snapshot(
            tuple(
                Instance.from_dict(row)
                for row in (
                    running_instance(1002, "ponos-0123abcd-t-running-2", "RTX 4090", 0.5),
                    running_instance(
                        1003, "ponos-0123abcd-t-loading-1", "RTX 3090", 0.25, "loading"
                    ),
                    dict(
                        running_instance(1001, "ponos-0123abcd-t-failed-1", "A100", 1.5, "exited"),
                        cur_state="unloaded",
                        next_state="unloaded",
                    ),
                )
            ),
            taken_at=now - 5,
        )
    )
    store.mark_synced(now - 7)
    store.count_destroyed("orphan", 2)
    store.count_destroyed("duplicate", 1)


def test_status_json_exact(redis_client, redis_url, key_prefix):
    now = time.time()
    populate(redis_client, key_prefix, now)
    result = CliRunner().invoke(
        status_command,
        ["--redis-url", redis_url, "--prefix", key_prefix, "--json"],
        catch_exceptions=False,
    )
    assert result.exit_code == 0, result.output
    doc = json.loads(result.output)
    ages = {t["id"]: t.pop("age_in_phase_s") for t in doc["tasks"]}
    assert ages == pytest.approx(
        {"t-failed": 10, "t-running": 120, "t-loading": 60, "t-accepted": 40}, abs=2
    )
    assert doc["tasks"] == [  # oldest accepted first
        {
            "id": "t-failed",
            "phase": "done",
            "attempt": 1,
            "instance_id": 1001,
            "gpu_name": "A100",
            "dph_total": 1.5,
            "final_state": "failed",
            "reason": "exit code 3",
            "held_by": None,
            "waiting_for": None,
            "spend": None,
        },
        {
            "id": "t-running",
            "phase": "running",
            "attempt": 2,
            "instance_id": 1002,
            "gpu_name": "RTX 4090",
            "dph_total": 0.5,
            "final_state": None,
            "reason": None,
            "held_by": None,
            "waiting_for": None,
            "spend": 0.125,
        },
        {
            "id": "t-loading",
            "phase": "loading",
            "attempt": 1,
            "instance_id": 1003,
            "gpu_name": "RTX 3090",
            "dph_total": 0.25,
            "final_state": None,
            "reason": None,
            "held_by": None,
            "waiting_for": None,
            "spend": None,
        },
        {
            "id": "t-accepted",
            "phase": "accepted",
            "attempt": 0,
            "instance_id": None,
            "gpu_name": None,
            "dph_total": None,
            "final_state": None,
            "reason": None,
            "held_by": "max_dph_total",
            "waiting_for": "max_dph_total $1/h: the live instances leave $0.25/h",
            "spend": None,
        },
    ]
    assert [(i["id"], i["actual_status"], i["live"]) for i in doc["instances"]] == [
        (1002, "running", True),
        (1003, "loading", True),
        (1001, "exited", False),
    ]
    assert doc["snapshot_age_s"] == pytest.approx(5, abs=2)
    totals = doc["totals"]
    assert totals.pop("last_sync_age_s") == pytest.approx(7, abs=2)
    assert totals == {
        "tasks_per_phase": {"accepted": 1, "loading": 1, "running": 1, "done": 1},
        "live_instances": 2,
        "spend_per_hour": 0.75,
        "destroyed_by_cause": {"orphan": 2, "duplicate": 1},
    }
    # Without a configuration, the spend (no headroom: the limits are in the configuration).
    assert doc["budget"] == {
        "spent_today": 0.5,
        "spent_today_rebuilt": False,
        "task_spend": {"t-running": 0.125},
        "headroom": None,
    }


def test_status_text(redis_client, redis_url, key_prefix, tmp_path):
    now = time.time()
    populate(redis_client, key_prefix, now)
    # Through the config file this time (its redis_url); Vast.ai and Arkindex are unreachable.
    config = write_config(tmp_path, "http://127.0.0.1:9", redis_url=redis_url)
    result = CliRunner().invoke(
        status_command, ["--config", config, "--prefix", key_prefix], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    out = result.output
    assert "Tasks (4)" in out
    running = next(line for line in out.splitlines() if line.strip().startswith("t-running"))
    assert running.split()[:5] == ["t-running", "running", "2", "1002", "RTX"]
    assert "$0.5000" in running
    assert "2m00s" in running or "2m01s" in running
    failed = next(line for line in out.splitlines() if line.strip().startswith("t-failed"))
    assert failed.rstrip().endswith("failed: exit code 3")
    assert (
        "Instances in the last snapshot (3, taken 5s ago)" in out
        or "Instances in the last snapshot (3, taken 6s ago)" in out
    )
    assert "exited (destroyed)" in out
    assert "Tasks per phase: accepted 1, loading 1, running 1, done 1" in out
    assert "Live instances: 2, spending $0.7500/h" in out
    assert "Destroyed by the sync loop: duplicate 1, orphan 2" in out
    assert "Last sync: 7s ago" in out or "Last sync: 8s ago" in out
    accepted = next(line for line in out.splitlines() if line.strip().startswith("t-accepted"))
    assert accepted.rstrip().endswith(
        "waiting: max_dph_total $1/h: the live instances leave $0.25/h"
    )
    assert "Spent today (UTC): $0.5000\n" in out
    assert "New instances: no price limit" in out  # the configuration sets none


def test_status_empty_prefix_says_never(redis_url, key_prefix):
    result = CliRunner().invoke(
        status_command, ["--redis-url", redis_url, "--prefix", key_prefix], catch_exceptions=False
    )
    assert result.exit_code == 0, result.output
    assert "Tasks (0)" in result.output
    assert "(0, taken never)" in result.output
    assert "Last sync: never" in result.output
    assert "Live instances: 0, spending $0.0000/h" in result.output


def test_status_redis_down_and_bad_config(tmp_path):
    result = CliRunner().invoke(
        status_command, ["--redis-url", f"redis://127.0.0.1:{free_port()}/0"]
    )
    assert result.exit_code == 1
    assert "cannot read Redis" in result.stderr
    config = write_config(tmp_path, "http://127.0.0.1:9", api_key=None)
    result = CliRunner().invoke(status_command, ["--config", config])
    assert result.exit_code == 2
    assert result.stderr.startswith("vast_api.api_key: missing")


def test_status_as_subprocess(redis_client, redis_url, key_prefix):
    populate(redis_client, key_prefix, time.time())
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "ponos_tasks.cli",
            "status",
            "--redis-url",
            redis_url,
            "--prefix",
            key_prefix,
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["totals"]["live_instances"] == 2
