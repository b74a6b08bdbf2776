"""The Arkindex simulator's HTTP server (Flask) and the `ArkindexSimulator` handle.

Public API under /api/v1/ (described by openapi.py), admin API under /_sim/ (no auth; for
tests, benchmarks and the demo):

    POST /_sim/processes          {"name", "corpus"?, "tasks": [{"slug", "image", "command"?,
                                   "env"?, "parents"?: [slug], "requires_gpu"?,
                                   "artifacts"?: [{"path", "content", "content_type"?}],
                                   "model"?: {"files": {name: text}, "configuration"?, "dir"?},
                                   "configuration"?: {key: value}, "state"?: terminal state,
                                   "definition"?: {field: value}}]}
                                  ("image" may be "" or null, and "definition" replaces fields
                                  of the served task definition, wrong types included: a
                                  definition Arkindex should never serve, to test the agent)
                                  -> 201 {"id", "name", "corpus", "tasks": [{"id", "slug", "state"}]}
    GET  /_sim/processes, /_sim/processes/<id>
    POST /_sim/processes/<id>/stop   user stop of every task of the process
    GET  /_sim/tasks[?process=<id>]  -> {"tasks": [task]}
    GET  /_sim/tasks/<id>            -> task with "history": [{"t", "from", "to", "accepted",
                                        "status", "error", "source"}]
                                        (source: agent | scheduler | user | admin)
    POST /_sim/tasks/<id>/stop       user stop
    GET  /_sim/tasks/<id>/logs       the published log text, read back from S3 (404 if none)
    GET  /_sim/agents                -> {"agents": [...]}
    GET  /_sim/faults                -> {"rules": [...], "hits": {fault: count}}
    GET  /_sim/stats                 -> {"calls": {operation: requests}, "rate_limited":
                                        {operation: 429 answers}}: every public API call
                                        (whatever its answer), by operation id
    POST /_sim/faults {"rules": [rule]}   add fault rules (faults.py); DELETE clears them
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
import uuid
from collections import Counter

from flask import Flask, Response, g, jsonify, redirect, request
from werkzeug.exceptions import HTTPException
from werkzeug.serving import make_server

from ponos_tasks.simulators.arkindex.faults import FaultBook, FaultError
from ponos_tasks.simulators.arkindex.models import (
    ARTIFACTS_BUCKET,
    LOGS_BUCKET,
    MODELS_BUCKET,
    ApiError,
    ArkindexState,
    Task,
    validation_error,
)
from ponos_tasks.simulators.arkindex.openapi import build_document
from ponos_tasks.simulators.arkindex.storage import URL_LIFETIME, Storage

logger = logging.getLogger(__name__)

# Flask view name -> the operationId fault rules name (openapi.py); the task-id parameter.
OPERATIONS = {
    "get_public_key": "GetPublicKey",
    "create_agent": "CreateAgent",
    "refresh_agent_token": "RefreshAgentToken",
    "agent_actions": "RetrieveAgentActions",
    "task_definition": "RetrieveTaskDefinition",
    "retrieve_task": "RetrieveTask",
    "partial_update_task": "PartialUpdateTask",
    "list_artifacts": "ListArtifacts",
    "create_artifact": "CreateArtifact",
    "download_artifact": "DownloadArtifact",
    "retrieve_model_version": "RetrieveModelVersion",
    "retrieve_worker_run": "RetrieveWorkerRun",
    "retrieve_worker_run_configuration": "RetrieveWorkerRunConfiguration",
}

# What nginx serves when its upstream is down: HTML, whatever the client asked for.
HTML_502 = """<html>
<head><title>{status} Bad Gateway</title></head>
<body>
<center><h1>{status} Bad Gateway</h1></center>
<hr><center>nginx</center>
</body>
</html>
"""


def create_app(sim: ArkindexSimulator) -> Flask:
    app = Flask("arkindex-simulator")
    app.json.sort_keys = False

    def state() -> ArkindexState:
        return sim.state

    def principal():
        return state().authenticate(request.headers.get("Authorization"))

    def agent_only():
        kind, who = principal()
        if kind != "agent":
            raise ApiError(403, "permission_denied", "Only a Ponos agent can do this.")
        return who

    def body() -> dict:
        data = request.get_json(silent=True)
        if not isinstance(data, dict):
            raise ApiError(
                400, "parse_error", "The body must be a JSON object.", kind="validation_error"
            )
        return data

    @app.before_request
    def injected_faults():
        """The fault rules (faults.py) around every public API call; None: no fault."""
        if not request.path.startswith("/api/") or request.url_rule is None:
            return None
        operation = OPERATIONS.get(request.url_rule.endpoint)
        if operation is None:
            return None
        sim.count_call(operation)
        task_id = (request.view_args or {}).get("task_id")
        scope = {"operation": operation, "path": request.path, "task": task_id}
        faults = sim.faults
        slow = faults.take({"slow"}, **scope)
        if slow is not None:
            if slow.get("after"):
                g.slow_after = slow.get("seconds") or 1.0  # slept in answered_late()
            else:
                time.sleep(slow.get("seconds") or 1.0)
        rule = faults.take({"http_5xx", "html_502", "rate_limit"}, **scope)
        if rule is not None:
            if rule["fault"] == "rate_limit":
                sim.count_call(operation, rate_limited=True)
            return _http_fault(rule)
        if task_id is not None and faults.take({"task_deleted"}, **scope) is not None:
            raise ApiError(404, "not_found", "No Task matches the given query.")
        scheme, _, token = request.headers.get("Authorization", "").partition(" ")
        if scheme != "Bearer":
            return None  # the token faults only concern calls that carry an agent token
        if operation == "RefreshAgentToken":
            # DRF authenticates before the view: a Bearer that is not a live token fails
            # the call, whatever refresh token the body holds.
            if not state().access_token_valid(token.strip()) and faults.take(
                {"stale_bearer_refresh"}, **scope
            ):
                raise ApiError(401, "token_not_valid", "Given token not valid for any token type")
        elif faults.take({"token_expired"}, **scope) is not None:
            state().expire_access_token(token.strip())
        return None

    @app.after_request
    def malformed_answers(response: Response) -> Response:
        """The `malformed` fault (faults.py): a 200 answer of the public API, spoiled."""
        if response.status_code != 200 or not request.path.startswith("/api/"):
            return response
        if request.url_rule is None or request.url_rule.endpoint not in OPERATIONS:
            return response
        scope = {
            "operation": OPERATIONS[request.url_rule.endpoint],
            "path": request.path,
            "task": (request.view_args or {}).get("task_id"),
        }
        rule = sim.faults.take({"malformed"}, **scope)
        if rule is None:
            return response
        if rule.get("shape", "truncated") == "html":
            return Response(HTML_502.format(status=200), status=200, mimetype="text/html")
        text = response.get_data(as_text=True)
        return Response(text[: len(text) // 2], status=200, mimetype="application/json")

    @app.after_request
    def answered_late(response):
        """`slow` with `after`: the call took effect; its answer leaves late."""
        if g.get("slow_after"):
            time.sleep(g.slow_after)
        return response

    @app.errorhandler(ApiError)
    def api_error(error: ApiError):
        return jsonify(error.body()), error.status

    @app.errorhandler(HTTPException)
    def http_error(error: HTTPException):
        if request.path.startswith("/api/"):
            code = "not_found" if error.code == 404 else "error"
            return jsonify(ApiError(error.code, code, error.description).body()), error.code
        return jsonify({"error": error.description}), error.code

    @app.errorhandler(Exception)
    def server_error(error: Exception):
        logger.exception("unexpected error on %s %s", request.method, request.path)
        return jsonify(
            {
                "type": "server_error",
                "errors": [
                    {"attr": None, "code": "error", "detail": f"{type(error).__name__}: {error}"}
                ],
            }
        ), 500

    # ---- public API ----------------------------------------------------------------------

    @app.get("/api/v1/openapi/")
    def openapi():
        document = build_document(sim.public_url)
        for path in document["paths"].values():
            for method in [m for m, op in path.items() if op["operationId"] in sim.schema_omits]:
                del path[method]
        return jsonify(document)

    @app.get("/api/v1/public-key/")
    def get_public_key():
        return Response(state().server_public_pem, mimetype="application/x-pem-file")

    @app.post("/api/v1/agent/")
    def create_agent():
        return jsonify(state().register_agent(body()))

    @app.post("/api/v1/agent/refresh/")
    def refresh_agent_token():
        # No access token needed: it is usually expired when an agent calls this.
        return jsonify(state().refresh(body()))

    @app.get("/api/v1/agent/actions/")
    def agent_actions():
        agent = agent_only()
        raw = request.args.get("capacity")
        capacity = None
        if raw not in (None, ""):
            try:
                capacity = int(raw)
            except ValueError:
                raise validation_error(
                    "capacity", "invalid", "A valid integer is required."
                ) from None
        return jsonify(state().actions(agent, capacity, hidden=sim.faults.deleted))

    @app.get("/api/v1/task/<task_id>/definition/")
    def task_definition(task_id):
        agent = agent_only()
        task = state().get_task(task_id)
        state().check_task_access(("agent", agent), task)
        return jsonify(sim.definition(task))

    @app.get("/api/v1/task/<task_id>/")
    def retrieve_task(task_id):
        who = principal()
        task = state().get_task(task_id)
        state().check_task_access(who, task)
        return jsonify(state().task_json(task))

    @app.patch("/api/v1/task/<task_id>/")
    def partial_update_task(task_id):
        agent = agent_only()
        task = state().get_task(task_id)
        task = state().update_state(agent, task, body())
        return jsonify(state().task_json(task))

    @app.get("/api/v1/task/<task_id>/artifacts/")
    def list_artifacts(task_id):
        who = principal()
        task = state().get_task(task_id)
        state().check_task_access(who, task, artifacts=True)
        with state().lock:
            return jsonify([a.to_json() for a in state().artifacts[task.id]])

    @app.post("/api/v1/task/<task_id>/artifacts/")
    def create_artifact(task_id):
        who = principal()
        task = state().get_task(task_id)
        state().check_task_access(who, task, artifacts=True, write=True)
        data = body()
        path, content_type, size = data.get("path"), data.get("content_type"), data.get("size")
        if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
            raise validation_error("path", "invalid", "A relative path is required.")
        if not isinstance(content_type, str) or not content_type:
            raise validation_error("content_type", "required", "This field is required.")
        if isinstance(size, bool) or not isinstance(size, int) or size < 0:
            raise validation_error("size", "invalid", "A non-negative integer is required.")
        with state().lock:
            artifact = state()._add_artifact(task, path, size, content_type)
        put_url = sim.storage.presign_put(ARTIFACTS_BUCKET, artifact.key)
        return jsonify(artifact.to_json(s3_put_url=put_url)), 201

    @app.get("/api/v1/task/<task_id>/artifact/<path:path>")
    def download_artifact(task_id, path):
        who = principal()
        task = state().get_task(task_id)
        state().check_task_access(who, task, artifacts=True)
        with state().lock:
            artifact = next((a for a in state().artifacts[task.id] if a.path == path), None)
        if artifact is None:
            raise ApiError(404, "not_found", f"No artifact {path!r} on this task.")
        # Like Arkindex: a redirect to S3. requests drops the Authorization header on the
        # way (another port), so the Ponos token never reaches S3.
        return redirect(
            sim.storage.presign_get(
                ARTIFACTS_BUCKET, artifact.key, content_type=artifact.content_type
            ),
            code=302,
        )

    @app.get("/api/v1/modelversion/<version_id>/")
    def retrieve_model_version(version_id):
        who = principal()
        st = state()
        version = st.model_versions.get(version_id)
        if version is None:
            raise ApiError(404, "not_found", "No ModelVersion matches the given query.")
        _check_related(st, who, lambda t: t.model_version_id == version_id)
        return jsonify(
            {
                "id": version.id,
                "model": {"id": version.model_id, "name": version.model_name},
                "model_id": version.model_id,
                "state": "available",
                "tag": None,
                "description": "",
                "configuration": version.configuration,
                "size": version.size,
                "hash": version.hash,
                "archive_hash": version.hash,
                "s3_url": sim.storage.presign_get(
                    MODELS_BUCKET, version.key, content_type="application/zstd"
                ),
                "s3_put_url": None,
            }
        )

    @app.get("/api/v1/process/workers/<run_id>/")
    def retrieve_worker_run(run_id):
        who = principal()
        return jsonify(sim.worker_run_json(_worker_run(state(), who, run_id)))

    @app.get("/api/v1/workers/runs/<run_id>/configuration/")
    def retrieve_worker_run_configuration(run_id):
        who = principal()
        run = _worker_run(state(), who, run_id)
        return jsonify(
            {
                "configuration": [
                    {"key": key, "value": value, "secret": False}
                    for key, value in run.configuration.items()
                ]
            }
        )

    # ---- admin API -----------------------------------------------------------------------

    @app.post("/_sim/processes")
    def admin_create_process():
        try:
            created = state().create_process(request.get_json(silent=True) or {})
        except (ValueError, KeyError, TypeError) as error:
            return jsonify({"error": str(error)}), 400
        except ApiError as error:
            return jsonify({"error": error.detail}), 400
        return jsonify(created), 201

    @app.get("/_sim/processes")
    def admin_list_processes():
        with state().lock:
            return jsonify({"processes": [sim.process_json(p) for p in state().processes.values()]})

    @app.get("/_sim/processes/<process_id>")
    def admin_process(process_id):
        process = state().processes.get(process_id)
        if process is None:
            return jsonify({"error": "no such process"}), 404
        return jsonify(sim.process_json(process))

    @app.post("/_sim/processes/<process_id>/stop")
    def admin_stop_process(process_id):
        process = state().processes.get(process_id)
        if process is None:
            return jsonify({"error": "no such process"}), 404
        for task_id in process.task_ids:
            state().stop_task(task_id)
        return jsonify(sim.process_json(process))

    @app.get("/_sim/tasks")
    def admin_list_tasks():
        process = request.args.get("process")
        with state().lock:
            tasks = sorted(state().tasks.values(), key=lambda t: t.order)
            return jsonify(
                {
                    "tasks": [
                        sim.admin_task_json(t) for t in tasks if process in (None, t.process_id)
                    ]
                }
            )

    @app.get("/_sim/tasks/<task_id>")
    def admin_task(task_id):
        task = state().tasks.get(task_id)
        if task is None:
            return jsonify({"error": "no such task"}), 404
        with state().lock:
            return jsonify(sim.admin_task_json(task))

    @app.post("/_sim/tasks/<task_id>/stop")
    def admin_stop_task(task_id):
        if task_id not in state().tasks:
            return jsonify({"error": "no such task"}), 404
        task = state().stop_task(task_id)
        with state().lock:
            return jsonify(sim.admin_task_json(task))

    @app.get("/_sim/tasks/<task_id>/logs")
    def admin_task_logs(task_id):
        if task_id not in state().tasks:
            return jsonify({"error": "no such task"}), 404
        data = sim.storage.get(LOGS_BUCKET, f"{task_id}.log")
        if data is None:
            return jsonify({"error": "no logs published for this task"}), 404
        return Response(data, mimetype="text/plain", content_type="text/plain; charset=utf-8")

    @app.route("/_sim/faults", methods=["GET", "POST", "DELETE"])
    def admin_faults():
        if request.method == "DELETE":
            sim.faults.clear()
        elif request.method == "POST":
            data = request.get_json(silent=True)
            try:
                sim.faults.set(data.get("rules", []) if isinstance(data, dict) else [])
            except FaultError as error:
                return jsonify({"error": str(error)}), 400
        return jsonify(sim.faults.snapshot())

    @app.get("/_sim/stats")
    def admin_stats():
        return jsonify(sim.stats())

    @app.get("/_sim/agents")
    def admin_agents():
        with state().lock:
            return jsonify(
                {
                    "agents": [
                        {
                            **a.to_json(),
                            "registered_at": a.registered_at,
                            "last_seen": a.last_seen,
                            # Every token it was given: what a leak check looks for.
                            "tokens": [a.refresh_token]
                            + [
                                token
                                for token, (owner, _expiry) in state().access_tokens.items()
                                if owner == a.id
                            ],
                        }
                        for a in state().agents.values()
                    ]
                }
            )

    return app


def _http_fault(rule: dict) -> Response:
    if rule["fault"] == "rate_limit":
        wait = rule.get("retry_after") or 1.0
        seconds = max(1, round(wait))
        body = {"detail": f"Request was throttled. Expected available in {seconds} seconds."}
        response = jsonify(body)
        response.status_code = 429
        # Retry-After is whole seconds (RFC 9110 delay-seconds), as DRF sends it.
        response.headers["Retry-After"] = str(seconds)
        return response
    if rule["fault"] == "html_502":
        status = rule.get("status") or 502
        return Response(HTML_502.format(status=status), status=status, mimetype="text/html")
    status = rule.get("status") or 500
    response = jsonify(
        {
            "type": "server_error",
            "errors": [{"attr": None, "code": "error", "detail": "A server error occurred."}],
        }
    )
    response.status_code = status
    return response


def _check_related(st: ArkindexState, who, matches) -> None:
    """A task token reaches what its own task uses; an agent what its tasks use."""
    kind, principal = who
    with st.lock:
        if kind == "task" and matches(principal):
            return
        if kind == "agent" and any(
            t.agent_id == principal.id and matches(t) for t in st.tasks.values()
        ):
            return
    raise ApiError(403, "permission_denied", "You do not have permission to perform this action.")


def _worker_run(st: ArkindexState, who, run_id: str):
    run = st.worker_runs.get(run_id)
    if run is None:
        raise ApiError(404, "not_found", "No WorkerRun matches the given query.")
    _check_related(st, who, lambda t: t.worker_run_id == run_id)
    return run


class ArkindexSimulator:
    """The Arkindex simulator, served in a thread. Also a context manager.

    `farms` maps farm ids to seeds (one random farm when omitted: see `farm_id`, `seed`).
    Without `s3_url`, it starts and owns an `S3Server`. `public_url` is the base URL written
    into task environments and the OpenAPI servers list (default: the listening URL).
    `url_lifetime`: seconds the pre-signed S3 URLs live (default 1 h, boto3's). `faults`:
    fault rules active from the start (faults.py; none by default). `schema_omits`:
    operation ids left out of the served OpenAPI schema, like an Arkindex of another version
    (none by default; `ponos-vast doctor` must name them).
    """

    def __init__(
        self,
        s3_url: str | None = None,
        farms: dict[str, str] | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        token_ttl: float = 3600,
        public_url: str | None = None,
        faults: list[dict] | None = None,
        url_lifetime: float = URL_LIFETIME,
        schema_omits: tuple | list = (),
    ):
        self.s3_url = s3_url
        self.farms = dict(farms) if farms else {str(uuid.uuid4()): secrets.token_hex(32)}
        self.host = host
        self.port = port
        self.token_ttl = token_ttl
        self._public_url = public_url
        self.url_lifetime = url_lifetime
        self.schema_omits = frozenset(schema_omits)
        # Injected faults (faults.py): none unless given here or through /_sim/faults.
        self.faults = FaultBook(faults or ())
        self._counts_lock = threading.Lock()
        self.calls: Counter = Counter()  # public API requests by operation id
        self.rate_limited: Counter = Counter()  # 429 answers among them
        self._own_s3 = None
        self._server = None
        self._thread = None
        self.storage: Storage | None = None
        self.state: ArkindexState | None = None

    @property
    def farm_id(self) -> str:
        return next(iter(self.farms))

    def count_call(self, operation: str, *, rate_limited: bool = False) -> None:
        """One request to the public API (rate_limited: the 429 it got, counted apart)."""
        with self._counts_lock:
            (self.rate_limited if rate_limited else self.calls)[operation] += 1

    def stats(self) -> dict:
        with self._counts_lock:
            return {"calls": dict(self.calls), "rate_limited": dict(self.rate_limited)}

    @property
    def seed(self) -> str:
        return self.farms[self.farm_id]

    @property
    def url(self) -> str:
        if self._server is None:
            raise RuntimeError("ArkindexSimulator is not started")
        return f"http://{self.host}:{self._server.server_port}"

    @property
    def public_url(self) -> str:
        return self._public_url or self.url

    def start(self) -> ArkindexSimulator:
        if self.s3_url is None:
            from ponos_tasks.simulators.s3 import S3Server

            self._own_s3 = S3Server(host=self.host).start()
            self.s3_url = self._own_s3.url
        self.storage = Storage(
            self.s3_url,
            [LOGS_BUCKET, ARTIFACTS_BUCKET, MODELS_BUCKET],
            url_lifetime=self.url_lifetime,
        )
        self.state = ArkindexState(self.farms, self.storage, token_ttl=self.token_ttl)
        self._server = make_server(self.host, self.port, create_app(self), threaded=True)
        # A short poll interval: shutdown() waits for it (0.5 s by default, per test).
        self._thread = threading.Thread(
            target=self._server.serve_forever, args=(0.05,), name="arkindex-simulator", daemon=True
        )
        self._thread.start()
        logger.info("Arkindex simulator listening on %s", self.url)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=10)
            self._server = None
        if self._own_s3 is not None:
            self._own_s3.stop()
            self._own_s3 = None
            self.s3_url = None

    def __enter__(self) -> ArkindexSimulator:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- in-process helpers (the admin API calls these) ------------------------------------

    def create_process(self, spec: dict) -> dict:
        return self.state.create_process(spec)

    def stop_task(self, task_id: str) -> dict:
        task = self.state.stop_task(task_id)
        with self.state.lock:
            return self.admin_task_json(task)

    def task(self, task_id: str) -> dict:
        with self.state.lock:
            return self.admin_task_json(self.state.tasks[task_id])

    def logs(self, task_id: str) -> bytes | None:
        return self.storage.get(LOGS_BUCKET, f"{task_id}.log")

    # ---- renderings ----------------------------------------------------------------------

    def task_env(self, task: Task) -> dict[str, str]:
        env = dict(task.env)
        env.update(
            {
                "ARKINDEX_API_URL": self.public_url,
                "ARKINDEX_TASK_TOKEN": task.token,
                "PONOS_TASK": task.id,
                "ARKINDEX_PROCESS_ID": task.process_id,
                "ARKINDEX_WORKER_RUN_ID": task.worker_run_id,
            }
        )
        if task.model_version_id:
            env["ARKINDEX_MODEL_VERSION"] = task.model_version_id
            env["ARKINDEX_MODEL_DIR"] = task.model_dir
        return env

    def definition(self, task: Task) -> dict:
        with self.state.lock:
            parents = [{"id": p, "slug": self.state.tasks[p].slug} for p in task.parent_ids]
            return {
                "id": task.id,
                "slug": task.slug,
                "image": task.image,
                "command": task.command,
                "env": self.task_env(task),
                "parents": parents,
                "s3_logs_put_url": self.storage.presign_put(LOGS_BUCKET, f"{task.id}.log"),
                "requires_gpu": task.requires_gpu,
                "process_id": task.process_id,
                "worker_run_id": task.worker_run_id,
                "model_version_id": task.model_version_id,
                "agent_id": task.agent_id,
                **task.definition_overrides,
            }

    def admin_task_json(self, task: Task) -> dict:
        return {
            "id": task.id,
            "slug": task.slug,
            "process_id": task.process_id,
            "state": task.state,
            "agent_id": task.agent_id,
            "requires_gpu": task.requires_gpu,
            "image": task.image,
            "command": task.command,
            "parents": [{"id": p, "slug": self.state.tasks[p].slug} for p in task.parent_ids],
            "token": task.token,
            "worker_run_id": task.worker_run_id,
            "model_version_id": task.model_version_id,
            "env": self.task_env(task),
            "history": list(task.history),
        }

    def process_json(self, process) -> dict:
        with self.state.lock:
            return {
                "id": process.id,
                "name": process.name,
                "corpus": process.corpus_id,
                "tasks": [
                    {"id": t, "slug": self.state.tasks[t].slug, "state": self.state.tasks[t].state}
                    for t in process.task_ids
                ],
            }

    def worker_run_json(self, run) -> dict:
        process = self.state.processes.get(run.process_id)
        version = (
            self.state.model_versions.get(run.model_version_id) if run.model_version_id else None
        )
        worker_id = str(uuid.uuid5(uuid.NAMESPACE_URL, run.id))
        return {
            "id": run.id,
            "summary": run.summary,
            "use_gpu": run.use_gpu,
            "parents": [],
            "process": {
                "id": run.process_id,
                "corpus": run.corpus_id,
                "mode": "workers",
                "name": process.name if process else None,
                "state": "running",
                "chunks": 1,
            },
            "worker_version": {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, run.id + "/version")),
                "version": 1,
                "worker": {
                    "id": worker_id,
                    "name": "Simulated worker",
                    "slug": "simulated",
                    "type": "worker",
                },
                "configuration": {},
                "gpu_usage": "required" if run.use_gpu else "disabled",
                "model_usage": "required" if version else "disabled",
            },
            "model_version": None
            if version is None
            else {
                "id": version.id,
                "configuration": version.configuration,
                "model": {"id": version.model_id, "name": version.model_name},
            },
            "configuration": {
                "id": str(uuid.uuid5(uuid.NAMESPACE_URL, run.id + "/conf")),
                "name": "simulated",
                "configuration": run.configuration,
            },
        }
