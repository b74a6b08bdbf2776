"""`ponos-vast offers` against the Vast.ai simulator (`status`: tests/test_status.py).

The simulator is an independent oracle: the expected ranking is computed from its market
(GET /_sim/offers) re-priced for the configured disk, filtered with offer_matches and
ordered with rank_offers, and compared with what the command prints.
"""

import json
import os
import subprocess
import sys

import pytest
import requests
from click.testing import CliRunner

from ponos_tasks.budget import utc_day
from ponos_tasks.commands import offers_command
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
# (`status` is tested in tests/test_status.py; these records serve tests/test_metrics.py.)


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
