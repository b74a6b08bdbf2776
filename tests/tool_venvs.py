"""The side virtual environments of the compatibility tests (.venvs/<name>).

`make tools` (part of `make test`) installs them, so that the tests themselves never reach
a package registry; a test whose tool is missing is skipped with the reason.
"""

from pathlib import Path

import pytest

VENVS = Path(__file__).resolve().parents[1] / ".venvs"


def tool_bin(venv: str, program: str) -> Path:
    """`.venvs/<venv>/bin/<program>`, or skip the test when `make tools` did not install it."""
    if not (VENVS / venv / ".ponos-installed").exists():
        pytest.skip(f"{venv} is not installed in .venvs/{venv} (run `make tools`)")
    return VENVS / venv / "bin" / program
