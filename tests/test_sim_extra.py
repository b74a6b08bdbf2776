"""The simulators are the `sim` extra: the agent itself imports without Flask, moto and
zstandard, and the commands that need them say so in one line.

Each check runs in a subprocess where those packages cannot be imported
(tests/blocked_imports.py), so an agent module importing one of them at the top fails here.
"""

from __future__ import annotations

import json
import pkgutil

import pytest

import ponos_tasks
from ponos_tasks.cli import SIM_EXTRA_MESSAGE, SIM_EXTRA_MODULES
from tests.blocked_imports import SIM_EXTRA, run_blocked

# Not the agent: the simulators and the demo running on them (both are the `sim` extra).
SIM_ONLY = ("ponos_tasks.simulators", "ponos_tasks.demo")


def agent_modules() -> list[str]:
    names = ["celeryconfig"]
    for info in pkgutil.walk_packages(ponos_tasks.__path__, "ponos_tasks."):
        if not any(info.name == s or info.name.startswith(s + ".") for s in SIM_ONLY):
            names.append(info.name)
    return sorted(names)


IMPORT_ALL = """
import importlib, json, sys, traceback
failed = {}
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        failed[name] = traceback.format_exc(limit=-3)
loaded = sorted(m for m in sys.modules if m.split(".")[0] in %r)
print(json.dumps({"failed": failed, "loaded": loaded}))
"""


def test_the_extra_is_what_the_cli_checks():
    assert tuple(SIM_EXTRA_MODULES) == SIM_EXTRA


def test_every_agent_module_imports_without_the_sim_extra(tmp_path):
    modules = agent_modules()
    assert {
        "ponos_tasks.tasks",
        "ponos_tasks.app",
        "ponos_tasks.cli",
        "ponos_tasks.steps",
        "ponos_tasks.run",
        "ponos_tasks.supervisor",
        "ponos_tasks.config",
    } <= set(modules)
    result = run_blocked(["-c", IMPORT_ALL % (SIM_EXTRA,), *modules], tmp_path)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.splitlines()[-1])
    assert report["failed"] == {}, "\n".join(
        f"{name}:\n{tb}" for name, tb in report["failed"].items()
    )
    assert report["loaded"] == []


def test_the_blocking_works(tmp_path):
    """The check above can fail: the simulators themselves do not import without the extra."""
    for module in (
        "flask",
        "moto.server",
        "zstandard",
        "ponos_tasks.simulators.vast.server",
        "ponos_tasks.simulators.arkindex.archive",
    ):
        result = run_blocked(["-c", f"import {module}"], tmp_path)
        assert result.returncode != 0 and "ModuleNotFoundError" in result.stderr, module


@pytest.mark.parametrize(
    "argv",
    [
        ["demo"],
        ["stack"],
        ["sim", "vast", "--port", "0"],
        ["sim", "arkindex"],
        ["demo", "--tasks", "3", "--json"],
    ],
)
def test_simulator_commands_say_they_need_the_extra(argv, tmp_path):
    result = run_blocked(["-m", "ponos_tasks.cli", *argv], tmp_path)
    assert result.returncode == 1, result.stderr
    assert result.stderr.splitlines() == [f"ponos-vast {argv[0]}: {SIM_EXTRA_MESSAGE}"]
    assert result.stdout == ""


def test_the_other_commands_work_without_the_extra(tmp_path):
    result = run_blocked(["-m", "ponos_tasks.cli", "--help"], tmp_path)
    assert result.returncode == 0, result.stderr
    assert "demo" in result.stdout and "needs the sim extra" in result.stdout
    config = tmp_path / "agent.yml"
    config.write_text("url: http://127.0.0.1:1\n")
    result = run_blocked(
        ["-m", "ponos_tasks.cli", "check-config", str(config)],
        tmp_path,
        env={"PATH": "/usr/bin:/bin"},
    )
    assert result.returncode == 2 and "farm_id" in result.stderr, result.stderr
