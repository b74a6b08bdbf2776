"""`ponos-vast doctor`: read-only checks of the configuration, Redis, Vast.ai and Arkindex.

Safe against production: it takes no task and creates nothing (`--register` is the one
exception, and says so: it creates or refreshes the agent on Arkindex). Each check is a pure
function of what a call answered (`redis_persistence`, `vast_account`, ...); the calls are in
the `probe_*` wrappers. Then every simulator assumption (assumptions.py) is judged on what was
seen. Exit status 0 when nothing failed nor was contradicted, 1 otherwise.
"""

from __future__ import annotations

import ast
import inspect
import json
import logging
import sys
import time
from dataclasses import asdict, dataclass
from urllib.parse import urljoin, urlsplit

import click
import redis
import requests

from ponos_tasks import arkindex as arkindex_module
from ponos_tasks.assumptions import (
    CONTRADICTED,
    INSTANCE_FIELDS_READ,
    NOT_RUNNING_STATUSES,
    Observations,
    check_instance_filters,
    judge,
    log_url_lifetime,
    unread_fields,
)
from ponos_tasks.config import AgentConfig, BudgetConfig, ConfigError, load_config

OK, WARNING, FAIL = "ok", "warning", "fail"
CLOCK_SKEW_WARNING = 2.0  # s: lease and deadline arithmetic mixes the two clocks
CLOCK_SKEW_FAIL = 30.0
PAGE_SIZE = 25


@dataclass(frozen=True)
class Check:
    name: str
    status: str  # ok / warning / fail
    detail: str
    action: str = ""  # what to do (empty when ok)


# --------------------------------------------------------------------------- pure checks


def redacted_secrets(config: AgentConfig) -> Check:
    found = [
        name
        for name, value in (
            ("seed", config.seed),
            ("vast_api.api_key", config.vast_api.api_key),
            ("sentry.dsn", config.sentry.dsn),
            ("redis_url password", urlsplit(config.redis_url).password),
        )
        if value
    ]
    found += [f"registry {r.registry_host} password" for r in config.vast_api.registries]
    return Check("config", OK, "valid; secrets found (shown as ***): " + ", ".join(found))


def redis_persistence(info: dict) -> Check:
    if int(info.get("aof_enabled", 0)) == 1:
        return Check("redis.persistence", OK, "AOF on")
    if info.get("rdb_save_policy"):
        detail = f"AOF off, RDB snapshots ({info['rdb_save_policy']})"
        lose = "a restart loses the writes since the last snapshot"
    else:
        detail, lose = "no AOF, no RDB snapshot", "a restart loses every record"
    return Check(
        "redis.persistence",
        WARNING,
        f"{detail}: {lose} (tasks, instance labels are rebuilt, but the log kept in Redis "
        "and the credentials are not)",
        "turn AOF on (appendonly yes)",
    )


def redis_eviction(policy: str | None) -> Check:
    if policy is None:
        return Check(
            "redis.maxmemory_policy",
            WARNING,
            "cannot tell: CONFIG GET is refused (managed Redis?)",
            "make sure the policy is noeviction",
        )
    if policy == "noeviction":
        return Check("redis.maxmemory_policy", OK, "noeviction")
    return Check(
        "redis.maxmemory_policy",
        WARNING,
        f"{policy}: Redis may evict Celery's messages and the agent's records",
        "set maxmemory-policy noeviction",
    )


def redis_clock(server_time: float, local_time: float, version: str) -> Check:
    skew = server_time - local_time
    detail = f"Redis {version}, clock skew {skew:+.2f} s"
    if abs(skew) >= CLOCK_SKEW_FAIL:
        return Check("redis.clock", FAIL, detail, "synchronise the clocks (NTP)")
    if abs(skew) >= CLOCK_SKEW_WARNING:
        return Check("redis.clock", WARNING, detail, "synchronise the clocks (NTP)")
    return Check("redis.clock", OK, detail)


def vast_account(account: dict, budget: BudgetConfig) -> Check:
    credit = account.get("credit")
    balance = account.get("balance")
    detail = f"key accepted; balance {balance}, credit {credit}"
    if not isinstance(credit, int | float):
        return Check("vast.account", WARNING, detail + " (credit unreadable)", "")
    if credit <= 0:
        return Check("vast.account", FAIL, detail, "add credit to the Vast.ai account")
    daily = budget.max_spend_per_day
    if daily is not None and credit < daily:
        return Check(
            "vast.account",
            WARNING,
            f"{detail}: less than budget.max_spend_per_day ${daily:g}",
            "add credit, or lower the budget",
        )
    return Check("vast.account", OK, detail)


def vast_offers(offers: list, limit: int) -> Check:
    if not offers:
        return Check(
            "vast.offers",
            WARNING,
            "the offer filters match no offer now: tasks would wait",
            "widen vast_api.offer_filters (ponos-vast offers shows the search)",
        )
    prices = [o.dph_total for o in offers if o.dph_total is not None]
    gpus = sorted({o.gpu_name for o in offers if o.gpu_name})
    cheapest = f"cheapest ${min(prices):.3f}/h" if prices else "no price"
    count = f"{len(offers)}+ (the search's limit)" if len(offers) >= limit else str(len(offers))
    return Check("vast.offers", OK, f"{count} offers match, {cheapest}; {', '.join(gpus)}")


def vast_instances(instances: list, own_prefix: str | None) -> list[Check]:
    pages = max(1, -(-len(instances) // PAGE_SIZE))
    detail = f"v1 listing: {len(instances)} instances, {pages} pages"
    unread = unread_fields([i.raw for i in instances], INSTANCE_FIELDS_READ)
    if unread:
        detail += f"; fields the agent does not read (kept as they are): {', '.join(unread)}"
    checks = [Check("vast.instances", OK, detail)]
    labelled = [i for i in instances if (i.label or "").startswith("ponos-")]
    if own_prefix is None:
        checks.append(
            Check(
                "vast.own_instances",
                OK if not labelled else WARNING,
                f"agent not registered yet: {len(labelled)} ponos- instances, owner unknown",
                "" if not labelled else "check ponos-vast status for whose they are",
            )
        )
        return checks
    own = [i for i in labelled if i.label.startswith(own_prefix)]
    strangers = [i for i in labelled if not i.label.startswith(own_prefix)]
    checks.append(Check("vast.own_instances", OK, f"{len(own)} labelled {own_prefix}*"))
    if strangers:
        names = ", ".join(f"{i.id} ({i.label})" for i in strangers[:5])
        checks.append(
            Check(
                "vast.unknown_ponos_instances",
                WARNING,
                f"{len(strangers)} ponos- instances of another agent: {names}",
                "another agent shares this key, or a former identity left them: they cost money",
            )
        )
    return checks


def arkindex_schema(schema_operations: set[str], agent_operations: set[str]) -> Check:
    missing = sorted(agent_operations - schema_operations)
    if missing:
        return Check(
            "arkindex.schema",
            FAIL,
            f"the schema lacks {', '.join(missing)}",
            "this Arkindex does not offer what the agent calls: check its version",
        )
    return Check("arkindex.schema", OK, "offers " + ", ".join(sorted(agent_operations)))


def arkindex_task(data: dict) -> Check:
    problems = arkindex_module.TaskDefinition.from_api(data).problems
    missing = [
        k for k in ("image", "command", "env", "parents", "s3_logs_put_url") if k not in data
    ]
    lifetime = log_url_lifetime(data.get("s3_logs_put_url"))
    life = f"log URL valid {lifetime:g} s" if lifetime is not None else "log URL lifetime unknown"
    if problems or missing or not data.get("image"):
        what = list(problems) + [f"no {k}" for k in missing]
        what += [] if data.get("image") else ["no image"]
        return Check("arkindex.task", FAIL, "; ".join(what) + f"; {life}", "report it")
    return Check("arkindex.task", OK, f"image, command, env, parents, {life}")


# --------------------------------------------------------------------------- probes


def agent_operation_ids() -> set[str]:
    """The operation ids arkindex.py calls (first string argument of _send/_call/
    lookup_operation), read from its source so that the list cannot drift from the code."""
    tree = ast.parse(inspect.getsource(arkindex_module))
    found = set()
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in ("_send", "_call", "lookup_operation")
            and node.args
            and isinstance(node.args[0], ast.Constant)
            and isinstance(node.args[0].value, str)
        ):
            found.add(node.args[0].value)
    return found


def probe_redis(config: AgentConfig) -> list[Check]:
    client = redis.Redis.from_url(config.redis_url, socket_connect_timeout=5, socket_timeout=5)
    try:
        client.ping()
    except redis.RedisError as error:
        return [
            Check(
                "redis",
                FAIL,
                f"no usable Redis at {config.redis_location()} ({error})",
                "check redis_url",
            )
        ]
    try:
        checks = [Check("redis", OK, f"answers at {config.redis_location()}")]
        checks.append(redis_persistence(client.info("persistence")))
        try:
            policy = client.config_get("maxmemory-policy").get("maxmemory-policy")
        except redis.ResponseError:
            policy = None
        checks.append(redis_eviction(policy))
        before = time.time()
        seconds, micros = client.time()
        local = (before + time.time()) / 2
        version = client.info("server").get("redis_version", "?")
        checks.append(redis_clock(seconds + micros / 1e6, local, version))
        return checks
    finally:
        client.close()


def probe_vast(context, client, seen: Observations, *, redis_ok: bool) -> list[Check]:
    from ponos_tasks.offers import build_query
    from ponos_tasks.vast import VastAuthError, VastError

    config = context.config
    try:
        seen.account = client.check_auth()
    except VastAuthError as error:
        return [Check("vast.account", FAIL, str(error), "set vast_api.api_key to a valid key")]
    except VastError as error:
        return [
            Check("vast.account", FAIL, str(error), f"check vast_api.url ({config.vast_api.url})")
        ]
    checks = [vast_account(seen.account, config.budget)]
    try:
        query = build_query(
            config.vast_api.offer_filters,
            disk_gb=config.vast_api.disk_gb,
            max_dph=config.budget.max_dph_per_instance,
        )
        seen.offers = client.search_offers(query)
        checks.append(vast_offers(seen.offers, query["limit"]))
    except VastError as error:
        checks.append(Check("vast.offers", FAIL, str(error), "retry later"))
    try:
        seen.instances = client.list_instances()
    except VastError as error:
        checks.append(Check("vast.instances", FAIL, str(error), "retry later"))
        return checks
    # The agent's id from its stored credentials only: the doctor does not register.
    agent_id = context.arkindex.agent_id if redis_ok else None
    own_prefix = None
    if agent_id:
        from ponos_tasks.lifecycle import agent_short_id

        own_prefix = f"ponos-{agent_short_id(agent_id)}-"
    checks += vast_instances(seen.instances, own_prefix)
    checks.append(probe_instance_filters(client, seen, config.vast_api.instance_reads))
    running = [
        i
        for i in seen.instances
        if own_prefix
        and (i.label or "").startswith(own_prefix)
        and i.actual_status in ("running", "exited")  # a container that ran has a log
    ]
    if running:
        seen.default_log_lines = default_log_lines(client, running[0].id)
    return checks


def probe_instance_filters(client, seen: Observations, instance_reads: str) -> Check:
    """The flat sync's two filtered calls, read next to the full listing (the assumption
    `vast.instance_filters` judges the answers)."""
    from ponos_tasks.vast import VastError
    from ponos_tasks.view import not_running_from

    seen.ids_asked = [i.id for i in seen.instances[:5]] or [0]
    # Bounded at the second instance not running: an API that ignored the bound would list
    # the first, one that read it as `gt` would leave the second out; both show. Fewer than
    # two: the middle id (the bound's inclusiveness cannot show then).
    ids = sorted(i.id for i in seen.instances)
    not_running = sorted(i.id for i in seen.instances if i.actual_status in NOT_RUNNING_STATUSES)
    if len(not_running) >= 2:
        seen.a_from = not_running[1]
    else:
        seen.a_from = ids[len(ids) // 2] if ids else 0
    try:
        seen.not_running = client.list_instances(select_filters=not_running_from(seen.a_from))
        seen.by_id = client.list_instances(select_filters={"id": {"in": seen.ids_asked}})
    except VastError as error:
        if error.status is None or not 400 <= error.status < 500 or error.status == 429:
            # Not read (an outage, a timeout, a rate limit) is no refusal: cannot tell.
            seen.not_running = seen.by_id = None
            return Check("vast.instance_filters", WARNING, f"not read: {error}", "run it again")
        seen.filter_error = str(error)
    verdict, why = check_instance_filters(seen)
    if verdict != CONTRADICTED:
        return Check("vast.instance_filters", OK, why)
    if instance_reads == "flat":
        return Check(
            "vast.instance_filters",
            FAIL,
            why,
            "set vast_api.instance_reads: full_list (every sync lists every instance)",
        )
    return Check("vast.instance_filters", WARNING, why, "instance_reads is full_list: no need")


def default_log_lines(client, instance_id: int) -> int | None:
    """Lines of the instance's log asked without `tail` (an upload of its log, nothing
    else); None when it cannot be read."""
    from ponos_tasks.vast import VastError

    try:
        text = client.request_logs(instance_id, wait=30.0, max_bytes=16 << 20)
    except VastError:
        return None
    # assumptions.check_log_default_tail compares it with Vast.ai's default tail.
    return len(text.splitlines()) if text else 0


def probe_arkindex(context, seen: Observations, *, register: bool, task: str | None):
    config = context.config
    seen.agent_operations = agent_operation_ids()
    url = urljoin(config.url, arkindex_module.SCHEMA_PATH)
    try:
        response = requests.get(url, timeout=arkindex_module.HTTP_TIMEOUT)
        response.raise_for_status()
        schema = response.json()
        seen.schema_operations = {
            op["operationId"]
            for path in schema.get("paths", {}).values()
            for op in path.values()
            if isinstance(op, dict) and "operationId" in op
        }
    except (requests.RequestException, ValueError, AttributeError) as error:
        return [
            Check("arkindex", FAIL, f"no schema at {url} ({type(error).__name__})", "check url")
        ]
    checks = [Check("arkindex", OK, f"answers at {config.url}")]
    checks.append(arkindex_schema(seen.schema_operations, seen.agent_operations))
    client = context.arkindex
    if register:
        try:
            agent = client.register(force=True)
            checks.append(
                Check("arkindex.register", OK, f"proof accepted, agent {agent.get('id')}")
            )
        except arkindex_module.ArkindexError as error:
            checks.append(Check("arkindex.register", FAIL, str(error), "check farm_id and seed"))
    if task is not None:
        if client.agent_id is None:
            checks.append(
                Check("arkindex.task", FAIL, "the agent has no credentials", "add --register")
            )
        else:
            try:
                seen.task_definition = client.definition_answer(task)
                checks.append(arkindex_task(seen.task_definition))
            except arkindex_module.ArkindexError as error:
                checks.append(Check("arkindex.task", FAIL, str(error), "check the task id"))
            except arkindex_module.ErrorResponse as error:
                checks.append(
                    Check(
                        "arkindex.task",
                        FAIL,
                        f"task {task}: HTTP {error.status_code} "
                        f"({arkindex_module.error_detail(error)})",
                        "is the task assigned to this agent?",
                    )
                )
    return checks


# --------------------------------------------------------------------------- command


def run_doctor(config: AgentConfig, *, register: bool = False, task: str | None = None):
    """(checks, assumption verdicts) for `config`."""
    from ponos_tasks.agent import AgentContext
    from ponos_tasks.vast import VastClient

    checks = [redacted_secrets(config)]
    checks += probe_redis(config)
    context = AgentContext(config)
    # The agent's own rate limiter (shared through Redis), and no call counter: the doctor
    # leaves the agent's metrics alone. Two tries: someone is waiting at the terminal.
    redis_ok = not any(c.name == "redis" and c.status == FAIL for c in checks)
    limiter = context.limiter if redis_ok else None
    vast = VastClient(
        config.vast_api.url, config.vast_api.api_key, rate_limiter=limiter, max_attempts=2
    )
    seen = Observations()
    try:
        checks += probe_vast(context, vast, seen, redis_ok=redis_ok)
        if redis_ok or not (register or task):
            checks += probe_arkindex(context, seen, register=register, task=task)
        else:
            checks.append(Check("arkindex", FAIL, "needs Redis for --register/--task", ""))
    finally:
        vast.close()
    return checks, judge(seen)


def _scrub(text: str, secrets: list[str]) -> str:
    for secret in secrets:
        text = text.replace(secret, "***")
    return text


@click.command("doctor")
@click.option("--config", "config_path", type=click.Path(dir_okay=False), default=None,
              help="Agent configuration file (default: $PONOS_CONFIG).")  # fmt: skip
@click.option("--json", "as_json", is_flag=True, help="One JSON document, for scripts.")
@click.option("--register", is_flag=True,
              help="Also check the registration proof (creates or refreshes the agent).")  # fmt: skip
@click.option("--task", "task_id", default=None,
              help="Also check this task's definition (needs the agent's credentials).")  # fmt: skip
def doctor_command(config_path, as_json, register, task_id):
    """Check, read-only, that the configuration, Redis, Vast.ai and Arkindex are what the agent
    (and its simulators) assume. Exit 0 when nothing fails, 1 otherwise."""
    logging.getLogger().addHandler(logging.NullHandler())
    try:
        config = load_config(config_path)
    except ConfigError as error:
        checks = [Check("config", FAIL, "; ".join(error.problems), "fix the configuration")]
        verdicts: list[dict] = []
        secrets: list[str] = []
    else:
        checks, verdicts = run_doctor(config, register=register, task=task_id)
        secrets = config.secrets()
    failed = any(c.status == FAIL for c in checks) or any(
        v["verdict"] == CONTRADICTED for v in verdicts
    )
    if as_json:
        document = {
            "ok": not failed,
            "checks": [asdict(c) for c in checks],
            "assumptions": verdicts,
        }
        click.echo(_scrub(json.dumps(document, indent=2), secrets))
    else:
        for c in checks:
            line = f"{c.status:<8} {c.name}: {c.detail}" + (f" -> {c.action}" if c.action else "")
            click.echo(_scrub(line, secrets))
        for v in verdicts:
            click.echo(_scrub(f"{v['verdict']:<13} {v['name']}: {v['detail']}", secrets))
    sys.exit(1 if failed else 0)
