"""The official `vastai` CLI 1.9.x, in its own venv, pointed at the simulator with --url.

The venv lives in .venvs/vastai (installed by `make tools`); the module is skipped only when
the package cannot be installed.
"""

import json
import os
import re
import subprocess
import time

import pytest

from tests.simulators.vast.conftest import API_KEY, PACERS, Api
from tests.tool_venvs import tool_bin

pytestmark = pytest.mark.vastai_cli
ANSI = re.compile(r"\x1b\[[0-9;]*m")


@pytest.fixture(scope="session")
def vastai_bin():
    return str(tool_bin("vastai", "vastai"))


@pytest.fixture
def cli_sim(make_sim):
    # Rate limits stay on (the default): the CLI must cope with them like with Vast.ai.
    return make_sim(time_scale=50.0, rate_limits=True)


@pytest.fixture
def vastai(vastai_bin, cli_sim, tmp_path):
    home = tmp_path / "home"
    home.mkdir()
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(home),
        "XDG_CONFIG_HOME": str(home / ".config"),
        "XDG_CACHE_HOME": str(home / ".cache"),
        "XDG_STATE_HOME": str(home / ".state"),
        "XDG_DATA_HOME": str(home / ".data"),
        # The CLI fetches GPU names from VAST_URL at import time; no update check.
        "VAST_URL": cli_sim.url,
        "VASTAI_NO_UPDATE_CHECK": "1",
        "NO_COLOR": "1",
        "COLUMNS": "250",
    }

    admin = Api(cli_sim.url)

    def run(*args, expect=0) -> subprocess.CompletedProcess:
        # The CLI shares API_KEY's rate-limit slots with the test's Api calls: the pacer
        # waits before it and records the endpoints it called (see pacing.py).
        result = PACERS[cli_sim.url].paced_command(
            API_KEY,
            lambda: subprocess.run(
                [vastai_bin, "--url", cli_sim.url, "--api-key", API_KEY, *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
                stdin=subprocess.DEVNULL,
            ),
            lambda: admin.admin("GET", "stats")["calls"],
        )
        assert result.returncode == expect, (args, result.stdout, result.stderr)
        return result

    return run


def test_search_offers_honours_filters_and_order(vastai, cli_sim):
    result = vastai(
        "--raw",
        "search",
        "offers",
        "gpu_name=RTX_4090 num_gpus=1 reliability>0.95 dph<2",
        "-o",
        "dph+",
        "--limit",
        "5",
    )
    rows = json.loads(result.stdout)
    assert 0 < len(rows) <= 5
    assert all(
        r["gpu_name"] == "RTX 4090"
        and r["num_gpus"] == 1
        and r["reliability"] > 0.95
        and r["verified"]
        and not r["external"]
        for r in rows
    )
    prices = [r["dph_total"] for r in rows]
    assert prices == sorted(prices)
    expected = Api(cli_sim.url).search(
        {
            "gpu_name": {"eq": "RTX 4090"},
            "num_gpus": {"eq": 1},
            "reliability": {"gt": 0.95},
            "dph_total": {"lt": 2},
            "verified": {"eq": True},
            "external": {"eq": False},
            "rentable": {"eq": True},
            "order": [["dph_total", "asc"]],
            "limit": 5,
            "allocated_storage": 5.0,
        }
    )
    assert [r["id"] for r in rows] == [r["id"] for r in expected]
    table = vastai(
        "search",
        "offers",
        "gpu_name in [RTX_3090,L40S] num_gpus>=2",
        "-o",
        "num_gpus-,dph",
        "--limit",
        "8",
    ).stdout
    lines = [line for line in table.splitlines()[1:] if line.strip()]
    assert len(lines) == 8 and all(("RTX_3090" in line or "L40S" in line) for line in lines), table
    counts = [int(next(t for t in line.split() if re.fullmatch(r"\d+x", t))[:-1]) for line in lines]
    assert counts == sorted(counts, reverse=True) and min(counts) >= 2


def test_instance_round_trip(vastai, cli_sim):
    api = Api(cli_sim.url)
    offer = json.loads(
        vastai("--raw", "search", "offers", "num_gpus=1", "-o", "dph", "--limit", "1").stdout
    )[0]
    created = vastai(
        "create",
        "instance",
        str(offer["id"]),
        "--image",
        "alpine:3",
        "--disk",
        "12",
        "--label",
        "cli-test",
        "--env",
        "-e SIM_PULL_SECONDS=5 -e SIM_DURATION=100000 -e SIM_LOG_LINES=10000 -p 8000:8000",
        "--onstart-cmd",
        "python",
        "--args",
        "-c",
        "print(1)",
    ).stdout
    assert created.startswith("Started. {") and "'success': True" in created
    iid = int(created.split("'new_contract': ")[1].split(",")[0].rstrip("}"))
    inst = api.wait_for(iid, lambda r: r["actual_status"] == "running")
    assert inst["image_runtype"] == "args" and inst["disk_space"] == 12
    assert ["SIM_DURATION", "100000"] in inst["extra_env"]
    assert ["-p 8000:8000", "1"] in inst["extra_env"]

    listed = json.loads(vastai("--raw", "show", "instances").stdout)
    assert [row["id"] for row in listed] == [iid]
    assert listed[0]["extra_env"]["SIM_DURATION"] == "100000"  # the SDK turned pairs into a dict
    assert listed[0]["public_ipaddr"] == inst["public_ipaddr"].strip()
    table = ANSI.sub("", vastai("--no-color", "show", "instances").stdout)
    assert str(iid) in table and "cli-test" in table and "Total: 1" in table

    one = json.loads(vastai("--raw", "show", "instance", str(iid)).stdout)
    assert one["id"] == iid and one["label"] == "cli-test"
    assert str(iid) in vastai("show", "instance", str(iid)).stdout

    deadline = time.monotonic() + 10
    while len(api.admin("GET", "instances")["instances"][0]["log"]) < 3:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    logs = vastai("logs", str(iid), "--tail", "2").stdout.strip().splitlines()
    numbers = [int(re.fullmatch(r"sim log line (\d+)/10000", line).group(1)) for line in logs]
    assert len(numbers) == 2 and numbers[1] == numbers[0] + 1 and numbers[0] >= 2

    assert vastai("label", "instance", str(iid), "renamed").stdout.strip() == (
        f"label for {iid} set to renamed."
    )
    assert api.show(iid)["label"] == "renamed"

    assert vastai("stop", "instance", str(iid)).stdout.strip() == f"stopping instance {iid}."
    assert api.show(iid)["intended_status"] == "stopped"

    assert vastai("destroy", "instance", str(iid), "-y").stdout.strip() == (
        f"destroying instance {iid}."
    )
    assert api.show(iid) is None
    gone = vastai("show", "instance", str(iid), expect=1)
    assert "not found" in gone.stderr

    stats = api.admin("GET", "stats")
    assert stats["calls"]["account"] >= 1  # the CLI asked /users/current for the role
    assert stats["max_live_per_label"] == {"cli-test": 1, "renamed": 1}
    assert not any(stats["rate_limited"].values()), stats  # paced like a real client


def test_bad_key_is_reported(vastai_bin, cli_sim, tmp_path):
    result = subprocess.run(
        [vastai_bin, "--url", cli_sim.url, "--api-key", "nope", "show", "instances"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": str(tmp_path),
            "VAST_URL": cli_sim.url,
            "VASTAI_NO_UPDATE_CHECK": "1",
        },
        capture_output=True,
        text=True,
        timeout=60,
        stdin=subprocess.DEVNULL,
    )
    assert "Failed with error 401: Invalid user key" in result.stderr
