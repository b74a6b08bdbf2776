"""`ponos-vast sim vast`: run the Vast.ai simulator in the foreground."""

import json
import signal
import threading

import click

from ponos_tasks.simulators.vast.faults import FaultError, parse_flag, validate


def _fault(_ctx, _param, values):
    rules = []
    for value in values:
        try:
            rules.append(
                validate(json.loads(value)) if value.lstrip().startswith("{") else parse_flag(value)
            )
        except (FaultError, ValueError) as exc:
            raise click.BadParameter(str(exc)) from None
    return rules


@click.command("vast")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", default=8741, show_default=True, type=int)
@click.option("--seed", default=0, show_default=True, type=int, help="Seed of the offers market.")
@click.option(
    "--time-scale",
    default=1.0,
    show_default=True,
    type=float,
    help="Simulated seconds per real second.",
)
@click.option("--api-key", default="sim-key", show_default=True)
@click.option(
    "--run-mode",
    type=click.Choice(["scripted", "local"]),
    default="scripted",
    show_default=True,
    help="Instances follow SIM_* knobs, or run their command locally.",
)
@click.option("--no-rate-limits", is_flag=True, help="Disable the per-endpoint minimum intervals.")
@click.option(
    "--log-delay",
    default=3.0,
    show_default=True,
    type=float,
    help="Simulated seconds before a requested log appears at its result_url.",
)
@click.option("--churn", is_flag=True, help="Offers change ids and machines come and go.")
@click.option(
    "--fault",
    "faults",
    multiple=True,
    callback=_fault,
    help="Fault rule, JSON or NAME[,key=value...], e.g. "
    "'rate_limit,endpoint=create,shape=json,retry_after=1'. Repeatable.",
)
def command(
    host, port, seed, time_scale, api_key, run_mode, no_rate_limits, log_delay, churn, faults
):
    """Run the Vast.ai simulator in the foreground (Ctrl-C or SIGTERM stops it)."""
    from ponos_tasks.simulators.vast import VastSimulator

    sim = VastSimulator(
        seed=seed,
        time_scale=time_scale,
        api_key=api_key,
        host=host,
        port=port,
        rate_limits=not no_rate_limits,
        run_mode=run_mode,
        log_delay=log_delay,
        churn=churn,
        faults=faults,
        access_log=True,
    )
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    sim.start()
    click.echo(f"Vast.ai simulator listening on {sim.url}", err=False)
    click.echo(f"API key: {api_key}")
    click.echo(f"Use it with: vastai --url {sim.url} --api-key {api_key} search offers")
    try:
        while not stop.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        click.echo("Vast.ai simulator stopped.")
