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


def _sizes(values) -> dict:
    sizes = {}
    for value in values:
        image, _, size = value.rpartition("=")
        try:
            sizes[image] = float(size)
        except ValueError:
            raise click.BadParameter(f"--image-size wants IMAGE=GB, not {value!r}") from None
    return sizes


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
    help="Median simulated seconds before a requested log appears at its result_url "
    "(a long tail of minutes comes on top, see --log-tail-p).",
)
@click.option(
    "--log-tail-p",
    default=0.05,
    show_default=True,
    type=float,
    help="Probability that a log upload takes minutes (30-300 simulated s).",
)
@click.option(
    "--read-lag",
    default=5.0,
    show_default=True,
    type=float,
    help="Simulated seconds a new instance may be missing from show/list.",
)
@click.option(
    "--cached-image",
    "cached_images",
    multiple=True,
    help="An image every host has already pulled (repeatable).",
)
@click.option(
    "--image-size",
    "image_sizes",
    multiple=True,
    help="IMAGE=GB: the size of an image for the pull-time model (repeatable).",
)
@click.option("--churn", is_flag=True, help="Offers change ids and machines come and go.")
@click.option(
    "--slow-cheap-hosts",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Fraction of the machines, the cheapest ones, given a slow line (inet_down 20-100 "
    "Mbit/s) and a reliability of 0.70-0.90.",
)
@click.option(
    "--reliability-failures",
    default=0.0,
    show_default=True,
    type=click.FloatRange(0),
    help="A start fails with probability this x (1 - the machine's reliability); 1 reads "
    "reliability as the chance a start works.",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    callback=_fault,
    help="Fault rule, JSON or NAME[,key=value...], e.g. "
    "'rate_limit,endpoint=create,shape=json,retry_after=1'. Repeatable.",
)
def command(
    host,
    port,
    seed,
    time_scale,
    api_key,
    run_mode,
    no_rate_limits,
    log_delay,
    log_tail_p,
    read_lag,
    cached_images,
    image_sizes,
    churn,
    slow_cheap_hosts,
    reliability_failures,
    faults,
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
        log_tail_p=log_tail_p,
        read_lag=read_lag,
        cached_images=cached_images,
        image_sizes=_sizes(image_sizes),
        churn=churn,
        faults=faults,
        access_log=True,
        slow_cheap_hosts=slow_cheap_hosts,
        reliability_failures=reliability_failures,
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
