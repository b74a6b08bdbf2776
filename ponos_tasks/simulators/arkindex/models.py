"""Processes, tasks, agents, artifacts, model versions and the task state table.

Everything here is plain Python guarded by one lock; the Flask layer (server.py) only
parses requests and renders what these methods return. S3 is reached through a `storage`
object (storage.py) so this module stays free of HTTP.

Agent registration, in the shape of the published Ponos API: GetPublicKey returns the
server's EC P-384 public key (PEM, `application/x-pem-file`); CreateAgent takes the agent's
own public key (PEM, an EC P-384 key) and a `derivation` proving it knows the farm seed
without sending it:

    derivation = base64(HKDF-SHA256(ECDH(agent key, server key), length=32, salt=None,
                                    info=seed))

The simulator recomputes it from its private key and the agent's public key
(`expected_derivation`, the one function to replace if Arkindex's scheme differs: the real
agent is closed source; this is the ECDH + seed-keyed KDF shape it is described to use).
The same public key registering again is the same agent (same id, same tasks).

State table (docs/reference.md §2.2). Server-side moves: unscheduled → pending when every
parent is completed; user stop: unscheduled → stopped, pending (unassigned) → stopped, pending
(assigned) / running → stopping. Moves an agent may report with PartialUpdateTask:

    pending  → running, error   (error: the agent could not start it, e.g. no machine)
    running  → completed, failed, error, cancelled
    stopping → stopped, error

Anything else, including repeating a state the task is already in, is refused with 400 and
recorded in the task's history with accepted=False.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import secrets
import threading
import time
import uuid
from dataclasses import dataclass, field

from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

TERMINAL_STATES = frozenset({"completed", "failed", "error", "stopped", "cancelled"})
ALL_STATES = frozenset({"unscheduled", "pending", "running", "stopping"}) | TERMINAL_STATES
AGENT_TRANSITIONS: dict[str, frozenset[str]] = {
    "pending": frozenset({"running", "error"}),
    "running": frozenset({"completed", "failed", "error", "cancelled"}),
    "stopping": frozenset({"stopped", "error"}),
}
HOSTNAME_RE = re.compile(r"^[-a-zA-Z0-9_.]{1,64}$")
SLUG_RE = re.compile(r"^[-\w.]{1,100}$")  # Unicode letters too: slugs come from worker names

LOGS_BUCKET = "ponos-logs"
ARTIFACTS_BUCKET = "ponos-artifacts"
MODELS_BUCKET = "models"


class ApiError(Exception):
    """An error rendered in the shape arkindex-client understands."""

    def __init__(
        self, status: int, code: str, detail: str, attr: list | None = None, kind: str | None = None
    ):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.detail = detail
        self.attr = attr
        self.kind = kind or ("validation_error" if attr else "client_error")

    def body(self) -> dict:
        return {
            "type": self.kind,
            "errors": [{"attr": self.attr, "code": self.code, "detail": self.detail}],
        }


def validation_error(attr: str, code: str, detail: str) -> ApiError:
    return ApiError(400, code, detail, attr=[attr], kind="validation_error")


def expected_derivation(
    seed: str, server_key: ec.EllipticCurvePrivateKey, agent_key: ec.EllipticCurvePublicKey
) -> str:
    """The derivation an agent knowing `seed` sends with `agent_key` (module docstring)."""
    shared = server_key.exchange(ec.ECDH(), agent_key)
    derived = HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=seed.encode()).derive(
        shared
    )
    return base64.b64encode(derived).decode()


def load_agent_key(pem: str) -> ec.EllipticCurvePublicKey | None:
    """The agent's public key from its PEM, or None unless it is an EC P-384 key."""
    try:
        key = serialization.load_pem_public_key(pem.encode())
    except (ValueError, TypeError):
        return None
    if not isinstance(key, ec.EllipticCurvePublicKey) or key.curve.name != "secp384r1":
        return None
    return key


def pem_of(key) -> str:
    return key.public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    ).decode()


def _now() -> float:
    return time.time()


@dataclass
class Agent:
    id: str
    farm_id: str
    hostname: str
    cpu_cores: int
    cpu_frequency: int
    gpu_count: int
    gpu_names: str | None
    public_key: str
    refresh_token: str
    registered_at: float = field(default_factory=_now)
    last_seen: float | None = None

    def to_json(self) -> dict:
        return {
            "id": self.id,
            "farm": {"id": self.farm_id, "name": f"farm {self.farm_id[:8]}"},
            "hostname": self.hostname,
            "cpu_cores": self.cpu_cores,
            "cpu_frequency": self.cpu_frequency,
            "gpu_count": self.gpu_count,
            "gpu_names": self.gpu_names,
        }


@dataclass
class Artifact:
    id: str
    task_id: str
    path: str
    size: int
    content_type: str
    created: float = field(default_factory=_now)

    @property
    def key(self) -> str:
        return f"{self.task_id}/{self.path}"

    def to_json(self, s3_put_url: str | None = None) -> dict:
        stamp = _iso(self.created)
        return {
            "id": self.id,
            "path": self.path,
            "size": self.size,
            "content_type": self.content_type,
            "s3_put_url": s3_put_url,
            "created": stamp,
            "updated": stamp,
        }


@dataclass
class ModelVersion:
    id: str
    model_id: str
    model_name: str
    configuration: dict
    size: int
    hash: str

    @property
    def key(self) -> str:
        return f"{self.id}.tar.zst"


@dataclass
class WorkerRun:
    id: str
    process_id: str
    corpus_id: str
    configuration: dict
    model_version_id: str | None
    use_gpu: bool
    summary: str


@dataclass
class Process:
    id: str
    name: str
    corpus_id: str
    task_ids: list[str]
    created: float = field(default_factory=_now)


@dataclass
class Task:
    id: str
    process_id: str
    slug: str
    image: str | None
    command: str | None
    env: dict[str, str]
    parent_ids: list[str]
    requires_gpu: bool
    token: str
    worker_run_id: str
    depth: int
    order: int
    model_version_id: str | None = None
    model_dir: str | None = None
    state: str = "unscheduled"
    agent_id: str | None = None
    history: list[dict] = field(default_factory=list)
    # Fields of the served definition replaced as given (admin "definition"): for tests.
    definition_overrides: dict = field(default_factory=dict)

    def record(
        self,
        to: str,
        *,
        accepted: bool,
        source: str,
        status: int | None = None,
        error: str | None = None,
    ) -> None:
        """Append one update, accepted or refused, then apply it when accepted."""
        self.history.append(
            {
                "t": _now(),
                "from": self.state,
                "to": to,
                "accepted": accepted,
                "status": status,
                "error": error,
                "source": source,
            }
        )
        if accepted:
            self.state = to


def _iso(stamp: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(stamp)) + f".{int(stamp % 1 * 1e6):06d}Z"


def _as_int(body: dict, name: str, minimum: int, required: bool = True) -> int | None:
    value = body.get(name)
    if value is None:
        if required:
            raise validation_error(name, "required", "This field is required.")
        return None
    if isinstance(value, bool) or not isinstance(value, int):
        raise validation_error(name, "invalid", "A valid integer is required.")
    if value < minimum:
        raise validation_error(
            name, "min_value", f"Ensure this value is greater than or equal to {minimum}."
        )
    return value


def _as_str(body: dict, name: str) -> str:
    value = body.get(name)
    if value is None or value == "":
        raise validation_error(name, "required", "This field is required.")
    if not isinstance(value, str):
        raise validation_error(name, "invalid", "Not a valid string.")
    return value


class ArkindexState:
    """The simulated Arkindex database and scheduler."""

    def __init__(self, farms: dict[str, str], storage, *, token_ttl: float = 3600.0, clock=_now):
        self.farms = dict(farms)
        # The server's key pair (GetPublicKey): one per simulated Arkindex.
        self.server_key = ec.generate_private_key(ec.SECP384R1())
        self.server_public_pem = pem_of(self.server_key.public_key())
        self.storage = storage
        self.token_ttl = token_ttl
        self.clock = clock
        self.lock = threading.RLock()
        self.agents: dict[str, Agent] = {}
        self.access_tokens: dict[str, tuple[str, float]] = {}  # token -> (agent id, expiry)
        self.processes: dict[str, Process] = {}
        self.tasks: dict[str, Task] = {}
        self.task_tokens: dict[str, str] = {}  # token -> task id
        self.artifacts: dict[str, list[Artifact]] = {}  # task id -> artifacts
        self.model_versions: dict[str, ModelVersion] = {}
        self.worker_runs: dict[str, WorkerRun] = {}
        self._order = 0

    # ---- agents and tokens -------------------------------------------------------------

    def register_agent(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise ApiError(
                400, "invalid", "The body must be a JSON object.", kind="validation_error"
            )
        farm = _as_str(body, "farm")
        public_key = _as_str(body, "public_key")
        derivation = _as_str(body, "derivation")
        hostname = _as_str(body, "hostname")
        if not HOSTNAME_RE.match(hostname):
            raise validation_error(
                "hostname",
                "invalid",
                "Enter a hostname of at most 64 letters, digits, '-', '_' or '.'.",
            )
        cpu_cores = _as_int(body, "cpu_cores", 1)
        cpu_frequency = _as_int(body, "cpu_frequency", 1)
        gpu_count = _as_int(body, "gpu_count", 0)
        gpu_names = body.get("gpu_names")
        if gpu_names is not None and not isinstance(gpu_names, str):
            gpu_names = (
                ", ".join(map(str, gpu_names)) if isinstance(gpu_names, list) else str(gpu_names)
            )
        if farm not in self.farms:
            raise validation_error(
                "farm", "does_not_exist", f'Invalid pk "{farm}" - farm does not exist.'
            )
        agent_key = load_agent_key(public_key)
        if agent_key is None:
            raise validation_error(
                "public_key", "invalid", "The public key must be a PEM-encoded EC P-384 key."
            )
        public_key = pem_of(agent_key)  # one spelling per key, to recognise the agent
        expected = expected_derivation(self.farms[farm], self.server_key, agent_key)
        if not hmac.compare_digest(expected.encode(), derivation.strip().encode()):
            raise validation_error(
                "derivation",
                "invalid",
                "The derivation does not prove knowledge of this farm's seed.",
            )
        with self.lock:
            # The same agent registering again (same farm and key) keeps its id and tasks.
            agent = next(
                (
                    a
                    for a in self.agents.values()
                    if a.farm_id == farm and a.public_key == public_key
                ),
                None,
            )
            if agent is None:
                agent = Agent(
                    id=str(uuid.uuid4()),
                    farm_id=farm,
                    hostname=hostname,
                    cpu_cores=cpu_cores,
                    cpu_frequency=cpu_frequency,
                    gpu_count=gpu_count,
                    gpu_names=gpu_names,
                    public_key=public_key,
                    refresh_token=secrets.token_hex(32),
                )
                self.agents[agent.id] = agent
            else:
                agent.hostname, agent.cpu_cores, agent.cpu_frequency = (
                    hostname,
                    cpu_cores,
                    cpu_frequency,
                )
                agent.gpu_count, agent.gpu_names = gpu_count, gpu_names
            access = self._new_access_token(agent.id)
            return {
                **agent.to_json(),
                "farm": farm,
                "access_token": access,
                "refresh_token": agent.refresh_token,
            }

    def _new_access_token(self, agent_id: str) -> str:
        token = secrets.token_hex(32)
        self.access_tokens[token] = (agent_id, self.clock() + self.token_ttl)
        return token

    def refresh(self, body: dict) -> dict:
        refresh = body.get("refresh") if isinstance(body, dict) else None
        if not refresh or not isinstance(refresh, str):
            raise validation_error("refresh", "required", "This field is required.")
        with self.lock:
            agent = next((a for a in self.agents.values() if a.refresh_token == refresh), None)
            if agent is None:
                raise ApiError(401, "token_not_valid", "Token is invalid or expired")
            access = self._new_access_token(agent.id)
            return {
                "id": agent.id,
                "access_token": access,
                "access": access,
                "refresh_token": agent.refresh_token,
                "refresh": agent.refresh_token,
            }

    def access_token_valid(self, token: str) -> bool:
        with self.lock:
            entry = self.access_tokens.get(token)
            return entry is not None and self.clock() < entry[1]

    def expire_access_token(self, token: str) -> None:
        """This access token expires now (the `token_expired` fault)."""
        with self.lock:
            entry = self.access_tokens.get(token)
            if entry is not None:
                self.access_tokens[token] = (entry[0], self.clock())

    def authenticate(self, header: str | None) -> tuple[str, object]:
        """('agent', Agent) or ('task', Task) from an Authorization header, else 401."""
        if not header:
            raise ApiError(
                401, "not_authenticated", "Authentication credentials were not provided."
            )
        scheme, _, token = header.partition(" ")
        token = token.strip()
        with self.lock:
            if scheme == "Bearer":
                entry = self.access_tokens.get(token)
                if entry is None:
                    raise ApiError(
                        401, "token_not_valid", "Given token not valid for any token type"
                    )
                agent_id, expiry = entry
                if self.clock() >= expiry:
                    raise ApiError(401, "token_not_valid", "Token is invalid or expired")
                agent = self.agents[agent_id]
                agent.last_seen = self.clock()
                return "agent", agent
            if scheme == "Ponos":
                task_id = self.task_tokens.get(token)
                if task_id is None:
                    raise ApiError(401, "authentication_failed", "Invalid task token.")
                return "task", self.tasks[task_id]
        raise ApiError(
            401,
            "authentication_failed",
            f"Unsupported authentication scheme {scheme!r} (use Bearer or Ponos).",
        )

    # ---- processes (admin) -------------------------------------------------------------

    def create_process(self, spec: dict) -> dict:
        """Create a process from the admin spec (see server.py for the format)."""
        if (
            not isinstance(spec, dict)
            or not isinstance(spec.get("tasks"), list)
            or not spec["tasks"]
        ):
            raise ValueError("a process needs a non-empty 'tasks' list")
        specs = spec["tasks"]
        slugs = [t.get("slug") for t in specs]
        for slug in slugs:
            if not isinstance(slug, str) or not SLUG_RE.match(slug):
                raise ValueError(f"invalid task slug {slug!r}")
        if len(set(slugs)) != len(slugs):
            raise ValueError("task slugs must be unique within a process")
        for task_spec in specs:
            # An empty or missing image is allowed: a task Arkindex hands out without one
            # (a worker version whose image was never built) is the agent's to refuse.
            if task_spec.get("image") is not None and not isinstance(task_spec["image"], str):
                raise ValueError(f"task {task_spec['slug']!r}: 'image' must be a string or null")
            if not isinstance(task_spec.get("definition", {}), dict):
                raise ValueError(f"task {task_spec['slug']!r}: 'definition' must be an object")
            command = task_spec.get("command")
            if command is not None and not isinstance(command, str):
                raise ValueError(f"task {task_spec['slug']!r}: 'command' must be a string or null")
            for parent in task_spec.get("parents", []):
                if parent not in slugs or parent == task_spec["slug"]:
                    raise ValueError(f"task {task_spec['slug']!r}: unknown parent {parent!r}")
            state = task_spec.get("state")
            if state is not None and state not in TERMINAL_STATES | {"unscheduled"}:
                raise ValueError(f"task {task_spec['slug']!r}: initial state must be terminal")
        depths = _depths({t["slug"]: t.get("parents", []) for t in specs})

        process_id = str(uuid.uuid4())
        corpus_id = spec.get("corpus") or str(uuid.uuid4())
        with self.lock:
            by_slug: dict[str, Task] = {}
            for task_spec in sorted(specs, key=lambda t: depths[t["slug"]]):
                task = self._create_task(process_id, corpus_id, task_spec, depths, by_slug)
                by_slug[task.slug] = task
            process = Process(
                id=process_id,
                name=str(spec.get("name") or "process"),
                corpus_id=corpus_id,
                task_ids=[by_slug[s].id for s in slugs],
            )
            self.processes[process_id] = process
            self._schedule()
            return {
                "id": process_id,
                "name": process.name,
                "corpus": corpus_id,
                "tasks": [
                    {"id": by_slug[s].id, "slug": s, "state": by_slug[s].state} for s in slugs
                ],
            }

    def _create_task(self, process_id, corpus_id, spec, depths, by_slug) -> Task:
        task_id = str(uuid.uuid4())
        model_version_id = None
        if spec.get("model"):
            model_version_id = self._create_model_version(spec["model"])
        worker_run = WorkerRun(
            id=str(uuid.uuid4()),
            process_id=process_id,
            corpus_id=corpus_id,
            configuration=dict(spec.get("configuration") or {}),
            model_version_id=model_version_id,
            use_gpu=bool(spec.get("requires_gpu")),
            summary=f"Worker {spec['slug']} @ simulated version",
        )
        self.worker_runs[worker_run.id] = worker_run
        self._order += 1
        task = Task(
            id=task_id,
            process_id=process_id,
            slug=spec["slug"],
            image=spec.get("image"),
            command=spec.get("command"),
            env={str(k): str(v) for k, v in (spec.get("env") or {}).items()},
            parent_ids=[by_slug[p].id for p in spec.get("parents", [])],
            requires_gpu=bool(spec.get("requires_gpu")),
            token=secrets.token_hex(24),
            worker_run_id=worker_run.id,
            depth=depths[spec["slug"]],
            order=self._order,
            model_version_id=model_version_id,
            model_dir=(spec.get("model") or {}).get("dir", "/data/model")
            if model_version_id
            else None,
            definition_overrides=dict(spec.get("definition") or {}),
        )
        self.tasks[task_id] = task
        self.task_tokens[task.token] = task_id
        self.artifacts[task_id] = []
        for artifact in spec.get("artifacts", []):
            content = artifact.get("content", "")
            data = content.encode() if isinstance(content, str) else bytes(content)
            content_type = artifact.get("content_type", "text/plain")
            created = self._add_artifact(task, artifact["path"], len(data), content_type)
            self.storage.put(ARTIFACTS_BUCKET, created.key, data, content_type)
        if spec.get("state") and spec["state"] != "unscheduled":
            task.record(spec["state"], accepted=True, source="admin", status=None)
        return task

    def _create_model_version(self, model: dict) -> str:
        from ponos_tasks.simulators.arkindex.archive import tar_zst

        files = model.get("files") or {"model.txt": "simulated model\n"}
        archive = tar_zst(files)
        version = ModelVersion(
            id=str(uuid.uuid4()),
            model_id=str(uuid.uuid4()),
            model_name=model.get("name", "simulated model"),
            configuration=dict(model.get("configuration") or {}),
            size=len(archive),
            hash=hashlib.md5(archive).hexdigest(),  # noqa: S324 (etag-like)
        )
        self.storage.put(MODELS_BUCKET, version.key, archive, "application/zstd")
        self.model_versions[version.id] = version
        return version.id

    def _add_artifact(self, task: Task, path: str, size: int, content_type: str) -> Artifact:
        if any(a.path == path for a in self.artifacts[task.id]):
            raise validation_error(
                "path", "unique", f"An artifact with path {path!r} already exists."
            )
        artifact = Artifact(
            id=str(uuid.uuid4()), task_id=task.id, path=path, size=size, content_type=content_type
        )
        self.artifacts[task.id].append(artifact)
        return artifact

    # ---- scheduling --------------------------------------------------------------------

    def _schedule(self) -> None:
        """unscheduled → pending for every task whose parents are all completed."""
        for task in sorted(self.tasks.values(), key=lambda t: t.order):
            if task.state == "unscheduled" and all(
                self.tasks[p].state == "completed" for p in task.parent_ids
            ):
                task.record("pending", accepted=True, source="scheduler")

    def actions(self, agent: Agent, capacity: int | None, hidden=lambda _task_id: False) -> dict:
        """`hidden(task_id)`: tasks that are gone for the agent (deleted), never listed."""
        with self.lock:
            if capacity is not None and capacity < 0:
                raise validation_error("capacity", "min_value", "capacity must be >= 0.")
            assigned = 0
            for task in sorted(self.tasks.values(), key=lambda t: t.order):
                if task.state != "pending" or task.agent_id is not None or hidden(task.id):
                    continue
                if capacity is not None and assigned >= capacity:
                    break
                if task.requires_gpu and agent.gpu_count <= 0:
                    continue
                task.agent_id = agent.id
                assigned += 1
            result = []
            for task in sorted(self.tasks.values(), key=lambda t: t.order):
                if task.agent_id != agent.id or hidden(task.id):
                    continue
                if task.state == "pending":
                    result.append({"action": "start_task", "task_id": task.id})
                elif task.state == "stopping":
                    result.append({"action": "stop_task", "task_id": task.id})
            return {"actions": result}

    def stop_task(self, task_id: str) -> Task:
        """A user asks to stop a task (admin API)."""
        with self.lock:
            task = self.tasks[task_id]
            if task.state == "unscheduled" or (task.state == "pending" and task.agent_id is None):
                task.record("stopped", accepted=True, source="user")
            elif task.state in ("pending", "running"):
                task.record("stopping", accepted=True, source="user")
            return task

    def update_state(self, agent: Agent, task: Task, body: dict) -> Task:
        state = body.get("state") if isinstance(body, dict) else None
        if state is None:
            raise validation_error("state", "required", "This field is required.")
        with self.lock:
            if task.agent_id != agent.id:
                raise ApiError(403, "permission_denied", "This task is not assigned to this agent.")
            if state not in ALL_STATES:
                error = f'"{state}" is not a valid choice.'
                task.record(str(state), accepted=False, source="agent", status=400, error=error)
                raise validation_error("state", "invalid_choice", error)
            if state not in AGENT_TRANSITIONS.get(task.state, frozenset()):
                if state == task.state:
                    error = f"The task is already {state}."
                else:
                    error = f"Transition from {task.state} to {state} is not allowed."
                task.record(state, accepted=False, source="agent", status=400, error=error)
                raise validation_error("state", "invalid_transition", error)
            task.record(state, accepted=True, source="agent", status=200)
            if state == "completed":
                self._schedule()
            return task

    # ---- access rules ------------------------------------------------------------------

    def get_task(self, task_id: str) -> Task:
        task = self.tasks.get(task_id)
        if task is None:
            raise ApiError(404, "not_found", "No Task matches the given query.")
        return task

    def check_task_access(
        self,
        principal: tuple[str, object],
        task: Task,
        *,
        artifacts: bool = False,
        write: bool = False,
    ) -> None:
        """Agents reach the tasks assigned to them. A task token reaches its own task, and
        reads the artifacts of every task of its process (what a worker's bootstrap needs);
        it creates artifacts on its own task only."""
        kind, who = principal
        if kind == "agent" and task.agent_id == who.id:
            return
        if kind == "task":
            if who.id == task.id:
                return
            if artifacts and not write and who.process_id == task.process_id:
                return
        raise ApiError(
            403, "permission_denied", "You do not have permission to perform this action."
        )

    def task_json(self, task: Task) -> dict:
        agent = self.agents.get(task.agent_id) if task.agent_id else None
        return {
            "id": task.id,
            "slug": task.slug,
            "state": task.state,
            "run": 0,
            "depth": task.depth,
            "parents": list(task.parent_ids),
            "process_id": task.process_id,
            "requires_gpu": task.requires_gpu,
            "agent": agent.to_json() if agent else None,
            "full_log": self.storage.presign_get(LOGS_BUCKET, f"{task.id}.log"),
        }


def _depths(parents: dict[str, list[str]]) -> dict[str, int]:
    """Depth of each task in the DAG (0 = no parents); ValueError on a cycle."""
    depths: dict[str, int] = {}
    visiting: set[str] = set()

    def depth(slug: str) -> int:
        if slug in depths:
            return depths[slug]
        if slug in visiting:
            raise ValueError(f"the parents of {slug!r} form a cycle")
        visiting.add(slug)
        value = 1 + max((depth(p) for p in parents[slug]), default=-1)
        visiting.discard(slug)
        depths[slug] = value
        return value

    for slug in parents:
        depth(slug)
    return depths
