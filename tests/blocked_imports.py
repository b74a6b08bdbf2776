"""Run Python in a subprocess where some top-level packages cannot be imported, as if the
`sim` extra (or the simulators) were not installed.

    run_blocked(["-c", "import ponos_tasks.tasks"], blocked=SIM_EXTRA)

A `sitecustomize` module on PYTHONPATH puts a meta-path finder first that raises
ModuleNotFoundError for the blocked names and their submodules; the child processes the
subprocess starts (Celery worker, beat) inherit it through the environment.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SIM_EXTRA = ("flask", "moto", "zstandard")
BLOCK_VARIABLE = "PONOS_TEST_BLOCKED_IMPORTS"

SITECUSTOMIZE = f'''
import os
import sys

_BLOCKED = tuple(n for n in os.environ.get({BLOCK_VARIABLE!r}, "").split(",") if n)


class _BlockedImports:
    """Makes the blocked packages (and their submodules) look not installed."""

    def find_spec(self, name, path=None, target=None):
        if any(name == b or name.startswith(b + ".") for b in _BLOCKED):
            raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by the test)",
                                      name=name)
        return None


for _name in [m for m in sys.modules if any(m == b or m.startswith(b + ".") for b in _BLOCKED)]:
    del sys.modules[_name]
sys.meta_path.insert(0, _BlockedImports())
'''


def blocked_env(tmp_path: Path, blocked, env: dict | None = None) -> dict[str, str]:
    site = tmp_path / "blocked-site"
    site.mkdir(exist_ok=True)
    (site / "sitecustomize.py").write_text(SITECUSTOMIZE)
    env = dict(os.environ if env is None else env)
    env["PYTHONPATH"] = os.pathsep.join([str(site), str(ROOT), env.get("PYTHONPATH", "")])
    env[BLOCK_VARIABLE] = ",".join(blocked)
    env.setdefault("REDIS_URL", "redis://127.0.0.1:6379/0")
    return env


def run_blocked(
    args: list[str],
    tmp_path: Path,
    *,
    blocked=SIM_EXTRA,
    env: dict | None = None,
    timeout: float = 60,
    **kwargs,
) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, *args],
        env=blocked_env(tmp_path, blocked, env),
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
        **kwargs,
    )
