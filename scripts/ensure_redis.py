"""Make sure a Redis server answers at the given URL; start one on loopback if not.

Used by `make test` / `make run` on a fresh machine: if nothing answers and the URL points at
a loopback address, start `redis-server` there (installing Debian's package first when it is
missing and we are root). Exits non-zero with one clear line when that is impossible.
"""

import os
import shutil
import subprocess
import sys
import time
from urllib.parse import urlparse

import redis

LOOPBACK = {"127.0.0.1", "localhost", "::1"}


def answers(url: str) -> bool:
    try:
        return bool(redis.Redis.from_url(url, socket_connect_timeout=1).ping())
    except redis.RedisError:
        return False


def install_redis_server() -> None:
    if os.geteuid() != 0:
        sys.exit(
            "ensure_redis: redis-server is not installed and we are not root; "
            "install it (apt-get install redis-server) or set REDIS_URL"
        )
    print("ensure_redis: installing redis-server with apt-get", flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
    subprocess.run(["apt-get", "install", "-y", "-qq", "redis-server"], check=True, env=env)


def main(url: str) -> None:
    if answers(url):
        return
    parsed = urlparse(url)
    host, port = parsed.hostname or "127.0.0.1", parsed.port or 6379
    if host not in LOOPBACK:
        sys.exit(
            f"ensure_redis: no Redis answers at {host}:{port} and it is not a loopback address"
        )
    if shutil.which("redis-server") is None:
        install_redis_server()
    print(f"ensure_redis: starting redis-server on 127.0.0.1:{port}", flush=True)
    subprocess.run(
        [
            "redis-server",
            "--daemonize",
            "yes",
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--save",
            "",
            "--appendonly",
            "no",
            "--dir",
            "/tmp",
        ],
        check=True,
    )
    for _ in range(50):
        if answers(url):
            return
        time.sleep(0.1)
    sys.exit(f"ensure_redis: started redis-server but nothing answers at {url}")


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "redis://127.0.0.1:6379/0")
