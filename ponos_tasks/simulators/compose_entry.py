"""The local stack as one docker-compose service (`local` profile of docker-compose.yml).

    python -m ponos_tasks.simulators.compose_entry --public-host stack \
        --config-file /run/ponos-local/agent.yml

Unlike `ponos-vast stack` (loopback, ephemeral ports, for one machine), this listens on
0.0.0.0 on fixed ports and advertises `--public-host` in every URL it hands out (the
Arkindex API URL in task environments, S3 pre-signed URLs), so the agent's containers reach
it by its compose service name. It writes a ready agent config (atomically, once everything
answers) into a volume the agent's containers mount: that is how the agent's config "points
at" the simulators without anyone copying ids or keys. No Redis here: the compose file has one.
"""

from __future__ import annotations

import logging
import os
import secrets
import signal
import tempfile
import threading
import uuid
from pathlib import Path

import click

logger = logging.getLogger(__name__)


def agent_config_yaml(
    *,
    arkindex_url: str,
    farm_id: str,
    seed: str,
    vast_url: str,
    vast_api_key: str,
    redis_url: str,
    sync_interval: float,
    time_scale: float = 1.0,
) -> str:
    """The agent config (YAML) for a stack reachable at these URLs."""
    return "\n".join(
        [
            "# Written by ponos_tasks.simulators.compose_entry for the local demo stack.",
            f"url: {arkindex_url}",
            f"farm_id: {farm_id}",
            f"seed: {seed}",
            f"redis_url: {redis_url}",
            f"sync_interval: {sync_interval:g}",
            "vast_api:",
            f"  url: {vast_url}",
            f"  api_key: {vast_api_key}",
            "  offer_filters: {}",
            "budget:",
            "  # The simulator bills on its clock, time_scale times faster than the agent's.",
            f"  billing_time_scale: {time_scale:g}",
            "",
        ]
    )


def previous_identity(config_file: Path) -> dict[str, str]:
    """farm_id, seed and vast_api_key from a config this entry point wrote before, if any."""
    import yaml

    try:
        data = yaml.safe_load(config_file.read_text(encoding="utf-8")) or {}
    except (OSError, yaml.YAMLError):
        return {}
    if not isinstance(data, dict):
        return {}
    vast = data.get("vast_api") if isinstance(data.get("vast_api"), dict) else {}
    found = {
        "farm_id": data.get("farm_id"),
        "seed": data.get("seed"),
        "vast_api_key": vast.get("api_key"),
    }
    return {key: str(value) for key, value in found.items() if value}


def write_atomically(path: Path, text: str) -> None:
    """Readers (agent containers polling for the file) never see a half-written config."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".agent-", suffix=".yml")
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(text)
    os.chmod(tmp, 0o644)  # the agent containers run as the same uid; demo values only
    os.replace(tmp, path)


class ComposeStack:
    """S3 + Arkindex simulator + Vast.ai simulator on `host`, advertised as `public_host`."""

    def __init__(
        self,
        *,
        host: str,
        public_host: str,
        arkindex_port: int,
        vast_port: int,
        s3_port: int,
        farm_id: str,
        seed: str,
        vast_api_key: str,
        time_scale: float,
        vast_run_mode: str,
        data_dir: Path | None,
    ):
        self.host = host
        self.public_host = public_host
        self.arkindex_port = arkindex_port
        self.vast_port = vast_port
        self.s3_port = s3_port
        self.farm_id = farm_id
        self.seed = seed
        self.vast_api_key = vast_api_key
        self.time_scale = time_scale
        self.vast_run_mode = vast_run_mode
        self.data_dir = data_dir
        self.s3 = self.arkindex = self.vast = None

    def public(self, port: int) -> str:
        return f"http://{self.public_host}:{port}"

    def start(self) -> ComposeStack:
        # Imported here: moto and flask are heavy, `--help` should not pay for them.
        from ponos_tasks.simulators.arkindex import ArkindexSimulator
        from ponos_tasks.simulators.s3 import S3Server
        from ponos_tasks.simulators.vast import VastSimulator

        try:
            self.s3 = S3Server(host=self.host, port=self.s3_port, data_dir=self.data_dir).start()
            # The simulator signs S3 URLs for the agent, so it must use the public name too.
            self.arkindex = ArkindexSimulator(
                s3_url=self.public(self.s3_port),
                farms={self.farm_id: self.seed},
                host=self.host,
                port=self.arkindex_port,
                public_url=self.public(self.arkindex_port),
            ).start()
            self.vast = VastSimulator(
                time_scale=self.time_scale,
                api_key=self.vast_api_key,
                host=self.host,
                port=self.vast_port,
                run_mode=self.vast_run_mode,
            ).start()
        except BaseException:
            self.stop()
            raise
        return self

    def stop(self) -> None:
        for name in ("vast", "arkindex", "s3"):
            server = getattr(self, name)
            if server is not None:
                try:
                    server.stop()
                except Exception:
                    logger.exception("stopping the %s server failed", name)
                setattr(self, name, None)

    def config_yaml(self, redis_url: str, sync_interval: float) -> str:
        return agent_config_yaml(
            arkindex_url=self.public(self.arkindex_port),
            farm_id=self.farm_id,
            seed=self.seed,
            vast_url=self.public(self.vast_port),
            vast_api_key=self.vast_api_key,
            redis_url=redis_url,
            sync_interval=sync_interval,
            time_scale=self.time_scale,
        )


@click.command("compose-stack")
@click.option("--host", default="0.0.0.0", show_default=True, help="Address to listen on.")
@click.option(
    "--public-host",
    default="stack",
    show_default=True,
    help="Host name other containers reach this one by (the compose service name).",
)
@click.option("--arkindex-port", default=8000, show_default=True, type=int)
@click.option("--vast-port", default=8741, show_default=True, type=int)
@click.option("--s3-port", default=9000, show_default=True, type=int)
@click.option(
    "--farm-id",
    envvar="PONOS_STACK_FARM_ID",
    default=None,
    help="Farm UUID (default: random; env PONOS_STACK_FARM_ID).",
)
@click.option(
    "--seed",
    envvar="PONOS_STACK_SEED",
    default=None,
    help="Farm seed (default: random; env PONOS_STACK_SEED).",
)
@click.option(
    "--vast-api-key",
    envvar="PONOS_STACK_VAST_API_KEY",
    default=None,
    help="Vast.ai simulator API key (default: random; env PONOS_STACK_VAST_API_KEY).",
)
@click.option(
    "--time-scale",
    envvar="PONOS_STACK_TIME_SCALE",
    type=float,
    default=20.0,
    show_default=True,
    help="Simulated Vast.ai seconds per real second.",
)
@click.option(
    "--vast-run-mode",
    envvar="PONOS_STACK_RUN_MODE",
    default="scripted",
    type=click.Choice(["scripted", "local"]),
    show_default=True,
)
@click.option(
    "--redis-url",
    default="redis://redis:6379/0",
    show_default=True,
    help="Redis URL written into the agent config.",
)
@click.option("--sync-interval", type=float, default=5.0, show_default=True)
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="Keep S3 objects here across restarts.",
)
@click.option(
    "--config-file",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="Where to write the agent config for this stack.",
)
def command(
    host,
    public_host,
    arkindex_port,
    vast_port,
    s3_port,
    farm_id,
    seed,
    vast_api_key,
    time_scale,
    vast_run_mode,
    redis_url,
    sync_interval,
    data_dir,
    config_file,
):
    """Run S3 and the Arkindex and Vast.ai simulators for other containers, until SIGTERM."""
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    stopping = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopping.set())
    # A restarted stack keeps the identity of the previous one (from the config it wrote),
    # so running agents keep a valid config and simply register again.
    previous = previous_identity(config_file)
    stack = ComposeStack(
        host=host,
        public_host=public_host,
        arkindex_port=arkindex_port,
        vast_port=vast_port,
        s3_port=s3_port,
        farm_id=str(uuid.UUID(farm_id or previous.get("farm_id") or str(uuid.uuid4()))),
        seed=seed or previous.get("seed") or secrets.token_hex(32),
        vast_api_key=vast_api_key or previous.get("vast_api_key") or "sim-" + secrets.token_hex(16),
        time_scale=time_scale,
        vast_run_mode=vast_run_mode,
        data_dir=data_dir,
    )
    try:
        stack.start()
        write_atomically(config_file, stack.config_yaml(redis_url, sync_interval))
        # No seed or key in the output: the config file holds them.
        click.echo(f"Arkindex simulator {stack.public(arkindex_port)} (farm {stack.farm_id})")
        click.echo(f"Vast.ai simulator  {stack.public(vast_port)} (time scale {time_scale:g})")
        click.echo(f"S3 (moto)          {stack.public(s3_port)}")
        click.echo(f"Agent config written to {config_file}. SIGTERM stops the stack.")
        while not stopping.wait(0.5):
            pass
    finally:
        stack.stop()
    click.echo("Local stack stopped.")


if __name__ == "__main__":
    command()
