"""What the simulators assume about Vast.ai and Arkindex, each with its read-only check.

The simulators (ponos_tasks/simulators/) decide how harsh the local world is through knobs;
each knob stands for a fact about the real service (docs/reference.md §1.5). `ASSUMPTIONS`
lists them here, one entry per knob, with what the simulator does and a check that takes what
`ponos-vast doctor` saw through read-only calls and answers `confirmed`, `contradicted` or
`cannot tell`. tests/test_assumptions.py fails when a simulator knob has no entry, so that a
new assumption cannot be added without its check.

This module lives with the agent, not in the simulators' package: the doctor runs on an
install without the `sim` extra, and the simulators never import the agent (nor the agent
them). Pure: no HTTP, Redis or clock here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import parse_qs, urlsplit

from ponos_tasks.models import Instance, Offer

CONFIRMED = "confirmed"
CONTRADICTED = "contradicted"
CANNOT_TELL = "cannot tell"

# Every `actual_status` lifecycle.instance_condition() reads (None: not reported yet).
KNOWN_ACTUAL_STATUSES = frozenset(
    {"created", "loading", "running", "frozen", "exited", "stopped", "offline", "unknown",
     "rebooting"}
)  # fmt: skip
# Fields of Vast.ai's answers the agent reads: missing, the agent is blind to something.
ACCOUNT_FIELDS = ("balance", "credit")
OFFER_FIELDS = ("id", "dph_total", "gpu_name", "num_gpus", "machine_id", "reliability")
INSTANCE_FIELDS = ("id", "label", "actual_status", "intended_status", "machine_id")
# Every field of an instance row the agent reads (models.Instance, bidding, budget, steps):
# the others are kept in `raw` untouched, and the doctor lists them.
INSTANCE_FIELDS_READ = frozenset(
    {"id", "label", "machine_id", "actual_status", "intended_status", "cur_state",
     "next_state", "status_msg", "gpu_name", "dph_total", "start_date", "extra_env",
     "public_ipaddr", "is_bid", "dph_base", "storage_total_cost", "onstart", "image_args",
     "args"}
)  # fmt: skip


def unread_fields(rows: list[dict], read: frozenset[str]) -> list[str]:
    """The fields of `rows` the agent never reads, sorted."""
    return sorted({name for row in rows for name in row} - read)


# What the agent reads from a task definition (arkindex.TaskDefinition.from_api).
TASK_DEFINITION_FIELDS = ("image", "command", "env", "parents", "s3_logs_put_url")
# request_logs without `tail` answers the last 1000 lines (Vast.ai's CLI documents it).
LOG_DEFAULT_TAIL = 1000
# The simulator's pre-signed log URLs live this long (boto3's default ExpiresIn).
LOG_URL_LIFETIME = 3600


@dataclass
class Observations:
    """What the doctor's read-only calls saw (None: that call was not made, or failed)."""

    account: dict | None = None
    offers: list[Offer] | None = None
    instances: list[Instance] | None = None
    schema_operations: set[str] | None = None
    agent_operations: set[str] = field(default_factory=set)
    task_definition: dict | None = None
    default_log_lines: int | None = None  # lines of a log asked without `tail`
    # The flat sync's filtered listings, next to the full one (`instances`): what
    # `actual_status neq running` with `id gte a_from`, and `id in [ids_asked]` answered,
    # or the error they got.
    not_running: list[Instance] | None = None
    a_from: int = 0
    by_id: list[Instance] | None = None
    ids_asked: list[int] = field(default_factory=list)
    filter_error: str | None = None


Verdict = tuple[str, str]  # (confirmed / contradicted / cannot tell, why)


@dataclass(frozen=True)
class Assumption:
    name: str
    simulator_does: str
    knobs: tuple[str, ...]  # "vast:<VastSimulator parameter>" / "arkindex:<...>"
    check: Callable[[Observations], Verdict]


def _needs_writing(what: str) -> Callable[[Observations], Verdict]:
    def check(_seen: Observations) -> Verdict:
        return CANNOT_TELL, f"only {what} would show it (the doctor changes nothing)"

    return check


def _missing(rows: list[dict], names: tuple[str, ...]) -> list[str]:
    return sorted({name for row in rows for name in names if row.get(name) is None})


def check_account(seen: Observations) -> Verdict:
    if seen.account is None:
        return CANNOT_TELL, "the account was not read"
    bad = [n for n in ACCOUNT_FIELDS if not isinstance(seen.account.get(n), int | float)]
    if bad:
        return CONTRADICTED, f"the account has no number in {', '.join(bad)}"
    return CONFIRMED, "balance and credit are numbers"


def check_offer_fields(seen: Observations) -> Verdict:
    if not seen.offers:
        return CANNOT_TELL, "no offer was seen"
    missing = _missing([o.raw for o in seen.offers], OFFER_FIELDS)
    if missing:
        return CONTRADICTED, f"offers lack {', '.join(missing)}"
    return CONFIRMED, f"{len(seen.offers)} offers carry {', '.join(OFFER_FIELDS)}"


def check_instance_statuses(seen: Observations) -> Verdict:
    if seen.instances is None:
        return CANNOT_TELL, "the instances were not listed"
    if not seen.instances:
        return CANNOT_TELL, "the account has no instance"
    unknown = sorted({i.actual_status for i in seen.instances} - KNOWN_ACTUAL_STATUSES - {None})
    missing = _missing([i.raw for i in seen.instances], INSTANCE_FIELDS[:1] + INSTANCE_FIELDS[2:])
    if unknown or missing:
        parts = [f"unknown actual_status {', '.join(unknown)}"] if unknown else []
        parts += [f"rows lack {', '.join(missing)}"] if missing else []
        return CONTRADICTED, "; ".join(parts)
    return CONFIRMED, f"{len(seen.instances)} instances, every status known"


def check_listing(seen: Observations) -> Verdict:
    if seen.instances is None:
        return CANNOT_TELL, "the v1 listing was not read"
    if len(seen.instances) <= 25:
        return CANNOT_TELL, f"{len(seen.instances)} instances fit one page: paging not seen"
    return CONFIRMED, f"{len(seen.instances)} instances read page after page"


# Offer fields the expected-cost ranking reads (ranking.py): without them it falls back to
# pessimistic guesses (a slow line, an unreliable host) and ranks blind.
RANKING_FIELDS = ("inet_down", "reliability", "dph_base")


def check_ranking_fields(seen: Observations) -> Verdict:
    if not seen.offers:
        return CANNOT_TELL, "no offer was seen"
    missing = _missing([o.raw for o in seen.offers], RANKING_FIELDS)
    if missing:
        return CONTRADICTED, f"offers lack {', '.join(missing)}: the ranking guesses them"
    return CONFIRMED, (
        f"offers carry {', '.join(RANKING_FIELDS)}; how fast hosts really pull and how often "
        "they fail only starts would show"
    )


# The stored statuses the flat sync's call A (`actual_status neq running`, `id gte`) must list.
NOT_RUNNING_STATUSES = frozenset({"created", "loading", "exited", "stopped"})


def check_instance_filters(seen: Observations) -> Verdict:
    """The v1 listing applies `select_filters` as the flat sync relies on (ponos_tasks/view.py):
    `neq` on the stored actual_status together with `gte` on ids, `in` on ids, compared with
    the full listing read just before (an instance changing status in between can make a
    false alarm: run it again)."""
    if seen.filter_error is not None:
        return CONTRADICTED, f"the v1 listing refused select_filters ({seen.filter_error})"
    if seen.not_running is None or seen.instances is None:
        return CANNOT_TELL, "the filtered listings were not read"
    listed = {i.id: i for i in seen.instances}
    problems = []
    running = sorted(i.id for i in seen.not_running if i.actual_status == "running")
    if running:
        problems.append(f"actual_status neq running listed running instances {running[:5]}")
    a_ids = {i.id for i in seen.not_running}
    below = sorted(i for i in a_ids if i < seen.a_from)
    if below:
        problems.append(f"id gte {seen.a_from} listed instances below it {below[:5]}")
    missed = sorted(
        i for i, inst in listed.items()
        if inst.actual_status in NOT_RUNNING_STATUSES and i >= seen.a_from and i not in a_ids
    )  # fmt: skip
    if missed:
        problems.append(f"actual_status neq running left out instances {missed[:5]}")
    if seen.by_id is not None:
        expected = {i for i in seen.ids_asked if i in listed}
        got = {i.id for i in seen.by_id}
        if got != expected:
            problems.append(f"id in {sorted(seen.ids_asked)} answered {sorted(got)}")
    if problems:
        return CONTRADICTED, "; ".join(problems)
    if not listed:
        return CONFIRMED, "select_filters accepted (no instance to compare the answers with)"
    return CONFIRMED, (
        f"actual_status neq running with id gte, and id in, answer as the full listing of "
        f"{len(listed)} instances says"
    )


def check_log_default_tail(seen: Observations) -> Verdict:
    lines = seen.default_log_lines
    if lines is None:
        return CANNOT_TELL, "no log of this agent's instances was read"
    if lines > LOG_DEFAULT_TAIL:
        return CONTRADICTED, f"a log asked without tail had {lines} lines"
    if lines == LOG_DEFAULT_TAIL:
        return CONFIRMED, f"a log asked without tail was cut at {lines} lines"
    return CANNOT_TELL, f"the log read had only {lines} lines"


def check_schema(seen: Observations) -> Verdict:
    if seen.schema_operations is None:
        return CANNOT_TELL, "the schema was not read"
    missing = sorted(seen.agent_operations - seen.schema_operations)
    if missing:
        return CONTRADICTED, f"the schema lacks {', '.join(missing)}"
    return CONFIRMED, f"the schema offers {', '.join(sorted(seen.agent_operations))}"


def check_task_definition(seen: Observations) -> Verdict:
    data = seen.task_definition
    if data is None:
        return CANNOT_TELL, "no task definition was read (--task ID)"
    missing = [name for name in TASK_DEFINITION_FIELDS if name not in data]
    parents = data.get("parents")
    if parents and not all(isinstance(p, dict) and "id" in p and "slug" in p for p in parents):
        missing.append("parents as [{id, slug}]")
    if missing:
        return CONTRADICTED, f"the definition lacks {', '.join(missing)}"
    return CONFIRMED, f"the definition has {', '.join(TASK_DEFINITION_FIELDS)}"


def log_url_lifetime(url: Any) -> float | None:
    """Seconds a pre-signed S3 URL is valid for (SigV4 X-Amz-Expires), None if not said."""
    if not isinstance(url, str):
        return None
    values = parse_qs(urlsplit(url).query).get("X-Amz-Expires")
    try:
        return float(values[0]) if values else None
    except ValueError:
        return None


def check_log_url_lifetime(seen: Observations) -> Verdict:
    data = seen.task_definition
    if data is None:
        return CANNOT_TELL, "no task definition was read (--task ID)"
    lifetime = log_url_lifetime(data.get("s3_logs_put_url"))
    if lifetime is None:
        return CANNOT_TELL, "the log URL does not say its lifetime (X-Amz-Expires)"
    if lifetime < LOG_URL_LIFETIME:
        return CONTRADICTED, f"the log URL lives {lifetime:g} s, not {LOG_URL_LIFETIME} s"
    return CONFIRMED, f"the log URL lives {lifetime:g} s"


ASSUMPTIONS: tuple[Assumption, ...] = (
    Assumption(
        "vast.account_fields",
        "GET /users/current/ answers balance and credit as numbers",
        ("vast:account",),
        check_account,
    ),
    Assumption(
        "vast.offer_fields",
        f"every offer carries {', '.join(OFFER_FIELDS)}",
        ("vast:market",),
        check_offer_fields,
    ),
    Assumption(
        "vast.instance_statuses",
        f"actual_status is one of {', '.join(sorted(KNOWN_ACTUAL_STATUSES))}",
        ("vast:run_mode", "vast:churn"),
        check_instance_statuses,
    ),
    Assumption(
        "vast.v1_listing_pages",
        "GET /api/v1/instances/ pages 25 rows at a time with next_token",
        ("vast:PAGE_SIZE",),
        check_listing,
    ),
    Assumption(
        "vast.instance_filters",
        "the v1 list applies select_filters (neq on the stored actual_status, in on ids)",
        ("vast:select_filters",),
        check_instance_filters,
    ),
    Assumption(
        "vast.log_default_tail",
        f"request_logs without tail answers the last {LOG_DEFAULT_TAIL} lines",
        ("vast:log_default_tail",),
        check_log_default_tail,
    ),
    Assumption(
        "vast.host_speed_and_failures",
        "a host pulls at its offer's inet_down and fails starts as its reliability says "
        "(offers carry inet_down, reliability and dph_base)",
        ("vast:slow_cheap_hosts", "vast:reliability_failures"),
        check_ranking_fields,
    ),
    Assumption(
        "vast.log_delay",
        "a log's result_url is readable after ~3 s, minutes in 5 % of the requests",
        ("vast:log_delay", "vast:log_tail_p"),
        _needs_writing("timing log uploads"),
    ),
    Assumption(
        "vast.read_lag",
        "a new instance is missing from show/list for up to 5 s",
        ("vast:read_lag",),
        _needs_writing("creating an instance"),
    ),
    Assumption(
        "vast.stop_delay",
        "a stop takes effect 2-8 s after the call",
        ("vast:stop_delay",),
        _needs_writing("stopping an instance"),
    ),
    Assumption(
        "vast.restart_delay",
        "an exited container restarts after 20 s, doubling up to 5 min",
        ("vast:restart_delay",),
        _needs_writing("running a container that exits"),
    ),
    Assumption(
        "vast.image_pull",
        "an image pull takes its size's time; cached images start in ~30 s",
        ("vast:image_sizes", "vast:cached_images"),
        _needs_writing("starting an instance"),
    ),
    Assumption(
        "vast.search_quota",
        "10 000 searches per key per UTC day, then search_quota_exceeded",
        ("vast:search_quota",),
        _needs_writing("exhausting the search quota"),
    ),
    Assumption(
        "vast.rate_limits",
        "minimum intervals per endpoint, create's penalty, search's burst",
        ("vast:rate_limits",),
        _needs_writing("calls at the limit"),
    ),
    Assumption(
        "arkindex.schema_operations",
        "the OpenAPI schema offers every operation the agent calls",
        ("arkindex:schema_omits",),
        check_schema,
    ),
    Assumption(
        "arkindex.task_definition_fields",
        "a task definition has image, command, env, parents [{id, slug}], s3_logs_put_url",
        ("arkindex:definition",),
        check_task_definition,
    ),
    Assumption(
        "arkindex.log_url_lifetime",
        f"the pre-signed log URL lives {LOG_URL_LIFETIME} s",
        ("arkindex:url_lifetime",),
        check_log_url_lifetime,
    ),
    Assumption(
        "arkindex.token_ttl",
        "an access token lives an hour; a refused one is renewed with the refresh token",
        ("arkindex:token_ttl",),
        _needs_writing("waiting for a token to expire"),
    ),
)


def judge(seen: Observations) -> list[dict[str, str]]:
    """Every assumption's verdict on what was seen."""
    results = []
    for assumption in ASSUMPTIONS:
        verdict, why = assumption.check(seen)
        results.append(
            {
                "name": assumption.name,
                "verdict": verdict,
                "detail": why,
                "simulator": assumption.simulator_does,
            }
        )
    return results
