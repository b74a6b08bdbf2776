"""The whole local stack in one process: S3, the Arkindex simulator, the Vast.ai simulator,
and Redis when none answers.

    with LocalStack(time_scale=20.0) as stack:
        stack.arkindex_url, stack.vast_url, stack.s3_url, stack.redis_url
        stack.farm_id, stack.seed, stack.vast_api_key, stack.env(), stack.config_yaml()

Every server listens on 127.0.0.1 on an ephemeral port, so several stacks (two test runs)
can share a machine. `ponos-vast stack` (the click `command` below) runs one in the
foreground, prints how to point the agent at it, and stops everything on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import logging
import os
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
import uuid
from pathlib import Path

import click

logger = logging.getLogger(__name__)

HOST = "127.0.0.1"
DEFAULT_REDIS_URL = "redis://127.0.0.1:6379/0"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


def redis_answers(url: str) -> bool:
    import redis

    try:
        client = redis.Redis.from_url(url, socket_connect_timeout=1, socket_timeout=2)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except (redis.RedisError, ValueError):
        return False


class RedisProcess:
    """A private `redis-server` on a free loopback port for one stack; no persistence unless
    `appendonly` (AOF in `workdir`, fsync every write, like a production Redis with AOF).

    `new_session`: start it in its own session, so that a terminal's Ctrl-C does not kill it
    before the agent's processes using it are stopped."""

    def __init__(self, workdir: Path, *, new_session: bool = False, appendonly: bool = False):
        self.workdir = workdir
        self.new_session = new_session
        self.appendonly = appendonly
        self.port = free_port()
        self.url = f"redis://{HOST}:{self.port}/0"
        self.proc: subprocess.Popen | None = None

    def start(self) -> RedisProcess:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--bind",
                HOST,
                "--port",
                str(self.port),
                "--save",
                "",
                "--appendonly",
                "yes" if self.appendonly else "no",
                "--appendfsync",
                "always",
                "--dir",
                str(self.workdir),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            start_new_session=self.new_session,
        )
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            if redis_answers(self.url):
                return self
            if self.proc.poll() is not None:
                break
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"redis-server did not start on {HOST}:{self.port}")

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)
        self.proc = None

    def kill(self) -> None:
        """SIGKILL it, like a Redis host lost with its memory (no RDB, no AOF)."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        self.proc = None

    def restart_empty(self) -> None:
        """Kill it and start it again, empty, on the same port (the same URL)."""
        self.kill()
        self.start()

    def restart(self, down_for: float = 0.0) -> None:
        """Stop it (SIGTERM: a clean shutdown that writes its AOF), wait `down_for` seconds
        and start it again on the same port, with its data when it has `appendonly`, like a
        Redis restarted by its platform (an upgrade, a host move)."""
        self.stop()
        if down_for:
            time.sleep(down_for)
        self.start()


class LocalStack:
    """S3 + Arkindex simulator + Vast.ai simulator (+ Redis if needed), in-process.

    `redis_url`: the Redis to use; default $REDIS_URL, then redis://127.0.0.1:6379/0. When it
    does not answer and `start_redis` is true and `redis-server` is installed, a private one is
    started; otherwise `redis_url` is None (the simulators themselves do not need Redis).
    `data_dir`: where S3 keeps its objects across restarts; default a temporary folder
    removed on stop.
    """

    def __init__(
        self,
        redis_url: str | None = None,
        *,
        time_scale: float = 20.0,
        vast_run_mode: str = "scripted",
        vast_seed: int = 0,
        token_ttl: int = 3600,
        url_lifetime: float = 3600,
        data_dir: str | Path | None = None,
        start_redis: bool = True,
        farm_id: str | None = None,
        seed: str | None = None,
        vast_api_key: str | None = None,
        vast_options: dict | None = None,
        arkindex_options: dict | None = None,
    ):
        self.requested_redis_url = redis_url or os.environ.get("REDIS_URL") or DEFAULT_REDIS_URL
        self.time_scale = time_scale
        self.vast_run_mode = vast_run_mode
        self.vast_seed = vast_seed
        self.token_ttl = token_ttl
        # Lifetime of the pre-signed S3 URLs the Arkindex simulator hands out (boto3's 1 h).
        self.url_lifetime = url_lifetime
        self.data_dir = Path(data_dir) if data_dir else None
        self.start_redis = start_redis
        self.farm_id = farm_id or str(uuid.uuid4())
        self.seed = seed or secrets.token_hex(32)
        self.vast_api_key = vast_api_key or "sim-" + secrets.token_hex(16)
        self.vast_options = dict(vast_options or {})
        self.arkindex_options = dict(arkindex_options or {})

        self.s3 = None
        self.arkindex = None
        self.vast = None
        self.redis_url: str | None = None
        self.redis_process: RedisProcess | None = None
        self._tmpdir: Path | None = None
        self.started = False

    # ------------------------------------------------------------------ lifecycle

    def start(self) -> LocalStack:
        # Imported here so that `import ponos_tasks.simulators.stack` stays cheap.
        from ponos_tasks.simulators.arkindex import ArkindexSimulator
        from ponos_tasks.simulators.s3 import S3Server
        from ponos_tasks.simulators.vast import VastSimulator

        if self.started:
            return self
        try:
            self._tmpdir = Path(tempfile.mkdtemp(prefix="ponos-stack-"))
            self._start_redis()
            self.s3 = S3Server(host=HOST, port=0, data_dir=self.data_dir or self._tmpdir / "s3")
            self.s3.start()
            self.arkindex = ArkindexSimulator(
                s3_url=self.s3.url,
                farms={self.farm_id: self.seed},
                host=HOST,
                port=0,
                token_ttl=self.token_ttl,
                **{"url_lifetime": self.url_lifetime, **self.arkindex_options},
            )
            self.arkindex.start()
            self.vast = VastSimulator(
                seed=self.vast_seed,
                time_scale=self.time_scale,
                api_key=self.vast_api_key,
                host=HOST,
                port=0,
                run_mode=self.vast_run_mode,
                **self.vast_options,
            )
            self.vast.start()
        except BaseException:
            self.stop()
            raise
        self.started = True
        logger.info(
            "Local stack up: arkindex %s, vast %s, s3 %s, redis %s",
            self.arkindex_url,
            self.vast_url,
            self.s3_url,
            self.redis_url,
        )
        return self

    def _start_redis(self) -> None:
        if redis_answers(self.requested_redis_url):
            self.redis_url = self.requested_redis_url
            return
        if not self.start_redis or shutil.which("redis-server") is None:
            logger.warning(
                "No Redis answers at %s and none can be started here: the stack runs without Redis",
                self.requested_redis_url,
            )
            return
        workdir = self._tmpdir / "redis"
        workdir.mkdir(parents=True, exist_ok=True)
        self.redis_process = RedisProcess(workdir).start()
        self.redis_url = self.redis_process.url

    def stop(self) -> None:
        """Stop everything that was started, in reverse order; idempotent. A failing stop is
        logged and does not prevent the others."""
        for name in ("vast", "arkindex", "s3"):
            server = getattr(self, name)
            if server is None:
                continue
            try:
                server.stop()
            except Exception:
                logger.exception("stopping the %s server failed", name)
            setattr(self, name, None)
        if self.redis_process is not None:
            self.redis_process.stop()
            self.redis_process = None
            self.redis_url = None
        if self._tmpdir is not None:
            shutil.rmtree(self._tmpdir, ignore_errors=True)
            self._tmpdir = None
        self.started = False

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ------------------------------------------------------------------ what to tell the agent

    @property
    def arkindex_url(self) -> str | None:
        return self.arkindex.url if self.arkindex else None

    @property
    def vast_url(self) -> str | None:
        return self.vast.url if self.vast else None

    @property
    def s3_url(self) -> str | None:
        return self.s3.url if self.s3 else None

    def env(self) -> dict[str, str]:
        """Environment variables pointing an agent at this stack."""
        env = {
            "PONOS_ARKINDEX_URL": self.arkindex_url,
            "PONOS_FARM_ID": self.farm_id,
            "PONOS_SEED": self.seed,
            "PONOS_VAST_URL": self.vast_url,
            "PONOS_VAST_API_KEY": self.vast_api_key,
            "PONOS_S3_URL": self.s3_url,
        }
        if self.redis_url:
            env["REDIS_URL"] = self.redis_url
        return {k: v for k, v in env.items() if v}

    def config_yaml(self) -> str:
        """A ready-to-use agent config (YAML) for this stack."""
        lines = [
            f"url: {self.arkindex_url}",
            f"farm_id: {self.farm_id}",
            f"seed: {self.seed}",
        ]
        if self.redis_url:
            lines.append(f"redis_url: {self.redis_url}")
        lines += [
            "vast_api:",
            f"  url: {self.vast_url}",
            f"  api_key: {self.vast_api_key}",
            "  offer_filters: {}",
            "budget:",
            "  # The simulator bills on its clock, time_scale times faster than the agent's.",
            f"  billing_time_scale: {self.time_scale:g}",
        ]
        return "\n".join(lines) + "\n"

    def describe(self) -> str:
        rows = [
            ("Arkindex simulator", self.arkindex_url),
            ("Vast.ai simulator", self.vast_url),
            ("S3 (moto)", self.s3_url),
            (
                "Redis",
                (self.redis_url or "none") + (" (started here)" if self.redis_process else ""),
            ),
            ("Farm id", self.farm_id),
            ("Farm seed", self.seed),
            ("Vast.ai API key", self.vast_api_key),
            (
                "Vast.ai time scale",
                f"{self.time_scale:g} simulated s per s, run mode {self.vast_run_mode}",
            ),
        ]
        width = max(len(name) for name, _ in rows)
        return "\n".join(f"{name.ljust(width)}  {value}" for name, value in rows)


# ---------------------------------------------------------------------- `ponos-vast stack`


@click.command("stack")
@click.option(
    "--time-scale",
    type=float,
    default=20.0,
    show_default=True,
    help="Simulated Vast.ai seconds per real second.",
)
@click.option(
    "--vast-run-mode",
    type=click.Choice(["scripted", "local"]),
    default="scripted",
    show_default=True,
    help="How simulated instances run their command.",
)
@click.option(
    "--redis-url",
    default=None,
    help="Redis to use (default $REDIS_URL); one is started if it does not answer.",
)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep S3 objects here across restarts (default: a temporary folder).",
)
@click.option(
    "--env-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the environment variables to this file (sourceable).",
)
@click.option(
    "--config-file",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Also write the agent config (YAML) to this file.",
)
@click.option(
    "--url-lifetime",
    type=float,
    default=3600.0,
    show_default=True,
    help="Lifetime of the pre-signed S3 URLs (seconds; boto3's default).",
)
def command(time_scale, vast_run_mode, redis_url, data_dir, env_file, config_file, url_lifetime):
    """Run S3, the Arkindex and Vast.ai simulators (and Redis if needed) until Ctrl-C."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stopping = threading.Event()

    def on_signal(signum, _frame):
        stopping.set()

    # SIGTERM and Ctrl-C both just ask the main loop to stop, so the shutdown runs once,
    # in the main thread, whatever the signal.
    previous = {sig: signal.signal(sig, on_signal) for sig in (signal.SIGTERM, signal.SIGINT)}
    stack = LocalStack(
        redis_url,
        time_scale=time_scale,
        vast_run_mode=vast_run_mode,
        data_dir=data_dir,
        url_lifetime=url_lifetime,
    )
    try:
        stack.start()
        env = stack.env()
        exports = "\n".join(f"export {k}={v}" for k, v in env.items())
        if env_file:
            env_file.parent.mkdir(parents=True, exist_ok=True)
            env_file.write_text(exports + "\n")
        if config_file:
            config_file.parent.mkdir(parents=True, exist_ok=True)
            config_file.write_text(stack.config_yaml())
        click.echo(stack.describe())
        click.echo("\n# Environment for the agent:\n" + exports)
        click.echo("\n# Agent config (YAML):\n" + stack.config_yaml())
        click.echo("Local stack ready. Ctrl-C or SIGTERM stops it.", err=False)
        while not stopping.wait(0.5):
            pass
        click.echo("Stopping the local stack...")
    finally:
        stack.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    click.echo("Local stack stopped.")


if __name__ == "__main__":
    command()
