"""`ponos-vast sim arkindex`: the Arkindex simulator in the foreground (Ctrl-C stops it)."""

from __future__ import annotations

import json
import secrets
import signal
import threading
import uuid

import click

from ponos_tasks.simulators.arkindex.faults import FaultError, parse_flag, validate


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


@click.command("arkindex")
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", default=8000, show_default=True, type=int, help="Port (0: any free port).")
@click.option("--s3-url", default=None, help="An S3 endpoint to use; default: start one (moto).")
@click.option("--farm-id", default=None, help="Farm UUID agents register with (default: random).")
@click.option("--seed", default=None, help="The farm's seed (default: random).")
@click.option(
    "--token-ttl",
    default=3600.0,
    show_default=True,
    type=float,
    help="Lifetime of agent access tokens, in seconds.",
)
@click.option(
    "--url-lifetime",
    default=3600.0,
    show_default=True,
    type=float,
    help="Lifetime of the pre-signed S3 URLs it hands out, in seconds (boto3's default).",
)
@click.option(
    "--fault",
    "faults",
    multiple=True,
    callback=_fault,
    help="Fault rule, JSON or NAME[,key=value...], e.g. "
    "'http_5xx,operation=PartialUpdateTask,times=2'. Repeatable.",
)
def command(host, port, s3_url, farm_id, seed, token_ttl, url_lifetime, faults):
    """Run the Arkindex simulator (agents, tasks, artifacts, models) until Ctrl-C."""
    from ponos_tasks.simulators.arkindex import ArkindexSimulator

    farm_id = farm_id or str(uuid.uuid4())
    seed = seed or secrets.token_hex(32)
    sim = ArkindexSimulator(
        s3_url=s3_url,
        farms={farm_id: seed},
        host=host,
        port=port,
        token_ttl=token_ttl,
        url_lifetime=url_lifetime,
        faults=faults,
    )
    sim.start()
    stopped = threading.Event()
    # SIGTERM stops as cleanly as Ctrl-C (a process manager sends it).
    signal.signal(signal.SIGTERM, lambda *_: stopped.set())
    click.echo(f"Arkindex simulator: {sim.url}")
    click.echo(f"OpenAPI schema:     {sim.url}/api/v1/openapi/?format=json")
    click.echo(f"S3 endpoint:        {sim.s3_url}")
    click.echo(f"farm id:            {farm_id}")
    click.echo(f"seed:               {seed}")
    click.echo("Ctrl-C to stop.", err=True)
    try:
        while not stopped.wait(0.5):
            pass
    except KeyboardInterrupt:
        pass
    finally:
        sim.stop()
        click.echo("stopped", err=True)
