"""The agent's configuration: a YAML file in the Ponos agent's shape, plus environment overrides.

Precedence (highest first):
1. the named variables of ENV_VARS below (e.g. PONOS_SEED, VAST_API_KEY, REDIS_URL), Heroku
   style: secrets need not be in the file at all;
2. the general scheme ``PONOS__<SECTION>__<KEY>=<YAML value>``, one ``__`` per level, names
   case-insensitive (``PONOS__VAST_API__DISK_GB=50``,
   ``PONOS__VAST_API__OFFER_FILTERS='{gpu_ram: {gte: 24000}}'``);
3. the file;
4. the defaults of the models below.
An empty variable counts as unset. A registry password can also name its variable in the file
(``password_env``).

Every problem is reported at once, one line each, starting with the key it is about
(``vast_api.api_key: missing (set it in the file or PONOS_VAST_API_KEY / VAST_API_KEY)``).
"""

import difflib
import logging
import os
import re
import sys
import uuid
from collections.abc import Mapping
from typing import Any, Literal
from urllib.parse import urlsplit

import click
import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ponos_tasks.logs import DEFAULT_TASK_FORMAT

GENERIC_ENV_PREFIX = "PONOS__"
CONFIG_ENV = "PONOS_CONFIG"  # the path of the configuration file

# Config key -> environment variables, first set one wins.
ENV_VARS: dict[str, tuple[str, ...]] = {
    "url": ("PONOS_ARKINDEX_URL", "ARKINDEX_URL"),
    "farm_id": ("PONOS_FARM_ID",),
    "seed": ("PONOS_SEED",),
    "agent_name": ("PONOS_AGENT_NAME",),
    "logging.level": ("PONOS_LOG_LEVEL",),
    "sentry.dsn": ("PONOS_SENTRY_DSN", "SENTRY_DSN"),
    "vast_api.url": ("PONOS_VAST_URL",),
    "vast_api.api_key": ("PONOS_VAST_API_KEY", "VAST_API_KEY"),
    "vast_api.offer_filters": ("PONOS_OFFER_FILTERS",),
    "redis_url": ("PONOS_REDIS_URL", "REDIS_URL"),
}


class ConfigError(Exception):
    """The configuration is unusable; `problems` holds one line per problem, naming the key."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


def _port_problem(value: str) -> str | None:
    """Why the URL's port is unusable (urlsplit only checks it when asked), or None."""
    try:
        _ = urlsplit(value).port
    except ValueError as error:
        return str(error).lower()  # "port out of range 0-65535", "port could not be cast..."
    return None


def _http_url(value: str) -> str:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError("not a valid http(s) URL")
    port = _port_problem(value)
    if port:
        raise ValueError(f"not a valid http(s) URL ({port})")
    return value.rstrip("/")


def _redis_url(value: str) -> str:
    """A Redis URL redis-py can use as it is meant: redis-py silently ignores a database that
    is not a number (and uses 0), and fails only at the first connection on a bad port."""
    parts = urlsplit(value)
    if parts.scheme not in ("redis", "rediss", "unix"):
        raise ValueError("not a redis://, rediss:// or unix:// URL")
    if parts.scheme == "unix":
        if not parts.path:
            raise ValueError("a unix:// URL needs the socket's path (unix:///run/redis.sock)")
        return value
    if not parts.hostname:
        raise ValueError(f"no host in the URL (write {parts.scheme}://HOST:PORT/DB)")
    port = _port_problem(value)
    if port:
        raise ValueError(port)
    database = parts.path.strip("/")
    if database and not database.isdigit():
        raise ValueError(f"the database must be a number (/0, /1...), not {database!r}")
    return value


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_default=True)


class LoggingConfig(_Section):
    level: Literal["NOTSET", "DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"] = "INFO"
    task_format: str = DEFAULT_TASK_FORMAT

    @field_validator("level", mode="before")
    @classmethod
    def _upper(cls, value):
        return value.upper() if isinstance(value, str) else value

    @field_validator("task_format")
    @classmethod
    def _formats(cls, value: str) -> str:
        record = logging.LogRecord("ponos.task", logging.INFO, __file__, 0, "message", None, None)
        try:
            logging.Formatter(value).format(record)
        except (KeyError, ValueError, TypeError) as error:
            raise ValueError(f"not a usable logging format ({error!s})") from None
        return value


class SentryConfig(_Section):
    dsn: str | None = None
    environment: str = "production"


class RegistryCredential(_Section):
    """Login for one image registry (image config lookups and Vast.ai's image_login)."""

    url: str | None = None
    host: str | None = None
    username: str
    password: str | None = None
    password_env: str | None = Field(default=None, description="variable holding the password")

    @model_validator(mode="after")
    def _complete(self):
        if not (self.url or self.host):
            raise ValueError("give url or host")
        if not self.password:
            raise ValueError(
                "password missing"
                + (f" (variable {self.password_env} is not set)" if self.password_env else "")
            )
        return self

    @property
    def registry_host(self) -> str:
        """`host[:port]` as it appears in image references."""
        value = self.host or self.url or ""
        if "//" in value:
            value = urlsplit(value).netloc
        return value.split("/")[0].lower()


class InterruptibleConfig(_Section):
    """Rent interruptible (bid) instances: cheaper, but stopped when outbid (README)."""

    enabled: bool = False
    bid_margin: float = Field(default=0.0, ge=0, description="$/h bid above the offer's min_bid")
    fallback_after: float = Field(
        default=900, gt=0, description="s outbid before the task moves to an on-demand instance"
    )


class VastConfig(_Section):
    url: str = "https://console.vast.ai"
    api_key: str
    offer_filters: dict[str, dict[str, Any]] = Field(default_factory=dict)
    disk_gb: float = Field(default=32, ge=8, description="disk of each instance, GB")
    loading_deadline: float = Field(
        default=7200, gt=0, description="s from create to running, at most (the ceiling)"
    )
    pull_stall_timeout: float = Field(
        default=600, gt=0, description="s a start may show no progress before it is given up"
    )
    start_attempts: int = Field(default=3, ge=1, description="instances tried per task")
    offline_grace: float = Field(default=600, gt=0, description="s a host may stay offline")
    machine_cooldown: float = Field(
        default=3600, ge=0, description="s every task avoids a machine that failed a start"
    )
    early_exit_window: float = Field(
        default=120, ge=0, description="s after running in which an exit is a failed start"
    )
    offer_ranking: Literal["expected_cost", "cheapest_hourly"] = Field(
        default="expected_cost", description="how offers are ordered (ranking.py)"
    )
    expected_run_seconds: float = Field(
        default=1800, ge=0, description="s a task is expected to run, before any record"
    )
    image_cache_seconds: float = Field(
        default=6 * 3600, ge=0, description="s a host is assumed to keep an image it ran"
    )
    offer_wait: float = Field(default=3600, ge=0, description="s to wait for a matching offer")
    log_read_deadline: float = Field(
        default=900, gt=0, description="s to keep reading an ended instance's log"
    )
    rate_limit_scale: float = Field(default=1.0, gt=0, description="x Vast.ai's min intervals")
    instance_reads: Literal["flat", "full_list"] = Field(
        default="flat",
        description="flat: a few filtered list calls per sync plus a spread full resync; "
        "full_list: every instance listed each sync",
    )
    full_resync_interval: float = Field(
        default=300, gt=0, description="s a whole pass of the flat view's full resync takes"
    )
    extra_environment: dict[str, str] = Field(default_factory=dict)
    registries: list[RegistryCredential] = Field(default_factory=list)
    interruptible: InterruptibleConfig = Field(default_factory=InterruptibleConfig)

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @field_validator("offer_filters", mode="before")
    @classmethod
    def _filters(cls, value):
        # Imported here: offers.py is pure and light, but the config must load even for
        # `check-config` runs that never rank offers.
        from ponos_tasks.offers import OfferFilterError, parse_filters

        if value is None:
            return {}
        try:
            return parse_filters(value)
        except OfferFilterError as error:
            raise ValueError(str(error)) from None

    @field_validator("extra_environment", mode="before")
    @classmethod
    def _env_strings(cls, value):
        if isinstance(value, Mapping):
            return {str(k): "" if v is None else str(v) for k, v in value.items()}
        return value


class BudgetConfig(_Section):
    """What the agent may spend (README, "Budgets"); prices include the configured disk."""

    max_instances: int = Field(default=4, ge=1, description="max instances alive at once")
    max_dph_per_instance: float | None = Field(
        default=None, gt=0, description="max $/h of one instance"
    )
    max_dph_total: float | None = Field(
        default=None, gt=0, description="max $/h of all live instances together"
    )
    max_spend_per_task: float | None = Field(default=None, gt=0, description="max $ per task")
    max_spend_per_day: float | None = Field(default=None, gt=0, description="max $ per UTC day")
    # Vast.ai bills seconds of its own clock, which is the agent's; the local simulator's
    # clock runs --time-scale times faster, and its stack config says so here.
    billing_time_scale: float = Field(
        default=1.0, gt=0, description="billed seconds per second of the agent's clock"
    )


# Keys that moved to the budget section: old key -> new key. The old spelling still works,
# with a one-line warning; both set to different values is an error.
MOVED_KEYS = {
    ("vast_api", "max_instances"): ("budget", "max_instances"),
    ("vast_api", "max_dph"): ("budget", "max_dph_per_instance"),
}


def _move_deprecated_keys(data: Any, moved: dict[str, str] | None = None) -> Any:
    """Move the old keys of MOVED_KEYS to their new home (before validation); `moved` gets
    new name -> old name for each key moved (a problem with it then names the old one)."""
    if not isinstance(data, dict):
        return data
    for (old_section, old_key), (new_section, new_key) in MOVED_KEYS.items():
        section = data.get(old_section)
        if not isinstance(section, dict) or old_key not in section:
            continue
        value = section.pop(old_key)
        old_name, new_name = f"{old_section}.{old_key}", f"{new_section}.{new_key}"
        target = data.get(new_section)
        if target is None:
            target = data[new_section] = {}
        if not isinstance(target, dict):
            continue  # the new section's own error says what is wrong with it
        if new_key in target and target[new_key] != value:
            raise ValueError(
                f"{old_name}: deprecated, and {new_name} is set to another value "
                f"({target[new_key]!r}, not {value!r}): keep {new_name} only"
            )
        target[new_key] = value
        if moved is not None:
            moved[new_name] = old_name
        logging.getLogger(__name__).warning("%s is deprecated: use %s", old_name, new_name)
    return data


class AgentConfig(_Section):
    url: str
    farm_id: uuid.UUID
    seed: str = Field(min_length=1)
    # With farm_id and seed, the agent's stable identity on Arkindex: re-registering after a
    # total loss of memory (Redis gone) yields the same agent, so it keeps its tasks.
    agent_name: str = Field(default="ponos-vast", pattern=r"^[-a-zA-Z0-9_]{1,64}$")
    data_dir: str | None = Field(default=None, description="Ponos key, unused in Vast.ai mode")
    pid_file: str | None = Field(default=None, description="Ponos key, unused in Vast.ai mode")
    logging: LoggingConfig = Field(default_factory=LoggingConfig)
    sentry: SentryConfig = Field(default_factory=SentryConfig)
    vast_api: VastConfig
    budget: BudgetConfig = Field(default_factory=BudgetConfig)
    sync_interval: float = Field(default=10, gt=0, description="s between two syncs")
    logs_interval: float = Field(
        default=60, gt=0, description="s between log uploads (at least: log_pacing.py)"
    )
    logs_max_mb: float = Field(default=64, gt=0, description="MB of an instance log kept")
    redis_url: str = "redis://127.0.0.1:6379/0"

    @field_validator("url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _http_url(value)

    @model_validator(mode="before")
    @classmethod
    def _moved_keys(cls, data: Any) -> Any:
        return _move_deprecated_keys(data)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        return _redis_url(value)

    def secrets(self) -> list[str]:
        """Every secret value held (for redaction), longest first, no empty ones."""
        values = [self.seed, self.vast_api.api_key, self.sentry.dsn]
        values += [registry.password for registry in self.vast_api.registries]
        dsn_key = urlsplit(self.sentry.dsn).username if self.sentry.dsn else None
        redis_password = urlsplit(self.redis_url).password
        values += [dsn_key, redis_password]
        return sorted({v for v in values if v}, key=len, reverse=True)

    def redis_location(self) -> str:
        """The Redis URL without its password (for messages)."""
        parts = urlsplit(self.redis_url)
        return (
            f"{parts.scheme}://{parts.hostname or ''}"
            + (f":{parts.port}" if parts.port else "")
            + (parts.path or "")
        )

    def summary(self) -> list[str]:
        """Human lines describing the config, without any secret."""
        vast, budget = self.vast_api, self.budget
        redis_where = self.redis_location()
        filters = (
            " ".join(
                f"{field}.{op}={value!r}"
                for field, ops in vast.offer_filters.items()
                for op, value in ops.items()
            )
            or "(none: any offer)"
        )
        return [
            f"Arkindex: {self.url} (farm {self.farm_id})",
            f"Vast.ai: {vast.url}",
            f"Offer filters: {filters}",
            f"Instances: at most {budget.max_instances}, disk {vast.disk_gb:g} GB",
            "Budget: " + budget_summary(budget),
            f"Loading deadline {vast.loading_deadline:g} s, {vast.start_attempts} start "
            f"attempts per task, wait up to {vast.offer_wait:g} s for an offer",
            f"Sync every {self.sync_interval:g} s, logs every {self.logs_interval:g} s, "
            f"Redis {redis_where}",
            "Registries: " + (", ".join(r.registry_host for r in vast.registries) or "(none)"),
        ]


def budget_summary(budget: BudgetConfig) -> str:
    """The money limits in force, in one line."""
    parts = [
        f"{label} ${value:g}{unit}"
        for label, value, unit in (
            ("per instance", budget.max_dph_per_instance, "/h"),
            ("in all", budget.max_dph_total, "/h"),
            ("per task", budget.max_spend_per_task, ""),
            ("per UTC day", budget.max_spend_per_day, ""),
        )
        if value is not None
    ]
    return ", ".join(parts) if parts else "no money limit"


# ------------------------------------------------------------------------------ loading


def _set_path(data: dict, path: list[str], value: Any) -> None:
    node = data
    for part in path[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = node[part] = {}
        node = child
    node[path[-1]] = value


def _apply_environment(data: dict, environ: Mapping[str, str]) -> None:
    for name in sorted(environ):
        if name.upper().startswith(GENERIC_ENV_PREFIX) and environ[name] != "":
            path = [part.lower() for part in name[len(GENERIC_ENV_PREFIX) :].split("__") if part]
            if path:
                try:
                    value = yaml.safe_load(environ[name])
                except yaml.YAMLError:
                    value = environ[name]
                _set_path(data, path, value)
    for key, names in ENV_VARS.items():
        for name in names:
            if environ.get(name):
                _set_path(data, key.split("."), environ[name])
                break
    # Registry passwords named by `password_env`.
    registries = (
        (data.get("vast_api") or {}).get("registries")
        if isinstance(data.get("vast_api"), dict)
        else None
    )
    if isinstance(registries, list):
        for entry in registries:
            variable = str(entry.get("password_env") or "") if isinstance(entry, dict) else ""
            if variable and environ.get(variable):
                entry["password"] = environ[variable]


def _key_name(location: tuple) -> str:
    name = ""
    for part in location:
        name += f"[{part}]" if isinstance(part, int) else (f".{part}" if name else str(part))
    return name


def _section_model(location: tuple) -> Any:
    """The model holding the key at `location` (None when it is not a model's key)."""
    model: Any = AgentConfig
    for part in location[:-1]:
        if isinstance(part, int):
            continue
        field = model.model_fields.get(part)
        if field is None:
            return None
        annotation = field.annotation
        args = getattr(annotation, "__args__", ())
        model = next(
            (a for a in (annotation, *args) if isinstance(a, type) and issubclass(a, BaseModel)),
            None,
        )
        if model is None:
            return None
    return model


def _known_keys(location: tuple) -> list[str]:
    model = _section_model(location)
    return list(model.model_fields) if model is not None else []


# pydantic's error types for a value that is not the number a key takes.
_NUMBER_ERRORS = {"float_parsing", "float_type", "int_parsing", "int_type", "int_from_float"}


def _problem(error: dict) -> str:
    location = tuple(
        part for part in error["loc"] if not (isinstance(part, str) and "[" in part)
    )  # drop pydantic's union branch names
    key = _key_name(location) or "(top level)"
    if not location and re.match(
        r"^[a-z_]+\.[a-z_.]+: ", error["msg"].removeprefix("Value error, ")
    ):
        return error["msg"].removeprefix("Value error, ")  # a model-wide check naming its key
    kind = error["type"]
    if kind == "missing":
        names = ENV_VARS.get(key)
        where = f" (set it in the file or {' / '.join(names)})" if names else ""
        return f"{key}: missing{where}"
    if kind == "extra_forbidden":
        close = difflib.get_close_matches(str(location[-1]), _known_keys(location), n=1)
        hint = f" (did you mean '{close[0]}'?)" if close else ""
        return f"{key}: unknown key{hint}"
    message = error["msg"]
    for prefix in ("Value error, ", "Assertion failed, "):
        if message.startswith(prefix):
            message = message[len(prefix) :]
    if kind in _NUMBER_ERRORS and location and isinstance(error.get("input"), str):
        # "50GB", "10s", "1h": say which unit the key takes, so the fix is obvious.
        model = _section_model(location)
        field = model.model_fields.get(str(location[-1])) if model is not None else None
        if field is not None and field.description:
            message += (
                f" (got {error.get('input')!r}; {field.description}: a plain number, no unit)"
            )
    return f"{key}: {message}"


def load_config(path: str | None, environ: Mapping[str, str] = os.environ) -> AgentConfig:
    """Read `path` (optional: everything may come from the environment) and validate."""
    data: Any = {}
    empty_file = False
    if path is not None:
        try:
            with open(path, encoding="utf-8") as handle:
                data = yaml.safe_load(handle)
        except OSError as error:
            raise ConfigError([f"{path}: cannot read ({error.strerror or error})"]) from None
        except UnicodeDecodeError as error:
            raise ConfigError(
                [f"{path}: not UTF-8 text (byte {error.start}); is it the right file?"]
            ) from None
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark else ""
            raise ConfigError([f"{path}: not valid YAML{where}"]) from None
        if data is None:
            data, empty_file = {}, True
        if not isinstance(data, dict):
            raise ConfigError([f"{path}: the top level must be a mapping of keys"])
    _apply_environment(data, environ)
    moved: dict[str, str] = {}
    try:
        _move_deprecated_keys(data, moved)
    except ValueError as error:
        raise ConfigError([str(error)]) from None
    try:
        return AgentConfig.model_validate(data)
    except ValidationError as error:
        problems = list(dict.fromkeys(_problem(e) for e in error.errors()))
        for new_name, old_name in moved.items():  # name the key the user wrote
            problems = [
                old_name + line[len(new_name) :] if line.startswith(new_name + ":") else line
                for line in problems
            ]
        if empty_file:
            # Most likely the wrong file (or one truncated by an editor): one line, not one
            # per missing key.
            missing = [line.split(":", 1)[0] for line in problems]
            problems = [
                f"{path}: the file is empty, and the environment does not give {', '.join(missing)}"
            ]
        raise ConfigError(problems) from None


_current: AgentConfig | None = None


def current_config() -> AgentConfig:
    """This process's configuration ($PONOS_CONFIG and the environment), read once."""
    global _current
    if _current is None:
        _current = load_config(os.environ.get(CONFIG_ENV))
    return _current


def redis_url_from_environment(environ: Mapping[str, str] = os.environ) -> str:
    """The Redis URL as the configuration would take it from the environment alone."""
    for name in ENV_VARS["redis_url"]:
        if environ.get(name):
            return environ[name]
    return AgentConfig.model_fields["redis_url"].default


@click.command("check-config")
# A plain path: load_config says in one line what is wrong with it (missing, a directory,
# unreadable), where click would print its usage text.
@click.argument("file", type=click.Path())
@click.option(
    "--connect",
    is_flag=True,
    help="Also check that Redis, Arkindex (registering the agent, as the worker does) and "
    "Vast.ai (one authenticated call) answer: exit status 1 and one line if one does not.",
)
def check_config_command(file: str, connect: bool):
    """Validate an agent configuration FILE (and the environment overrides).

    Prints OK and a summary without secrets, or one line per problem and exits with 2.
    """
    try:
        config = load_config(file)
    except ConfigError as error:
        for problem in error.problems:
            click.echo(problem, err=True)
        sys.exit(2)
    if connect:
        # Imported here: a plain check-config must not need the clients.
        from ponos_tasks.agent import AgentContext, service_problem

        # The clients log each retry; here only the verdict is wanted, on one line.
        logging.getLogger().addHandler(logging.NullHandler())
        problem = service_problem(AgentContext(config))
        if problem is not None:
            click.echo(problem, err=True)
            sys.exit(1)
    click.echo("OK")
    for line in config.summary():
        click.echo(f"  {line}")
