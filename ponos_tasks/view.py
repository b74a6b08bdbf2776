"""The flat instance view: this agent's instances kept in Redis, refreshed by a few filtered
list calls per sync instead of a full listing (`vast_api.instance_reads: flat`).

Each refresh (single-flight, under the snapshot lock) makes, in this order:

1. A: `actual_status neq running` and `id gte <lowest>`: every instance whose stored status
   is not running (SQL semantics: a null status is not listed), from the lowest id among the
   view's entries, the records' instances and the *create floors* (`a_from`). A vouches for
   the entries and the records' instances (B reads what A did not list); a create floor is
   the highest id any listing had shown when a create was sent, kept for
   `create_floor_seconds`: the instance of a create whose answer was lost (or whose worker
   died) is above it, so A brings it into the view while it is not running, even once its
   task was stopped and no record names it (plan() then destroys it), instead of leaving
   it to the full resync. Ids grow with creation time: the bound leaves out another user's
   stopped instances older than all of these, which an account keeps for their disk and a
   plain `neq` would page through every sync. Nothing to vouch for: no A. An instance
   that exits, is stopped (its own stop, a user's, an outbid: the host daemon carries the
   stop out and reports the container exited/stopped a few seconds after `intended_status`
   changed) or fails to start leaves `running` and shows here at the next refresh. No
   separate `intended_status` call: an instance whose intended status is stopped but whose
   container still runs is in the stop's few seconds (seen at the refresh after), or on a
   host that stopped reporting (seen by the full resync, as an offline host is); one call
   fewer keeps a steady sync at 3 calls for 1000 instances.
   A comes first: the sync (loop.sync, through steps.refresh_view) wakes the watchers of
   the ended instances it lists at once, before the pass's rate-limited pages and the rest
   of the sync.
2. K pages of the *full resync*: a cursor walks the account's instances in id order, one v1
   page (25 ids) per call, `id gt <cursor>`; K is chosen so that a whole pass takes at most
   `full_resync_interval` (all of it while no pass has ever completed: a fresh view decides
   nothing on absence until then; the rest of a pass at once when the next refresh would
   come after its deadline, as when the listing grew since the last pass sized K). A page
   that covers the ids (cursor, highest] (or every id above the cursor, for the last page)
   lists every instance there: the view's entries in that range that it does not list are
   removed, and that is the ONLY way an entry leaves the view on absence; apart from it,
   only the agent's own destroy (a positive fact: Vast.ai said destroyed or not found) and
   a listing that shows the id under a label not ours (renamed by a user: no longer ours,
   as a full listing would say) remove one.
3. B: `id in [...]` (IDS_PER_CALL ids a call: a query string has a length limit) for the
   ids that A cannot vouch for: entries of the view not running and not listed by A (a
   loading instance that became running, a null status that became loading, an offline
   one, one a page listed after A as not running: it left running in between, or
   entered the view then), and the instances of the agent's records that the view does not
   hold yet (created since the last refresh, or still hidden by Vast.ai's read lag). Empty
   in a steady state: no call.

Between two refreshes, the ended check (loop.check_ended, twice a sync interval) makes A
alone under the same lock and writes what it lists as a refresh's A would: an instance that
ends is seen within half a sync interval, not one (the watcher woken at once acts on it). It
removes nothing and moves no cursor: presence and absence stay the refreshes' business.

At steady state a refresh costs A + K calls whatever the fleet's size N; B appears only
while instances start. Left: another user's instances kept stopped and created after this
agent's oldest live instance are still listed by A (label prefixes have no server-side
operator), a page more per 25 of them. The sync then reads the whole view for plan(), the
meter and the status; a watcher reads only its own instance's entry (one hash field),
never the fleet.

Why no decision taken on this view is one a full listing would contradict:
- Presence and status: every entry is what one listing (filtered or full) returned, at a
  time no earlier than the previous refresh for any instance that is not `running`: A lists
  every non-running instance each refresh and B re-reads every entry that left A. The
  statuses the agent acts on (exited, stopped, loading, null, offline) are thus at most one
  refresh old, as with a full listing each sync. A `running` entry can be older only when
  its stored status is still running, i.e. nothing to act on (a host gone offline keeps its
  stored status, so it is seen by the full resync, within full_resync_interval, as is a
  vanished instance: the bound below).
- Absence ("gone"): decided only when a full-resync page covered the instance's id at least
  `visibility_grace` after the instance was created (`absence_seen_at`), never from A or B
  (a filtered call says nothing about what it does not list; a refused or failing one
  raises and the view keeps what it had). The watcher then still asks for the instance by id
  before calling it gone, as with a full listing.
- A refused filtered call (a 400: the API no longer takes `select_filters`) is a positive
  fact about the API, not about any instance: the caller (steps.refresh_view) reads full
  listings for a while, which need no filter, and the view keeps what it had meanwhile; back
  to flat, A and B re-read everything not running and the full pass removes what vanished.
- Bound: an instance that vanishes behind the agent's back leaves the view at the latest one
  full pass after it vanished: `full_resync_interval` + one sync interval. Until then the
  budget's meter charges it as alive: an overcount, the safe side of a spending limit.
"""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, replace

from .models import Instance

PAGE_SIZE = 25
NOT_RUNNING = {"actual_status": {"neq": "running"}}


def not_running_from(lowest: int) -> dict:
    """A's filter: the instances not running whose id is `lowest` or above."""
    return {**NOT_RUNNING, "id": {"gte": int(lowest)}}


def a_from(
    entry_ids: Iterable[int], record_ids: Iterable[int], floors: Iterable[int] = ()
) -> int | None:
    """The lowest id A must cover: the entries', the records' and, above each recent create
    floor, the instance that create may have made."""
    return min([*entry_ids, *record_ids, *(f + 1 for f in floors)], default=None)


def create_floor_seconds(full_resync_interval: float, visibility_grace: float) -> float:
    """How long a create floor bounds A: until a full pass that started after the create's
    instance became visible has listed it (it is then an entry, or gone)."""
    return 2 * full_resync_interval + visibility_grace


# B's ids go in the query string: a burst of starts could make it longer than a front proxy
# takes (8 KB for nginx). 100 ids is about 1.3 KB encoded, and costs no call more than the
# 25-row pages they are read in anyway.
IDS_PER_CALL = 100


@dataclass(frozen=True)
class PassState:
    """Where the full resync stands, and the evidence it gives about absence."""

    cursor: int = 0  # the highest id covered by the pass in progress
    started_at: float | None = None  # when the pass in progress listed its first page
    done_started_at: float | None = None  # when the last complete pass listed its first page
    pages_done: int = 0  # pages of the pass in progress
    last_pass_pages: int | None = None  # pages of the last complete pass
    refreshed_at: float = 0.0  # when the last refresh began (agent clock)
    a_from: int | None = None  # the ended check's lower bound of A (None: no A)
    highest_seen: int = 0  # the highest id a refresh's listings showed (a create floor)

    def covered_at(self, instance_id: int) -> float | None:
        """The latest time (a lower bound) at which a full page covered this id; None when
        no full page has ever covered it."""
        if self.started_at is not None and instance_id <= self.cursor:
            return self.started_at
        return self.done_started_at

    def absence_seen_at(self, instance_id: int, created_at: float, grace: float) -> float | None:
        """When a full listing covered the id long enough after the create that not being
        listed means gone; None when no such listing yet (absent is then not gone)."""
        covered = self.covered_at(instance_id)
        return covered if covered is not None and covered >= created_at + grace else None

    def pages_this_refresh(
        self, every: float, full_resync_interval: float, now: float | None = None
    ) -> int:
        """Pages to list now so that a whole pass takes at most full_resync_interval when a
        refresh comes every `every` seconds; unbounded (one whole pass) before the first.
        The spread is sized on the last pass: a pass in progress whose next refresh would
        come after its deadline (the listing grew since, e.g. a user of the account rented
        many instances) is finished now, so that the bound does not stretch with the fleet."""
        if self.done_started_at is None or self.last_pass_pages is None:
            return 1_000_000
        if (
            now is not None
            and self.started_at is not None
            and now + every > self.started_at + full_resync_interval
        ):
            return 1_000_000
        refreshes = max(1, math.floor(full_resync_interval / max(every, 1e-6)))
        return max(1, math.ceil(self.last_pass_pages / refreshes))

    def to_json(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    def from_json(cls, raw: str | bytes | None) -> PassState:
        if raw is None:
            return cls()
        data = json.loads(raw)
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})


def ended_check_due(since_refresh: float, sync_interval: float) -> bool:
    """Whether the ended check (loop.check_ended) is worth its call `since_refresh` s after
    the last refresh began: midway between two refreshes, not right after one (its A is that
    fresh) nor right before the next (whose A comes at once); every time once refreshes are
    late (the sync fails or is held up), when it is the only look at ended instances."""
    quarter = sync_interval / 4
    return quarter <= since_refresh <= 3 * quarter or since_refresh > 5 * quarter


def page_removals(entry_ids: Iterable[int], after: int, highest: int | None, listed) -> set[int]:
    """Entries a full page proves gone: in the range it covers, not listed by it."""
    listed_ids = {i.id for i in listed}
    return {
        i
        for i in entry_ids
        if i > after and (highest is None or i <= highest) and i not in listed_ids
    }


def to_check(entries: Mapping[int, Instance], listed_by_a: set[int], record_ids: set[int]):
    """B's ids: entries not running that A did not list, and record ids the view lacks."""
    stale = {i for i, inst in entries.items() if inst.actual_status != "running"}
    missing = {i for i in record_ids if i not in entries}
    return sorted((stale | missing) - listed_by_a)


def keep_listed(store, prefix: str, entries: dict[int, Instance], listed, at: float) -> list:
    """Write what one listing returned into the view (and `entries`, the caller's copy);
    return the instances of ours it listed.

    Every call lists the account's instances (our label prefix has no server-side operator):
    only this agent's are kept. An entry listed under another label (a user renamed it) is no
    longer ours: it leaves the view, as it left a full listing, so that the watcher asks for
    it by id instead of trusting its last entry forever."""
    mine = [i for i in listed if (i.label or "").startswith(prefix)]
    renamed = {i.id for i in listed if i.id in entries} - {i.id for i in mine}
    store.drop_view_entries(renamed)
    for i in renamed:
        entries.pop(i, None)
    store.put_view_entries(mine, at)
    entries.update({i.id: i for i in mine})
    return mine


def list_not_running(ctx) -> list[Instance]:
    """A alone, between two refreshes (the ended check, loop.check_ended; the caller holds
    the snapshot lock): what it lists goes into the view as a refresh's A would. Only
    entries of the listed ids are read back (renamed ones leave): a fleet's worth of entries
    is not read for the few instances that are not running."""
    store, prefix = ctx.store, ctx.label_prefix()
    lowest = store.load_view_meta().a_from
    if lowest is None:
        return []  # the last refresh had nothing to vouch for; an instance since is B's
    at = ctx.now()
    listed = ctx.vast.list_instances(select_filters=not_running_from(lowest))
    entries = store.view_entries_of([i.id for i in listed])
    return keep_listed(store, prefix, entries, listed, at)


def refresh(ctx, every: float, record_ids: set[int], seen_not_running=None) -> PassState:
    """One refresh (the caller holds the snapshot lock): A, full-resync pages, then B.

    A comes first, and `seen_not_running` (if given) is called with what it listed before
    the pages are read: an instance that ended is acted on without waiting for the pass's
    rate-limited pages (2 calls, 2.2 s at Vast.ai's list interval, at 1000 instances) nor
    the rest of the sync, as the ended check acts on its own A."""
    store, vast, prefix = ctx.store, ctx.vast, ctx.label_prefix()
    state = store.load_view_meta()
    started = ctx.now()
    entries = store.view_entries()

    top_seen = state.highest_seen

    def keep(instances: list[Instance], at: float) -> list[Instance]:
        nonlocal top_seen
        top_seen = max([top_seen, *(i.id for i in instances)])
        return keep_listed(store, prefix, entries, instances, at)

    settings = ctx.settings
    keep_for = create_floor_seconds(settings.full_resync_interval, settings.visibility_grace)
    # A's bound from the entries before the pages: an entry a page brings in below it (an
    # instance of ours the view lacked) is not vouched for by A, so B reads it (to_check).
    lowest = a_from(entries, record_ids, store.create_floors(since=started - keep_for))
    not_running = []
    if lowest is not None:
        at = ctx.now()
        not_running = vast.list_instances(select_filters=not_running_from(lowest))
        mine = keep(not_running, at)
        if seen_not_running is not None:
            seen_not_running(mine)

    budget = state.pages_this_refresh(every, settings.full_resync_interval, started)
    for _ in range(min(budget, 10_000)):
        at = ctx.now()
        listed, highest = vast.list_page_after(state.cursor)
        gone = page_removals(entries, state.cursor, highest, listed)
        store.drop_view_entries(gone)
        for i in gone:
            entries.pop(i, None)
        keep(listed, at)
        pass_start = state.started_at if state.started_at is not None else at
        if highest is None:
            state = replace(
                state,
                cursor=0,
                started_at=None,
                done_started_at=pass_start,
                pages_done=0,
                last_pass_pages=state.pages_done + 1,
            )
            if budget >= 1_000_000:
                break  # a whole (first) or finished (late) pass: enough for this refresh
        else:
            state = replace(
                state, cursor=highest, started_at=pass_start, pages_done=state.pages_done + 1
            )
        store.save_view_meta(state)  # each page's evidence is kept even if a later call fails
    ids = to_check(entries, {i.id for i in not_running}, record_ids)
    for start in range(0, len(ids), IDS_PER_CALL):
        at = ctx.now()
        chunk = ids[start : start + IDS_PER_CALL]
        keep(vast.list_instances(select_filters={"id": {"in": chunk}}), at)
    # The ended check's bound: this refresh's entries now, those the pages brought in too.
    check_from = a_from(entries, record_ids, store.create_floors(since=started - keep_for))
    state = replace(state, refreshed_at=started, a_from=check_from, highest_seen=top_seen)
    store.save_view_meta(state)
    return state
