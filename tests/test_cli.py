from click.testing import CliRunner

from ponos_tasks import __version__
from ponos_tasks.cli import main


def test_version():
    result = CliRunner().invoke(main, ["--version"])
    assert result.exit_code == 0
    assert __version__ in result.output


def test_sim_group_lists_simulators():
    result = CliRunner().invoke(main, ["sim", "--help"])
    assert result.exit_code == 0
    assert "vast" in result.output and "arkindex" in result.output


def test_unknown_command_fails():
    result = CliRunner().invoke(main, ["no-such-command"])
    assert result.exit_code == 2
