"""Flask routes: Vast.ai's REST endpoints (docs/reference.md §1), the fake S3 log bucket
and the admin API under /_sim/ (faults, ledger, stats, events, instances, offers, images;
not rate limited). JSON answers carry exactly
`Content-Type: application/json`, which the official CLI insists on.
"""

import contextlib
import json
import socket
import time
from functools import wraps

from flask import Flask, Response, g, request

from ponos_tasks.simulators.vast.faults import FaultError
from ponos_tasks.simulators.vast.market import GPU_CATALOG
from ponos_tasks.simulators.vast.ratelimit import SHAPES, body_for

S3_PENDING = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>AccessDenied</Code>'
    "<Message>Access Denied</Message><RequestId>{rid}</RequestId>"
    "<HostId>sim</HostId></Error>"
)
HTML_ERROR = (
    "<html>\r\n<head><title>{status} Bad Gateway</title></head>\r\n<body>\r\n"
    "<center><h1>{status} Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    "</body>\r\n</html>\r\n"
)


MAINTENANCE_PAGE = (
    "<!DOCTYPE html>\n<html><head><title>Vast.ai - Down for maintenance</title></head>"
    "<body><h1>We'll be back soon</h1></body></html>\n"
)


def json_response(status: int, body) -> Response:
    return Response(json.dumps(body), status=status, mimetype="application/json")


def _wrong_types(value):
    """Every number turned into a string and every list into null (faults.MALFORMED_SHAPES)."""
    if isinstance(value, dict):
        return {key: _wrong_types(item) for key, item in value.items()}
    if isinstance(value, list):
        return None
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return value


# The next_token of the `repeat_token` fault: list v1 answers it with the first page.
REPEAT_TOKEN = "sim-repeat-token"


def spoil(response: Response, shape: str) -> Response:
    """A 200 answer spoiled as the `malformed` fault says (faults.py)."""
    if response.status_code != 200:
        return response
    if shape == "html":
        return Response(MAINTENANCE_PAGE, status=200, mimetype="text/html")
    text = response.get_data(as_text=True)
    if shape == "truncated":
        return Response(text[: len(text) // 2], status=200, mimetype="application/json")
    body = json.loads(text)
    if shape == "wrong_types":
        return json_response(200, _wrong_types(body))
    if shape == "row_without_id":
        rows = body.get("instances")
        if isinstance(rows, list) and rows and isinstance(rows[-1], dict):
            rows[-1].pop("id", None)
        return json_response(200, body)
    # repeat_token: a token that leads to the first page again, with the same token
    body["next_token"] = REPEAT_TOKEN
    return json_response(200, body)


class _BadBody(Exception):
    pass


def _body():
    raw = request.get_data(cache=True)
    if not raw.strip():
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        raise _BadBody() from None


def _drop_connection() -> None:
    """Close the socket under the request: the client gets no answer at all."""
    sock = request.environ.get("werkzeug.socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)


MAX_QUERY_BYTES = 8000  # a request line longer than nginx's 8 KB buffer is refused


def create_app(state) -> Flask:
    app = Flask("vast-simulator")
    app.url_map.strict_slashes = False

    @app.before_request
    def uri_too_long():
        # Front proxies refuse long request lines (nginx's default buffer is 8 KB): a client
        # that puts unbounded lists in a query string (select_filters `in`) must not rely on
        # the API taking them.
        if len(request.query_string) > MAX_QUERY_BYTES:
            return Response("414 Request-URI Too Large", status=414, mimetype="text/html")
        return None

    def http_fault(endpoint: str):
        slow = state.faults.take({"slow"}, endpoint=endpoint)
        if slow is not None:
            if slow.get("after"):
                # Answered late *after* the call took effect (see faults.py): remembered for
                # the wrapper, which sleeps once the view has run.
                g.slow_after = float(slow.get("delay", 1.0))
            else:
                time.sleep(float(slow.get("delay", 1.0)))
        rule = state.faults.take({"rate_limit", "http_5xx", "html_error"}, endpoint=endpoint)
        if rule is None:
            return None
        if rule["fault"] == "rate_limit":
            state.count_limited(endpoint)
            text, mimetype = body_for(rule.get("shape", "text"), rule.get("threshold", 2.0))
            response = Response(text, status=429, mimetype=mimetype)
            if rule.get("retry_after") is not None:
                response.headers["Retry-After"] = str(rule["retry_after"])
            return response
        status = int(rule.get("status", 502 if rule["fault"] == "html_error" else 500))
        if rule["fault"] == "html_error":
            return Response(HTML_ERROR.format(status=status), status=status, mimetype="text/html")
        return json_response(
            status,
            {
                "success": False,
                "error": "server_error",
                "msg": "Internal server error, please retry.",
            },
        )

    def vast_endpoint(name: str, auth: bool = True, instance_key_ok: bool = False):
        """Counting, HTTP faults, authentication and rate limits around one endpoint."""

        def decorate(view):
            @wraps(view)
            def wrapper(**kwargs):
                # Up to the rate check, nothing waits for the state lock (see rate_lock).
                state.count_call(name)
                faulty = http_fault(name)
                if faulty is not None:
                    return faulty
                auth_header = request.headers.get("Authorization", "")
                key = auth_header[7:].strip() if auth_header.startswith("Bearer ") else None
                key = key or request.args.get("api_key")
                who = state.identify(key)
                if auth and who is None:
                    return json_response(
                        401, {"success": False, "error": "auth_error", "msg": "Invalid user key"}
                    )
                if who is not None and who[0] == "instance" and not instance_key_ok:
                    return json_response(
                        403,
                        {
                            "success": False,
                            "error": "not_authorized",
                            "msg": "This API key lacks the permission for this endpoint.",
                        },
                    )
                identity = key or request.remote_addr or "anonymous"
                threshold = state.rate_check(identity, name)
                if threshold is not None:
                    text, mimetype = body_for(SHAPES.get(name, "text"), threshold)
                    return Response(text, status=429, mimetype=mimetype)
                if name == "search":
                    reset = state.search_quota(identity)
                    if reset is not None:
                        response = json_response(
                            429,
                            {
                                "success": False,
                                "error": "search_quota_exceeded",
                                "msg": "Daily search quota exceeded.",
                            },
                        )
                        response.headers["X-RateLimit-Reset"] = str(int(reset))
                        return response
                try:
                    response = view(who=who, key=key, **kwargs)
                    if g.get("slow_after"):
                        time.sleep(g.slow_after)
                except _BadBody:
                    return json_response(
                        400, {"error": "invalid_request", "msg": "Invalid json body"}
                    )
                malformed = state.faults.take({"malformed"}, endpoint=name)
                if malformed is not None:
                    shape = malformed.get("shape", "truncated")
                    return spoil(response, shape)
                return response

            return wrapper

        return decorate

    def instance_id(raw: str):
        try:
            return int(raw)
        except ValueError:
            return None

    # -- search ------------------------------------------------------------------------
    @app.route("/api/v0/bundles/", methods=["POST", "GET"])
    @vast_endpoint("search", auth=False)
    def bundles(who, key):
        if request.method == "GET":
            try:
                query = json.loads(request.args.get("q") or "{}")
            except ValueError:
                return json_response(
                    400, {"error": "invalid_request", "msg": "Invalid query: q is not valid JSON"}
                )
        else:
            query = _body()
        return json_response(*state.search(query, key))

    @app.route("/api/v0/search/asks/", methods=["PUT", "POST"])
    @vast_endpoint("search", auth=False)
    def search_asks(who, key):
        body = _body()
        if not isinstance(body, dict):
            return json_response(400, {"error": "invalid_request", "msg": "Invalid json body"})
        status, answer = state.search(body.get("q", {}), key)
        cols = body.get("select_cols", ["*"])
        if status == 200 and isinstance(cols, list) and cols != ["*"]:
            answer["offers"] = [{c: row.get(c) for c in cols} for row in answer["offers"]]
        return json_response(status, answer)

    # -- create ------------------------------------------------------------------------
    @app.route("/api/v0/asks/<raw_id>/", methods=["PUT"])
    @vast_endpoint("create")
    def create(who, key, raw_id):
        offer_id = instance_id(raw_id)
        if offer_id is None:
            return json_response(
                400,
                {
                    "success": False,
                    "error": "invalid_args",
                    "msg": "error 400/3467: Invalid args: 'id' is required "
                    "and must be a valid offer ID",
                },
            )
        status, answer, lost = state.create(offer_id, _body())
        if lost:
            _drop_connection()
        return json_response(status, answer)

    # -- instances ---------------------------------------------------------------------
    @app.route("/api/v1/instances/", methods=["GET"])
    @vast_endpoint("list")
    def list_v1(who, key):
        args = request.args
        if args.get("after_token") == REPEAT_TOKEN:  # the `repeat_token` fault's loop
            args = {name: value for name, value in args.items() if name != "after_token"}
        return json_response(*state.list_v1(args))

    @app.route("/api/v0/instances/", methods=["GET"])
    @vast_endpoint("list_v0")
    def list_v0(who, key):
        return json_response(*state.list_v0())

    @app.route("/api/v0/instances/filters/", methods=["GET"])
    @vast_endpoint("filters")  # no published threshold; the CLI calls it right before a list
    def instance_filters(who, key):
        return json_response(*state.filters())

    @app.route("/api/v0/instances/<raw_id>/", methods=["GET"])
    @vast_endpoint("show")
    def show(who, key, raw_id):
        iid = instance_id(raw_id)
        if iid is None:
            return json_response(
                400, {"success": False, "error": "invalid_args", "msg": "invalid instance id"}
            )
        return json_response(*state.show(iid))

    @app.route("/api/v0/instances/<raw_id>/", methods=["PUT"])
    @vast_endpoint("update", instance_key_ok=True)
    def update(who, key, raw_id):
        iid = instance_id(raw_id)
        if iid is None:
            return json_response(
                400, {"success": False, "error": "invalid_args", "msg": "invalid instance_id"}
            )
        return json_response(*state.update(iid, _body(), who))

    @app.route("/api/v0/instances/<raw_id>/", methods=["DELETE"])
    @vast_endpoint("destroy", instance_key_ok=True)
    def destroy(who, key, raw_id):
        iid = instance_id(raw_id)
        if iid is None:
            return json_response(
                400, {"success": False, "error": "invalid_args", "msg": "invalid instance_id"}
            )
        return json_response(*state.destroy(iid, who))

    @app.route("/api/v0/instances/request_logs/<raw_id>/", methods=["PUT", "POST"])
    @vast_endpoint("logs")
    def request_logs(who, key, raw_id):
        iid = instance_id(raw_id)
        if iid is None:
            return json_response(
                404, {"success": False, "error": "invalid_id", "msg": "Invalid instance id."}
            )
        return json_response(*state.request_logs(iid, _body(), request.host_url.rstrip("/")))

    @app.route("/api/v0/users/current/", methods=["GET"])
    @vast_endpoint("account")
    def current_user(who, key):
        return json_response(*state.account())

    @app.route("/api/v0/gpu_names/unique/", methods=["GET"])
    def gpu_names():
        # The official CLI fetches this at import time to offer GPU-name choices.
        return json_response(200, {"gpu_names": [entry[0] for entry in GPU_CATALOG]})

    # -- fake S3 bucket for logs -------------------------------------------------------
    @app.route("/s3/instance_logs/<name>", methods=["GET"])
    def log_file(name):
        text = state.log_object(name.removesuffix(".log"))
        if text is None:
            # S3 answers 403 for a key that does not exist (yet) in a non-listable bucket.
            return Response(
                S3_PENDING.format(rid=name[:16].upper()), status=403, mimetype="application/xml"
            )
        return Response(text, status=200, mimetype="text/plain")

    # -- admin -------------------------------------------------------------------------
    @app.route("/_sim/faults", methods=["GET", "POST", "DELETE"])
    def admin_faults():
        if request.method == "DELETE":
            state.faults.clear()
        elif request.method == "POST":
            try:
                body = _body()
                state.faults.set(body.get("rules", []) if isinstance(body, dict) else [])
            except (_BadBody, FaultError, TypeError, ValueError) as exc:
                return json_response(400, {"success": False, "msg": str(exc)})
        return json_response(200, {"rules": state.faults.snapshot()})

    @app.route("/_sim/ledger", methods=["GET"])
    def admin_ledger():
        return json_response(200, state.ledger())

    @app.route("/_sim/stats", methods=["GET"])
    def admin_stats():
        return json_response(200, state.stats())

    @app.route("/_sim/events", methods=["GET"])
    def admin_events():
        with state.lock:
            state.tick()
            return json_response(200, {"events": list(state.events)})

    @app.route("/_sim/instances", methods=["GET"])
    def admin_instances():
        return json_response(200, state.admin_instances())

    @app.route("/_sim/images", methods=["GET", "POST"])
    def admin_images():
        try:
            body = _body() if request.method == "POST" else None
            return json_response(200, state.admin_images(body if isinstance(body, dict) else None))
        except (_BadBody, AttributeError, TypeError, ValueError) as exc:
            return json_response(400, {"success": False, "msg": str(exc)})

    @app.route("/_sim/offers", methods=["GET", "POST", "DELETE"])
    def admin_offers():
        if request.method == "DELETE":
            with state.lock:
                state.market.clear()
        elif request.method == "POST":
            try:
                body = _body()
                with state.lock:
                    ids = [state.market.add_offer(o) for o in body.get("offers", [])]
            except (_BadBody, AttributeError, TypeError, ValueError) as exc:
                return json_response(400, {"success": False, "msg": str(exc)})
            return json_response(200, {"success": True, "ids": ids})
        return json_response(200, state.admin_offers())

    @app.errorhandler(404)
    def not_found(_exc):
        return json_response(
            404,
            {
                "success": False,
                "error": "not_found",
                "msg": f"No route for {request.method} {request.path}",
            },
        )

    @app.errorhandler(405)
    def not_allowed(_exc):
        return json_response(
            405,
            {
                "success": False,
                "error": "method_not_allowed",
                "msg": f"{request.method} not allowed on {request.path}",
            },
        )

    return app
