"""Operator commands: `ponos-vast offers`, `ponos-vast status`, `ponos-vast metrics`.

`offers` asks Vast.ai (a dry run of the agent's offer choice); `status` and `metrics` read
Redis only, so they work while Arkindex or Vast.ai are unreachable.
"""

from __future__ import annotations

import json
import sys
import threading
from collections.abc import Sequence

import click
import redis
from rich.console import Console

from ponos_tasks.budget import status_figures
from ponos_tasks.config import AgentConfig, ConfigError, load_config
from ponos_tasks.logs import DEFAULT_TASK_FORMAT
from ponos_tasks.metrics import read_agent_state, serve_metrics
from ponos_tasks.offers import build_query, describe_filters, rank_offers
from ponos_tasks.overview import resolve_task_id, status_document, task_document
from ponos_tasks.settings import Settings
from ponos_tasks.state import DEFAULT_PREFIX, BudgetStore, Keyspace, TaskLogBook, TaskStore
from ponos_tasks.status_view import render_status, render_task, watch
from ponos_tasks.vast import VastClient, VastError

#: The agent searches with this limit (build_query's default) and ranks what comes back.
AGENT_SEARCH_LIMIT = 64


def _config_or_exit(path: str | None) -> AgentConfig:
    """The validated config; on problems, one line each on stderr and exit 2 (check-config)."""
    try:
        return load_config(path)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(problem, err=True)
        sys.exit(2)


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> list[str]:
    # Hand-written: a few aligned columns do not justify a table library dependency.
    columns = zip(headers, *rows, strict=True)
    widths = [max(len(str(cell)) for cell in column) for column in columns]
    return [
        "  ".join(str(cell).ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in (headers, *rows)
    ]


def _money(value: float | None) -> str:
    return "-" if value is None else f"${value:.4f}"


def _or_dash(value) -> str:
    return "-" if value is None else str(value)


# --------------------------------------------------------------------------------- offers


def _offer_row(rank: int, offer, chosen: bool) -> dict:
    return {
        "rank": rank,
        "chosen": chosen,
        "id": offer.id,
        "gpu_name": offer.gpu_name,
        "gpu_ram_gb": None if offer.gpu_ram is None else round(offer.gpu_ram / 1000, 1),
        "dph_total": offer.dph_total,
        "reliability": offer.reliability,
        "geolocation": offer.geolocation,
        "machine_id": offer.machine_id,
        "cuda_max_good": offer.cuda_max_good,
    }


@click.command("offers")
@click.argument("file", type=click.Path(dir_okay=False))
@click.option(
    "--limit",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="How many ranked offers to show.",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def offers_command(file: str, limit: int, as_json: bool):
    """Show the Vast.ai offers the configuration FILE matches, ranked: a dry run of the choice.

    Builds the agent's search (vast_api.offer_filters and disk_gb, budget.max_dph_per_instance,
    plus its fixed conditions: verified, rentable, one GPU, on-demand), sends it to
    vast_api.url and ranks the answer as the agent does (cheapest dph_total for the
    configured disk first, then the most reliable). The offer marked * is the one the agent would rent now for a new task.
    Nothing is rented. Exit 2 on an invalid configuration, 1 when Vast.ai cannot be asked.
    """
    config = _config_or_exit(file)
    vast, max_dph = config.vast_api, config.budget.max_dph_per_instance
    query = build_query(
        vast.offer_filters,
        disk_gb=vast.disk_gb,
        max_dph=max_dph,
        limit=max(limit, AGENT_SEARCH_LIMIT),
    )
    # Two tries, not the agent's four: an operator is waiting at the terminal. No Redis rate
    # limiter either: one search, and the command must work without the agent's Redis.
    client = VastClient(vast.url, vast.api_key, max_attempts=2)
    try:
        ranked = rank_offers(client.search_offers(query))
    except VastError as error:
        raise click.ClickException(f"Vast.ai search failed at {vast.url}: {error}") from None
    finally:
        client.close()
    rows = [_offer_row(n, offer, n == 1) for n, offer in enumerate(ranked[:limit], start=1)]
    filters = describe_filters(vast.offer_filters)
    if as_json:
        click.echo(
            json.dumps(
                {
                    "filters": filters,
                    "disk_gb": vast.disk_gb,
                    "max_dph_per_instance": max_dph,
                    "query": query,
                    "matched": len(ranked),
                    "offers": rows,
                    "chosen": rows[0]["id"] if rows else None,
                },
                indent=2,
            )
        )
        return
    click.echo(f"Filters: {filters or '(none: any offer)'}")
    click.echo(
        f"Disk {vast.disk_gb:g} GB per instance, "
        + (f"at most ${max_dph:g}/h" if max_dph else "no price cap")
    )
    click.echo(f"Query sent to {vast.url}: {json.dumps(query, separators=(',', ':'))}")
    if not rows:
        click.echo(
            f"No offer matches these filters now. The agent would wait up to "
            f"{vast.offer_wait:g} s for one, then report the task in error."
        )
        return
    headers = [
        "",
        "rank",
        "offer",
        "GPU",
        "GPU RAM GB",
        "$/h",
        "reliability",
        "location",
        "machine",
        "CUDA",
    ]
    table = [
        [
            "*" if r["chosen"] else "",
            r["rank"],
            r["id"],
            _or_dash(r["gpu_name"]),
            _or_dash(r["gpu_ram_gb"]),
            _money(r["dph_total"]),
            "-" if r["reliability"] is None else f"{r['reliability']:.4f}",
            _or_dash(r["geolocation"]),
            _or_dash(r["machine_id"]),
            _or_dash(r["cuda_max_good"]),
        ]
        for r in rows
    ]
    click.echo()
    for line in _table(headers, table):
        click.echo(line)
    click.echo()
    # The search returns at most query["limit"] offers (the cheapest): more may match.
    matched = f"{len(ranked)}" if len(ranked) < query["limit"] else f"at least {len(ranked)}"
    click.echo(
        f"{matched} offer(s) matched, {len(rows)} shown, cheapest first; "
        f"* = the offer the agent would rent now ({rows[0]['id']}), unless its machine "
        "already failed for that task."
    )


# --------------------------------------------------------------------------------- status / metrics


def _redis_from(config_path: str | None, redis_url: str | None) -> redis.Redis:
    """--redis-url alone needs no config; otherwise the config's redis_url."""
    url = redis_url or _config_or_exit(config_path).redis_url
    return redis.Redis.from_url(url, socket_connect_timeout=5, socket_timeout=10)


def _settings_if_any(config_path: str | None) -> Settings | None:
    """The budget's limits come from the configuration (headroom); without a usable one,
    `status` shows the spend only (it reads Redis, and works with --redis-url alone)."""
    if not config_path:
        return None
    try:
        return Settings.from_config(load_config(config_path))
    except ConfigError:
        return None


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="PONOS_CONFIG",
    help="Agent configuration (default $PONOS_CONFIG): its redis_url (status also redacts "
    "its secrets).",
)
_redis_option = click.option(
    "--redis-url", help="Read this Redis instead of the configuration's redis_url."
)
# Hidden: tests read records under their own prefix, never the agent's real keys.
_prefix_option = click.option("--prefix", default=DEFAULT_PREFIX, hidden=True)


class StatusReader:
    """Reads what `status` shows from Redis (one client, several reads in watch mode)."""

    def __init__(
        self, client: redis.Redis, prefix: str, secrets: list[str], settings: Settings | None
    ):
        self.client = client
        self.prefix = prefix
        self.store = TaskStore(client, Keyspace(prefix))
        self.budget = BudgetStore(client, Keyspace(prefix), self.store)
        self.settings = settings  # the budget's limits (headroom), when a config was given
        self.logbook = TaskLogBook(client, Keyspace(prefix), task_format=DEFAULT_TASK_FORMAT)
        self.secrets = secrets  # the configuration's, when one was given

    def overview(self) -> dict:
        state = read_agent_state(self.client, self.prefix)
        budget = status_figures(self.budget, state.now, self.settings)
        return status_document(state, self.store.sync_report(), budget)

    def task(self, wanted: str) -> dict:
        state = read_agent_state(self.client, self.prefix)
        task_id = resolve_task_id(wanted, state.records) or wanted
        entries, dropped = self.logbook.entries(task_id)
        return task_document(
            task_id,
            state,
            entries,
            dropped=dropped,
            sync_report=self.store.sync_report(),
            # The agent's lines hold no secret by design; the instance keys and the
            # configuration's secrets are replaced anyway, as in the published log.
            secrets=[*self.secrets, *self.store.instance_keys(task_id)],
        )


def _status_console() -> Console:
    # Piped output (a file, a pager) gets no colour and a width that fits the tables.
    return Console(width=None if sys.stdout.isatty() else 200, highlight=False)


@click.command("status")
@click.argument("task_id", required=False)
@_config_option
@_redis_option
@_prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
@click.option("--watch", "live", is_flag=True, help="A live view, redrawn until Ctrl-C.")
@click.option(
    "--interval",
    type=click.FloatRange(min=0.2),
    default=2.0,
    show_default=True,
    help="Seconds between two redraws of --watch.",
)
def status_command(
    task_id: str | None,
    config_path: str | None,
    redis_url: str | None,
    prefix: str,
    as_json: bool,
    live: bool,
    interval: float,
):
    """Show the agent's tasks and instances, or one task's timeline, from Redis only.

    Per task: phase, attempt, machine, GPU, $/h, age, time in its phase, spend so far (an
    estimate: the current attempt's price since its create), why it waits (no offer matches,
    capacity, ...) or what the agent is doing with it, final state and reason (finished tasks
    stay listed while their tombstone lasts). Instances come from the last snapshot the agent
    took. Totals: tasks per phase, live instances, burn rate (sum of their dph_total), spend
    today (estimate), the capacity the last sync asked Arkindex for, age of the last sync.

    With TASK_ID (or the start of one): that task's record and its timeline, every decision
    the agent took for it with its time (the lines its published log starts with).

    --watch redraws the view every --interval seconds until Ctrl-C. Works while Arkindex and
    Vast.ai are unreachable.
    """
    if live and as_json:
        raise click.UsageError("--watch draws a live view; --json prints one document")
    secrets: list[str] = []
    if redis_url is None:
        config = _config_or_exit(config_path)
        redis_url, secrets = config.redis_url, list(config.secrets())
    client = redis.Redis.from_url(redis_url, socket_connect_timeout=5, socket_timeout=10)
    reader = StatusReader(client, prefix, secrets, _settings_if_any(config_path))
    read = reader.overview if task_id is None else lambda: reader.task(task_id)
    render = render_status if task_id is None else render_task
    try:
        if live:
            watch(read, render, interval=interval, errors=(redis.RedisError,))
            return
        try:
            doc = read()
        except redis.RedisError as error:
            raise click.ClickException(f"cannot read Redis: {error}") from None
    finally:
        client.close()
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _status_console().print(render(doc))


@click.command("metrics")
@_config_option
@_redis_option
@_prefix_option
@click.option("--host", default="127.0.0.1", show_default=True, help="Address to listen on.")
@click.option("--port", type=click.IntRange(0, 65535), default=9808, show_default=True)
def metrics_command(
    config_path: str | None, redis_url: str | None, prefix: str, host: str, port: int
):
    """Serve the agent's Prometheus metrics on http://HOST:PORT/metrics (foreground).

    Read from Redis on each scrape: ponos_tasks{phase}, ponos_instances_live,
    ponos_instances_orphaned, ponos_spend_dollars_per_hour,
    ponos_instances_destroyed_total{cause}, ponos_last_sync_age_seconds,
    ponos_snapshot_age_seconds, ponos_task_attempts (histogram of the active tasks' attempts),
    ponos_task_phase_age_max_seconds{phase}, ponos_redis_up; and what every worker measured:
    ponos_api_calls_total and ponos_api_rate_limited_total{api,endpoint},
    ponos_start_failures_total{reason}, the histograms
    ponos_task_pending_to_running_seconds, ponos_task_end_to_destroy_seconds and
    ponos_offers_matched; the budget's ponos_spend_dollars_total, ponos_spend_today_dollars
    and, with --config, ponos_budget_headroom_dollars{limit} (README.md, "Monitor", says
    what each means). Celery-level metrics (task events, runtimes, workers online) come from Flower's own
    /metrics endpoint. Ctrl-C stops.
    """
    client = _redis_from(config_path, redis_url)
    settings = _settings_if_any(config_path)  # the budget's limits, for the headroom
    server, _thread = serve_metrics(client, prefix, host=host, port=port, settings=settings)
    click.echo(
        f"Serving metrics on http://{host}:{server.server_port}/metrics (Ctrl-C stops)", err=True
    )
    try:
        threading.Event().wait()  # the server thread does the work; wait for Ctrl-C
    except KeyboardInterrupt:
        pass
    finally:
        server.shutdown()
        client.close()


__all__ = ["offers_command", "status_command", "metrics_command", "status_document"]
