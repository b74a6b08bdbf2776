"""`ponos-vast doctor` against the local stack: all ok by default; a simulator set to
contradict an assumption is named; a Redis that evicts or forgets is warned about; a bad key
fails with what to do; no secret is printed."""

import inspect
import json
import re
import time
from dataclasses import replace

import pytest
from click.testing import CliRunner

from ponos_tasks.assumptions import (
    ASSUMPTIONS,
    CANNOT_TELL,
    CONFIRMED,
    CONTRADICTED,
    Observations,
    check_instance_filters,
    check_instance_statuses,
    check_log_default_tail,
)
from ponos_tasks.config import ENV_VARS
from ponos_tasks.doctor import (
    FAIL,
    OK,
    WARNING,
    agent_operation_ids,
    doctor_command,
    redis_eviction,
    redis_persistence,
    vast_instances,
)
from ponos_tasks.models import Instance
from ponos_tasks.offers import build_query
from ponos_tasks.simulators.harness import SimAdmin
from ponos_tasks.simulators.stack import RedisProcess
from ponos_tasks.state import DEFAULT_PREFIX
from tests.agent_harness import make_config, make_context

# --------------------------------------------------------------------------- pure


def test_every_simulator_knob_has_an_assumption():
    """A knob added to a simulator without its entry in assumptions.ASSUMPTIONS fails here:
    the Vast.ai simulator's knobs are the ones its docstring lists, the Arkindex simulator's
    are its constructor's parameters but the plumbing ones."""
    from ponos_tasks.simulators.arkindex.server import ArkindexSimulator
    from ponos_tasks.simulators.vast import simulator as vast_simulator

    listed = {knob for a in ASSUMPTIONS for knob in a.knobs}
    vast_knobs = set(re.findall(r"`(\w+)` \(", vast_simulator.__doc__))
    assert vast_knobs >= {"log_delay", "read_lag", "search_quota", "rate_limits"}
    plumbing = {"self", "s3_url", "farms", "host", "port", "public_url", "faults"}
    arkindex_knobs = set(inspect.signature(ArkindexSimulator.__init__).parameters) - plumbing
    assert arkindex_knobs >= {"url_lifetime", "token_ttl", "schema_omits"}
    expected = {f"vast:{k}" for k in vast_knobs} | {f"arkindex:{k}" for k in arkindex_knobs}
    assert expected - listed == set()
    assert len({a.name for a in ASSUMPTIONS}) == len(ASSUMPTIONS)


def test_agent_operations_are_read_from_the_client_code():
    ops = agent_operation_ids()
    assert {"CreateAgent", "RefreshAgentToken", "RetrieveAgentActions"} <= ops
    assert {"RetrieveTaskDefinition", "RetrieveTask", "PartialUpdateTask"} <= ops


def test_redis_without_persistence_or_with_eviction_warns():
    assert redis_persistence({"aof_enabled": 1}).status == OK
    forgetful = redis_persistence({"aof_enabled": 0, "rdb_save_policy": ""})
    assert forgetful.status == WARNING and "loses every record" in forgetful.detail
    assert redis_eviction("noeviction").status == OK
    assert redis_eviction("allkeys-lru").status == WARNING
    refused = redis_eviction(None)  # CONFIG GET refused: cannot tell, never "fine"
    assert refused.status == WARNING and "cannot tell" in refused.detail


def _instance(id, status, label=None):
    return Instance.from_dict(
        {"id": id, "label": label, "actual_status": status, "intended_status": "running",
         "machine_id": 7}
    )  # fmt: skip


def test_unknown_instance_status_contradicts_the_simulator():
    seen = Observations(instances=[_instance(1, "running"), _instance(2, "hibernating")])
    verdict, why = check_instance_statuses(seen)
    assert verdict == CONTRADICTED and "hibernating" in why
    assert check_instance_statuses(Observations(instances=[]))[0] == CANNOT_TELL
    assert check_instance_statuses(Observations(instances=[_instance(1, "exited")]))[0] == (
        CONFIRMED
    )


def test_instance_filters_verdicts():
    full = [_instance(1, "running"), _instance(2, "exited"), _instance(3, None)]
    right = Observations(
        instances=full, not_running=[full[1]], by_id=full[:2], ids_asked=[1, 2, 99]
    )
    assert check_instance_filters(right)[0] == CONFIRMED
    # A listing a running instance, or leaving out an exited one: the flat view would be wrong.
    assert check_instance_filters(replace(right, not_running=full[:2]))[0] == CONTRADICTED
    assert check_instance_filters(replace(right, not_running=[]))[0] == CONTRADICTED
    # `id in` answering other ids than those asked (that exist).
    assert check_instance_filters(replace(right, by_id=full))[0] == CONTRADICTED
    # `id gte` next to the `neq`: an exited instance below the bound is rightly left out,
    # listing it (the bound ignored) is wrong.
    assert check_instance_filters(replace(right, not_running=[], a_from=3))[0] == CONFIRMED
    assert check_instance_filters(replace(right, a_from=3))[0] == CONTRADICTED
    refused = Observations(instances=full, filter_error="400 invalid_request")
    assert check_instance_filters(refused)[0] == CONTRADICTED
    assert check_instance_filters(Observations())[0] == CANNOT_TELL


class _ExclusiveBound:
    """A v1 listing that reads `id gte` as `gt` (the agent's oldest instance's end would be
    missed by call A)."""

    def __init__(self, instances):
        self.instances = instances

    def list_instances(self, select_filters=None, **_):
        rows, flt = list(self.instances), select_filters or {}
        if "actual_status" in flt:
            rows = [i for i in rows if i.actual_status not in (None, "running")]
        if "gte" in flt.get("id", {}):
            rows = [i for i in rows if i.id > flt["id"]["gte"]]
        if "in" in flt.get("id", {}):
            rows = [i for i in rows if i.id in flt["id"]["in"]]
        return rows


def test_the_filter_probe_shows_a_bound_read_as_exclusive():
    """Bounded at the middle id (a running instance, usually), `gt` and `gte` answer alike:
    the probe bounds at the second instance not running, where they differ."""
    from ponos_tasks.doctor import probe_instance_filters

    full = [_instance(1, "exited"), _instance(2, "running"), _instance(3, "exited")]
    seen = Observations(instances=full)
    check = probe_instance_filters(_ExclusiveBound(full), seen, "flat")
    assert seen.a_from == 3
    assert check.status == FAIL and "left out instances [3]" in check.detail, check


def test_refused_instance_filters_fail_with_what_to_do(make_local_stack, private_redis, tmp_path):
    stack = make_local_stack(vast_options={"select_filters": False})
    code, document, _ = _doctor(stack, private_redis(), tmp_path)
    assert code == 1 and not document["ok"]
    assert _verdict(document, "vast.instance_filters") == CONTRADICTED
    check = _check(document, "vast.instance_filters")
    assert check["status"] == FAIL and "instance_reads: full_list" in check["action"], check


def test_unread_instance_filters_are_no_refusal(make_local_stack):
    """A 503 on the filtered listing is an outage, not Vast.ai refusing select_filters: the
    doctor says it could not read (warning, cannot tell), never `contradicted`."""
    from ponos_tasks.doctor import probe_instance_filters
    from ponos_tasks.vast import VastClient

    stack = make_local_stack()
    SimAdmin(stack).faults({"fault": "http_5xx", "endpoint": "list", "status": 503})
    client = VastClient(stack.vast_url, stack.vast_api_key, max_attempts=2)
    seen = Observations(instances=[])
    check = probe_instance_filters(client, seen, "flat")
    client.close()
    assert check.status == WARNING and "not read" in check.detail, check
    assert check_instance_filters(seen)[0] == CANNOT_TELL


def test_log_default_tail_verdicts():
    assert check_log_default_tail(Observations(default_log_lines=1000))[0] == CONFIRMED
    assert check_log_default_tail(Observations(default_log_lines=5000))[0] == CONTRADICTED
    assert check_log_default_tail(Observations(default_log_lines=12))[0] == CANNOT_TELL
    assert check_log_default_tail(Observations())[0] == CANNOT_TELL


def test_ponos_instances_of_another_agent_are_named():
    mine = "ponos-aaaaaaaa-"
    checks = vast_instances(
        [_instance(1, "running", "ponos-aaaaaaaa-t1-1"), _instance(2, "running", "ponos-bbbbbbbb-t2-1")],
        mine,
    )  # fmt: skip
    strangers = [c for c in checks if c.name == "vast.unknown_ponos_instances"]
    assert (
        strangers
        and strangers[0].status == WARNING
        and "ponos-bbbbbbbb-t2-1" in strangers[0].detail
    )


# --------------------------------------------------------------------------- local stack


@pytest.fixture
def private_redis(tmp_path):
    """A private redis-server (the shared one's config is never changed)."""
    started = []

    def start(appendonly: bool = True, policy: str = "noeviction") -> str:
        process = RedisProcess(tmp_path / f"redis{len(started)}", appendonly=appendonly)
        process.workdir.mkdir()
        process.start()
        started.append(process)
        import redis

        client = redis.Redis.from_url(process.url)
        client.config_set("maxmemory-policy", policy)
        client.close()
        return process.url

    yield start
    for process in started:
        process.stop()


@pytest.fixture(autouse=True)
def config_file_only(monkeypatch):
    """The doctor reads its configuration as the agent does, environment first (REDIS_URL,
    which `make test` exports, would point it at the shared Redis instead of the private one
    each test sets up): these tests give everything in the file."""
    for names in ENV_VARS.values():
        for name in names:
            monkeypatch.delenv(name, raising=False)


def _doctor(stack, redis_url, tmp_path, *args, **overrides):
    config = make_config(stack, redis_url, **overrides)
    path = tmp_path / "agent.yml"
    path.write_text(json.dumps(config.model_dump(mode="json")))  # JSON is YAML
    result = CliRunner().invoke(doctor_command, ["--config", str(path), "--json", *args])
    document = json.loads(result.output)
    for secret in config.secrets():
        assert secret not in result.output
    return result.exit_code, document, config


def _check(document, name):
    return next(c for c in document["checks"] if c["name"] == name)


def _verdict(document, name):
    return next(v["verdict"] for v in document["assumptions"] if v["name"] == name)


def test_default_stack_is_all_ok(make_local_stack, private_redis, tmp_path):
    stack = make_local_stack()
    code, document, _ = _doctor(stack, private_redis(), tmp_path)
    assert code == 0 and document["ok"]
    assert {c["status"] for c in document["checks"]} == {OK}, document["checks"]
    assert _verdict(document, "arkindex.schema_operations") == CONFIRMED
    assert _verdict(document, "vast.account_fields") == CONFIRMED
    assert _verdict(document, "vast.read_lag") == CANNOT_TELL
    assert CONTRADICTED not in {v["verdict"] for v in document["assumptions"]}


def test_register_and_task_definition(make_local_stack, private_redis, tmp_path):
    stack = make_local_stack()
    redis_url = private_redis()
    agent_name = "doctor-task"
    context = make_context(stack, redis_url, agent_name=agent_name, prefix=DEFAULT_PREFIX)
    task_id = SimAdmin(stack).one_task()
    # Not yet the agent's task, nor registered: the doctor says what to do.
    code, document, _ = _doctor(
        stack, redis_url, tmp_path, "--task", task_id, agent_name=agent_name
    )
    assert code == 1 and "--register" in _check(document, "arkindex.task")["action"]
    code, document, _ = _doctor(stack, redis_url, tmp_path, "--register", agent_name=agent_name)
    assert code == 0 and _check(document, "arkindex.register")["status"] == OK
    context.agent_short_id()
    assert [a.task_id for a in context.arkindex.actions()] == [task_id]  # assigned to it
    code, document, _ = _doctor(
        stack, redis_url, tmp_path, "--task", task_id, agent_name=agent_name
    )
    assert code == 0, document
    assert "log URL valid 3600 s" in _check(document, "arkindex.task")["detail"]
    assert _verdict(document, "arkindex.task_definition_fields") == CONFIRMED
    assert _verdict(document, "arkindex.log_url_lifetime") == CONFIRMED


def test_schema_without_an_operation_is_named_contradicted(
    make_local_stack, private_redis, tmp_path
):
    stack = make_local_stack(arkindex_options={"schema_omits": ["RetrieveTask"]})
    code, document, _ = _doctor(stack, private_redis(), tmp_path)
    assert code == 1 and not document["ok"]
    schema = _check(document, "arkindex.schema")
    assert schema["status"] == FAIL and "RetrieveTask" in schema["detail"]
    assert _verdict(document, "arkindex.schema_operations") == CONTRADICTED


def test_shorter_log_url_lifetime_is_contradicted(make_local_stack, private_redis, tmp_path):
    stack = make_local_stack(url_lifetime=600)
    redis_url = private_redis()
    context = make_context(stack, redis_url, agent_name="doctor-url", prefix=DEFAULT_PREFIX)
    task_id = SimAdmin(stack).one_task()
    context.agent_short_id()
    assert [a.task_id for a in context.arkindex.actions()] == [task_id]
    code, document, _ = _doctor(
        stack, redis_url, tmp_path, "--task", task_id, agent_name="doctor-url"
    )
    assert code == 1
    assert _verdict(document, "arkindex.log_url_lifetime") == CONTRADICTED


def test_evicting_forgetful_redis_is_warned(make_local_stack, private_redis, tmp_path):
    stack = make_local_stack()
    code, document, _ = _doctor(
        stack, private_redis(appendonly=False, policy="allkeys-lru"), tmp_path
    )
    assert code == 0  # warnings, not failures
    assert _check(document, "redis.persistence")["status"] == WARNING
    eviction = _check(document, "redis.maxmemory_policy")
    assert eviction["status"] == WARNING and "allkeys-lru" in eviction["detail"]


def test_bad_key_fails_with_what_to_do(make_local_stack, private_redis, tmp_path):
    stack = make_local_stack()
    code, document, config = _doctor(
        stack, private_redis(), tmp_path, vast_api={"api_key": "wrong-key-0123456789"}
    )
    assert code == 1
    account = _check(document, "vast.account")
    assert account["status"] == FAIL and "vast_api.api_key" in account["action"]
    assert "wrong-key-0123456789" in config.secrets()  # and _doctor checked it is not printed


def test_doctor_runs_without_the_simulators(tmp_path):
    """The operator's install has no `sim` extra: the doctor (and its assumptions) still run."""
    from tests.blocked_imports import SIM_EXTRA, run_blocked

    config = tmp_path / "agent.yml"
    config.write_text("url: not a url\n")
    result = run_blocked(
        ["-m", "ponos_tasks.cli", "doctor", "--config", str(config)],
        tmp_path,
        blocked=(*SIM_EXTRA, "ponos_tasks.simulators"),
    )
    assert result.returncode == 1, result.stderr
    assert result.stdout.startswith("fail     config:"), result.stdout


def _own_instance_with_a_long_log(stack, redis_url, agent_name: str, lines: int) -> None:
    """Registers the agent and rents it an instance whose container printed `lines` lines
    and exited (through the agent's own client: its rate limiter paces the calls)."""
    context = make_context(stack, redis_url, agent_name=agent_name, prefix=DEFAULT_PREFIX)
    prefix = context.label_prefix()  # registers
    offer = context.vast.search_offers(build_query({}, disk_gb=16))[0]
    created = context.vast.create_instance(
        offer.id,
        image="registry.example/worker:1",
        label=f"{prefix}doctor-1",
        env={"SIM_LOG_LINES": str(lines), "SIM_DURATION": "60", "SIM_PULL_SECONDS": "5"},
        disk=16,
    )
    admin = SimAdmin(stack)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        rows = [i for i in admin.instances() if i["id"] == created.id]
        if rows and rows[0]["actual_status"] == "exited":
            return
        time.sleep(0.2)
    raise AssertionError(f"instance {created.id} did not exit: {rows}")


@pytest.mark.parametrize(("default_tail", "verdict"), [(1000, CONFIRMED), (None, CONTRADICTED)])
def test_log_default_tail_is_checked_on_an_own_instance(
    make_local_stack, private_redis, tmp_path, default_tail, verdict
):
    stack = make_local_stack(vast_options={"log_default_tail": default_tail})
    redis_url = private_redis()
    _own_instance_with_a_long_log(stack, redis_url, "doctor-logs", 1500)
    code, document, _ = _doctor(stack, redis_url, tmp_path, agent_name="doctor-logs")
    assert _verdict(document, "vast.log_default_tail") == verdict, document["assumptions"]
    assert "1 labelled" in _check(document, "vast.own_instances")["detail"]
    # The flat sync's filters, compared on an exited instance (call A must list it).
    assert _verdict(document, "vast.instance_filters") == CONFIRMED, document["assumptions"]
    assert code == (0 if verdict == CONFIRMED else 1)
