"""The OpenAPI 3 document served at /api/v1/openapi/?format=json.

Written for what arkindex-client 1.3.x checks and uses (arkindex/schema/openapi.py and
arkindex/client/client.py):
- every operation has an `operationId` (the client indexes operations by it);
- absolute paths under /api/v1/ (the client joins them to its base URL);
- request bodies are inline JSON schemas, so the client's body keyword is `body`;
- `x-paginated: false` on every operation: none of them is paginated, and `paginate()`
  on an operation without that flag insists on a `page` or `cursor` parameter;
- only simple JSON-schema types, which typesystem.from_json_schema understands.
"""

from __future__ import annotations

STRING = {"type": "string"}
INTEGER = {"type": "integer"}
ID = {"name": "id", "in": "path", "required": True, "schema": STRING}

ERROR_RESPONSE = {
    "description": "Error: {type: client_error|validation_error, errors: [{attr, code, detail}]}",
    "content": {"application/json": {"schema": {"type": "object"}}},
}


def _json_response(description: str, schema: dict | None = None) -> dict:
    return {
        "description": description,
        "content": {"application/json": {"schema": schema or {"type": "object"}}},
    }


def _body(properties: dict, required: list[str]) -> dict:
    return {
        "required": True,
        "content": {
            "application/json": {
                "schema": {"type": "object", "properties": properties, "required": required}
            }
        },
    }


def _operation(
    operation_id: str,
    summary: str,
    *,
    parameters: list | None = None,
    body: dict | None = None,
    response: dict | None = None,
    security: str | None = None,
    tag: str = "ponos",
) -> dict:
    operation = {
        "operationId": operation_id,
        "summary": summary,
        "tags": [tag],
        "x-paginated": False,
        "parameters": parameters or [],
        "responses": {
            "200": response or _json_response("OK"),
            "400": ERROR_RESPONSE,
            "401": ERROR_RESPONSE,
            "403": ERROR_RESPONSE,
            "404": ERROR_RESPONSE,
        },
    }
    if body is not None:
        operation["requestBody"] = body
    if security:
        operation["security"] = [{security: []}]
    return operation


AGENT_REGISTRATION = {
    "farm": STRING,
    "hostname": STRING,
    "cpu_cores": INTEGER,
    "cpu_frequency": INTEGER,
    "gpu_count": INTEGER,
    "gpu_names": STRING,
    "public_key": STRING,
    "derivation": STRING,
}

TASK_STATES = [
    "unscheduled",
    "pending",
    "running",
    "completed",
    "failed",
    "error",
    "stopping",
    "stopped",
    "cancelled",
]


def build_document(server_url: str) -> dict:
    """The whole OpenAPI document; `server_url` is the simulator's base URL."""
    paths = {
        "/api/v1/public-key/": {
            "get": _operation(
                "GetPublicKey",
                "The server's EC P-384 public key (PEM), for the CreateAgent derivation.",
                response={
                    "description": "PEM public key",
                    "content": {"application/x-pem-file": {"schema": STRING}},
                },
            ),
        },
        "/api/v1/agent/": {
            "post": _operation(
                "CreateAgent",
                "Register a Ponos agent on a farm with its EC P-384 public key (PEM), proving "
                "it knows the farm seed: derivation = base64(HKDF-SHA256(ECDH(agent key, "
                "server key), 32 bytes, no salt, info=seed)).",
                body=_body(
                    AGENT_REGISTRATION,
                    [
                        "farm",
                        "public_key",
                        "derivation",
                        "hostname",
                        "cpu_cores",
                        "cpu_frequency",
                        "gpu_count",
                    ],
                ),
                response=_json_response("The agent with access_token and refresh_token"),
            ),
        },
        "/api/v1/agent/refresh/": {
            "post": _operation(
                "RefreshAgentToken",
                "Get a new access token from the refresh token.",
                body=_body({"refresh": STRING}, ["refresh"]),
            ),
        },
        "/api/v1/agent/actions/": {
            "get": _operation(
                "RetrieveAgentActions",
                "Actions for this agent (start_task, stop_task); assigns pending tasks.",
                parameters=[
                    {"name": "capacity", "in": "query", "required": False, "schema": INTEGER}
                ],
                security="agentAuth",
            ),
        },
        "/api/v1/task/{id}/definition/": {
            "get": _operation(
                "RetrieveTaskDefinition",
                "Image, command, environment, parents and log URL of a task.",
                parameters=[ID],
                security="agentAuth",
            ),
        },
        "/api/v1/task/{id}/": {
            "get": _operation("RetrieveTask", "Retrieve a task.", parameters=[ID]),
            "patch": _operation(
                "PartialUpdateTask",
                "Report a task's new state (the state table is enforced).",
                parameters=[ID],
                body=_body({"state": {"type": "string", "enum": TASK_STATES}}, []),
                security="agentAuth",
            ),
        },
        "/api/v1/task/{id}/artifacts/": {
            "get": _operation(
                "ListArtifacts",
                "List a task's artifacts (not paginated).",
                parameters=[ID],
                response=_json_response(
                    "Artifacts", {"type": "array", "items": {"type": "object"}}
                ),
            ),
            "post": _operation(
                "CreateArtifact",
                "Declare an artifact; upload its bytes with a PUT to s3_put_url.",
                parameters=[ID],
                body=_body(
                    {"path": STRING, "content_type": STRING, "size": INTEGER},
                    ["path", "content_type", "size"],
                ),
            ),
        },
        "/api/v1/task/{id}/artifact/{path}": {
            "get": _operation(
                "DownloadArtifact",
                "Download an artifact (redirects to S3).",
                parameters=[ID, {"name": "path", "in": "path", "required": True, "schema": STRING}],
                response={
                    "description": "The artifact's bytes",
                    "content": {"application/octet-stream": {"schema": STRING}},
                },
            ),
        },
        "/api/v1/modelversion/{id}/": {
            "get": _operation(
                "RetrieveModelVersion",
                "A model version, with an s3_url to its archive.",
                parameters=[ID],
                tag="training",
            ),
        },
        "/api/v1/process/workers/{id}/": {
            "get": _operation(
                "RetrieveWorkerRun",
                "A worker run, with its process and worker version.",
                parameters=[ID],
                tag="process",
            ),
        },
        "/api/v1/workers/runs/{id}/configuration/": {
            "get": _operation(
                "RetrieveWorkerRunConfiguration",
                "The configuration of a worker run.",
                parameters=[ID],
                tag="process",
            ),
        },
    }
    return {
        "openapi": "3.0.3",
        "info": {
            "title": "Arkindex API (ponos-vast simulator)",
            "version": "1.0.0-sim",
            "description": "The Ponos agent and worker endpoints of Arkindex, simulated. "
            "Community Edition: no RetrieveSecret.",
        },
        "servers": [{"url": server_url}],
        "paths": paths,
        "components": {
            "securitySchemes": {
                "agentAuth": {"type": "http", "scheme": "bearer"},
                "taskAuth": {
                    "type": "apiKey",
                    "in": "header",
                    "name": "Authorization",
                    "description": "Ponos <task token>",
                },
            },
        },
    }
