"""Workloads of the end-to-end tests: real `sh -c` commands that the Vast.ai simulator's local
run mode executes inside the agent's exit-code wrapper."""

from __future__ import annotations

from dataclasses import dataclass

IMAGE = "registry.example.com/ponos/e2e-worker:1"
# A small image (the simulator's pull model: size / the host's bandwidth, ~30 s once cached);
# the stack caches it on every host (conftest.py), as a farm's usual image is.
IMAGE_SIZE_GB = 0.3
ENV: dict[str, str] = {}


def command(slug: str, seconds: float = 1.0, exit_code: int = 0) -> str:
    body = f"echo '{slug}: starting'; sleep {seconds}; echo '{slug}: done'"
    if exit_code:
        body += f"; echo '{slug}: giving up' >&2; exit {exit_code}"
    return f'sh -c "{body}"'


def long_command(slug: str, seconds: int = 120) -> str:
    """Runs until stopped (the user-stopped task)."""
    return (
        f"sh -c \"echo '{slug}: long job'; i=0; while [ $i -lt {seconds} ]; do "
        f'echo tick $i; sleep 0.5; i=$((i+1)); done"'
    )


def scripted_env(slug: str, sim_seconds: float = 80.0) -> dict[str, str]:
    """Knobs of a *scripted* simulated instance that behaves like the wrapper around a
    successful command (its output, the marker, the self-stop).

    Used for the unexpected-exit fault: in local run mode the simulator ends a crashed
    container with SIGTERM, which the wrapper traps and reports as PONOS_EXIT_CODE=143 (a
    failed task, rightly); a real crash (host down, OOM kill) leaves no marker, which is
    what a scripted crash shows."""
    return {
        "SIM_RUN_MODE": "scripted",
        "SIM_DURATION": f"{sim_seconds:g}",
        "SIM_LOG_LINES": "2",
        "SIM_SELF_STOP": "true",
        "SIM_FINAL_LINES": f"{slug}: starting\n{slug}: done\nPONOS_EXIT_CODE=0",
    }


@dataclass
class Spec:
    slug: str
    command: str
    parents: tuple[str, ...] = ()
    expect: str = "completed"
    env: dict | None = None

    def admin_json(self) -> dict:
        return {
            "slug": self.slug,
            "image": IMAGE,
            "command": self.command,
            "env": {**ENV, **(self.env or {})},
            "parents": list(self.parents),
            "requires_gpu": True,
        }


def diamond(
    prefix: str, leaf_exit: int = 0, leaf_command: str | None = None, leaf_expect: str | None = None
) -> list[Spec]:
    """Five tasks: prepare -> (a, b) -> merge, and a leaf child of prepare.

    Only the leaf may fail or be stopped: Arkindex never schedules the children of a task that
    did not complete."""
    expect = leaf_expect or ("failed" if leaf_exit else "completed")
    return [
        Spec(f"{prefix}-prepare", command(f"{prefix}-prepare", 0.5)),
        Spec(f"{prefix}-a", command(f"{prefix}-a", 1.0), ("prepare",)),
        Spec(f"{prefix}-b", command(f"{prefix}-b", 1.5), ("prepare",)),
        Spec(f"{prefix}-merge", command(f"{prefix}-merge", 0.5), ("a", "b")),
        Spec(
            f"{prefix}-leaf",
            leaf_command or command(f"{prefix}-leaf", 1.0, leaf_exit),
            ("prepare",),
            expect,
        ),
    ]


def admin_tasks(prefix: str, specs: list[Spec]) -> list[dict]:
    """Admin JSON with parents named by their slugs inside the process."""
    out = []
    for spec in specs:
        data = spec.admin_json()
        data["parents"] = [f"{prefix}-{p}" for p in spec.parents]
        out.append(data)
    return out
