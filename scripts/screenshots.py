"""Regenerate the README's screenshots (docs/images/*.png) from a real run of the demo.

    .venv/bin/python scripts/screenshots.py [--out docs/images] [--time-scale 20]

Runs `ponos-vast demo`'s stack, agent and workload (ponos_tasks.demo.Demo), and while the
tasks run:
- `status-watch.png`: `ponos-vast status --watch` in a tmux pane, captured with its colours
  (`tmux capture-pane -e`), turned into an SVG by rich, and that SVG into a PNG by headless
  Chromium;
- `flower-tasks.png`: Flower's task list, a headless Chromium screenshot;
and once the workload has ended:
- `status-task.png`: `ponos-vast status TASK_ID` (a task's timeline) for the task its user
  stopped (its timeline shows the stop), captured the same way.

Needs tmux and Chromium (Debian: `apt-get install tmux chromium`); says so and exits 1 when
one is missing. Everything runs on 127.0.0.1 and stops at the end.
"""

from __future__ import annotations

import argparse
import io
import re
import secrets
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

import redis  # noqa: E402
from rich.console import Console  # noqa: E402
from rich.text import Text  # noqa: E402

from ponos_tasks.demo import Demo  # noqa: E402
from ponos_tasks.metrics import read_agent_state  # noqa: E402
from ponos_tasks.state import Keyspace, TaskLogBook, TaskStore  # noqa: E402

COLUMNS, LINES = 172, 48  # the tmux pane: a wide terminal, as a person leaves it open
CHROMIUM_NAMES = ("chromium", "chromium-browser", "google-chrome", "chrome-headless-shell")


def find_tools() -> tuple[str, str]:
    tmux = shutil.which("tmux")
    chromium = next((path for name in CHROMIUM_NAMES if (path := shutil.which(name))), None)
    missing = [name for name, path in (("tmux", tmux), ("chromium", chromium)) if path is None]
    if missing:
        sys.exit(f"screenshots need {' and '.join(missing)}: apt-get install {' '.join(missing)}")
    return tmux, chromium


def chromium_png(chromium: str, url: str, png: Path, width: int, height: int) -> None:
    """A headless Chromium screenshot of `url` (JavaScript gets a few seconds to run)."""
    with tempfile.TemporaryDirectory(prefix="ponos-shot-") as profile:
        subprocess.run(
            [
                chromium,
                "--headless",
                "--no-sandbox",  # run as root in a container
                "--disable-gpu",
                "--hide-scrollbars",
                "--no-first-run",
                f"--user-data-dir={profile}",
                f"--window-size={width},{height}",
                "--virtual-time-budget=8000",
                f"--screenshot={png}",
                url,
            ],
            check=True,
            capture_output=True,
            timeout=120,
        )


class Pane:
    """A command in a detached tmux session of its own, and captures of its screen."""

    def __init__(self, tmux: str, name: str, command: list[str]):
        self.tmux = tmux
        self.name = f"ponos-shot-{name}-{secrets.token_hex(3)}"
        shell = " ".join(_quote(part) for part in command)
        subprocess.run(
            [tmux, "new-session", "-d", "-s", self.name, "-x", str(COLUMNS), "-y", str(LINES)]
            + ["-e", "TERM=xterm-256color", f"{shell}; sleep 600"],
            check=True,
        )

    def capture(self) -> str:
        """The visible screen, with its colours (ANSI escapes)."""
        return subprocess.run(
            [self.tmux, "capture-pane", "-e", "-p", "-t", self.name],
            check=True,
            capture_output=True,
            text=True,
        ).stdout

    def close(self) -> None:
        subprocess.run([self.tmux, "kill-session", "-t", self.name], capture_output=True)


def _quote(part: str) -> str:
    return part if re.fullmatch(r"[\w@%+=:,./-]+", part) else "'" + part.replace("'", "'\\''") + "'"


def ansi_png(chromium: str, ansi: str, png: Path, title: str) -> None:
    """The captured screen as a terminal window: rich draws it as SVG, Chromium as PNG."""
    lines = ansi.rstrip("\n").split("\n")
    while lines and not Text.from_ansi(lines[-1]).plain.strip():
        lines.pop()  # the empty bottom of the screen
    console = Console(
        file=io.StringIO(),
        width=COLUMNS,
        record=True,
        force_terminal=True,
        color_system="truecolor",
    )
    console.print(Text.from_ansi("\n".join(lines)), soft_wrap=True)
    svg = console.export_svg(title=title)
    width, height = (float(v) for v in re.search(r'viewBox="0 0 ([\d.]+) ([\d.]+)"', svg).groups())
    svg_path = png.with_suffix(".svg")
    svg_path.write_text(svg)
    try:
        chromium_png(chromium, svg_path.as_uri(), png, int(width) + 1, int(height) + 1)
    finally:
        svg_path.unlink()


def wait_for(condition, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise SystemExit(f"screenshots: gave up waiting for {what}")
        time.sleep(0.5)


def busy_moment(client: redis.Redis) -> bool:
    """A view worth a picture: several instances live, some tasks waiting or done."""
    state = read_agent_state(client)
    phases = state.tasks_per_phase
    return len(state.live_instances) >= 4 and phases["done"] >= 2


def longest_story(client: redis.Redis, preferred: str | None) -> str:
    """The task the user stopped (its timeline has the stop), else the one whose timeline
    has the most entries (ties by id)."""
    records = TaskStore(client, Keyspace()).all_records()
    if preferred in records:
        return preferred
    book = TaskLogBook(client, Keyspace(), task_format="%(message)s")
    return max(sorted(records), key=lambda task_id: len(book.entries(task_id)[0]))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    parser.add_argument("--time-scale", type=float, default=20.0)
    args = parser.parse_args()
    tmux, chromium = find_tools()
    args.out.mkdir(parents=True, exist_ok=True)
    cli = [sys.executable, "-m", "ponos_tasks.cli"]

    demo = Demo(n_tasks=20, time_scale=args.time_scale, timeout=900, logs_dir=None, say=print)
    panes: list[Pane] = []
    outcome: dict = {}
    try:
        demo.start()
        demo.load_workload()
        runner = threading.Thread(target=lambda: outcome.update(doc=demo.run()), daemon=True)
        runner.start()
        redis_url = demo.local.redis_url
        client = redis.Redis.from_url(redis_url)

        watch = Pane(tmux, "watch", [*cli, "status", "--watch", "--redis-url", redis_url])
        panes.append(watch)
        wait_for(lambda: busy_moment(client), 300, "a busy moment of the run")
        time.sleep(1.2)  # a redraw after it
        ansi_png(
            chromium, watch.capture(), args.out / "status-watch.png", "ponos-vast status --watch"
        )
        print(f"wrote {args.out / 'status-watch.png'}")

        # Flower's password was generated for this run (as `make run` does); Chromium logs
        # in with it in the URL.
        flower = demo.agent.flower
        chromium_png(
            chromium,
            f"http://{flower.basic_auth}@127.0.0.1:{flower.port}/tasks",
            args.out / "flower-tasks.png",
            1500,
            900,
        )
        print(f"wrote {args.out / 'flower-tasks.png'}")

        runner.join(timeout=900)
        task_id = longest_story(client, demo.to_stop)
        story = Pane(tmux, "task", [*cli, "status", task_id, "--redis-url", redis_url])
        panes.append(story)
        wait_for(lambda: "Timeline" in story.capture(), 30, "the task view")
        ansi_png(
            chromium,
            story.capture(),
            args.out / "status-task.png",
            f"ponos-vast status {task_id[:8]}",
        )
        print(f"wrote {args.out / 'status-task.png'}")
        client.close()
    finally:
        for pane in panes:
            pane.close()
        demo.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
