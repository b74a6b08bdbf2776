"""The per-task chain, as plain functions of (context, ids); the sync loop that starts and
resumes it is loop.py's.

No Celery here: each step does its work through the clients of the AgentContext, moves the
task's record by compare-and-set on (phase, attempt), and returns what should run next
(`Next`). A step that finds the record in another phase than it expects does nothing: a
duplicate or late message is harmless, and the sync loop (loop.py) re-issues whatever step a lost
message should have run.

`STEPS` is the one registry of the chain: `@step(StepName.X)` declares a step's function,
queue and retry policy where the function is written; tasks.py makes one Celery task of
each entry, and the test harness runs them from the same registry.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import redis
from redis.exceptions import LockNotOwnedError

from ponos_tasks import bidding, create_line, log_pacing, ranking, view
from ponos_tasks.agent import AgentContext
from ponos_tasks.arkindex import (
    ArkindexError,
    ArkindexUnavailable,
    ReportInFlight,
    TaskGone,
    TransitionRefused,
)
from ponos_tasks.budget import (
    MAX_DPH_TOTAL,
    NO_OFFER,
    over_task_cap,
    spend_now,
)
from ponos_tasks.definition import create_request_problem
from ponos_tasks.lifecycle import (
    ARKINDEX_ACTIVE_STATES,
    ARKINDEX_TERMINAL_STATES,
    Condition,
    Phase,
    StartFailureKind,
    make_label,
    next_attempt_allowed,
    offer_wait_expired,
    start_failure_kind,
)
from ponos_tasks.log_reads import Pending, read_instance_log
from ponos_tasks.logs import build_task_log, remember_secrets
from ponos_tasks.metric_store import END_TO_DESTROY, OFFERS_MATCHED, PENDING_TO_RUNNING
from ponos_tasks.models import (
    STEPS_QUEUE,
    Instance,
    Next,
    Offer,
    Snapshot,
    StepName,
    TaskRecord,
)
from ponos_tasks.offers import build_query, explain_offers, offer_matches, rank_offers
from ponos_tasks.ratelimit import RateLimitTimeout
from ponos_tasks.reconcile import (
    AdoptInstance,
    DestroyInstance,
    WatchAction,
    watch_decision,
)
from ponos_tasks.registry_client import (
    ImageConfigUnavailable,
    ImageNotFound,
    parse_image_reference,
)
from ponos_tasks.state import kept_alive, release
from ponos_tasks.vast import (
    CreateOutcomeUnknown,
    InstanceNotFound,
    OfferUnavailable,
    VastAuthError,
    VastBadAnswer,
    VastError,
    VastRateLimited,
    VastServerError,
    VastTransportError,
)
from ponos_tasks.view import PassState
from ponos_tasks.wrapper import (
    UnsplittableCommand,
    WrapperTooLong,
    is_wrapped,
    marker_nonce,
    parse_exit_marker,
    split_command,
    wrap_command,
)

logger = logging.getLogger(__name__)

SECRET_ENV_WORDS = ("TOKEN", "KEY", "SECRET", "PASSWORD")
Follow = Next | list[Next] | None


# --------------------------------------------------------------------------- the registry


# Transient failures worth a retry of the whole step (the clients already retried a few times
# inside): Celery's autoretry in tasks.py, and the tests' in-process harness.
TRANSIENT = (
    redis.exceptions.LockError,
    RateLimitTimeout,  # raised before anything is sent: a later try is safe
    VastRateLimited,
    VastServerError,
    VastTransportError,
    VastBadAnswer,
    ArkindexUnavailable,
    redis.ConnectionError,
    redis.TimeoutError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """How Celery retries a step on a transient failure (tasks.TRANSIENT); the clients have
    already retried a few times inside. A step whose retries run out is not lost: the sync
    loop sees its task's heartbeat go stale and enqueues the step again."""

    max_retries: int = 5
    backoff: int = 2  # s, doubled each retry (with jitter)
    backoff_max: int = 60


@dataclass(frozen=True)
class Step:
    name: StepName
    function: Callable[..., Follow]  # (ctx, task_id, **kwargs) -> what runs next
    queue: str = STEPS_QUEUE
    retry: RetryPolicy = field(default_factory=RetryPolicy)

    @property
    def task_name(self) -> str:
        """The Celery task's name (what Flower and the worker log show)."""
        return f"ponos.{self.name}"


STEPS: dict[StepName, Step] = {}


def step(name: StepName, **options):
    """Register the decorated function as the chain step `name`."""

    def register(function):
        if name in STEPS:
            raise ValueError(f"step {name} registered twice")
        STEPS[name] = Step(name, function, **options)
        return function

    return register


def run_step(ctx: AgentContext, task_id: str, name: StepName, **kwargs) -> list[Next]:
    """Run one step and return what it says should run next, as a list."""
    follow = STEPS[StepName(name)].function(ctx, task_id, **kwargs)
    if follow is None:
        return []
    return follow if isinstance(follow, list) else [follow]


# --------------------------------------------------------------------------- helpers


def note_task(ctx: AgentContext, task_id: str, message: str, level: str = "INFO") -> None:
    """An agent line about the task: in the published task log and in the agent's own log."""
    ctx.logbook.add(task_id, level, message)
    logger.log(logging.getLevelName(level), "task %s: %s", task_id, message)


def task_secrets(ctx: AgentContext, env: dict | None) -> list[str]:
    """Every secret the agent knows for this task: its config's and the task env's tokens."""
    values = list(ctx.secrets())
    for name, value in (env or {}).items():
        if value and any(word in name.upper() for word in SECRET_ENV_WORDS):
            values.append(value)
    remember_secrets(values)  # for the Sentry scrubber of this process
    return values


@dataclass(frozen=True)
class OfferSearch:
    ranked: list  # the offers the agent may rent, in the order it tries them
    left_out: dict[str, int]  # why -> offers Vast.ai returned that it will not rent
    more: bool  # the search returned its limit: more offers may match
    matching: list = field(default_factory=list)  # within filters and cap, failed ones too


def offer_query(config, record: TaskRecord) -> dict:
    """The Vast.ai search the agent sends for this task's next instance."""
    vast = config.vast_api
    return build_query(
        vast.offer_filters,
        disk_gb=vast.disk_gb,
        max_dph=bidding.price_cap(config),
        offer_type="bid" if bidding.bids(config, record) else "on-demand",
    )


def sort_offers(config, offers: list, failed: set, *, limit: int) -> OfferSearch:
    """Vast.ai's answer to `offer_query`, ranked, without what the agent will not rent (pure:
    the agent and `ponos-vast explain` share it). `failed`: machines to avoid."""
    vast = config.vast_api
    cap = bidding.price_cap(config)
    ranked, on_failed, unmatched, over_cap = [], 0, 0, 0
    matching = []  # within the filters and the cap, failed machines included
    for offer in rank_offers(offers):
        # The user's filters are checked again here: a server that ignored one must not make
        # us rent what the configuration excludes (max_dph_per_instance included).
        if not offer_matches(vast.offer_filters, offer):
            unmatched += 1
        elif cap is not None and (offer.dph_total is None or offer.dph_total > cap):
            over_cap += 1
        else:
            matching.append(offer)
            if offer.machine_id in failed:
                on_failed += 1
            else:
                ranked.append(offer)
    left_out = {
        "on a machine that failed a start": on_failed,
        "outside the filters": unmatched,
        "over budget.max_dph_per_instance": over_cap,
    }
    return OfferSearch(ranked, left_out, more=len(offers) >= limit, matching=matching)


def _search_offers(ctx: AgentContext, record: TaskRecord) -> OfferSearch:
    query = offer_query(ctx.config, record)
    offers, fresh = _shared_search(ctx, query)
    # This task's own failed machines, and those every task avoids for a while.
    failed = set(record.failed_machines) | ctx.store.avoided_machines()
    search = sort_offers(ctx.config, offers, failed, limit=query["limit"])
    # What the cheapest instance costs: how the sync loop tells a room too small for any.
    ctx.budget.note_cheapest(search.matching[0].dph_total if search.matching else None)
    if fresh:  # per search Vast.ai answered: a shared answer was observed when it came
        ctx.metric_store.observe(OFFERS_MATCHED, len(search.matching))
    return search


def offer_search_digest(query: dict) -> str:
    """The key of a shared search answer (`_shared_search`; explain reads it too)."""
    return hashlib.sha256(json.dumps(query, sort_keys=True).encode()).hexdigest()[:16]


def _shared_search(ctx: AgentContext, query: dict) -> tuple[list[Offer], bool]:
    """Vast.ai's answer to this query, shared by every task for `offer_search_reuse` s.

    A burst launches a task per create slot (4.5 s). One search per task and step (choose_offer,
    then the create) made about four a launch against a search bucket of one per 2 s and ten a
    minute: the search, not the create, bounded launches (BENCHMARKS.md, bench:launch). Offers
    of a shared answer that were rented since are passed over by their claims (the create loop);
    one gone anyway costs a no_such_ask and the next offer, as with a fresh answer.
    Returns the offers and whether Vast.ai was asked now (False: a shared answer)."""
    digest = offer_search_digest(query)
    rows = ctx.store.load_offer_search(digest)
    if rows is not None:
        return [Offer.from_dict(row) for row in rows], False
    offers = ctx.vast.search_offers(query)
    ctx.store.save_offer_search(digest, [o.raw for o in offers], ctx.settings.offer_search_reuse)
    return offers, True


def _ranked_offers(ctx: AgentContext, record: TaskRecord) -> list:
    return _search_offers(ctx, record).ranked


def _affordable(ctx: AgentContext, record: TaskRecord, offers: list) -> list:
    """The offers within the task's allowance (budget.py); all of them when no limit is
    shared by the instances. No allowance granted yet: none (the sync loop grants it)."""
    if not ctx.settings.budget.rations:
        return offers
    allowance = record.budget_allowance
    if allowance is None:
        return []
    return [o for o in offers if o.dph_total is not None and o.dph_total <= allowance + 1e-9]


#: Phases in which a task waits for room or an offer: its log is published when the reason
#: changes (PUBLISH_LOGS with final=False), so that its page on Arkindex says why it waits.
WAITING_PHASES = (Phase.ACCEPTED, Phase.WAITING_OFFER)


def set_waiting(
    ctx: AgentContext, record: TaskRecord, held_by: str | None, why: str | None
) -> list[Next]:
    """Record why the task waits (`status` shows it). A new reason goes to its log too, and
    the log is published: the step to run for that is returned."""
    if record.held_by == held_by and record.waiting_for == why:
        return []
    ctx.store.touch(record.task_id, held_by=held_by, waiting_for=why)
    if held_by is None or held_by == record.held_by:
        return []
    note_task(ctx, record.task_id, f"waiting: {why}", "WARNING")
    if ctx.store.once(f"waitlog:{record.task_id}:{held_by}", ctx.settings.logs_interval):
        return [Next(StepName.PUBLISH_LOGS, kwargs={"final": False})]
    return []


def _rank_by_policy(ctx: AgentContext, record: TaskRecord, image: str, offers: list) -> list:
    """Each offer's estimate (ranking.py), in the order the configured policy tries them:
    lowest expected bill first, or the search's own order (cheapest first) for
    `cheapest_hourly`. The image's size is the one read from its registry for its entrypoint
    (None when that was not read: the ranking then assumes a typical GPU image)."""
    settings = ctx.settings
    bid = bidding.bids(ctx.config, record)

    def price_of(offer):
        price = _bid_for(ctx, record, offer) if bid else None
        return offer.dph_total if price is None else bidding.instance_dph(offer, price)

    facts = dict(
        image_bytes=ctx.registry.known_size(image),
        cached_machines=ctx.store.image_hosts(image, settings.image_cache_seconds),
        run_s=ranking.expected_run_seconds(
            ctx.store.recent_run_seconds(image), settings.expected_run_seconds
        ),
        failed_starts=ctx.store.start_failures(),
        price_of=price_of,
    )
    if settings.offer_ranking == ranking.EXPECTED_COST:
        return ranking.rank(offers, **facts)
    estimates = (ranking.estimate(offer, **facts) for offer in offers)
    return [estimate for estimate in estimates if estimate is not None]


def _bid_for(ctx: AgentContext, record: TaskRecord, offer) -> float | None:
    """The bid for this offer, within every cap on the instance's $/h: the per-instance cap
    and the task's budget allowance (the bid, not the offer's min_bid-based dph_total, is what
    the instance will cost). None: even min_bid does not fit, and the offer is not rented."""
    margin = ctx.config.vast_api.interruptible.bid_margin
    caps = [bidding.price_cap(ctx.config)]
    if ctx.settings.budget.rations and record.budget_allowance is not None:
        caps.append(record.budget_allowance)
    known = [c for c in caps if c is not None and math.isfinite(c)]
    return bidding.bid_price(offer, margin, min(known) if known else None)


def instance_environment(ctx: AgentContext, definition) -> dict[str, str]:
    """The docker-mode environment plus the bootstrap variables TASK_BOOTSTRAP=true and
    TASK_PARENTS (JSON task id -> slug, "{}" when none: base-worker refuses an empty value)."""
    env = {str(k): str(v) for k, v in (definition.env or {}).items()}
    env.update(ctx.config.vast_api.extra_environment)
    env.setdefault("PONOS_TASK", str(definition.id))
    env.setdefault("PONOS_DATA", "/data")
    env.setdefault("ARKINDEX_API_URL", ctx.config.url + "/")
    env["TASK_BOOTSTRAP"] = "true"
    # base-worker refuses an empty value: "{}" when the task has no parents.
    env["TASK_PARENTS"] = json.dumps(dict(definition.parents or {}))
    return env


@dataclass(frozen=True)
class InstanceCommand:
    onstart: str | None  # the wrapper (None: the image runs as it is)
    args: list | None
    inferred: bool  # no wrapper: the exit status is inferred from how the instance ends
    notes: tuple[tuple[str, str], ...] = ()  # (level, agent line) about how it was found


def build_instance_command(registry, seed: str, definition, label: str | None) -> InstanceCommand:
    """The command of the attempt `label` names: the task's, or its image's entrypoint from
    the registry, wrapped (its exit marker's nonce derives from the seed and the label). Pure
    but for the registry read: the agent and `ponos-vast explain` share it."""
    if definition.command:
        argv = split_command(definition.command)
        notes: tuple = ()
    else:
        try:
            argv = registry.image_command(definition.image)
        except ImageNotFound:
            raise  # the image does not exist: the caller refuses the task
        except ImageConfigUnavailable as error:
            note = (
                f"cannot read the entrypoint of {definition.image} "
                f"({error.reason}): running the image unwrapped; the exit status will be "
                "inferred from how the instance ends"
            )
            return InstanceCommand(None, None, True, (("WARNING", note),))
        notes = (("INFO", f"image command from the registry: {argv}"),)
    # The marker's nonce names this attempt (its label, set when the attempt was claimed).
    onstart, args = wrap_command(argv, nonce=marker_nonce(seed, label) if label else "")
    return InstanceCommand(onstart, args, False, notes)


def image_login(config, image: str) -> str | None:
    """The create's `image_login` for the image's registry (None: a public image)."""
    host = image.split("/", 1)[0].lower() if "/" in image else ""
    for registry in config.vast_api.registries:
        if registry.registry_host == host:
            return f"-u {registry.username} -p {registry.password} {host}"
    return None


def create_request(config, definition, label: str, command: InstanceCommand, env: dict) -> dict:
    """The create call's body (but the offer and the bid): the agent sends this, and
    `ponos-vast explain` shows it."""
    return dict(
        image=definition.image,
        label=label,
        env=env,
        disk=config.vast_api.disk_gb,
        runtype="args",
        onstart=command.onstart,
        args=command.args,
        image_login=image_login(config, definition.image),
    )


def fresh_snapshot(ctx: AgentContext, max_age: float) -> Snapshot:
    """The shared instance snapshot; listed again (by one process) when older than max_age.

    Watchers read this instead of one GET per instance per cycle; only one process lists
    at a time (a short lock), the others keep the snapshot they have.
    """
    snapshot = ctx.store.load_snapshot()
    if snapshot is not None and ctx.now() - snapshot.taken_at <= max_age:
        return snapshot
    lock = ctx.store.snapshot_lock(timeout=60)
    if not lock.acquire():
        return snapshot or Snapshot((), 0.0)
    try:
        listed_at = ctx.now()  # stamped when the listing starts (see _sync_locked)
        instances = ctx.vast.list_instances(label_prefix=ctx.label_prefix())
        snapshot = Snapshot(tuple(instances), listed_at)
        ctx.store.save_snapshot(snapshot)
        return snapshot
    finally:
        release(lock)


def _destroy(ctx: AgentContext, instance_id: int) -> bool:
    """DELETE the instance (False: it was not found) and drop it from the flat view: either
    answer is a fact about it, which the view need not wait for a full listing to learn."""
    destroyed = ctx.vast.destroy_instance(instance_id)
    # Marked first: a refresh in flight, whose listing predates the destroy, drops it again.
    ctx.store.mark_view_destroyed(instance_id, ctx.now(), ctx.settings.tombstone_ttl)
    ctx.store.drop_view_entries([instance_id])
    return destroyed


def _nothing_rented(ctx: AgentContext, lock, record: TaskRecord) -> None:
    """Every create try this step sent was refused, or never left: nothing was rented, and
    the step run again need not wait for Vast.ai's reads (create_sent_at cleared). Only
    while the create lock is still this step's, held since its last renewal (renewed here,
    so that no one takes it before the touch): nothing renews it while the call waits (the
    rate limiter, a slow or hanging answer), and a worker that took it over once it lapsed
    may have sent a create whose stamp must stand. (A process paused for longer than the
    lock's timeout between the two calls is the residual risk of any lease.)"""
    with contextlib.suppress(LockNotOwnedError):
        lock.reacquire()
        ctx.store.touch(record.task_id, expect_attempt=record.attempt, create_sent_at=None)


def _before_create_sent(ctx: AgentContext, lock, record: TaskRecord, offer_id: int) -> None:
    """Right before a create try is sent: renew its lock, and note the create's floor (the
    flat view's call A then covers the instance even if the answer is lost: view.py)."""
    lock.reacquire()
    ctx.store.touch(record.task_id, expect_attempt=record.attempt, create_sent_at=ctx.now())
    settings = ctx.settings
    ctx.store.note_create_floor(
        f"{record.task_id}:{record.attempt}:{offer_id}",
        ctx.store.load_view_meta().highest_seen,
        ctx.now(),
        view.create_floor_seconds(settings.full_resync_interval, settings.visibility_grace),
    )


# After Vast.ai refused the flat view's filtered calls, full listings this long before the
# view is tried again (an API change rolled back, a proxy fixed); each refusal says so.
VIEW_REFUSED_SECONDS = 1800.0


class ViewRefused(VastError):
    """Vast.ai refused a filtered list call of the flat view (a 400): full listings for now."""


def instance_reads(ctx: AgentContext) -> str:
    """How instances are read now: `vast_api.instance_reads`, but full listings for a while
    after Vast.ai refused the flat view's filters (a positive fact: the full listing is the
    way that needs none, at the cost that grows with the fleet)."""
    if ctx.settings.instance_reads == "flat" and ctx.store.view_refused() is None:
        return "flat"
    return "full_list"


def refresh_view(
    ctx: AgentContext,
    *,
    wait: float = 0.0,
    seen_not_running: Callable[[list[Instance]], None] | None = None,
) -> PassState | None:
    """Refresh the flat instance view (view.py) under the snapshot lock, the one every
    refresh takes so that no listing's result is written over a later one's; None when
    another process holds it past `wait` seconds (it is refreshing the same view).
    `seen_not_running` is given what the refresh's A listed as soon as it is written.
    The lock times out as the sync's own does (sync_lock_timeout, renewed while the refresh
    runs): a worker killed mid-refresh frees the view, and so the loop, as a killed sync would."""
    timeout = ctx.settings.sync_lock_timeout
    lock = ctx.store.snapshot_lock(timeout=timeout)
    if not lock.acquire(blocking=wait > 0, blocking_timeout=wait or None):
        return None
    try:
        with kept_alive(lock, every=timeout / 3):  # a first pass over a big fleet takes minutes
            # The instances the records name: view.refresh asks for those it lacks.
            record_ids = ctx.store.active_instance_ids()
            return view.refresh(ctx, ctx.settings.sync_interval, record_ids, seen_not_running)
    except VastError as error:
        if error.status != 400:
            raise  # unread is not refused: the view keeps what it had, the caller retries
        reason = f"Vast.ai refused a filtered instance listing: {error}"
        ctx.store.refuse_view(reason, VIEW_REFUSED_SECONDS)
        logger.error(
            "%s; reading instances with full listings for %.0f s (their cost grows with the "
            "fleet), then trying the flat view again; if it keeps happening set "
            "vast_api.instance_reads: full_list (ponos-vast doctor checks the filters)",
            reason,
            VIEW_REFUSED_SECONDS,
        )
        raise ViewRefused(error.msg, status=error.status, context="flat view") from error
    finally:
        release(lock)


def view_for_watch(ctx: AgentContext, record: TaskRecord) -> tuple[Instance | None, float]:
    """A watcher's look at its own instance in the flat view (one hash field), refreshed
    first with the same filtered calls when the sync's refresh is late. Returns the entry and
    the time to judge absence by: for an absent instance, the full listing that covered its
    id at least visibility_grace after its create, or 0.0 when none did yet (absent then
    means "not seen yet", never gone: watch_decision waits)."""
    settings = ctx.settings
    state = ctx.store.load_view_meta()
    if ctx.now() - state.refreshed_at > settings.snapshot_max_age:
        state = refresh_view(ctx) or ctx.store.load_view_meta()
    if record.instance_id is None:
        return None, state.refreshed_at
    instance = ctx.store.view_entry(record.instance_id)
    if instance is not None:
        return instance, state.refreshed_at
    seen_at = state.absence_seen_at(
        record.instance_id, record.instance_created_at or 0.0, settings.visibility_grace
    )
    return None, 0.0 if seen_at is None else seen_at


# --------------------------------------------------------------------------- the chain


def accept(ctx: AgentContext, task_id: str) -> bool:
    """Create the task's record (the sync loop does it, before the chain starts)."""
    created = ctx.store.create_if_absent(TaskRecord.new(task_id, ctx.now()))
    if created:
        note_task(
            ctx,
            task_id,
            f"task accepted by agent {ctx.config.agent_name}; looking for a Vast.ai offer",
        )
    return created


@step(StepName.START)
def start(ctx: AgentContext, task_id: str) -> Next | None:
    record = ctx.store.get(task_id)
    if record is None or record.phase != Phase.ACCEPTED:
        return None
    if (
        ctx.store.cas(
            task_id,
            expect_phase=Phase.ACCEPTED,
            expect_attempt=record.attempt,
            phase=Phase.WAITING_OFFER,
            heartbeat_at=ctx.now(),
        )
        is None
    ):
        return None
    return Next(StepName.CHOOSE_OFFER)


@step(StepName.CHOOSE_OFFER)
def choose_offer(ctx: AgentContext, task_id: str) -> Follow:
    """Wait until an offer matches; error once `offer_wait` has passed without one."""
    record = ctx.store.get(task_id)
    if record is None or record.phase != Phase.WAITING_OFFER:
        return None
    now = ctx.now()
    offers = _ranked_offers(ctx, record)
    if offers and _affordable(ctx, record, offers):
        set_waiting(ctx, record, None, None)
        ctx.store.touch(task_id, heartbeat_at=now)
        return Next(StepName.CREATE_INSTANCE)
    again = Next(StepName.CHOOSE_OFFER, countdown=ctx.settings.watch_interval)
    if offers:
        # Offers match, but the budget leaves too little for them: that is no missing offer
        # (offer_wait does not run), the task waits for room, however long.
        allowance = record.budget_allowance
        why = (
            f"{record.allowance_limit or 'the budget'} leaves ${allowance or 0:.4f}/h for its "
            f"instance; the cheapest matching offer costs ${offers[0].dph_total:.4f}/h"
        )
        publish = set_waiting(ctx, record, record.allowance_limit or MAX_DPH_TOTAL, why)
        ctx.store.touch(task_id, waiting_since=None, heartbeat_at=now)
        return [again, *publish]
    # Its agent line ("waiting: no Vast.ai offer matches the filters") comes from here.
    publish = set_waiting(ctx, record, NO_OFFER, "no Vast.ai offer matches the filters")
    if record.waiting_since is None:
        ctx.store.touch(task_id, waiting_since=now, heartbeat_at=now)
        return [again, *publish]
    if offer_wait_expired(record, now, ctx.settings.offer_wait):
        reason = f"no Vast.ai offer matched the filters within {ctx.settings.offer_wait:g} s"
        note_task(ctx, task_id, reason, "ERROR")
        if ctx.store.cas(
            task_id,
            expect_phase=record.phase,
            expect_attempt=record.attempt,
            phase=Phase.FINISHING,
            final_state="error",
            reason=reason,
        ):
            return Next(StepName.PUBLISH_LOGS)
        return None
    ctx.store.touch(task_id, heartbeat_at=now)
    return Next(StepName.CHOOSE_OFFER, countdown=ctx.settings.watch_interval)


@step(StepName.CREATE_INSTANCE)
def create_instance(ctx: AgentContext, task_id: str, attempt: int | None = None) -> Next | None:
    """At most one instance per attempt (README, "How it works"): lock, CAS, label lookup,
    create. `attempt`: the message comes from the line of creates (a look at the turn of
    that attempt), and never claims another: a late one (the attempt ended, the task went
    back to waiting or to a retry meanwhile) does nothing."""
    lock = ctx.store.create_lock(task_id, timeout=ctx.settings.create_lock_timeout)
    if not lock.acquire():
        return None  # another worker is creating this task's instance right now
    try:
        return _create_locked(ctx, task_id, lock, attempt)
    finally:
        release(lock)


def _claim_attempt(ctx: AgentContext, task_id: str, attempt: int | None) -> TaskRecord | None:
    """The record in `creating`, at a new attempt unless it was already creating (resumed);
    with `attempt` (a look of the line of creates), only at that attempt, never a new one."""
    record = ctx.store.get(task_id)
    if attempt is not None:
        return record if create_line.still_creating(record, attempt) else None
    if record is None:
        return None
    if record.phase in (Phase.WAITING_OFFER, Phase.RETRYING, Phase.ACCEPTED):
        attempt = record.attempt + 1
        label = make_label(ctx.agent_short_id(), task_id, attempt)
        return ctx.store.cas(
            task_id,
            expect_phase=record.phase,
            expect_attempt=record.attempt,
            phase=Phase.CREATING,
            attempt=attempt,
            label=label,
            create_unknown_at=None,
            create_sent_at=None,
            create_turn_at=None,
            create_look_at=None,
            create_turn_came=False,
            heartbeat_at=ctx.now(),
        )
    return record if record.phase == Phase.CREATING else None


def _create_locked(ctx: AgentContext, task_id: str, lock, attempt: int | None) -> Next | None:
    record = _claim_attempt(ctx, task_id, attempt)
    if record is None:
        return None
    if not record.create_turn_came and record.create_unknown_at is None:
        later = create_line.wait_for_turn(
            ctx, record, functools.partial(note_task, ctx, record.task_id)
        )
        if later is not None:
            return later
    try:
        return _create_in_turn(ctx, record, lock)
    finally:
        # Whatever the outcome (created, no offer, refused, an error retried: a step run
        # again skips the line), the attempt's place goes, or it would hold the line back.
        ctx.limiter.leave_line("create", create_line.line_claimant(record.task_id, record.attempt))


def _create_in_turn(ctx: AgentContext, record: TaskRecord, lock) -> Next | None:
    task_id = record.task_id
    # Resumed or fresh: the label of this attempt may already name an instance (a create
    # whose answer was lost, a worker killed after Vast accepted): adopt it, never re-create.
    existing = ctx.vast.list_instances(label=record.label)
    for stray in [i for i in existing if ctx.store.is_stray(i.id)]:
        # Created stopped by an earlier try, whose destroy failed: finish that destroy (an
        # error raises, and the step is retried), never adopt it as the task's instance.
        _destroy(ctx, stray.id)
        existing.remove(stray)
    if existing:
        return _record_instance(ctx, record, min(existing, key=lambda i: i.id), adopted=True)
    now = ctx.now()
    unsure = [t for t in (record.create_unknown_at, record.create_sent_at) if t is not None]
    if unsure and now - max(unsure) < ctx.settings.visibility_grace:
        # A create of this attempt got no answer, or was sent by a step that did not record
        # its outcome: Vast.ai's reads lag a create, so "not listed" is no proof it did not
        # happen. Look again until the grace has passed.
        ctx.store.touch(task_id, heartbeat_at=now)
        return Next(StepName.CREATE_INSTANCE, countdown=ctx.settings.create_unknown_delay)

    try:
        definition = ctx.arkindex.task_definition(task_id)
    except TaskGone:
        return _task_deleted(ctx, record)
    if record.stop_requested:
        return None
    problem = definition_problem(definition)
    if problem is not None:
        return _refuse_task(ctx, record, problem)
    try:
        command = build_instance_command(ctx.registry, ctx.config.seed, definition, record.label)
    except ImageNotFound as error:
        return _refuse_task(ctx, record, f"its image does not exist ({error.reason})")
    except WrapperTooLong as error:
        return _refuse_task(ctx, record, f"its command is too long: the {error}")
    except UnsplittableCommand as error:
        return _refuse_task(ctx, record, f"its command is not valid: {error}")
    for level, line in command.notes:
        note_task(ctx, task_id, line, level)
    inferred = command.inferred
    env = instance_environment(ctx, definition)
    problem = create_request_problem(definition.image, env, command.onstart, command.args)
    if problem is not None:
        return _refuse_task(ctx, record, problem)
    request = create_request(ctx.config, definition, record.label, command, env)
    search = _search_offers(ctx, record)
    offers = _affordable(ctx, record, search.ranked)
    # The budget decided which offers may be rented; the policy decides their order.
    estimates = _rank_by_policy(ctx, record, definition.image, offers)
    by_cost = ctx.settings.offer_ranking == ranking.EXPECTED_COST
    if by_cost:
        offers = [estimate.offer for estimate in estimates]
    chosen_because = {id(e.offer): e.explain() for e in estimates}
    note_task(
        ctx,
        task_id,
        f"attempt {record.attempt}: "
        + explain_offers(
            offers,
            left_out=search.left_out,
            more=search.more,
            estimates=estimates if by_cost else None,
        ),
    )
    if offers and record.kept_instance_id is not None:
        # The failed attempt's kept instance goes right before the new one is created: never
        # two instances of one task at once, and a trace outside Redis until the last moment.
        _destroy(ctx, record.kept_instance_id)
        ctx.store.touch(task_id, kept_instance_id=None)
        note_task(
            ctx, task_id, f"destroyed instance {record.kept_instance_id} of the failed attempt"
        )
    tried = 0
    refusals: list[str] = []  # Vast.ai's answers to creates it refused (4xx)
    passed: list[str] = []  # offers ranked above the one rented, and why they were not
    bid = bidding.bids(ctx.config, record)
    for offer in offers:
        if tried == ctx.settings.offers_tried_per_create:
            break
        price = _bid_for(ctx, record, offer) if bid else None
        if bid and price is None:
            passed.append(f"offer {offer.id}'s min_bid is over the price caps")
            continue
        # Claim the offer for a short while, so that workers creating at the same moment
        # take the next offers instead of all racing for the cheapest one.
        if not ctx.store.once(f"offer:{offer.id}", ctx.settings.offer_claim_seconds):
            passed.append(f"offer {offer.id} is being rented for another task")
            continue
        # Renting one offer of a machine replaces its other offers by new ids: those a shared
        # search answer still lists would only earn a no_such_ask (a create slot wasted).
        if ctx.store.claimed(f"rented-machine:{offer.machine_id}"):
            passed.append(f"offer {offer.id}'s machine was rented from since the search")
            continue
        tried += 1
        try:
            # The lock is renewed to a full timeout right before each try is sent (after the
            # rate limiter's wait, however long): a worker whose lock lapsed meanwhile, and
            # was taken over, sends nothing (LockNotOwnedError).
            created = ctx.vast.create_instance(
                offer.id,
                before_send=functools.partial(_before_create_sent, ctx, lock, record, offer.id),
                # Its slot is reserved: those behind it in the line count from that slot now.
                on_slot=functools.partial(
                    ctx.limiter.leave_line,
                    "create",
                    create_line.line_claimant(task_id, record.attempt),
                ),
                price=price,
                **request,
            )
            ctx.store.remember_instance_key(task_id, record.attempt, created.instance_api_key)
        except LockNotOwnedError:
            note_task(
                ctx,
                task_id,
                "the create lock lapsed before the create was sent; another "
                "worker has taken this attempt over",
                "WARNING",
            )
            return None
        except OfferUnavailable:
            ctx.metric_store.count_start_failure(StartFailureKind.OFFER_GONE)
            note_task(
                ctx,
                task_id,
                f"offer {offer.id} was taken before we could rent it; trying the next one",
            )
            passed.append(f"offer {offer.id} was taken")
            continue
        except RateLimitTimeout:
            # No slot came for the next try: every try this step sent was refused (a 429 or
            # a request that never left are the only ones a create retries).
            _nothing_rented(ctx, lock, record)
            raise
        except CreateOutcomeUnknown as error:
            # Never re-send: the instance may exist. The next run of this step looks the
            # label up first (above) and adopts it, or creates if it really does not exist.
            note_task(
                ctx,
                task_id,
                f"no answer to the create call ({error.msg}); looking the "
                "label up before anything else",
                "WARNING",
            )
            ctx.store.touch(task_id, create_unknown_at=ctx.now(), heartbeat_at=ctx.now())
            return Next(StepName.CREATE_INSTANCE, countdown=ctx.settings.create_unknown_delay)
        except VastError as error:
            # A refusal (400 invalid_args...) is a definite answer: nothing was created. It
            # may be this offer's (a host's rule): the next offer is tried; when every
            # offer tried refused, the task is refused below.
            if (
                error.status is None
                or not 400 <= error.status < 500
                or isinstance(error, VastAuthError | VastRateLimited)
            ):
                if isinstance(error, VastRateLimited | VastAuthError | VastTransportError):
                    # Proof that nothing was created (a refusal, or a request that never left:
                    # one that may have is CreateOutcomeUnknown): the step run again need not
                    # wait for Vast.ai's reads. Any other answer (a 200 without a contract id)
                    # may follow a rental: the wait stands.
                    _nothing_rented(ctx, lock, record)
                raise
            refusals.append(error.msg)
            ctx.metric_store.count_start_failure(StartFailureKind.CREATE_REFUSED)
            note_task(ctx, task_id, f"Vast.ai refused the create on offer {offer.id}: {error.msg}")
            passed.append(f"offer {offer.id} refused the create")
            continue
        if not created.started and price is not None:
            # Created stopped: a higher bid arrived since the search (docs/reference.md §3.1).
            # The machine is not at fault; the stray instance goes at once.
            note_task(
                ctx,
                task_id,
                f"Vast.ai created instance {created.id} stopped on machine {offer.machine_id}: "
                f"our bid of ${price:.4f}/h is below its minimum now; destroying it and "
                "trying another offer",
                "WARNING",
            )
            ctx.store.mark_stray(created.id)  # before the destroy, which may fail
            _destroy(ctx, created.id)
            continue
        if not created.started:
            ctx.metric_store.count_start_failure(StartFailureKind.CREATED_STOPPED)
            note_task(
                ctx,
                task_id,
                f"Vast.ai created instance {created.id} stopped on machine "
                f"{offer.machine_id}; destroying it and trying another offer",
                "WARNING",
            )
            ctx.store.mark_stray(created.id)  # before the destroy, which may fail
            _destroy(ctx, created.id)
            ctx.store.touch(task_id, failed_machines=[*record.failed_machines, offer.machine_id])
            ctx.store.avoid_machine(offer.machine_id, ctx.settings.machine_cooldown)
            record = ctx.store.get(task_id)
            passed.append(f"offer {offer.id} was created stopped")
            continue
        ctx.store.once(f"rented-machine:{offer.machine_id}", ctx.settings.offer_search_reuse)
        why = (
            ("the lowest expected bill" if by_cost else "the cheapest matching offer")
            + (f" left ({'; '.join(passed)})" if passed else "")
            + (f" [{chosen_because[id(offer)]}]" if by_cost and id(offer) in chosen_because else "")
        )
        return _record_instance(
            ctx, record, None, created=created, offer=offer, inferred=inferred, why=why, bid=price
        )
    if refusals and len(refusals) == tried:
        return _refuse_task(ctx, record, f"Vast.ai refused to create its instance ({refusals[-1]})")
    # Nothing could be rented: give the attempt number back and wait for an offer.
    if ctx.store.cas(
        task_id,
        expect_phase=Phase.CREATING,
        expect_attempt=record.attempt,
        phase=Phase.WAITING_OFFER,
        attempt=record.attempt - 1,
        waiting_since=record.waiting_since or ctx.now(),
        heartbeat_at=ctx.now(),
    ):
        return Next(StepName.CHOOSE_OFFER, countdown=ctx.settings.watch_interval)
    return None


def definition_problem(definition) -> str | None:
    """Why a task definition can never run, in one line (None when it can)."""
    if definition.problems:
        return "its definition is malformed: " + "; ".join(definition.problems)
    if not definition.image.strip():
        return "its definition has no image"
    try:
        parse_image_reference(definition.image)
    except ValueError as error:
        return str(error)
    return None


def _refuse_task(ctx: AgentContext, record: TaskRecord, problem: str) -> Next | None:
    """The task cannot run as defined: it ends `error` with the reason in its log, and
    nothing is rented (publish_logs, report_state and destroy_instance find no instance)."""
    reason = f"the task cannot run: {problem}; no instance was rented for it"
    if _end_in_error(ctx, record, reason, expect_phase=Phase.CREATING):
        note_task(ctx, record.task_id, reason, "ERROR")
        return Next(StepName.PUBLISH_LOGS)
    return None


def _end_in_error(ctx: AgentContext, record: TaskRecord, reason: str, *, expect_phase: str) -> bool:
    """CAS the attempt to `finishing` with the final state `error` and why."""
    return ctx.store.cas(
        record.task_id,
        expect_phase=expect_phase,
        expect_attempt=record.attempt,
        phase=Phase.FINISHING,
        final_state="error",
        reason=reason,
        heartbeat_at=ctx.now(),
    )


def _record_instance(
    ctx: AgentContext,
    record: TaskRecord,
    instance,
    *,
    created=None,
    offer=None,
    adopted=False,
    inferred=False,
    why: str | None = None,
    bid=None,
) -> Next | None:
    now = ctx.now()
    if instance is not None:
        values = dict(
            instance_id=instance.id,
            machine_id=instance.machine_id,
            gpu_name=instance.gpu_name,
            dph_total=instance.dph_total,
        )
    else:
        values = dict(
            instance_id=created.id,
            machine_id=offer.machine_id,
            offer_id=offer.id,
            gpu_name=offer.gpu_name,
            # A bid instance costs its bid plus the disk's storage, not the offer's
            # min_bid-based dph_total: the budget's commitments and caps use this price.
            dph_total=offer.dph_total if bid is None else bidding.instance_dph(offer, bid),
        )
    updated = ctx.store.cas(
        record.task_id,
        expect_phase=Phase.CREATING,
        expect_attempt=record.attempt,
        phase=Phase.LOADING,
        instance_created_at=now,
        heartbeat_at=now,
        inferred=inferred,
        # A new instance: what the record says of the last one (seen running, its start's
        # progress, its unread log) is not true of this one.
        running_since=None,
        start_status=None,
        progress_at=None,
        log_unread_since=None,
        bid=bid,
        outbid_since=None,
        **values,
    )
    if updated is None:
        # Someone else moved the record on: what we created is nobody's; destroy it.
        _destroy(ctx, values["instance_id"])
        return None
    verb = "adopted existing" if adopted else "created"
    source = f" from offer {offer.id}" if offer is not None else ""
    kind = "" if bid is None else f", interruptible: bid ${bid:.4f}/h"
    note_task(
        ctx,
        record.task_id,
        f"attempt {record.attempt}: {verb} Vast.ai instance {values['instance_id']}{source} on "
        f"machine {values['machine_id']} ({values['gpu_name']}, "
        f"${(values['dph_total'] or 0):.3f}/h{kind})" + (f": {why}" if why else ""),
    )
    return Next(StepName.WATCH, countdown=ctx.settings.watch_interval)


@step(StepName.WATCH)
def watch(ctx: AgentContext, task_id: str, chain: int | None = None) -> list[Next]:
    """Look at the task's instance in the shared snapshot and move the task on.

    One watch chain per task: a watch that starts one (`chain` None: after a create, an
    adoption or a resume by the sync) takes the task's chain number over, and a watch of an
    older chain stops, so that late resumes never multiply the chains (and their calls).
    """
    record = ctx.store.get(task_id)
    if record is None or record.phase not in (Phase.LOADING, Phase.RUNNING):
        return []
    if chain is None:
        chain = ctx.store.new_watch_chain(task_id)
    elif chain != record.watch_chain:
        return []  # an older chain: the newer one watches this task
    again = {"chain": chain}
    settings = ctx.settings
    over = _over_spend_cap(ctx, record)
    if over is not None:
        return _end_over_budget(ctx, record, over)
    # The sync loop lists every sync_interval; a watcher lists again only when that snapshot
    # is late (sync stalled), so that the `list` rate limit is not spent many times over.
    seen = None
    if instance_reads(ctx) == "flat":
        with contextlib.suppress(ViewRefused):  # then full listings, as configured otherwise
            seen = view_for_watch(ctx, record)
    if seen is None:
        snapshot = fresh_snapshot(ctx, settings.snapshot_max_age)
        seen = snapshot.find(record.instance_id), snapshot.taken_at
    instance, taken_at = seen
    now = ctx.now()
    if (
        instance is None
        and record.instance_id is not None
        and taken_at >= (record.instance_created_at or 0.0)
        and now - (record.instance_created_at or 0.0) >= settings.visibility_grace
    ):
        # Missing from the listing: ask for it by id before calling it gone (a listing can
        # miss a row). An error here raises: unknown is retried, never taken for gone.
        instance = ctx.vast.get_instance(record.instance_id)
    if (
        record.phase == Phase.LOADING
        and instance is not None
        and instance.status_msg is not None
        and instance.status_msg != record.start_status
    ):
        # The start shows progress (docker pull's lines change): a slow pull is not stalled.
        ctx.store.touch(task_id, start_status=instance.status_msg, progress_at=now)
        record = replace(record, start_status=instance.status_msg, progress_at=now)
        if ctx.store.once(f"startnote:{task_id}:{record.attempt}", settings.start_note_interval):
            note_task(
                ctx, task_id, f"instance {record.instance_id} starting: {instance.status_msg[:200]}"
            )
    follow = _watch_outbid(ctx, record, instance, now, again)
    if follow is not None:
        return follow
    decision = watch_decision(record, instance, now, settings, snapshot_taken_at=taken_at)
    # Gone while the log asked for at its end is awaited: that log is uploaded all the same,
    # and it is the evidence of how the task ended (without it, gone decides as before).
    gone_while_read = (
        decision.condition is Condition.GONE
        and ctx.store.log_read(task_id, record.attempt, "watch") is not None
    )
    if (
        decision.action != WatchAction.READ_LOGS
        and not gone_while_read
        and instance is not None
        and instance.actual_status == "running"
    ):
        # Running again (Vast.ai restarted the container after an end): a log asked for at
        # that end holds that run's output, never the next end's exit marker, and the next
        # end must wake this watch as the first did.
        ctx.store.running_again(task_id, record.attempt)
    if decision.action == WatchAction.READ_LOGS or gone_while_read:
        text = read_instance_log(ctx, record, "watch")
        if isinstance(text, Pending):  # asked for; read when Vast.ai has uploaded it
            return [Next(StepName.WATCH, countdown=text.delay, kwargs=again)]
        if text is None and not gone_while_read:
            # Unread is not "no exit marker": keep the ended instance and read again, with
            # backoff, up to log_read_deadline; only then decide, saying why.
            delay = _read_log_again_in(
                ctx, record, now, f"instance {record.instance_id} has ended but its log"
            )
            if delay is not None:
                return [Next(StepName.WATCH, countdown=delay, kwargs=again)]
        elif text is not None and record.log_unread_since is not None:
            ctx.store.touch(task_id, expect_attempt=record.attempt, log_unread_since=None)
        if text is not None or not gone_while_read:
            decision = watch_decision(
                record,
                instance,
                now,
                settings,
                exit_code=parse_exit_marker(text or "", ctx.marker_nonce(record.label)),
                logs_read=True,
                log_unreadable=text is None,
                log_tail=(text or "")[-4000:],
                snapshot_taken_at=taken_at,
            )
        if text is not None and decision.action in (WatchAction.FINISH, WatchAction.GIVE_UP):
            # The instance has ended: its log will not change. Keep what decided the outcome
            # for the final upload instead of asking Vast.ai (rate-limited) for it again.
            ctx.store.keep_ended_log(task_id, record.attempt, text, settings.ended_log_ttl)
    if decision.offline_since != record.offline_since:
        ctx.store.touch(task_id, offline_since=decision.offline_since)
    action = decision.action
    if action == WatchAction.MARK_RUNNING:
        if ctx.store.cas(
            task_id,
            expect_phase=Phase.LOADING,
            expect_attempt=record.attempt,
            phase=Phase.RUNNING,
            running_since=now,
            heartbeat_at=now,
        ):
            note_task(ctx, task_id, f"instance {record.instance_id} is running")
            # Its host now has the image cached: the offer ranking counts a near-zero pull.
            ctx.store.remember_image_host(
                _instance_image(instance), record.machine_id, settings.image_cache_seconds
            )
            _report_running(ctx, task_id)
        return [Next(StepName.WATCH, countdown=settings.watch_interval, kwargs=again)]
    if action in (WatchAction.FINISH, WatchAction.GIVE_UP):
        outcome = decision.outcome
        if ctx.store.cas(
            task_id,
            expect_phase=record.phase,
            expect_attempt=record.attempt,
            phase=Phase.FINISHING,
            final_state=outcome.state,
            reason=outcome.reason,
            heartbeat_at=now,
        ):
            note_task(
                ctx,
                task_id,
                f"task ended: {outcome.state} ({outcome.reason})",
                "INFO" if outcome.state == "completed" else "WARNING",
            )
            if action == WatchAction.GIVE_UP:  # the last start failed there too
                ctx.store.avoid_machine(record.machine_id, settings.machine_cooldown)
                _count_start_failure(ctx, decision)
            elif outcome.state in ("completed", "failed"):
                # The task's command ran there (a marker, or an inferred status): its host
                # has the image, and how long it ran refines the ranking's expected run time.
                image = _instance_image(instance)
                ctx.store.remember_image_host(
                    image, record.machine_id, settings.image_cache_seconds
                )
                if record.running_since is not None:
                    # In Vast.ai's seconds, as the pull estimates are (the same as the
                    # agent's but for the local simulator's accelerated clock).
                    ran = (now - record.running_since) * settings.budget.billing_time_scale
                    ctx.store.remember_run_seconds(image, ran)
            return [Next(StepName.PUBLISH_LOGS)]
        return []
    if action == WatchAction.RETRY_ATTEMPT:
        if ctx.store.cas(
            task_id,
            expect_phase=record.phase,
            expect_attempt=record.attempt,
            phase=Phase.RETRYING,
            heartbeat_at=now,
            failed_machines=[*record.failed_machines, record.machine_id],
            attempt_reasons=[*record.attempt_reasons, decision.reason],
        ):
            ctx.store.avoid_machine(record.machine_id, settings.machine_cooldown)
            _count_start_failure(ctx, decision)
            note_task(
                ctx,
                task_id,
                f"attempt {record.attempt} failed on machine "
                f"{record.machine_id}: {decision.reason}; trying another machine",
                "WARNING",
            )
            return [Next(StepName.RETRY_ATTEMPT)]
        return []
    # WAIT
    ctx.store.heartbeat(task_id, expect_attempt=record.attempt)
    if record.phase == Phase.RUNNING:
        _report_running(ctx, task_id)  # a no-op once reported; sends it if a report was lost
    publish = (
        record.phase == Phase.RUNNING
        and _periodic_logs_due(ctx, record.logs_published_at, now)
        # one periodic upload at a time: its read may still await Vast.ai's upload
        and ctx.store.log_read(task_id, record.attempt, "running") is None
    )
    # The upload sent now counts from now, not from the last one (the record predates it).
    published_at = now if publish else record.logs_published_at
    countdown = _next_look_in(settings, record, instance, now, published_at)
    follow = [Next(StepName.WATCH, countdown=countdown, kwargs=again)]
    if publish:
        follow.append(Next(StepName.PUBLISH_LOGS, kwargs={"final": False}))
    return follow


def _next_look_in(
    settings, record: TaskRecord, instance, now: float, published_at: float | None
) -> float:
    """When a waiting watch looks again. An instance that runs is looked at every
    running_watch_interval (settings.py says why: its end wakes the watch), but no later
    than its next periodic log upload is due (logs_interval after `published_at`), so that
    the live log keeps its cadence. A due upload that waits (the log pacing's stretch, or a
    read in flight) is looked at again a running look later."""
    if record.phase != Phase.RUNNING or instance is None or instance.actual_status != "running":
        return settings.watch_interval
    look = settings.running_watch_interval
    if published_at is not None:
        due_in = published_at + settings.logs_interval - now
        if due_in > 0:
            look = min(look, due_in)
    return max(settings.watch_interval, look)


def _periodic_logs_due(ctx: AgentContext, published_at: float | None, now: float) -> bool:
    """Whether the task's live log is due: logs_interval since the last upload, stretched
    while more tasks run than the periodic reads' share of the log endpoint serves at that
    pace (log_pacing.py). The running count is read only once logs_interval has passed (the
    stretch never shortens it): most watches make no Redis call for it."""
    if published_at is None:
        return True
    waited = now - published_at
    if waited < ctx.settings.logs_interval:
        return False
    return waited >= log_pacing.periodic_interval(
        ctx.settings.logs_interval,
        ctx.store.running_count(),
        ctx.limiter.interval(log_pacing.GATE),
    )


def _periodic_log_turn(ctx: AgentContext) -> bool:
    """Whether a periodic log read may ask Vast.ai now: it takes the gate's slot only when it
    is free, never waiting for it (log_pacing.py)."""
    try:
        ctx.limiter.reserve(log_pacing.GATE, timeout=0)
    except RateLimitTimeout:
        return False
    return True


def _over_spend_cap(ctx: AgentContext, record: TaskRecord) -> str | None:
    """Why the task must end now to stay within max_spend_per_task, if it must: what the
    meter counted for it, plus its instance's full price since the meter last charged it and
    for as long as ending it takes (settings.spend_end_margin)."""
    limits = ctx.settings.budget
    if limits.max_spend_per_task is None or record.instance_id is None or record.stop_requested:
        return None
    metered = ctx.budget.metered(record.instance_id)
    dph = record.dph_total or (metered.rates.total if metered else 0.0)
    until = metered.until if metered is not None else record.instance_created_at
    spent = ctx.budget.task_spent([record.task_id]).get(record.task_id, 0.0)
    spend = spend_now(spent, until, dph, now=ctx.now(), limits=limits)
    return over_task_cap(spend, dph, margin=ctx.settings.spend_end_margin, limits=limits)


def _end_over_budget(ctx: AgentContext, record: TaskRecord, reason: str) -> list[Next]:
    """End the task in `error` for its spending limit: its instance is stopped at once (the
    GPU stops billing), then its log is published and the instance destroyed, as usual."""
    if not ctx.store.cas(
        record.task_id,
        expect_phase=record.phase,
        expect_attempt=record.attempt,
        phase=Phase.FINISHING,
        final_state="error",
        reason=reason,
        heartbeat_at=ctx.now(),
    ):
        return []
    note_task(
        ctx, record.task_id, f"{reason}: stopping its instance; the task ends in error", "ERROR"
    )
    _stop_instance(ctx, record, "at its spending limit")
    return [Next(StepName.PUBLISH_LOGS)]


def _instance_image(instance) -> str | None:
    return None if instance is None else instance.raw.get("image_uuid")


def _count_start_failure(ctx: AgentContext, decision) -> None:
    ctx.metric_store.count_start_failure(start_failure_kind(decision.condition, decision.reason))


def _watch_outbid(ctx: AgentContext, record: TaskRecord, instance, now: float, again: dict):
    """An outbid is a pause (bidding.py): the steps that follow, or None to watch as usual."""
    settings = ctx.settings
    fallback_after = ctx.config.vast_api.interruptible.fallback_after
    action = bidding.outbid_decision(record, instance, now, fallback_after)
    watch_again = [Next(StepName.WATCH, countdown=settings.watch_interval, kwargs=again)]
    if action == bidding.OutbidAction.NONE:
        return None
    if action == bidding.OutbidAction.WAIT:
        ctx.store.heartbeat(record.task_id, expect_attempt=record.attempt)
        return watch_again
    if action == bidding.OutbidAction.RESUMED:
        paused = now - record.outbid_since
        # progress_at: the time parked is not a stalled pull.
        ctx.store.touch(
            record.task_id, expect_attempt=record.attempt, outbid_since=None, progress_at=now
        )
        note_task(
            ctx,
            record.task_id,
            f"instance {record.instance_id} resumed by Vast.ai after {paused:.0f} s outbid; "
            "its container starts again from the image",
        )
        return None
    if action == bidding.OutbidAction.PAUSED:
        # A command seen running may have printed its exit code just before the outbid: then
        # it ended, and the usual watch reads that. An unreadable log is no such proof: pause.
        # (Before it was seen running, there is no run to read: a container that never ran
        # has no log Vast.ai serves, and asking costs the whole log-read deadline.)
        if record.phase == Phase.RUNNING:
            text = read_instance_log(ctx, record, "outbid")
            if isinstance(text, Pending):
                return [Next(StepName.WATCH, countdown=text.delay, kwargs=again)]
            nonce = ctx.marker_nonce(record.label)
            if text is not None and parse_exit_marker(text, nonce) is not None:
                return None
        ctx.store.touch(
            record.task_id, expect_attempt=record.attempt, outbid_since=now, heartbeat_at=now
        )
        cut = (
            "the task's command was cut and will run again from its start if the instance resumes"
            if record.phase == Phase.RUNNING
            else "the agent had not seen the task's command start (if it had, it was cut, and "
            "will run again from its start if the instance resumes)"
        )
        note_task(
            ctx,
            record.task_id,
            f"instance {record.instance_id} was outbid (Vast.ai stopped it for a "
            f"higher-priority rental): {cut}. Waiting up to {fallback_after:g} s for it to "
            "resume; its storage still bills meanwhile",
            "WARNING",
        )
        return watch_again
    # FALLBACK: give the machine up. The paused instance goes first (it could resume and
    # run the command beside its successor), then an on-demand attempt elsewhere.
    reason = (
        f"instance {record.instance_id} outbid for {now - record.outbid_since:.0f} s "
        f"(fallback_after {fallback_after:g} s)"
    )
    if not next_attempt_allowed(record.attempt, settings.max_attempts):
        reason = f"no instance could run the task in {record.attempt} attempt(s); last: {reason}"
        if _end_in_error(ctx, record, reason, expect_phase=record.phase):
            note_task(ctx, record.task_id, reason, "ERROR")
            return [Next(StepName.PUBLISH_LOGS)]
        return []
    _destroy(ctx, record.instance_id)
    if ctx.store.cas(
        record.task_id,
        expect_phase=record.phase,
        expect_attempt=record.attempt,
        phase=Phase.RETRYING,
        heartbeat_at=now,
        failed_machines=[*record.failed_machines, record.machine_id],
        attempt_reasons=[*record.attempt_reasons, reason],
        on_demand_only=True,
        outbid_since=None,
    ):
        note_task(
            ctx,
            record.task_id,
            f"{reason}: destroyed it; the task runs again from its start on an on-demand "
            "instance on another machine",
            "WARNING",
        )
        return [Next(StepName.RETRY_ATTEMPT)]
    return []


@step(StepName.RETRY_ATTEMPT)
def retry_attempt(ctx: AgentContext, task_id: str) -> Next | None:
    """Stop the failed attempt's instance, then look for an offer again.

    Stopped, not destroyed, until the next attempt is about to be created, when Arkindex
    already shows the task `running`: no Arkindex action lists it any more, so between two
    attempts its labelled instance is its only trace outside Redis; lost Redis, the next
    sync adopts it and goes on (a destroyed one would leave the task `running` forever).
    Stopped, it runs nothing more and bills only its storage. A task still `pending` there
    (no attempt ever ran) needs no trace: Arkindex's actions list it again after any loss,
    and a kept instance that never ran could only be adopted as an ended task whose log no
    one can read (`error`, instead of a new attempt). Its instance is destroyed.
    """
    record = ctx.store.get(task_id)
    if record is None or record.phase != Phase.RETRYING:
        return None
    kept = record.kept_instance_id
    if record.instance_id is not None:
        if kept is not None and kept != record.instance_id:
            _destroy(ctx, kept)  # an older trace: the newer one suffices
        if ctx.arkindex.task_state(task_id) == "running":  # unknown raises: retried
            try:
                ctx.vast.stop_instance(record.instance_id)
                kept = record.instance_id
                note_task(
                    ctx,
                    task_id,
                    f"instance {record.instance_id} stopped; kept (only its storage bills) "
                    "until the next attempt is created",
                )
            except InstanceNotFound:
                pass  # already gone: nothing to keep
        else:
            _destroy(ctx, record.instance_id)
            note_task(
                ctx, task_id, f"instance {record.instance_id} of the failed attempt destroyed"
            )
    if ctx.store.cas(
        task_id,
        expect_phase=Phase.RETRYING,
        expect_attempt=record.attempt,
        phase=Phase.WAITING_OFFER,
        instance_id=None,
        kept_instance_id=kept,
        offline_since=None,
        waiting_since=None,
        log_unread_since=None,  # that attempt's: the next one's log has its own deadline
        heartbeat_at=ctx.now(),
    ):
        return Next(StepName.CHOOSE_OFFER)
    return None


@step(StepName.PUBLISH_LOGS)
def publish_logs(ctx: AgentContext, task_id: str, final: bool = True) -> Next | None:
    """Upload the task's whole log (agent lines + instance log, redacted) to Arkindex's S3.

    While running (final=False) it also spots the exit marker of a task whose instance could
    not stop itself. The final upload moves the task on to reporting its state; it has a
    bounded number of tries, so that a log that cannot be published never keeps an instance
    (billing) alive: the log is then kept and published again once the task is done.
    Uploads of one task never overlap (a lock), and a periodic one checks right before it is
    sent that the task still runs: the final log always wins.
    """
    record = ctx.store.get(task_id)
    if record is None:
        return None
    if final and record.phase != Phase.FINISHING:
        return None
    if not final and record.phase not in (Phase.RUNNING, *WAITING_PHASES):
        return None
    if not final:
        return _publish_running_log(ctx, record)
    if record.task_gone:
        return _task_deleted(ctx, record)  # nowhere to publish: no log read holds it
    settings = ctx.settings
    ended_log = ctx.store.ended_log(task_id, record.attempt)
    instance_log = (
        ended_log
        if ended_log is not None
        else read_instance_log(ctx, record, "final", gone_is_empty=True)
    )
    if isinstance(instance_log, Pending):
        return Next(StepName.PUBLISH_LOGS, countdown=instance_log.delay, kwargs={"final": True})
    if instance_log is None and (record.running_since is not None or record.adopted):
        # Unread is not "no log": the instance of a task that ran is the only place its
        # output lives, and the destroy that follows is irreversible. Keep it and read
        # again, with backoff, up to log_read_deadline (counted from the first failed read,
        # the watch's included). (A task never seen running, unless adopted, has no output
        # worth the wait: the log of a container that never started is never readable.)
        first = record.log_unread_since is None
        delay = _read_log_again_in(
            ctx, record, ctx.now(), f"the log of instance {record.instance_id}"
        )
        if delay is not None:
            if first and record.stop_requested:
                _stop_while_waiting(ctx, record)
            return Next(StepName.PUBLISH_LOGS, countdown=delay, kwargs={"final": True})
        note_task(
            ctx, task_id, "the instance's log could not be read: it is missing below", "WARNING"
        )
    if record.inferred:
        note_task(
            ctx,
            task_id,
            "the image ran unwrapped: this final state was inferred from how its instance ended",
            "WARNING",
        )
    text = None
    try:
        definition = ctx.arkindex.task_definition(task_id)
        text = build_task_log(
            ctx.logbook.lines(task_id), instance_log or "", _log_secrets(ctx, task_id, definition)
        )
        with ctx.store.upload_lock(task_id, timeout=settings.upload_lock_timeout):
            ctx.arkindex.upload_logs(definition.s3_logs_put_url, text)
    except TaskGone:
        ctx.arkindex.forget(task_id)
        return _task_deleted(ctx, record)  # nowhere to publish, nothing to report
    except ArkindexError as error:
        # A fresh definition next time: its pre-signed URL may have expired.
        ctx.arkindex.forget(task_id)
        failures = record.publish_failures + 1
        now = ctx.now()
        if failures < settings.publish_tries:
            ctx.store.touch(task_id, publish_failures=failures, heartbeat_at=now)
            note_task(
                ctx,
                task_id,
                f"could not publish the log ({error}); try {failures} of {settings.publish_tries}",
                "WARNING",
            )
            return Next(
                StepName.PUBLISH_LOGS, countdown=min(60.0, 5.0 * failures), kwargs={"final": True}
            )
        note_task(
            ctx,
            task_id,
            f"the log could not be published in {failures} tries ({error}); "
            "going on without it, so that the instance does not keep billing; it is kept "
            "and published again once the task is done",
            "ERROR",
        )
        ctx.store.keep_ended_log(
            task_id, record.attempt, instance_log or "", settings.unpublished_log_ttl
        )
        ctx.store.touch(task_id, publish_failures=failures)
        published = False
    else:
        published = True
    now = ctx.now()
    if published:
        ctx.store.touch(task_id, logs_published_at=now, log_size=len(text.encode()))
    if ctx.store.cas(
        task_id,
        expect_phase=Phase.FINISHING,
        expect_attempt=record.attempt,
        phase=Phase.DESTROYING,
        heartbeat_at=now,
    ):
        if published and ended_log is None:
            # Kept for the log's last lines, published once the instance is gone.
            ctx.store.keep_ended_log(
                task_id, record.attempt, instance_log or "", settings.ended_log_ttl
            )
        return Next(StepName.REPORT_STATE)
    return None


def _publish_last_lines(ctx: AgentContext, record: TaskRecord) -> None:
    """Publish the final log once more, with the agent's lines written since it went out
    (the state reported, the instance destroyed), so that the task's log tells its whole
    story. One try, after the fact: nothing waits on it, and it never publishes less than
    the final upload did (without that upload's instance log, it publishes nothing)."""
    task_id = record.task_id
    instance_log = ctx.store.ended_log(task_id, record.attempt)
    if instance_log is None or record.task_gone:
        return
    try:
        definition = ctx.arkindex.task_definition(task_id)
        text = build_task_log(
            ctx.logbook.lines(task_id), instance_log, _log_secrets(ctx, task_id, definition)
        )
        with ctx.store.upload_lock(
            task_id, timeout=ctx.settings.upload_lock_timeout, wait=False
        ) as held:
            if held:
                ctx.arkindex.upload_logs(definition.s3_logs_put_url, text)
    except ArkindexError as error:
        logger.warning("task %s: the log's last lines could not be published: %s", task_id, error)
    finally:
        ctx.store.drop_ended_log(task_id, record.attempt)


def _task_deleted(ctx: AgentContext, record: TaskRecord) -> Next | None:
    """Arkindex says the task no longer exists (404, a positive fact): stop spending on it.

    Straight on to the destroy: there is no state to report and nowhere to publish a log
    (its pre-signed URL came with the definition that is gone), so neither a log read nor a
    report may keep the instance billing. Two changes, each resumable: to `finishing`
    (marked gone), then to `destroying` with nothing left to report.
    """
    reason = "the task was deleted on Arkindex"
    task_id = record.task_id
    if record.phase != Phase.FINISHING:
        if not ctx.store.cas(
            task_id,
            expect_phase=record.phase,
            expect_attempt=record.attempt,
            phase=Phase.FINISHING,
            final_state="error",
            reason=reason,
            task_gone=True,
            heartbeat_at=ctx.now(),
        ):
            return None
        note_task(ctx, task_id, f"{reason}: destroying its instance", "WARNING")
    if ctx.store.cas(
        task_id,
        expect_phase=Phase.FINISHING,
        expect_attempt=record.attempt,
        phase=Phase.DESTROYING,
        task_gone=True,
        final_reported=True,
        heartbeat_at=ctx.now(),
    ):
        return Next(StepName.DESTROY_INSTANCE)
    return None


def _log_secrets(ctx: AgentContext, task_id: str, definition) -> list[str]:
    """Every secret a task's published log must not show: the agent's and the task's, and
    the per-instance API keys of its attempts (the instance's own env has them)."""
    return [*task_secrets(ctx, definition.env), *ctx.store.instance_keys(task_id)]


def _publish_running_log(ctx: AgentContext, record: TaskRecord) -> Next | None:
    """The periodic upload while the task runs, or waits (never over the final one)."""
    task_id = record.task_id
    if (
        record.phase == Phase.RUNNING
        and not record.instance_destroyed
        and ctx.store.log_read(task_id, record.attempt, "running") is None
        and not _periodic_log_turn(ctx)
    ):
        return None  # the periodic reads' share of the log endpoint is taken: next watch
    instance_log = read_instance_log(ctx, record, "running")
    if isinstance(instance_log, Pending):
        return Next(StepName.PUBLISH_LOGS, countdown=instance_log.delay, kwargs={"final": False})
    # A fresh definition each period: a task deleted on Arkindex shows (404) within one
    # logs_interval, and a long task never uploads with a pre-signed URL it held too long.
    ctx.arkindex.forget(task_id)
    try:
        definition = ctx.arkindex.task_definition(task_id)
    except TaskGone:
        return _task_deleted(ctx, record)
    if instance_log is None:
        return None  # nothing new to show; the next period tries again
    text = build_task_log(
        ctx.logbook.lines(task_id), instance_log, _log_secrets(ctx, task_id, definition)
    )
    with ctx.store.upload_lock(
        task_id, timeout=ctx.settings.upload_lock_timeout, wait=False
    ) as held:
        current = ctx.store.get(task_id)
        if not held or current is None or current.phase != record.phase:
            return None  # another upload is under way, or the task has moved on: no overwrite
        ctx.arkindex.upload_logs(definition.s3_logs_put_url, text)
    now = ctx.now()
    ctx.store.touch(task_id, logs_published_at=now, log_size=len(text.encode()), heartbeat_at=now)
    code = parse_exit_marker(instance_log, ctx.marker_nonce(record.label))
    if code is not None and record.exit_code is None:
        ctx.store.touch(task_id, exit_code=code)  # the next watch finishes the task
    return None


def _report_running(ctx: AgentContext, task_id: str) -> None:
    """Report `running` (sent once: the Arkindex client's reported-states guard)."""
    record = ctx.store.get(task_id)
    if record is None or record.stop_requested:
        return
    try:
        if ctx.arkindex.update_state(task_id, "running"):
            _running_reported(ctx, record)
    except TransitionRefused as error:
        logger.warning("task %s: Arkindex refused `running`: %s", task_id, error.detail)
    except ReportInFlight:
        pass  # another worker sends it (or its lease lapses and a later call does)
    except TaskGone:
        pass  # deleted on Arkindex: the chain ends it (the final report says so)


def _running_reported(ctx: AgentContext, record: TaskRecord) -> None:
    """`running` reached Arkindex (once per task): the task waited this long to run. Not
    measured for an adopted task: its record was made anew, after the wait."""
    note_task(ctx, record.task_id, "reported `running` to Arkindex")
    if not record.adopted and record.accepted_at is not None:
        ctx.metric_store.observe(PENDING_TO_RUNNING, ctx.now() - record.accepted_at)


@step(StepName.REPORT_STATE)
def report_state(ctx: AgentContext, task_id: str) -> Next | None:
    """Send the final state to Arkindex, exactly once, then destroy the instance.

    Reported before the destroy: the outcome is then on Arkindex before the task's last
    outside trace (its labelled instance) disappears, so a loss of Redis at any moment still
    ends the task (an instance whose task is terminal is destroyed by the next sync).
    """
    record = ctx.store.get(task_id)
    if record is None or record.phase != Phase.DESTROYING or record.final_reported:
        return None
    if record.task_gone:
        # Arkindex answered 404 for the task (a positive fact): there is no state to send,
        # and no report in flight (a lease a killed worker left) may keep its instance.
        note_task(
            ctx, task_id, "the task no longer exists on Arkindex: nothing to report", "WARNING"
        )
    else:
        _send_final_state(ctx, record)
    if ctx.store.cas(
        task_id,
        expect_phase=Phase.DESTROYING,
        expect_attempt=record.attempt,
        final_reported=True,
        heartbeat_at=ctx.now(),
    ):
        return Next(StepName.DESTROY_INSTANCE)
    return None


def _send_final_state(ctx: AgentContext, record: TaskRecord) -> None:
    """The final state, as Arkindex's state table accepts it (raises when unknown: retried)."""
    task_id = record.task_id
    state = record.final_state or "error"
    if not record.stop_requested and state != "stopped":
        # A user may have stopped it since the outcome was decided, before any sync saw it:
        # Arkindex then accepts only `stopped` (one read saves two refused updates).
        current = ctx.arkindex.task_state(task_id)  # unknown raises: retried
        if current == "stopping":
            ctx.store.touch(task_id, stop_requested=True)
            record = replace(record, stop_requested=True)
    if record.stop_requested and state != "stopped":
        # The stop arrived after the outcome was decided: Arkindex now waits for `stopped`.
        note_task(
            ctx,
            task_id,
            f"the task had ended ({state}) when the stop arrived; "
            "reporting it stopped, as Arkindex asks",
        )
        state = "stopped"
    # Arkindex's table: a task reaches completed/failed only from running (a no-op when it
    # was reported already). `error` is allowed from pending: a task that never ran is not
    # reported running. `running` must be *on Arkindex* first: while another worker is still
    # sending it (ReportInFlight), this step is retried, never sent ahead of it (it would be
    # refused, and the task end in `error`).
    try:
        if state in ("completed", "failed"):
            try:
                if ctx.arkindex.update_state(task_id, "running"):
                    _running_reported(ctx, record)
            except TransitionRefused as error:
                logger.warning("task %s: Arkindex refused `running`: %s", task_id, error.detail)
        if ctx.arkindex.update_state(task_id, state):
            note_task(ctx, task_id, f"reported `{state}` to Arkindex")
    except TransitionRefused as error:
        _report_refused(ctx, task_id, state, error)
    except TaskGone:
        ctx.store.touch(task_id, task_gone=True)
        note_task(
            ctx, task_id, "the task no longer exists on Arkindex: nothing to report", "WARNING"
        )


def _report_refused(ctx: AgentContext, task_id: str, state: str, error) -> None:
    """Arkindex refused the final state: find the one it accepts, so that the task ends."""
    current = ctx.arkindex.task_state(task_id)  # raises when unknown: retried
    if current is None or current in ARKINDEX_TERMINAL_STATES:
        note_task(
            ctx,
            task_id,
            f"Arkindex refused `{state}` ({error.detail}); the task is "
            f"already {current or 'gone'} there",
            "WARNING",
        )
        return
    fallback = "stopped" if current == "stopping" else "error"
    note_task(
        ctx,
        task_id,
        f"Arkindex refused `{state}` ({error.detail}) while the task is "
        f"{current}; reporting `{fallback}` instead",
        "WARNING",
    )
    try:
        if ctx.arkindex.update_state(task_id, fallback):
            note_task(ctx, task_id, f"reported `{fallback}` to Arkindex")
    except TransitionRefused as second:
        logger.error("task %s: Arkindex refused `%s` too: %s", task_id, fallback, second.detail)


@step(StepName.DESTROY_INSTANCE)
def destroy_instance(ctx: AgentContext, task_id: str) -> Next | None:
    """Destroy the task's instance (its state is on Arkindex already), close the record,
    and publish a log that could not be published earlier."""
    record = ctx.store.get(task_id)
    if record is None or record.phase != Phase.DESTROYING or not record.final_reported:
        return None
    if record.kept_instance_id is not None:  # a failed attempt's trace, if still kept
        _destroy(ctx, record.kept_instance_id)
    if record.instance_id is not None and not record.instance_destroyed:
        gone_before = not _destroy(ctx, record.instance_id)
        note_task(
            ctx,
            task_id,
            f"instance {record.instance_id} "
            + ("was already gone" if gone_before else "destroyed"),
        )
    # A log that could not be published is marked pending in the same change that closes
    # the record: a worker killed right after still leaves it to the sync loop.
    pending = record.publish_failures >= ctx.settings.publish_tries
    closed = ctx.store.cas(
        task_id,
        expect_phase=Phase.DESTROYING,
        expect_attempt=record.attempt,
        phase=Phase.DONE,
        instance_destroyed=True,
        kept_log_pending=pending,
        heartbeat_at=ctx.now(),
    )
    if closed and record.instance_id is not None and record.ended_at is not None:
        # Measured once (the CAS succeeds once): how long the ended task's instance billed.
        ctx.metric_store.observe(END_TO_DESTROY, ctx.now() - record.ended_at)
    if pending:
        _publish_kept_log(ctx, record)
    else:
        _publish_last_lines(ctx, record)
    ctx.arkindex.forget(task_id)
    return None


def _read_log_again_in(
    ctx: AgentContext, record: TaskRecord, now: float, what: str
) -> float | None:
    """A log that could not be read is read again, with backoff, until log_read_deadline
    after the first failed read: the delay before the next read, or None once the deadline
    has passed (then the caller decides, saying why). `what` names the log in the note."""
    settings = ctx.settings
    since = record.log_unread_since or now
    waited = now - since
    if waited >= settings.log_read_deadline:
        return None
    if record.log_unread_since is None:
        note_task(
            ctx,
            record.task_id,
            f"{what} could not be read; keeping the instance and reading it again "
            f"(up to {settings.log_read_deadline:g} s)",
            "WARNING",
        )
    ctx.store.touch(
        record.task_id, expect_attempt=record.attempt, log_unread_since=since, heartbeat_at=now
    )
    return min(max(settings.watch_interval, waited / 2), 60.0)


def _stop_while_waiting(ctx: AgentContext, record: TaskRecord) -> None:
    """A stopped task whose log must still be read: stop its instance now (the command ends,
    its log stays, only storage bills) rather than let it run while the log is awaited."""
    _stop_instance(ctx, record, "while waiting for its log")


def _stop_instance(ctx: AgentContext, record: TaskRecord, when: str) -> None:
    """Stop the task's instance (the GPU stops billing); a failure is only logged."""
    try:
        ctx.vast.stop_instance(record.instance_id)
    except VastError as error:  # gone, or unreachable: the destroy that follows settles it
        logger.warning(
            "task %s: could not stop instance %s %s: %s",
            record.task_id,
            record.instance_id,
            when,
            error.msg,
        )


@step(StepName.PUBLISH_KEPT_LOG)
def publish_kept_log(ctx: AgentContext, task_id: str) -> None:
    """Try again to publish a done task's final log that could not be published (the sync
    loop resumes this while the record says it is pending)."""
    record = ctx.store.get(task_id)
    if record is None or record.phase != Phase.DONE or not record.kept_log_pending:
        return None
    _publish_kept_log(ctx, record)
    return None


def _publish_kept_log(ctx: AgentContext, record: TaskRecord) -> None:
    """One more try at a final log that could not be published (it stays kept otherwise)."""
    task_id = record.task_id
    instance_log = ctx.store.ended_log(task_id, record.attempt)
    try:
        ctx.arkindex.forget(task_id)  # a fresh definition: a fresh pre-signed URL
        definition = ctx.arkindex.task_definition(task_id)
        text = build_task_log(
            ctx.logbook.lines(task_id), instance_log or "", _log_secrets(ctx, task_id, definition)
        )
        ctx.arkindex.upload_logs(definition.s3_logs_put_url, text)
    except TaskGone:
        ctx.store.drop_ended_log(task_id, record.attempt)  # nowhere to publish it any more
        ctx.store.touch(task_id, kept_log_pending=False)
        return
    except ArkindexError as error:
        logger.error(
            "task %s: the kept log still cannot be published (%s); its instance "
            "log stays in Redis for %g s and is tried again",
            task_id,
            error,
            ctx.settings.unpublished_log_ttl,
        )
        ctx.store.touch(task_id, heartbeat_at=ctx.now())  # the sync loop tries again later
        return
    ctx.store.touch(task_id, kept_log_pending=False, logs_published_at=ctx.now())
    ctx.store.drop_ended_log(task_id, record.attempt)
    logger.info("task %s: the kept log is published", task_id)


@step(StepName.STOP_TASK)
def stop_task(ctx: AgentContext, task_id: str, has_record: bool = True) -> Next | None:
    """stop_task: publish the logs, destroy the instance, report `stopped`."""
    now = ctx.now()
    if not has_record:
        ctx.store.create_if_absent(
            TaskRecord.new(
                task_id,
                now,
                phase=Phase.FINISHING,
                final_state="stopped",
                stop_requested=True,
                reason="stopped by a user before it started",
            )
        )
        note_task(ctx, task_id, "stop requested by Arkindex")
        return Next(StepName.PUBLISH_LOGS)
    record = ctx.store.get(task_id)
    if record is None or record.phase in (Phase.DONE,):
        return None
    if record.phase in (Phase.FINISHING, Phase.DESTROYING):
        ctx.store.touch(task_id, stop_requested=True)
        return None
    # Serialise with a create in flight, so its instance is known (or none was made).
    lock = ctx.store.create_lock(task_id, timeout=ctx.settings.create_lock_timeout)
    if not lock.acquire():
        return None  # the next sync re-sends the stop once the create is done
    try:
        record = ctx.store.get(task_id)
        if record is None or record.phase in (Phase.FINISHING, Phase.DESTROYING, Phase.DONE):
            return None
        if ctx.store.cas(
            task_id,
            expect_phase=record.phase,
            expect_attempt=record.attempt,
            phase=Phase.FINISHING,
            stop_requested=True,
            final_state="stopped",
            reason="stopped by a user",
            heartbeat_at=now,
        ):
            note_task(ctx, task_id, "stop requested by Arkindex: stopping the task")
            return Next(StepName.PUBLISH_LOGS)
    finally:
        release(lock)
    return None


@step(StepName.ADOPT_INSTANCE)
def adopt_instance(ctx: AgentContext, task_id: str, **fields) -> Next | None:
    """Take back an instance of ours that no record knows, if its task is still ours."""
    step = AdoptInstance(task_id=task_id, **fields)
    try:
        state = ctx.arkindex.task_state(step.task_id)
    except ArkindexError as error:
        # Unknown is not inactive: keep the instance; the next sync plans the adoption again.
        logger.warning(
            "cannot check task %s before adopting instance %s (%s); keeping it and trying again",
            step.task_id,
            step.instance_id,
            error,
        )
        return None
    if state not in ARKINDEX_ACTIVE_STATES:
        _destroy(ctx, step.instance_id)
        logger.warning(
            "destroyed instance %s: task %s is %s on Arkindex",
            step.instance_id,
            step.task_id,
            state,
        )
        return None
    now = ctx.now()
    snapshot = ctx.store.load_snapshot()
    instance = snapshot.find(step.instance_id) if snapshot is not None else None
    values = dict(
        phase=Phase.LOADING,
        attempt=step.attempt,
        label=step.label,
        instance_id=step.instance_id,
        instance_created_at=now,
        heartbeat_at=now,
        adopted=True,
        running_since=None,
        start_status=None,
        progress_at=None,
        log_unread_since=None,
        # An image run unwrapped (no wrapper in its onstart) is judged by how it ends, as
        # when it was created; unknown (not in the snapshot) counts as wrapped.
        inferred=instance is not None
        and not is_wrapped(
            instance.raw.get("onstart"), instance.raw.get("image_args") or instance.raw.get("args")
        ),
    )
    if step.from_phase is None:
        done = ctx.store.create_if_absent(TaskRecord.new(step.task_id, now, **values))
    else:
        done = (
            ctx.store.cas(
                step.task_id,
                expect_phase=step.from_phase,
                expect_attempt=step.from_attempt,
                **values,
            )
            is not None
        )
    if not done:
        return None
    if state == "running":
        ctx.reported.mark(step.task_id, "running")  # Arkindex has it: never send it again
    note_task(ctx, step.task_id, f"re-adopted instance {step.instance_id} ({step.label})")
    if state == "stopping":
        return Next(StepName.STOP_TASK, kwargs={"has_record": True})
    return Next(StepName.WATCH)


@step(StepName.DESTROY_UNWANTED)
def destroy_unwanted(ctx: AgentContext, task_id: str, **fields) -> None:
    """Destroy an instance of ours that no task wants (reconcile.DestroyInstance)."""
    step = DestroyInstance(task_id=task_id, **fields)
    gone = not _destroy(ctx, step.instance_id)
    ctx.store.count_destroyed(step.cause, 0 if gone else 1)
    logger.warning(
        "instance %s (%s) %s: %s",
        step.instance_id,
        step.label,
        "was already gone" if gone else "destroyed",
        step.reason,
    )
