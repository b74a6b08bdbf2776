"""Offer filters: the language of `vast_api.offer_filters`, and the search query built from it.

Two input forms are accepted by `parse_filters`:

* the Vast.ai query object, `{"gpu_ram": {"gte": 24000}, "gpu_name": {"in": ["RTX 4090"]}}`,
  in server units (MB, seconds). Shorthands: a scalar means `eq` (`{"gpu_name": "RTX 4090"}`),
  a list means `in`, and `"any"`/`"*"`/`"?"` (or `{}`) is a wildcard. Aliases are accepted;
  unit conversions are not applied (the object form is already in server units).
* the string of the official CLI (`vastai search offers`), e.g.
  `gpu_name=RTX_4090 reliability>0.98 dph<0.5 gpu_ram>=24 geolocation notin [CN,VN]`,
  with the CLI's grammar, operators, aliases, value processing and unit conversions
  (GB -> MB for gpu_ram/cpu_ram/gpu_total_ram, days -> seconds for duration, dotted
  driver_version -> int, underscores -> spaces, true/false/null).

Unlike the official CLI (which warns and sends anyway), unknown fields and operators are
rejected with `OfferFilterError`, as are values of the wrong type: the agent verifies its
filters at startup. Deliberate differences from the CLI, all documented here:

* operands are coerced to the field's type (numbers, bools), so clean JSON is sent;
* geolocation takes 2-letter country codes only (upper-cased), with =, !=, in, notin;
* driver_version also accepts `535.86` (patch 0) and a bare major `535` (-> 535000000:
  a packed driver int is always far above 1000, so a small number can only mean a major);
* `ubuntu_version` is an alias of `os_version` (the offer rows' field);
* a value with a comma outside `in`/`notin` is refused (the CLI would send it as one string);
* `num_gpus` must admit 1: the agent rents exactly one GPU per instance.

The normalised form is `{field: {op: value}}` with canonical field names, server units and
typed operands; `{}` marks a wildcard (`verified=any`): no constraint, and no default either.
`parse_filters` is idempotent on its own output.

This module is pure: no HTTP, no Celery, no Redis.
"""

from __future__ import annotations

import contextlib
import difflib
import math
import re
from collections.abc import Mapping
from typing import Any, NoReturn

__all__ = [
    "DEFAULT_FILTERS",
    "DEFAULT_ORDER",
    "FIELD_ALIASES",
    "OFFER_FIELDS",
    "OPERATORS",
    "OfferFilterError",
    "build_query",
    "describe_filters",
    "offer_matches",
    "parse_filters",
    "rank_offers",
]


class OfferFilterError(ValueError):
    """An offer filter the agent cannot send: names the field or operator at fault."""


OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")

# Every spelling of the CLI (vastai/api/query.py) -> the query object's operator.
OPERATOR_SPELLINGS = {
    "=": "eq", "==": "eq", "eq": "eq",
    "!=": "neq", "neq": "neq", "noteq": "neq", "not eq": "neq",
    ">": "gt", "gt": "gt", ">=": "gte", "gte": "gte",
    "<": "lt", "lt": "lt", "<=": "lte", "lte": "lte",
    "in": "in",
    "notin": "notin", "not in": "notin", "nin": "notin",
}  # fmt: skip
_SYMBOL = {"eq": "=", "neq": "!=", "gt": ">", "gte": ">=", "lt": "<", "lte": "<="}
_LIST_OPS = ("in", "notin")
_EQUALITY_OPS = ("eq", "neq", "in", "notin")

NUMBER, BOOL, FLAG, STRING = "number", "bool", "flag (0/1)", "string"

# Offer fields usable in filters: the fields the vastai CLI documents for `search offers`,
# those the vastai SDK 1.9.1 filters on, and a few more offer columns that make sense in a
# filter (docs/reference.md §1.3).
OFFER_FIELDS: dict[str, str] = {
    **dict.fromkeys(
        [
            "bw_nvlink", "cluster_id", "compute_cap", "cpu_cores", "cpu_cores_effective",
            "cpu_ghz", "cpu_ram", "cuda_max_good", "direct_port_count", "disk_bw",
            "disk_space", "dlperf", "dlperf_per_dphtotal", "dph_base", "dph_total",
            "driver_version", "duration", "flops_per_dphtotal", "gpu_frac", "gpu_lanes",
            "gpu_max_power", "gpu_max_temp", "gpu_mem_bw", "gpu_ram", "gpu_total_ram",
            "host_id", "id", "inet_down", "inet_down_cost", "inet_up", "inet_up_cost",
            "machine_id", "min_bid", "num_gpus", "pci_gen", "pcie_bw", "reliability",
            "reliability2", "score", "storage_cost", "total_flops",
        ],
        NUMBER,
    ),
    **dict.fromkeys(
        [
            "datacenter", "external", "gpu_display_active", "rentable", "rented",
            "static_ip", "verified", "vms_enabled",
        ],
        BOOL,
    ),
    "has_avx": FLAG,
    **dict.fromkeys(
        [
            "cpu_arch", "cpu_name", "geolocation", "gpu_arch", "gpu_name", "mobo_name",
            "os_version", "verification",
        ],
        STRING,
    ),
}  # fmt: skip

FIELD_ALIASES = {
    "cuda_vers": "cuda_max_good",
    "display_active": "gpu_display_active",
    "dlperf_usd": "dlperf_per_dphtotal",
    "dph": "dph_total",
    "flops_usd": "flops_per_dphtotal",
    "ubuntu_version": "os_version",
}

# CLI units -> server units (string form only).
CLI_MULTIPLIERS = {"cpu_ram": 1000, "gpu_ram": 1000, "gpu_total_ram": 1000, "duration": 86400}

# Keys of the query object that are not filters: the agent sets them itself.
_NOT_FILTERS = ("order", "type", "limit", "allocated_storage", "disable_bundling")
_WILDCARDS = ("?", "*", "any")

DEFAULT_FILTERS = {
    "verified": {"eq": True},
    "rentable": {"eq": True},
    "rented": {"eq": False},
    "external": {"eq": False},
}
DEFAULT_ORDER = (("dph_total", "asc"), ("reliability", "desc"))


# ---------------------------------------------------------------------------- parse


def parse_filters(spec: str | Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """Validate and normalise offer filters given as a CLI string or a query object."""
    if isinstance(spec, str):
        result = _parse_string(spec)
    elif isinstance(spec, Mapping):
        result = _parse_mapping(spec)
    else:
        raise OfferFilterError(
            f"offer filters must be a string or a mapping, not {type(spec).__name__}"
        )
    _check_single_gpu(result)
    return result


def _parse_string(text: str) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for field_token, op_token, raw in _tokenize(text):
        field = _canonical_field(field_token)
        op = _canonical_operator(op_token, field_token)
        _store(result, field, op, _cli_value(field, op, raw))
    return result


def _parse_mapping(spec: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    result: dict[str, dict[str, Any]] = {}
    for key, condition in spec.items():
        if not isinstance(key, str):
            raise OfferFilterError(f"offer field names must be strings, got {key!r}")
        field = _canonical_field(key)
        if _is_wildcard(condition) or (isinstance(condition, Mapping) and not condition):
            _store(result, field, "eq", _WILDCARD)
            continue
        if isinstance(condition, Mapping):
            pairs = list(condition.items())
        elif isinstance(condition, list | tuple):
            pairs = [("in", condition)]
        else:
            pairs = [("eq", condition)]
        for op_key, value in pairs:
            if not isinstance(op_key, str):
                raise OfferFilterError(f"operator {op_key!r} for field {key!r} is not a string")
            op = _canonical_operator(op_key, key)
            _store(result, field, op, _object_value(field, op, value))
    return result


class _Wildcard:
    def __repr__(self) -> str:
        return "any"


_WILDCARD = _Wildcard()


def _is_wildcard(value: Any) -> bool:
    return isinstance(value, str) and value.strip() in _WILDCARDS


def _store(result: dict, field: str, op: str, value: Any) -> None:
    if value is _WILDCARD:
        if op != "eq":
            raise OfferFilterError(
                f"wildcard for offer field {field!r} only makes sense with '=' "
                f"(got {_SYMBOL.get(op, op)!r})"
            )
        result[field] = {}  # removes earlier conditions and the default, as in the CLI
        return
    _check_operator_for_field(field, op, value)
    # A repeated field merges its operators; a repeated operator keeps the last value (CLI).
    result.setdefault(field, {})[op] = value


def _check_operator_for_field(field: str, op: str, value: Any) -> None:
    kind = OFFER_FIELDS[field]
    if (kind in (BOOL, FLAG) or field == "geolocation") and op not in _EQUALITY_OPS:
        raise OfferFilterError(
            f"operator {_SYMBOL.get(op, op)!r} makes no sense for offer field {field!r} ({kind}): "
            "use =, !=, in or notin"
        )
    if value is None and op not in ("eq", "neq"):
        raise OfferFilterError(
            f"null for offer field {field!r} only makes sense with = or != (got {op!r})"
        )


def _check_single_gpu(result: Mapping[str, Mapping[str, Any]]) -> None:
    condition = result.get("num_gpus")
    if condition and not all(_compare(1, op, value) for op, value in condition.items()):
        raise OfferFilterError(
            f"num_gpus filter {_describe({'num_gpus': condition})!r} excludes 1: "
            "the agent always rents exactly one GPU per instance"
        )


def _suggestion(name: str, candidates) -> str:
    close = difflib.get_close_matches(name, list(candidates), n=3, cutoff=0.6)
    if not close:
        return ""
    quoted = [repr(c) for c in close]
    choices = quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]
    return f" (did you mean {choices}?)"


def _canonical_field(name: str) -> str:
    if name in _NOT_FILTERS:
        raise OfferFilterError(
            f"{name!r} is not an offer filter: the agent sets order, type, limit and "
            "allocated_storage itself"
        )
    field = FIELD_ALIASES.get(name, name)
    if field not in OFFER_FIELDS:
        hint = _suggestion(name, [*OFFER_FIELDS, *FIELD_ALIASES])
        if not hint:
            hint = "; known fields: " + ", ".join(sorted([*OFFER_FIELDS, *FIELD_ALIASES]))
        raise OfferFilterError(f"unknown offer field {name!r}{hint}")
    return field


def _canonical_operator(token: str, field: str) -> str:
    spelled = " ".join(token.lower().split())  # "not   in" -> "not in"
    op = OPERATOR_SPELLINGS.get(spelled)
    if op is None:
        reversed_hint = spelled[::-1] if spelled[::-1] in OPERATOR_SPELLINGS else None
        if spelled == "<>":
            reversed_hint = "!="
        hint = (
            f" (did you mean {reversed_hint!r}?)"
            if reversed_hint
            else _suggestion(spelled, OPERATOR_SPELLINGS)
        )
        raise OfferFilterError(
            f"unknown operator {token.strip()!r} for offer field {field!r}{hint}; operators: "
            "= != > >= < <= in notin (or eq neq gt gte lt lte nin 'not in' noteq 'not eq')"
        )
    return op


# --------------------------------------------------------------- CLI string grammar

# Same grammar as the CLI's regex (vastai/api/query.py::parse_query), scanned by hand so that
# each syntax error can say what went wrong instead of "Unconsumed text".
_FIELD_RE = re.compile(r"[A-Za-z0-9_]+")
_SYMBOLIC_OP_RE = re.compile(r"\s*([=<>!]+)")
_WORD_OP_RE = re.compile(
    r"\s+(not\s+eq|not\s+in|noteq|notin|nin|neq|eq|gte|gt|lte|lt|in)(?=\s|\[|\")", re.IGNORECASE
)
_STRAY_WORD_RE = re.compile(r"\s+([A-Za-z]+)(?=\s+\S|\[|\")")
_BARE_VALUE_RE = re.compile(r"\S+")


def _tokenize(text: str) -> list[tuple[str, str, str]]:
    """Split a CLI query into (field, operator, raw value) triples."""
    comparisons = []
    pos, end = 0, len(text)
    while True:
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            return comparisons
        match = _FIELD_RE.match(text, pos)
        if not match:
            raise OfferFilterError(
                f"unconsumed text {text[pos : pos + 20]!r} at position {pos} of offer filters "
                f"{text!r}: expected a comparison like gpu_name=RTX_4090"
            )
        field, pos = match.group(), match.end()
        match = _SYMBOLIC_OP_RE.match(text, pos) or _WORD_OP_RE.match(text, pos)
        if not match:
            _missing_operator(text, field, pos)
        op, pos = match.group(1), match.end()
        while pos < end and text[pos].isspace():
            pos += 1
        if pos >= end:
            raise OfferFilterError(f"missing value after {field}{op.strip()} in {text!r}")
        if text[pos] in '["':
            closing = "]" if text[pos] == "[" else '"'
            stop = text.find(closing, pos + 1)
            if stop < 0:
                what = "list" if closing == "]" else "quoted value"
                raise OfferFilterError(
                    f"unterminated {what} for offer field {field!r} in {text!r} "
                    f"(missing {closing!r})"
                )
            value, pos = text[pos : stop + 1], stop + 1
        else:
            match = _BARE_VALUE_RE.match(text, pos)
            value, pos = match.group(), match.end()
        comparisons.append((field, op, value))


def _missing_operator(text: str, field: str, pos: int) -> NoReturn:
    rest = text[pos:]
    stray = _STRAY_WORD_RE.match(rest)
    if stray:  # `gpu_name like RTX_4090`: a word where an operator should be
        _canonical_operator(stray.group(1), field)
    if not rest or rest[0].isspace():  # `gpu_name=RTX 4090`: "4090" stands alone
        raise OfferFilterError(
            f"unconsumed text {field!r} in offer filters {text!r}: not a comparison "
            "(field, operator, value). Did you forget to quote a value with spaces? "
            'Write gpu_name="RTX 4090" or gpu_name=RTX_4090'
        )
    symbols = re.match(r"[^A-Za-z0-9_\s\"\[]+", rest)
    raise OfferFilterError(
        f"unknown operator {symbols.group() if symbols else rest[0]!r} after offer field "
        f"{field!r} in {text!r}; "
        "operators: = != > >= < <= in notin"
    )


def _cli_value(field: str, op: str, raw: str) -> Any:
    """The CLI's value processing (same order), then typing."""
    value = raw.strip(",[]")
    if op in _LIST_OPS:
        items = [item.strip() for item in value.split(",") if item.strip()]
        if not items:
            raise OfferFilterError(f"empty list for offer field {field!r} ({op} {raw})")
        return [_cli_scalar(field, item) for item in items]
    if not value:
        raise OfferFilterError(f"missing value for offer field {field!r} ({raw!r})")
    if value in _WILDCARDS:
        return _WILDCARD
    if "," in value:
        raise OfferFilterError(
            f"several values ({raw}) for offer field {field!r} need 'in' or 'notin', "
            f"e.g. {field} in [{value}]"
        )
    return _cli_scalar(field, value)


def _cli_scalar(field: str, text: str) -> Any:
    if OFFER_FIELDS[field] == STRING:
        text = text.replace("_", " ")
    text = text.strip('"')
    if text in ("None", "null"):
        return None
    if field in CLI_MULTIPLIERS:
        number = _number(field, text) * CLI_MULTIPLIERS[field]
        return _tidy(round(number, 6))  # 24.576 * 1000 -> 24576, not 24576.000000000004
    return _coerce(field, text)


def _object_value(field: str, op: str, value: Any) -> Any:
    if op in _LIST_OPS:
        if not isinstance(value, list | tuple):
            raise OfferFilterError(f"'{op}' for offer field {field!r} needs a list, got {value!r}")
        if not value:
            raise OfferFilterError(f"empty list for offer field {field!r} ({op})")
        return [_coerce(field, item) for item in value]
    if isinstance(value, list | tuple):
        raise OfferFilterError(
            f"a list for offer field {field!r} needs 'in' or 'notin', not {op!r}"
        )
    if _is_wildcard(value):
        return _WILDCARD
    return _coerce(field, value)


# ------------------------------------------------------------------------- typing


def _coerce(field: str, value: Any) -> Any:
    """One operand converted to the type of the field (server units)."""
    if value is None:
        return None
    if field == "driver_version":
        return _driver_version(value)
    if field == "geolocation":
        return _country(value)
    kind = OFFER_FIELDS[field]
    if kind == NUMBER:
        return _number(field, value)
    if kind == BOOL:
        return _bool(field, value)
    if kind == FLAG:
        return int(_bool(field, value))
    if not isinstance(value, str):
        raise OfferFilterError(
            f"offer field {field!r} needs a string, got {value!r} (quote it in YAML)"
        )
    return value


def _tidy(number: float) -> int | float:
    return int(number) if float(number).is_integer() else number


def _number(field: str, value: Any) -> int | float:
    number = None
    if isinstance(value, int | float) and not isinstance(value, bool):
        number = value
    elif isinstance(value, str):
        try:
            number = int(value)
        except ValueError:
            with contextlib.suppress(ValueError):
                number = float(value)
    if number is None or not math.isfinite(number):
        raise OfferFilterError(f"offer field {field!r} needs a number, got {value!r}")
    return _tidy(number)


def _bool(field: str, value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, int) and value in (0, 1):
        return bool(value)
    if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
        return value.lower() in ("true", "1")
    raise OfferFilterError(f"offer field {field!r} needs true or false, got {value!r}")


def _driver_version(value: Any) -> int:
    """535.86.05 -> 535086005 as the CLI does; 535.86 -> 535086000; 535 -> 535000000."""
    if isinstance(value, str) and "." in value:
        parts = value.strip().split(".")
        if 1 <= len(parts) <= 3 and all(p.isdigit() and len(p) <= 3 for p in parts):
            parts += ["0"] * (3 - len(parts))
            return int("".join(part.zfill(3) for part in parts))
    elif not isinstance(value, bool):
        try:
            number = int(value)
        except (TypeError, ValueError):
            pass
        else:
            if number >= 0:
                return number * 1_000_000 if number < 1000 else number
    raise OfferFilterError(
        f"offer field 'driver_version' needs a version like 535.86.05, got {value!r}"
    )


def _country(value: Any) -> str:
    if isinstance(value, str) and re.fullmatch(r"[A-Za-z]{2}", value.strip()):
        return value.strip().upper()
    raise OfferFilterError(
        f"offer field 'geolocation' compares 2-letter country codes (e.g. US, DE), got {value!r}"
    )


# ------------------------------------------------------------------------- query


def build_query(
    filters: str | Mapping[str, Any] | None,
    *,
    disk_gb: float,
    max_dph: float | None = None,
    limit: int = 64,
    offer_type: str = "on-demand",
) -> dict[str, Any]:
    """The body of POST /api/v0/bundles/ for the agent: one GPU, cheapest first; on-demand,
    or `offer_type="bid"` for interruptible offers (priced from their min_bid)."""
    if offer_type not in ("on-demand", "bid"):
        raise OfferFilterError(f"offer_type must be on-demand or bid, got {offer_type!r}")
    normalized = parse_filters(filters if filters is not None else {})
    if isinstance(disk_gb, bool) or not isinstance(disk_gb, int | float) or not disk_gb > 0:
        raise OfferFilterError(f"disk_gb must be a positive number of GB, got {disk_gb!r}")
    if isinstance(limit, bool) or not isinstance(limit, int) or limit < 1:
        raise OfferFilterError(f"limit must be a positive integer, got {limit!r}")
    if max_dph is not None and (
        isinstance(max_dph, bool) or not isinstance(max_dph, int | float) or not max_dph > 0
    ):
        raise OfferFilterError(f"max_dph must be a positive price in $/h, got {max_dph!r}")

    query: dict[str, Any] = {
        field: dict(condition)
        for field, condition in DEFAULT_FILTERS.items()
        if field not in normalized  # the user's value, or wildcard, replaces the default
    }
    query.update({field: dict(cond) for field, cond in normalized.items() if cond})
    query["num_gpus"] = {"eq": 1}
    if max_dph is not None:
        price = query.setdefault("dph_total", {})
        price["lte"] = min(price.get("lte", max_dph), max_dph)
    query["order"] = [list(pair) for pair in DEFAULT_ORDER]
    query["type"] = offer_type
    query["allocated_storage"] = float(disk_gb)
    query["limit"] = limit
    return query


def _get(offer: Any, name: str) -> Any:
    return offer.get(name) if isinstance(offer, Mapping) else getattr(offer, name, None)


def rank_offers(offers) -> list:
    """Cheapest first (dph_total asc), then most reliable, then lowest id (deterministic)."""

    def key(offer):
        price, reliability, offer_id = (
            _get(offer, "dph_total"), _get(offer, "reliability"), _get(offer, "id")
        )  # fmt: skip
        return (
            math.inf if price is None else float(price),
            -(0.0 if reliability is None else float(reliability)),
            offer_id is None,
            offer_id if offer_id is not None else 0,
        )

    return sorted(offers, key=key)


# ------------------------------------------------------------------ local re-check


def explain_offers(
    ranked,
    *,
    left_out: Mapping[str, int] | None = None,
    more: bool = False,
    shown: int = 3,
    estimates=None,
) -> str:
    """One line for a task's log: how many offers are candidates and the first few of them,
    in the order the agent tries them (rank_offers), so that the choice can be checked.
    `left_out`: why -> how many offers Vast.ai returned that the agent will not rent;
    `more`: the search returned as many offers as it asked for (more may match);
    `estimates`: the expected-cost ranking's (ranking.Estimate, in the order tried): each row
    then gives its reasons (pull, run, chance of a start, expected bill)."""
    if ranked:
        head = f"{'at least ' if more else ''}{len(ranked)} offer(s) match the filters"
    else:
        head = "no offer matches the filters"
    reasons = [f"{count} {why}" for why, count in (left_out or {}).items() if count]
    if reasons:
        head += " (left out: " + ", ".join(reasons) + ")"
    if not ranked:
        return head
    if estimates is not None:
        rows = [estimate.explain() for estimate in estimates[:shown]]
        more = f"; {len(estimates) - shown} more" if len(estimates) > shown else ""
        return f"{head}; lowest expected bill first: " + "; ".join(rows) + more
    rows = []
    for offer in ranked[:shown]:
        price, reliability = _get(offer, "dph_total"), _get(offer, "reliability")
        rows.append(
            f"offer {_get(offer, 'id')} {_get(offer, 'gpu_name') or '?'} "
            + ("$?/h" if price is None else f"${float(price):.3f}/h")
            + ("" if reliability is None else f" reliability {float(reliability):.3f}")
            + f" machine {_get(offer, 'machine_id')}"
        )
    more = f"; {len(ranked) - shown} more" if len(ranked) > shown else ""
    return f"{head}; cheapest first (then most reliable): " + "; ".join(rows) + more


def offer_matches(filters: str | Mapping[str, Any], offer: Any) -> bool:
    """Whether one offer row (dict, or object with a `raw` dict) satisfies the filters.

    Semantics as SQL: a missing value (null) satisfies only `= null` and `!= x` never.
    """
    normalized = parse_filters(filters)
    row = offer if isinstance(offer, Mapping) else getattr(offer, "raw", {})
    return all(
        _compare(_offer_value(row, field), op, expected)
        for field, condition in normalized.items()
        for op, expected in condition.items()
    )


def _offer_value(row: Mapping[str, Any], field: str) -> Any:
    value = row.get(field)
    if field == "datacenter" and value is None and row.get("hosting_type") is not None:
        value = row.get("hosting_type") == 1  # what the SDK adds client-side
    elif field == "verified" and value is None and row.get("verification") is not None:
        value = row.get("verification") == "verified"
    elif field == "geolocation" and isinstance(value, str):
        value = value.rsplit(",", 1)[-1]  # "California, US" -> "US"
    elif field == "driver_version" and value is None:
        value = row.get("driver_vers")
    elif field == "os_version" and value is None:
        value = row.get("ubuntu_version")
    try:
        return _coerce(field, value)
    except OfferFilterError:
        return None


def _compare(actual: Any, op: str, expected: Any) -> bool:
    if op == "eq":
        return _equal(actual, expected)
    if op == "neq":
        if expected is None:
            return actual is not None
        return actual is not None and not _equal(actual, expected)
    if actual is None:
        return False
    if op == "in":
        return any(_equal(actual, item) for item in expected)
    if op == "notin":
        return not any(_equal(actual, item) for item in expected)
    try:
        if isinstance(actual, str) or isinstance(expected, str):
            actual, expected = str(actual), str(expected)
        return {
            "gt": actual > expected,
            "gte": actual >= expected,
            "lt": actual < expected,
            "lte": actual <= expected,
        }[op]
    except TypeError:
        return False


def _equal(actual: Any, expected: Any) -> bool:
    if actual is None or expected is None:
        return actual is None and expected is None
    return actual == expected


# ------------------------------------------------------------------------ display


def describe_filters(filters: str | Mapping[str, Any]) -> str:
    """One line in the CLI's language and units; parse_filters() reads it back unchanged.

    Empty filters give an empty string.
    """
    return _describe(parse_filters(filters))


def _describe(normalized: Mapping[str, Mapping[str, Any]]) -> str:
    parts = []
    for field, condition in normalized.items():
        if not condition:
            parts.append(f"{field}=any")
        for op, value in condition.items():
            if op in _LIST_OPS:
                shown = "[" + ",".join(_show(field, item) for item in value) + "]"
                parts.append(f"{field} {op} {shown}")
            else:
                parts.append(f"{field}{_SYMBOL[op]}{_show(field, value)}")
    return " ".join(parts)


def _show(field: str, value: Any) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    if field == "driver_version" and isinstance(value, int):
        return f"{value // 1_000_000}.{value // 1000 % 1000}.{value % 1000}"
    if field in CLI_MULTIPLIERS:
        value = _tidy(round(value / CLI_MULTIPLIERS[field], 9))
    if isinstance(value, int | float):
        return repr(value)
    text = value.replace(" ", "_")
    if not text or text in _WILDCARDS or text in ("None", "null") or re.search(r'[\s,\[\]"]', text):
        return f'"{value}"'
    return text
