"""Fault rules: knobs that make the Arkindex simulator fail the way a real deployment does.

Every knob is off until a rule is set (admin API `/_sim/faults`, `ponos-vast sim arkindex
--fault`, or `ArkindexSimulator(faults=[...])`). A rule is a dict

    {"fault": NAME, "operation": OPERATION_ID?, "path": REGEX?, "task": TASK_ID?,
     "times": N?, ...params}

`operation` is an operationId of the public API (RetrieveTaskDefinition, PartialUpdateTask,
...), `path` a regular expression searched in the request path, `task` the task id in the
path; a rule with none of them matches every public API call. `times` (default unlimited)
is how many requests the rule hits before it expires.

Faults (and why each exists: what a client of a real Arkindex sees):

- `http_5xx` (`status`, default 500): a JSON `server_error` body, as Django REST framework
  renders an unhandled exception behind Arkindex's exception handler.
- `html_502` (`status`, default 502): the HTML page a load balancer (nginx, a cloud LB)
  serves when the backend is restarting: not JSON, `text/html`.
- `slow` (`seconds`, default 1): the answer comes, late (a loaded backend, a slow query).
  With `after: true` the call takes effect first and only its answer is late: a client
  that dies in that window never learns that its update was applied.
- `rate_limit` (`retry_after`, default 1): 429 with `Retry-After` and DRF's throttling
  body ("Request was throttled. Expected available in N seconds.").
- `malformed` (`shape`: `truncated`, default, or `html`): the call does its work, then its
  200 answer is spoiled: the JSON cut in half (a connection cut by a proxy, still
  `application/json`), or a proxy's HTML page with status 200 (a captive portal, a
  maintenance page).
- `task_deleted`: the task is gone (its process deleted by a user while it runs): 404 on
  every call naming it (definition, RetrieveTask, PartialUpdateTask, artifacts), and it
  leaves the agent's actions. Scope it with `task`.
- `token_expired`: the access token the call carries expires now (401 `token_not_valid`
  on this call and every later one with that token, until the agent refreshes or
  registers again), as a JWT access token does when its lifetime ends.
- `stale_bearer_refresh`: RefreshAgentToken refuses (401 `token_not_valid`) a request that
  carries an expired or unknown Bearer token, even with a valid refresh token: with DRF the
  authentication classes run before the view, so a stale `Authorization` header fails the
  call whatever its body says.
"""

from __future__ import annotations

import re
import threading

HTTP_FAULTS = {"http_5xx", "html_502", "rate_limit"}
ALL_FAULTS = HTTP_FAULTS | {
    "slow",
    "malformed",
    "task_deleted",
    "token_expired",
    "stale_bearer_refresh",
}
MALFORMED_SHAPES = ("truncated", "html")
SCOPES = ("operation", "path", "task")


class FaultError(ValueError):
    pass


def validate(rule: dict) -> dict:
    if not isinstance(rule, dict) or rule.get("fault") not in ALL_FAULTS:
        raise FaultError(f"unknown fault {rule!r}; known: {', '.join(sorted(ALL_FAULTS))}")
    rule = dict(rule)
    if rule.get("path") is not None:
        try:
            re.compile(rule["path"])
        except re.error as exc:
            raise FaultError(f"bad path regex {rule['path']!r}: {exc}") from None
    for name in ("times", "status"):
        if rule.get(name) is not None:
            rule[name] = int(rule[name])
    for name in ("seconds", "retry_after"):
        if rule.get(name) is not None:
            rule[name] = float(rule[name])
    if rule.get("status") is not None and not 500 <= rule["status"] <= 599:
        raise FaultError(f"status must be a 5xx, not {rule['status']}")
    if rule["fault"] == "malformed" and rule.get("shape", "truncated") not in MALFORMED_SHAPES:
        raise FaultError(f"malformed shape must be one of {MALFORMED_SHAPES}")
    if rule.get("times") is not None and rule["times"] < 1:
        raise FaultError("times must be at least 1")
    return rule


def parse_flag(text: str) -> dict:
    """CLI form `NAME[,key=value...]`, e.g. `http_5xx,operation=PartialUpdateTask,times=2`."""
    name, *pairs = [part.strip() for part in text.split(",") if part.strip()]
    rule: dict = {"fault": name}
    for pair in pairs:
        key, _, value = pair.partition("=")
        rule[key.strip()] = None if value.lower() in ("null", "none") else value
    return validate(rule)


class FaultBook:
    """The active rules, thread-safe; `take` consumes one use of the matching rule."""

    def __init__(self, rules=()):
        self._lock = threading.Lock()
        self.rules: list[dict] = [validate(rule) for rule in rules]
        self.hits: dict[str, int] = {}

    def set(self, rules: list[dict]) -> None:
        checked = [validate(rule) for rule in rules]
        with self._lock:
            self.rules.extend(checked)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def snapshot(self) -> dict:
        with self._lock:
            return {"rules": [dict(rule) for rule in self.rules], "hits": dict(self.hits)}

    @staticmethod
    def _matches(rule: dict, operation: str | None, path: str, task: str | None) -> bool:
        if rule.get("operation") is not None and rule["operation"] != operation:
            return False
        if rule.get("path") is not None and not re.search(rule["path"], path):
            return False
        return rule.get("task") is None or rule["task"] == task

    def take(
        self, names, *, operation: str | None, path: str = "", task: str | None = None
    ) -> dict | None:
        with self._lock:
            for rule in self.rules:
                if rule["fault"] not in names or not self._matches(rule, operation, path, task):
                    continue
                if rule.get("times") is not None:
                    rule["times"] -= 1
                    if rule["times"] <= 0:
                        self.rules.remove(rule)
                self.hits[rule["fault"]] = self.hits.get(rule["fault"], 0) + 1
                return dict(rule)
        return None

    def deleted(self, task_id: str) -> bool:
        """Whether a `task_deleted` rule covers this task (without consuming it): used to
        leave the task out of the agent's actions."""
        with self._lock:
            return any(
                rule["fault"] == "task_deleted" and rule.get("task") in (None, task_id)
                for rule in self.rules
            )
