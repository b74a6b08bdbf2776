"""Vast.ai REST client for the agent (no Celery here).

Contract: the Vast.ai facts of docs/reference.md §1. What this client adds over plain
requests:
- retries with exponential backoff and jitter (tenacity) on 429/502/503/504 and connection
  errors/timeouts, honouring ``Retry-After`` up to 60 s like the official client; the daily
  ``search_quota_exceeded`` 429 is never retried;
- every attempt first takes its endpoint's slot from the shared rate limiter (ratelimit.py);
- a create (``PUT /asks/{id}/``) is never re-sent once it may have reached the server: it
  raises ``CreateOutcomeUnknown`` and the caller looks its label up (at most one instance
  per task, docs/reference.md §3);
- typed, tolerant results (unknown fields and statuses kept in ``raw``);
- errors parsed from every body shape Vast answers (JSON error/msg/message/detail, text, HTML);
- an optional ``on_call(api, endpoint, status)`` hook told of every request sent (status None
  when no answer came): the agent counts calls and 429s per endpoint with it (metric_store).
The API key goes only into the Authorization header: never into a log line or an exception.
"""

from __future__ import annotations

import email.utils
import html
import json
import logging
import random
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol
from urllib.parse import urlsplit

import requests
import tenacity
from urllib3.exceptions import ConnectTimeoutError, NewConnectionError

from ponos_tasks import __version__ as _version
from ponos_tasks.logs import strip_url_queries
from ponos_tasks.models import Instance, Offer, _float, _int, _str

log = logging.getLogger(__name__)

USER_AGENT = f"ponos-vast/{_version} (+https://gitlab.teklia.com/arkindex/ponos)"
MAX_RETRY_AFTER = 60.0  # a longer Retry-After means "give up now" (official client's rule)
PAGE_SIZE = 25  # v1 list maximum
# A listing that has not ended after this many pages (10 000 instances, hundreds of times
# max_instances), or after this many pages in a row without a new instance, is broken: it is
# abandoned with an error rather than followed forever.
MAX_PAGES = 400
MAX_IDLE_PAGES = 3


# --------------------------------------------------------------------------- errors


class VastError(Exception):
    """An error answer (or no answer) from Vast.ai; ``status`` is None without an answer."""

    retryable = False

    def __init__(
        self, msg: str, *, status: int | None = None, error: str | None = None, context: str = ""
    ) -> None:
        self.status = status
        self.error = error
        self.msg = msg
        self.context = context
        parts = [context] if context else []
        if status is not None:
            parts.append(f"HTTP {status}")
        if error:
            parts.append(error)
        super().__init__(f"{' '.join(parts)}: {msg}" if parts else msg)


class VastAuthError(VastError):
    """The API key was refused (401)."""


class VastRateLimited(VastError):
    """429. ``retry_after``: seconds the server asked to wait (None when it did not say);
    ``reset_at``: unix time the daily search quota resets (search_quota_exceeded only)."""

    def __init__(
        self,
        msg: str,
        *,
        retry_after: float | None = None,
        reset_at: float | None = None,
        **kwargs: Any,
    ) -> None:
        super().__init__(msg, **kwargs)
        self.retry_after = retry_after
        self.reset_at = reset_at
        quota = self.error == "search_quota_exceeded"
        self.retryable = not quota and (retry_after is None or retry_after <= MAX_RETRY_AFTER)


class VastServerError(VastError):
    """A 5xx answer; 502/503/504 are worth retrying (idempotent calls only)."""

    def __init__(self, msg: str, **kwargs: Any) -> None:
        super().__init__(msg, **kwargs)
        self.retryable = self.status in (502, 503, 504)


class VastTransportError(VastError):
    """No usable answer: connection refused/reset, timeout, truncated body."""

    retryable = True


class VastBadAnswer(VastError):
    """A 2xx answer that is not what the call returns: an HTML page (a proxy's), truncated
    or invalid JSON, a field of the wrong type, a listing that does not end. Retried for reads
    (a later answer may be whole); never taken for an answer ("no instance", "no offer")."""

    retryable = True


class OfferUnavailable(VastError):
    """``no_such_ask`` (404/410): the offer is gone; take the next one."""


class InstanceNotFound(VastError):
    """``no_such_instance`` (404) on an instance call."""


class CreateOutcomeUnknown(VastError):
    """The create may have taken effect (lost answer, read timeout, 5xx): look the label up,
    never re-send it blindly."""


class LogsNotReady(VastError, TimeoutError):
    """The logs' ``result_url`` did not become readable within the allowed wait."""


# --------------------------------------------------------------------------- error bodies

_CODE_IN_MSG = re.compile(r"^error \d{3}/\d+:\s*([a-z]+(?:_[a-z]+)+)\b\s*(.*)$", re.S)
_TITLE = re.compile(r"<title[^>]*>(.*?)</title>", re.I | re.S)
_TAGS = re.compile(r"<[^>]+>")
_SCRIPTS = re.compile(r"<(script|style)[^>]*>.*?</\1>", re.I | re.S)
_SPACES = re.compile(r"\s+")
MAX_MSG = 300


def _squash(text: str) -> str:
    text = _SPACES.sub(" ", text).strip()
    return text if len(text) <= MAX_MSG else text[: MAX_MSG - 1] + "…"


def parse_error_body(text: str, content_type: str = "") -> tuple[str | None, str]:
    """(error code or None, human message) from any error body shape Vast.ai uses (JSON with
    error/msg/message/detail, or plain text; docs/reference.md §1.1)."""
    stripped = text.strip()
    if not stripped:
        return None, "(empty body)"
    if stripped[0] in "{[" or "json" in content_type:
        try:
            body = json.loads(stripped)
        except ValueError:
            body = None
        if isinstance(body, dict):
            error = body.get("error")
            msg = body.get("msg") or body.get("message") or body.get("detail")
            if msg is not None and not isinstance(msg, str):
                msg = json.dumps(msg)  # e.g. a FastAPI-style list of details
            error = error if isinstance(error, str) and error else None
            if error is None and msg:
                # "error 404/3603: no_such_ask Instance type by id 1234567 is not available."
                match = _CODE_IN_MSG.match(msg)
                if match:
                    error = match.group(1)
            if msg is None:
                msg = error or json.dumps(body)
            return error, _squash(msg)
    if "html" in content_type or stripped[:1] == "<":
        title = _TITLE.search(stripped)
        if title and title.group(1).strip():
            return None, _squash(html.unescape(title.group(1)))
        body_text = _TAGS.sub(" ", _SCRIPTS.sub(" ", stripped))
        return None, _squash(html.unescape(body_text)) or "(HTML error page)"
    return None, _squash(stripped)


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds from a Retry-After header (delta-seconds or HTTP date); None if absent/invalid."""
    if value is None or not value.strip():
        return None
    value = value.strip()
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    return max(0.0, when.timestamp() - (time.time() if now is None else now))


@dataclass(frozen=True)
class CreatedInstance:
    id: int
    instance_api_key: str | None = field(repr=False)
    # False: Vast created the instance stopped (HTTP 200, success false); destroy it.
    started: bool


def _bounded_text(response: requests.Response, max_bytes: int | None) -> str:
    """The body as text, keeping only its last `max_bytes` (streamed: a log of hundreds of MB
    never sits in memory whole)."""
    kept = bytearray()
    total = 0
    for chunk in response.iter_content(chunk_size=1 << 16):
        total += len(chunk)
        kept += chunk
        if max_bytes is not None and len(kept) > 2 * max_bytes:
            del kept[: len(kept) - max_bytes]
    if max_bytes is not None and len(kept) > max_bytes:
        del kept[: len(kept) - max_bytes]
    text = kept.decode("utf-8", errors="replace")
    if total > len(kept):
        # Start at a line boundary, and say what is missing.
        text = text.split("\n", 1)[-1]
        text = f"[log cut: the first {total - len(kept):,} bytes are not kept]\n" + text
    return text


# --------------------------------------------------------------------------- client


class RateLimiter(Protocol):
    def acquire(
        self,
        endpoint: str,
        timeout: float = 60.0,
        on_reserved: Callable[[], None] | None = None,
    ) -> float: ...

    def penalize(self, endpoint: str) -> float: ...


def _never_sent(exc: requests.RequestException) -> bool:
    """True when the request provably never left this machine (the TCP connection failed)."""
    if isinstance(exc, requests.ConnectTimeout):
        return True
    seen = set()
    stack: list[Any] = [exc]
    while stack:
        item = stack.pop()
        if id(item) in seen or item is None:
            continue
        seen.add(id(item))
        if isinstance(item, NewConnectionError | ConnectTimeoutError):
            return True
        if isinstance(item, BaseException):
            stack.extend(item.args)
            stack.extend([getattr(item, "reason", None), item.__cause__, item.__context__])
    return False


class VastClient:
    """The Vast.ai calls the agent needs. One instance per process (requests.Session)."""

    def __init__(
        self,
        base_url: str,
        api_key: str,
        *,
        rate_limiter: RateLimiter | None = None,
        timeout: float | tuple[float, float] = (5, 30),
        max_attempts: int = 4,
        backoff_initial: float = 0.5,
        backoff_max: float = 10.0,
        limiter_timeout: float = 60.0,
        on_call: Callable[[str, str, int | None], None] | None = None,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.rate_limiter = rate_limiter
        # Told of every request sent; must not raise (MetricStore.count_api_call does not).
        self.on_call = on_call
        self.timeout = timeout
        self.max_attempts = max(1, max_attempts)
        self.limiter_timeout = limiter_timeout
        self._backoff = tenacity.wait_exponential_jitter(
            initial=backoff_initial, max=backoff_max, jitter=backoff_initial
        )
        self._api_key = api_key
        self._session = requests.Session()
        self._session.headers.update(
            {
                "Authorization": f"Bearer {api_key}",
                "User-Agent": USER_AGENT,
                "Accept": "application/json",
            }
        )
        # logs are fetched from result_url (S3 in production): never send the key there
        self._plain = requests.Session()
        self._plain.headers["User-Agent"] = USER_AGENT

    def __repr__(self) -> str:
        return f"VastClient({self.base_url!r})"

    def close(self) -> None:
        self._session.close()
        self._plain.close()

    # ------------------------------------------------------------------ calls

    def check_auth(self) -> dict:
        """GET /users/current/: the account (without any api_key field); VastAuthError if refused."""
        body = self._call("GET", "/api/v0/users/current/", "account")
        return {key: value for key, value in body.items() if key != "api_key"}

    def search_offers(self, query: Mapping[str, Any]) -> list[Offer]:
        """POST /bundles/ with a query object (offers.build_query) -> offers as Vast orders them."""
        body = self._call("POST", "/api/v0/bundles/", "search", body=dict(query))
        rows = body.get("offers")
        if not isinstance(rows, list):  # null is no "no offer": Vast.ai answers [] for that
            raise VastBadAnswer(
                f"offers is a {type(rows).__name__}, not a list", context="POST /api/v0/bundles/"
            )
        # A row without a numeric id cannot be rented: skipped (the others are still offers).
        return [
            Offer.from_dict(row)
            for row in rows
            if isinstance(row, dict) and _int(row.get("id")) is not None
        ]

    def create_instance(
        self,
        offer_id: int,
        *,
        image: str,
        label: str,
        env: Mapping[str, str],
        disk: float,
        runtype: str = "args",
        onstart: str | None = None,
        args: list[str] | None = None,
        image_login: str | None = None,
        price: float | None = None,
        before_send: Callable[[], None] | None = None,
        on_slot: Callable[[], None] | None = None,
    ) -> CreatedInstance:
        """PUT /asks/{offer_id}/. Raises OfferUnavailable when the offer is gone and
        CreateOutcomeUnknown when the instance may exist although no answer said so.

        `before_send` runs right before each try is sent (after the rate limiter's wait, which
        can be long): the caller checks there that it may still create (e.g. renews its create
        lock, raising if another worker took it), so that nothing is sent on a stale right.
        `on_slot` runs once the rate limiter has reserved a try's slot, before its wait."""
        payload: dict[str, Any] = {
            "client_id": "me",
            "image": image,
            "label": label,
            "env": dict(env),
            "disk": disk,
            "runtype": runtype,
        }
        if onstart is not None:
            payload["onstart"] = onstart
        if args is not None:
            payload["args"] = list(args)
        if image_login is not None:
            payload["image_login"] = image_login
        if price is not None:
            payload["price"] = price  # a bid: the instance is interruptible
        path = f"/api/v0/asks/{int(offer_id)}/"
        try:
            body = self._call(
                "PUT",
                path,
                "create",
                body=payload,
                create=True,
                before_send=before_send,
                on_slot=on_slot,
            )
        except VastError as exc:
            if exc.error == "no_such_ask" or (
                exc.status == 410 and not isinstance(exc, VastAuthError)
            ):
                raise OfferUnavailable(
                    exc.msg,
                    status=exc.status,
                    error=exc.error or "no_such_ask",
                    context=exc.context,
                ) from None
            raise
        contract = _int(body.get("new_contract"))
        if contract is None:
            error, msg = body.get("error"), body.get("msg") or body.get("message") or str(body)
            raise VastError(_squash(str(msg)), status=200, error=_str(error), context=f"PUT {path}")
        return CreatedInstance(
            id=contract,
            instance_api_key=_str(body.get("instance_api_key")),
            started=body.get("success") is not False,
        )

    def list_instances(
        self,
        *,
        label: str | None = None,
        label_prefix: str | None = None,
        select_filters: Mapping[str, Mapping[str, Any]] | None = None,
    ) -> list[Instance]:
        """Every instance of the account that matches (all v1 pages, id ascending). ``label``
        and ``select_filters`` ({column: {operator: value}}, filterable columns only: Vast.ai
        answers 400 to a computed one) filter on the server; ``label_prefix`` client-side
        (the API has no prefix operator). A refused filter raises: it is never "nothing"."""
        params: dict[str, str] = {
            "limit": str(PAGE_SIZE),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
        }
        filters = dict(select_filters or {})
        if label is not None:
            filters["label"] = {"eq": label}
        if filters:
            params["select_filters"] = json.dumps(filters)
        # A partial listing is never returned: the label lookup before a create takes "not
        # listed" for "does not exist", so a listing cut short could rent a second instance.
        context = "GET /api/v1/instances/"
        found: dict[int, Instance] = {}
        seen_tokens: set[str] = set()
        idle = 0
        for _page in range(MAX_PAGES):
            body = self._call("GET", "/api/v1/instances/", "list", params=params)
            rows = body.get("instances")
            if not isinstance(rows, list):
                raise VastBadAnswer(
                    f"instances is {json.dumps(rows)[:40]}, not a list", context=context
                )
            new = 0
            for row in rows:
                # A row without an id is nothing this agent could act on: skipped, not fatal.
                instance_id = _int(row.get("id")) if isinstance(row, dict) else None
                if instance_id is not None and instance_id not in found:
                    found[instance_id] = Instance.from_dict(row)
                    new += 1
            token = body.get("next_token")
            if token is None or token == "":
                break
            if not isinstance(token, str | int) or isinstance(token, bool):
                raise VastBadAnswer(f"next_token is a {type(token).__name__}", context=context)
            token = str(token)
            if token in seen_tokens:
                raise VastBadAnswer(
                    f"the listing repeats next_token {token[:40]!r}: it would never end",
                    context=context,
                )
            idle = 0 if new else idle + 1
            if idle >= MAX_IDLE_PAGES:
                raise VastBadAnswer(
                    f"{idle} pages in a row without a new instance: the listing does not end",
                    context=context,
                )
            seen_tokens.add(token)
            params["after_token"] = token
        else:
            raise VastBadAnswer(f"the listing did not end after {MAX_PAGES} pages", context=context)
        instances = sorted(found.values(), key=lambda i: i.id)
        if label_prefix is not None:
            instances = [i for i in instances if (i.label or "").startswith(label_prefix)]
        return instances

    def list_page_after(self, after_id: int) -> tuple[list[Instance], int | None]:
        """One v1 page of the account's instances whose id is above ``after_id`` (id
        ascending): (instances, the highest id the page covers, or None when the page is the
        last one and so covers every id above ``after_id``). The full resync's cursor."""
        context = "GET /api/v1/instances/"
        params = {
            "limit": str(PAGE_SIZE),
            "order_by": json.dumps([{"col": "id", "dir": "asc"}]),
            "select_filters": json.dumps({"id": {"gt": int(after_id)}}),
        }
        body = self._call("GET", "/api/v1/instances/", "list", params=params)
        rows = body.get("instances")
        if not isinstance(rows, list):
            raise VastBadAnswer(
                f"instances is {json.dumps(rows)[:40]}, not a list", context=context
            )
        found = [
            Instance.from_dict(row)
            for row in rows
            if isinstance(row, dict) and _int(row.get("id")) is not None
        ]
        if len(rows) != len(found):
            # A row we cannot read may be any instance's: the page is no proof that the ids
            # it covers and does not list are gone (the view drops those), last page or not.
            raise VastBadAnswer("a page with a row without a readable id", context=context)
        token = body.get("next_token")
        if token is None or token == "":
            return sorted(found, key=lambda i: i.id), None
        if not found:
            # More pages, but this one says up to where it covers nothing we can trust.
            raise VastBadAnswer("a page with more to come but no readable id", context=context)
        highest = max(i.id for i in found)
        if highest <= after_id:
            raise VastBadAnswer(f"a page after id {after_id} ends at id {highest}", context=context)
        return sorted(found, key=lambda i: i.id), highest

    def get_instance(self, instance_id: int) -> Instance | None:
        """GET /instances/{id}/ -> the instance, or None when Vast answers {"instances": null}."""
        body = self._call(
            "GET", f"/api/v0/instances/{int(instance_id)}/", "show", params={"owner": "me"}
        )
        row = body.get("instances")
        if isinstance(row, list):  # tolerate a list-shaped answer
            row = row[0] if row else None
        if row is None:
            return None  # Vast.ai's answer for an instance that is gone (or not ours)
        if not isinstance(row, dict) or _int(row.get("id")) != int(instance_id):
            # Not "gone": an answer we cannot read says nothing about the instance.
            raise VastBadAnswer(
                f"instances is {json.dumps(row)[:60]}, not instance {int(instance_id)}",
                context=f"GET /api/v0/instances/{int(instance_id)}/",
            )
        return Instance.from_dict(row)

    def request_logs(
        self,
        instance_id: int,
        *,
        tail: int | None = None,
        wait: float = 30.0,
        max_bytes: int | None = None,
    ) -> str:
        """Ask Vast to upload the instance's logs, then poll result_url until it can be read
        (403/404 until the upload lands) for up to ``wait`` seconds; return the text.

        Blocking: for one-off reads (the doctor). The agent's steps ask (`ask_logs`) and
        read (`read_logs_at`) in separate runs, so that no worker waits (log_reads.py).
        Without ``tail`` Vast.ai sends only the last 1000 lines. ``max_bytes`` bounds the
        memory: the log is streamed and only its last ``max_bytes`` kept, after a first line
        saying how much was cut."""
        return self._fetch_result(self.ask_logs(instance_id, tail=tail), wait, max_bytes)

    def ask_logs(self, instance_id: int, *, tail: int | None = None) -> str:
        """PUT request_logs: Vast asks the host to upload the log; returns the result_url
        where it appears (seconds later, sometimes minutes)."""
        payload = {} if tail is None else {"tail": str(int(tail))}
        path = f"/api/v0/instances/request_logs/{int(instance_id)}/"
        body = self._call("PUT", path, "logs", body=payload)
        result_url = body.get("result_url")
        if result_url is not None and not isinstance(result_url, str):
            raise VastBadAnswer(
                f"result_url is a {type(result_url).__name__}", context=f"PUT {path}"
            )
        if not result_url:
            error, msg = body.get("error"), body.get("msg") or "no result_url in the answer"
            raise VastError(_squash(str(msg)), status=200, error=_str(error), context=f"PUT {path}")
        return result_url

    def read_logs_at(self, url: str, max_bytes: int | None = None) -> str | None:
        """One GET of a result_url: the log, or None while it is not there yet (403/404
        until the host's upload lands; a 5xx or a network error is "not yet" too). Another
        4xx raises VastError."""
        netloc = urlsplit(url).netloc
        try:
            response = self._plain.get(url, timeout=self.timeout, stream=True)
        except requests.RequestException:
            return None
        with response:
            if response.status_code == 200:
                return _bounded_text(response, max_bytes)
            if response.status_code in (403, 404) or response.status_code >= 500:
                return None
            _, msg = parse_error_body(response.text, response.headers.get("Content-Type", ""))
            raise VastError(msg, status=response.status_code, context=f"GET logs {netloc}")

    def stop_instance(self, instance_id: int) -> None:
        self._update(instance_id, {"state": "stopped"})

    def start_instance(self, instance_id: int) -> bool:
        """False when Vast queued the start (resources_unavailable, "scheduling")."""
        return self._update(instance_id, {"state": "running"}).get("success") is not False

    def set_label(self, instance_id: int, label: str) -> None:
        self._update(instance_id, {"label": label})

    def destroy_instance(self, instance_id: int) -> bool:
        """DELETE /instances/{id}/ -> True, or False when it was already gone (404)."""
        try:
            self._call("DELETE", f"/api/v0/instances/{int(instance_id)}/", "destroy")
        except InstanceNotFound:
            return False
        return True

    # ------------------------------------------------------------------ plumbing

    def _update(self, instance_id: int, payload: dict) -> dict:
        path = f"/api/v0/instances/{int(instance_id)}/"
        body = self._call("PUT", path, "update", body=payload)
        if body.get("success") is False and body.get("error") != "resources_unavailable":
            msg = body.get("msg") or body.get("message") or "success: false"
            raise VastError(
                _squash(str(msg)), status=200, error=_str(body.get("error")), context=f"PUT {path}"
            )
        return body

    def _call(
        self,
        method: str,
        path: str,
        endpoint: str,
        *,
        body: Any = None,
        params: Mapping[str, str] | None = None,
        create: bool = False,
        before_send: Callable[[], None] | None = None,
        on_slot: Callable[[], None] | None = None,
    ) -> dict:
        retrying = tenacity.Retrying(
            stop=tenacity.stop_after_attempt(self.max_attempts),
            wait=self._wait,
            retry=tenacity.retry_if_exception(lambda exc: getattr(exc, "retryable", False)),
            before_sleep=self._log_retry,
            reraise=True,
        )
        return retrying(
            self._attempt, method, path, endpoint, body, params, create, before_send, on_slot
        )

    def _attempt(
        self,
        method: str,
        path: str,
        endpoint: str,
        body: Any,
        params: Mapping[str, str] | None,
        create: bool,
        before_send: Callable[[], None] | None = None,
        on_slot: Callable[[], None] | None = None,
    ) -> dict:
        if self.rate_limiter is not None:
            self.rate_limiter.acquire(endpoint, timeout=self.limiter_timeout, on_reserved=on_slot)
        if before_send is not None:
            before_send()
        context = f"{method} {path}"
        headers = {}
        data = None
        if body is not None or method in ("PUT", "POST", "DELETE"):
            data = json.dumps({} if body is None else body)
            headers["Content-Type"] = "application/json"
        started = time.monotonic()
        try:
            response = self._session.request(
                method,
                self.base_url + path,
                params=params,
                data=data,
                headers=headers,
                timeout=self.timeout,
            )
        except requests.RequestException as exc:
            self._told(endpoint, None)
            # str(exc) names host/path, never headers; still drop the exception chain so that
            # nothing of the request object travels with the error.
            reason = type(exc).__name__
            if create and not _never_sent(exc):
                raise CreateOutcomeUnknown(
                    f"{reason} after the request may have reached Vast.ai", context=context
                ) from None
            raise VastTransportError(
                f"{reason}: {self._scrub(str(exc))}", context=context
            ) from None
        self._told(endpoint, response.status_code)
        log.debug("%s -> %s in %.3fs", context, response.status_code, time.monotonic() - started)
        if response.status_code >= 400:
            error = self._error(response, context, create)
            if isinstance(error, VastRateLimited) and self.rate_limiter is not None:
                self.rate_limiter.penalize(endpoint)  # before any worker's next try
            raise error
        # Parsed inside the attempt, so that an unreadable answer to a read is retried.
        return self._json(response, method, path, create)

    def _told(self, endpoint: str, status: int | None) -> None:
        if self.on_call is not None:
            self.on_call("vast", endpoint, status)

    def _error(self, response: requests.Response, context: str, create: bool) -> VastError:
        status = response.status_code
        error, msg = parse_error_body(response.text, response.headers.get("Content-Type", ""))
        msg = self._scrub(msg)
        if status == 401 or (status == 403 and error == "auth_error"):
            return VastAuthError(
                f"Vast.ai refused the API key ({msg}); check the configured Vast.ai API key",
                status=status,
                error=error or "auth_error",
                context=context,
            )
        if status == 429:
            reset = _float(response.headers.get("X-RateLimit-Reset"))
            if error == "search_quota_exceeded" and reset is not None:
                msg += f" (quota resets at {time.strftime('%Y-%m-%d %H:%M:%S UTC', time.gmtime(reset))})"
            return VastRateLimited(
                msg,
                status=status,
                error=error or "rate_limit_exceeded",
                context=context,
                retry_after=parse_retry_after(response.headers.get("Retry-After")),
                reset_at=reset,
            )
        if status >= 500:
            if create:
                return CreateOutcomeUnknown(msg, status=status, error=error, context=context)
            return VastServerError(msg, status=status, error=error, context=context)
        if status == 404 and error in ("no_such_instance", "not_found"):
            return InstanceNotFound(msg, status=status, error=error, context=context)
        return VastError(msg, status=status, error=error, context=context)

    def _json(self, response: requests.Response, method: str, path: str, create: bool) -> dict:
        try:
            body = response.json()
        except ValueError:
            body = None
        if isinstance(body, dict):
            return body
        text = response.text
        if text.lstrip()[:1] in ("{", "[") or body is not None:
            # Not quoted: a cut instance row may hold its env (task tokens).
            msg = f"not a JSON object ({len(response.content)} bytes: cut, or of another shape)"
        else:
            _, msg = parse_error_body(text, response.headers.get("Content-Type", ""))
        # A create whose answer cannot be read may still have created the instance.
        cls = CreateOutcomeUnknown if create else VastBadAnswer
        raise cls(
            f"unexpected answer: {self._scrub(msg)}",
            status=response.status_code,
            context=f"{method} {path}",
        )

    def _fetch_result(self, url: str, wait: float, max_bytes: int | None = None) -> str:
        # result_url is an object store: it answers 403 (or 404) until the host's upload lands.
        deadline = time.monotonic() + wait
        delay = 0.3
        while True:
            text = self.read_logs_at(url, max_bytes)
            if text is not None:
                return text
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise LogsNotReady(
                    f"logs not readable after {wait:.1f}s",
                    context=f"GET logs {urlsplit(url).netloc}",
                )
            time.sleep(min(delay, remaining))
            delay = min(delay * 1.5, 2.0)

    def _wait(self, retry_state: tenacity.RetryCallState) -> float:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        retry_after = getattr(exc, "retry_after", None)
        if retry_after is not None:
            # the server's figure, plus a little jitter so that workers do not return together
            return retry_after + random.uniform(0, min(1.0, 0.1 * retry_after))
        return self._backoff(retry_state)

    def _log_retry(self, retry_state: tenacity.RetryCallState) -> None:
        exc = retry_state.outcome.exception() if retry_state.outcome else None
        wait = retry_state.next_action.sleep if retry_state.next_action else 0
        log.warning(
            "Vast.ai call failed (%s), attempt %d/%d, retrying in %.2fs",
            strip_url_queries(str(exc)),
            retry_state.attempt_number,
            self.max_attempts,
            wait,
        )

    def _scrub(self, text: str) -> str:
        # a server (or proxy) could echo the key back: never let it into a message; nor the
        # query string of a URL (a result_url's signature), which requests quotes in its errors
        text = text.replace(self._api_key, "***") if self._api_key else text
        return strip_url_queries(text)


def instances_by_label(instances: Iterable[Instance]) -> dict[str, list[Instance]]:
    """Group instances by label (unlabelled ones under "")."""
    groups: dict[str, list[Instance]] = {}
    for instance in instances:
        groups.setdefault(instance.label or "", []).append(instance)
    return groups


__all__ = [
    "CreateOutcomeUnknown",
    "CreatedInstance",
    "Instance",
    "InstanceNotFound",
    "LogsNotReady",
    "Offer",
    "OfferUnavailable",
    "VastAuthError",
    "VastBadAnswer",
    "VastClient",
    "VastError",
    "VastRateLimited",
    "VastServerError",
    "VastTransportError",
    "parse_error_body",
    "parse_retry_after",
]
