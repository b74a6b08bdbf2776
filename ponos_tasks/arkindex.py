"""The agent's Arkindex client: registration, actions, task definitions, states and logs.

Everything goes through `arkindex-client` (operation ids from the schema the server serves),
as every Arkindex tool does, except the log upload, which is a plain PUT to a pre-signed S3
URL. This module knows nothing of Celery: the Celery tasks call it with ids.

Retries: `ArkindexClient.request()` retries every 5xx five times on its own (waits 3, 4, 8,
16 s) and never retries network errors. We call `single_request()` instead, the same call
without that decorator, and apply one tenacity policy of our own to 5xx *and* network errors
(`max_attempts` tries, exponential waits 0.5, 1, 2... s capped at `max_wait`). Retries are
therefore never nested: a call costs at most `max_attempts` requests (4 by default) and at
most `max_wait * (max_attempts - 1)` seconds of waiting (3.5 s with the defaults) plus timeouts.
A 401 adds one token renewal and one more round of that policy, no more.

Secrets (seed, access/refresh tokens, task tokens in definitions, pre-signed URLs) are never
logged nor put in exception messages.

An optional `on_call(api, endpoint, status)` hook is told of every request sent: each
operation ("arkindex", its operation id) and each log upload ("s3", "upload_logs"), with its
HTTP status (None when no answer came); the agent counts calls and 429s with it.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import socket
import tempfile
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import parse_qsl, urljoin, urlsplit

import requests
from arkindex import ArkindexClient
from arkindex.exceptions import ErrorResponse, SchemaError
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF
from tenacity import (
    Retrying,
    before_sleep_log,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

from ponos_tasks.lifecycle import ARKINDEX_TERMINAL_STATES
from ponos_tasks.logs import redact, strip_url_queries

logger = logging.getLogger(__name__)

SCHEMA_PATH = "/api/v1/openapi/?format=json"
# Connect/read timeouts of the calls we make ourselves (schema, log upload).
HTTP_TIMEOUT = (5, 30)


# --------------------------------------------------------------------------- data


@dataclass(frozen=True)
class Action:
    """One action from RetrieveAgentActions; `kind` is e.g. "start_task" or "stop_task"."""

    kind: str
    task_id: str


@dataclass(frozen=True)
class TaskDefinition:
    id: str
    slug: str
    image: str
    command: str | None
    # The env holds the task token: keep it out of reprs (and so out of logs and tracebacks).
    env: dict[str, str] = field(repr=False)
    parents: dict[str, str]  # parent task id -> slug (the TASK_PARENTS mapping)
    s3_logs_put_url: str | None = field(repr=False)
    requires_gpu: bool = False
    # What makes this definition impossible to run (a field of the wrong type, a malformed
    # parent): the task is refused before anything is rented, with these in its log.
    problems: tuple[str, ...] = ()

    @classmethod
    def from_api(cls, data: dict, task_id: str = "") -> TaskDefinition:
        """Tolerant: a field of the wrong type is a problem of the definition (kept in
        `problems`), not an exception, so that the task can still be ended and its log
        published (the pre-signed log URL is in the same answer)."""
        problems: list[str] = []
        image = data.get("image")
        if image is not None and not isinstance(image, str):
            problems.append(f"image is a {type(image).__name__}, not a string")
        command = data.get("command")
        if command is not None and not isinstance(command, str):
            problems.append(f"command is a {type(command).__name__}, not a string")
            command = None
        env = data.get("env")
        if env is not None and not isinstance(env, dict):
            problems.append(f"env is a {type(env).__name__}, not a mapping")
            env = None
        parents = data.get("parents") or []
        parent_map: dict[str, str] = {}
        if isinstance(parents, dict):
            parent_map = {str(k): str(v) for k, v in parents.items()}
        elif isinstance(parents, list):
            for parent in parents:
                if isinstance(parent, dict) and parent.get("id") and parent.get("slug"):
                    parent_map[str(parent["id"])] = str(parent["slug"])
                else:
                    problems.append(f"parent {json.dumps(parent)[:60]} has no id and slug")
        else:
            problems.append(f"parents is a {type(parents).__name__}, not a list")
        url = data.get("s3_logs_put_url")
        return cls(
            id=str(data.get("id") or task_id),
            slug=str(data.get("slug") or ""),
            image=image if isinstance(image, str) else "",
            command=command or None,
            env={str(k): "" if v is None else str(v) for k, v in (env or {}).items()},
            parents=parent_map,
            s3_logs_put_url=url if isinstance(url, str) else None,
            requires_gpu=bool(data.get("requires_gpu", False)),
            problems=tuple(problems),
        )


class ArkindexError(Exception):
    """Arkindex cannot be used as configured, or answered an unexpected error (one line)."""


class ArkindexUnavailable(ArkindexError):
    """Arkindex did not answer, or answered 5xx/429, on every try of a call."""


class ReportInFlight(ArkindexUnavailable):
    """A state update is claimed by another worker (or one that died): try again later."""


class RegistrationError(ArkindexError):
    """CreateAgent refused: wrong seed, unknown farm, invalid body."""


class TaskGone(ArkindexError):
    """Arkindex answered 404 for the task: it was deleted. A positive fact: nothing is left to
    run or report for it."""

    def __init__(self, task_id: str):
        self.task_id = task_id
        super().__init__(f"task {task_id} no longer exists on Arkindex (HTTP 404)")


class TransitionRefused(ArkindexError):
    """Arkindex answered 400 to a state update: the state table forbids it. Never retried."""

    def __init__(self, task_id: str, state: str, detail: str):
        self.task_id = task_id
        self.state = state
        self.detail = detail
        super().__init__(f"Arkindex refused state {state!r} for task {task_id}: {detail}")


# --------------------------------------------------------------------------- stores


class CredentialStore(Protocol):
    def load(self) -> dict | None: ...
    def save(self, data: dict) -> dict: ...  # the credentials in force afterwards
    def clear(self) -> None: ...
    def lock(self): ...


class MemoryCredentialStore:
    """Credentials kept in this process only (tests, one-shot commands)."""

    def __init__(self):
        self._data: dict | None = None
        self._lock = threading.Lock()

    def load(self) -> dict | None:
        return dict(self._data) if self._data else None

    def save(self, data: dict) -> dict:
        self._data = dict(data)
        return data

    def clear(self) -> None:
        self._data = None

    @contextmanager
    def lock(self):
        with self._lock:
            yield


class ReportedStatesLike(Protocol):
    CLAIMED: str
    REPORTED: str
    IN_FLIGHT: str
    OTHER_TERMINAL: str

    def claim(self, task_id: str, state: str) -> str: ...
    def confirm(self, task_id: str, state: str) -> None: ...
    def mark(self, task_id: str, state: str) -> None: ...
    def release(self, task_id: str, state: str) -> None: ...
    def terminal(self, task_id: str) -> str | None: ...


class MemoryReportedStates:
    """The reported-states guard in process memory (state.ReportedStates is the shared one,
    with leases; here a claim dies with the process, so none is needed)."""

    CLAIMED, REPORTED, IN_FLIGHT, OTHER_TERMINAL = (
        "claimed",
        "reported",
        "in_flight",
        "other_terminal",
    )

    def __init__(self):
        self._states: dict[tuple[str, str], str] = {}  # -> "pending" / "done"
        self._terminal: dict[str, tuple[str, bool]] = {}  # task -> (state, confirmed)
        self._lock = threading.Lock()

    def claim(self, task_id: str, state: str) -> str:
        with self._lock:
            current = self._states.get((task_id, state))
            if current is not None:
                return self.IN_FLIGHT if current == "pending" else self.REPORTED
            if state in ARKINDEX_TERMINAL_STATES:
                other = self._terminal.get(task_id)
                if other is not None:
                    return self.IN_FLIGHT if not other[1] else self.OTHER_TERMINAL
                self._terminal[task_id] = (state, False)
            self._states[(task_id, state)] = "pending"
            return self.CLAIMED

    def confirm(self, task_id: str, state: str) -> None:
        with self._lock:
            self._states[(task_id, state)] = "done"
            if state in ARKINDEX_TERMINAL_STATES:
                self._terminal[task_id] = (state, True)

    mark = confirm

    def release(self, task_id: str, state: str) -> None:
        with self._lock:
            if self._states.get((task_id, state)) == "pending":
                del self._states[(task_id, state)]
            if self._terminal.get(task_id) == (state, False):
                del self._terminal[task_id]

    def terminal(self, task_id: str) -> str | None:
        found = self._terminal.get(task_id)
        return found[0] if found is not None and found[1] else None


# --------------------------------------------------------------------------- helpers


# Registration (CreateAgent). Arkindex's GetPublicKey returns the server's EC public key as a
# PEM (a P-384 key in its published schema); CreateAgent takes the agent's own public key
# (PEM) and a `derivation` proving the agent knows the farm seed without sending it.
AGENT_CURVE = ec.SECP384R1()
# The order of P-384's base point (SEC 2 / FIPS 186-4): private scalars lie in [1, n - 1].
P384_ORDER = int(
    "ffffffffffffffffffffffffffffffffffffffffffffffffc7634d81f4372ddf581a0db248b0a77aecec196accc52973",
    16,
)
KEY_LABEL = b"ponos-vast agent key P-384"


def agent_private_key(identity: str) -> ec.EllipticCurvePrivateKey:
    """The agent's key pair, derived deterministically from its identity (hex material that
    agent.py derives from the seed, farm and agent name, or a random one kept in the
    credential store): an agent that lost all memory registers again with the same public
    key, so Arkindex recognises the same agent. HMAC-SHA512 gives 512 bits, reduced into
    [1, n - 1] (the bias is below 2^-128)."""
    digest = hmac.new(identity.encode(), KEY_LABEL, hashlib.sha512).digest()
    scalar = int.from_bytes(digest, "big") % (P384_ORDER - 1) + 1
    return ec.derive_private_key(scalar, AGENT_CURVE)


def public_key_pem(private_key: ec.EllipticCurvePrivateKey) -> str:
    return (
        private_key.public_key()
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode()
    )


def derivation(seed: str, private_key: ec.EllipticCurvePrivateKey, server_public_pem: str) -> str:
    """The proof of the farm seed sent to CreateAgent, the one place the scheme lives.

    The shape Ponos agents are described to use: an ECDH shared secret between the agent's
    private key and the server's public key, through HKDF-SHA256 (32 bytes, no salt) with
    the farm seed as `info`, base64-encoded. The server recomputes it from its private key
    and the agent's public key; a wrong seed gives another value. (The real agent is closed
    source: replace this function, and its twin in the simulator, if Arkindex differs.)"""
    server_key = serialization.load_pem_public_key(server_public_pem.encode())
    if not isinstance(server_key, ec.EllipticCurvePublicKey):
        raise RegistrationError("Arkindex's public key (GetPublicKey) is not an EC key")
    shared = private_key.exchange(ec.ECDH(), server_key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=seed.encode()).derive(
        shared
    )
    return base64.b64encode(derived).decode()


class _BadAnswer(Exception):
    """A 2xx answer that is not JSON (an HTML page, a cut body): retried like a 5xx, since a
    later answer may be whole."""


def _is_transient(exc: BaseException) -> bool:
    if isinstance(exc, requests.ConnectionError | requests.Timeout | _BadAnswer):
        return True
    if isinstance(exc, ErrorResponse):
        return exc.status_code >= 500 or exc.status_code == 429
    return isinstance(exc, _TransientHTTPError)


def _times(n: int) -> str:
    return "once" if n == 1 else f"{n} times"


def _never_applied(exc: BaseException) -> bool:
    """A failure after which the request surely did not take effect: safe to send again even
    when sending twice would be wrong (a state update). A read timeout, a 5xx or a garbled
    answer may come *after* the server applied it."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    return isinstance(exc, ErrorResponse) and exc.status_code == 429


class _TransientHTTPError(Exception):
    def __init__(self, status: int):
        self.status = status
        super().__init__(f"HTTP {status}")


def error_detail(exc: ErrorResponse) -> str:
    """The server's own message from an Arkindex error body, on one line."""
    content = exc.content
    if isinstance(content, dict):
        errors = content.get("errors")
        if isinstance(errors, list) and errors:
            parts = []
            for err in errors:
                if not isinstance(err, dict):
                    continue
                attr = err.get("attr")
                prefix = ".".join(map(str, attr)) + ": " if attr else ""
                parts.append(prefix + str(err.get("detail", err.get("code", ""))))
            if parts:
                return "; ".join(parts)
        if "detail" in content:
            return str(content["detail"])
        return json.dumps(content)[:300]
    text = str(content or exc.title)
    return " ".join(text.split())[:300]


def _error_attrs_and_codes(exc: ErrorResponse) -> tuple[set[str], set[str]]:
    attrs: set[str] = set()
    codes: set[str] = set()
    content = exc.content if isinstance(exc.content, dict) else {}
    for err in content.get("errors") or []:
        if isinstance(err, dict):
            attrs.update(str(a) for a in (err.get("attr") or []))
            codes.add(str(err.get("code", "")))
    for key, value in content.items():
        if key not in ("type", "errors", "detail"):
            attrs.add(key)  # DRF-style {"farm": ["..."]} bodies
        if key == "code":
            codes.add(str(value))
    return attrs, codes


def _cpu_frequency_mhz() -> int:
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            for line in cpuinfo:
                if line.lower().startswith("cpu mhz"):
                    return max(1, int(float(line.split(":")[1])))
    except (OSError, ValueError):
        pass
    return 1000


def _hostname() -> str:
    # CreateAgent accepts [-a-zA-Z0-9_]{1,64}.
    return (re.sub(r"[^-a-zA-Z0-9_]", "-", socket.gethostname()) or "ponos-vast")[:64]


# --------------------------------------------------------------------------- client


class _TimeoutAdapter(requests.adapters.HTTPAdapter):
    """Sends every request of a session with our timeout, whatever its caller set."""

    def __init__(self, timeout: tuple[float, float]):
        super().__init__()
        self.timeout = timeout

    def send(self, request, timeout=None, **kwargs):
        return super().send(request, timeout=self.timeout, **kwargs)


class ArkindexAgentClient:
    """One Ponos agent's view of Arkindex (Bearer auth), safe to share between threads
    of one process; several processes share the agent through the credential store."""

    def __init__(
        self,
        url: str,
        farm_id: str,
        seed: str,
        store: CredentialStore,
        *,
        hostname: str | None = None,
        gpu_count: int = 1,
        gpu_names: str | None = None,
        reported: ReportedStatesLike | None = None,
        max_attempts: int = 4,
        max_wait: float = 4.0,
        public_key: str | None = None,
        timeout: tuple[float, float] = HTTP_TIMEOUT,
        on_call: Callable[[str, str, int | None], None] | None = None,
    ):
        self.url = url.rstrip("/") + "/"
        # Told of every request sent; must not raise (MetricStore.count_api_call does not).
        self.on_call = on_call
        self.timeout = timeout  # (connect, read) s of every request
        self.farm_id = str(farm_id)
        self._seed = seed
        self.store = store
        self.hostname = hostname or _hostname()
        # `public_key`: the identity the agent's key pair is derived from (agent_private_key;
        # the name is historical). A fixed one (derived by the caller from the seed) makes
        # re-registration after a total loss of memory yield the same agent; None draws one
        # and keeps it in the store.
        self.identity = public_key
        self.gpu_count = gpu_count
        self.gpu_names = gpu_names
        # Which states were sent already: state.ReportedStates shares it between the agent's
        # processes; without one (tests, one-shot commands) it is this process's memory.
        self.reported = reported if reported is not None else MemoryReportedStates()
        self.max_attempts = max_attempts
        self.max_wait = max_wait
        self._api: ArkindexClient | None = None
        self._creds: dict | None = None
        # task id -> (fetched at, definition): bounded, and short-lived, since a definition
        # carries a pre-signed log URL that expires (1 h by default on S3).
        self._definitions: OrderedDict[str, tuple[float, TaskDefinition]] = OrderedDict()
        self._lock = threading.RLock()

    # ---------------------------------------------------------------- plumbing

    def _retrying(self, retry_on=_is_transient) -> Retrying:
        return Retrying(
            retry=retry_if_exception(retry_on),
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_exponential(multiplier=0.5, max=self.max_wait),
            reraise=True,
            before_sleep=before_sleep_log(logger, logging.WARNING),
        )

    @property
    def api(self) -> ArkindexClient:
        """The arkindex-client instance, built on first use from the server's schema."""
        with self._lock:
            if self._api is None:
                self._api = self._build_api()
            return self._api

    def _build_api(self) -> ArkindexClient:
        schema_url = urljoin(self.url, SCHEMA_PATH)
        # We fetch the schema ourselves (arkindex-client's own fetch has no timeout and turns
        # every failure into the same SchemaError): this gives a timeout, retries on network
        # errors, and one clear line saying *what* is wrong with the URL.
        try:
            for attempt in self._retrying():
                with attempt:
                    resp = requests.get(
                        schema_url,
                        headers={"Accept": "application/vnd.oai.openapi+json, application/json"},
                        timeout=self.timeout,
                    )
                    if resp.status_code >= 500:
                        raise _TransientHTTPError(resp.status_code)
        except requests.ConnectionError:
            raise ArkindexError(
                f"Arkindex URL {self.url}: nothing answers there (connection failed)"
            ) from None
        except requests.Timeout:
            raise ArkindexError(f"Arkindex URL {self.url}: no answer (timed out)") from None
        except _TransientHTTPError as exc:
            raise ArkindexError(
                f"Arkindex URL {self.url}: the server fails (HTTP {exc.status} on the schema)"
            ) from None
        not_arkindex = (
            f"Arkindex URL {self.url}: not an Arkindex API (no OpenAPI schema at {schema_url}"
        )
        if resp.status_code != 200:
            raise ArkindexError(f"{not_arkindex}: HTTP {resp.status_code})")
        try:
            schema = resp.json()
        except ValueError:
            raise ArkindexError(f"{not_arkindex}: the answer is not JSON)") from None
        if not isinstance(schema, dict) or "openapi" not in schema or "paths" not in schema:
            raise ArkindexError(f"{not_arkindex}: the JSON is not an OpenAPI document)")

        with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as tmp:
            json.dump(schema, tmp)
        try:
            api = ArkindexClient(base_url=self.url, schema_url=tmp.name, auth_scheme="Bearer")
            # arkindex-client waits up to 60 s for an answer, tried `max_attempts` times: a
            # stalled Arkindex would hold a step for minutes. Ours is the one timeout.
            adapter = _TimeoutAdapter(self.timeout)
            api.session.mount("http://", adapter)
            api.session.mount("https://", adapter)
        except SchemaError as exc:
            raise ArkindexError(
                f"{not_arkindex}: the schema is invalid: {exc.__cause__})"
            ) from None
        finally:
            os.unlink(tmp.name)
        missing = {"CreateAgent", "RetrieveAgentActions", "PartialUpdateTask"} - set(
            api.document.links
        )
        if missing:
            raise ArkindexError(
                f"Arkindex URL {self.url}: its API has no Ponos agent endpoints "
                f"({', '.join(sorted(missing))} missing)"
            )
        return api

    def _send(self, operation_id: str, *, retry_on=_is_transient, **params) -> Any:
        """One operation with our retry policy and no auth handling. 4xx answers are raised
        as arkindex-client's ErrorResponse for the caller to interpret. `retry_on`: which
        failures are tried again (`_never_applied` for a call that must not apply twice)."""
        tries = 0
        try:
            for attempt in self._retrying(retry_on):
                with attempt:
                    tries += 1
                    return self._decoded(operation_id, **params)
        except requests.RequestException as exc:
            raise ArkindexUnavailable(
                f"Arkindex {self.url}: {operation_id} failed {_times(tries)} ({type(exc).__name__})"
            ) from None
        except _BadAnswer as exc:
            raise ArkindexUnavailable(
                f"Arkindex {self.url}: {operation_id} answered {exc} {_times(tries)}"
            ) from None
        except ErrorResponse as exc:
            if _is_transient(exc):
                raise ArkindexUnavailable(
                    f"Arkindex {self.url}: {operation_id} failed {_times(tries)} "
                    f"(HTTP {exc.status_code})"
                ) from None
            raise

    def _decoded(self, operation_id: str, **params) -> Any:
        """One request; its answer must be JSON. arkindex-client raises a bare ValueError on
        a cut JSON body and returns the text of an HTML page (status 200): both are bad
        answers here, never data."""
        status = None  # no answer (or one too garbled to say)
        try:
            result = self.api.single_request(operation_id, **params)
            status = 200
        except ErrorResponse as exc:
            status = exc.status_code
            raise
        except ValueError:
            raise _BadAnswer("invalid JSON (a cut or garbled body)") from None
        finally:
            self._told("arkindex", operation_id, status)
        if result is not None and not isinstance(result, dict | list):
            raise _BadAnswer(f"a {type(result).__name__} instead of JSON (an HTML page?)")
        return result

    def _told(self, api: str, endpoint: str, status: int | None) -> None:
        if self.on_call is not None:
            self.on_call(api, endpoint, status)

    def _plain_request(
        self, method: str, url: str, api: str, endpoint: str, **kwargs
    ) -> requests.Response:
        """One request made without arkindex-client, told to the call hook."""
        status = None
        try:
            response = requests.request(method, url, timeout=self.timeout, **kwargs)
            status = response.status_code
            return response
        finally:
            self._told(api, endpoint, status)

    def _set_token(self, creds: dict) -> None:
        self._creds = creds
        self.api.session.auth.scheme = "Bearer"
        self.api.session.auth.token = creds["access_token"]

    def _call(self, operation_id: str, **params) -> Any:
        """An authenticated operation; on 401 (refused before anything was applied) renew the
        token once and retry once."""
        creds = self._ensure_credentials()
        try:
            return self._send(operation_id, **params)
        except ErrorResponse as exc:
            if exc.status_code != 401:
                raise
            logger.info("Arkindex token refused on %s; renewing it", operation_id)
        self._renew(creds["access_token"])
        return self._send(operation_id, **params)

    def _ensure_credentials(self) -> dict:
        with self._lock:
            if self._creds is None:
                self.register()
            return self._creds

    def _matches(self, creds: dict | None) -> bool:
        return bool(
            creds
            and creds.get("url") == self.url
            and creds.get("farm") == self.farm_id
            and creds.get("access_token")
        )

    def _renew(self, failed_token: str) -> None:
        with self._lock, self.store.lock():
            stored = self.store.load()
            # Another worker may already have renewed it: adopt its tokens.
            if self._matches(stored) and stored["access_token"] != failed_token:
                self._set_token(stored)
                return
            creds = stored if self._matches(stored) else self._creds
            if not creds or not creds.get("refresh_token"):
                self._register_locked()
                return
            # The refresh is authenticated by the refresh token alone: the expired Bearer
            # must not travel with it (Arkindex may refuse the call for it).
            self.api.session.auth.token = None
            try:
                resp = self._send("RefreshAgentToken", body={"refresh": creds["refresh_token"]})
            except ErrorResponse as exc:
                logger.warning(
                    "Arkindex refused the refresh token (HTTP %s); registering again",
                    exc.status_code,
                )
                self._register_locked()
                return
            access = resp.get("access_token") or resp.get("access")
            if not access:
                raise ArkindexError("RefreshAgentToken answered without an access token")
            creds = dict(creds)
            creds["access_token"] = access
            creds["refresh_token"] = (
                resp.get("refresh_token") or resp.get("refresh") or creds["refresh_token"]
            )
            creds = self.store.save(creds)
            self._set_token(creds)
            logger.info("Arkindex agent token refreshed")

    # ---------------------------------------------------------------- public API

    @property
    def agent_id(self) -> str | None:
        creds = self._creds or self.store.load()
        return creds.get("agent_id") if self._matches(creds) else None

    def register(self, force: bool = False, *, new_identity: bool = False) -> dict:
        """Register the agent (CreateAgent) unless the store already holds credentials for
        this URL and farm (`force` registers anyway, as the same agent unless `new_identity`).
        Returns the agent's public info (never the tokens)."""
        with self._lock:
            if new_identity:
                self.store.clear()
            if not force and (known := self._stored_agent()) is not None:
                return known
            with self.store.lock():
                # Another worker may have registered while this one waited for the lock: one
                # CreateAgent per burst, not one per waiting worker.
                if not force and (known := self._stored_agent()) is not None:
                    return known
                return self._register_locked()

    def _stored_agent(self) -> dict | None:
        """The stored agent's public info (its token now in use), if the store holds
        credentials for this URL and farm."""
        stored = self.store.load()
        if not self._matches(stored):
            return None
        self._set_token(stored)
        return dict(stored.get("agent") or {"id": stored["agent_id"]})

    def _register_locked(self) -> dict:
        # The identity is kept with the credentials and used again on a re-registration
        # (refresh token refused), so that Arkindex recognises the same agent (same public
        # key) and keeps its tasks.
        stored = self.store.load() or {}
        same_target = stored.get("url") == self.url and stored.get("farm") == self.farm_id
        identity = (
            self.identity
            or (stored.get("identity") if same_target else None)
            # Credentials written before the key pair: their nonce is the identity.
            or (stored.get("public_key") if same_target and not stored.get("identity") else None)
            or secrets.token_hex(32)
        )
        private_key = agent_private_key(identity)
        public_key = public_key_pem(private_key)
        body = {
            "farm": self.farm_id,
            "hostname": self.hostname,
            "cpu_cores": os.cpu_count() or 1,
            "cpu_frequency": _cpu_frequency_mhz(),
            "gpu_count": self.gpu_count,
            "gpu_names": self.gpu_names,
            "public_key": public_key,
            "derivation": derivation(self._seed, private_key, self._server_public_key()),
        }
        self.api.session.auth.token = None  # CreateAgent is anonymous
        try:
            resp = self._send("CreateAgent", body=body)
        except ErrorResponse as exc:
            raise self._registration_error(exc) from None
        agent = {
            k: v for k, v in resp.items() if k not in ("access_token", "refresh_token", "token")
        }
        creds = {
            "url": self.url,
            "farm": self.farm_id,
            "agent_id": str(resp["id"]),
            "public_key": public_key,
            # Only a drawn identity needs keeping: a fixed one is derived again.
            "identity": None if self.identity else identity,
            "access_token": resp["access_token"],
            "refresh_token": resp.get("refresh_token"),
            "agent": agent,
            "registered_at": time.time(),
        }
        logger.info("Registered on Arkindex as agent %s (farm %s)", creds["agent_id"], self.farm_id)
        creds = self.store.save(creds)  # another worker's, if our lock lapsed meanwhile
        self._set_token(creds)
        return dict(creds.get("agent") or {"id": creds["agent_id"]})

    def _server_public_key(self) -> str:
        """Arkindex's public key (GetPublicKey, anonymous, a PEM file): fetched with our own
        GET, since arkindex-client would save a non-JSON answer to a temporary file."""
        link = self.api.document.links.get("GetPublicKey")
        if link is None:
            raise RegistrationError(
                f"Arkindex URL {self.url}: its API has no GetPublicKey (needed to register)"
            )
        url = urljoin(self.url, link.url)
        try:
            for attempt in self._retrying():
                with attempt:
                    resp = self._plain_request("GET", url, "arkindex", "GetPublicKey")
                    if resp.status_code >= 500 or resp.status_code == 429:
                        raise _TransientHTTPError(resp.status_code)
        except (requests.RequestException, _TransientHTTPError) as exc:
            raise ArkindexUnavailable(
                f"Arkindex {self.url}: GetPublicKey failed {self.max_attempts} times "
                f"({type(exc).__name__})"
            ) from None
        if resp.status_code != 200 or "BEGIN PUBLIC KEY" not in resp.text:
            raise RegistrationError(
                f"Arkindex {self.url}: GetPublicKey did not return a PEM public key "
                f"(HTTP {resp.status_code})"
            )
        return resp.text

    def _registration_error(self, exc: ErrorResponse) -> ArkindexError:
        detail = error_detail(exc)
        attrs, codes = _error_attrs_and_codes(exc)
        text = (detail + " " + " ".join(codes)).lower()
        unknown = any(word in text for word in ("not exist", "not found", "does_not_exist"))
        if "farm" in attrs or exc.status_code == 404 or ("farm" in text and unknown):
            return RegistrationError(
                f"farm {self.farm_id} does not exist on {self.url} (Arkindex said: {detail})"
            )
        if (
            "derivation" in attrs
            or "seed" in text
            or "derivation" in text
            or exc.status_code == 403
        ):
            return RegistrationError(
                f"Arkindex refused the registration for farm {self.farm_id}: wrong seed "
                f"(Arkindex said: {detail})"
            )
        return RegistrationError(
            f"Arkindex refused the registration (HTTP {exc.status_code}): {detail}"
        )

    def actions(self, capacity: int | None = None) -> list[Action]:
        """The actions Arkindex has for this agent. `capacity` (how many more tasks the agent
        takes) is sent only when the server's schema declares that query parameter."""
        params = {}
        if capacity is not None:
            link = self.api.lookup_operation("RetrieveAgentActions")
            if any(f.name == "capacity" for f in link.get_query_fields()):
                params["capacity"] = capacity
        resp = self._call("RetrieveAgentActions", **params) or {}
        items = resp.get("actions") if isinstance(resp, dict) else resp
        if not isinstance(items, list):
            raise ArkindexUnavailable(f"RetrieveAgentActions: actions is {json.dumps(items)[:40]}")
        actions = []
        for item in items:
            # An action without a kind or a task is nothing to act on: skipped, said once.
            if isinstance(item, dict) and item.get("action") and item.get("task_id"):
                actions.append(Action(kind=str(item["action"]), task_id=str(item["task_id"])))
            else:
                logger.warning("RetrieveAgentActions: ignoring %s", json.dumps(item)[:80])
        return actions

    DEFINITIONS_KEPT = 256
    DEFINITION_TTL = 600.0  # s; well under a pre-signed URL's lifetime

    def task_definition(self, task_id: str) -> TaskDefinition:
        """What to run for a task; cached in memory for DEFINITION_TTL (the definition does
        not change, but its pre-signed log URL expires), at most DEFINITIONS_KEPT of them."""
        task_id = str(task_id)
        now = time.monotonic()
        with self._lock:
            cached = self._definitions.get(task_id)
            if cached is not None and now - cached[0] < self.DEFINITION_TTL:
                self._definitions.move_to_end(task_id)
                return cached[1]
        definition = TaskDefinition.from_api(self.definition_answer(task_id), task_id)
        with self._lock:
            self._definitions[task_id] = (now, definition)
            self._definitions.move_to_end(task_id)
            while len(self._definitions) > self.DEFINITIONS_KEPT:
                self._definitions.popitem(last=False)
        return definition

    def definition_answer(self, task_id: str) -> dict:
        """RetrieveTaskDefinition's answer as Arkindex gave it (not cached; `ponos-vast
        doctor` checks its fields). TaskGone on 404."""
        try:
            answer = self._call("RetrieveTaskDefinition", id=str(task_id))
        except ErrorResponse as exc:
            if exc.status_code == 404:
                raise TaskGone(str(task_id)) from None
            raise
        if not isinstance(answer, dict):
            raise ArkindexUnavailable(f"the definition of task {task_id} is not a JSON object")
        return answer

    def forget(self, task_id: str) -> None:
        """Drop a task's cached definition (finished, or its log URL was refused)."""
        with self._lock:
            self._definitions.pop(str(task_id), None)

    def task_state(self, task_id: str) -> str | None:
        """The task's state on Arkindex (RetrieveTask); None only when Arkindex says the
        task does not exist (404). Anything else that prevents reading it raises
        ArkindexUnavailable: an unreadable state is unknown, never "not active"."""
        try:
            state = self._call("RetrieveTask", id=str(task_id)).get("state")
        except ErrorResponse as exc:
            if exc.status_code == 404:
                return None
            raise ArkindexUnavailable(
                f"cannot read the state of task {task_id}: HTTP {exc.status_code}"
            ) from None
        except AttributeError:  # an answer that is not an object
            raise ArkindexUnavailable(f"cannot read the state of task {task_id}") from None
        if not isinstance(state, str):
            raise ArkindexUnavailable(f"task {task_id} has no readable state")
        return state

    def update_state(self, task_id: str, state: str) -> bool:
        """Report a task's state once. True when the state is on Arkindex through this call
        (sent now, or found there: an earlier send whose answer was lost); False when nothing
        was sent because this state, or another terminal state, was reported already.
        Raises TransitionRefused (after logging the server's message) on a 400: never retried.

        Never sent twice: the task's state is read first, and the update itself is retried
        only after failures that prove it was not applied (a read timeout, a 5xx or a garbled
        answer may follow an applied update: the caller's retry reads the state again).
        """
        task_id = str(task_id)
        claim = self.reported.claim(task_id, state)
        if claim == self.reported.OTHER_TERMINAL:
            logger.warning(
                "Not reporting %s for task %s: terminal state %s already reported",
                state,
                task_id,
                self.reported.terminal(task_id),
            )
            return False
        if claim == self.reported.REPORTED:
            logger.debug("State %s of task %s already reported", state, task_id)
            return False
        try:
            current = self.task_state(task_id)
        except BaseException:
            if claim == self.reported.CLAIMED:
                self.reported.release(task_id, state)
            raise  # unknown: the caller retries
        if current is None:
            if claim == self.reported.CLAIMED:
                self.reported.release(task_id, state)
            raise TaskGone(task_id)
        if current == state:
            # Applied already (a worker killed inside its report, an answer lost): on
            # Arkindex's word, whatever lease a dead worker left.
            self.reported.mark(task_id, state)
            return True
        if claim == self.reported.IN_FLIGHT:
            # Another worker is sending it, or died before it reached Arkindex: retried later
            # (a dead worker's lease lapses).
            raise ReportInFlight(f"state {state} of task {task_id} is being reported already")
        try:
            self._call(
                "PartialUpdateTask", id=task_id, body={"state": state}, retry_on=_never_applied
            )
        except ErrorResponse as exc:
            self.reported.release(task_id, state)
            if exc.status_code == 404:
                raise TaskGone(task_id) from None
            if exc.status_code == 400:
                detail = error_detail(exc)
                logger.warning(
                    "Arkindex refused state %s for task %s (not retried): %s",
                    state,
                    task_id,
                    detail,
                )
                raise TransitionRefused(task_id, state, detail) from None
            raise ArkindexError(
                f"state {state} for task {task_id} not reported: HTTP {exc.status_code} "
                f"{error_detail(exc)}"
            ) from None
        except BaseException:
            self.reported.release(task_id, state)  # unknown: the next try reads it first
            raise
        self.reported.confirm(task_id, state)
        logger.info("Reported state %s for task %s", state, task_id)
        return True

    def upload_logs(self, put_url: str, text: str) -> None:
        """PUT the whole log text to the task's pre-signed S3 URL (overwrites)."""
        data = text.encode("utf-8")
        host = urlsplit(put_url).netloc  # the URL carries a signature: log its host only
        try:
            for attempt in self._retrying():
                with attempt:
                    resp = self._plain_request(
                        "PUT",
                        put_url,
                        "s3",
                        "upload_logs",
                        data=data,
                        headers={"Content-Type": "text/plain; charset=utf-8"},
                    )
                    if resp.status_code >= 500 or resp.status_code == 429:
                        raise _TransientHTTPError(resp.status_code)
        except (_TransientHTTPError, requests.RequestException) as exc:
            # Not `exc` itself: its text may hold the signed URL.
            reason = (
                f"HTTP {exc.status}" if isinstance(exc, _TransientHTTPError) else type(exc).__name__
            )
            raise ArkindexError(f"log upload to {host} failed: {reason}") from None
        if resp.status_code >= 400:
            # S3's 403 body quotes the request (SignatureProvided, the canonical query).
            signature = [value for _, value in parse_qsl(urlsplit(put_url).query)]
            body = strip_url_queries(redact(" ".join(resp.text.split()), signature))
            raise ArkindexError(
                f"log upload to {host} refused: HTTP {resp.status_code} {body[:200]}"
            )
        logger.debug("Uploaded %d bytes of logs to %s", len(data), host)
