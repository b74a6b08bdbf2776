"""Reads an image's Entrypoint and Cmd from its registry (Docker Registry HTTP API v2).

Used when a task definition has no command: the agent wraps the image's own command (see
wrapper.py), so it needs to know it. Steps: manifest (an index resolves to linux/amd64), then
the config blob, then `config.Entrypoint` / `config.Cmd`. Auth: HTTP basic, or the Docker token
flow (401 + `WWW-Authenticate: Bearer realm=...` -> token -> retry), with the credentials of
the agent config. Results are cached by manifest digest (a digest names immutable content) in
process and, optionally, in Redis; a tag costs one HEAD per lookup to learn its digest.

Hand-written rather than a library: the maintained Python registry clients either pull in a
Docker daemon (docker-py) or are large (oras); this is two GETs and a token dance.
"""

import hashlib
import json
import re
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass
from ipaddress import ip_address

import requests
from requests.adapters import HTTPAdapter
from urllib3.util.retry import Retry

DOCKER_HUB = "docker.io"
DOCKER_HUB_API = "registry-1.docker.io"
_HUB_ALIASES = {"docker.io", "index.docker.io", "registry-1.docker.io", "registry.hub.docker.com"}

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
INDEX_TYPES = {OCI_INDEX, DOCKER_LIST}
MANIFEST_TYPES = {OCI_MANIFEST, DOCKER_MANIFEST}
ACCEPT = ", ".join([OCI_INDEX, DOCKER_LIST, OCI_MANIFEST, DOCKER_MANIFEST])

_DIGEST = re.compile(r"^[a-z0-9]+(?:[+._-][a-z0-9]+)*:[a-zA-Z0-9=_-]+$")
_TAG = re.compile(r"^[\w][\w.-]{0,127}$")
_REPOSITORY = re.compile(
    r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*)*$"
)


class ImageConfigUnavailable(Exception):
    """The image's config cannot be read; `reason` says why, for the task's published log."""

    def __init__(self, reason: str):
        self.reason = reason
        super().__init__(reason)


class ImageNotFound(ImageConfigUnavailable):
    """The registry answered that the image does not exist (404 on its manifest): no instance
    could ever pull it."""


@dataclass(frozen=True)
class ImageReference:
    registry: str  # as written by users: "docker.io", "127.0.0.1:5000", "ghcr.io"
    repository: str  # "library/ubuntu", "team/worker"
    tag: str | None  # None when only a digest is given
    digest: str | None

    @property
    def api_host(self) -> str:
        """The host:port the v2 API is served on."""
        return DOCKER_HUB_API if self.registry == DOCKER_HUB else self.registry

    @property
    def reference(self) -> str:
        """What to put after /manifests/: the digest when there is one, else the tag."""
        return self.digest or self.tag or "latest"

    def __str__(self) -> str:
        text = f"{self.registry}/{self.repository}"
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def canonical_registry(host: str) -> str:
    """Registry names as compared between image references and configured credentials."""
    host = host.lower().rstrip("/")
    return DOCKER_HUB if host in _HUB_ALIASES else host


def parse_image_reference(image: str) -> ImageReference:
    """Parse like Docker does: `ubuntu` -> docker.io/library/ubuntu:latest, `a/b` ->
    docker.io/a/b, `host:5000/a/b:t`, `localhost/a`, `name@sha256:...`, `name:tag@sha256:...`."""
    text = image.strip()
    if not text or any(c.isspace() for c in text):
        raise ValueError(f"invalid image reference {image!r}")
    digest = None
    if "@" in text:
        text, digest = text.split("@", 1)
        if not _DIGEST.match(digest):
            raise ValueError(f"invalid digest in image reference {image!r}")
    first, slash, rest = text.partition("/")
    if slash and ("." in first or ":" in first or first == "localhost"):
        registry, remainder = first, rest
    else:
        registry, remainder = DOCKER_HUB, text
    tag = None
    last_slash = remainder.rfind("/")
    colon = remainder.rfind(":")
    if colon > last_slash:
        remainder, tag = remainder[:colon], remainder[colon + 1 :]
        if not _TAG.match(tag):
            raise ValueError(f"invalid tag in image reference {image!r}")
    registry = canonical_registry(registry)
    if registry == DOCKER_HUB and "/" not in remainder:
        remainder = f"library/{remainder}"
    if not _REPOSITORY.match(remainder):
        raise ValueError(f"invalid repository name in image reference {image!r}")
    if tag is None and digest is None:
        tag = "latest"
    return ImageReference(registry, remainder, tag, digest)


@dataclass(frozen=True)
class ImageConfig:
    entrypoint: list[str] | None
    cmd: list[str] | None
    manifest_digest: str  # of the image manifest for linux/amd64
    # Sum of the manifest's layers[].size: the compressed bytes a host pulls (None: unknown).
    size_bytes: int | None = None

    @property
    def command(self) -> list[str]:
        """What the container runs, per Docker: Entrypoint + Cmd (Cmd alone without one)."""
        return [*(self.entrypoint or []), *(self.cmd or [])]


def _is_loopback(host: str) -> bool:
    name = (
        host.rsplit(":", 1)[0].strip("[]") if host.count(":") <= 1 or host.startswith("[") else host
    )
    if name == "localhost":
        return True
    try:
        return ip_address(name).is_loopback
    except ValueError:
        return False


def _parse_challenge(header: str) -> tuple[str, dict[str, str]]:
    scheme, _, params = header.strip().partition(" ")
    return scheme.lower(), dict(re.findall(r'(\w+)="([^"]*)"', params))


class RegistryClient:
    """Looks up image configs; `credentials` are (host, username, password) triples or
    objects with `registry_host`, `username`, `password` (config.RegistryCredential)."""

    def __init__(
        self,
        credentials=(),
        *,
        shared_cache=None,
        cache_size: int = 256,
        timeout: tuple[float, float] = (5, 20),
        retries: int = 2,
        insecure_hosts: set[str] | frozenset = frozenset(),
        platform: tuple[str, str] = ("linux", "amd64"),
    ):
        self.credentials: dict[str, tuple[str, str]] = {}
        for item in credentials:
            if isinstance(item, tuple | list):
                host, username, password = item
            else:
                host, username, password = item.registry_host, item.username, item.password
            self.credentials[canonical_registry(host)] = (username, password)
        # Shared by every process (state.ImageConfigCache: get(digest)/set(digest, data)).
        self.shared_cache = shared_cache
        self.cache_size = cache_size
        self.timeout = timeout
        self.insecure_hosts = {h.lower() for h in insecure_hosts}
        self.platform = platform
        self._cache: OrderedDict[str, ImageConfig] = OrderedDict()
        self._sizes: dict[str, int | None] = {}  # image reference -> size, last read here
        self._tokens: dict[tuple[str, str], tuple[str, float]] = {}
        self._basic_registries: set[str] = set()  # answered a Basic challenge once
        self._lock = threading.Lock()
        self.session = requests.Session()
        # Transient failures only (connection, 502/503/504), for idempotent GET/HEAD.
        retry = Retry(
            total=retries,
            backoff_factor=0.2,
            status_forcelist=(502, 503, 504),
            allowed_methods=frozenset({"GET", "HEAD"}),
            raise_on_status=False,
        )
        self.session.mount("http://", HTTPAdapter(max_retries=retry))
        self.session.mount("https://", HTTPAdapter(max_retries=retry))

    # ---------------------------------------------------------------- public

    def image_config(self, image: str) -> ImageConfig:
        try:
            ref = parse_image_reference(image)
        except ValueError as error:
            raise ImageConfigUnavailable(str(error)) from None
        try:
            config = self._lookup(ref)
        except requests.RequestException as error:
            raise ImageConfigUnavailable(
                f"registry {ref.registry} unreachable ({type(error).__name__})"
            ) from None
        with self._lock:
            self._sizes[image] = config.size_bytes
            while len(self._sizes) > self.cache_size:
                self._sizes.pop(next(iter(self._sizes)))
        return config

    def known_size(self, image: str) -> int | None:
        """The compressed size of `image` as last read by this process (no registry call);
        None when it was not read, or its manifest did not say."""
        with self._lock:
            return self._sizes.get(image)

    def image_command(self, image: str) -> list[str]:
        """Entrypoint + Cmd of `image`; ImageConfigUnavailable if it has neither."""
        command = self.image_config(image).command
        if not command:
            raise ImageConfigUnavailable(f"image {image} has neither Entrypoint nor Cmd")
        return command

    # ---------------------------------------------------------------- cache

    def _cached(self, digest: str) -> ImageConfig | None:
        with self._lock:
            if digest in self._cache:
                self._cache.move_to_end(digest)
                return self._cache[digest]
        if self.shared_cache is not None:
            data = self.shared_cache.get(digest)
            if data:
                config = ImageConfig(
                    data["entrypoint"],
                    data["cmd"],
                    data["manifest_digest"],
                    data.get("size_bytes"),  # absent from entries cached by older versions
                )
                self._remember(digest, config, to_redis=False)
                return config
        return None

    def _remember(self, digest: str, config: ImageConfig, *, to_redis: bool = True) -> None:
        with self._lock:
            self._cache[digest] = config
            self._cache.move_to_end(digest)
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        if to_redis and self.shared_cache is not None:
            self.shared_cache.set(
                digest,
                {
                    "entrypoint": config.entrypoint,
                    "cmd": config.cmd,
                    "manifest_digest": config.manifest_digest,
                    "size_bytes": config.size_bytes,
                },
            )

    # ---------------------------------------------------------------- lookup

    def _lookup(self, ref: ImageReference) -> ImageConfig:
        if ref.digest:
            cached = self._cached(ref.digest)
            if cached:
                return cached
        else:
            # HEAD: cheap, and not counted by Docker Hub's pull rate limit.
            head = self._get(
                ref, f"manifests/{ref.reference}", method="HEAD", headers={"Accept": ACCEPT}
            )
            digest = head.headers.get("Docker-Content-Digest")
            cached = self._cached(digest) if digest else None
            if cached:
                return cached
        top_digest, media_type, document = self._manifest(ref, ref.reference)
        manifest_digest = top_digest
        if media_type in INDEX_TYPES:
            manifest_digest = self._pick_platform(ref, document)
            _, media_type, document = self._manifest(ref, manifest_digest)
        if media_type not in MANIFEST_TYPES:
            raise ImageConfigUnavailable(f"{ref}: unsupported manifest type {media_type}")
        config_digest = (document.get("config") or {}).get("digest")
        if not config_digest:
            raise ImageConfigUnavailable(f"{ref}: manifest has no config")
        blob = self._get(ref, f"blobs/{config_digest}")
        if blob.status_code != 200:
            raise ImageConfigUnavailable(f"{ref}: config blob answered HTTP {blob.status_code}")
        self._check_digest(ref, config_digest, blob.content)
        try:
            container = json.loads(blob.content).get("config") or {}
        except (ValueError, AttributeError):
            raise ImageConfigUnavailable(f"{ref}: config blob is not JSON") from None
        result = ImageConfig(
            _string_list(container.get("Entrypoint")),
            _string_list(container.get("Cmd")),
            manifest_digest,
            _layers_size(document),
        )
        self._remember(top_digest, result)
        if manifest_digest != top_digest:
            self._remember(manifest_digest, result)
        return result

    def _manifest(self, ref: ImageReference, reference: str) -> tuple[str, str, dict]:
        response = self._get(ref, f"manifests/{reference}", headers={"Accept": ACCEPT})
        if response.status_code == 404:
            raise ImageNotFound(f"image {ref} not found in registry {ref.registry}")
        if response.status_code != 200:
            raise ImageConfigUnavailable(
                f"{ref}: registry {ref.registry} answered HTTP {response.status_code}"
            )
        try:
            document = json.loads(response.content)
        except ValueError:
            raise ImageConfigUnavailable(f"{ref}: manifest is not JSON") from None
        digest = "sha256:" + hashlib.sha256(response.content).hexdigest()
        if reference.startswith("sha256:"):
            self._check_digest(ref, reference, response.content)
        media_type = (response.headers.get("Content-Type") or "").split(";")[0].strip()
        if media_type not in INDEX_TYPES | MANIFEST_TYPES:
            media_type = document.get("mediaType") or (
                OCI_INDEX if "manifests" in document else OCI_MANIFEST
            )
        return digest, media_type, document

    def _pick_platform(self, ref: ImageReference, index: dict) -> str:
        wanted_os, wanted_arch = self.platform
        for entry in index.get("manifests") or []:
            platform = entry.get("platform") or {}
            if platform.get("os") == wanted_os and platform.get("architecture") == wanted_arch:
                return entry["digest"]
        raise ImageConfigUnavailable(f"{ref}: no {wanted_os}/{wanted_arch} image in its index")

    @staticmethod
    def _check_digest(ref: ImageReference, digest: str, content: bytes) -> None:
        if digest.startswith("sha256:") and hashlib.sha256(content).hexdigest() != digest[7:]:
            raise ImageConfigUnavailable(f"{ref}: content does not match digest {digest}")

    # ---------------------------------------------------------------- HTTP + auth

    def _base_url(self, host: str) -> str:
        insecure = host.lower() in self.insecure_hosts or _is_loopback(host)
        return f"{'http' if insecure else 'https'}://{host}/v2/"

    def _get(
        self, ref: ImageReference, path: str, *, method: str = "GET", headers: dict | None = None
    ) -> requests.Response:
        url = self._base_url(ref.api_host) + f"{ref.repository}/{path}"
        scope = f"repository:{ref.repository}:pull"
        headers = dict(headers or {})
        token = self._token_for(ref.registry, scope)
        if token:
            headers["Authorization"] = f"Bearer {token}"
        login = self.credentials.get(ref.registry)
        preemptive = login if ref.registry in self._basic_registries else None
        response = self.session.request(
            method, url, headers=headers, auth=preemptive, timeout=self.timeout
        )
        if response.status_code != 401:
            return response
        scheme, params = _parse_challenge(response.headers.get("WWW-Authenticate", ""))
        if scheme == "basic":
            if not login:
                raise ImageConfigUnavailable(
                    f"registry {ref.registry} requires a login and the config has none for it"
                )
            self._basic_registries.add(ref.registry)
            response = self.session.request(
                method, url, headers=headers, auth=login, timeout=self.timeout
            )
        elif scheme == "bearer" and params.get("realm"):
            token = self._fetch_token(ref.registry, params, scope, login)
            headers["Authorization"] = f"Bearer {token}"
            response = self.session.request(method, url, headers=headers, timeout=self.timeout)
        if response.status_code == 401:
            raise ImageConfigUnavailable(
                f"registry {ref.registry} refused access to {ref.repository}"
                + ("" if login else " (the config has no credentials for it)")
            )
        return response

    def _token_for(self, registry: str, scope: str) -> str | None:
        with self._lock:
            token, expiry = self._tokens.get((registry, scope), (None, 0.0))
        return token if token and time.monotonic() < expiry else None

    def _fetch_token(self, registry: str, params: dict, scope: str, login) -> str:
        query = {"service": params["service"]} if params.get("service") else {}
        query["scope"] = params.get("scope") or scope
        response = self.session.get(params["realm"], params=query, auth=login, timeout=self.timeout)
        if response.status_code != 200:
            raise ImageConfigUnavailable(
                f"registry {registry}: token service answered HTTP {response.status_code}"
                + ("" if login else " (the config has no credentials for it)")
            )
        try:
            data = response.json()
            token = data.get("token") or data["access_token"]
        except (ValueError, KeyError, AttributeError):
            raise ImageConfigUnavailable(f"registry {registry}: bad token answer") from None
        # Refresh a little early; registries default to 60 s when expires_in is missing.
        lifetime = max(float(data.get("expires_in") or 60) - 10, 1)
        with self._lock:
            self._tokens[(registry, scope)] = (token, time.monotonic() + lifetime)
        return token


def _string_list(value) -> list[str] | None:
    if value is None:
        return None
    if isinstance(value, str):  # not valid per spec, but seen in hand-made configs
        return [value]
    return [str(item) for item in value]


def _layers_size(manifest: dict) -> int | None:
    """The compressed size of the image's layers, from its manifest; None if any is missing."""
    layers = manifest.get("layers")
    if not isinstance(layers, list) or not layers:
        return None
    sizes = [layer.get("size") if isinstance(layer, dict) else None for layer in layers]
    if not all(isinstance(size, int) and size >= 0 for size in sizes):
        return None
    return sum(sizes)
