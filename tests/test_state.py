"""TaskStore against the real Redis of tests/conftest.py: CAS, touch, tombstones, locks."""

import multiprocessing
import os
import signal
import threading
import time

import pytest
import redis

from ponos_tasks.lifecycle import TransitionError
from ponos_tasks.models import Instance, Snapshot, TaskRecord
from ponos_tasks.state import Keyspace, RedisCredentialStore, StoreError, TaskStore

TASK = "8c1d2f7e-0a4b-4c3d-9e8f-123456789abc"


class FakeClock:
    def __init__(self, now=1000.0):
        self.now = now

    def __call__(self):
        return self.now


@pytest.fixture
def clock():
    return FakeClock()


@pytest.fixture
def store(redis_client, key_prefix, clock):
    return TaskStore(redis_client, Keyspace(key_prefix), clock=clock, tombstone_ttl=60)


def test_create_get_round_trip(store, clock):
    record = TaskRecord.new(TASK, clock(), failed_machines=[7], dph_total=0.25)
    assert store.create_if_absent(record)
    got = store.get(TASK)
    assert got == record
    assert got.accepted_at == 1000.0 and got.phase == "accepted" and got.attempt == 0
    assert store.active_ids() == [TASK]
    # a second create (a late or duplicated start_task) changes nothing
    assert not store.create_if_absent(TaskRecord.new(TASK, 2000.0, attempt=5))
    assert store.get(TASK).attempt == 0
    assert store.get("unknown") is None


def test_cas_checks_phase_and_attempt(store, clock):
    store.create_if_absent(TaskRecord.new(TASK, clock()))
    clock.now = 1010.0
    updated = store.cas(
        TASK,
        expect_phase="accepted",
        expect_attempt=0,
        phase="creating",
        attempt=1,
        label="ponos-x-1",
        failed_machines=[1, 2],
    )
    assert updated is not None
    assert (updated.phase, updated.attempt, updated.phase_changed_at) == ("creating", 1, 1010.0)
    assert updated.failed_machines == [1, 2]
    assert store.get(TASK) == updated
    # the loser of the race sees None and the record is untouched
    assert (
        store.cas(
            TASK,
            expect_phase="accepted",
            expect_attempt=0,
            phase="creating",
            attempt=1,
            label="other",
        )
        is None
    )
    assert store.cas(TASK, expect_phase="creating", expect_attempt=0, phase="loading") is None
    assert store.get(TASK).label == "ponos-x-1"
    # staying in the phase updates fields without touching phase_changed_at
    clock.now = 1020.0
    same = store.cas(TASK, expect_phase="creating", expect_attempt=1, instance_id=42)
    assert same.instance_id == 42 and same.phase_changed_at == 1010.0
    # unknown task
    assert store.cas("nope", expect_phase="accepted", expect_attempt=0, phase="creating") is None


def test_cas_refuses_forbidden_transitions_and_unknown_fields(store, clock):
    store.create_if_absent(TaskRecord.new(TASK, clock()))
    with pytest.raises(TransitionError):
        store.cas(TASK, expect_phase="accepted", expect_attempt=0, phase="running")
    with pytest.raises(StoreError):
        store.cas(TASK, expect_phase="accepted", expect_attempt=0, colour="red")
    assert store.get(TASK).phase == "accepted"


def test_done_is_a_tombstone(store, clock, redis_client, key_prefix):
    store.create_if_absent(TaskRecord.new(TASK, clock(), phase="destroying", attempt=2))
    done = store.cas(
        TASK,
        expect_phase="destroying",
        expect_attempt=2,
        phase="done",
        final_state="completed",
        instance_destroyed=True,
    )
    assert done.phase == "done"
    assert store.active_ids() == []
    assert store.all_records()[TASK].final_state == "completed"
    assert store.all_records(include_done=False) == {}
    ttl = redis_client.ttl(f"{key_prefix}task:{TASK}")
    assert 0 < ttl <= 60
    # a late start_task cannot restart it, a late heartbeat cannot change it back
    assert not store.create_if_absent(TaskRecord.new(TASK, clock()))
    with pytest.raises(TransitionError):
        store.cas(TASK, expect_phase="done", expect_attempt=2, phase="accepted")
    # after the TTL (clock moved past it) the tombstone leaves the index
    clock.now += 61
    redis_client.delete(f"{key_prefix}task:{TASK}")  # what Redis' expiry does
    assert store.all_records() == {}


def test_forget_from_any_phase(store, clock):
    store.create_if_absent(TaskRecord.new(TASK, clock(), phase="running", attempt=1))
    assert store.forget(TASK, ttl=30)
    assert store.get(TASK).phase == "done"
    assert store.active_ids() == []
    assert not store.forget("unknown")
    assert store.get("unknown") is None


def test_touch_never_resurrects_and_honours_attempt(store, clock):
    assert not store.touch(TASK, heartbeat_at=1.0)
    assert store.get(TASK) is None
    store.create_if_absent(TaskRecord.new(TASK, clock(), attempt=2))
    assert store.touch(TASK, heartbeat_at=5.0, log_size=123)
    assert store.touch(TASK, expect_attempt=2, instance_destroyed=True)
    assert not store.touch(TASK, expect_attempt=1, log_size=999)  # stale worker
    got = store.get(TASK)
    assert (got.heartbeat_at, got.log_size, got.instance_destroyed) == (5.0, 123, True)
    clock.now = 1234.0
    assert store.heartbeat(TASK)
    assert store.get(TASK).heartbeat_at == 1234.0
    with pytest.raises(StoreError):
        store.touch(TASK, phase="running")
    with pytest.raises(StoreError):
        store.touch(TASK, attempt=3)


def test_records_from_a_newer_version_are_read(store, redis_client, key_prefix, clock):
    store.create_if_absent(TaskRecord.new(TASK, clock()))
    redis_client.hset(f"{key_prefix}task:{TASK}", "future_field", '"x"')
    assert store.get(TASK).phase == "accepted"


def test_all_records_lists_active_and_done(store, clock):
    for index in range(5):
        store.create_if_absent(TaskRecord.new(f"task-{index}", clock()))
    store.forget("task-3")
    records = store.all_records()
    assert sorted(records) == [f"task-{i}" for i in range(5)]
    assert records["task-3"].phase == "done"
    assert store.active_ids() == ["task-0", "task-1", "task-2", "task-4"]


def test_active_instance_ids_are_those_the_active_records_name(store, clock):
    store.create_if_absent(TaskRecord.new("no-instance", clock()))
    for index, instance_id in enumerate((11, 12, 13)):
        store.create_if_absent(TaskRecord.new(f"task-{index}", clock(), instance_id=instance_id))
    store.forget("task-2")  # done: its instance is no longer one the records name
    assert store.active_instance_ids() == {11, 12}


def test_snapshot_marks_and_counters(store):
    assert store.load_snapshot() is None
    rows = [
        {"id": 1, "label": "ponos-a", "actual_status": None, "extra": [1]},
        {"id": 2, "label": None},
    ]
    store.save_snapshot(Snapshot(tuple(Instance.from_dict(r) for r in rows), 123.5))
    loaded = store.load_snapshot()
    assert loaded.taken_at == 123.5
    assert [i.to_dict() for i in loaded.instances] == rows  # unknown fields kept
    assert loaded.find(2).label is None and loaded.find(3) is None
    assert store.last_sync() is None
    store.mark_synced(99.25)
    assert store.last_sync() == 99.25
    assert store.sync_report() is None
    store.save_sync_report({"asked": 0, "waiting": {"task-1": "4 instances at most"}})
    assert store.sync_report() == {"asked": 0, "waiting": {"task-1": "4 instances at most"}}
    store.count_destroyed("orphan")
    store.count_destroyed("orphan")
    store.count_destroyed("duplicate", 0)
    assert store.destroyed_counts() == {"orphan": 2, "duplicate": 0}
    assert store.ended_log("t", 1) is None
    store.keep_ended_log("t", 1, "log text \u00e9", ttl=60)
    assert store.ended_log("t", 1) == "log text \u00e9"
    store.drop_ended_log("t", 1)
    assert store.ended_log("t", 1) is None


def test_locks_are_non_blocking_and_expire(store, redis_client, key_prefix):
    first = store.create_lock(TASK, timeout=5)
    second = store.create_lock(TASK, timeout=5)
    assert first.name == f"{key_prefix}lock:create:{TASK}"
    assert first.acquire()
    assert not second.acquire()  # returns at once
    assert 0 < redis_client.pttl(first.name) <= 5000
    first.release()
    assert second.acquire()
    second.release()
    sync_a, sync_b = store.sync_lock(timeout=10), store.sync_lock(timeout=10)
    assert sync_a.acquire() and not sync_b.acquire()
    sync_a.release()


def test_once(store):
    assert store.once("resume:x:watch", ttl=5)
    assert not store.once("resume:x:watch", ttl=5)
    assert store.once("resume:y:watch", ttl=5)


# ---------------------------------------------------------------------------- concurrency


def test_concurrent_cas_threads_exactly_one_wins(redis_url, key_prefix, clock):
    setup = TaskStore(redis.Redis.from_url(redis_url), Keyspace(key_prefix), clock=clock)
    for round_ in range(20):
        task_id = f"race-{round_}"
        setup.create_if_absent(TaskRecord.new(task_id, clock()))
        barrier = threading.Barrier(8)
        winners = []

        def claim(worker, task_id=task_id, barrier=barrier, winners=winners):
            store = TaskStore(redis.Redis.from_url(redis_url), Keyspace(key_prefix), clock=clock)
            barrier.wait()
            if store.cas(
                task_id,
                expect_phase="accepted",
                expect_attempt=0,
                phase="creating",
                attempt=1,
                label=f"worker-{worker}",
            ):
                winners.append(worker)

        threads = [threading.Thread(target=claim, args=(w,)) for w in range(8)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert len(winners) == 1
        assert setup.get(task_id).label == f"worker-{winners[0]}"


def _process_claim(redis_url, prefix, rounds, worker, start, results):
    store = TaskStore(redis.Redis.from_url(redis_url), Keyspace(prefix))
    start.wait()
    won = 0
    for round_ in range(rounds):
        # each process pushes every task's attempt forward; a CAS on an attempt is won once
        for attempt in range(3):
            if store.cas(
                f"proc-{round_}",
                expect_phase="creating",
                expect_attempt=attempt,
                attempt=attempt + 1,
                label=f"w{worker}-a{attempt + 1}",
            ):
                won += 1
    results.put(won)


def test_concurrent_cas_processes_exactly_one_wins_each_attempt(redis_url, key_prefix):
    rounds, workers = 30, 4
    setup = TaskStore(redis.Redis.from_url(redis_url), Keyspace(key_prefix))
    for round_ in range(rounds):
        setup.create_if_absent(TaskRecord.new(f"proc-{round_}", 0.0, phase="creating"))
    ctx = multiprocessing.get_context("spawn")
    start, results = ctx.Event(), ctx.Queue()
    procs = [
        ctx.Process(target=_process_claim, args=(redis_url, key_prefix, rounds, w, start, results))
        for w in range(workers)
    ]
    for proc in procs:
        proc.start()
    start.set()
    wins = [results.get(timeout=60) for _ in procs]
    for proc in procs:
        proc.join(timeout=30)
    assert sum(wins) == rounds * 3  # every (task, attempt) claimed exactly once
    for round_ in range(rounds):
        assert setup.get(f"proc-{round_}").attempt == 3


@pytest.mark.stack
def test_a_lock_is_released_through_a_redis_restart(tmp_path):
    """A sync whose Redis restarts under it must not leave its lock behind: with AOF the
    lock would come back and stall every sync until it expires."""
    from ponos_tasks.simulators.stack import RedisProcess
    from ponos_tasks.state import release

    server = RedisProcess(tmp_path, appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        store = TaskStore(client, Keyspace("t:"))
        lock = store.sync_lock(timeout=300)
        assert lock.acquire()
        restarting = threading.Thread(target=server.restart, kwargs={"down_for": 1.5})
        restarting.start()
        time.sleep(0.5)  # Redis is down now
        release(lock, retry_for=20)
        restarting.join(timeout=30)
        assert client.exists(Keyspace("t:").sync_lock) == 0
        assert store.sync_lock(timeout=300).acquire()  # the next sync runs at once
    finally:
        server.stop()


@pytest.mark.stack
def test_the_credentials_lock_is_released_through_a_redis_restart(tmp_path):
    """A registration whose Redis restarts under it must not leave the credentials lock
    behind: the AOF would bring it back and every worker's Arkindex calls would wait for it
    (the quick chaos run once stalled 55 s so)."""
    from ponos_tasks.simulators.stack import RedisProcess

    server = RedisProcess(tmp_path, appendonly=True).start()
    restarting = threading.Thread(target=server.restart, kwargs={"down_for": 1.5})
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        store = RedisCredentialStore(client, Keyspace("t:"))
        with store.lock():
            restarting.start()
            time.sleep(0.5)  # Redis is down when the block ends
        restarting.join(timeout=30)
        assert client.exists(Keyspace("t:").credentials_lock) == 0
    finally:
        if restarting.is_alive():  # the block failed: stop the Redis it is about to start
            restarting.join(timeout=30)
        server.stop()


def _just_renewed(client: redis.Redis, name: str, timeout_ms: int) -> None:
    """Return right after the renewer has renewed lock `name` (its PTTL jumps back up)."""
    deadline = time.monotonic() + 30
    last = client.pttl(name)
    while time.monotonic() < deadline:
        now = client.pttl(name)
        if now > last and now > timeout_ms - 200:
            return
        last = now
        time.sleep(0.02)
    raise AssertionError(f"lock {name} was not renewed")


def _holds_through(tmp_path, outage) -> None:
    """Hold a 6 s lock renewed every 2 s through `outage(server, client)`, which starts right
    after a renewal and spans two renewal ticks (4.5 s); 4 s later the lock must still be ours
    (its first timeout has passed by then), and no one else can take it."""
    from ponos_tasks.simulators.stack import RedisProcess
    from ponos_tasks.state import kept_alive

    server = RedisProcess(tmp_path, appendonly=True).start()
    try:
        client = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        probe = redis.Redis.from_url(server.url, socket_timeout=2, socket_connect_timeout=1)
        lock = client.lock("t:lock:sync", timeout=6, thread_local=False)
        assert lock.acquire(blocking=False)
        with kept_alive(lock, every=2):
            _just_renewed(probe, "t:lock:sync", 6000)
            outage(server, probe)
            time.sleep(4)
            assert probe.get("t:lock:sync") == lock.local.token
            assert not probe.lock("t:lock:sync", timeout=6).acquire(blocking=False)
    finally:
        server.stop()


@pytest.mark.stack
def test_a_held_lock_outlives_a_redis_restart_over_two_renewal_ticks(tmp_path):
    """A Redis restarted for 4.5 s (down at two renewal ticks in a row) does not cost the
    holder its lock: the renewer tries again every half second, not at the next tick only."""
    _holds_through(tmp_path, lambda server, probe: server.restart(down_for=4.5))


@pytest.mark.stack
def test_a_held_lock_outlives_a_redis_demoted_to_a_replica_for_a_while(tmp_path):
    """Any Redis error keeps the renewer trying (here READONLY: the node became a replica
    during a failover), where a dead renewer thread would let the lock expire under its
    holder and a second holder in."""
    from ponos_tasks.simulators.stack import free_port

    def demoted(server, probe):
        probe.replicaof("127.0.0.1", free_port())  # a primary that does not answer
        time.sleep(4.5)
        probe.replicaof("NO", "ONE")

    _holds_through(tmp_path, demoted)


def test_a_holder_whose_credentials_lock_lapsed_keeps_the_next_holders_credentials(
    redis_client, key_prefix
):
    """A worker stalled past the credentials lock's TTL while it registered must not write
    over the credentials the next holder registered meanwhile: it adopts them, so that all
    workers use one agent's tokens."""
    first = RedisCredentialStore(redis_client, Keyspace(key_prefix))
    second = RedisCredentialStore(redis_client, Keyspace(key_prefix))
    with first.lock():
        redis_client.delete(first.keys.credentials_lock)  # lapsed: the first holder stalled
        with second.lock():
            assert second.save({"agent_id": "second"}) == {"agent_id": "second"}
        assert first.save({"agent_id": "first"}) == {"agent_id": "second"}
    assert first.load() == {"agent_id": "second"}
    with first.lock():  # a holder whose lock holds writes as before
        assert first.save({"agent_id": "first"}) == {"agent_id": "first"}
    assert second.load() == {"agent_id": "first"}


def _hold_credentials_lock(redis_url: str, prefix: str, held) -> None:
    store = RedisCredentialStore(redis.Redis.from_url(redis_url), Keyspace(prefix))
    with store.lock():
        held.set()
        time.sleep(600)  # killed before


def test_a_killed_holder_of_the_credentials_lock_frees_it_within_its_ttl(redis_url, key_prefix):
    """A worker SIGKILLed while it registers blocks the others for the lock's TTL, not for
    the longest registration allowed: the lock is short and renewed while its holder lives."""
    ctx = multiprocessing.get_context("spawn")
    held = ctx.Event()
    holder = ctx.Process(target=_hold_credentials_lock, args=(redis_url, key_prefix, held))
    holder.start()
    try:
        assert held.wait(30)
        store = RedisCredentialStore(redis.Redis.from_url(redis_url), Keyspace(key_prefix))
        time.sleep(store.LOCK_TTL)  # renewed meanwhile: the holder still has it
        assert store.redis.exists(store.keys.credentials_lock) == 1
        os.kill(holder.pid, signal.SIGKILL)
        killed = time.monotonic()
        with store.lock():
            waited = time.monotonic() - killed
    finally:
        holder.kill()
        holder.join(timeout=10)
    assert waited <= store.LOCK_TTL + 2


def test_offer_ranking_records_expire_and_stay_bounded(store, clock):
    """What the offer ranking reads: failed starts per machine for a day, the machines that
    ran an image within the cache window, the image's last 20 run times."""
    store.avoid_machine(7, 60)
    store.avoid_machine(7, 60)
    store.avoid_machine(8, 0)  # no cooldown configured: the failure still counts
    assert store.start_failures() == {7: 2, 8: 1}
    clock.now += store.START_FAILURE_MEMORY + 1
    assert store.start_failures() == {}

    store.remember_image_host("img:1", 7, ttl=100)
    clock.now += 50
    store.remember_image_host("img:1", 8, ttl=100)
    assert store.image_hosts("img:1", 100) == {7, 8}
    clock.now += 60
    assert store.image_hosts("img:1", 100) == {8}  # 7 ran it 110 s ago
    assert store.image_hosts("img:2", 100) == set()

    for seconds in range(30):
        store.remember_run_seconds("img:1", float(seconds))
    assert store.recent_run_seconds("img:1") == [float(s) for s in range(29, 9, -1)]
    store.remember_run_seconds(None, 5.0)  # an instance whose image is unknown: nothing
