"""The `ponos-vast` command line.

Sub-commands are loaded lazily (the pattern from click's documentation), so that
`ponos-vast check-config` does not import Flask, moto or Celery.

The simulators are the `sim` extra: without it, the commands that need them (`sim`, `stack`,
`demo`) are replaced by a stand-in that says so in one line and exits with status 1.
"""

import importlib
import importlib.util
import sys

import click

from ponos_tasks import __version__

# What `pip install 'ponos-vast[sim]'` adds (import names) and the commands that need it.
SIM_EXTRA_MODULES = ("flask", "moto", "zstandard")
SIM_COMMANDS = ("sim", "stack", "demo")
SIM_EXTRA_MESSAGE = "this command needs the simulators: pip install 'ponos-vast[sim]'"


def missing_sim_extra() -> list[str]:
    """The modules of the `sim` extra that cannot be imported here (none when installed)."""
    missing = []
    for name in SIM_EXTRA_MODULES:
        try:
            found = importlib.util.find_spec(name) is not None
        except (ImportError, ValueError):
            found = False
        if not found:
            missing.append(name)
    return missing


def exit_without_sim_extra(command_name: str) -> None:
    """Exit (status 1) with one line on stderr when the `sim` extra is missing."""
    if missing_sim_extra():
        click.echo(f"ponos-vast {command_name}: {SIM_EXTRA_MESSAGE}", err=True)
        sys.exit(1)


def _needs_sim_extra(name: str) -> click.Command:
    """Stands for a command whose module needs the `sim` extra, which is not installed."""

    @click.command(
        name,
        context_settings={
            "ignore_unknown_options": True,
            "allow_extra_args": True,
            "help_option_names": [],
        },
        help=f"(Not available: {SIM_EXTRA_MESSAGE}.)",
        short_help="(needs the sim extra)",
    )
    def stand_in():
        exit_without_sim_extra(name)

    return stand_in


class LazyGroup(click.Group):
    """A click group whose sub-commands live in other modules, imported on first use."""

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.lazy_subcommands:
            if ctx.parent is None and cmd_name in SIM_COMMANDS and missing_sim_extra():
                return _needs_sim_extra(cmd_name)
            module_name, attribute = self.lazy_subcommands[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy_subcommands={
        "sim": "ponos_tasks.cli:sim",
        "stack": "ponos_tasks.simulators.stack:command",
        "check-config": "ponos_tasks.config:check_config_command",
        "run": "ponos_tasks.run:run_command",
        "demo": "ponos_tasks.demo:demo_command",
        "offers": "ponos_tasks.commands:offers_command",
        "status": "ponos_tasks.commands:status_command",
        "metrics": "ponos_tasks.commands:metrics_command",
        "doctor": "ponos_tasks.doctor:doctor_command",
    },
)
@click.version_option(__version__, prog_name="ponos-vast")
def main():
    """Ponos agent for Arkindex running GPU tasks on Vast.ai instances."""


@click.group(
    cls=LazyGroup,
    lazy_subcommands={
        "vast": "ponos_tasks.simulators.vast.cli:command",
        "arkindex": "ponos_tasks.simulators.arkindex.cli:command",
    },
)
def sim():
    """Run one simulator in the foreground (Ctrl-C stops it)."""


if __name__ == "__main__":
    main()
