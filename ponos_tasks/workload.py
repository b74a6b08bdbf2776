"""The demo's sample workload, as specs for the Arkindex simulator's admin API (pure).

    processes = build_workload(20, seed=0)
    for process in processes:
        POST /_sim/processes  process.admin_json()

Tasks are spread over processes of at most five; inside a process each task after the first
depends on one or two earlier ones (a small DAG rooted at `prepare`). Commands are real
`sh -c` scripts (the Vast.ai simulator's local run mode runs them) lasting a few real
seconds. A few tasks exit non-zero, and one long task is meant to be stopped by the user.

Only tasks without children fail or are stopped: Arkindex never schedules the children of a
task that did not complete, so a failing parent would leave tasks that never reach the agent.
Every task of the workload therefore ends in its `expect` state, and all are the agent's.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

MAX_PROCESS_SIZE = 5
DEFAULT_IMAGE = "registry.example.com/ponos/demo-worker:latest"
STOP_AFTER_SECONDS = 600  # the stopped task's command would run this long (real seconds)
STEP_NAMES = ("ocr", "layout", "classify", "segment", "index", "export", "translate", "dedup")


@dataclass(frozen=True)
class DemoTask:
    slug: str
    command: str
    parents: tuple[str, ...]
    expect: str  # completed | failed | stopped
    duration: float  # real seconds the command runs (the stopped one: until stopped)
    exit_code: int = 0

    @property
    def stop_by_user(self) -> bool:
        return self.expect == "stopped"

    def admin_json(self, image: str, env: dict[str, str]) -> dict:
        return {
            "slug": self.slug,
            "image": image,
            "command": self.command,
            "env": dict(env),
            "parents": list(self.parents),
            "requires_gpu": True,
        }


@dataclass(frozen=True)
class DemoProcess:
    name: str
    tasks: tuple[DemoTask, ...]
    image: str = DEFAULT_IMAGE
    pull_seconds: float = 20.0  # simulated image pull time on Vast.ai

    def admin_json(self) -> dict:
        env = {"SIM_PULL_SECONDS": f"{self.pull_seconds:g}"}
        return {"name": self.name, "tasks": [t.admin_json(self.image, env) for t in self.tasks]}


def _command(slug: str, duration: float, exit_code: int) -> str:
    half = f"{duration / 2:.1f}"
    if exit_code:
        body = (
            f"echo '{slug}: starting'; sleep {half}; echo '{slug}: step 1 of 2 done'; "
            f"sleep {half}; echo '{slug}: invalid input, giving up' >&2; exit {exit_code}"
        )
    else:
        body = (
            f"echo '{slug}: starting'; sleep {half}; echo '{slug}: step 1 of 2 done'; "
            f"sleep {half}; echo '{slug}: done'"
        )
    return f'sh -c "{body}"'


def _stopped_command(slug: str) -> str:
    body = (
        f"echo '{slug}: long job started'; i=0; while [ $i -lt {STOP_AFTER_SECONDS} ]; "
        f"do echo \\\"{slug}: tick $i\\\"; sleep 1; i=$((i+1)); done; echo '{slug}: done'"
    )
    return f'sh -c "{body}"'


def _sizes(n_tasks: int) -> list[int]:
    count = -(-n_tasks // MAX_PROCESS_SIZE)
    return [n_tasks // count + (1 if i < n_tasks % count else 0) for i in range(count)]


def random_dag(slugs: list[str], rng: random.Random) -> list[tuple[str, tuple[str, ...]]]:
    """[(slug, parents)]: each task after the first depends on one earlier task, sometimes
    two (a small DAG rooted at the first)."""
    tasks: list[tuple[str, tuple[str, ...]]] = [(slugs[0], ())]
    for slug in slugs[1:]:
        earlier = [s for s, _ in tasks]
        parents = {rng.choice(earlier)}
        if len(earlier) >= 2 and rng.random() < 0.3:
            parents.add(rng.choice(earlier))
        tasks.append((slug, tuple(sorted(parents, key=earlier.index))))
    return tasks


def leaves_of(shapes: list[tuple[str, list[tuple[str, tuple[str, ...]]]]]) -> list[tuple[str, str]]:
    """(process, slug) of every task without a child in its process."""
    return [
        (process, slug)
        for process, tasks in shapes
        for slug, _ in tasks
        if not any(slug in parents for _, parents in tasks)
    ]


def build_workload(
    n_tasks: int = 20,
    seed: int = 0,
    *,
    min_duration: float = 2.0,
    max_duration: float = 6.0,
    pull_seconds: float = 20.0,
    image: str = DEFAULT_IMAGE,
) -> list[DemoProcess]:
    """`n_tasks` tasks over a few processes; the same seed gives the same workload.

    About one task in eight fails (at least one from 2 tasks on), and one is stopped by the
    user (from 3 tasks on); both are chosen among tasks without children.
    """
    if n_tasks < 1:
        raise ValueError("the workload needs at least one task")
    rng = random.Random(seed)
    shapes = []  # per process: [(slug, parents)]
    for p_index, size in enumerate(_sizes(n_tasks)):
        names = rng.sample(STEP_NAMES, k=min(size - 1, len(STEP_NAMES)))
        slugs = ["prepare"] + [
            names[i - 1] if i - 1 < len(names) else f"step-{i}" for i in range(1, size)
        ]
        shapes.append((f"demo-{p_index + 1}", random_dag(slugs, rng)))

    # Leaves (no child in their process) are the only tasks allowed to fail or be stopped.
    leaves = leaves_of(shapes)
    rng.shuffle(leaves)
    stopped = {leaves.pop()} if n_tasks >= 3 and leaves else set()
    n_failing = max(1, n_tasks // 8) if n_tasks >= 2 else 0
    failing = set(leaves[:n_failing])

    processes = []
    for name, tasks in shapes:
        built = []
        for slug, parents in tasks:
            duration = round(rng.uniform(min_duration, max_duration), 1)
            if (name, slug) in stopped:
                built.append(
                    DemoTask(
                        slug, _stopped_command(slug), parents, "stopped", float(STOP_AFTER_SECONDS)
                    )
                )
            elif (name, slug) in failing:
                code = rng.choice((1, 2, 3))
                built.append(
                    DemoTask(
                        slug, _command(slug, duration, code), parents, "failed", duration, code
                    )
                )
            else:
                built.append(
                    DemoTask(slug, _command(slug, duration, 0), parents, "completed", duration)
                )
        processes.append(DemoProcess(name, tuple(built), image, pull_seconds))
    return processes
