"""Agent configuration: YAML file, environment overrides, one problem line per bad key."""

import subprocess
import sys
import textwrap
import uuid
from pathlib import Path

import pytest
from click.testing import CliRunner

from ponos_tasks.config import DEFAULT_TASK_FORMAT, ConfigError, check_config_command, load_config

EXAMPLE = Path(__file__).resolve().parent.parent / "config" / "agent.example.yml"
FARM = "2c3d0f4e-1a2b-4c5d-8e9f-0a1b2c3d4e5f"

MINIMAL = f"""
url: https://arkindex.example.com/
farm_id: {FARM}
seed: seed-0123456789abcdef
vast_api:
  api_key: vast-key-abcdef
"""


def write(tmp_path, text: str) -> str:
    path = tmp_path / "agent.yml"
    path.write_text(textwrap.dedent(text))
    return str(path)


def problems(tmp_path, text: str | None, environ=None) -> list[str]:
    path = write(tmp_path, text) if text is not None else None
    with pytest.raises(ConfigError) as caught:
        load_config(path, environ or {})
    return caught.value.problems


def test_minimal_file_and_defaults(tmp_path):
    config = load_config(write(tmp_path, MINIMAL), {})
    assert config.url == "https://arkindex.example.com"
    assert config.farm_id == uuid.UUID(FARM)
    assert config.logging.level == "INFO"
    assert config.logging.task_format == DEFAULT_TASK_FORMAT
    assert config.sentry.dsn is None
    vast = config.vast_api
    assert vast.url == "https://console.vast.ai"
    assert vast.offer_filters == {}
    assert vast.disk_gb == 32
    budget = config.budget
    assert budget.max_instances == 4
    assert (budget.max_dph_per_instance, budget.max_dph_total) == (None, None)
    assert (budget.max_spend_per_task, budget.max_spend_per_day) == (None, None)
    assert budget.billing_time_scale == 1.0
    assert (vast.loading_deadline, vast.start_attempts, vast.offer_wait) == (7200, 3, 3600)
    assert vast.rate_limit_scale == 1.0
    assert (config.sync_interval, config.logs_interval) == (10, 60)
    assert config.redis_url == "redis://127.0.0.1:6379/0"
    assert vast.registries == [] and vast.extra_environment == {}


def test_example_file_is_accepted_and_covers_every_key():
    config = load_config(str(EXAMPLE), {})
    assert config.vast_api.offer_filters["gpu_ram"] == {"gte": 16000}
    text = EXAMPLE.read_text()

    def keys(model, prefix=""):
        for name, field in model.model_fields.items():
            yield prefix + name
            annotation = field.annotation
            if isinstance(annotation, type) and hasattr(annotation, "model_fields"):
                yield from keys(annotation, prefix + name + ".")

    from ponos_tasks.config import AgentConfig, RegistryCredential

    for key in [*keys(AgentConfig), *(f"registries.{k}" for k in RegistryCredential.model_fields)]:
        assert f"{key.rsplit('.', 1)[-1]}:" in text, f"{key} is not documented in the example"


def test_every_problem_is_reported_once_naming_its_key(tmp_path):
    found = problems(
        tmp_path,
        """
        url: htp://arkindex
        farm_id: not-a-uuid
        seeds: abc
        logging:
          level: verbose
          task_format: "%(nope)s"
        vast_api:
          offer_filters: gpu_nme=RTX_4090
          disk_gb: 4
          urll: https://console.vast.ai
        budget:
          max_dph_per_instance: 0
          max_instances: 0
        redis_url: http://localhost
        sync_interval: -1
    """,
    )
    by_key = {line.split(":", 1)[0]: line for line in found}
    assert by_key["url"] == "url: not a valid http(s) URL"
    assert "farm_id" in by_key
    assert by_key["seed"] == "seed: missing (set it in the file or PONOS_SEED)"
    assert by_key["seeds"] == "seeds: unknown key (did you mean 'seed'?)"
    assert by_key["vast_api.urll"] == "vast_api.urll: unknown key (did you mean 'url'?)"
    assert "logging.level" in by_key and "logging.task_format" in by_key
    assert by_key["vast_api.api_key"] == (
        "vast_api.api_key: missing (set it in the file or PONOS_VAST_API_KEY / VAST_API_KEY)"
    )
    assert by_key["vast_api.offer_filters"].startswith(
        "vast_api.offer_filters: unknown offer field 'gpu_nme' (did you mean 'gpu_name'"
    )
    for key in (
        "vast_api.disk_gb",
        "budget.max_dph_per_instance",
        "budget.max_instances",
        "redis_url",
        "sync_interval",
    ):
        assert key in by_key, key
    assert len(found) == len(by_key) == 14


def test_offer_filters_both_forms_and_bad_operator(tmp_path):
    config = load_config(
        write(tmp_path, MINIMAL + "  offer_filters: 'gpu_name=RTX_4090 dph<0.5'\n"), {}
    )
    assert config.vast_api.offer_filters == {
        "gpu_name": {"eq": "RTX 4090"},
        "dph_total": {"lt": 0.5},
    }
    found = problems(tmp_path, MINIMAL + "  offer_filters: {gpu_ram: {gtx: 3}}\n")
    assert len(found) == 1 and found[0].startswith("vast_api.offer_filters: unknown operator 'gtx'")


def test_environment_wins_and_can_hold_every_secret(tmp_path):
    environ = {
        "ARKINDEX_URL": "http://127.0.0.1:8000",
        "PONOS_FARM_ID": FARM,
        "PONOS_SEED": "env-seed-value",
        "VAST_API_KEY": "env-vast-key",
        "PONOS_VAST_URL": "http://127.0.0.1:9000",
        "REDIS_URL": "redis://:redispass@127.0.0.1:6380/3",
        "SENTRY_DSN": "https://sentrykey@o1.ingest.example/5",
        "PONOS_OFFER_FILTERS": "gpu_ram>=24",
        "PONOS__VAST_API__DISK_GB": "50",
        "PONOS__LOGS_INTERVAL": "5",
        "PONOS__VAST_API__EXTRA_ENVIRONMENT": "{A: 1}",
        "PONOS_LOG_LEVEL": "debug",
        "UNRELATED": "x",
        "PONOS_S3_URL": "http://127.0.0.1:1",  # not a config key: ignored
    }
    config = load_config(None, environ)
    assert config.url == "http://127.0.0.1:8000"
    assert config.seed == "env-seed-value"
    assert config.vast_api.api_key == "env-vast-key"
    assert config.vast_api.url == "http://127.0.0.1:9000"
    assert config.vast_api.offer_filters == {"gpu_ram": {"gte": 24000}}
    assert config.vast_api.disk_gb == 50
    assert config.vast_api.extra_environment == {"A": "1"}
    assert config.logs_interval == 5
    assert config.logging.level == "DEBUG"
    # The file loses against the environment; an empty variable counts as unset.
    file_config = load_config(
        write(tmp_path, MINIMAL), {"PONOS_SEED": "from-env", "VAST_API_KEY": ""}
    )
    assert file_config.seed == "from-env"
    assert file_config.vast_api.api_key == "vast-key-abcdef"
    # PONOS_* names come before the short ones.
    both = load_config(
        write(tmp_path, MINIMAL), {"PONOS_VAST_API_KEY": "a-key", "VAST_API_KEY": "b-key"}
    )
    assert both.vast_api.api_key == "a-key"


def test_generic_override_of_unknown_key_is_reported(tmp_path):
    found = problems(tmp_path, MINIMAL, {"PONOS__VAST_API__DISKGB": "50"})
    assert found == ["vast_api.diskgb: unknown key (did you mean 'disk_gb'?)"]


def test_secrets_listed_for_redaction(tmp_path):
    config = load_config(
        write(
            tmp_path,
            MINIMAL
            + """
  registries:
    - host: 127.0.0.1:5000
      username: bob
      password: reg-pass-1
    - url: https://registry.example.com/v2/
      username: alice
      password_env: REG_PASS
sentry:
  dsn: https://dsnkey123@o1.ingest.example/5
redis_url: redis://:redispw99@127.0.0.1:6379/0
""",
        ),
        {"REG_PASS": "reg-pass-from-env"},
    )
    assert set(config.secrets()) == {
        "seed-0123456789abcdef",
        "vast-key-abcdef",
        "reg-pass-1",
        "reg-pass-from-env",
        "https://dsnkey123@o1.ingest.example/5",
        "dsnkey123",
        "redispw99",
    }
    assert [r.registry_host for r in config.vast_api.registries] == [
        "127.0.0.1:5000",
        "registry.example.com",
    ]
    summary = "\n".join(config.summary())
    for secret in config.secrets():
        assert secret not in summary


def test_registry_problems(tmp_path):
    found = problems(
        tmp_path,
        MINIMAL
        + """
  registries:
    - username: bob
      password: x
    - host: r.example.com
      username: bob
      password_env: MISSING_VAR
    - host: r.example.com
      password: y
""",
    )
    assert found == [
        "vast_api.registries[0]: give url or host",
        "vast_api.registries[1]: password missing (variable MISSING_VAR is not set)",
        "vast_api.registries[2].username: missing",
    ]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("url: [unclosed", "not valid YAML at line 1"),
        ("- a\n- b\n", "the top level must be a mapping"),
    ],
)
def test_unreadable_files(tmp_path, text, expected):
    (found,) = problems(tmp_path, text)
    assert expected in found
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(str(tmp_path / "missing.yml"), {})


def test_check_config_command_ok_and_no_secret(tmp_path):
    path = write(tmp_path, MINIMAL)
    result = CliRunner().invoke(
        check_config_command, [path], env={"PONOS_SEED": None, "VAST_API_KEY": None}
    )
    assert result.exit_code == 0, result.output
    assert result.stdout.splitlines()[0] == "OK"
    assert "arkindex.example.com" in result.stdout
    assert "seed-0123456789abcdef" not in result.stdout
    assert "vast-key-abcdef" not in result.stdout


def test_check_config_command_exits_2_one_line_per_problem(tmp_path):
    path = write(tmp_path, "url: nope\nfarm_id: " + FARM + "\nseed: s\nvast_api: {api_key: k}\n")
    # A real process, as an operator runs it (the integrator registers it in the CLI group).
    result = subprocess.run(
        [
            sys.executable,
            "-c",
            "from ponos_tasks.config import check_config_command as c; c()",
            path,
        ],
        capture_output=True,
        text=True,
        env={"PATH": "/usr/bin:/bin"},
        timeout=60,
    )
    assert result.returncode == 2
    assert result.stdout == ""
    assert result.stderr.splitlines() == ["url: not a valid http(s) URL"]


# ------------------------------------------------------------------ bad input, one line each

FILTERS = MINIMAL + "  offer_filters: "


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        # wrong key
        (
            MINIMAL + "  urll: https://console.vast.ai\n",
            "vast_api.urll: unknown key (did you mean 'url'?)",
        ),
        (
            MINIMAL + "sync_intervall: 5\n",
            "sync_intervall: unknown key (did you mean 'sync_interval'?)",
        ),
        # wrong type
        (
            MINIMAL + "  max_instances: [1]\n",
            "vast_api.max_instances: Input should be a valid integer",
        ),
        (MINIMAL + "logging: 5\n", "logging: Input should be a valid dictionary"),
        (
            MINIMAL + "  extra_environment: [A]\n",
            "vast_api.extra_environment: Input should be a valid dictionary",
        ),
        (
            FILTERS + "5\n",
            "vast_api.offer_filters: offer filters must be a string or a mapping, not int",
        ),
        # wrong unit: the message says which unit the key takes
        (
            MINIMAL + "  disk_gb: 50GB\n",
            "vast_api.disk_gb: Input should be a valid number, unable to parse string as a number (got '50GB'; disk of each instance, GB: a plain number, no unit)",
        ),
        (
            MINIMAL + "sync_interval: 10s\n",
            "sync_interval: Input should be a valid number, unable to parse string as a number (got '10s'; s between two syncs: a plain number, no unit)",
        ),
        (
            MINIMAL + "  loading_deadline: 2h\n",
            "vast_api.loading_deadline: Input should be a valid number, unable to parse string as a number (got '2h'; s from create to running, at most (the ceiling): a plain number, no unit)",
        ),
        # offer filters: unknown operator, unknown field, a value of the wrong type
        (FILTERS + "{gpu_ram: {gtx: 3}}\n", "vast_api.offer_filters: unknown operator 'gtx'"),
        (
            FILTERS + "gpu_nme=RTX_4090\n",
            "vast_api.offer_filters: unknown offer field 'gpu_nme' (did you mean 'gpu_name'",
        ),
        (
            FILTERS + "'gpu_ram>=lots'\n",
            "vast_api.offer_filters: offer field 'gpu_ram' needs a number, got 'lots'",
        ),
        # malformed Redis URLs (redis-py would ignore the database, or fail only when used)
        (
            MINIMAL + "redis_url: http://127.0.0.1:6379\n",
            "redis_url: not a redis://, rediss:// or unix:// URL",
        ),
        (
            MINIMAL + "redis_url: redis://127.0.0.1:port/0\n",
            "redis_url: port could not be cast to integer value as 'port'",
        ),
        (
            MINIMAL + "redis_url: redis://127.0.0.1:99999/0\n",
            "redis_url: port out of range 0-65535",
        ),
        (
            MINIMAL + "redis_url: redis://127.0.0.1:6379/zero\n",
            "redis_url: the database must be a number (/0, /1...), not 'zero'",
        ),
        (
            MINIMAL + "redis_url: redis:///0\n",
            "redis_url: no host in the URL (write redis://HOST:PORT/DB)",
        ),
        (
            MINIMAL + "redis_url: 'unix://'\n",
            "redis_url: a unix:// URL needs the socket's path (unix:///run/redis.sock)",
        ),
        # malformed service URLs
        (
            MINIMAL + "  url: http://127.0.0.1:99999\n",
            "vast_api.url: not a valid http(s) URL (port out of range 0-65535)",
        ),
        (
            MINIMAL.replace("https://arkindex.example.com/", "arkindex.example.com"),
            "url: not a valid http(s) URL",
        ),
    ],
)
def test_each_bad_value_is_one_line_naming_its_key(tmp_path, text, expected):
    found = problems(tmp_path, text)
    assert len(found) == 1, found
    assert found[0].startswith(expected), found


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            b"",
            "agent.yml: the file is empty, and the environment does not give url, farm_id, seed, vast_api",
        ),
        (b"\n# only a comment\n", "agent.yml: the file is empty"),
        (b"\xff\xfeurl: x\n", "agent.yml: not UTF-8 text (byte 0); is it the right file?"),
        (b"url: [unclosed\n", "agent.yml: not valid YAML at line 2"),
        (b"- a\n", "agent.yml: the top level must be a mapping of keys"),
        (None, "agent.yml: cannot read (No such file or directory)"),
        ("dir", "agent.yml: cannot read (Is a directory)"),
    ],
)
def test_unusable_files_are_one_line_with_status_2(tmp_path, monkeypatch, content, expected):
    monkeypatch.chdir(tmp_path)
    if content == "dir":
        (tmp_path / "agent.yml").mkdir()
    elif content is not None:
        (tmp_path / "agent.yml").write_bytes(content)
    result = CliRunner().invoke(check_config_command, ["agent.yml"], env={"PONOS_SEED": None})
    assert result.exit_code == 2, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith(expected), lines
    assert result.stdout == ""


def test_an_empty_file_is_fine_when_the_environment_gives_everything(tmp_path):
    environ = {
        "ARKINDEX_URL": "http://127.0.0.1:8000",
        "PONOS_FARM_ID": FARM,
        "PONOS_SEED": "env-seed-value",
        "VAST_API_KEY": "env-vast-key",
    }
    assert load_config(write(tmp_path, ""), environ).seed == "env-seed-value"


# ------------------------------------------------------------------------------ budget


def test_budget_keys_from_the_file_and_the_environment(tmp_path):
    text = MINIMAL + "budget:\n  max_instances: 6\n  max_dph_total: 2.5\n"
    config = load_config(write(tmp_path, text), {"PONOS__BUDGET__MAX_INSTANCES": "2"})
    assert config.budget.max_instances == 2  # the environment wins over the file
    assert config.budget.max_dph_total == 2.5
    config = load_config(
        write(tmp_path, MINIMAL),
        {"PONOS__BUDGET__MAX_SPEND_PER_DAY": "40", "PONOS__BUDGET__MAX_SPEND_PER_TASK": "1.5"},
    )
    assert (config.budget.max_spend_per_day, config.budget.max_spend_per_task) == (40, 1.5)
    assert "Budget: per task $1.5, per UTC day $40" in config.summary()


@pytest.mark.parametrize(
    ("old", "new", "value"),
    [("max_instances", "max_instances", 3), ("max_dph", "max_dph_per_instance", 0.8)],
)
def test_old_budget_keys_still_work_with_one_warning_line(tmp_path, caplog, old, new, value):
    with caplog.at_level("WARNING", logger="ponos_tasks.config"):
        config = load_config(write(tmp_path, MINIMAL + f"  {old}: {value}\n"), {})
    assert getattr(config.budget, new) == value
    warnings = [r.getMessage() for r in caplog.records]
    assert warnings == [f"vast_api.{old} is deprecated: use budget.{new}"]
    # The same through the environment, and the same value given both ways is fine.
    environ = {f"PONOS__VAST_API__{old.upper()}": str(value)}
    assert getattr(load_config(write(tmp_path, MINIMAL), environ).budget, new) == value
    both = MINIMAL + f"  {old}: {value}\nbudget:\n  {new}: {value}\n"
    assert getattr(load_config(write(tmp_path, both), {}).budget, new) == value


def test_old_and_new_budget_keys_set_differently_are_an_error(tmp_path):
    text = MINIMAL + "  max_instances: 3\nbudget:\n  max_instances: 5\n"
    assert problems(tmp_path, text) == [
        "vast_api.max_instances: deprecated, and budget.max_instances is set to another value "
        "(5, not 3): keep budget.max_instances only"
    ]
    # A bad value under the old key is reported under the key that was written.
    assert problems(tmp_path, MINIMAL + "  max_dph: -1\n") == [
        "vast_api.max_dph: Input should be greater than 0"
    ]
