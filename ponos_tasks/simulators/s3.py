"""A real S3-compatible server on loopback, for the local stack and the tests.

`S3Server` runs moto in server mode (`moto.server.ThreadedMotoServer`) in a thread of the
current process, on an ephemeral port by default. Clients use the fixed dummy credentials
`ACCESS_KEY` / `SECRET_KEY` and region `us-east-1`, always with an explicit `endpoint_url`.

Honest limits of moto, which the callers must know:
- moto keeps objects **in memory**, and its state is global to the Python process: two
  `S3Server`s started in one process serve the same buckets. Callers therefore create buckets
  idempotently (`ensure_bucket`) and use keys that are unique (task UUIDs).
- `data_dir` is the folder this server names for its data: on `stop()` every object is
  written there (`<data_dir>/<bucket>/<key>`), and on `start()` whatever is there is uploaded
  again, so that a stopped and restarted local stack keeps its logs and artifacts. Objects
  written while the server runs are not on disk until `stop()`.
- moto does not check the signatures of pre-signed URLs; an expired or forged URL still works.
"""

from __future__ import annotations

import contextlib
import logging
from pathlib import Path

import boto3
from botocore.config import Config

logger = logging.getLogger(__name__)

ACCESS_KEY = "ponos-sim-access-key"
SECRET_KEY = "ponos-sim-secret-key"
REGION = "us-east-1"


def s3_client(endpoint_url: str, access_key: str = ACCESS_KEY, secret_key: str = SECRET_KEY):
    """A boto3 S3 client bound to `endpoint_url` only.

    Credentials and region are given explicitly (never read from the environment or
    ~/.aws), and addressing is path-style, so that nothing is ever sent to a real AWS
    endpoint and pre-signed URLs look like `<endpoint>/<bucket>/<key>?X-Amz-...`.
    """
    if not endpoint_url:
        raise ValueError("an explicit S3 endpoint_url is required")
    session = boto3.session.Session(
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        region_name=REGION,
    )
    return session.client(
        "s3",
        endpoint_url=endpoint_url,
        config=Config(
            signature_version="s3v4",
            s3={"addressing_style": "path"},
            retries={"max_attempts": 3, "mode": "standard"},
            connect_timeout=5,
            read_timeout=30,
        ),
    )


def ensure_bucket(client, name: str) -> None:
    """Create `name` unless it exists (moto's state is shared by every server of a process)."""
    try:
        client.head_bucket(Bucket=name)
    except client.exceptions.ClientError:
        already = (client.exceptions.BucketAlreadyOwnedByYou, client.exceptions.BucketAlreadyExists)
        with contextlib.suppress(*already):
            client.create_bucket(Bucket=name)


class S3Server:
    """moto's S3 server on `host:port` (port 0 = ephemeral). Also a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_dir: str | Path | None = None):
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir) if data_dir else None
        self._server = None

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("S3Server is not started")
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def client(self):
        return s3_client(self.url)

    def start(self) -> S3Server:
        # Imported here: moto is heavy and only the local stack needs it.
        from moto.server import ThreadedMotoServer

        self._server = ThreadedMotoServer(ip_address=self.host, port=self.port, verbose=False)
        self._server.start()
        if self.data_dir:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._restore()
        logger.info("S3 server listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if self.data_dir:
            try:
                self._snapshot()
            except Exception:  # a failed snapshot must not prevent the shutdown
                logger.exception("could not write the S3 objects to %s", self.data_dir)
        self._server.stop()
        self._server = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _snapshot(self) -> None:
        client = self.client()
        for bucket in client.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    target = self.data_dir / name / obj["Key"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    body = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
                    target.write_bytes(body)

    def _restore(self) -> None:
        client = self.client()
        for bucket_dir in sorted(p for p in self.data_dir.iterdir() if p.is_dir()):
            ensure_bucket(client, bucket_dir.name)
            for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
                key = path.relative_to(bucket_dir).as_posix()
                client.put_object(Bucket=bucket_dir.name, Key=key, Body=path.read_bytes())
