"""Search-query evaluation as Vast.ai's server does it (docs/reference.md §1.3): the eight
operators, string operands coerced to the column type, multi-key `order`, `limit` (64 by
default), `type`, `allocated_storage` priced into `dph_total`.

Written independently of the agent's offers.py on purpose: the simulator is an oracle.
The CLI sends most operands as strings (`{"num_gpus": {"eq": "1"}}`), so operands are
coerced to the type of the column before comparing.
"""

OPERATORS = ("eq", "neq", "gt", "gte", "lt", "lte", "in", "notin")
SPECIAL_KEYS = ("order", "type", "limit", "allocated_storage", "disable_bundling")
OFFER_TYPES = {
    "on-demand": "on-demand",
    "ondemand": "on-demand",
    "bid": "bid",
    "interruptible": "bid",
    "reserved": "reserved",
}
ALIASES = {
    "cuda_vers": "cuda_max_good",
    "display_active": "gpu_display_active",
    "dlperf_usd": "dlperf_per_dphtotal",
    "dph": "dph_total",
    "flops_usd": "flops_per_dphtotal",
    "ubuntu_version": "os_version",
}
DEFAULT_LIMIT = 64


class QueryError(ValueError):
    """A query the server refuses (answered 400 invalid_args)."""


def coerce(value, sample):
    """Convert an operand to the type of `sample` (a value of the column)."""
    if value is None:
        return None
    if isinstance(sample, bool):
        if isinstance(value, str):
            lowered = value.strip().lower()
            if lowered in ("true", "1"):
                return True
            if lowered in ("false", "0"):
                return False
            raise QueryError(f"cannot compare boolean column with {value!r}")
        return bool(value)
    if isinstance(sample, (int, float)):
        if isinstance(value, bool):
            return int(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise QueryError(f"cannot compare numeric column with {value!r}") from None
        return value
    if isinstance(sample, str) and not isinstance(value, str):
        return str(value)
    return value


def _compare(op: str, actual, operand) -> bool:
    if op == "in":
        return actual in operand
    if op == "notin":
        return actual not in operand
    if op == "eq":
        return actual == operand
    if op == "neq":
        return actual != operand
    if actual is None or operand is None:
        return False
    try:
        return {
            "gt": actual > operand,
            "gte": actual >= operand,
            "lt": actual < operand,
            "lte": actual <= operand,
        }[op]
    except TypeError:
        return False


def _country(geolocation) -> str | None:
    if not geolocation:
        return None
    return geolocation.rsplit(",", 1)[-1].strip()


def _driver_operand(value):
    """driver_version operands: 535086005, "535086005" or "535.86.05" -> int."""
    if isinstance(value, str) and "." in value:
        return int("".join(part.zfill(3) for part in value.split(".")))
    return int(float(value))


def _sql_null_match(op: str, operand) -> bool:
    """A condition on a NULL column as SQL sees it: only `eq null` and `in [.., null]` hold
    (Vast.ai documents `label in [null]` for unlabelled instances); `neq`, `notin` and every
    comparison are false (SQL's `NULL <> 'x'` is not true)."""
    if op == "eq":
        return operand is None
    if op == "in":
        return None in operand
    return False


def matches(row: dict, field: str, conditions: dict, sql_nulls: bool = False) -> bool:
    """Whether `row` satisfies every {op: operand} of `conditions` on `field`.

    `sql_nulls`: a NULL column follows SQL semantics (the v1 instance list filters in the
    database; see _sql_null_match) rather than Python's `None != x`."""
    for op, operand in conditions.items():
        if op not in OPERATORS:
            raise QueryError(
                f"Unknown operator {op!r} for {field}; expected one of {', '.join(OPERATORS)}"
            )
        if op in ("in", "notin") and not isinstance(operand, list):
            operand = [operand]
        if sql_nulls and row.get(field) is None:
            if not _sql_null_match(op, operand):
                return False
            continue
        if field == "geolocation":
            actual = row.get("geolocation")
            items = operand if isinstance(operand, list) else [operand]
            # Vast compares the trailing 2-letter country code; a full string also matches.
            hit = [item for item in items if item in (actual, _country(actual))]
            result = bool(hit) if op in ("eq", "in") else not hit
            if op not in ("eq", "in", "neq", "notin"):
                result = _compare(op, actual, operand)
        elif field == "driver_version":
            actual = row.get("driver_vers")
            if isinstance(operand, list):
                operand = [_driver_operand(item) for item in operand if item is not None]
            else:
                operand = _driver_operand(operand)
            result = _compare(op, actual, operand)
        elif field == "datacenter":
            actual = row.get("hosting_type") == 1
            operand = (
                [coerce(item, True) for item in operand]
                if isinstance(operand, list)
                else coerce(operand, True)
            )
            result = _compare(op, actual, operand)
        else:
            actual = row.get(field)
            sample = actual
            if isinstance(operand, list):
                operand = [coerce(item, sample) for item in operand]
            else:
                operand = coerce(operand, sample)
            result = _compare(op, actual, operand)
        if not result:
            return False
    return True


def _sort_key(value):
    """None sorts after any value in ascending order."""
    return (1, 0) if value is None else (0, value)


def order_rows(rows: list[dict], order: list) -> list[dict]:
    """Stable multi-key sort: apply keys from the last to the first."""
    rows = list(rows)
    for field, direction in reversed(order):
        field = ALIASES.get(field, field)
        reverse = str(direction).lower() == "desc"
        present = [row for row in rows if row.get(field) is not None]
        missing = [row for row in rows if row.get(field) is None]
        present.sort(key=lambda row, f=field: row[f], reverse=reverse)
        rows = present + missing
    return rows


def parse_search(query) -> dict:
    """Validate a search body; returns {"filters", "order", "type", "limit", "allocated_storage"}."""
    if not isinstance(query, dict):
        raise QueryError("Invalid query: must be dict of conditions")
    offer_type = OFFER_TYPES.get(str(query.get("type", "on-demand")))
    if offer_type is None:
        raise QueryError(f"Invalid type {query.get('type')!r}: expected on-demand, bid or reserved")
    order = query.get("order", [["score", "desc"]]) or []
    if not isinstance(order, list) or not all(
        isinstance(item, (list, tuple)) and len(item) in (1, 2) for item in order
    ):
        raise QueryError("Invalid order: expected a list of [field, 'asc'|'desc'] pairs")
    order = [(item[0], item[1] if len(item) == 2 else "asc") for item in order]
    try:
        limit = int(query.get("limit") or DEFAULT_LIMIT)
        storage = float(query.get("allocated_storage", 8.0) or 8.0)
    except (TypeError, ValueError):
        raise QueryError("Invalid limit or allocated_storage") from None
    filters = {}
    for key, conditions in query.items():
        if key in SPECIAL_KEYS:
            continue
        if not isinstance(conditions, dict):
            raise QueryError(f"Invalid query: condition for {key} must be a dict of operators")
        field = ALIASES.get(key, key)
        for op in conditions:
            if op not in OPERATORS:
                raise QueryError(
                    f"Unknown operator {op!r} for {key}; expected one of {', '.join(OPERATORS)}"
                )
        filters.setdefault(field, {}).update(conditions)
    return {
        "filters": filters,
        "order": order,
        "type": offer_type,
        "limit": max(limit, 0),
        "allocated_storage": storage,
    }


def search(rows: list[dict], parsed: dict) -> list[dict]:
    """Filter, order and cut rendered offer rows."""
    known = set(rows[0]) | {"datacenter"} if rows else {"datacenter"}
    for field in parsed["filters"]:
        if rows and field not in known:
            raise QueryError(f"Unknown search field: {field}")
    selected = [
        row
        for row in rows
        if all(matches(row, field, cond) for field, cond in parsed["filters"].items())
    ]
    return order_rows(selected, parsed["order"])[: parsed["limit"]]
