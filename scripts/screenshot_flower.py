"""Take the README's screenshot of Flower during a run (docs/images/flower-tasks.png).

    .venv/bin/python scripts/screenshot_flower.py [--out FILE] [--tasks N] [--wait SECONDS]

Starts a private Redis, the local stack (instances run their commands for real) and the agent's
worker, beat and Flower, loads the demo's sample workload, waits while the tasks run, then has
headless Chromium (Debian's `chromium`) photograph Flower's task list; everything it started is
stopped at the end. Talks to 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import shutil
import subprocess
import sys
import time
from pathlib import Path

from ponos_tasks.simulators.harness import LocalRun
from ponos_tasks.simulators.stack import free_port
from ponos_tasks.workload import build_workload

ROOT = Path(__file__).resolve().parents[1]
TIME_SCALE = 40.0


def screenshot(url: str, out: Path, size: str = "1600,1000") -> None:
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        sys.exit("chromium is not installed (apt-get install chromium)")
    subprocess.run(
        [
            browser,
            "--headless=new",
            "--no-sandbox",
            "--disable-gpu",
            "--hide-scrollbars",
            f"--window-size={size}",
            "--virtual-time-budget=8000",  # lets the task table load (Flower fetches it)
            f"--screenshot={out}",
            url,
        ],
        check=True,
        capture_output=True,
        timeout=120,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images" / "flower-tasks.png")
    parser.add_argument("--tasks", type=int, default=12)
    parser.add_argument("--wait", type=float, default=20.0, help="seconds of run before the shot")
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    run = LocalRun(time_scale=TIME_SCALE, vast_run_mode="local", vast_options={"churn": False})
    run.start()
    try:
        config = run.agent_config(
            sync_interval=0.5,
            logs_interval=2,
            vast_api={"loading_deadline": 30, "rate_limit_scale": 1 / TIME_SCALE},
        )
        agent = run.start_agent(run.write_config(config), flower_port=free_port())
        for process in build_workload(args.tasks, seed=0):
            run.admin.create_process(process.name, process.admin_json()["tasks"])
        time.sleep(args.wait)
        user, _, password = agent.flower.credentials_file.read_text().strip().partition(":")
        # Credentials in the URL: headless Chromium has no login prompt (loopback only).
        url = agent.flower.url.replace("http://", f"http://{user}:{password}@", 1) + "tasks"
        screenshot(url, args.out)
        print(f"wrote {args.out}")
    finally:
        run.stop()


if __name__ == "__main__":
    main()
