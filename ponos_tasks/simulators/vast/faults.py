"""Fault rules: knobs that make the simulator misbehave like Vast.ai sometimes does.

A rule is a dict {"fault": NAME, "label": REGEX?, "endpoint": NAME?, "times": N?, ...params}.
Create-time and lifecycle faults match the label of the create request; HTTP faults match
the endpoint name. `times` (default unlimited) is how often the rule fires before it expires.
"""

import re
import threading

# bid_raised: a competing bid lands between the search and this create: the machine's
# min_bid is multiplied by `factor` (default 2), so a bid priced from the search is too low
# and the instance is created stopped (or refused 410 with cancel_unavail).
CREATE_FAULTS = {"offer_vanished", "double_rent", "create_lost", "create_stopped", "bid_raised"}
# pull_stall: the image pull makes no progress from fraction `at` (default 0.3) of it, for
# `duration` simulated seconds (default: forever); its status_msg stops changing.
# outbid: the instance is stopped by a higher-priority rental `after` s into its phase
# `during` (running, the default, or loading), once; with `resume_after` it is resumed that
# many s later (the other rental ended) and its container starts again; without, it stays
# stopped.
# read_lag: the new instance is missing from show/list for exactly `seconds` (default 5)
# after its create, instead of the usual random 0..read_lag.
# host_down: the host goes down `after` s into the instance's running (default 10) and stays
# down: the container dies, the instance shows offline (reliability_failures draws it too).
LIFECYCLE_FAULTS = {
    "host_down",
    "read_lag",
    "stuck_loading",
    "pull_stall",
    "oci_failure",
    "unexpected_exit",
    "offline",
    "outbid",
}
# slow: the answer comes `delay` seconds late (default 1); with `after: true` the delay comes
# after the call took effect (a create that rented, a destroy that destroyed, answered late),
# the window in which a client that dies never learns what it did.
HTTP_FAULTS = {"rate_limit", "http_5xx", "html_error", "slow", "malformed"}
ALL_FAULTS = CREATE_FAULTS | LIFECYCLE_FAULTS | HTTP_FAULTS
RATE_LIMIT_SHAPES = ("text", "detail", "json")
# malformed: the endpoint does its work, then its 200 answer is spoiled, as a proxy, a cut
# connection or a server bug would: `truncated` (the JSON cut in half, still
# application/json), `html` (a maintenance page, text/html, status 200), `wrong_types`
# (every number a string, every list null), `repeat_token` (list v1: the same page again
# with the next_token the request sent, so a client following tokens never ends),
# `row_without_id` (list v1: the last row of the page loses its id, as a proxy rewriting or
# a serializer bug could make it; the rest of the answer, next_token included, is intact).
MALFORMED_SHAPES = ("truncated", "html", "wrong_types", "repeat_token", "row_without_id")


class FaultError(ValueError):
    pass


def validate(rule: dict) -> dict:
    if not isinstance(rule, dict) or rule.get("fault") not in ALL_FAULTS:
        raise FaultError(f"unknown fault {rule!r}; known: {', '.join(sorted(ALL_FAULTS))}")
    rule = dict(rule)
    if rule.get("label") is not None:
        try:
            re.compile(rule["label"])
        except re.error as exc:
            raise FaultError(f"bad label regex {rule['label']!r}: {exc}") from None
    if rule["fault"] == "rate_limit" and rule.get("shape", "text") not in RATE_LIMIT_SHAPES:
        raise FaultError(f"rate_limit shape must be one of {RATE_LIMIT_SHAPES}")
    if rule["fault"] == "malformed" and rule.get("shape", "truncated") not in MALFORMED_SHAPES:
        raise FaultError(f"malformed shape must be one of {MALFORMED_SHAPES}")
    if rule.get("times") is not None:
        rule["times"] = int(rule["times"])
    return rule


def parse_flag(text: str) -> dict:
    """CLI form `NAME[,key=value...]`, e.g. `rate_limit,endpoint=create,shape=json,times=2`."""
    name, *pairs = [part.strip() for part in text.split(",") if part.strip()]
    rule = {"fault": name}
    for pair in pairs:
        key, _, value = pair.partition("=")
        if value.lower() in ("null", "none"):
            rule[key] = None
        else:
            try:
                rule[key] = int(value)
            except ValueError:
                try:
                    rule[key] = float(value)
                except ValueError:
                    rule[key] = value
    return validate(rule)


class FaultBook:
    """The active rules; thread-safe on its own (HTTP faults are checked outside the state lock)."""

    def __init__(self, rules=()):
        self._lock = threading.Lock()
        self.rules: list[dict] = [validate(rule) for rule in rules]

    def set(self, rules: list[dict]) -> None:
        checked = [validate(rule) for rule in rules]
        with self._lock:
            self.rules.extend(checked)

    def clear(self) -> None:
        with self._lock:
            self.rules.clear()

    def snapshot(self) -> list[dict]:
        with self._lock:
            return [dict(rule) for rule in self.rules]

    def take(self, names, *, label=None, endpoint=None) -> dict | None:
        """The first rule among `names` matching label/endpoint; consumes one of its `times`."""
        with self._lock:
            for rule in self.rules:
                if rule["fault"] not in names:
                    continue
                if rule.get("label") is not None and not re.search(rule["label"], label or ""):
                    continue
                if rule.get("endpoint") is not None and rule["endpoint"] != endpoint:
                    continue
                if rule.get("times") is not None:
                    rule["times"] -= 1
                    if rule["times"] <= 0:
                        self.rules.remove(rule)
                return dict(rule)
        return None
