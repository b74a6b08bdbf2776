"""The simulator's state and the operations behind each endpoint, under one lock (the call
counters and rate limits under a second one, `rate_lock`).

Every operation returns (HTTP status, JSON-able body); server.py only maps HTTP onto them.
"""

import base64
import binascii
import json
import math
import random
import threading
import uuid
from collections import Counter

from ponos_tasks.simulators.vast import instances as lifecycle
from ponos_tasks.simulators.vast import query as queries
from ponos_tasks.simulators.vast.clock import SimClock
from ponos_tasks.simulators.vast.faults import LIFECYCLE_FAULTS, FaultBook
from ponos_tasks.simulators.vast.images import Images
from ponos_tasks.simulators.vast.instances import Fleet
from ponos_tasks.simulators.vast.market import Market, Offer
from ponos_tasks.simulators.vast.ratelimit import (
    SEARCH_QUOTA_PER_DAY,
    MinIntervalLimiter,
    SearchQuota,
)
from ponos_tasks.simulators.vast.render import COMPUTED_COLUMNS, instance_object

V1_PAGE_MAX = 25
CHURN_INTERVAL = 60.0  # simulated seconds between two churn steps
LOGS_BUCKET_MSG = "Log upload requested; the file appears at result_url in a few seconds."
# request_logs without `tail`: the last 1000 lines (the official CLI documents that default).
DEFAULT_LOG_TAIL = 1000
# The upload's delay: usually seconds (log-normal around `log_delay`, the median; Vast.ai's
# docs: "normally within a few seconds", the official SDK polls 30 × 0.3 s), and with
# probability `log_tail_p` a long tail of minutes (log-uniform in LOG_TAIL_RANGE): third-party
# clients report result_urls that stay 403 well past their polling.
LOG_DELAY_MEDIAN = 3.0
LOG_DELAY_SIGMA = 0.6
LOG_TAIL_P = 0.05
LOG_TAIL_RANGE = (30.0, 300.0)
NEVER = math.inf


def error(status: int, code: str | None, msg: str, **extra) -> tuple[int, dict]:
    body = {"success": False, "msg": msg, **extra}
    if code is not None:
        body["error"] = code
    return status, body


class VastState:
    def __init__(
        self,
        *,
        seed=0,
        time_scale=20.0,
        api_key="sim-key",
        rate_limits=True,
        run_mode="scripted",
        log_delay=LOG_DELAY_MEDIAN,
        log_tail_p=LOG_TAIL_P,
        log_default_tail=DEFAULT_LOG_TAIL,
        select_filters=True,
        read_lag=lifecycle.READ_LAG,
        stop_delay=lifecycle.STOP_DELAY,
        restart_delay=lifecycle.RESTART_DELAY,
        image_sizes=None,
        cached_images=(),
        search_quota=SEARCH_QUOTA_PER_DAY,
        churn=False,
        faults=(),
        url_getter=None,
        slow_cheap_hosts=0.0,
        reliability_failures=0.0,
    ):
        self.lock = threading.RLock()
        self.clock = SimClock(time_scale)
        self.api_key = api_key
        self.market = Market(seed=seed)
        self.events: list[dict] = []
        # Delays (logs, read lag, pulls, stops) draw from their own seeded generator, so that
        # the market stays the same whatever the traffic.
        self.rng = random.Random(f"vast-sim-delays-{seed}")
        self.images = Images(image_sizes, cached_images)
        # Market knobs (simulator.py): drawn from their own generator, so that the market
        # and the delays stay the same whatever they are.
        self.market.make_cheap_hosts_slow(
            float(slow_cheap_hosts), random.Random(f"vast-sim-slow-hosts-{seed}")
        )
        self.reliability_failures = float(reliability_failures)
        self.failure_rng = random.Random(f"vast-sim-start-failures-{seed}")
        self.fleet = Fleet(
            self.clock,
            self.market,
            url_getter=url_getter or (lambda: ""),
            run_mode=run_mode,
            on_event=self.events.append,
            rng=self.rng,
            images=self.images,
            read_lag=read_lag,
            stop_delay=stop_delay,
            restart_delay=restart_delay,
        )
        self.faults = FaultBook(faults)
        self.limiter = MinIntervalLimiter(enabled=rate_limits)
        self.quota = SearchQuota(search_quota if rate_limits else None)
        self.log_delay = float(log_delay)
        self.log_tail_p = float(log_tail_p)
        # None: the whole log (what `ponos-vast doctor` must then report as contradicted).
        self.log_default_tail = None if log_default_tail is None else int(log_default_tail)
        # False: the v1 list refuses select_filters (what the doctor must report).
        self.select_filters = bool(select_filters)
        self.churn = churn
        self._last_churn = 0.0
        self.logs: dict[str, dict] = {}  # uuid -> {"asked_at", "ready_at", "text", "inst"}
        self._pending_logs: set[str] = set()  # uploads not done yet, not known to be lost
        # The call counters and the rate limits have a lock of their own: a call is timed when
        # it reaches the API, not after waiting for `lock` (held by a long listing, the
        # harness's reads), a wait of this one process that does not keep arrival order.
        # Taken last (inside `lock` at most) and never re-entered: a plain Lock.
        self.rate_lock = threading.Lock()
        self.calls: Counter = Counter()
        self.list_shapes: Counter = Counter()  # v1 list calls by their filters' shape
        self.rate_limited: Counter = Counter()
        self.max_live_per_label: dict[str, int] = {}

    # -- time --------------------------------------------------------------------------
    def tick(self) -> float:
        """Advance everything to now (called on every request and by the ticker)."""
        with self.lock:
            now = self.clock.now()
            for inst in self.fleet.instances.values():
                self.fleet.advance(inst, now)
            for key in list(self._pending_logs):
                # A host that goes offline before its upload never uploads it.
                entry = self.logs.get(key)
                if entry is None or entry["ready_at"] <= now:
                    self._pending_logs.discard(key)
                elif entry["inst"].offline:
                    entry["ready_at"] = NEVER
                    self._pending_logs.discard(key)
            while self.churn and now - self._last_churn >= CHURN_INTERVAL:
                self._last_churn += CHURN_INTERVAL
                self.market.churn()
            return now

    def _note_live(self) -> None:
        live = Counter(inst.label or "" for inst in self.fleet.instances.values() if inst.live)
        for label, count in live.items():
            if count > self.max_live_per_label.get(label, 0):
                self.max_live_per_label[label] = count

    # -- auth and limits ---------------------------------------------------------------
    def identify(self, key: str | None):
        """("account", None), ("instance", Instance) or None for a bad/missing key."""
        if not key:
            return None
        if key == self.api_key:
            return ("account", None)
        with self.lock:
            for inst in self.fleet.instances.values():
                if inst.live and inst.api_key == key:
                    return ("instance", inst)
        return None

    def count_call(self, endpoint: str) -> None:
        with self.rate_lock:
            self.calls[endpoint] += 1

    def count_limited(self, endpoint: str) -> None:
        with self.rate_lock:
            self.rate_limited[endpoint] += 1

    def rate_check(self, identity: str, endpoint: str) -> float | None:
        with self.rate_lock:
            threshold = self.limiter.check(identity, endpoint, self.clock.now())
            if threshold is not None:
                self.rate_limited[endpoint] += 1
            return threshold

    def search_quota(self, identity: str) -> float | None:
        """None if a search may go, else the wall-clock second the daily quota resets."""
        with self.lock:
            now = self.clock.now()
            # The simulated calendar: wall time at start + simulated seconds since.
            wall0 = self.clock.epoch(0.0)
            reset = self.quota.check(identity, wall0 + now)
            if reset is None:
                return None
            self.count_limited("search_quota")
            return self.clock.epoch(reset - wall0)

    # -- search --------------------------------------------------------------------------
    def search(self, body, caller_key: str | None) -> tuple[int, dict]:
        try:
            parsed = queries.parse_search(body)
        except queries.QueryError as exc:
            return error(400, "invalid_args", str(exc))
        parsed["filters"].setdefault("rented", {"eq": False})
        with self.lock:
            self.tick()
            mine = set()
            if caller_key == self.api_key:
                mine = {i.machine_id for i in self.fleet.instances.values() if i.live}
            rows = [
                self.market.render(
                    offer,
                    allocated_storage=parsed["allocated_storage"],
                    offer_type=parsed["type"],
                    rented=offer.machine_id in mine,
                )
                for offer in self.market.offers.values()
            ]
        try:
            offers = queries.search(rows, parsed)
        except queries.QueryError as exc:
            return error(400, "invalid_args", str(exc))
        return 200, {"offers": offers}

    # -- create --------------------------------------------------------------------------
    def create(self, offer_id: int, body) -> tuple[int, dict, bool]:
        """(status, body, drop_connection)."""
        if not isinstance(body, dict):
            return (*error(400, "invalid_request", "Invalid json body"), False)
        problem = self._validate_create(offer_id, body)
        if problem is not None:
            return (*problem, False)
        label = body.get("label")
        with self.lock:
            now = self.tick()
            if self.faults.take({"offer_vanished"}, label=label) and offer_id in self.market.offers:
                offer = self.market.offers.pop(offer_id)
                self.market.rented_offers[offer_id] = offer.machine_id
            offer = self.market.offers.get(offer_id)
            double_rent = self.faults.take({"double_rent"}, label=label)
            doomed = offer is None or offer.ghost
            if offer is None:
                machine_id = self.market.rented_offers.get(offer_id)
                if machine_id is None or not double_rent:
                    return (
                        *error(404, "no_such_ask", f"No ask by id {offer_id} is available."),
                        False,
                    )
            if doomed:
                # Vast.ai's known race: a second rent of the same offer is accepted,
                # and that instance never starts (port already allocated on the host).
                machine_id = self.market.rented_offers[offer_id]
                offer_row = self._rented_row(offer_id, machine_id, body)
                self.market.offers.pop(offer_id, None)
            else:
                offer_row = self.market.render(
                    offer,
                    allocated_storage=float(body.get("disk") or 10),
                    offer_type="on-demand",
                    rented=False,
                )
                machine_id = offer.machine_id
            price = body.get("price")
            raised = self.faults.take({"bid_raised"}, label=label)
            if raised is not None and not doomed:
                # Another renter bid on this machine between our search and our create:
                # its minimum bid is higher from now on, for every later search too.
                factor = float(raised.get("factor", 2.0))
                self.market.machines[machine_id].specs["min_bid_per_gpu"] *= factor
                offer_row["min_bid"] = round(offer_row["min_bid"] * factor, 4)
            below_bid = price is not None and float(price) < offer_row["min_bid"]
            stopped_rule = self.faults.take({"create_stopped"}, label=label)
            if below_bid and body.get("cancel_unavail"):
                return (
                    *error(410, "no_such_ask", f"Instance type {offer_id} is no longer available."),
                    False,
                )
            if not doomed:
                self.market.take(offer_id, keep_listed=bool(double_rent))
            lifecycle = {}
            for name in sorted(LIFECYCLE_FAULTS):
                rule = self.faults.take({name}, label=label)
                if rule is not None:
                    lifecycle[name] = rule
            if not doomed and not lifecycle:
                lifecycle.update(self._host_failure(machine_id))
            start_stopped = below_bid or stopped_rule is not None
            inst = self.fleet.create(
                offer_row=offer_row,
                machine_id=machine_id,
                offer_id=offer_id,
                body=body,
                env=dict(body.get("env") or {}),
                now=now,
                faults=lifecycle,
                doomed=doomed,
                start_stopped=start_stopped,
                price=price,
            )
            self._note_live()
            lost = self.faults.take({"create_lost"}, label=label) is not None
            answer = {
                "success": not start_stopped,
                "new_contract": inst.id,
                "instance_api_key": inst.api_key,
            }
            if start_stopped:
                answer.update(
                    error="resources_unavailable",
                    msg="Instance created in the stopped state: required resources "
                    "are currently unavailable.",
                )
            return 200, answer, lost

    def _host_failure(self, machine_id: int) -> dict:
        """The `reliability_failures` knob (f). A start fails with probability f × (1 − the
        machine's reliability r), half of the time at once (OCI error at create), half of the
        time as a pull that stalls part way (only a watcher's pull_stall_timeout notices it,
        and the host bills meanwhile). A start that works then runs on a host that may go
        down: Vast.ai's reliability is the machine's historical uptime, read here as the
        chance that it stays up through an hour of running, so the host goes down after an
        exponential time of rate f × −ln(r) per hour of running (`host_down`: drawn now, in
        seconds of running; a run that ends first is not hit)."""
        if self.reliability_failures <= 0:
            return {}
        reliability = float(self.market.machines[machine_id].specs.get("reliability") or 1.0)
        reliability = min(1.0, max(1e-6, reliability))
        chance = min(1.0, self.reliability_failures * (1.0 - reliability))
        if self.failure_rng.random() < chance:
            if self.failure_rng.random() < 0.5:
                return {"oci_failure": {"fault": "oci_failure"}}
            return {"pull_stall": {"fault": "pull_stall", "at": self.failure_rng.uniform(0.1, 0.9)}}
        rate = self.reliability_failures * -math.log(reliability) / 3600.0
        if rate <= 0:
            return {}
        return {"host_down": {"fault": "host_down", "after": self.failure_rng.expovariate(rate)}}

    def _rented_row(self, offer_id: int, machine_id: int, body: dict) -> dict:
        for inst in self.fleet.instances.values():
            if inst.offer_id == offer_id:
                return dict(inst.offer_row)
        return self.market.render(
            Offer(offer_id, machine_id, 1),
            allocated_storage=float(body.get("disk") or 10),
            offer_type="on-demand",
            rented=False,
        )

    @staticmethod
    def _validate_create(offer_id: int, body: dict):
        if (
            not body.get("image")
            and not body.get("template_hash_id")
            and not body.get("template_id")
        ):
            return error(
                400,
                "invalid_args",
                "error 400/3467: Invalid args: 'image' or 'template_hash_id' is required",
                ask_id=offer_id,
            )
        env = body.get("env")
        if env is not None and not isinstance(env, dict):
            return error(
                400, "invalid_args", "invalid env type: env must be a dict", ask_id=offer_id
            )
        for key, value in (env or {}).items():
            if len(str(key)) + len(str(value)) > 256 + 256:
                return error(400, "invalid_args", f"env entry {key!r} is too long")
        if len(json.dumps(env or {})) > 32768:
            return error(400, "invalid_args", "env is too large (32768 characters at most)")
        try:
            disk = float(body.get("disk") if body.get("disk") is not None else 10)
        except (TypeError, ValueError):
            return error(400, "invalid_args", "disk must be a number", ask_id=offer_id)
        if disk < 8:
            return error(
                400,
                "invalid_args",
                "error 400/3467: Invalid args: disk must be at least 8 GB",
                ask_id=offer_id,
            )
        price = body.get("price")
        if price is not None:
            try:
                price = float(price)
            except (TypeError, ValueError):
                price = -1
            if not 0.001 <= price <= 128:
                return error(
                    400,
                    "invalid_price",
                    "Invalid price: must be between 0.001 and 128 $/hour",
                    ask_id=offer_id,
                )
        args = body.get("args")
        if args is not None and not (
            isinstance(args, list) and all(isinstance(a, str) for a in args)
        ):
            return error(400, "invalid_args", "args must be a list of strings")
        # Vast.ai's documented create limits (docs/reference.md §1.6): the command is stored
        # with the contract as the container's entrypoint and CMD, the env likewise.
        total = (
            len(body.get("onstart") or "")
            + len(body.get("args_str") or "")
            + sum(len(a) for a in args or [])
        )
        if total > 4096:
            return error(400, "invalid_args", "onstart + args longer than 4096 characters")
        if len(str(body.get("image") or "")) > 1024:
            return error(400, "invalid_args", "image name longer than 1024 characters")
        label = body.get("label")
        if label is not None and len(str(label)) > 256:
            return error(400, "label_too_long", "Please limit label length to 256 characters.")
        return None

    # -- instances -----------------------------------------------------------------------
    def _visible(self, now: float | None = None):
        """Live instances that reads show: a new one only after its read lag."""
        now = self.clock.now() if now is None else now
        return [
            inst for inst in self.fleet.instances.values() if inst.live and inst.visible_at <= now
        ]

    def _object(self, inst, now) -> dict:
        return instance_object(
            inst, actual_status=self.fleet.actual(inst), clock=self.clock, now=now
        )

    def show(self, instance_id: int) -> tuple[int, dict]:
        with self.lock:
            now = self.tick()
            inst = self.fleet.instances.get(instance_id)
            if inst is None or not inst.live or inst.visible_at > now:
                return 200, {"instances": None}
            return 200, {"instances": self._object(inst, now)}

    def list_v0(self) -> tuple[int, dict]:
        with self.lock:
            now = self.tick()
            rows = [
                self._object(inst, now) for inst in sorted(self._visible(now), key=lambda i: i.id)
            ]
        return 200, {"instances_found": len(rows), "instances": rows}

    def filters(self) -> tuple[int, dict]:
        with self.lock:
            now = self.tick()
            combos = {
                (self.fleet.actual(i), i.offer_row["verification"], i.offer_row["gpu_name"])
                for i in self._visible(now)
            }
        del now
        return 200, {
            "filters": [
                {"actual_status": a, "verification": v, "gpu_name": g}
                for a, v, g in sorted(combos, key=str)
            ]
        }

    def list_v1(self, args) -> tuple[int, dict]:
        try:
            select_filters = _json_arg(args, "select_filters", {})
            order_by = _json_arg(args, "order_by", [{"col": "id", "dir": "asc"}])
            select_cols = _json_arg(args, "select_cols", ["*"])
            limit = int(args.get("limit", V1_PAGE_MAX))
        except ValueError as exc:
            return error(400, "invalid_request", f"Error in query parameters: {exc}")
        limit = 5 if limit <= 0 else min(limit, V1_PAGE_MAX)
        if select_filters and not self.select_filters:
            return error(
                400, "invalid_request", "Error in query parameters: select_filters is not supported"
            )
        if not isinstance(select_filters, dict) or not isinstance(order_by, list):
            return error(
                400,
                "invalid_request",
                "Error in query parameters: select_filters must be an object and order_by a list",
            )
        with self.lock:
            # By the filters' shape (no values): which kind of read a list call was (a page of
            # a full pass, the not-running call, a lookup by ids or by label).
            self.list_shapes[list_shape(select_filters)] += 1
            now = self.tick()
            # Filters see the stored contract: `offline` is computed when a row is shown
            # (the stored actual_status stays what the host last reported), so a filter on
            # actual_status does not see it (docs/reference.md, instance statuses).
            pairs = [(self._object(inst, now), inst.actual_status) for inst in self._visible(now)]
        rows = [row for row, _stored in pairs]
        stored_rows = {id(row): {**row, "actual_status": stored} for row, stored in pairs}
        known = set(rows[0]) if rows else set(instance_columns())
        for col, cond in select_filters.items():
            if col in COMPUTED_COLUMNS or col not in known:
                return error(
                    400,
                    "invalid_request",
                    f"Error in query parameters: {col} is not a valid search key",
                )
            if not isinstance(cond, dict):
                return error(
                    400,
                    "invalid_request",
                    f"Error in query parameters: condition on {col} must be an object",
                )
        order = []
        for item in order_by:
            col = item.get("col") if isinstance(item, dict) else None
            if col not in known:
                return error(
                    400, "invalid_request", f"Error in query parameters: cannot order by {col}"
                )
            direction = str(item.get("dir", "asc")).lower()
            order.append((col, direction if direction in ("asc", "desc") else "asc"))
        if "id" not in [col for col, _ in order]:
            order.append(("id", "asc"))
        try:
            selected = [
                row
                for row in rows
                if all(
                    queries.matches(stored_rows[id(row)], col, cond, sql_nulls=True)
                    for col, cond in select_filters.items()
                )
            ]
        except queries.QueryError as exc:
            return error(400, "invalid_request", f"Error in query parameters: {exc}")
        selected.sort(key=lambda row: _keyset_key(row, order))
        token = args.get("after_token")
        if token:
            try:
                values = json.loads(base64.urlsafe_b64decode(token.encode()))["values"]
                after = _keyset_key(values, order)
            except (ValueError, KeyError, TypeError, binascii.Error):
                return error(400, "invalid_token", "Invalid pagination token")
            selected_after = [row for row in selected if _keyset_key(row, order) > after]
        else:
            selected_after = selected
        page = selected_after[:limit]
        next_token = None
        if len(selected_after) > limit:
            values = {col: page[-1].get(col) for col, _ in order}
            next_token = base64.urlsafe_b64encode(json.dumps({"values": values}).encode()).decode()
        if select_cols != ["*"] and isinstance(select_cols, list):
            page = [{col: row.get(col) for col in select_cols} for row in page]
        label_counts = Counter(row.get("label") or "" for row in selected)
        return 200, {
            "success": True,
            "instances_found": len(page),
            "total_instances": len(selected),
            "label_counts": dict(label_counts),
            "next_token": next_token,
            "instances": page,
        }

    def update(self, instance_id: int, body, who) -> tuple[int, dict]:
        if not isinstance(body, dict) or not ({"state", "label"} & set(body)):
            return error(400, "invalid_args", "Provide 'state' or 'label'.")
        with self.lock:
            now = self.tick()
            inst = self.fleet.instances.get(instance_id)
            if who[0] == "instance" and (who[1] is not inst or "label" in body):
                return error(
                    403,
                    "not_authorized",
                    "This instance API key may only start, stop or destroy its own instance.",
                )
            if inst is None or not inst.live:
                return error(404, "no_such_instance", f"Instance {instance_id} not found.")
            answer = {"success": True}
            if "label" in body:
                label = body["label"]
                if label is not None and len(str(label)) > 1024:
                    return error(
                        400,
                        "label_too_long",
                        "Please limit label length to 1024 characters, ideally less than 128.",
                    )
                inst.label = None if label is None else str(label)
                self._note_live()
                answer["msg"] = f"label for {instance_id} set to '{inst.label}'"
            if "state" in body:
                state = body["state"]
                if state == "stopped":
                    self.fleet.stop(inst, now)
                elif state == "running":
                    self.fleet.start(inst, now)
                else:
                    return 400, {"success": False, "msg": "Invalid target state"}
            return 200, answer

    def destroy(self, instance_id: int, who) -> tuple[int, dict]:
        with self.lock:
            now = self.tick()
            inst = self.fleet.instances.get(instance_id)
            if who[0] == "instance" and who[1] is not inst:
                return error(
                    403,
                    "not_authorized",
                    "This instance API key may only destroy its own instance.",
                )
            if inst is None or not inst.live:
                return error(404, "no_such_instance", f"Instance {instance_id} not found.")
            self.fleet.destroy(inst, now)
            return 200, {"success": True}

    # -- logs ----------------------------------------------------------------------------
    def request_logs(self, instance_id: int, body, base_url: str) -> tuple[int, dict]:
        body = body if isinstance(body, dict) else {}
        with self.lock:
            now = self.tick()
            inst = self.fleet.instances.get(instance_id)
            if inst is None or not inst.live:
                return error(404, "invalid_id", "Invalid instance id.")
            lines = inst.log_lines(now)
            pattern = body.get("filter")
            if pattern:
                lines = [line for line in lines if str(pattern) in line]
            try:
                asked = body.get("tail") not in (None, "")
                tail = int(body["tail"]) if asked else self.log_default_tail
            except (TypeError, ValueError):
                return error(400, "invalid_args", "tail must be an integer")
            if tail is not None:
                lines = lines[-tail:] if tail > 0 else []
            key = uuid.uuid4().hex
            # Forget uploads for a simulated day old (a long-running sim stays small).
            for old in [k for k, v in self.logs.items() if v["asked_at"] < now - 86400]:
                del self.logs[old]
            text = "\n".join(lines) + ("\n" if lines else "")
            # The host uploads the text: an offline host never does, and a container that
            # never started has nothing the host would upload.
            never = inst.offline or inst.runs == 0
            ready_at = NEVER if never else now + self._log_delay()
            self.logs[key] = {"asked_at": now, "ready_at": ready_at, "text": text, "inst": inst}
            if not never:
                self._pending_logs.add(key)
        return 200, {
            "success": True,
            "result_url": f"{base_url}/s3/instance_logs/{key}.log",
            "msg": LOGS_BUCKET_MSG,
        }

    def _log_delay(self) -> float:
        if self.rng.random() < self.log_tail_p:
            low, high = LOG_TAIL_RANGE
            return math.exp(self.rng.uniform(math.log(low), math.log(high)))
        return self.log_delay * math.exp(self.rng.gauss(0.0, LOG_DELAY_SIGMA))

    def log_object(self, key: str) -> str | None:
        """The uploaded text, or None while the upload is still pending (or never was)."""
        with self.lock:
            entry = self.logs.get(key)
            if entry is None or self.clock.now() < entry["ready_at"]:
                return None
            return entry["text"]

    def account(self) -> tuple[int, dict]:
        with self.lock:
            self.tick()
            spent = sum(self.fleet.ledger_row(i)["cost"] for i in self.fleet.instances.values())
        return 200, {
            "id": 4242,
            "username": "simulator",
            "email": "simulator@example.invalid",
            "fullname": "Vast.ai simulator",
            "balance": round(1000.0 - spent, 6),
            "credit": round(1000.0 - spent, 6),
            "ssh_key": "",
            "key_id": 1,
            "sid": "sim",
            "can_pay": True,
            "has_billing": True,
            "host_agreement_accepted": False,
            "billaddress_country": "FR",
        }

    # -- admin -------------------------------------------------------------------------
    def ledger(self) -> dict:
        with self.lock:
            self.tick()
            rows = [self.fleet.ledger_row(i) for i in self.fleet.instances.values()]
        return {"instances": rows, "total_cost": sum(row["cost"] for row in rows)}

    def stats(self) -> dict:
        with self.lock:
            self.tick()
            with self.rate_lock:
                calls, limited = dict(self.calls), dict(self.rate_limited)
            return {
                "calls": calls,
                "list_shapes": dict(self.list_shapes),
                "rate_limited": limited,
                "max_live_per_label": dict(self.max_live_per_label),
                "live_instances": sum(1 for i in self.fleet.instances.values() if i.live),
            }

    def admin_instances(self) -> dict:
        with self.lock:
            now = self.tick()
            rows = []
            for inst in self.fleet.instances.values():
                row = self._object(inst, now)
                row.update(
                    {
                        "live": inst.live,
                        "destroyed_at": inst.destroyed_at,
                        "offer_id": inst.offer_id,
                        "run_mode": inst.run_mode,
                        "runs": inst.runs,
                        "exit_code": inst.exit_code,
                        "faults": sorted(inst.faults),
                        "env": dict(inst.env),
                        "instance_api_key": inst.api_key,
                        "log": inst.log_lines(now),
                        "command": self.fleet.command(inst),
                        "process_pid": inst.proc.proc.pid if inst.proc else None,
                    }
                )
                rows.append(row)
        return {"instances": rows}

    def admin_images(self, body: dict | None = None) -> dict:
        """GET: sizes and caches; POST {"sizes_gb": {image: GB}, "cached": [image, ...],
        "cached_on": {machine_id: [image, ...]}}: set sizes, seed caches."""
        with self.lock:
            if body:
                for image, size in (body.get("sizes_gb") or {}).items():
                    self.images.sizes[str(image)] = float(size)
                self.images.everywhere.update(str(i) for i in body.get("cached") or [])
                for machine, names in (body.get("cached_on") or {}).items():
                    for image in names:
                        self.images.remember(int(machine), str(image))
            return self.images.snapshot()

    def admin_offers(self) -> dict:
        with self.lock:
            self.tick()
            rows = [
                self.market.render(o, allocated_storage=8.0, offer_type="on-demand", rented=False)
                for o in self.market.offers.values()
            ]
        return {"offers": rows}


def instance_columns() -> list[str]:
    return [
        "id",
        "label",
        "actual_status",
        "intended_status",
        "cur_state",
        "next_state",
        "gpu_name",
        "verification",
        "machine_id",
        "status_msg",
        "image_uuid",
    ]


def list_shape(select_filters) -> str:
    """A v1 list call's filters without their values, e.g. `id.gt` or
    `actual_status.neq+id.gte`; `all` for none (stats: what kind of read each call was)."""
    if not isinstance(select_filters, dict) or not select_filters:
        return "all"
    parts = []
    for col, cond in sorted(select_filters.items()):
        ops = sorted(cond) if isinstance(cond, dict) else ["?"]
        parts += [f"{col}.{op}" for op in ops]
    return "+".join(parts)


def _json_arg(args, name: str, default):
    raw = args.get(name)
    if raw in (None, ""):
        return default
    try:
        return json.loads(raw)
    except json.JSONDecodeError:
        raise ValueError(f"{name} is not valid JSON") from None


class _Desc:
    """Reverses the order of a value inside a sort key."""

    __slots__ = ("value",)

    def __init__(self, value):
        self.value = value

    def __lt__(self, other):
        return other.value < self.value

    def __eq__(self, other):
        return self.value == other.value


def _keyset_key(row: dict, order) -> tuple:
    key = []
    for col, direction in order:
        value = row.get(col)
        # None first in ascending order; type-tagged so that mixed types still compare.
        part = (0, "") if value is None else (1, value if not isinstance(value, str) else value)
        key.append(_Desc(part) if direction == "desc" else part)
    return tuple(key)
