"""The Vast.ai client over real HTTP against the Vast.ai simulator: every call, every fault knob.

The simulator runs in-process on 127.0.0.1:0 at time_scale 20 (a 30 s image pull takes 1.5 s).
Its rate limits are off here (so that faults are deterministic) except in the last tests,
where the client runs through the Redis rate limiter scaled to the simulator's clock.
"""

import http.server
import json
import threading
import time
import uuid

import pytest
import redis
import requests

from ponos_tasks.ratelimit import RedisRateLimiter
from ponos_tasks.simulators.vast import VastSimulator
from ponos_tasks.vast import (
    CreatedInstance,
    CreateOutcomeUnknown,
    Instance,
    LogsNotReady,
    Offer,
    OfferUnavailable,
    VastAuthError,
    VastBadAnswer,
    VastClient,
    VastError,
    VastRateLimited,
    VastServerError,
    VastTransportError,
)

API_KEY = "sim-key-0123456789abcdef"
TIME_SCALE = 20.0
IMAGE = "registry.example/worker:1"


@pytest.fixture
def sim():
    with VastSimulator(
        seed=0,
        time_scale=TIME_SCALE,
        api_key=API_KEY,
        host="127.0.0.1",
        port=0,
        rate_limits=False,
        log_delay=3.0,
    ) as simulator:
        yield simulator


def make_client(url, **kwargs):
    options = {"timeout": (2, 5), "max_attempts": 4, "backoff_initial": 0.05, "backoff_max": 0.2}
    options.update(kwargs)
    return VastClient(url, API_KEY, **options)


@pytest.fixture
def client(sim):
    vast = make_client(sim.url)
    yield vast
    vast.close()


def admin(sim, method, path, json=None):
    response = requests.request(method, f"{sim.url}/_sim/{path}", json=json, timeout=5)
    response.raise_for_status()
    return response.json() if response.content else None


def fault(sim, **rule):
    admin(sim, "POST", "faults", {"rules": [rule]})


def stats(sim):
    return admin(sim, "GET", "stats")


def new_label():
    return f"ponos-test-{uuid.uuid4().hex[:10]}"


def cheapest_offer(client, exclude=()):
    offers = client.search_offers(
        {"num_gpus": {"eq": 1}, "order": [["dph_total", "asc"]], "limit": 64}
    )
    return next(offer for offer in offers if offer.id not in exclude)


def create(client, label=None, env=None, offer=None):
    offer = offer or cheapest_offer(client)
    created = client.create_instance(
        offer.id, image=IMAGE, label=label or new_label(), env=env or {}, disk=10
    )
    # Vast.ai's reads lag a create by a few seconds: wait until show has it, as a careful
    # client does before relying on a read.
    wait_for(lambda: client.get_instance(created.id) is not None, timeout=5.0)
    return created


def wait_for(predicate, timeout=10.0, interval=0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        time.sleep(interval)


def status_is(client, instance_id, **fields):
    def check():
        instance = client.get_instance(instance_id)
        if instance and all(getattr(instance, k) == v for k, v in fields.items()):
            return instance
        return None

    return check


# ------------------------------------------------------------------ every call


def test_check_auth(client):
    account = client.check_auth()
    assert "id" in account and "api_key" not in account


def test_bad_key_is_a_clear_auth_error_without_the_key(sim):
    bad = VastClient(sim.url, "wrong-key-zzz", max_attempts=3)
    with pytest.raises(VastAuthError) as info:
        bad.check_auth()
    assert info.value.status == 401
    assert "wrong-key-zzz" not in str(info.value) and "API key" in str(info.value)
    with pytest.raises(VastAuthError):
        bad.list_instances()
    assert stats(sim)["calls"].get("account") == 1  # a 401 is not retried


def test_search_offers_typed_and_ordered(client):
    offers = client.search_offers(
        {
            "num_gpus": {"eq": 1},
            "gpu_ram": {"gte": 16000},
            "order": [["dph_total", "asc"]],
            "limit": 10,
            "allocated_storage": 10,
        }
    )
    assert 0 < len(offers) <= 10
    assert all(isinstance(o, Offer) and o.num_gpus == 1 and o.gpu_ram >= 16000 for o in offers)
    prices = [o.dph_total for o in offers]
    assert prices == sorted(prices)
    first = offers[0]
    assert first.machine_id is not None and first.gpu_name and first.reliability is not None
    assert first.raw["id"] == first.id


def test_create_show_list_label_stop_start_destroy(client):
    label = new_label()
    created = create(client, label, env={"PONOS_TASK": "t1", "SIM_DURATION": "600"})
    assert isinstance(created, CreatedInstance) and created.started and created.instance_api_key

    instance = client.get_instance(created.id)
    assert isinstance(instance, Instance) and instance.label == label
    assert instance.env["PONOS_TASK"] == "t1"
    # the simulator sends public_ipaddr/local_ipaddrs with a trailing newline, as Vast does
    assert instance.public_ipaddr and not instance.public_ipaddr.endswith("\n")
    assert not instance.raw["local_ipaddrs"].endswith("\n")
    running = wait_for(status_is(client, created.id, actual_status="running"), timeout=15)
    assert running.intended_status == "running" and running.start_date

    assert [i.id for i in client.list_instances(label=label)] == [created.id]
    assert [i.id for i in client.list_instances(label_prefix=label[:-2])] == [created.id]
    assert client.list_instances(label="no-such-label") == []

    client.set_label(created.id, label + "-renamed")
    assert client.get_instance(created.id).label == label + "-renamed"

    client.stop_instance(created.id)
    # The stop is taken at once and carried out by the host a few seconds later.
    stopped = wait_for(
        status_is(client, created.id, intended_status="stopped", cur_state="stopped")
    )
    assert stopped.actual_status == "exited"
    assert client.start_instance(created.id) in (True, False)  # False = queued (scheduling)
    assert client.get_instance(created.id).intended_status == "running"

    assert client.destroy_instance(created.id) is True
    assert client.get_instance(created.id) is None
    assert client.destroy_instance(created.id) is False  # already gone
    assert client.list_instances(label=label + "-renamed") == []


def test_get_unknown_instance_is_none(client):
    assert client.get_instance(987654321) is None


def test_update_of_unknown_instance_raises(client):
    with pytest.raises(VastError) as info:
        client.set_label(987654321, "x")
    assert info.value.status == 404 and info.value.error == "no_such_instance"


def test_list_pages_through_everything(client, sim):
    offers = client.search_offers({"num_gpus": {"eq": 1}, "limit": 64})
    prefix = new_label()
    ids = [create(client, f"{prefix}-{n}", offer=offer).id for n, offer in enumerate(offers[:30])]
    assert len(ids) == 30
    calls_before = stats(sim)["calls"].get("list", 0)
    listed = client.list_instances()
    assert [i.id for i in listed] == sorted(i.id for i in listed)
    assert set(ids) <= {i.id for i in listed}
    assert stats(sim)["calls"]["list"] - calls_before >= 2  # 25 per page
    mine = client.list_instances(label_prefix=prefix + "-")
    assert sorted(i.id for i in mine) == sorted(ids)


def test_request_logs(client):
    # scripted run: 4 lines spread over 50 simulated seconds (at 10, 20, 30 and 40 s)
    created = create(client, env={"SIM_LOG_LINES": "4", "SIM_DURATION": "50"})
    wait_for(status_is(client, created.id, actual_status="running"), timeout=15)
    time.sleep(32 / TIME_SCALE)
    text = client.request_logs(created.id, wait=15)
    assert len(text.strip().splitlines()) >= 2
    tail = client.request_logs(created.id, tail=1, wait=15)
    assert len(tail.strip().splitlines()) == 1


def test_request_logs_not_ready_in_time(client):
    created = create(client, env={"SIM_DURATION": "600"})
    with pytest.raises(LogsNotReady):
        client.request_logs(created.id, wait=0.05)


def test_request_logs_of_unknown_instance(client):
    with pytest.raises(VastError) as info:
        client.request_logs(987654321, wait=1)
    assert info.value.status in (403, 404)


# ------------------------------------------------------------------ create-time faults


def test_offer_vanished(client, sim):
    label = new_label()
    fault(sim, fault="offer_vanished", label=label)
    with pytest.raises(OfferUnavailable) as info:
        create(client, label)
    assert info.value.status in (404, 410) and info.value.error == "no_such_ask"
    assert client.list_instances(label=label) == []
    assert stats(sim)["calls"]["create"] == 1  # not retried


def test_create_lost_is_unknown_then_found_by_label(client, sim):
    label = new_label()
    fault(sim, fault="create_lost", label=label)
    with pytest.raises(CreateOutcomeUnknown):
        create(client, label)
    assert stats(sim)["calls"]["create"] == 1  # never re-sent
    found = wait_for(lambda: client.list_instances(label=label))
    assert len(found) == 1


def test_create_stopped_returns_started_false(client, sim):
    label = new_label()
    fault(sim, fault="create_stopped", label=label)
    created = create(client, label)
    assert created.started is False and created.id
    assert client.get_instance(created.id).label == label
    assert client.destroy_instance(created.id)


def test_double_rent_is_accepted_twice(client, sim):
    label = new_label()
    fault(sim, fault="double_rent", label=label)
    offer = cheapest_offer(client)
    first = create(client, label, offer=offer)
    second = create(client, label, offer=offer)
    assert first.id != second.id
    assert len(client.list_instances(label=label)) == 2


# ------------------------------------------------------------------ lifecycle faults


def test_stuck_loading(client, sim):
    label = new_label()
    fault(sim, fault="stuck_loading", label=label)
    created = create(client, label, env={"SIM_PULL_SECONDS": "5"})
    wait_for(status_is(client, created.id, actual_status="loading"), timeout=5)
    time.sleep(30 / TIME_SCALE)  # six times the pull this instance should take
    assert client.get_instance(created.id).actual_status == "loading"


def test_oci_failure(client, sim):
    label = new_label()
    fault(sim, fault="oci_failure", label=label)
    created = create(client, label)
    instance = wait_for(status_is(client, created.id, actual_status="created"), timeout=10)
    instance = wait_for(
        lambda: (i := client.get_instance(created.id)).status_msg_is_fatal and i, timeout=10
    )
    assert "oci runtime create failed" in instance.status_msg.lower()


def test_unexpected_exit(client, sim):
    label = new_label()
    fault(sim, fault="unexpected_exit", label=label)
    created = create(client, label, env={"SIM_DURATION": "600"})
    instance = wait_for(status_is(client, created.id, actual_status="exited"), timeout=15)
    assert instance.intended_status == "running"


def test_offline(client, sim):
    label = new_label()
    fault(sim, fault="offline", label=label)
    created = create(client, label, env={"SIM_DURATION": "600"})
    wait_for(status_is(client, created.id, actual_status="offline"), timeout=15)


def test_outbid(client, sim):
    label = new_label()
    fault(sim, fault="outbid", label=label)
    created = create(client, label, env={"SIM_DURATION": "600"})
    wait_for(
        status_is(
            client, created.id, cur_state="stopped", intended_status="stopped", next_state="stopped"
        ),
        timeout=15,
    )


# ------------------------------------------------------------------ HTTP faults


@pytest.mark.parametrize("shape", ["text", "detail", "json"])
def test_rate_limit_without_retry_after_is_retried(client, sim, shape):
    fault(sim, fault="rate_limit", endpoint="list", times=2, shape=shape, retry_after=None)
    assert client.list_instances() == []
    assert stats(sim)["calls"]["list"] == 3


@pytest.mark.parametrize("shape", ["text", "detail", "json"])
def test_rate_limit_with_retry_after_is_honoured(client, sim, shape):
    fault(sim, fault="rate_limit", endpoint="show", times=1, shape=shape, retry_after=1)
    started = time.monotonic()
    assert client.get_instance(1) is None
    assert time.monotonic() - started >= 1.0
    assert stats(sim)["calls"]["show"] == 2


@pytest.mark.parametrize("shape", ["text", "detail", "json"])
def test_rate_limit_gives_up_after_max_attempts(client, sim, shape):
    fault(sim, fault="rate_limit", endpoint="list", times=10, shape=shape, retry_after=None)
    with pytest.raises(VastRateLimited) as info:
        client.list_instances()
    assert info.value.status == 429 and "too frequent" in info.value.msg
    assert stats(sim)["calls"]["list"] == 4


def test_rate_limit_with_long_retry_after_gives_up_at_once(client, sim):
    fault(sim, fault="rate_limit", endpoint="list", times=10, shape="json", retry_after=120)
    started = time.monotonic()
    with pytest.raises(VastRateLimited) as info:
        client.list_instances()
    assert info.value.retry_after == 120 and time.monotonic() - started < 1
    assert stats(sim)["calls"]["list"] == 1


def test_rate_limited_create_is_retried(client, sim):
    label = new_label()
    fault(sim, fault="rate_limit", endpoint="create", times=1, shape="detail", retry_after=None)
    created = create(client, label)
    assert created.started and stats(sim)["calls"]["create"] == 2
    assert len(client.list_instances(label=label)) == 1


@pytest.mark.parametrize("status", [502, 503, 504])
def test_5xx_is_retried_for_reads(client, sim, status):
    fault(sim, fault="http_5xx", endpoint="show", times=2, status=status)
    assert client.get_instance(1) is None
    assert stats(sim)["calls"]["show"] == 3


def test_5xx_gives_up_after_max_attempts(client, sim):
    fault(sim, fault="http_5xx", endpoint="list", times=10, status=503)
    with pytest.raises(VastServerError) as info:
        client.list_instances()
    assert info.value.status == 503
    assert stats(sim)["calls"]["list"] == 4


def test_500_is_not_retried(client, sim):
    fault(sim, fault="http_5xx", endpoint="list", times=1, status=500)
    with pytest.raises(VastServerError):
        client.list_instances()
    assert stats(sim)["calls"]["list"] == 1


def test_html_error_is_retried_for_reads(client, sim):
    fault(sim, fault="html_error", endpoint="list", times=1)
    assert client.list_instances() == []
    assert stats(sim)["calls"]["list"] == 2


@pytest.mark.parametrize(
    "rule",
    [
        {"fault": "http_5xx", "status": 503},
        {"fault": "html_error"},
        {"fault": "http_5xx", "status": 500},
    ],
)
def test_5xx_on_create_is_outcome_unknown(client, sim, rule):
    fault(sim, endpoint="create", times=1, **rule)
    with pytest.raises(CreateOutcomeUnknown) as info:
        create(client)
    assert info.value.status >= 500
    assert stats(sim)["calls"]["create"] == 1  # never re-sent


def test_slow_read_times_out_and_is_retried(sim):
    vast = make_client(sim.url, timeout=(2, 0.5))
    fault(sim, fault="slow", endpoint="list", times=1, delay=1.5)
    assert vast.list_instances() == []
    assert stats(sim)["calls"]["list"] == 2


def test_slow_create_is_outcome_unknown(sim):
    vast = make_client(sim.url, timeout=(2, 0.5))
    label = new_label()
    fault(sim, fault="slow", endpoint="create", times=1, delay=1.5)
    with pytest.raises(CreateOutcomeUnknown, match="ReadTimeout"):
        create(vast, label)
    assert stats(sim)["calls"]["create"] == 1
    # the create went through on the server: the caller finds it by its label
    found = wait_for(lambda: vast.list_instances(label=label), timeout=5)
    assert len(found) == 1


class _QuotaExceeded(http.server.BaseHTTPRequestHandler):
    """The simulator has no daily-search-quota knob (docs/reference.md §1.2 describes the quota):
    this one-route server answers the 429 the official client special-cases."""

    calls = 0

    def do_POST(self):  # noqa: N802 (http.server's naming)
        type(self).calls += 1
        body = b'{"error": "search_quota_exceeded", "msg": "Daily search quota exceeded"}'
        self.send_response(429)
        self.send_header("Content-Type", "application/json")
        self.send_header("X-RateLimit-Reset", "1893456000")  # 2030-01-01 00:00 UTC
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def test_search_quota_exceeded_is_never_retried():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _QuotaExceeded)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        vast = make_client(f"http://127.0.0.1:{server.server_address[1]}")
        with pytest.raises(VastRateLimited) as info:
            vast.search_offers({"limit": 1})
    finally:
        server.shutdown()
        server.server_close()
    assert info.value.error == "search_quota_exceeded" and not info.value.retryable
    assert info.value.reset_at == 1893456000 and "2030-01-01 00:00:00 UTC" in str(info.value)
    assert _QuotaExceeded.calls == 1


def test_unreachable_server_is_a_transport_error():
    vast = make_client("http://127.0.0.1:9", max_attempts=2)
    with pytest.raises(VastTransportError):
        vast.list_instances()


def test_every_try_is_told_to_the_call_hook_as_the_simulator_counts_it(sim):
    """The hook the agent counts calls with (metric_store) sees each try with its status:
    retried 429s and 5xx included, as the simulator counted them."""
    told = []
    vast = make_client(sim.url, on_call=lambda *call: told.append(call))
    fault(sim, fault="rate_limit", endpoint="list", times=2, shape="json", retry_after=None)
    fault(sim, fault="http_5xx", endpoint="show", times=1, status=503)
    assert vast.list_instances() == []
    assert vast.get_instance(1) is None
    vast.close()
    assert told == [
        ("vast", "list", 429),
        ("vast", "list", 429),
        ("vast", "list", 200),
        ("vast", "show", 503),
        ("vast", "show", 200),
    ]
    counted = stats(sim)
    assert counted["calls"] == {"list": 3, "show": 2}
    assert counted["rate_limited"] == {"list": 2}


def test_a_try_without_an_answer_is_told_with_no_status():
    told = []
    vast = make_client("http://127.0.0.1:9", max_attempts=2, on_call=lambda *c: told.append(c))
    with pytest.raises(VastTransportError):
        vast.list_instances()
    assert told == [("vast", "list", None), ("vast", "list", None)]


# ------------------------------------------------------------------ with rate limits on


@pytest.fixture
def limited_sim():
    with VastSimulator(
        seed=1,
        time_scale=TIME_SCALE,
        api_key=API_KEY,
        host="127.0.0.1",
        port=0,
        rate_limits=True,
        log_delay=3.0,
    ) as simulator:
        yield simulator


def test_every_call_through_the_rate_limiter_gets_no_429(limited_sim, redis_url, key_prefix):
    limiter = RedisRateLimiter(
        redis.Redis.from_url(redis_url), prefix=key_prefix, scale=1 / TIME_SCALE, margin=0.03
    )
    vast = make_client(limited_sim.url, rate_limiter=limiter, max_attempts=1)
    vast.check_auth()
    offers = vast.search_offers({"num_gpus": {"eq": 1}, "limit": 5})
    labels = [new_label() for _ in range(3)]
    ids = [
        vast.create_instance(offer.id, image=IMAGE, label=label, env={}, disk=10).id
        for offer, label in zip(offers, labels, strict=False)
    ]
    for instance_id in ids:
        vast.get_instance(instance_id)
        vast.set_label(instance_id, "renamed")
        vast.list_instances()
    for instance_id in ids:
        assert vast.destroy_instance(instance_id)
    assert not any(stats(limited_sim)["rate_limited"].values())


def test_a_refused_create_holds_every_worker_for_the_penalty(limited_sim, redis_url, key_prefix):
    """Vast.ai refuses a create (429) and then every create of the account for 12 s, each
    refused one restarting it. Somebody else's create on the account makes the workers'
    first one refused: the workers then wait the penalty out together (slots reserved before
    it included) and get through; before, they kept sending every 4.6 s, each restarting the
    penalty, and no create got through again."""
    limiter = RedisRateLimiter(
        redis.Redis.from_url(redis_url), prefix=key_prefix, scale=1 / TIME_SCALE, margin=0.03
    )
    other = make_client(limited_sim.url)  # another user of the account: no shared limiter
    offers = other.search_offers({"num_gpus": {"eq": 1}, "limit": 10})
    ids, errors = [], []

    def worker(mine):
        vast = make_client(limited_sim.url, rate_limiter=limiter, max_attempts=4)
        for offer in mine:
            try:
                created = vast.create_instance(
                    offer.id, image=IMAGE, label=new_label(), env={}, disk=10
                )
                ids.append(created.id)
            except VastError as error:
                errors.append(error)

    ids.append(
        other.create_instance(offers[0].id, image=IMAGE, label=new_label(), env={}, disk=10).id
    )
    workers = [
        threading.Thread(target=worker, args=(offers[1 + 2 * i : 3 + 2 * i],)) for i in range(3)
    ]
    for thread in workers:
        thread.start()
    for thread in workers:
        thread.join(timeout=60)
    try:
        assert errors == [] and len(ids) == 7
        assert stats(limited_sim)["rate_limited"].get("create", 0) == 1
    finally:
        for instance_id in ids:
            other.destroy_instance(instance_id)


def test_two_agents_on_one_key_are_not_locked_out_by_each_others_penalty(limited_sim, redis_url):
    """Two agents with their own Redis (a staging and a production farm) on one Vast.ai
    key: each one's limiter knows nothing of the other's creates, and their first creates
    collide. Each backing off exactly 12 s from its own refusal, each create landed in the
    penalty the other's last refusal had restarted, and the offset never closed: 2 of 6
    creates in 12 tries each. A penalty up to half as long again, at random, breaks the
    step. Each create is tried again until a deadline (the step's Celery retries): random,
    the drift takes a varying number of penalties, but it comes."""
    ids, errors = [], []
    other = make_client(limited_sim.url)
    offers = other.search_offers({"num_gpus": {"eq": 1}, "limit": 8})
    client = redis.Redis.from_url(redis_url)
    prefixes = [f"test-agent{i}-{uuid.uuid4().hex[:8]}:" for i in range(2)]

    def agent(prefix, mine):
        limiter = RedisRateLimiter(client, prefix=prefix, scale=1 / TIME_SCALE, margin=0.03)
        vast = make_client(limited_sim.url, rate_limiter=limiter, max_attempts=4)
        deadline = time.monotonic() + 60  # 1200 sim s: 100 penalties
        for offer in mine:
            while True:
                try:
                    created = vast.create_instance(
                        offer.id, image=IMAGE, label=new_label(), env={}, disk=10
                    )
                    ids.append(created.id)
                    break
                except VastRateLimited as error:
                    if time.monotonic() > deadline:
                        errors.append(error)
                        break
                except VastError as error:
                    errors.append(error)
                    break

    agents = [
        threading.Thread(target=agent, args=(prefixes[i], offers[3 * i : 3 * i + 3]))
        for i in range(2)
    ]
    for thread in agents:
        thread.start()
    for thread in agents:
        thread.join(timeout=180)
    try:
        assert errors == [] and len(ids) == 6, (len(ids), errors[:1])
    finally:
        for instance_id in ids:
            other.destroy_instance(instance_id)
        for prefix in prefixes:
            for key in client.scan_iter(match=prefix + "*"):
                client.delete(key)


# ------------------------------------------------------------------ answers that are not answers


def test_truncated_or_html_answer_to_a_read_is_retried(client, sim):
    label = new_label()
    created = create(client, label)
    fault(sim, fault="malformed", endpoint="list", shape="truncated", times=1)
    fault(sim, fault="malformed", endpoint="show", shape="html", times=1)
    calls = stats(sim)["calls"]
    assert [i.id for i in client.list_instances(label=label)] == [created.id]
    assert client.get_instance(created.id).id == created.id
    after = stats(sim)["calls"]
    assert after["list"] - calls.get("list", 0) == 2 and after["show"] - calls["show"] == 2


def test_a_garbled_answer_to_a_create_is_outcome_unknown_never_resent(client, sim):
    label = new_label()
    fault(sim, fault="malformed", endpoint="create", shape="truncated", times=1)
    with pytest.raises(CreateOutcomeUnknown, match="unexpected answer"):
        create(client, label)
    assert stats(sim)["calls"]["create"] == 1
    # the instance exists: the caller's label lookup finds it
    assert len(wait_for(lambda: client.list_instances(label=label), timeout=5)) == 1


def test_a_listing_that_repeats_its_token_is_an_error_not_a_loop(client, sim):
    create(client)
    fault(sim, fault="malformed", endpoint="list", shape="repeat_token")
    with pytest.raises(VastBadAnswer, match="repeats next_token"):
        client.list_instances()
    assert stats(sim)["calls"]["list"] == 2  # two pages, then it stops


@pytest.mark.parametrize(("endpoint", "call"), [("list", "list"), ("search", "search")])
def test_null_where_a_list_is_expected_is_an_error_not_an_empty_answer(client, sim, endpoint, call):
    """`instances: null` is not "no instance" (a label lookup would then create a second
    one), nor `offers: null` "no offer"."""
    fault(sim, fault="malformed", endpoint=endpoint, shape="wrong_types")
    with pytest.raises(VastBadAnswer, match="not a list"):
        if call == "list":
            client.list_instances()
        else:
            client.search_offers({"num_gpus": {"eq": 1}, "limit": 5})
    # Raised at once (VastBadAnswer is retryable: the step that called is retried by Celery).
    assert stats(sim)["calls"][endpoint] == 1


def test_strings_where_numbers_are_expected_are_read(client, sim):
    created = create(client)
    fault(sim, fault="malformed", endpoint="show", shape="wrong_types")
    instance = client.get_instance(created.id)
    assert instance.id == created.id and isinstance(instance.dph_total, float)


class _Pages(http.server.BaseHTTPRequestHandler):
    """A v1 listing scripted page by page: `pages[after_token]` is (rows, next_token)."""

    pages: dict = {}
    calls = 0

    def do_GET(self):  # noqa: N802 (http.server's naming)
        type(self).calls += 1
        query = dict(
            part.split("=", 1) for part in self.path.split("?", 1)[-1].split("&") if "=" in part
        )
        rows, token = self.pages(query.get("after_token"))
        body = json.dumps({"instances": rows, "next_token": token}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def serve(handler):
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server


def row(instance_id):
    return {"id": instance_id, "label": f"ponos-x-{instance_id}", "actual_status": "hibernating"}


@pytest.mark.parametrize(
    ("pages", "expected", "calls"),
    [
        # an empty page in the middle, and a page repeating rows already seen: tolerated
        (
            {
                None: ([row(1)], "a"),
                "a": ([], "b"),
                "b": ([row(1), row(2)], "c"),
                "c": ([row(3)], None),
            },
            [1, 2, 3],
            4,
        ),
        # an unknown actual_status is kept as it is
        ({None: ([row(7)], "")}, [7], 1),
        # fresh tokens forever, never a new row: abandoned after MAX_IDLE_PAGES
        ("endless-empty", VastBadAnswer, 3),
        ("endless-same-rows", VastBadAnswer, 4),
        # a token of the wrong type
        ({None: ([row(1)], ["t"])}, VastBadAnswer, 1),
    ],
)
def test_v1_pages_empty_repeated_or_endless(pages, expected, calls):
    if pages == "endless-empty":
        script = lambda token: ([], f"t{int((token or 't0')[1:]) + 1}")  # noqa: E731
    elif pages == "endless-same-rows":
        script = lambda token: ([row(1)], f"t{int((token or 't0')[1:]) + 1}")  # noqa: E731
    else:
        script = lambda token: pages[token]  # noqa: E731
    handler = type("Pages", (_Pages,), {"pages": staticmethod(script), "calls": 0})
    server = serve(handler)
    try:
        vast = make_client(f"http://127.0.0.1:{server.server_address[1]}", max_attempts=1)
        if isinstance(expected, type):
            with pytest.raises(expected):
                vast.list_instances()
        else:
            found = vast.list_instances()
            assert [i.id for i in found] == expected
            assert {i.actual_status for i in found} == {"hibernating"}
    finally:
        server.shutdown()
        server.server_close()
    assert handler.calls == calls


class _HugeLog(http.server.BaseHTTPRequestHandler):
    """request_logs, then a log of SIZE bytes streamed line by line (never built in memory)."""

    SIZE = 200 * 1024 * 1024

    def do_PUT(self):  # noqa: N802
        port = self.server.server_address[1]
        body = json.dumps({"success": True, "result_url": f"http://127.0.0.1:{port}/log"}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):  # noqa: N802
        line = b"x" * 1023 + b"\n"
        chunk = line * 1024  # 1 MiB
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(self.SIZE + 12))
        self.end_headers()
        for _ in range(self.SIZE // len(chunk)):
            self.wfile.write(chunk)
        self.wfile.write(b"THE END\nEOF\n")

    def log_message(self, *args):
        pass


def test_a_log_of_hundreds_of_mb_keeps_its_tail_in_bounded_memory():
    import tracemalloc

    server = serve(_HugeLog)
    try:
        vast = make_client(f"http://127.0.0.1:{server.server_address[1]}", timeout=(2, 30))
        tracemalloc.start()
        text = vast.request_logs(1, max_bytes=1024 * 1024, wait=30)
        _, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
    finally:
        server.shutdown()
        server.server_close()
    assert text.endswith("THE END\nEOF\n")
    assert text.startswith("[log cut: the first ")
    assert len(text) <= 1024 * 1024 + 100
    assert peak < 8 * 1024 * 1024, peak  # a few MiB, not 200
