"""`ponos-vast explain TASK_ID`: what the agent would do for one task, without doing it.

It reads the task's definition from Arkindex, the matching offers from Vast.ai and the
agent's records and budget figures from Redis, then builds what the agent would send with
the agent's own functions (steps.offer_query, sort_offers, build_instance_command,
instance_environment, create_request; reconcile.plan for the limits): it cannot drift from
what the agent does. It writes nothing: no Redis key (no offer claim, record, note or rate
limiter bucket), no registration or token refresh on Arkindex (it uses the credentials the
agent stored in Redis, read-only), no create on Vast.ai.

Reading a task definition is an agent's call, allowed for tasks Arkindex assigned to this
agent: explain works for tasks the running agent has accepted (on the queue, waiting, or
running: then it shows the next attempt, a retry's).
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
from dataclasses import replace
from urllib.parse import urlsplit

import click
import redis
from arkindex.exceptions import ErrorResponse

from ponos_tasks import bidding, loop, ranking, steps
from ponos_tasks.agent import AgentContext, stable_public_key
from ponos_tasks.arkindex import ArkindexAgentClient, ArkindexError, TaskGone
from ponos_tasks.budget import MAX_DPH_TOTAL, NO_OFFER, utc_day
from ponos_tasks.definition import create_request_problem
from ponos_tasks.lifecycle import Phase, agent_short_id, make_label
from ponos_tasks.logs import redact
from ponos_tasks.models import Offer, TaskRecord
from ponos_tasks.offers import explain_offers
from ponos_tasks.reconcile import START_TASK, GrantAllowance, StartChain, WaitForCapacity, plan
from ponos_tasks.registry_client import ImageNotFound, RegistryClient
from ponos_tasks.state import DEFAULT_PREFIX, RedisCredentialStore
from ponos_tasks.vast import VastClient, VastError
from ponos_tasks.wrapper import UnsplittableCommand, WrapperTooLong, marker_nonce

#: How many ranked offers the text shows (the JSON has them all).
SHOWN_OFFERS = 5
NOT_REGISTERED = (
    "the agent has no stored Arkindex credentials in Redis: explain never registers; start "
    "the agent (or run `ponos-vast doctor --register`) first"
)


class ExplainError(Exception):
    """The task cannot be explained (unknown, not ours, a service unreachable): one line."""


class ReadOnlyCredentials(RedisCredentialStore):
    """The agent's stored credentials, read; saving, clearing or locking them is refused."""

    def save(self, data: dict) -> None:
        raise ExplainError("explain must not store Arkindex credentials")

    def clear(self) -> None:
        raise ExplainError("explain must not clear Arkindex credentials")

    @contextlib.contextmanager
    def lock(self):
        raise ExplainError(NOT_REGISTERED)
        yield  # pragma: no cover


class ReadOnlyArkindexClient(ArkindexAgentClient):
    """The agent's client that never registers nor renews its token (both change what
    Arkindex holds, and a refresh may turn the running agent's refresh token stale)."""

    def _register_locked(self) -> dict:
        raise ExplainError(NOT_REGISTERED)

    def _renew(self, failed_token: str) -> None:
        raise ExplainError(
            "Arkindex refused the agent's stored token; explain does not renew it (the "
            "running agent does at its next call): try again in a moment"
        )


def read_only_context(config, prefix: str = DEFAULT_PREFIX) -> AgentContext:
    """An AgentContext whose clients cannot write: no rate limiter bucket (one search), no
    shared image cache, no registration. Its stores are only read by explain."""
    ctx = AgentContext(config, prefix=prefix)
    vast = config.vast_api
    # Two tries, not the agent's four: an operator is waiting at the terminal.
    ctx.vast = VastClient(vast.url, vast.api_key, max_attempts=2)
    ctx.registry = RegistryClient(vast.registries)
    ctx.arkindex = ReadOnlyArkindexClient(
        config.url,
        str(config.farm_id),
        config.seed,
        ReadOnlyCredentials(ctx.redis, ctx.keys),
        hostname=config.agent_name,
        public_key=stable_public_key(config.seed, str(config.farm_id), config.agent_name),
    )
    return ctx


def _redacted(value, secrets: list[str]):
    if isinstance(value, str):
        return redact(value, secrets)
    if isinstance(value, dict):
        return {k: _redacted(v, secrets) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_redacted(v, secrets) for v in value]
    return value


def _offer(offer, price: float | None = None) -> dict:
    return {
        "id": offer.id,
        "machine_id": offer.machine_id,
        "gpu_name": offer.gpu_name,
        "dph_total": offer.dph_total,
        "reliability": offer.reliability,
        "geolocation": offer.geolocation,
        **(
            {}
            if price is None
            else {"bid": price, "instance_dph": bidding.instance_dph(offer, price)}
        ),
    }


def _limits(ctx: AgentContext, task_id: str, record: TaskRecord | None, short_id: str) -> dict:
    """What the sync loop's plan says of the task now: may it start, at what $/h, or which
    limit holds it (reconcile.plan on the records, snapshot and meter as they are)."""
    records = ctx.store.all_records(include_done=False)
    if record is not None:
        records[task_id] = record
    snapshot = ctx.store.load_snapshot()
    instances = snapshot.instances if snapshot is not None else ()
    rations = ctx.settings.budget.rations
    spending = loop.current_spending(ctx, records) if rations else None
    planned = plan(
        now=ctx.now(),
        agent_short_id=short_id,
        records=records,
        instances=instances,
        actions=[] if record is not None else [(START_TASK, task_id)],
        settings=ctx.settings,
        spending=spending,
    )
    limits: dict = {"held_by": None, "reason": None, "allowance": None, "allowance_limit": None}
    if record is not None and record.budget_allowance is not None:
        limits.update(allowance=record.budget_allowance, allowance_limit=record.allowance_limit)
    for step in planned:
        if step.task_id != task_id:
            continue
        if isinstance(step, WaitForCapacity):
            limits.update(held_by=step.limit, reason=step.reason)
        elif isinstance(step, StartChain | GrantAllowance) and step.allowance is not None:
            limits.update(allowance=step.allowance, allowance_limit=step.limit)
    if not rations:
        limits["allowance"] = None
    elif limits["allowance"] is None and limits["held_by"] is None:
        limits["allowance"] = math.inf  # planned to start: no shared limit bounds it yet
    return limits


def _first_rentable(ctx: AgentContext, record: TaskRecord, offers: list, bid: bool):
    """(offer, bid or None, passed): the first offer the create loop would try, as it does
    but for the claims and Vast.ai's answers, which only the create itself meets."""
    passed = []
    for offer in offers:
        price = steps._bid_for(ctx, record, offer) if bid else None
        if bid and price is None:
            passed.append(f"offer {offer.id}'s min_bid is over the price caps")
            continue
        if ctx.store.claimed(f"rented-machine:{offer.machine_id}"):
            passed.append(f"offer {offer.id}'s machine was rented from since the search")
            continue
        return offer, price, passed
    return None, None, passed


def explain_task(ctx: AgentContext, task_id: str) -> dict:
    """The explanation of one task as a document (secrets redacted); raises ExplainError."""
    task_id = str(task_id)
    agent_id = ctx.arkindex.agent_id
    if agent_id is None:
        raise ExplainError(NOT_REGISTERED)
    short_id = agent_short_id(agent_id)
    try:
        # The stored token is loaded on the first call (ReadOnlyArkindexClient: no write).
        definition = ctx.arkindex.task_definition(task_id)
    except ExplainError:
        raise
    except TaskGone:
        raise ExplainError(f"task {task_id} does not exist on Arkindex (HTTP 404)") from None
    except ArkindexError as error:
        raise ExplainError(f"Arkindex: {error}") from None
    except ErrorResponse as error:
        if error.status_code == 403:  # an agent reads the definitions of its own tasks only
            raise ExplainError(
                f"task {task_id} is not assigned to agent {ctx.config.agent_name} "
                "(Arkindex answers 403): explain reads the tasks this agent has accepted"
            ) from None
        raise ExplainError(
            f"Arkindex answered HTTP {error.status_code} for the definition of task {task_id}"
        ) from None

    record = ctx.store.get(task_id)
    attempt = (record.attempt if record is not None else 0) + 1
    label = make_label(short_id, task_id, attempt)
    secrets = [
        *steps.task_secrets(ctx, definition.env),
        marker_nonce(ctx.config.seed, label),
    ]
    doc: dict = {
        "task_id": task_id,
        "agent": ctx.config.agent_name,
        "phase": record.phase if record is not None else None,
        "attempt": attempt,
        "definition": {
            "slug": definition.slug,
            "image": definition.image,
            "command": definition.command,
            "requires_gpu": definition.requires_gpu,
            "parents": dict(definition.parents or {}),
            "env": dict(definition.env or {}),
            # The URL's signature is a secret: its address only.
            "s3_logs_put_url": (
                urlsplit(definition.s3_logs_put_url)._replace(query="").geturl()
                if definition.s3_logs_put_url
                else None
            ),
        },
        "notes": [],
        "refused": None,
        "request": None,
    }
    if record is not None and record.phase not in (
        Phase.ACCEPTED,
        Phase.WAITING_OFFER,
        Phase.RETRYING,
    ):
        doc["notes"].append(
            f"attempt {record.attempt} is in phase {record.phase}: the agent creates nothing "
            f"now; shown is what attempt {attempt} (a retry) would send"
        )

    doc["refused"] = steps.definition_problem(definition)
    if doc["refused"] is None:
        try:
            command = steps.build_instance_command(ctx.registry, ctx.config.seed, definition, label)
        except ImageNotFound as error:
            doc["refused"] = f"its image does not exist ({error.reason})"
        except WrapperTooLong as error:
            doc["refused"] = f"its command is too long: the {error}"
        except UnsplittableCommand as error:
            doc["refused"] = f"its command is not valid: {error}"
        else:
            doc["notes"] += [line for _, line in command.notes]
            env = steps.instance_environment(ctx, definition)
            doc["refused"] = create_request_problem(
                definition.image, env, command.onstart, command.args
            )
            doc["request"] = steps.create_request(ctx.config, definition, label, command, env)
            doc["request"]["inferred_exit_status"] = command.inferred

    # The offers, as the agent's create would rank and filter them.
    probe = record or TaskRecord.new(task_id, ctx.now())
    query = steps.offer_query(ctx.config, probe)
    try:
        # The answer the agent's creates share for a while, when there is one (read only).
        rows = ctx.store.load_offer_search(steps.offer_search_digest(query))
        offers = (
            [Offer.from_dict(row) for row in rows]
            if rows is not None
            else ctx.vast.search_offers(query)
        )
    except VastError as error:
        raise ExplainError(f"Vast.ai search failed at {ctx.config.vast_api.url}: {error}") from None
    failed = set(probe.failed_machines) | ctx.store.avoided_machines(prune=False)
    search = steps.sort_offers(ctx.config, offers, failed, limit=query["limit"])
    limits = _limits(ctx, task_id, record, short_id)
    allowance = limits["allowance"]
    budgeted = replace(probe, budget_allowance=allowance, allowance_limit=limits["allowance_limit"])
    affordable = (
        steps._affordable(ctx, budgeted, search.ranked) if limits["held_by"] is None else []
    )
    # The budget decided which offers may be rented; the policy decides their order.
    estimates = steps._rank_by_policy(ctx, budgeted, definition.image, affordable)
    by_cost = ctx.settings.offer_ranking == ranking.EXPECTED_COST
    if by_cost:
        affordable = [estimate.offer for estimate in estimates]
    reasons = {estimate.offer.id: estimate.explain() for estimate in estimates}
    bid = bidding.bids(ctx.config, probe)
    chosen, price, passed = _first_rentable(ctx, budgeted, affordable, bid)
    if limits["held_by"] is None and affordable and chosen is None:
        limits["held_by"] = "max_dph_per_instance"
        limits["reason"] = "every matching offer's min_bid is over the price caps"
    elif limits["held_by"] is None and search.ranked and not affordable:
        limits["held_by"] = limits["allowance_limit"] or MAX_DPH_TOTAL
        limits["reason"] = (
            f"{limits['allowance_limit'] or 'the budget'} leaves ${allowance or 0:.4f}/h for its "
            f"instance; the cheapest matching offer costs ${search.ranked[0].dph_total:.4f}/h"
        )
    elif limits["held_by"] is None and not search.ranked:
        limits["held_by"] = NO_OFFER
        limits["reason"] = "no Vast.ai offer matches the filters"
    budget = ctx.settings.budget
    doc["offers"] = {
        "query": query,
        "ranking": ctx.settings.offer_ranking,
        "summary": explain_offers(
            affordable or search.ranked,
            left_out=search.left_out,
            more=search.more,
            estimates=estimates if by_cost and affordable else None,
        ),
        "reasons": {str(k): v for k, v in reasons.items()},
        # In the order the create tries them (the policy's), then those over the allowance.
        "ranked": [_offer(o) for o in affordable]
        + [_offer(o) for o in search.ranked if o.id not in {a.id for a in affordable}],
        "affordable": [o.id for o in affordable],
        "left_out": search.left_out,
        "more": search.more,
        "chosen": None if chosen is None else _offer(chosen, price),
        "passed": passed,
        "interruptible": bid,
    }
    doc["budget"] = {
        **{k: (None if isinstance(v, float) and math.isinf(v) else v) for k, v in limits.items()},
        "unbounded_allowance": allowance is not None and math.isinf(allowance),
        "max_instances": ctx.settings.max_instances,
        "max_dph_per_instance": budget.max_dph_per_instance,
        "max_dph_total": budget.max_dph_total,
        "max_spend_per_day": budget.max_spend_per_day,
        "max_spend_per_task": budget.max_spend_per_task,
        "spent_today": ctx.budget.spent_on(utc_day(ctx.now())),
        "task_spent": ctx.budget.task_spent([task_id]).get(task_id, 0.0),
    }
    return _redacted(doc, secrets)


# ------------------------------------------------------------------------------ rendering


def _money(value) -> str:
    return "-" if value is None else f"${value:.4f}"


def _args(args: list | None) -> str:
    """The args, shell-quoted; the wrapper's scripts (multi-line) by their size only."""
    if args is None:
        return "(none: the image runs as it is, its exit status inferred)"
    shown = [f"<wrapper script, {len(a)} characters>" if "\n" in a else a for a in args]
    return shlex.join(shown) + "  (--json shows them whole)"


def render(doc: dict) -> list[str]:
    """The explanation as lines of text for the terminal."""
    d = doc["definition"]
    lines = [
        f"task {doc['task_id']} ({d['slug'] or 'no slug'}), agent {doc['agent']}, "
        f"record: {doc['phase'] or 'none yet'}; the next create is attempt {doc['attempt']}",
        "",
        "definition (from Arkindex, secrets redacted):",
        f"  image: {d['image'] or '-'}",
        f"  command: {d['command'] or '(the image entrypoint)'}",
        f"  requires_gpu: {d['requires_gpu']}",
        f"  parents: {json.dumps(d['parents'])}",
        f"  logs go to: {d['s3_logs_put_url'] or '-'}",
        "  env:",
        *[f"    {k}={v}" for k, v in sorted(d["env"].items())],
    ]
    lines += ["", *[f"note: {n}" for n in doc["notes"]]] if doc["notes"] else []
    if doc["refused"]:
        lines += [
            "",
            f"REFUSED: the task cannot run: {doc['refused']}; the agent ends it in error "
            "and rents nothing",
        ]
    o = doc["offers"]
    kind = "bid" if o["interruptible"] else "on-demand"
    lines += ["", f"offers ({kind}, ranked by {o['ranking']}): {o['summary']}"]
    affordable = set(o["affordable"])
    chosen_id = o["chosen"]["id"] if o["chosen"] else None
    for rank, offer in enumerate(o["ranked"][:SHOWN_OFFERS], start=1):
        mark = "*" if offer["id"] == chosen_id else ("" if offer["id"] in affordable else "-")
        lines.append(
            f"  {mark:1} {rank}. offer {offer['id']} machine {offer['machine_id']} "
            f"{offer['gpu_name']} {_money(offer['dph_total'])}/h "
            f"reliability {offer['reliability']} {offer['geolocation'] or ''}".rstrip()
        )
    if len(o["ranked"]) > SHOWN_OFFERS:
        lines.append(f"    ... {len(o['ranked']) - SHOWN_OFFERS} more (--json lists them)")
    lines += [f"  passed: {p}" for p in o["passed"]]
    b = doc["budget"]
    if o["chosen"]:
        c = o["chosen"]
        bid = f", bid {_money(c['bid'])}/h" if "bid" in c else ""
        lines.append(
            f"  would rent offer {c['id']} on machine {c['machine_id']} ({c['gpu_name']}, "
            f"{_money(c['dph_total'])}/h{bid}): the first the agent's ranking keeps "
            "(a create racing for it passes to the next)"
        )
        if o["reasons"].get(str(c["id"])):
            lines.append(f"  why: {o['reasons'][str(c['id'])]}")
    lines += ["", "limits:"]
    if b["held_by"]:
        lines.append(f"  HELD by {b['held_by']}: {b['reason']}")
    elif b["unbounded_allowance"]:
        lines.append("  may start now; no shared budget limit bounds its instance's $/h now")
    elif b["allowance"] is not None:
        lines.append(
            f"  may start now; its instance may cost up to {_money(b['allowance'])}/h "
            f"({b['allowance_limit']})"
        )
    else:
        lines.append("  may start now (no max_dph_total nor max_spend_per_day is set)")
    lines.append(f"  budget.max_instances: {b['max_instances']}")
    for key in ("max_dph_per_instance", "max_dph_total", "max_spend_per_day", "max_spend_per_task"):
        if b[key] is not None:
            lines.append(f"  budget.{key}: {_money(b[key])}")
    lines.append(
        f"  spent today (UTC): {_money(b['spent_today'])}; by this task: {_money(b['task_spent'])}"
    )
    r = doc["request"]
    if r is not None:
        lines += [
            "",
            "create request (PUT /api/v0/asks/<offer id>/, secrets redacted):",
            f"  image: {r['image']}",
            f"  label: {r['label']}",
            f"  disk: {r['disk']} GB, runtype: {r['runtype']}",
            f"  image_login: {r['image_login'] or '-'}",
            f"  onstart: {r['onstart'] or '-'}",
            f"  args: {_args(r['args'])}",
            "  env:",
            *[f"    {k}={v}" for k, v in sorted(r["env"].items())],
        ]
    return lines


@click.command("explain")
@click.argument("task_id")
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    default=None,
    help="The agent's configuration file (default: as the agent finds it).",
)
@click.option("--json", "as_json", is_flag=True, help="Print one JSON document instead.")
# Hidden: tests read an agent under their own Redis prefix, never the real keys.
@click.option("--prefix", default=DEFAULT_PREFIX, hidden=True)
def explain_command(task_id: str, config_path: str | None, as_json: bool, prefix: str):
    """What the agent would do for TASK_ID, without doing it.

    Shows the task's definition (secrets redacted), the offers that match and the one the
    agent would rent with the ranking's reasons, the exact create request (image, disk, label
    of the next attempt, wrapped command, environment with TASK_BOOTSTRAP and TASK_PARENTS),
    and which budget limit or max_instances would hold the task. Writes nothing anywhere:
    it reads Arkindex with the credentials the agent stored in Redis (the task must be
    assigned to this agent), Vast.ai's offers, and the agent's Redis. Exit 1 when the task
    cannot be explained, 2 on an invalid configuration.
    """
    from ponos_tasks.commands import _config_or_exit

    config = _config_or_exit(config_path)
    ctx = read_only_context(config, prefix)
    try:
        doc = explain_task(ctx, task_id)
    except ExplainError as error:
        raise click.ClickException(str(error)) from None
    except redis.RedisError as error:
        # redis-py's messages name host and port, never the password.
        raise click.ClickException(
            f"no usable Redis at {config.redis_location()} ({error})"
        ) from None
    finally:
        ctx.vast.close()
    if as_json:
        click.echo(json.dumps(doc, indent=2, sort_keys=True))
    else:
        click.echo("\n".join(render(doc)))
