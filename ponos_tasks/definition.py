"""What a task's create request must be for Vast.ai to accept it (pure).

A task whose definition can never run (no image, a command or an env longer than Vast.ai
takes, a malformed definition) is refused by the agent before anything is rented: it ends
`error` at once with the reason in its published log, instead of a refused create retried
forever or an instance rented for nothing. The limits are Vast.ai's (docs/reference.md §1.6);
the Vast.ai simulator enforces the same ones with a 400, independently.
"""

from __future__ import annotations

import json
from collections.abc import Mapping

from ponos_tasks.wrapper import VAST_ARGS_LIMIT

MAX_IMAGE_CHARS = 1024
# args + args_str + onstart together. The exit-code wrapper (wrapper.py) takes about 1 800 of
# them, which leaves the task's own command some 2 200 characters.
MAX_COMMAND_CHARS = VAST_ARGS_LIMIT
MAX_ENV_ENTRY_CHARS = 512  # one variable: name + value
MAX_ENV_CHARS = 32768  # the whole env, as JSON


def _shorten(text: str, length: int = 60) -> str:
    return text if len(text) <= length else text[: length - 1] + "…"


def create_request_problem(
    image: str | None, env: Mapping[str, str], onstart: str | None, args: list[str] | None
) -> str | None:
    """Why Vast.ai would refuse this create request, in one line; None when it would not."""
    if not image or not image.strip():
        return "the task definition has no image"
    if len(image) > MAX_IMAGE_CHARS:
        return (
            f"the image reference is {len(image)} characters long (Vast.ai takes {MAX_IMAGE_CHARS})"
        )
    command = len(onstart or "") + sum(len(arg) for arg in args or ())
    if command > MAX_COMMAND_CHARS:
        return (
            f"the command, with the agent's exit-code wrapper, is {command} characters long "
            f"(Vast.ai takes {MAX_COMMAND_CHARS} for args and onstart together)"
        )
    for name, value in env.items():
        if len(name) + len(value) > MAX_ENV_ENTRY_CHARS:
            return (
                f"the environment variable {_shorten(name)} is {len(name) + len(value)} "
                f"characters long, name and value (Vast.ai takes {MAX_ENV_ENTRY_CHARS})"
            )
    size = len(json.dumps(dict(env)))
    if size > MAX_ENV_CHARS:
        return (
            f"the environment is {size} characters long as JSON ({len(env)} variables; "
            f"Vast.ai takes {MAX_ENV_CHARS})"
        )
    return None
