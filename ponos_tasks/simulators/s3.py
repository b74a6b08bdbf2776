"""A real S3-compatible server on loopback, for the local stack and the tests.

`S3Server` runs moto in server mode (`moto.server.ThreadedMotoServer`) in a thread of the
current process, behind a small checking proxy (`S3Server.url` is the proxy's). Clients use
the fixed dummy credentials `ACCESS_KEY` / `SECRET_KEY` and region `us-east-1`, always with an
explicit `endpoint_url`.

What the proxy adds, because moto checks neither: a pre-signed URL (SigV4 query
authentication) is verified before it reaches moto, as S3 does:
- its signature is recomputed from the same dummy credentials (method, path, query, the
  signed headers, `UNSIGNED-PAYLOAD`); a URL altered in any signed part gets S3's 403
  `SignatureDoesNotMatch` (an unknown access key 403 `InvalidAccessKeyId`);
- `X-Amz-Date` + `X-Amz-Expires` in the past gets S3's 403 `AccessDenied`, "Request has
  expired" (XML body with `X-Amz-Expires`, `Expires`, `ServerTime`, as S3 writes it).
Requests signed in the Authorization header (boto3's own calls) are forwarded unchecked.
Chaos knobs (admin API on the same port, under `/_sim/`, which no bucket name can start
with): `down(seconds)` answers every S3 request with 503 `ServiceUnavailable` for that
long (POST /_sim/down {"seconds"}, DELETE /_sim/down); `advance(seconds)` moves the clock
the proxy checks expiry with (POST /_sim/clock {"advance"}), so a test can expire URLs
without waiting an hour; `slow(seconds, times)` answers the next `times` PUTs `seconds` late
*after* the object is stored (POST /_sim/slow {"seconds", "times"}): an uploader that dies in
that window never learns its upload took; GET /_sim/stats counts requests, refusals and
slow answers started (`slow_answers`).

Honest limits of moto, which the callers must know:
- moto keeps objects **in memory**, and its state is global to the Python process: two
  `S3Server`s started in one process serve the same buckets. Callers therefore create buckets
  idempotently (`ensure_bucket`) and use keys that are unique (task UUIDs).
- `data_dir` is the folder this server names for its data: on `stop()` every object is
  written there (`<data_dir>/<bucket>/<key>`), and on `start()` whatever is there is uploaded
  again, so that a stopped and restarted local stack keeps its logs and artifacts. Objects
  written while the server runs are not on disk until `stop()`.
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import json
import logging
import threading
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import parse_qsl, quote, urlsplit
from xml.sax.saxutils import escape

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


# ---------------------------------------------------------------------- SigV4 checks

CREDENTIALS = {ACCESS_KEY: SECRET_KEY}
AMZ_DATE = "%Y%m%dT%H%M%SZ"
PRESIGN_PARAMS = (
    "X-Amz-Algorithm",
    "X-Amz-Credential",
    "X-Amz-Date",
    "X-Amz-Expires",
    "X-Amz-SignedHeaders",
    "X-Amz-Signature",
)


class S3Refusal(Exception):
    """An S3 error answer: status, code, message and extra XML elements."""

    def __init__(self, status: int, code: str, message: str, **extra: str):
        super().__init__(message)
        self.status, self.code, self.message, self.extra = status, code, message, extra

    def xml(self, resource: str) -> bytes:
        extra = "".join(f"<{k}>{escape(str(v))}</{k}>" for k, v in self.extra.items())
        return (
            '<?xml version="1.0" encoding="UTF-8"?>\n'
            f"<Error><Code>{self.code}</Code><Message>{escape(self.message)}</Message>"
            f"{extra}<Resource>{escape(resource)}</Resource>"
            f"<RequestId>{uuid.uuid4().hex[:16].upper()}</RequestId></Error>"
        ).encode()


def _sign(key: bytes, message: str) -> bytes:
    return hmac.new(key, message.encode(), hashlib.sha256).digest()


def presigned_signature(
    secret_key: str,
    method: str,
    raw_path: str,
    params: list,
    headers: dict,
    amz_date: str,
    scope: str,
    signed_headers: str,
) -> str:
    """The SigV4 query-auth signature S3 expects (AWS "Authenticating requests: using query
    parameters"): canonical request over the path as sent, the sorted query without
    X-Amz-Signature, the signed headers and UNSIGNED-PAYLOAD."""
    query = "&".join(
        f"{k}={v}"
        for k, v in sorted(
            (quote(k, safe="-_.~"), quote(v, safe="-_.~"))
            for k, v in params
            if k != "X-Amz-Signature"
        )
    )
    names = signed_headers.split(";")
    canonical_headers = "".join(f"{n}:{' '.join(headers.get(n, '').split())}\n" for n in names)
    canonical = "\n".join(
        [method, raw_path or "/", query, canonical_headers, signed_headers, "UNSIGNED-PAYLOAD"]
    )
    to_sign = "\n".join(
        ["AWS4-HMAC-SHA256", amz_date, scope, hashlib.sha256(canonical.encode()).hexdigest()]
    )
    date, region, service, terminal = scope.split("/")
    key = _sign(("AWS4" + secret_key).encode(), date)
    for part in (region, service, terminal):
        key = _sign(key, part)
    return hmac.new(key, to_sign.encode(), hashlib.sha256).hexdigest()


def check_presigned(method: str, raw_path: str, raw_query: str, headers: dict, now: float):
    """None when the request is not pre-signed or is valid; else raise S3Refusal."""
    params = parse_qsl(raw_query, keep_blank_values=True)
    given = dict(params)
    if "X-Amz-Signature" not in given and "X-Amz-Credential" not in given:
        return
    missing = [name for name in PRESIGN_PARAMS if name not in given]
    if missing or given["X-Amz-Algorithm"] != "AWS4-HMAC-SHA256":
        raise S3Refusal(
            400,
            "AuthorizationQueryParametersError",
            "Query-string authentication version 4 requires the X-Amz-Algorithm, "
            "X-Amz-Credential, X-Amz-Signature, X-Amz-Date, X-Amz-SignedHeaders, and "
            "X-Amz-Expires parameters.",
        )
    access_key, _, scope = given["X-Amz-Credential"].partition("/")
    secret = CREDENTIALS.get(access_key)
    if secret is None:
        raise S3Refusal(
            403,
            "InvalidAccessKeyId",
            "The AWS Access Key Id you provided does not exist in our records.",
            AWSAccessKeyId=access_key,
        )
    try:
        signed_at = datetime.strptime(given["X-Amz-Date"], AMZ_DATE).replace(tzinfo=UTC)
        expires = int(given["X-Amz-Expires"])
        if len(scope.split("/")) != 4:
            raise ValueError(scope)
    except ValueError:
        raise S3Refusal(
            400,
            "AuthorizationQueryParametersError",
            "X-Amz-Date, X-Amz-Expires or X-Amz-Credential is malformed.",
        ) from None
    expected = presigned_signature(
        secret,
        method,
        raw_path,
        params,
        headers,
        given["X-Amz-Date"],
        scope,
        given["X-Amz-SignedHeaders"],
    )
    if not hmac.compare_digest(expected, given["X-Amz-Signature"]):
        raise S3Refusal(
            403,
            "SignatureDoesNotMatch",
            "The request signature we calculated does not match the signature you "
            "provided. Check your key and signing method.",
            AWSAccessKeyId=access_key,
        )
    deadline = signed_at.timestamp() + expires
    if now > deadline:
        stamp = "%Y-%m-%dT%H:%M:%SZ"
        raise S3Refusal(
            403,
            "AccessDenied",
            "Request has expired",
            **{
                "X-Amz-Expires": str(expires),
                "Expires": time.strftime(stamp, time.gmtime(deadline)),
                "ServerTime": time.strftime(stamp, time.gmtime(now)),
            },
        )


# ---------------------------------------------------------------------- the proxy

# Not forwarded: hop-by-hop headers (RFC 9110 §7.6.1) and what the forwarding call redoes.
HOP_BY_HOP = {
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
    "expect",
    "content-length",
}


class CheckingProxy:
    """The WSGI app in front of moto: checks pre-signed URLs, serves the chaos knobs."""

    def __init__(self, backend_url: str):
        self.backend_url = backend_url
        self.lock = threading.Lock()
        self.down_until = 0.0
        self.clock_offset = 0.0
        self.slow_seconds = 0.0
        self.slow_left = 0  # PUTs still to answer late
        self.stats = {
            "slow_answers": 0,
            "requests": 0,
            "refused_expired": 0,
            "refused_signature": 0,
            "refused_down": 0,
            "refused_other": 0,
        }
        self._local = threading.local()

    def now(self) -> float:
        return time.time() + self.clock_offset

    def _session(self):
        import requests

        if not hasattr(self._local, "session"):
            self._local.session = requests.Session()
        return self._local.session

    def __call__(self, environ, start_response):
        from werkzeug.wrappers import Request, Response

        request = Request(environ)
        raw_uri = environ.get("RAW_URI") or environ.get("REQUEST_URI") or request.full_path
        parts = urlsplit(raw_uri)
        if parts.path.startswith("/_sim/"):
            return self._admin(request, parts.path)(environ, start_response)
        with self.lock:
            self.stats["requests"] += 1
            down = time.monotonic() < self.down_until
        try:
            if down:
                raise S3Refusal(503, "ServiceUnavailable", "Service is unable to handle request.")
            headers = {k.lower(): v for k, v in request.headers.items()}
            check_presigned(request.method, parts.path, parts.query, headers, self.now())
        except S3Refusal as refusal:
            key = {
                "AccessDenied": "refused_expired",
                "SignatureDoesNotMatch": "refused_signature",
                "ServiceUnavailable": "refused_down",
            }.get(refusal.code, "refused_other")
            with self.lock:
                self.stats[key] += 1
            body = b"" if request.method == "HEAD" else refusal.xml(parts.path)
            response = Response(body, status=refusal.status, content_type="application/xml")
            return response(environ, start_response)
        late = 0.0
        if request.method == "PUT":
            with self.lock:
                if self.slow_left > 0:
                    self.slow_left -= 1
                    late = self.slow_seconds
        return self._forward(request, raw_uri, late)(environ, start_response)

    def _forward(self, request, raw_uri: str, late: float = 0.0):
        from werkzeug.wrappers import Response

        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        upstream = self._session().request(
            request.method,
            self.backend_url + raw_uri,
            data=request.get_data(),
            headers=headers,
            stream=True,
            allow_redirects=False,
            timeout=(5, 120),
        )
        if late:
            # The object is stored (moto answered); only the answer is late.
            with self.lock:
                self.stats["slow_answers"] += 1
            time.sleep(late)
        out_headers = [
            (k, v)
            for k, v in upstream.raw.headers.items()
            if k.lower() not in HOP_BY_HOP - {"content-length"}
        ]

        def body():
            try:
                yield from upstream.raw.stream(65536, decode_content=False)
            finally:
                upstream.close()

        return Response(
            body(), status=upstream.status_code, headers=out_headers, direct_passthrough=True
        )

    def _admin(self, request, path: str):
        from werkzeug.wrappers import Response

        data = request.get_json(silent=True) or {}
        with self.lock:
            if path == "/_sim/down" and request.method == "POST":
                self.down_until = time.monotonic() + float(data.get("seconds", 60))
            elif path == "/_sim/down" and request.method == "DELETE":
                self.down_until = 0.0
            elif path == "/_sim/slow" and request.method == "POST":
                self.slow_seconds = float(data.get("seconds", 5))
                self.slow_left = int(data.get("times", 1))
            elif path == "/_sim/clock" and request.method == "POST":
                self.clock_offset += float(data.get("advance", 0))
            elif path != "/_sim/stats" or request.method != "GET":
                return Response(
                    json.dumps({"error": "unknown admin call"}),
                    status=404,
                    content_type="application/json",
                )
            state = {
                **self.stats,
                "down_for": max(0.0, self.down_until - time.monotonic()),
                "clock_offset": self.clock_offset,
            }
        return Response(json.dumps(state), content_type="application/json")


class S3Server:
    """moto's S3 server behind the checking proxy, on `host:port` (port 0 = ephemeral).
    Also a context manager."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, data_dir: str | Path | None = None):
        self.host = host
        self.port = port
        self.data_dir = Path(data_dir) if data_dir else None
        self._server = None  # moto, on its own ephemeral port
        self._proxy_server = None
        self._proxy_thread = None
        self.proxy: CheckingProxy | None = None

    @property
    def url(self) -> str:
        if self._proxy_server is None:
            raise RuntimeError("S3Server is not started")
        return f"http://{self.host}:{self._proxy_server.server_port}"

    @property
    def backend_url(self) -> str:
        """moto itself, unchecked (snapshots and restores go there)."""
        host, port = self._server.get_host_and_port()
        return f"http://{host}:{port}"

    def client(self):
        return s3_client(self.url)

    def down(self, seconds: float) -> None:
        """Answer every S3 request with 503 for `seconds`."""
        with self.proxy.lock:
            self.proxy.down_until = time.monotonic() + seconds

    def up(self) -> None:
        with self.proxy.lock:
            self.proxy.down_until = 0.0

    def advance(self, seconds: float) -> None:
        """Move the clock pre-signed URLs are checked against (expire them sooner)."""
        with self.proxy.lock:
            self.proxy.clock_offset += seconds

    def start(self) -> S3Server:
        # Imported here: moto is heavy and only the local stack needs it.
        from moto.server import ThreadedMotoServer
        from werkzeug.serving import make_server

        self._server = ThreadedMotoServer(ip_address=self.host, port=0, verbose=False)
        self._server.start()
        self.proxy = CheckingProxy(self.backend_url)
        self._proxy_server = make_server(self.host, self.port, self.proxy, threaded=True)
        self._proxy_thread = threading.Thread(
            target=self._proxy_server.serve_forever, args=(0.05,), name="s3-proxy", daemon=True
        )
        self._proxy_thread.start()
        if self.data_dir:
            self.data_dir.mkdir(parents=True, exist_ok=True)
            self._restore()
        logger.info("S3 server listening on %s (moto behind it on %s)", self.url, self.backend_url)
        return self

    def stop(self) -> None:
        if self._server is None:
            return
        if self.data_dir:
            try:
                self._snapshot()
            except Exception:  # a failed snapshot must not prevent the shutdown
                logger.exception("could not write the S3 objects to %s", self.data_dir)
        if self._proxy_server is not None:
            self._proxy_server.shutdown()
            self._proxy_server.server_close()
            self._proxy_thread.join(timeout=10)
            self._proxy_server = None
        self._server.stop()
        self._server = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _snapshot(self) -> None:
        client = s3_client(self.backend_url)
        for bucket in client.list_buckets().get("Buckets", []):
            name = bucket["Name"]
            for page in client.get_paginator("list_objects_v2").paginate(Bucket=name):
                for obj in page.get("Contents", []):
                    target = self.data_dir / name / obj["Key"]
                    target.parent.mkdir(parents=True, exist_ok=True)
                    body = client.get_object(Bucket=name, Key=obj["Key"])["Body"].read()
                    target.write_bytes(body)

    def _restore(self) -> None:
        client = s3_client(self.backend_url)
        for bucket_dir in sorted(p for p in self.data_dir.iterdir() if p.is_dir()):
            ensure_bucket(client, bucket_dir.name)
            for path in sorted(p for p in bucket_dir.rglob("*") if p.is_file()):
                key = path.relative_to(bucket_dir).as_posix()
                client.put_object(Bucket=bucket_dir.name, Key=key, Body=path.read_bytes())
