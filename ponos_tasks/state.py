"""The agent's memory in Redis: every key it uses, and the only code that reads or writes them.

Every key name comes from `Keyspace` (prefix default "ponos:", the only copy of that default);
the stores below, `ratelimit.RedisRateLimiter` and `metric_store.MetricStore` (which get their
keys from the keyspace) are the only code that touches Redis. Layout, under the prefix:

    key                              type     TTL        what
    task:<id>                        hash     none while active; `tombstone_ttl` once done
                                                         one field per TaskRecord attribute (JSON)
    tasks:active                     set      none       ids of the records not done
    tasks:done                       zset     none       id -> tombstone expiry (pruned on read)
    snapshot                         string   none       JSON Snapshot: the latest instance list
    last_sync                        string   none       agent time of the last sync that ran
    sync:report                      string   none       JSON: what the last sync asked Arkindex
                                                         for (capacity) and why accepted tasks
                                                         wait (for `status`)
    counters:destroyed               hash     none       cause -> instances the sync destroyed
    machines:avoided                 zset     none       machine id -> end of its cooldown
                                                         (pruned on read)
    machines:start_failures          zset     none       "<machine>:<time>:<nonce>" -> time of a
                                                         failed start (pruned to a day on write)
    image:hosts:<image>              zset     image_cache_seconds  machine id -> last time an
                                                         instance of the image ran there
    image:runs:<image>               list     30 days    the image's last 20 run times, s
    endlog:<id>:<attempt>            string   1 h        the ended instance's log that decided
                                                         the outcome (kept for the final upload
                                                         and the log's last lines after the
                                                         destroy; 7 days when that upload gave up)
    tasklog:<id>, tasklog:<id>:dropped  list/int 14 days  the agent's own lines about a task
    instkeys:<id>                    hash     14 days    attempt -> the instance's own API key
                                                         (secret: redacted from its log)
    once:<name>                      string   given      SET NX claims: enqueue de-duplication,
                                                         offer claims (once:offer:<offer id>)
    messages:seq                     string   none       number of the last chain message sent
    sent:<id>                        hash     24 h       step -> number of the last message of
                                                         that step sent for the task (sync hold)
    lock:create:<id>, lock:upload:<id>, lock:sync, lock:snapshot
                                     redis-py Locks, expiring after their timeout
    arkindex:agent                   string   none       agent id and tokens (JSON, secret)
    arkindex:agent:lock              Lock     15 s       one token renewal at a time (renewed
                                                         by its holder while it lives)
    arkindex:agent:reported:<id>:<state>, ...:<id>:terminal
                                     string   30 days    states already reported (idempotence)
    imgcfg:<digest>                  string   30 days    an image's Entrypoint/Cmd
    ratelimit:<endpoint>             string   a few s    the shared Vast.ai rate-limit buckets
    spend:epoch                      string   none       agent time the meter began in this Redis
    spend:meter                      hash     none       instance id -> JSON budget.Metered
    spend:day:<YYYY-MM-DD>           string   8 days     $ metered that UTC day
    spend:total                      string   none       $ metered since the meter began
    spend:day:<YYYY-MM-DD>:rebuilt   string   8 days     set when that counter was rebuilt
    spend:task:<id>                  string   14 days    $ metered for the task's instances
    budget:cheapest                  string   10 min     $/h of the cheapest matching offer seen
    metrics:<name>                   hash     none       counters and histograms any process adds
                                                         to, for Prometheus (metric_store.py)

Phase changes are atomic Lua scripts checking (phase, attempt): the attempt number is the
fencing token of the create protocol (README, "How it works"). A record that reaches `done`
stays as a tombstone for `tombstone_ttl` seconds so that a late message cannot start a finished
task again.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, fields
from typing import TYPE_CHECKING, Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import LockError, WatchError
from redis.exceptions import TimeoutError as RedisTimeoutError

from ponos_tasks.budget import Metered, MeterPass
from ponos_tasks.lifecycle import ARKINDEX_TERMINAL_STATES, Phase, check_transition
from ponos_tasks.logs import format_agent_line, level_number
from ponos_tasks.models import SENT_AT_HEADER, SEQ_HEADER, Instance, Snapshot, TaskRecord
from ponos_tasks.view import PassState

if TYPE_CHECKING:  # the client is passed in
    import redis
    from redis.lock import Lock

DEFAULT_PREFIX = "ponos:"


@dataclass(frozen=True)
class Keyspace:
    """Every Redis key name of one agent (see the layout above)."""

    prefix: str = DEFAULT_PREFIX

    def task(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

    @property
    def active(self) -> str:
        return self.prefix + "tasks:active"

    @property
    def done(self) -> str:
        return self.prefix + "tasks:done"

    @property
    def snapshot(self) -> str:
        return self.prefix + "snapshot"

    @property
    def last_sync(self) -> str:
        return self.prefix + "last_sync"

    @property
    def running_count(self) -> str:
        return self.prefix + "running_count"

    @property
    def sync_report(self) -> str:
        return self.prefix + "sync:report"

    @property
    def avoided_machines(self) -> str:
        return self.prefix + "machines:avoided"

    @property
    def start_failures(self) -> str:
        return self.prefix + "machines:start_failures"

    def image_hosts(self, image: str) -> str:
        return f"{self.prefix}image:hosts:{image}"

    def image_runs(self, image: str) -> str:
        return f"{self.prefix}image:runs:{image}"

    @property
    def destroyed_counts(self) -> str:
        return self.prefix + "counters:destroyed"

    def ended_log(self, task_id: str, attempt: int) -> str:
        return f"{self.prefix}endlog:{task_id}:{attempt}"

    def task_log(self, task_id: str) -> str:
        return f"{self.prefix}tasklog:{task_id}"

    def log_read(self, task_id: str, attempt: int, purpose: str) -> str:
        return f"{self.prefix}logread:{task_id}:{attempt}:{purpose}"

    def instance_keys(self, task_id: str) -> str:
        return f"{self.prefix}instkeys:{task_id}"

    def task_log_dropped(self, task_id: str) -> str:
        return f"{self.prefix}tasklog:{task_id}:dropped"

    def once(self, name: str) -> str:
        return f"{self.prefix}once:{name}"

    def sent_marks(self, task_id: str) -> str:
        # Not `queued:<id>`: an agent of 281e277 kept a string there (HSET on it: WRONGTYPE).
        return f"{self.prefix}sent:{task_id}"

    @property
    def message_seq(self) -> str:
        return f"{self.prefix}messages:seq"

    def offer_search(self, digest: str) -> str:
        return f"{self.prefix}offers:search:{digest}"

    def create_lock(self, task_id: str) -> str:
        return f"{self.prefix}lock:create:{task_id}"

    def upload_lock(self, task_id: str) -> str:
        return f"{self.prefix}lock:upload:{task_id}"

    @property
    def sync_lock(self) -> str:
        return self.prefix + "lock:sync"

    @property
    def snapshot_lock(self) -> str:
        return self.prefix + "lock:snapshot"

    @property
    def view(self) -> str:
        return self.prefix + "view:instances"

    @property
    def view_meta(self) -> str:
        return self.prefix + "view:meta"

    @property
    def view_destroyed(self) -> str:
        return self.prefix + "view:destroyed"

    @property
    def view_refused(self) -> str:
        return self.prefix + "view:refused"

    @property
    def view_create_floors(self) -> str:
        return self.prefix + "view:create_floors"

    @property
    def credentials(self) -> str:
        return self.prefix + "arkindex:agent"

    @property
    def credentials_lock(self) -> str:
        return self.prefix + "arkindex:agent:lock"

    def reported(self, task_id: str, state: str) -> str:
        return f"{self.prefix}arkindex:agent:reported:{task_id}:{state}"

    def image_config(self, digest: str) -> str:
        return f"{self.prefix}imgcfg:{digest}"

    def metric(self, name: str) -> str:
        return f"{self.prefix}metrics:{name}"

    @property
    def spend_epoch(self) -> str:
        return self.prefix + "spend:epoch"

    @property
    def spend_meter(self) -> str:
        return self.prefix + "spend:meter"

    def spend_day(self, day: str) -> str:
        return f"{self.prefix}spend:day:{day}"

    @property
    def spend_total(self) -> str:
        return self.prefix + "spend:total"

    def spend_day_rebuilt(self, day: str) -> str:
        return f"{self.prefix}spend:day:{day}:rebuilt"

    def spend_task(self, task_id: str) -> str:
        return f"{self.prefix}spend:task:{task_id}"

    @property
    def cheapest_offer(self) -> str:
        return self.prefix + "budget:cheapest"

    @property
    def ratelimit_prefix(self) -> str:
        return self.prefix + "ratelimit:"

    def pattern(self) -> str:
        """Matches every key of this agent (SCAN MATCH)."""
        return self.prefix + "*"


RECORD_FIELDS = frozenset(f.name for f in fields(TaskRecord)) - {"task_id"}
PHASE_FIELDS = frozenset({"phase", "attempt"})


class StoreError(ValueError):
    pass


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def _ttl_seconds(ttl: float) -> str:
    # EXPIRE is relative, so an injected (fake) clock cannot expire a tombstone at once.
    return str(max(1, int(round(ttl))))


def _encode(changes: Mapping[str, Any]) -> list[str]:
    flat: list[str] = []
    for name, value in changes.items():
        flat += [name, json.dumps(value)]
    return flat


def _decode_hash(task_id: str, raw: Mapping | list) -> TaskRecord | None:
    if isinstance(raw, list):  # HGETALL as returned by a Lua script: flat list
        raw = dict(zip(raw[::2], raw[1::2], strict=True))
    if not raw:
        return None
    # One JSON document of every field, parsed once: each value is JSON (_encode), and one
    # parse of ~50 fields cost a third of what 50 parses did (a sync reads every record).
    data = json.loads(
        "{" + ",".join(f"{json.dumps(_text(k))}:{_text(v)}" for k, v in raw.items()) + "}"
    )
    data["task_id"] = task_id
    return TaskRecord.from_dict(data)


_CAS = """
local cur = redis.call('HMGET', KEYS[1], 'phase', 'attempt')
if not cur[1] then return {'missing'} end
if cur[1] ~= ARGV[1] or cur[2] ~= ARGV[2] then return {'conflict'} end
if #ARGV > 6 then redis.call('HSET', KEYS[1], unpack(ARGV, 7)) end
if ARGV[3] == '1' then
  redis.call('SREM', KEYS[2], ARGV[5])
  redis.call('ZADD', KEYS[3], ARGV[4], ARGV[5])
  redis.call('EXPIRE', KEYS[1], ARGV[6])
end
local result = redis.call('HGETALL', KEYS[1])
table.insert(result, 1, 'ok')
return result
"""

_CREATE = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
redis.call('SADD', KEYS[2], ARGV[1])
return 1
"""

_TOUCH = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
if ARGV[1] ~= '' and redis.call('HGET', KEYS[1], 'attempt') ~= ARGV[1] then return -1 end
redis.call('HSET', KEYS[1], unpack(ARGV, 2))
return 1
"""

_FORGET = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], unpack(ARGV, 4))
redis.call('SREM', KEYS[2], ARGV[1])
redis.call('ZADD', KEYS[3], ARGV[2], ARGV[1])
redis.call('EXPIRE', KEYS[1], ARGV[3])
return 1
"""


class TaskStore:
    """Task records, the instance snapshot, marks, counters and locks of one agent."""

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: Keyspace,
        *,
        clock: Callable[[], float] = time.time,
        tombstone_ttl: float = 3 * 24 * 3600,
    ):
        self.redis = redis_client
        self.keys = keys
        self.clock = clock
        self.tombstone_ttl = tombstone_ttl
        self._active = keys.active
        self._done = keys.done
        self._cas = redis_client.register_script(_CAS)
        self._create = redis_client.register_script(_CREATE)
        self._touch = redis_client.register_script(_TOUCH)
        self._forget = redis_client.register_script(_FORGET)

    def _key(self, task_id: str) -> str:
        return self.keys.task(task_id)

    # ------------------------------------------------------------------ records

    def get(self, task_id: str) -> TaskRecord | None:
        """The record, a done tombstone included; None when unknown (or expired)."""
        return _decode_hash(task_id, self.redis.hgetall(self._key(task_id)))

    def create_if_absent(self, record: TaskRecord) -> bool:
        """Store a new record; False when the task already has one (tombstones included)."""
        if record.phase == Phase.DONE:
            raise StoreError("a record cannot be created done")
        values = record.to_dict()
        task_id = values.pop("task_id")
        created = self._create(
            keys=[self._key(task_id), self._active], args=[task_id, *_encode(values)]
        )
        return created == 1

    def cas(
        self, task_id: str, *, expect_phase: str, expect_attempt: int, **changes: Any
    ) -> TaskRecord | None:
        """Apply `changes` only if the record is still in (expect_phase, expect_attempt).

        Returns the updated record, or None when the record is missing or has moved on (the
        caller lost the race and must not act). A phase change must be allowed by
        lifecycle.TRANSITIONS (TransitionError otherwise); it sets phase_changed_at to the
        clock unless given. Changing to `done` turns the record into a tombstone.
        """
        unknown = set(changes) - RECORD_FIELDS
        if unknown:
            raise StoreError(f"unknown record fields: {sorted(unknown)}")
        expect_phase = Phase(expect_phase).value
        new_phase = Phase(changes.get("phase", expect_phase)).value
        check_transition(expect_phase, new_phase)
        changes["phase"] = new_phase
        if new_phase != expect_phase:
            changes.setdefault("phase_changed_at", self.clock())
            if new_phase == Phase.FINISHING:
                changes.setdefault("ended_at", changes["phase_changed_at"])
        done = new_phase == Phase.DONE
        expire_at = self.clock() + self.tombstone_ttl
        result = self._cas(
            keys=[self._key(task_id), self._active, self._done],
            args=[
                json.dumps(expect_phase),
                json.dumps(int(expect_attempt)),
                "1" if done else "0",
                repr(expire_at),
                task_id,
                _ttl_seconds(self.tombstone_ttl),
                *_encode(changes),
            ],
        )
        if _text(result[0]) != "ok":
            return None
        return _decode_hash(task_id, result[1:])

    def touch(self, task_id: str, *, expect_attempt: int | None = None, **values: Any) -> bool:
        """Update non-phase fields (heartbeat, log size, ...) of an existing record.

        Never creates a record (a late heartbeat cannot resurrect a forgotten task). With
        `expect_attempt`, only when the record is still at that attempt. Returns whether it
        was written.
        """
        bad = set(values) - (RECORD_FIELDS - PHASE_FIELDS)
        if bad:
            raise StoreError(f"touch cannot change {sorted(bad)} (use cas)")
        if not values:
            return self.redis.exists(self._key(task_id)) == 1
        expect = "" if expect_attempt is None else json.dumps(int(expect_attempt))
        return self._touch(keys=[self._key(task_id)], args=[expect, *_encode(values)]) == 1

    def heartbeat(self, task_id: str, *, expect_attempt: int | None = None) -> bool:
        return self.touch(task_id, expect_attempt=expect_attempt, heartbeat_at=self.clock())

    def forget(self, task_id: str, ttl: float | None = None) -> bool:
        """Make the record a done tombstone now, whatever its phase (kept `ttl` seconds)."""
        now = self.clock()
        ttl = self.tombstone_ttl if ttl is None else ttl
        values = {"phase": Phase.DONE.value, "phase_changed_at": now}
        return (
            self._forget(
                keys=[self._key(task_id), self._active, self._done],
                args=[task_id, repr(now + ttl), _ttl_seconds(ttl), *_encode(values)],
            )
            == 1
        )

    def active_ids(self) -> list[str]:
        return sorted(_text(m) for m in self.redis.smembers(self._active))

    def all_records(self, *, include_done: bool = True) -> dict[str, TaskRecord]:
        """Every record (active ones, and done tombstones unless include_done=False)."""
        ids = self.active_ids()
        if include_done:
            self.redis.zremrangebyscore(self._done, "-inf", self.clock())
            ids += sorted(_text(m) for m in self.redis.zrange(self._done, 0, -1))
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hgetall(self._key(task_id))
        records: dict[str, TaskRecord] = {}
        for task_id, raw in zip(ids, pipe.execute(), strict=True):
            record = _decode_hash(task_id, raw)
            if record is not None:
                records[task_id] = record
        return records

    def active_instance_ids(self) -> set[int]:
        """The instances the active records name: one field of each record, not the whole
        record (the flat view's refresh needs only these, each sync)."""
        ids = self.active_ids()
        pipe = self.redis.pipeline(transaction=False)
        for task_id in ids:
            pipe.hget(self._key(task_id), "instance_id")
        values = (json.loads(_text(raw)) for raw in pipe.execute() if raw is not None)
        return {int(value) for value in values if value is not None}

    # ------------------------------------------------------------------ snapshot, marks

    def save_snapshot(self, snapshot: Snapshot) -> None:
        self.redis.set(self.keys.snapshot, json.dumps(snapshot.to_dict(), default=str))

    def load_snapshot(self) -> Snapshot | None:
        raw = self.redis.get(self.keys.snapshot)
        return None if raw is None else Snapshot.from_dict(json.loads(_text(raw)))

    # The flat instance view (view.py): one hash field per instance, so that a watcher reads
    # its own instance only; the full-resync cursor and its evidence beside it.

    def view_entries(self) -> dict[int, Instance]:
        raw = self.redis.hgetall(self.keys.view)
        return {
            int(_text(key)): Instance.from_stored(json.loads(_text(value))["instance"])
            for key, value in raw.items()
        }

    def view_entry(self, instance_id: int) -> Instance | None:
        raw = self.redis.hget(self.keys.view, str(int(instance_id)))
        return None if raw is None else Instance.from_stored(json.loads(_text(raw))["instance"])

    def view_entries_of(self, instance_ids) -> dict[int, Instance]:
        """The view's entries of these ids (those it holds), in one HMGET."""
        ids = [int(i) for i in instance_ids]
        if not ids:
            return {}
        raw = self.redis.hmget(self.keys.view, [str(i) for i in ids])
        return {
            i: Instance.from_stored(json.loads(_text(value))["instance"])
            for i, value in zip(ids, raw, strict=True)
            if value is not None
        }

    def put_view_entries(self, instances, seen_at: float) -> None:
        if instances:
            self.redis.hset(
                self.keys.view,
                mapping={
                    str(i.id): json.dumps(
                        {"seen_at": seen_at, "instance": i.to_dict()}, default=str
                    )
                    for i in instances
                },
            )
            # A listing read before the agent destroyed one of them must not bring it back:
            # looked up after the write, and mark_view_destroyed marks before it drops, so
            # whichever order the two run in, the entry ends up dropped.
            ids = [str(i.id) for i in instances]
            pipe = self.redis.pipeline(transaction=False)
            for i in ids:  # ZSCORE each (ZMSCORE would need Redis 6.2)
                pipe.zscore(self.keys.view_destroyed, i)
            scores = pipe.execute()
            destroyed = [i for i, score in zip(ids, scores, strict=True) if score is not None]
            if destroyed:
                self.redis.hdel(self.keys.view, *destroyed)

    def mark_view_destroyed(self, instance_id: int, at: float, keep_for: float) -> None:
        """The agent destroyed this instance (or Vast.ai said it is not found): no listing
        read before may write it back into the view. Kept `keep_for` s (longer than any
        refresh lasts; an instance id is never reused)."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.view_destroyed, {str(int(instance_id)): at})
        pipe.zremrangebyscore(self.keys.view_destroyed, "-inf", at - keep_for)
        pipe.execute()

    def drop_view_entries(self, instance_ids) -> None:
        if instance_ids:
            self.redis.hdel(self.keys.view, *[str(int(i)) for i in instance_ids])

    def note_create_floor(self, member: str, floor: int, at: float, keep_for: float) -> None:
        """A create is about to be sent: its instance's id will be above `floor` (view.py,
        call A). `member` names the create (task, attempt, offer); kept `keep_for` s."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(self.keys.view_create_floors, {f"{int(floor)}:{member}": at})
        pipe.zremrangebyscore(self.keys.view_create_floors, "-inf", at - keep_for)
        pipe.execute()

    def create_floors(self, since: float) -> list[int]:
        """The floors of the creates sent since `since` (at most the creates of a few
        minutes: bounded by Vast.ai's create interval, not by the fleet)."""
        members = self.redis.zrangebyscore(self.keys.view_create_floors, since, "+inf")
        return [int(m.decode().split(":", 1)[0]) for m in members]

    def load_view_meta(self) -> PassState:
        return PassState.from_json(self.redis.get(self.keys.view_meta))

    def save_view_meta(self, state: PassState) -> None:
        self.redis.set(self.keys.view_meta, state.to_json())

    def refuse_view(self, reason: str, seconds: float) -> None:
        """Vast.ai refused the flat view's filtered calls: full listings for `seconds`."""
        self.redis.set(self.keys.view_refused, reason, px=max(1, int(seconds * 1000)))

    def view_refused(self) -> str | None:
        """Why the flat view is off for now (None: it is on)."""
        raw = self.redis.get(self.keys.view_refused)
        return None if raw is None else _text(raw)

    def mark_synced(self, at: float) -> None:
        self.redis.set(self.keys.last_sync, repr(at))

    def last_sync(self) -> float | None:
        raw = self.redis.get(self.keys.last_sync)
        return None if raw is None else float(_text(raw))

    def save_running_count(self, count: int) -> None:
        """How many tasks ran at the last sync (log_pacing.py paces their log reads by it)."""
        self.redis.set(self.keys.running_count, str(count))

    def running_count(self) -> int:
        raw = self.redis.get(self.keys.running_count)
        return 0 if raw is None else int(_text(raw))

    def save_sync_report(self, report: Mapping[str, Any]) -> None:
        """What the last sync decided that no record shows (see sync_report in steps.py)."""
        self.redis.set(self.keys.sync_report, json.dumps(dict(report)))

    def sync_report(self) -> dict | None:
        raw = self.redis.get(self.keys.sync_report)
        return None if raw is None else json.loads(_text(raw))

    def avoid_machine(self, machine_id: int, seconds: float) -> None:
        """Every task avoids this machine for `seconds` (it failed a start), and the offer
        ranking counts the failure against it for a day."""
        self.count_start_failure(machine_id)
        if machine_id is not None and seconds > 0:
            self.redis.zadd(self.keys.avoided_machines, {str(machine_id): self.clock() + seconds})

    def avoided_machines(self, *, prune: bool = True) -> set[int]:
        """`prune=False` reads without removing the expired entries (explain writes nothing)."""
        now = self.clock()
        if prune:
            self.redis.zremrangebyscore(self.keys.avoided_machines, "-inf", now)
        return {int(m) for m in self.redis.zrangebyscore(self.keys.avoided_machines, now, "+inf")}

    #: How long a failed start counts against its machine in the offer ranking.
    START_FAILURE_MEMORY = 24 * 3600.0
    #: Run times kept per image (their median is the image's expected run time).
    IMAGE_RUNS_KEPT = 20
    IMAGE_RUNS_TTL = 30 * 24 * 3600.0
    #: Machines kept per image (the most recent): a bound on the key's size.
    IMAGE_HOSTS_KEPT = 1000

    def count_start_failure(self, machine_id: int | None) -> None:
        """A start failed on this machine (ranking.py lowers its chance of success)."""
        if machine_id is None:
            return
        now = self.clock()
        key = self.keys.start_failures
        pipe = self.redis.pipeline()
        # A unique member per failure: two at the same instant must count twice.
        pipe.zadd(key, {f"{machine_id}:{now!r}:{uuid.uuid4().hex[:8]}": now})
        pipe.zremrangebyscore(key, "-inf", now - self.START_FAILURE_MEMORY)
        pipe.execute()

    def start_failures(self) -> dict[int, int]:
        """Machine id -> its failed starts within START_FAILURE_MEMORY."""
        since = self.clock() - self.START_FAILURE_MEMORY
        counts: dict[int, int] = {}
        for member in self.redis.zrangebyscore(self.keys.start_failures, since, "+inf"):
            machine = int(_text(member).split(":", 1)[0])
            counts[machine] = counts.get(machine, 0) + 1
        return counts

    def remember_image_host(self, image: str | None, machine_id: int | None, ttl: float) -> None:
        """An instance of `image` ran on this machine now: its host has the image cached."""
        if machine_id is None or not image or ttl <= 0:
            return
        key = self.keys.image_hosts(image)
        pipe = self.redis.pipeline()
        pipe.zadd(key, {str(machine_id): self.clock()})
        pipe.zremrangebyrank(key, 0, -self.IMAGE_HOSTS_KEPT - 1)
        pipe.expire(key, max(1, int(ttl)))
        pipe.execute()

    def image_hosts(self, image: str, ttl: float) -> set[int]:
        """Machines on which an instance of `image` ran within `ttl` seconds."""
        since = self.clock() - ttl
        members = self.redis.zrangebyscore(self.keys.image_hosts(image), since, "+inf")
        return {int(_text(m)) for m in members}

    def remember_run_seconds(self, image: str | None, seconds: float) -> None:
        if not image or seconds < 0:
            return
        key = self.keys.image_runs(image)
        pipe = self.redis.pipeline()
        pipe.lpush(key, repr(float(seconds)))
        pipe.ltrim(key, 0, self.IMAGE_RUNS_KEPT - 1)
        pipe.expire(key, int(self.IMAGE_RUNS_TTL))
        pipe.execute()

    def recent_run_seconds(self, image: str) -> list[float]:
        return [float(_text(v)) for v in self.redis.lrange(self.keys.image_runs(image), 0, -1)]

    def count_destroyed(self, cause: str, amount: int = 1) -> None:
        self.redis.hincrby(self.keys.destroyed_counts, cause, amount)

    def destroyed_counts(self) -> dict[str, int]:
        raw = self.redis.hgetall(self.keys.destroyed_counts)
        return {_text(k): int(v) for k, v in raw.items()}

    def keep_ended_log(self, task_id: str, attempt: int, text: str, ttl: float) -> None:
        """The log that decided an ended instance's outcome, kept for the final upload."""
        self.redis.set(self.keys.ended_log(task_id, attempt), text, ex=max(1, int(ttl)))

    def ended_log(self, task_id: str, attempt: int) -> str | None:
        raw = self.redis.get(self.keys.ended_log(task_id, attempt))
        return None if raw is None else raw.decode("utf-8", errors="replace")

    def drop_ended_log(self, task_id: str, attempt: int) -> None:
        self.redis.delete(self.keys.ended_log(task_id, attempt))

    # A log read in progress (log_reads.py): the result_url asked for and when. Kept here,
    # not in a step's arguments nor in the record (`status --json`): a pre-signed URL.
    def log_read(self, task_id: str, attempt: int, purpose: str) -> dict | None:
        raw = self.redis.get(self.keys.log_read(task_id, attempt, purpose))
        return None if raw is None else json.loads(raw)

    def save_log_read(
        self, task_id: str, attempt: int, purpose: str, read: dict, ttl: float
    ) -> None:
        key = self.keys.log_read(task_id, attempt, purpose)
        self.redis.set(key, json.dumps(read), px=max(1, int(ttl * 1000)))

    def drop_log_read(self, task_id: str, attempt: int, purpose: str) -> None:
        self.redis.delete(self.keys.log_read(task_id, attempt, purpose))

    def running_again(self, task_id: str, attempt: int) -> None:
        """The attempt's instance runs again after an end (Vast.ai restarted its container):
        forget the log asked for at that end (it holds that run's output, never the next
        end's exit marker) and the wake of that end, so that the next end wakes the watch
        too (ended_wake). One DEL."""
        self.redis.delete(
            self.keys.log_read(task_id, attempt, "watch"),
            self.keys.once(ended_wake(task_id, attempt)),
        )

    # The instance's own API key (Vast.ai's `instance_api_key`, CONTAINER_API_KEY inside it)
    # can reach the task's log; kept apart from the record, which `status --json` shows, for
    # as long as the agent's lines (the log can be published again until then).
    INSTANCE_KEYS_TTL = 14 * 24 * 3600

    def remember_instance_key(self, task_id: str, attempt: int, api_key: str | None) -> None:
        if not api_key:
            return
        key = self.keys.instance_keys(task_id)
        pipe = self.redis.pipeline()
        pipe.hset(key, str(attempt), api_key)
        pipe.expire(key, self.INSTANCE_KEYS_TTL)
        pipe.execute()

    def instance_keys(self, task_id: str) -> list[str]:
        """Every attempt's instance key (a task's log may quote an earlier attempt's)."""
        raw = self.redis.hvals(self.keys.instance_keys(task_id))
        return [value.decode() for value in raw]

    # ------------------------------------------------------------------ locks, de-duplication

    def create_lock(self, task_id: str, timeout: float) -> Lock:
        """`lock:create:<task>`: acquire() does not block; it expires after `timeout` s."""
        return self.redis.lock(self.keys.create_lock(task_id), timeout=timeout, blocking=False)

    def sync_lock(self, timeout: float) -> Lock:
        """The single-flight lock of the sync loop (non-blocking, expires after `timeout` s
        unless renewed: see kept_alive; its token is shared with the renewing thread)."""
        return self.redis.lock(
            self.keys.sync_lock, timeout=timeout, blocking=False, thread_local=False
        )

    @contextmanager
    def upload_lock(self, task_id: str, timeout: float, *, wait: bool = True):
        """One log upload of a task at a time. Yields whether it is held: with wait=False it
        may not be; with wait=True, raises redis LockError when it cannot be had in time."""
        lock = self.redis.lock(self.keys.upload_lock(task_id), timeout=timeout)
        held = lock.acquire(blocking=wait, blocking_timeout=timeout if wait else None)
        if wait and not held:
            raise LockError(f"the log upload lock of task {task_id} is held too long")
        try:
            yield held
        finally:
            if held:
                release(lock)

    def new_watch_chain(self, task_id: str) -> int:
        """Start a new watch chain for the task: older chains see another number and stop."""
        # Never creates a record: a late watch cannot resurrect a forgotten task.
        return int(
            self.redis.eval(
                "if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end "
                "return redis.call('HINCRBY', KEYS[1], 'watch_chain', 1)",
                1,
                self.keys.task(task_id),
            )
        )

    def snapshot_lock(self, timeout: float) -> Lock:
        """Held by the one process that lists instances for a late snapshot or refreshes the
        flat view (non-blocking; renewable by kept_alive, whose thread shares its token)."""
        return self.redis.lock(
            self.keys.snapshot_lock, timeout=timeout, blocking=False, thread_local=False
        )

    def once(self, name: str, ttl: float) -> bool:
        """True the first time `name` is claimed within `ttl` seconds (SET NX PX)."""
        return bool(self.redis.set(self.keys.once(name), "1", nx=True, px=max(1, int(ttl * 1000))))

    # Far above any wait in a queue; only bounds a mark nobody reads again.
    QUEUED_TTL = 24 * 3600
    # One round trip: the message's number, and the mark of its (task, step).
    _NOTE_QUEUED = (
        "local seq = redis.call('INCR', KEYS[1]) "
        "redis.call('HSET', KEYS[2], ARGV[1], seq) "
        "redis.call('EXPIRE', KEYS[2], ARGV[2]) "
        "return seq"
    )

    def note_queued(self, task_id: str, step: str) -> int:
        """A message of `step` for this task is about to be sent: its number in the order
        of all chain messages (one counter for every host), noted as the mark of
        (task, step)."""
        return int(
            self.redis.eval(
                self._NOTE_QUEUED,
                2,
                self.keys.message_seq,
                self.keys.sent_marks(task_id),
                step,
                self.QUEUED_TTL,
            )
        )

    def queued_seq(self, task_id: str, step: str) -> int | None:
        """The number of the last message of `step` sent for this task, if known."""
        raw = self.redis.hget(self.keys.sent_marks(task_id), step)
        return None if raw is None else int(raw)

    def oldest_waiting_seq(self, queue: str) -> int | None:
        """The number of the oldest message still waiting in the Celery queue `queue`; None
        when the queue is empty or that message carries none (an older agent's)."""
        seq = self._oldest_waiting_header(queue, SEQ_HEADER)
        return seq if isinstance(seq, int) else None

    def oldest_waiting_sent_at(self, queue: str) -> float | None:
        """When (by its sender's clock) the oldest message still waiting in the Celery queue
        `queue` was sent; None when the queue is empty or the message does not say."""
        sent_at = self._oldest_waiting_header(queue, SENT_AT_HEADER)
        return float(sent_at) if isinstance(sent_at, int | float) else None

    def _oldest_waiting_header(self, queue: str, name: str):
        """A header of the oldest message waiting in `queue`. kombu's Redis transport keeps a
        queue as a list under the queue's name, pushed on the left and popped on the right:
        the oldest message is the last element."""
        raw = self.redis.lindex(queue, -1)
        if raw is None:
            return None
        try:
            return json.loads(raw)["headers"].get(name)
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def claimed(self, name: str) -> bool:
        """Whether `name` is claimed (by `once`) right now."""
        return self.redis.exists(self.keys.once(name)) == 1

    def load_offer_search(self, digest: str) -> list[dict] | None:
        """The offers (Vast.ai's rows) a recent search answered for this query, or None."""
        raw = self.redis.get(self.keys.offer_search(digest))
        return None if raw is None else json.loads(raw)

    def save_offer_search(self, digest: str, rows: list[dict], ttl: float) -> None:
        self.redis.set(self.keys.offer_search(digest), json.dumps(rows), px=max(1, int(ttl * 1000)))

    #: How long an instance stays marked a stray (created stopped, being destroyed).
    STRAY_TTL = 24 * 3600.0

    def mark_stray(self, instance_id: int) -> None:
        """An instance created stopped that the create step is destroying: never the
        task's instance, even when its destroy fails and the step's retry finds it by label."""
        self.redis.set(self.keys.once(f"stray:{instance_id}"), "1", px=int(self.STRAY_TTL * 1000))

    def is_stray(self, instance_id: int) -> bool:
        return bool(self.redis.exists(self.keys.once(f"stray:{instance_id}")))


def ended_wake(task_id: str, attempt: int) -> str:
    """The `once` name of the wake of a watch at its instance's end (steps, once per run)."""
    return f"ended:{task_id}:{attempt}"


# After a renewal that failed, how soon the renewer tries again (until the lock's timeout,
# counted from its last renewal, has passed).
RENEW_RETRY_SECONDS = 0.5


@contextmanager
def kept_alive(lock: Lock, every: float):
    """Renew a held `lock` to its full timeout every `every` s while the block runs (redis-py
    renews nothing by itself): the lock lives exactly as long as its holder's process, so a
    long run keeps it, and a holder killed with SIGKILL frees it within one timeout instead of
    within the longest run allowed. The lock must not be thread-local.

    A renewal that fails for any reason but a lost token (Redis unreachable, restarting,
    demoted to a replica, busy) is tried again every RENEW_RETRY_SECONDS, not at the next
    tick: waiting a whole `every` would let an outage over two ticks expire a lock that the
    rest of its timeout could have kept. The lock is lost only when its token is gone or its
    timeout has passed since the last renewal; that is logged (another may hold it now)."""
    stop = threading.Event()
    log = logging.getLogger(__name__)

    def renew() -> None:
        expires = time.monotonic() + lock.timeout  # acquired (or renewed) just before
        wait = every
        while not stop.wait(wait):
            try:
                lock.reacquire()
            except LockError:  # the token is gone (expired, Redis emptied): another may hold it
                log.warning("lock %s was lost while held", lock.name)
                return
            except Exception as error:  # any other failure: the lock may still be ours
                if time.monotonic() >= expires:
                    log.warning(
                        "lock %s expired while it could not be renewed (%s)", lock.name, error
                    )
                    return
                wait = RENEW_RETRY_SECONDS
                continue
            expires = time.monotonic() + lock.timeout
            wait = every

    renewer = threading.Thread(target=renew, name=f"renew {lock.name}", daemon=True)
    renewer.start()
    try:
        yield lock
    finally:
        stop.set()
        renewer.join(timeout=every)


def release(lock: Lock, *, retry_for: float = 15.0) -> None:
    """Release a lock that may have expired meanwhile (then another holder may have it now,
    and there is nothing to undo). Through a Redis blip it tries again for up to `retry_for`
    seconds: a lock left behind (a Redis with AOF brings it back) would stall its work —
    every sync, for the sync lock — until it expires."""
    deadline = time.monotonic() + retry_for
    # redis-py's Lock.release() forgets its token before the call that may fail: keep it, so
    # that a retry still releases (do_release is the part that talks to Redis).
    token = lock.local.token
    if token is None:
        return
    lock.local.token = None
    while True:
        try:
            lock.do_release(token)
            return
        except (RedisConnectionError, RedisTimeoutError):
            if time.monotonic() >= deadline:
                logging.getLogger(__name__).warning(
                    "could not release lock %s (Redis unreachable); it expires by itself",
                    lock.name,
                )
                return
            time.sleep(0.5)
        except Exception:
            logging.getLogger(__name__).debug("lock %s had expired", lock.name)
            return


# --------------------------------------------------------------------------- small stores


class BudgetStore:
    """The spend meter (budget.py does the arithmetic): per UTC day, per task, per instance.

    Only the sync loop meters (`apply_meter`, under WATCH: a second sync whose lock lapsed
    meters nothing twice); everyone reads."""

    DAY_TTL = 8 * 24 * 3600
    TASK_TTL = 14 * 24 * 3600
    CHEAPEST_TTL = 600

    def __init__(self, redis_client: redis.Redis, keys: Keyspace, tasks: TaskStore):
        self.redis = redis_client
        self.keys = keys
        self.tasks = tasks  # records and snapshot, for budget.headroom

    def metering(self) -> bool:
        """Whether the meter has begun in this Redis (a read only, for `status`)."""
        return bool(self.redis.exists(self.keys.spend_epoch))

    def epoch(self, now: float) -> tuple[float, bool]:
        """When the meter began in this Redis, and whether it begins now (a new Redis, or
        one that lost its data)."""
        fresh = bool(self.redis.set(self.keys.spend_epoch, repr(now), nx=True))
        return float(_text(self.redis.get(self.keys.spend_epoch) or repr(now))), fresh

    def meter(self) -> dict[int, Metered]:
        raw = self.redis.hgetall(self.keys.spend_meter)
        return {int(k): Metered.from_dict(json.loads(v)) for k, v in raw.items()}

    def metered(self, instance_id: int) -> Metered | None:
        raw = self.redis.hget(self.keys.spend_meter, str(instance_id))
        return None if raw is None else Metered.from_dict(json.loads(raw))

    def apply_meter(self, compute: Callable[[dict[int, Metered]], MeterPass]) -> MeterPass | None:
        """Read the meter, `compute` the pass, write it in one transaction; None when the
        meter changed meanwhile (another sync metered: nothing is counted twice)."""
        with self.redis.pipeline() as pipe:
            try:
                pipe.watch(self.keys.spend_meter)
                raw = pipe.hgetall(self.keys.spend_meter)
                meter = {int(k): Metered.from_dict(json.loads(v)) for k, v in raw.items()}
                result = compute(meter)
                pipe.multi()
                if result.entries:
                    pipe.hset(
                        self.keys.spend_meter,
                        mapping={
                            str(k): json.dumps(m.to_dict()) for k, m in result.entries.items()
                        },
                    )
                if result.gone:
                    pipe.hdel(self.keys.spend_meter, *[str(k) for k in result.gone])
                for day, amount in result.days.items():
                    pipe.incrbyfloat(self.keys.spend_day(day), amount)
                    pipe.expire(self.keys.spend_day(day), self.DAY_TTL)
                if result.days:  # Prometheus' counter: never expires, never goes down
                    pipe.incrbyfloat(self.keys.spend_total, sum(result.days.values()))
                for task_id, amount in result.tasks.items():
                    pipe.incrbyfloat(self.keys.spend_task(task_id), amount)
                    pipe.expire(self.keys.spend_task(task_id), self.TASK_TTL)
                pipe.execute()
            except WatchError:
                return None
        return result

    def spent_total(self) -> float:
        """$ metered since the meter began in this Redis (all days)."""
        raw = self.redis.get(self.keys.spend_total)
        return 0.0 if raw is None else float(_text(raw))

    def spent_on(self, day: str) -> float:
        raw = self.redis.get(self.keys.spend_day(day))
        return 0.0 if raw is None else float(_text(raw))

    def task_spent(self, task_ids: list[str]) -> dict[str, float]:
        if not task_ids:
            return {}
        values = self.redis.mget([self.keys.spend_task(t) for t in task_ids])
        return {t: float(_text(v)) for t, v in zip(task_ids, values, strict=True) if v is not None}

    _AT_LEAST = """
local cur = tonumber(redis.call('GET', KEYS[1]) or '0')
if tonumber(ARGV[1]) > cur then redis.call('SET', KEYS[1], ARGV[1]) end
redis.call('EXPIRE', KEYS[1], ARGV[2])
redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
return 1
"""

    def rebuild_day(self, day: str, spent: float) -> None:
        """The day's counter is at least `spent` from now on, and marked rebuilt."""
        self.redis.eval(
            self._AT_LEAST,
            2,
            self.keys.spend_day(day),
            self.keys.spend_day_rebuilt(day),
            repr(float(spent)),
            str(self.DAY_TTL),
        )

    def rebuilt(self, day: str) -> bool:
        return self.redis.exists(self.keys.spend_day_rebuilt(day)) == 1

    def note_cheapest(self, dph: float | None) -> None:
        """The $/h of the cheapest offer the filters matched in the latest search."""
        if dph is not None:
            self.redis.set(self.keys.cheapest_offer, repr(float(dph)), ex=self.CHEAPEST_TTL)

    def cheapest(self) -> float | None:
        raw = self.redis.get(self.keys.cheapest_offer)
        return None if raw is None else float(_text(raw))


class ReportedStates:
    """Which states were reported per task: the one guard that makes state updates idempotent.

    `claim()` takes a *lease* on (task, state) — and, for a terminal state, on the task's one
    terminal slot — atomically, so that concurrent workers cannot both send a state, nor two
    different terminal states. `confirm()` makes it permanent once Arkindex accepted it;
    `release()` gives it back when the request failed. A worker killed between claim and
    answer leaves only the lease, which lapses after `lease` seconds: the state is then sent
    again (a redelivered report must not find "already reported" for a state never sent).
    `mark()` records a state known to be on Arkindex already (seen when adopting).
    """

    CLAIMED, REPORTED, IN_FLIGHT, OTHER_TERMINAL = (
        "claimed",
        "reported",
        "in_flight",
        "other_terminal",
    )
    _CLAIM = """
local v = redis.call('GET', KEYS[1])
if v == 'pending' then return 'in_flight' end
if v then return 'reported' end
if ARGV[3] == '1' then
  local t = redis.call('GET', KEYS[2])
  if t then
    if t == ARGV[1] then return 'reported' end
    if string.sub(t, 1, 8) == 'pending:' then return 'in_flight' end
    return 'other_terminal'
  end
  redis.call('SET', KEYS[2], 'pending:' .. ARGV[1], 'EX', ARGV[2])
end
redis.call('SET', KEYS[1], 'pending', 'EX', ARGV[2])
return 'claimed'
"""
    _RELEASE = """
if redis.call('GET', KEYS[1]) == 'pending' then redis.call('DEL', KEYS[1]) end
if redis.call('GET', KEYS[2]) == 'pending:' .. ARGV[1] then redis.call('DEL', KEYS[2]) end
return 1
"""

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: Keyspace,
        *,
        lease: int = 120,
        ttl: int = 30 * 24 * 3600,
    ):
        self.redis = redis_client
        self.keys = keys
        # Longer than one state update can take (the client's tries and timeouts).
        self.lease = lease
        self.ttl = ttl  # keys outlive any task by far, then disappear
        self._claim = redis_client.register_script(self._CLAIM)
        self._release = redis_client.register_script(self._RELEASE)

    def _keys(self, task_id: str, state: str) -> list[str]:
        return [self.keys.reported(task_id, state), self.keys.reported(task_id, "terminal")]

    def claim(self, task_id: str, state: str) -> str:
        """CLAIMED (send it now), REPORTED, IN_FLIGHT (another worker's lease) or
        OTHER_TERMINAL (a different terminal state was reported)."""
        terminal = "1" if state in ARKINDEX_TERMINAL_STATES else "0"
        return _text(
            self._claim(keys=self._keys(task_id, state), args=[state, self.lease, terminal])
        )

    def confirm(self, task_id: str, state: str) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.set(self.keys.reported(task_id, state), "done", ex=self.ttl)
        if state in ARKINDEX_TERMINAL_STATES:
            pipe.set(self.keys.reported(task_id, "terminal"), state, ex=self.ttl)
        pipe.execute()

    mark = confirm

    def release(self, task_id: str, state: str) -> None:
        self._release(keys=self._keys(task_id, state), args=[state])

    def terminal(self, task_id: str) -> str | None:
        """The terminal state confirmed as reported, if any."""
        value = self.redis.get(self.keys.reported(task_id, "terminal"))
        value = None if value is None else _text(value)
        return None if value is None or value.startswith("pending:") else value


class RedisCredentialStore:
    """Agent id and tokens as one JSON value, shared by every worker of the agent."""

    # Writes the credentials only while the lock holds the writer's token, or when no
    # credentials are stored at all: a holder whose lock lapsed (stalled past its TTL, Redis
    # out for longer) must not write over what the next holder registered meanwhile.
    _SAVE_IF_HOLDING = """
        if redis.call('get', KEYS[1]) == ARGV[1] or redis.call('exists', KEYS[2]) == 0 then
            redis.call('set', KEYS[2], ARGV[2])
            return 1
        end
        return 0
    """

    def __init__(self, redis_client: redis.Redis, keys: Keyspace):
        self.redis = redis_client
        self.keys = keys
        self._held = threading.local()  # the lock this thread holds, if any
        self._save_if_holding = redis_client.register_script(self._SAVE_IF_HOLDING)

    def load(self) -> dict | None:
        raw = self.redis.get(self.keys.credentials)
        return json.loads(raw) if raw else None

    def save(self, data: dict) -> dict:
        """Store `data` and return it; inside lock(), when the lock was lost and another
        worker stored credentials since, keep theirs and return them instead."""
        token = getattr(self._held, "token", None)
        if token is None:
            self.redis.set(self.keys.credentials, json.dumps(data))
            return data
        keys = [self.keys.credentials_lock, self.keys.credentials]
        if self._save_if_holding(keys=keys, args=[token, json.dumps(data)]):
            return data
        logging.getLogger(__name__).warning(
            "the Arkindex credentials lock lapsed during a renewal; using the credentials "
            "another worker stored meanwhile"
        )
        return self.load() or data

    def clear(self) -> None:
        self.redis.delete(self.keys.credentials)

    # The lock's life without renewal: how long a holder killed with SIGKILL (or one whose
    # release could not reach Redis) keeps the others from registering.
    LOCK_TTL = 15.0
    # How long a worker waits for another's registration or refresh: a few Arkindex calls,
    # each with its retries and timeouts.
    LOCK_WAIT = 90.0

    @contextmanager
    def lock(self):
        # One renewal (refresh or re-registration) at a time across all workers, so that a
        # burst of 401s does not register a dozen agents. Renewed while its holder lives and
        # released through a Redis blip: a lock left behind (brought back by the AOF after a
        # restart) would hold every worker's Arkindex calls for its whole life.
        lock = self.redis.lock(
            self.keys.credentials_lock, timeout=self.LOCK_TTL, thread_local=False
        )
        if not lock.acquire(blocking=True, blocking_timeout=self.LOCK_WAIT):
            raise LockError(f"the Arkindex credentials lock is held over {self.LOCK_WAIT:g} s")
        self._held.token = lock.local.token
        try:
            with kept_alive(lock, every=self.LOCK_TTL / 3):
                yield
        finally:
            self._held.token = None
            release(lock)


class TaskLogBook:
    """Per-task agent lines (any worker can add, the publisher reads them).

    Each task keeps its last `max_lines` entries (a list trimmed on every add) and a count of
    the dropped ones; keys expire `ttl` seconds after the last add.
    """

    def __init__(
        self,
        redis_client: redis.Redis,
        keys: Keyspace,
        *,
        task_format: str,
        max_lines: int = 500,
        ttl: int = 14 * 24 * 3600,
    ):
        self.redis = redis_client
        self.keys = keys
        self.task_format = task_format
        self.max_lines = max_lines
        self.ttl = ttl

    def add(self, task_id: str, level: int | str, message: str, *, created: float | None = None):
        key, dropped_key = self.keys.task_log(task_id), self.keys.task_log_dropped(task_id)
        entry = json.dumps(
            {
                "t": time.time() if created is None else created,
                "level": logging.getLevelName(level_number(level)),
                "msg": str(message),
            }
        )
        pipe = self.redis.pipeline(transaction=True)
        pipe.rpush(key, entry)
        pipe.ltrim(key, -self.max_lines, -1)
        pipe.expire(key, self.ttl)
        length = pipe.execute()[0]
        if length > self.max_lines:
            pipe = self.redis.pipeline(transaction=True)
            pipe.incrby(dropped_key, length - self.max_lines)
            pipe.expire(dropped_key, self.ttl)
            pipe.execute()

    def entries(self, task_id: str) -> tuple[list[dict], int]:
        """The entries ({"t", "level", "msg"}), oldest first, and how many were dropped."""
        pipe = self.redis.pipeline(transaction=True)
        pipe.lrange(self.keys.task_log(task_id), 0, -1)
        pipe.get(self.keys.task_log_dropped(task_id))
        raw_entries, dropped = pipe.execute()
        return [json.loads(raw) for raw in raw_entries], int(dropped or 0)

    def lines(self, task_id: str) -> list[str]:
        """The formatted lines, oldest first (with a note first when some were dropped)."""
        entries, dropped = self.entries(task_id)
        lines = []
        if dropped:
            lines.append(f"[agent] ... {dropped} earlier agent lines dropped ...")
        for entry in entries:
            lines.append(
                format_agent_line(entry["level"], entry["msg"], entry["t"], self.task_format)
            )
        return lines

    def clear(self, task_id: str) -> None:
        self.redis.delete(self.keys.task_log(task_id), self.keys.task_log_dropped(task_id))


class ImageConfigCache:
    """Image configs by digest, shared by every process (registry_client.RegistryClient)."""

    def __init__(self, redis_client: redis.Redis, keys: Keyspace, ttl: int = 30 * 24 * 3600):
        self.redis = redis_client
        self.keys = keys
        self.ttl = ttl

    def get(self, digest: str) -> dict | None:
        raw = self.redis.get(self.keys.image_config(digest))
        return json.loads(raw) if raw else None

    def set(self, digest: str, data: dict) -> None:
        self.redis.set(self.keys.image_config(digest), json.dumps(data), ex=self.ttl)
