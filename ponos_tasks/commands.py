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

from ponos_tasks.budget import status_figures
from ponos_tasks.config import AgentConfig, ConfigError, load_config
from ponos_tasks.metrics import AgentState, is_live, read_agent_state, serve_metrics
from ponos_tasks.offers import build_query, describe_filters, rank_offers
from ponos_tasks.settings import Settings
from ponos_tasks.state import DEFAULT_PREFIX, BudgetStore, Keyspace, TaskStore
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


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds < 120:
        return f"{seconds}s"
    if seconds < 7200:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds // 60 % 60:02d}m"


def status_document(state: AgentState, budget: dict | None = None) -> dict:
    """The data `status` shows (its --json output); `budget`: budget.status_figures."""
    spend = (budget or {}).get("task_spend", {})
    instances_by_id = {i.id: i for i in state.instances}
    tasks = []
    for task_id, record in sorted(
        state.records.items(), key=lambda item: (item[1].accepted_at or 0, item[0])
    ):
        instance = instances_by_id.get(record.instance_id)
        tasks.append(
            {
                "id": task_id,
                "phase": record.phase,
                "attempt": record.attempt,
                "instance_id": record.instance_id,
                "gpu_name": record.gpu_name or (instance.gpu_name if instance else None),
                "dph_total": record.dph_total
                if record.dph_total is not None
                else (instance.dph_total if instance else None),
                "age_in_phase_s": state.age(record.phase_changed_at),
                "final_state": record.final_state,
                "reason": record.reason,
                # Why a waiting task waits: the limit (budget.py's names) and in words.
                "held_by": record.held_by,
                "waiting_for": record.waiting_for,
                "spend": spend.get(task_id),
            }
        )
    return {
        "tasks": tasks,
        "instances": [
            {
                "id": i.id,
                "label": i.label,
                "actual_status": i.actual_status,
                "gpu_name": i.gpu_name,
                "dph_total": i.dph_total,
                "live": is_live(i),
            }
            for i in state.instances
        ],
        "snapshot_age_s": state.snapshot_age,
        "totals": {
            "tasks_per_phase": {p: n for p, n in state.tasks_per_phase.items() if n},
            "live_instances": len(state.live_instances),
            "spend_per_hour": round(state.spend_per_hour, 6),
            "last_sync_age_s": state.last_sync_age,
            "destroyed_by_cause": state.destroyed,
        },
        "budget": budget,
    }


def _print_status(doc: dict) -> None:
    tasks = doc["tasks"]
    click.echo(f"Tasks ({len(tasks)})")
    if tasks:
        rows = [
            [
                t["id"],
                t["phase"],
                t["attempt"],
                _or_dash(t["instance_id"]),
                _or_dash(t["gpu_name"]),
                _money(t["dph_total"]),
                _age(t["age_in_phase_s"]),
                (t["final_state"] or "") + (f": {t['reason']}" if t["reason"] else "")
                or (f"waiting: {t['waiting_for']}" if t.get("waiting_for") else ""),
            ]
            for t in tasks
        ]
        for line in _table(
            [
                "task",
                "phase",
                "attempt",
                "instance",
                "GPU",
                "$/h",
                "in phase",
                "final state / reason",
            ],
            rows,
        ):
            click.echo("  " + line)
    click.echo()
    instances = doc["instances"]
    click.echo(
        f"Instances in the last snapshot ({len(instances)}, taken "
        + (f"{_age(doc['snapshot_age_s'])} ago)" if doc["snapshot_age_s"] is not None else "never)")
    )
    if instances:
        rows = [
            [
                _or_dash(i["id"]),
                _or_dash(i["label"]),
                _or_dash(i["actual_status"]) + ("" if i["live"] else " (destroyed)"),
                _or_dash(i["gpu_name"]),
                _money(i["dph_total"]),
            ]
            for i in instances
        ]
        for line in _table(["instance", "label", "status", "GPU", "$/h"], rows):
            click.echo("  " + line)
    click.echo()
    totals = doc["totals"]
    phases = ", ".join(f"{p} {n}" for p, n in totals["tasks_per_phase"].items()) or "none"
    click.echo(f"Tasks per phase: {phases}")
    click.echo(
        f"Live instances: {totals['live_instances']}, spending ${totals['spend_per_hour']:.4f}/h"
    )
    destroyed = ", ".join(f"{c} {n}" for c, n in sorted(totals["destroyed_by_cause"].items()))
    if destroyed:
        click.echo(f"Destroyed by the sync loop: {destroyed}")
    last = totals["last_sync_age_s"]
    click.echo("Last sync: " + ("never" if last is None else f"{_age(last)} ago"))
    budget = doc.get("budget")
    if budget:
        rebuilt = " (rebuilt after a loss of Redis: the most it can have been)"
        click.echo(
            f"Spent today (UTC): ${budget['spent_today']:.4f}"
            + (rebuilt if budget["spent_today_rebuilt"] else "")
        )
        room = budget.get("headroom")
        if room:
            click.echo(
                "New instances: "
                + (
                    f"held by {room['held_by']}"
                    if room["held_by"]
                    else "no price limit"
                    if room["new_instance_dph"] is None
                    else f"up to ${room['new_instance_dph']:.4f}/h"
                )
            )


_config_option = click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    envvar="PONOS_CONFIG",
    help="Agent configuration (default $PONOS_CONFIG); only its redis_url is used.",
)
_redis_option = click.option(
    "--redis-url", help="Read this Redis instead of the configuration's redis_url."
)
# Hidden: tests read records under their own prefix, never the agent's real keys.
_prefix_option = click.option("--prefix", default=DEFAULT_PREFIX, hidden=True)


@click.command("status")
@_config_option
@_redis_option
@_prefix_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
def status_command(config_path: str | None, redis_url: str | None, prefix: str, as_json: bool):
    """Show the agent's tasks and instances, from Redis only.

    Per task: phase, attempt, instance, GPU, $/h, time in its phase, final state and reason
    (finished tasks stay listed while their tombstone lasts). Instances come from the last
    snapshot the agent took. Totals: tasks per phase, live instances, current spend (sum of
    their dph_total), age of the last sync. Works while Arkindex and Vast.ai are unreachable.
    """
    client = _redis_from(config_path, redis_url)
    settings = _settings_if_any(config_path)
    try:
        state = read_agent_state(client, prefix)
        keys = Keyspace(prefix)
        store = BudgetStore(client, keys, TaskStore(client, keys))
        budget = status_figures(store, state.now, settings)
    except redis.RedisError as error:
        raise click.ClickException(f"cannot read Redis: {error}") from None
    finally:
        client.close()
    doc = status_document(state, budget)
    if as_json:
        click.echo(json.dumps(doc, indent=2))
    else:
        _print_status(doc)


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
    ponos_offers_matched (README.md, "Monitor", says what each means). Celery-level metrics (task events, runtimes, workers online) come from Flower's own
    /metrics endpoint. Ctrl-C stops.
    """
    client = _redis_from(config_path, redis_url)
    server, _thread = serve_metrics(client, prefix, host=host, port=port)
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
