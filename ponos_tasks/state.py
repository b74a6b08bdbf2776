"""The agent's working memory in Redis: one record per task, changed by compare-and-set.

Layout (all keys under `prefix`, default "ponos:"):
    task:<id>        hash, one field per TaskRecord attribute, each value JSON-encoded
    tasks:active     set of task ids whose record is not done
    tasks:done       sorted set task id -> tombstone expiry (the record key has the same TTL)
    snapshot         JSON {"taken_at", "instances"}: the latest list of this agent's instances
    agent            JSON identity of this agent (id, short id, ...)
    lock:create:<id> / lock:sync     redis-py Locks
    once:<name>      short SET NX keys (enqueue de-duplication)

Phase changes are atomic Lua scripts checking (phase, attempt): the attempt number is the
fencing token of the create protocol (DESIGN §3, celery-practice §2.3). A record that reaches
`done` stays as a tombstone for `tombstone_ttl` seconds so that a late message cannot start
a finished task again.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import TYPE_CHECKING, Any

from ponos_tasks.lifecycle import Phase, check_transition

if TYPE_CHECKING:  # the client is passed in: importing this module (reconcile does) needs no redis
    import redis
    from redis.lock import Lock


@dataclass
class TaskRecord:
    task_id: str
    phase: str = Phase.ACCEPTED.value
    attempt: int = 0  # 0 until the first create; the label carries it
    label: str | None = None
    offer_id: int | None = None
    machine_id: int | None = None
    instance_id: int | None = None
    gpu_name: str | None = None
    dph_total: float | None = None
    failed_machines: list[int] = field(default_factory=list)  # never rent these again
    attempt_reasons: list[str] = field(default_factory=list)  # why each failed attempt ended
    stop_requested: bool = False
    exit_code: int | None = None
    inferred: bool = False  # image run unwrapped: the exit status is inferred
    final_state: str | None = None  # completed / failed / error / stopped, once decided
    reason: str | None = None
    adopted: bool = False  # re-created from an instance label after memory loss
    accepted_at: float | None = None
    phase_changed_at: float | None = None
    heartbeat_at: float | None = None  # last time a step of the chain worked on it
    waiting_since: float | None = None  # first time no offer matched
    instance_created_at: float | None = None
    running_since: float | None = None
    offline_since: float | None = None
    logs_published_at: float | None = None
    log_size: int = 0
    reported_running: bool = False
    instance_destroyed: bool = False
    final_reported: bool = False

    @classmethod
    def new(cls, task_id: str, now: float, **values: Any) -> TaskRecord:
        values.setdefault("accepted_at", now)
        values.setdefault("phase_changed_at", now)
        return cls(task_id=task_id, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRecord:
        known = {f.name for f in fields(cls)}
        # Unknown keys come from a newer agent version: ignore them rather than crash.
        return cls(**{k: v for k, v in data.items() if k in known})


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
    data = {_text(k): json.loads(_text(v)) for k, v in raw.items()}
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
    """Task records, instance snapshot, identity and locks of one agent in Redis."""

    def __init__(
        self,
        redis_client: redis.Redis,
        prefix: str = "ponos:",
        *,
        clock: Callable[[], float] = time.time,
        tombstone_ttl: float = 3 * 24 * 3600,
    ):
        self.redis = redis_client
        self.prefix = prefix
        self.clock = clock
        self.tombstone_ttl = tombstone_ttl
        self._active = prefix + "tasks:active"
        self._done = prefix + "tasks:done"
        self._cas = redis_client.register_script(_CAS)
        self._create = redis_client.register_script(_CREATE)
        self._touch = redis_client.register_script(_TOUCH)
        self._forget = redis_client.register_script(_FORGET)

    def _key(self, task_id: str) -> str:
        return f"{self.prefix}task:{task_id}"

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
        created = self._create(keys=[self._key(task_id), self._active],
                               args=[task_id, *_encode(values)])
        return created == 1

    def cas(self, task_id: str, *, expect_phase: str, expect_attempt: int,
            **changes: Any) -> TaskRecord | None:
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
        done = new_phase == Phase.DONE
        expire_at = self.clock() + self.tombstone_ttl
        result = self._cas(
            keys=[self._key(task_id), self._active, self._done],
            args=[json.dumps(expect_phase), json.dumps(int(expect_attempt)),
                  "1" if done else "0", repr(expire_at), task_id,
                  _ttl_seconds(self.tombstone_ttl), *_encode(changes)],
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
        return self._forget(keys=[self._key(task_id), self._active, self._done],
                            args=[task_id, repr(now + ttl), _ttl_seconds(ttl),
                                  *_encode(values)]) == 1

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

    # ------------------------------------------------------------------ snapshot, identity

    def save_snapshot(self, instances: Iterable[Mapping[str, Any]], taken_at: float) -> None:
        payload = {"taken_at": taken_at, "instances": [dict(i) for i in instances]}
        self.redis.set(self.prefix + "snapshot", json.dumps(payload, default=str))

    def load_snapshot(self) -> tuple[list[dict], float] | None:
        raw = self.redis.get(self.prefix + "snapshot")
        if raw is None:
            return None
        payload = json.loads(_text(raw))
        return payload["instances"], payload["taken_at"]

    def save_agent_identity(self, identity: Mapping[str, Any]) -> None:
        """Non-secret identity (agent id, short id, farm); tokens belong to arkindex.py's store."""
        self.redis.set(self.prefix + "agent", json.dumps(dict(identity)))

    def load_agent_identity(self) -> dict[str, Any] | None:
        raw = self.redis.get(self.prefix + "agent")
        return None if raw is None else json.loads(_text(raw))

    # ------------------------------------------------------------------ locks, de-duplication

    def create_lock(self, task_id: str, timeout: float) -> Lock:
        """`lock:create:<task>`: acquire() does not block; it expires after `timeout` s."""
        return self.redis.lock(f"{self.prefix}lock:create:{task_id}", timeout=timeout,
                               blocking=False)

    def sync_lock(self, timeout: float) -> Lock:
        """The single-flight lock of the sync loop (non-blocking, expires after `timeout` s)."""
        return self.redis.lock(f"{self.prefix}lock:sync", timeout=timeout, blocking=False)

    def once(self, name: str, ttl: float) -> bool:
        """True the first time `name` is claimed within `ttl` seconds (SET NX PX)."""
        return bool(self.redis.set(f"{self.prefix}once:{name}", "1", nx=True,
                                   px=max(1, int(ttl * 1000))))
