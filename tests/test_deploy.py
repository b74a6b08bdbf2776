"""Deployment files: Procfile, docker-compose.yml, Dockerfile, .dockerignore (no Docker engine).

The compose file is validated against the vendored Compose Specification schema; the Procfile
and compose must run the same commands, on exactly celeryconfig.QUEUES (the queues
`ponos-vast run` uses too), with one beat, an authenticated Flower and a persistent, private
Redis. The local profile's stack entry point is started for real on loopback.
"""

from __future__ import annotations

import fnmatch
import json
import os
import shlex
import signal
import stat
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest
import requests
import yaml

import celeryconfig
from ponos_tasks import supervisor
from ponos_tasks.config import load_config
from tests.conftest import free_port

ROOT = Path(__file__).resolve().parent.parent
SCHEMA = ROOT / "tests" / "data" / "compose_spec.json"
AUTH_GUARD = "${FLOWER_BASIC_AUTH:?"


# ---------------------------------------------------------------------------- parsing


def parse_procfile(text: str) -> dict[str, str]:
    processes = {}
    for line in text.splitlines():
        if not line.strip() or line.lstrip().startswith("#"):
            continue
        name, sep, command = line.partition(":")
        assert sep and name.strip().isidentifier(), f"not a Procfile line: {line!r}"
        assert name.strip() not in processes, f"process type {name} defined twice"
        processes[name.strip()] = command.strip()
    return processes


def compose_shell_text(command) -> str:
    """A compose `command` as the shell line it amounts to (`$$` is compose's escaped `$`)."""
    if isinstance(command, list):
        if (
            len(command) == 3
            and command[0] in ("sh", "/bin/sh", "bash", "/bin/bash")
            and command[1] == "-c"
        ):
            return command[2].replace("$$", "$")
        return shlex.join(command)
    return str(command).replace("$$", "$")


def tokens(shell_text: str) -> list[str]:
    """Whitespace- and quoting-insensitive form of a command line."""
    return shlex.split(shell_text)


def celery_invocation(argv: list[str]) -> list[str] | None:
    """The arguments after `celery` (or `python -m celery`), or None if it runs no celery."""
    for index, word in enumerate(argv):
        if Path(word).name == "celery":
            return argv[index + 1 :]
        if word == "-m" and index + 1 < len(argv) and argv[index + 1] == "celery":
            return argv[index + 2 :]
    return None


def subcommand(argv: list[str]) -> str | None:
    args = celery_invocation(argv)
    if args is None:
        return None
    rest = list(args)
    while rest and rest[0].startswith("-"):
        option = rest.pop(0)
        if option in ("-A", "--app", "-b", "--broker", "--workdir", "--config") and rest:
            rest.pop(0)
    return rest[0] if rest else None


def option_values(argv: list[str], *names: str) -> list[str]:
    values = []
    for index, word in enumerate(argv):
        for name in names:
            if word == name and index + 1 < len(argv):
                values.append(argv[index + 1])
            elif name.startswith("--") and word.startswith(name + "="):
                values.append(word.split("=", 1)[1])
            elif not name.startswith("--") and word.startswith(name) and word != name:
                values.append(word[len(name) :])  # -Qsync,vast
    return values


def queues_of(argv: list[str]) -> list[str]:
    found = option_values(argv, "-Q", "--queues")
    assert len(found) == 1, f"expected one -Q/--queues in {argv}"
    return found[0].split(",")


def mount_target(volume: str) -> str:
    """`source:target[:mode]` -> target (the source may hold `${VAR:-default}`)."""
    parts = str(volume).rsplit(":", 2)
    return parts[-2] if parts[-1] in ("ro", "rw", "z", "Z") else parts[-1]


def dockerfile_instructions(text: str) -> list[tuple[str, str]]:
    logical, current = [], ""
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            current += line[:-1] + " "
            continue
        current += line
        keyword, _, rest = current.partition(" ")
        logical.append((keyword.upper(), rest.strip()))
        current = ""
    return logical


def dockerignored(path: str, patterns: list[str]) -> bool:
    parts = Path(path).parts
    prefixes = [str(Path(*parts[:i])) for i in range(1, len(parts) + 1)]
    ignored = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").rstrip("/")
        bare = pattern[3:] if pattern.startswith("**/") else None
        hit = any(fnmatch.fnmatch(prefix, pattern) for prefix in prefixes) or (
            bare is not None and any(fnmatch.fnmatch(part, bare) for part in parts)
        )
        if hit:
            ignored = not negate
    return ignored


# ---------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def procfile() -> dict[str, list[str]]:
    text = (ROOT / "Procfile").read_text(encoding="utf-8")
    return {name: command for name, command in parse_procfile(text).items()}


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load((ROOT / "docker-compose.yml").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def compose_commands(compose) -> dict[str, str]:
    return {
        name: compose_shell_text(service["command"])
        for name, service in compose["services"].items()
        if "command" in service
    }


@pytest.fixture(scope="module")
def dockerfile() -> list[tuple[str, str]]:
    return dockerfile_instructions((ROOT / "Dockerfile").read_text(encoding="utf-8"))


# ---------------------------------------------------------------------------- compose schema


def test_compose_file_is_valid_against_the_compose_specification(compose):
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    # The schema declares draft 2019-09 with an http:// id jsonschema does not map: be explicit.
    assert "draft/2019-09" in schema["$schema"]
    validator_class = jsonschema.Draft201909Validator
    validator_class.check_schema(schema)
    errors = sorted(validator_class(schema).iter_errors(compose), key=lambda e: list(e.path))
    assert not errors, "\n".join(f"{list(e.path)}: {e.message}" for e in errors)


def test_the_schema_check_rejects_what_compose_rejects(compose):
    """The validation above can fail: a top-level `name:` and a bad key are refused."""
    schema = json.loads(SCHEMA.read_text(encoding="utf-8"))
    validator = jsonschema.Draft201909Validator(schema)
    assert not validator.is_valid({**compose, "name": "ponos-vast"})
    broken = json.loads(json.dumps(compose))
    broken["services"]["worker"]["comand"] = "typo"
    assert not validator.is_valid(broken)


# ---------------------------------------------------------------------------- parity


def test_procfile_has_worker_beat_and_flower(procfile):
    assert set(procfile) == {"worker", "beat", "flower"}


def test_every_procfile_process_has_a_compose_service_with_the_same_command(
    procfile, compose_commands
):
    for name, command in procfile.items():
        assert name in compose_commands, f"no compose service {name!r} for Procfile {name!r}"
        assert tokens(compose_commands[name]) == tokens(command), (
            f"{name}: Procfile runs\n  {command}\ncompose runs\n  {compose_commands[name]}"
        )


def test_dockerfile_default_command_is_the_procfile_worker(procfile, dockerfile):
    cmds = [rest for keyword, rest in dockerfile if keyword == "CMD"]
    assert len(cmds) == 1
    argv = json.loads(cmds[0])  # exec form: PID 1 is celery and gets the signals
    assert tokens(procfile["worker"]) == argv


def test_worker_queues_are_exactly_the_configured_queues_everywhere(
    procfile, compose_commands, dockerfile
):
    configured = sorted(celeryconfig.QUEUES)
    assert sorted(q.name for q in celeryconfig.task_queues) == configured
    argvs = {
        "Procfile worker": tokens(procfile["worker"]),
        "compose worker": tokens(compose_commands["worker"]),
        "Dockerfile CMD": json.loads(next(r for k, r in dockerfile if k == "CMD")),
        "supervisor.worker_command": supervisor.worker_command(),
    }
    for where, argv in argvs.items():
        assert subcommand(argv) == "worker", where
        queues = queues_of(argv)
        assert len(queues) == len(set(queues)), f"{where}: a queue listed twice"
        assert sorted(queues) == configured, f"{where}: queues {queues} != {configured}"
        assert option_values(argv, "--prefetch-multiplier") == ["1"], where


def test_beat_runs_exactly_once(procfile, compose):
    beats = [name for name, command in procfile.items() if subcommand(tokens(command)) == "beat"]
    assert beats == ["beat"]
    compose_beats = []
    for name, service in compose["services"].items():
        argv = tokens(compose_shell_text(service.get("command", "")))
        if subcommand(argv) == "beat":
            compose_beats.append(name)
            assert service.get("scale", 1) == 1
            assert service.get("deploy", {}).get("replicas", 1) == 1
    assert compose_beats == ["beat"]
    # No embedded beat in any worker (`worker -B`): every scaled worker would schedule too.
    for argv in [tokens(c) for c in procfile.values()] + [
        tokens(compose_shell_text(s.get("command", ""))) for s in compose["services"].values()
    ]:
        if subcommand(argv) == "worker":
            assert "-B" not in argv and "--beat" not in argv


# ---------------------------------------------------------------------------- Flower


def flower_lines(procfile, compose_commands) -> dict[str, str]:
    lines = {f"Procfile {name}": c for name, c in procfile.items()}
    lines.update({f"compose {name}": c for name, c in compose_commands.items()})
    return {where: line for where, line in lines.items() if subcommand(tokens(line)) == "flower"}


def test_flower_is_never_started_without_auth(procfile, compose, compose_commands):
    found = flower_lines(procfile, compose_commands)
    assert set(found) == {"Procfile flower", "compose flower"}
    for where, line in found.items():
        guarded = line.split("celery", 1)[0]
        argv = tokens(line)
        assert (
            AUTH_GUARD in guarded
            or option_values(argv, "--basic-auth", "--basic_auth")
            or option_values(argv, "--auth")
        ), f"{where}: Flower without auth"
        assert "FLOWER_UNAUTHENTICATED_API" not in line
    for name, service in compose["services"].items():
        assert "FLOWER_UNAUTHENTICATED_API" not in (service.get("environment") or {}), name
    flower = compose["services"]["flower"]
    assert "FLOWER_BASIC_AUTH" in flower["environment"]
    for port in flower.get("ports", []):
        assert str(port).startswith("127.0.0.1:"), f"Flower published beyond loopback: {port}"


def test_every_flower_lists_tasks_with_their_arguments(procfile, compose_commands):
    """Flower's task list shows the arguments (the Arkindex task id) however it is started:
    `ponos-vast run`'s supervisor, the Procfile, compose."""
    from ponos_tasks.supervisor import FLOWER_TASK_COLUMNS, flower_command

    assert FLOWER_TASK_COLUMNS in flower_command(5555)
    columns = FLOWER_TASK_COLUMNS.split("=", 1)[1].split(",")
    assert columns[:2] == ["name", "args"]
    for where, line in flower_lines(procfile, compose_commands).items():
        assert FLOWER_TASK_COLUMNS in tokens(line), where


@pytest.mark.parametrize("source", ["Procfile", "compose"])
def test_the_flower_line_refuses_to_start_without_credentials(
    source, procfile, compose_commands, tmp_path
):
    """Run the real shell line with a stand-in `celery` (so nothing listens anywhere)."""
    line = procfile["flower"] if source == "Procfile" else compose_commands["flower"]
    stub = tmp_path / "celery"
    stub.write_text('#!/bin/sh\necho "STARTED $*"\n')
    stub.chmod(stub.stat().st_mode | stat.S_IXUSR)
    base = {"PATH": f"{tmp_path}:/usr/bin:/bin", "PORT": "5999"}
    for missing in ({}, {"FLOWER_BASIC_AUTH": ""}):
        run = subprocess.run(
            ["sh", "-c", line], env={**base, **missing}, capture_output=True, text=True, timeout=10
        )
        assert run.returncode != 0 and "STARTED" not in run.stdout
        assert "FLOWER_BASIC_AUTH" in run.stderr
    run = subprocess.run(
        ["sh", "-c", line],
        env={**base, "FLOWER_BASIC_AUTH": "u:p"},
        capture_output=True,
        text=True,
        timeout=10,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[:4] == ["STARTED", "-A", "ponos_tasks.app", "flower"]
    assert "--port=5999" in run.stdout and "u:p" not in run.stdout  # not in argv (ps)


def test_flower_takes_basic_auth_from_its_environment_variable(monkeypatch):
    """The guard only checks FLOWER_BASIC_AUTH; Flower itself must read it (flower 2.x)."""
    from flower.command import apply_env_options
    from flower.options import options

    before = options.basic_auth
    for name in [n for n in os.environ if n.startswith("FLOWER_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("FLOWER_BASIC_AUTH", "alice:secret,bob:other")
    try:
        apply_env_options()
        assert options.basic_auth == ["alice:secret", "bob:other"]
    finally:
        options.basic_auth = before


# ---------------------------------------------------------------------------- Flower of `run`

SOURCE_DIRS = ("ponos_tasks", "scripts", "benchmarks")


def calls_naming_flower() -> set[tuple[str, str]]:
    """(module, callee) of every call, in the project's own code, with a "flower" argument:
    the places that could start a Flower process outside the Procfile and compose."""
    import ast

    found = set()
    for folder in SOURCE_DIRS:
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                if isinstance(node, ast.Call) and any(
                    isinstance(arg, ast.Constant) and arg.value == "flower" for arg in node.args
                ):
                    found.add((str(path.relative_to(ROOT)), ast.unparse(node.func)))
    return found


def test_every_place_that_starts_flower_requires_auth(tmp_path, procfile, compose_commands):
    """Procfile and compose refuse to start Flower without FLOWER_BASIC_AUTH (tests above);
    the only other place is the supervisor (`ponos-vast run`, the demo, the harness), which
    always hands Flower credentials, in its environment only, and binds it to loopback."""
    assert set(flower_lines(procfile, compose_commands)) == {"Procfile flower", "compose flower"}
    assert calls_naming_flower() == {
        ("ponos_tasks/supervisor.py", "celery_command"),  # flower_command()
        ("ponos_tasks/supervisor.py", "self._spawn"),  # AgentProcesses.start()
    }
    agent = supervisor.AgentProcesses(
        tmp_path / "agent.yml",
        tmp_path / "logs",
        "redis://127.0.0.1:1/0",
        flower_port=5999,
        extra_env={"FLOWER_BASIC_AUTH": "", "FLOWER_UNAUTHENTICATED_API": "true"},
    )
    access = agent.setup_flower()
    env = agent.env("flower")
    assert supervisor.parse_basic_auth(env["FLOWER_BASIC_AUTH"]) == ["ponos"]
    assert "FLOWER_UNAUTHENTICATED_API" not in env
    argv = supervisor.flower_command(agent.flower_port)
    assert subcommand(argv) == "flower"
    assert option_values(argv, "--address") == ["127.0.0.1"]
    password = env["FLOWER_BASIC_AUTH"].split(":", 1)[1]
    assert not any(password in word for word in argv)  # never on the command line (ps)
    for other in ("worker1", "beat1"):  # the credentials reach Flower only
        assert "FLOWER_BASIC_AUTH" not in agent.env(other)
    assert password not in access.notice() and str(access.credentials_file) in access.notice()


@pytest.mark.parametrize("value", ["alice", "alice:", ":pw", "alice:pw,bob", "alice:pw,"])
def test_a_malformed_flower_basic_auth_starts_nothing(tmp_path, value):
    agent = supervisor.AgentProcesses(
        tmp_path / "agent.yml",
        tmp_path / "logs",
        "redis://127.0.0.1:1/0",
        flower_port=5999,
        extra_env={"FLOWER_BASIC_AUTH": value},
    )
    with pytest.raises(supervisor.FlowerAuthError) as raised:
        agent.start()
    assert agent.processes == {}
    assert "user:password" in str(raised.value)
    assert value not in str(raised.value)  # never quotes the value (it holds passwords)


def listening_addresses(port: int) -> set[str]:
    """Local addresses of the TCP sockets listening on `port` (Linux /proc/net/tcp{,6})."""
    found = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with open(table) as lines:
            next(lines)
            for line in lines:
                local, state = line.split()[1], line.split()[3]
                address, _, hex_port = local.partition(":")
                if state == "0A" and int(hex_port, 16) == port:  # 0A: LISTEN
                    found.add(address)
    return found


LOOPBACK = {"0100007F", "00000000000000000000000001000000"}  # 127.0.0.1, ::1


def start_flower(tmp_path, redis_url, **extra_env) -> supervisor.AgentProcesses:
    """Flower alone (no worker or beat), through the supervisor, on a free loopback port."""
    config = tmp_path / "agent.yml"
    config.write_text(
        "url: http://127.0.0.1:9\nfarm_id: 00000000-0000-0000-0000-000000000001\n"
        f'seed: "{"ab" * 32}"\nredis_url: {redis_url}\n'
        "vast_api: {url: 'http://127.0.0.1:9', api_key: not-a-key, offer_filters: {}}\n"
    )
    agent = supervisor.AgentProcesses(
        config,
        tmp_path / "logs",
        redis_url,
        workers=0,
        beats=0,
        flower_port=free_port(),
        extra_env=extra_env,
    ).start()
    url = agent.flower.url
    deadline = time.monotonic() + 60
    while True:
        assert agent.check_alive() == [], (tmp_path / "logs" / "flower.log").read_text()
        try:
            if requests.get(url + "healthcheck", timeout=2).status_code == 200:
                return agent
        except requests.ConnectionError:
            pass
        assert time.monotonic() < deadline, "Flower did not answer in 60 s"
        time.sleep(0.3)


def flower_status(agent, path: str, auth=None) -> int:
    return requests.get(agent.flower.url + path, auth=auth, timeout=10).status_code


@pytest.mark.timeout(120)
def test_flower_started_by_the_supervisor_requires_a_generated_password(tmp_path, redis_url):
    """No FLOWER_BASIC_AUTH: user `ponos` and a password of this run, in a 0600 file of the
    log dir; 401 without it, 200 with it; loopback only; the password in no argv or log."""
    agent = start_flower(tmp_path, redis_url, FLOWER_BASIC_AUTH="")
    try:
        access = agent.flower
        path = tmp_path / "logs" / "flower-credentials"
        assert access.credentials_file == path
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
        user, _, password = path.read_text().strip().partition(":")
        assert user == "ponos" and len(password) >= 32
        for page in ("", "api/tasks", "api/workers", "tasks"):
            assert flower_status(agent, page) == 401, page
            assert flower_status(agent, page, (user, password + "x")) == 401, page
            assert flower_status(agent, page, (user, password)) == 200, page
        assert listening_addresses(agent.flower_port) <= LOOPBACK
        assert listening_addresses(agent.flower_port)
        pid = agent.processes["flower"].pid
        assert password not in Path(f"/proc/{pid}/cmdline").read_text()
        assert f"FLOWER_BASIC_AUTH={user}:{password}" in Path(f"/proc/{pid}/environ").read_text(
            errors="replace"
        )
    finally:
        agent.stop()
    assert password not in (tmp_path / "logs" / "flower.log").read_text()
    assert not path.exists()  # the run's password goes with the run


@pytest.mark.timeout(120)
def test_flower_started_by_the_supervisor_takes_the_operators_credentials(tmp_path, redis_url):
    """FLOWER_BASIC_AUTH wins (no file written); FLOWER_UNAUTHENTICATED_API opens nothing."""
    agent = start_flower(
        tmp_path,
        redis_url,
        FLOWER_BASIC_AUTH="alice:first-pw,bob:second:pw",
        FLOWER_UNAUTHENTICATED_API="true",
    )
    try:
        assert agent.flower.credentials_file is None
        assert not (tmp_path / "logs" / "flower-credentials").exists()
        assert "alice, bob" in agent.flower.notice() and "pw" not in agent.flower.notice()
        assert flower_status(agent, "api/tasks") == 401
        assert flower_status(agent, "api/tasks", ("alice", "first-pw")) == 200
        assert flower_status(agent, "api/tasks", ("bob", "second:pw")) == 200
        assert flower_status(agent, "api/tasks", ("ponos", "first-pw")) == 401
    finally:
        agent.stop()


# ---------------------------------------------------------------------------- Redis, env


def test_compose_redis_is_persistent_and_private(compose):
    redis = compose["services"]["redis"]
    argv = tokens(compose_shell_text(redis["command"]))
    assert option_values(argv, "--appendonly") == ["yes"]
    assert option_values(argv, "--maxmemory-policy") == ["noeviction"]
    assert "ports" not in redis
    assert any(str(v).endswith(":/data") for v in redis.get("volumes", []))


def test_compose_restarts_a_crashed_worker_beat_or_redis(compose):
    """A process that dies (a worker after a broker failure, Redis itself) is started again
    by Docker, as `ponos-vast run` and Heroku-style platforms do (README "Deploy")."""
    services = compose["services"]
    for name in ("redis", "worker", "beat", "stack"):
        assert services[name]["restart"] in ("unless-stopped", "always"), name


def test_agent_services_read_a_mounted_config_and_shut_down_softly(compose):
    services = compose["services"]
    for name in ("worker", "beat", "flower"):
        env = services[name]["environment"]
        assert env["PONOS_CONFIG"].startswith("${PONOS_COMPOSE_CONFIG:-/run/ponos-local/")
        assert env["REDIS_URL"] == "redis://redis:6379/0"
        mounts = [mount_target(v) for v in services[name]["volumes"]]
        assert "/run/ponos-local" in mounts and "/etc/ponos" in mounts
    assert services["worker"]["environment"]["REMAP_SIGTERM"] == "SIGQUIT"
    stack = services["stack"]
    assert stack["profiles"] == ["local"]
    assert "--config-file" in stack["command"]
    written = stack["command"][stack["command"].index("--config-file") + 1]
    assert written == "/run/ponos-local/agent.yml"
    assert [name for name, s in services.items() if "local" in s.get("profiles", [])] == ["stack"]


# ---------------------------------------------------------------------------- Dockerfile


def test_dockerfile_base_image_user_and_copied_paths(dockerfile):
    froms = [rest for keyword, rest in dockerfile if keyword == "FROM"]
    assert froms == ["python:3.11-slim"]
    users = [rest for keyword, rest in dockerfile if keyword == "USER"]
    assert users and users[-1] not in ("root", "0"), "the image must not run as root"
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    copies = [rest for keyword, rest in dockerfile if keyword in ("COPY", "ADD")]
    assert copies
    for rest in copies:
        words = [w for w in shlex.split(rest) if not w.startswith("--")]
        for source in words[:-1]:
            assert (ROOT / source).exists(), f"COPY {source}: no such path"
            assert not dockerignored(source, patterns), f"COPY {source}: excluded by .dockerignore"
    copied = {w for rest in copies for w in shlex.split(rest)[:-1]}
    # What `pip install .` and Celery's `-A ponos_tasks.app` need at run time.
    assert {"pyproject.toml", "README.md", "celeryconfig.py", "ponos_tasks"} <= copied


def test_the_production_image_has_no_simulators_and_the_local_stack_has_them(dockerfile, compose):
    """The `sim` extra (Flask, moto, zstandard) only in the local profile's `stack` image."""
    pyproject = (ROOT / "pyproject.toml").read_text(encoding="utf-8")
    assert "\nsim = [" in pyproject
    args = {
        rest.split("=", 1)[0]: rest.split("=", 1)[1] if "=" in rest else None
        for keyword, rest in dockerfile
        if keyword == "ARG"
    }
    assert args.get("PONOS_EXTRAS") == '""'
    installs = [rest for keyword, rest in dockerfile if keyword == "RUN" and "pip install" in rest]
    assert len(installs) == 1 and '".${PONOS_EXTRAS:+[$PONOS_EXTRAS]}"' in installs[0]
    for extras, expected in (("", "."), ("sim", ".[sim]")):
        line = subprocess.run(
            ["sh", "-c", 'printf %s ".${PONOS_EXTRAS:+[$PONOS_EXTRAS]}"'],
            env={"PONOS_EXTRAS": extras},
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout
        assert line == expected
    services = compose["services"]
    assert services["stack"]["build"]["args"] == {"PONOS_EXTRAS": "sim"}
    assert services["stack"]["image"] != services["worker"]["image"]
    for name in ("worker", "beat", "flower"):
        build = services[name]["build"]
        assert build == "." or not (build.get("args") or {}).get("PONOS_EXTRAS"), name


def test_dockerignore_keeps_local_configs_and_secrets_out():
    patterns = [
        line.strip()
        for line in (ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for path in (
        ".env",
        "config/agent.yml",
        ".venv/bin/python",
        ".git/HEAD",
        "ponos_tasks/__pycache__/x.pyc",
    ):
        assert dockerignored(path, patterns), path
    assert not dockerignored("ponos_tasks/app.py", patterns)


# ---------------------------------------------------------------------------- local stack


def test_compose_stack_entry_point_serves_and_writes_a_valid_agent_config(tmp_path):
    """`stack` service's entry point, on loopback: the config it writes works as written."""
    ports = [free_port() for _ in range(3)]
    config_file = tmp_path / "run" / "agent.yml"
    argv = [
        sys.executable,
        "-m",
        "ponos_tasks.simulators.compose_entry",
        "--host",
        "127.0.0.1",
        "--public-host",
        "127.0.0.1",
        "--arkindex-port",
        str(ports[0]),
        "--vast-port",
        str(ports[1]),
        "--s3-port",
        str(ports[2]),
        "--redis-url",
        "redis://redis:6379/0",
        "--config-file",
        str(config_file),
    ]

    def written() -> tuple | None:
        try:
            info = config_file.stat()
        except FileNotFoundError:
            return None
        return info.st_ino, info.st_mtime_ns

    def start() -> subprocess.Popen:
        before = written()
        process = subprocess.Popen(
            argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT
        )
        deadline = time.monotonic() + 30
        while written() in (None, before):  # a fresh file (os.replace: a new inode)
            assert process.poll() is None, process.stdout.read()
            assert time.monotonic() < deadline, "no config written in 30 s"
            time.sleep(0.1)
        return process

    def stop(process: subprocess.Popen) -> str:
        process.send_signal(signal.SIGTERM)
        output, _ = process.communicate(timeout=20)
        assert process.returncode == 0, output
        return output

    process = start()
    try:
        config = load_config(str(config_file), environ={})
        assert config.url == f"http://127.0.0.1:{ports[0]}"
        assert config.vast_api.url == f"http://127.0.0.1:{ports[1]}"
        assert config.redis_url == "redis://redis:6379/0"
        openapi = requests.get(f"{config.url}/api/v1/openapi/?format=json", timeout=10).json()
        assert openapi["servers"][0]["url"] == config.url  # the advertised, public URL
        me = requests.get(
            f"{config.vast_api.url}/api/v0/users/current/",
            timeout=10,
            headers={"Authorization": f"Bearer {config.vast_api.api_key}"},
        )
        assert me.status_code == 200
        wrong = requests.get(
            f"{config.vast_api.url}/api/v0/users/current/",
            timeout=10,
            headers={"Authorization": "Bearer wrong"},
        )
        assert wrong.status_code in (401, 403)
        assert requests.get(f"http://127.0.0.1:{ports[2]}/", timeout=10).status_code == 200
    finally:
        output = stop(process)
    assert config.seed not in output and config.vast_api.api_key not in output
    # A restarted stack keeps its identity, so running agents keep a valid config.
    process = start()
    try:
        again = load_config(str(config_file), environ={})
    finally:
        stop(process)
    assert (again.farm_id, again.seed, again.vast_api.api_key) == (
        config.farm_id,
        config.seed,
        config.vast_api.api_key,
    )


def test_constraints_pin_every_runtime_dependency():
    """constraints.txt (make lock) pins each [project] dependency with `==`, at a version its
    specifier accepts, so the worker image is reproducible. flask, moto and zstandard serve
    only the simulators (the `sim` extra) and are left out of the lock; the test holds whether
    or not they are still listed as runtime dependencies."""
    import re
    import tomllib

    from packaging.requirements import Requirement
    from packaging.utils import canonicalize_name

    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    runtime = {
        canonicalize_name(req.name): req for req in map(Requirement, project["dependencies"])
    }
    for sim_only in ("flask", "moto", "zstandard"):
        runtime.pop(sim_only, None)
    text = (ROOT / "constraints.txt").read_text()
    assert "make lock" in text[:600]  # the header says how to regenerate it
    pins = {}
    for line in text.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            match = re.fullmatch(r"([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;=<>!~]+)", line)
            assert match, f"constraints.txt: not an exact pin: {line!r}"
            pins[canonicalize_name(match.group(1))] = match.group(2)
    assert "ponos-vast" not in pins
    missing = sorted(set(runtime) - set(pins))
    assert not missing, f"not pinned in constraints.txt (run `make lock`): {missing}"
    stale = [
        f"{name}=={pins[name]} vs {req}"
        for name, req in runtime.items()
        if not req.specifier.contains(pins[name], prereleases=True)
    ]
    assert not stale, f"constraints.txt is stale (run `make lock`): {stale}"
