"""`ponos-vast run`: the agent for real (worker, beat and Flower for $PONOS_CONFIG).

No simulator is imported here. Without PONOS_CONFIG it says so on stderr, in one line, and
runs `ponos-vast demo` on the local stack instead (which needs the `sim` extra).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
from pathlib import Path

import click

from ponos_tasks.config import ConfigError, load_config

NO_CONFIG_MESSAGE = (
    "ponos-vast run: no PONOS_CONFIG given, so this runs the demo on the "
    "local stack (ponos-vast demo)"
)


def _raise_interrupt(signum, _frame):
    raise KeyboardInterrupt(f"signal {signum}")


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM unwinds like Ctrl-C, so the `finally` blocks stop what was started."""
    previous = signal.signal(signal.SIGTERM, _raise_interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


@contextlib.contextmanager
def shielded():
    """Ignore Ctrl-C and SIGTERM while stopping, so a second signal cannot cut the cleanup
    short and leave processes behind."""
    previous = {sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


@click.command("run")
@click.option(
    "--log-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("logs"),
    show_default=True,
    help="Where the worker, beat and Flower logs go.",
)
@click.option(
    "--flower-port",
    type=click.IntRange(1, 65535),
    default=5555,
    show_default=True,
    help="Flower's port on 127.0.0.1.",
)
@click.pass_context
def run_command(ctx, log_dir, flower_port):
    """Run the agent (worker, beat, Flower) for $PONOS_CONFIG until Ctrl-C or SIGTERM,
    restarting (with backoff) any of them that dies.

    Without PONOS_CONFIG it says so and runs `ponos-vast demo` on the local stack.
    """
    path = os.environ.get("PONOS_CONFIG")
    if not path:
        click.echo(NO_CONFIG_MESSAGE, err=True)
        from ponos_tasks.cli import exit_without_sim_extra

        exit_without_sim_extra("demo")
        from ponos_tasks.demo import demo_command

        ctx.invoke(demo_command)
        return
    from ponos_tasks.supervisor import AgentProcesses, FlowerAuthError

    try:
        config = load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(problem, err=True)
        sys.exit(2)
    for line in config.summary():
        click.echo(line)
    agent = AgentProcesses(Path(path).resolve(), log_dir, config.redis_url, flower_port=flower_port)
    try:
        flower = agent.setup_flower()
    except FlowerAuthError as error:
        click.echo(f"ponos-vast run: {error}", err=True)
        sys.exit(2)
    try:
        with sigterm_as_interrupt():
            try:
                agent.start()
                click.echo(
                    f"Agent running: worker, beat and Flower ({flower.url}); logs in "
                    f"{log_dir}. Ctrl-C stops it."
                )
                # Where the credentials are (never the password itself: stdout may be
                # captured by a service manager's journal).
                click.echo(f"ponos-vast run: {flower.notice()}", err=True)
                # A process that dies (a worker after a broker failure, say) is started
                # again with backoff, as the Procfile's platform and compose's `restart:`
                # do; each restart is said on stderr.
                while True:
                    for event in agent.supervise():
                        click.echo(f"ponos-vast run: {event}", err=True)
                    time.sleep(1)
            finally:
                click.echo("Stopping the agent...")
                with shielded():
                    agent.stop()
    except KeyboardInterrupt:
        click.echo("Agent stopped.")
