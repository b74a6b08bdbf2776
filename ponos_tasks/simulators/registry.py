"""A tiny Docker Registry HTTP API v2 server (read side only), for tests and the demo.

It serves what an image-config lookup needs: `GET /v2/`, `GET|HEAD /v2/<name>/manifests/<ref>`
(tag or digest; Docker v2 and OCI manifests and indexes, chosen by the `Accept` header like
real registries), `GET /v2/<name>/blobs/<digest>` (answered by a redirect to a storage URL,
as Docker Hub and most registries do), and three access modes:

- ``auth=None``: anonymous;
- ``auth="basic"``: HTTP basic on every /v2 call (``WWW-Authenticate: Basic``);
- ``auth="token"``: the Docker token flow: 401 with ``WWW-Authenticate: Bearer realm=...,
  service=...,scope=repository:<name>:pull``; ``GET /token`` (basic auth with a known user, or
  anonymous for names in ``public``) returns a bearer token valid for those scopes.

Independent oracle: imports nothing from ponos_tasks outside simulators. Stdlib only.

    with RegistrySimulator(auth="token", users={"bob": "pw"}) as registry:
        registry.add_image("team/worker", "1.0", entrypoint=["worker"], cmd=["--run"])
        registry.host   # "127.0.0.1:PORT", to use in image references
"""

import base64
import hashlib
import json
import re
import secrets
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"

_PATH = re.compile(
    r"^/v2/(?P<name>[a-z0-9]+(?:[._/-][a-z0-9]+)*)/(?P<kind>manifests|blobs)/"
    r"(?P<ref>[^/]+)$"
)


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _dumps(document: dict) -> bytes:
    return json.dumps(document, indent=2).encode()


class RegistrySimulator:
    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        auth: str | None = None,
        users: dict[str, str] | None = None,
        public: set[str] | frozenset = frozenset(),
        service: str = "sim-registry",
        token_ttl: int = 300,
    ):
        if auth not in (None, "basic", "token"):
            raise ValueError("auth must be None, 'basic' or 'token'")
        self.bind = (host, port)
        self.auth = auth
        self.users = dict(users or {})
        self.public = set(public)
        self.service = service
        self.token_ttl = token_ttl
        self.manifests: dict[str, dict[str, tuple[str, bytes]]] = {}  # name -> ref -> (type, body)
        self.blobs: dict[str, bytes] = {}
        self.tokens: dict[str, tuple[set[str], float]] = {}  # token -> (scopes, expiry)
        self.requests: list[dict] = []  # every request: method, path, authorization kind
        self._lock = threading.Lock()
        self._httpd: ThreadingHTTPServer | None = None

    # ------------------------------------------------------------------ content

    def _put_manifest(
        self, name: str, media_type: str, document: dict, tag: str | None = None
    ) -> str:
        body = _dumps(document)
        digest = _digest(body)
        with self._lock:
            refs = self.manifests.setdefault(name, {})
            refs[digest] = (media_type, body)
            if tag:
                refs[tag] = (media_type, body)
        return digest

    def add_blob(self, data: bytes) -> str:
        digest = _digest(data)
        with self._lock:
            self.blobs[digest] = data
        return digest

    def add_image(
        self,
        name: str,
        tag: str | None = "latest",
        *,
        entrypoint=None,
        cmd=None,
        env=None,
        oci: bool = False,
        platforms: list[tuple[str, str]] | None = None,
        attestation: bool = False,
        layer_sizes: list[int] | tuple = (),
    ) -> str:
        """Seed an image; returns the digest of what `tag` points to.

        Without `platforms`: a single manifest. With `platforms` (e.g. [("linux", "arm64"),
        ("linux", "amd64")]): an index (OCI or Docker list) with one manifest per platform, all
        with the same config except that `Cmd` gets "#<os>/<arch>" appended for every platform
        but linux/amd64 (so a test can see which one was picked). `layer_sizes`: the
        compressed size of each layer listed in the manifests (their blobs are not served:
        an image-config lookup never fetches a layer).
        """
        manifest_type, config_type, index_type = (
            (OCI_MANIFEST, OCI_CONFIG, OCI_INDEX)
            if oci
            else (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_LIST)
        )

        def single(os_name: str, arch: str, image_cmd) -> tuple[str, int]:
            config = {
                "architecture": arch,
                "os": os_name,
                "config": {
                    "Entrypoint": entrypoint,
                    "Cmd": image_cmd,
                    "Env": env or ["PATH=/usr/bin:/bin"],
                },
                "rootfs": {"type": "layers", "diff_ids": []},
            }
            config_body = _dumps(config)
            config_digest = self.add_blob(config_body)
            document = {
                "schemaVersion": 2,
                "mediaType": manifest_type,
                "config": {
                    "mediaType": config_type,
                    "digest": config_digest,
                    "size": len(config_body),
                },
                "layers": [
                    {
                        "mediaType": "application/vnd.oci.image.layer.v1.tar+gzip"
                        if oci
                        else "application/vnd.docker.image.rootfs.diff.tar.gzip",
                        "digest": _digest(f"{name}#{arch}#{index}".encode()),
                        "size": int(size),
                    }
                    for index, size in enumerate(layer_sizes)
                ],
            }
            digest = self._put_manifest(name, manifest_type, document)
            return digest, len(_dumps(document))

        if not platforms:
            digest, _ = single("linux", "amd64", cmd)
            if tag:
                with self._lock:
                    self.manifests[name][tag] = self.manifests[name][digest]
            return digest
        entries = []
        for os_name, arch in platforms:
            image_cmd = (
                cmd
                if (os_name, arch) == ("linux", "amd64")
                else [*(cmd or []), f"#{os_name}/{arch}"]
            )
            digest, size = single(os_name, arch, image_cmd)
            entries.append(
                {
                    "mediaType": manifest_type,
                    "digest": digest,
                    "size": size,
                    "platform": {"os": os_name, "architecture": arch},
                }
            )
        if attestation:
            # buildx puts attestation manifests in the index with an "unknown" platform.
            entries.insert(
                0,
                {
                    "mediaType": manifest_type,
                    "digest": entries[0]["digest"],
                    "size": entries[0]["size"],
                    "platform": {"os": "unknown", "architecture": "unknown"},
                    "annotations": {"vnd.docker.reference.type": "attestation-manifest"},
                },
            )
        return self._put_manifest(
            name,
            index_type,
            {"schemaVersion": 2, "mediaType": index_type, "manifests": entries},
            tag,
        )

    # ------------------------------------------------------------------ server

    @property
    def port(self) -> int:
        assert self._httpd is not None, "not started"
        return self._httpd.server_address[1]

    @property
    def host(self) -> str:
        return f"{self.bind[0]}:{self.port}"

    @property
    def url(self) -> str:
        return f"http://{self.host}"

    def start(self) -> "RegistrySimulator":
        self._httpd = ThreadingHTTPServer(self.bind, _make_handler(self))
        self._httpd.daemon_threads = True
        threading.Thread(target=self._httpd.serve_forever, args=(0.05,), daemon=True).start()
        return self

    def stop(self) -> None:
        if self._httpd:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None

    def __enter__(self):
        return self.start()

    def __exit__(self, *exc):
        self.stop()

    # ------------------------------------------------------------------ auth

    def _basic_user(self, header: str | None) -> str | None:
        if not header or not header.startswith("Basic "):
            return None
        try:
            user, _, password = base64.b64decode(header[6:]).decode().partition(":")
        except ValueError:
            return None
        return user if self.users.get(user) == password and password else None

    def _issue_token(self, scopes: set[str]) -> str:
        token = secrets.token_urlsafe(24)
        with self._lock:
            self.tokens[token] = (scopes, time.monotonic() + self.token_ttl)
        return token

    def _token_allows(self, header: str | None, name: str) -> bool:
        if not header or not header.startswith("Bearer "):
            return False
        with self._lock:
            scopes, expiry = self.tokens.get(header[7:], (set(), 0.0))
        return time.monotonic() < expiry and f"repository:{name}:pull" in scopes


def _make_handler(sim: RegistrySimulator):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):
            pass

        def _send(
            self,
            status: int,
            body: bytes = b"",
            headers: dict | None = None,
            content_type: str = "application/json",
        ):
            self.send_response(status)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Docker-Distribution-API-Version", "registry/2.0")
            for key, value in (headers or {}).items():
                self.send_header(key, value)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def _error(self, status: int, code: str, message: str, headers: dict | None = None):
            self._send(status, _dumps({"errors": [{"code": code, "message": message}]}), headers)

        def _record(self):
            auth = self.headers.get("Authorization") or ""
            sim.requests.append(
                {
                    "method": self.command,
                    "path": self.path,
                    "auth": auth.split(" ")[0] if auth else None,
                    "accept": self.headers.get("Accept"),
                }
            )

        def _authorized(self, name: str | None) -> bool:
            """Checks access; sends the 401 challenge itself when refused."""
            header = self.headers.get("Authorization")
            if sim.auth is None:
                return True
            if sim.auth == "basic":
                if sim._basic_user(header):
                    return True
                self._error(
                    401,
                    "UNAUTHORIZED",
                    "authentication required",
                    {"WWW-Authenticate": 'Basic realm="sim-registry"'},
                )
                return False
            if name is None:  # GET /v2/: any valid token will do
                if header and header.startswith("Bearer ") and header[7:] in sim.tokens:
                    return True
                challenge = f'Bearer realm="{sim.url}/token",service="{sim.service}"'
            else:
                if sim._token_allows(header, name):
                    return True
                challenge = (
                    f'Bearer realm="{sim.url}/token",service="{sim.service}",'
                    f'scope="repository:{name}:pull"'
                )
            self._error(
                401, "UNAUTHORIZED", "authentication required", {"WWW-Authenticate": challenge}
            )
            return False

        def do_HEAD(self):
            self.do_GET()

        def do_GET(self):
            self._record()
            parts = urlsplit(self.path)
            if parts.path == "/token" and sim.auth == "token":
                return self._token(parse_qs(parts.query))
            if parts.path.startswith("/_storage/"):
                data = sim.blobs.get(parts.path[len("/_storage/") :])
                if data is None:
                    return self._error(404, "BLOB_UNKNOWN", "blob unknown")
                return self._send(200, data, content_type="application/octet-stream")
            if parts.path in ("/v2", "/v2/"):
                if self._authorized(None):
                    self._send(200, b"{}")
                return None
            match = _PATH.match(parts.path)
            if not match:
                return self._error(404, "NOT_FOUND", "no such endpoint")
            name, kind, ref = match["name"], match["kind"], match["ref"]
            if not self._authorized(name):
                return None
            if name not in sim.manifests:
                return self._error(404, "NAME_UNKNOWN", f"repository {name} not known")
            if kind == "blobs":
                if ref not in sim.blobs:
                    return self._error(404, "BLOB_UNKNOWN", "blob unknown to registry")
                return self._send(307, b"", {"Location": f"{sim.url}/_storage/{ref}"})
            found = sim.manifests[name].get(ref)
            if found is None:
                return self._error(404, "MANIFEST_UNKNOWN", f"manifest {ref} unknown")
            media_type, body = found
            accept = self.headers.get("Accept") or ""
            accepted = {item.split(";")[0].strip() for item in accept.split(",") if item.strip()}
            if accepted and media_type not in accepted and "*/*" not in accepted:
                # Real registries fall back to a schema1 conversion or refuse; refuse here.
                return self._error(
                    404, "MANIFEST_UNKNOWN", f"manifest is {media_type}, not in Accept"
                )
            self._send(200, body, {"Docker-Content-Digest": _digest(body)}, content_type=media_type)
            return None

        def _token(self, query: dict):
            user = sim._basic_user(self.headers.get("Authorization"))
            if self.headers.get("Authorization") and user is None:
                return self._error(401, "UNAUTHORIZED", "bad credentials")
            if query.get("service", [None])[0] != sim.service:
                return self._error(400, "DENIED", "unknown service")
            granted = set()
            for scope in query.get("scope", []):
                for item in scope.split(" "):
                    match = re.fullmatch(r"repository:([^:]+):([a-z,*]+)", item)
                    if (
                        match
                        and "pull" in match[2].split(",")
                        and (user is not None or match[1] in sim.public)
                    ):
                        granted.add(f"repository:{match[1]}:pull")
            token = sim._issue_token(granted)
            self._send(
                200, _dumps({"token": token, "access_token": token, "expires_in": sim.token_ttl})
            )
            return None

    return Handler
