"""Regenerate constraints.txt: the exact versions the worker image installs.

Installs the project (runtime dependencies only, without the simulators' flask, moto and
zstandard, which only the `sim` extra needs) into a throw-away virtual environment with the
ordinary pip client and the index pip is configured with, then writes `pip freeze` (without
the project itself) under a header. Run it with the image's Python (3.11): `make lock`.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import tempfile
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
OUTPUT = ROOT / "constraints.txt"
# Needed by the simulators / local stack only (the `sim` extra), not by the worker image.
SIM_ONLY = ("flask", "moto", "zstandard")
HEADER = """\
# Pinned versions of the worker image's runtime dependencies (transitive ones included).
# The Dockerfile installs with: pip install -c constraints.txt .
# Regenerate after changing [project] dependencies in pyproject.toml: `make lock`
# (scripts/lock_constraints.py: a clean venv, `pip install .` without {sim},
# then `pip freeze --exclude ponos-vast`). Python {python}.
"""


def runtime_pyproject(text: str) -> str:
    """pyproject.toml with the simulator-only packages left out of [project] dependencies."""
    pattern = re.compile(r'^\s*"(' + "|".join(SIM_ONLY) + r')\b[^"]*",?\s*$', re.IGNORECASE)
    return "\n".join(line for line in text.splitlines() if not pattern.match(line)) + "\n"


def main() -> int:
    with tempfile.TemporaryDirectory(prefix="ponos-lock-") as tmp:
        src = Path(tmp) / "src"
        src.mkdir()
        shutil.copy(ROOT / "README.md", src / "README.md")
        shutil.copytree(
            ROOT / "ponos_tasks",
            src / "ponos_tasks",
            ignore=shutil.ignore_patterns("__pycache__", "*.pyc"),
        )
        (src / "pyproject.toml").write_text(
            runtime_pyproject((ROOT / "pyproject.toml").read_text())
        )
        env_dir = Path(tmp) / "venv"
        venv.create(env_dir, with_pip=True, clear=True)
        python = env_dir / "bin" / "python"
        subprocess.run([python, "-m", "pip", "install", "--quiet", str(src)], check=True)
        frozen = subprocess.run(
            [python, "-m", "pip", "freeze", "--exclude", "ponos-vast"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout
        version = subprocess.run(
            [python, "-c", "import platform; print(platform.python_version())"],
            check=True,
            capture_output=True,
            text=True,
        ).stdout.strip()
    lines = sorted(
        (line for line in frozen.splitlines() if line.strip()),
        key=lambda line: re.split(r"[=<>!~ ;@]", line, maxsplit=1)[0].lower(),
    )
    OUTPUT.write_text(
        HEADER.format(sim=", ".join(SIM_ONLY), python=version) + "\n".join(lines) + "\n"
    )
    print(f"wrote {OUTPUT.relative_to(ROOT)}: {len(lines)} pins", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
