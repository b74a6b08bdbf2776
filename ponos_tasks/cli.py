"""The `ponos-vast` command line.

Sub-commands are loaded lazily (the pattern from click's documentation), so that
`ponos-vast check-config` does not import Flask, moto or Celery.
"""

import importlib

import click

from ponos_tasks import __version__


class LazyGroup(click.Group):
    """A click group whose sub-commands live in other modules, imported on first use."""

    def __init__(self, *args, lazy_subcommands: dict[str, str] | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.lazy_subcommands = lazy_subcommands or {}

    def list_commands(self, ctx):
        return sorted(set(super().list_commands(ctx)) | set(self.lazy_subcommands))

    def get_command(self, ctx, cmd_name):
        if cmd_name in self.lazy_subcommands:
            module_name, attribute = self.lazy_subcommands[cmd_name].split(":")
            return getattr(importlib.import_module(module_name), attribute)
        return super().get_command(ctx, cmd_name)


@click.group(
    cls=LazyGroup,
    lazy_subcommands={
        "sim": "ponos_tasks.cli:sim",
        "stack": "ponos_tasks.simulators.stack:command",
        "check-config": "ponos_tasks.config:check_config_command",
        "run": "ponos_tasks.demo:run_command",
        "demo": "ponos_tasks.demo:demo_command",
        "offers": "ponos_tasks.commands:offers_command",
        "status": "ponos_tasks.commands:status_command",
        "metrics": "ponos_tasks.commands:metrics_command",
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
