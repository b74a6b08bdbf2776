"""The agent's models: what the pure logic (lifecycle, reconcile) reasons about, in one place.

- `Offer` and `Instance`: Vast.ai's rows, typed and tolerant (unknown fields kept in `raw`,
  unknown statuses kept as plain strings: a status this code has never seen must not crash
  anything). The Vast.ai client returns them; the instance snapshot in Redis stores them;
  `reconcile`, `lifecycle` and `metrics` read them.
- `Snapshot`: the latest listing of this agent's instances and when it was taken.
- `TaskRecord`: the agent's working record of one task (state.py stores it in Redis).
- `StepName` and `Next`: the names of the chain's steps and the message "run this step next".

Pure: no Redis, HTTP, Celery or clock here.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from enum import StrEnum
from typing import Any

# The status_msg tokens that `vastai self-test machine` treats as a fatal provisioning error
# (an OCI runtime failure, a pull error, ...).
FATAL_STATUS_TOKENS = (
    "error",
    "failed",
    "failure",
    "exception",
    "traceback",
    "oci runtime",
    "permission denied",
)


def status_msg_is_error(msg: Any) -> bool:
    text = str(msg or "").strip().lower()
    return any(token in text for token in FATAL_STATUS_TOKENS)


# --------------------------------------------------------------------------- Vast.ai rows


def _clean(value: Any) -> Any:
    """Strip whitespace from strings, recursively (public_ipaddr ends with a newline)."""
    if isinstance(value, str):
        return value.strip()
    if isinstance(value, dict):
        return {key: _clean(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_clean(item) for item in value]
    return value


def _env_dict(extra_env: Any) -> dict[str, str]:
    """Vast returns env as [[key, value], ...]; tolerate a dict and malformed entries."""
    if isinstance(extra_env, dict):
        return {str(key): "" if value is None else str(value) for key, value in extra_env.items()}
    env: dict[str, str] = {}
    for pair in extra_env or ():
        if isinstance(pair, list | tuple) and len(pair) == 2:
            env[str(pair[0])] = "" if pair[1] is None else str(pair[1])
    return env


def _int(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError):
        return None


def _float(value: Any) -> float | None:
    try:
        return float(value)
    except (TypeError, ValueError):
        return None


def _str(value: Any) -> str | None:
    return None if value is None else str(value)


@dataclass(frozen=True)
class Offer:
    id: int
    machine_id: int | None
    host_id: int | None
    gpu_name: str | None
    num_gpus: int | None
    gpu_ram: float | None  # MB per GPU
    dph_total: float | None  # $/h including storage for the searched allocated_storage
    reliability: float | None
    geolocation: str | None
    cuda_max_good: float | None
    disk_space: float | None  # GB available
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Offer:
        raw = _clean(dict(data))
        reliability = raw.get("reliability")
        if reliability is None:
            reliability = raw.get("reliability2")
        return cls(
            id=int(raw["id"]),
            machine_id=_int(raw.get("machine_id")),
            host_id=_int(raw.get("host_id")),
            gpu_name=_str(raw.get("gpu_name")),
            num_gpus=_int(raw.get("num_gpus")),
            gpu_ram=_float(raw.get("gpu_ram")),
            dph_total=_float(raw.get("dph_total")),
            reliability=_float(reliability),
            geolocation=_str(raw.get("geolocation")),
            cuda_max_good=_float(raw.get("cuda_max_good")),
            disk_space=_float(raw.get("disk_space")),
            raw=raw,
        )


@dataclass(frozen=True)
class Instance:
    """One instance row. Status fields are plain strings: a status this code has never seen
    must not crash anything (SkyPilot PR #9319); ``raw`` keeps every field, strings stripped
    and ``extra_env`` turned into a dict."""

    id: int
    label: str | None
    machine_id: int | None
    actual_status: str | None
    intended_status: str | None
    cur_state: str | None
    next_state: str | None
    status_msg: str | None
    gpu_name: str | None
    dph_total: float | None
    start_date: float | None
    raw: dict = field(default_factory=dict, repr=False, compare=False)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Instance:
        return cls._of(_clean(dict(data)))

    @classmethod
    def from_stored(cls, data: Mapping[str, Any]) -> Instance:
        """A row this agent stored (`to_dict` of an Instance, so already clean): not cleaned
        again. The sync reads the whole view and snapshot, ~100 fields per instance; the
        recursive clean was nine tenths of decoding them at 1000 instances (cProfile,
        benchmarks.sync_loop --profile)."""
        return cls._of(dict(data))

    @classmethod
    def _of(cls, raw: dict) -> Instance:
        if "extra_env" in raw:
            raw["extra_env"] = _env_dict(raw["extra_env"])
        return cls(
            id=int(raw["id"]),
            label=_str(raw.get("label")),
            machine_id=_int(raw.get("machine_id")),
            actual_status=_str(raw.get("actual_status")),
            intended_status=_str(raw.get("intended_status")),
            cur_state=_str(raw.get("cur_state")),
            next_state=_str(raw.get("next_state")),
            status_msg=_str(raw.get("status_msg")),
            gpu_name=_str(raw.get("gpu_name")),
            dph_total=_float(raw.get("dph_total")),
            start_date=_float(raw.get("start_date")),
            raw=raw,
        )

    @property
    def env(self) -> dict[str, str]:
        return dict(self.raw.get("extra_env") or {})

    @property
    def public_ipaddr(self) -> str | None:
        return self.raw.get("public_ipaddr")

    @property
    def status_msg_is_fatal(self) -> bool:
        """True when status_msg carries an error token (OCI runtime failure, pull error...)."""
        return status_msg_is_error(self.status_msg)

    def to_dict(self) -> dict[str, Any]:
        """The row as Vast.ai gave it (what `from_dict` reads back)."""
        return dict(self.raw)


@dataclass(frozen=True)
class Snapshot:
    """This agent's instances as one listing saw them, and when (agent clock) it was taken."""

    instances: tuple[Instance, ...]
    taken_at: float

    def find(self, instance_id: int | None) -> Instance | None:
        return next((i for i in self.instances if i.id == instance_id), None)

    def to_dict(self) -> dict[str, Any]:
        return {"taken_at": self.taken_at, "instances": [i.to_dict() for i in self.instances]}

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Snapshot:
        return cls(
            tuple(Instance.from_stored(row) for row in data["instances"]), float(data["taken_at"])
        )


# --------------------------------------------------------------------------- task records


@dataclass
class TaskRecord:
    task_id: str
    phase: str = "accepted"  # a lifecycle.Phase value
    attempt: int = 0  # 0 until the first create; the label carries it
    label: str | None = None
    offer_id: int | None = None
    machine_id: int | None = None
    instance_id: int | None = None
    gpu_name: str | None = None
    dph_total: float | None = None
    failed_machines: list[int] = field(default_factory=list)  # never rent these again
    attempt_reasons: list[str] = field(default_factory=list)  # why each failed attempt ended
    stop_requested: bool = False
    exit_code: int | None = None
    inferred: bool = False  # image run unwrapped: the exit status is inferred
    final_state: str | None = None  # completed / failed / error / stopped, once decided
    reason: str | None = None
    adopted: bool = False  # re-created from an instance label after memory loss
    accepted_at: float | None = None
    phase_changed_at: float | None = None
    heartbeat_at: float | None = None  # last time a step of the chain worked on it
    waiting_since: float | None = None  # first time no offer matched
    instance_created_at: float | None = None
    running_since: float | None = None
    offline_since: float | None = None
    logs_published_at: float | None = None
    ended_at: float | None = None  # when the outcome was decided (the record entered finishing)
    log_size: int = 0
    instance_destroyed: bool = False
    final_reported: bool = False  # the final state is on Arkindex: the instance may go now
    task_gone: bool = False  # Arkindex answered 404 for the task: nothing to report, ever
    log_unread_since: float | None = None  # the ended instance's log could not be read since
    publish_failures: int = 0  # final log uploads that failed (bounded: settings)
    # The final log could not be published before the task was done: it is kept in Redis and
    # tried again (the sync loop resumes it) until it is.
    kept_log_pending: bool = False
    watch_chain: int = 0  # the one live watch chain of this attempt (older chains stop)
    start_status: str | None = None  # the instance's last status_msg while it starts
    progress_at: float | None = None  # when that status_msg last changed (pull progress)
    create_unknown_at: float | None = None  # a create of this attempt got no answer then
    # A create of this attempt was sent then: until the instance is recorded, a step of the
    # attempt run again (a worker killed, an error after Vast.ai's answer) treats it as one
    # that got no answer (Vast.ai's reads lag a create).
    create_sent_at: float | None = None
    # When this attempt's turn in the line of creates comes (steps.create_instance), while it
    # waits in Celery for it, and whether it came: a step of the attempt run again (retried,
    # resumed) then skips the line. Until the step's next look, the sync counts the wait as
    # progress, not a stall.
    create_turn_at: float | None = None
    create_turn_came: bool = False
    create_look_at: float | None = None  # when its step, waiting in Celery, looks again
    # The failed attempt's instance, kept *stopped* until the next attempt is created: between
    # two attempts it is the task's only trace outside Redis (see steps.retry_attempt).
    kept_instance_id: int | None = None
    # The budget (budget.py): the most its next instance may cost ($/h), granted by the sync
    # loop in arrival order (None: not granted yet, or no limit shared by all instances),
    # and the limit that set it; why the task waits, when it does (`held_by`: a limit name).
    budget_allowance: float | None = None
    allowance_limit: str | None = None
    held_by: str | None = None
    waiting_for: str | None = None
    bid: float | None = None  # the current instance's bid, $/h (None: on-demand)
    outbid_since: float | None = None  # its instance stopped by an outbid since (bidding.py)
    on_demand_only: bool = False  # an outbid lasted fallback_after: no more bids for it

    @classmethod
    def new(cls, task_id: str, now: float, **values: Any) -> TaskRecord:
        values.setdefault("accepted_at", now)
        values.setdefault("phase_changed_at", now)
        return cls(task_id=task_id, **values)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TaskRecord:
        known = {f.name for f in fields(cls)}
        # Unknown keys come from a newer agent version: ignore them rather than crash.
        return cls(**{k: v for k, v in data.items() if k in known})


# --------------------------------------------------------------------------- chain messages


#: Celery queues: `sync` runs only the loop, so that a backlog of chain steps never delays
#: it; `steps` runs every chain step. (The steps are not split by API: most of them call
#: both Vast.ai and Arkindex, so a split would isolate nothing.)
SYNC_QUEUE = "sync"
STEPS_QUEUE = "steps"
QUEUES = (SYNC_QUEUE, STEPS_QUEUE)
#: Headers of every chain message (loop.message_headers): the wall-clock time it was sent
#: (for the queue's age), and its place in the order of all chain messages, from one Redis
#: counter shared by every host (for the sync's hold: no host's clock decides it).
SENT_AT_HEADER = "ponos_sent_at"
SEQ_HEADER = "ponos_seq"


class StepName(StrEnum):
    """The steps of a task's chain (steps.py registers a function, queue and retry policy
    for each; tasks.py makes one Celery task `ponos.<name>` of each)."""

    START = "start"
    CHOOSE_OFFER = "choose_offer"
    CREATE_INSTANCE = "create_instance"
    WATCH = "watch"
    RETRY_ATTEMPT = "retry_attempt"
    PUBLISH_LOGS = "publish_logs"
    DESTROY_INSTANCE = "destroy_instance"
    REPORT_STATE = "report_state"
    STOP_TASK = "stop_task"
    ADOPT_INSTANCE = "adopt_instance"
    DESTROY_UNWANTED = "destroy_unwanted"
    PUBLISH_KEPT_LOG = "publish_kept_log"


@dataclass(frozen=True)
class Next:
    """Run `step` for the task after `countdown` seconds, with `kwargs` (ids and plain
    values only: Flower and the broker show them)."""

    step: StepName
    countdown: float = 0.0
    kwargs: dict = field(default_factory=dict)
