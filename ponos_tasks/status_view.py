"""The terminal views of `ponos-vast status`, drawn with rich from overview.py's documents.

`render_status(doc)` and `render_task(doc)` are pure: a document in, a rich renderable out
(tests print it to a recording Console, no terminal needed). `watch()` is the only loop: it
reads a fresh document every `interval` seconds and redraws it in place (`status --watch`)
until Ctrl-C, showing the last good one with the error while Redis does not answer.
"""

from __future__ import annotations

import datetime as dt
import time
from collections.abc import Callable

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from ponos_tasks.overview import format_age

PHASE_STYLES = {
    "accepted": "yellow",
    "waiting_offer": "yellow",
    "retrying": "yellow",
    "creating": "cyan",
    "loading": "cyan",
    "running": "green",
    "finishing": "blue",
    "destroying": "blue",
    "done": "dim",
}
FINAL_STYLES = {"completed": "green", "failed": "red", "error": "bold red", "stopped": "magenta"}
LEVEL_STYLES = {"WARNING": "yellow", "ERROR": "bold red", "CRITICAL": "bold red"}
#: Finished tasks shown under the active ones (the most recent first); --json lists all.
MAX_FINISHED = 8
#: Ids longer than this are shown by their first SHORT_ID characters (`status` takes a prefix).
SHORT_ID = 8


def short_id(task_id: str) -> str:
    return task_id if len(task_id) <= SHORT_ID + 4 else task_id[:SHORT_ID]


def _money(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"${value:.{digits}f}"


def _dash(value) -> str:
    return "-" if value is None else str(value)


def _clock(at: float) -> str:
    return dt.datetime.fromtimestamp(at, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def header(doc: dict) -> Text:
    """Time of the view, age of the last sync (red when late) and the money."""
    sync, totals = doc["sync"], doc["totals"]
    text = Text()
    text.append("ponos-vast status", style="bold")
    text.append(f"  {_clock(doc['now'])}  ")
    last = sync["last_sync_age_s"]
    text.append(
        "Last sync: " + ("never" if last is None else f"{format_age(last)} ago"),
        style="bold red" if sync["stale"] else "green",
    )
    if sync["stale"]:
        text.append(f" (late: a sync is due every {sync['sync_interval_s']:g} s)", style="bold red")
    text.append("\n")
    text.append(
        f"Live instances: {totals['live_instances']}, spending ${totals['spend_per_hour']:.4f}/h",
        style="bold",
    )
    text.append(f"  ·  spend today ≈ ${totals['spend_today_usd']:.4f} (estimate)")
    asked, most = sync["asked_for_tasks"], sync["max_instances"]
    if asked is not None:
        text.append("\nCapacity: ")
        if asked:
            text.append(f"the last sync asked Arkindex for up to {asked} more task(s)")
        else:
            text.append("full: the last sync asked Arkindex for no task", style="yellow")
        text.append(f"; {totals['active_tasks']} active now, max_instances {_dash(most)}")
    phases = ", ".join(f"{p} {n}" for p, n in totals["tasks_per_phase"].items()) or "none"
    text.append(f"\nTasks per phase: {phases}")
    if totals["waiting_tasks"]:
        text.append(f"  ·  {totals['waiting_tasks']} waiting", style="yellow")
    return text


def _phase(phase: str) -> Text:
    return Text(phase, style=PHASE_STYLES.get(phase, ""))


def _detail(task: dict) -> Text:
    if task["phase"] == "done":
        final = task["final_state"] or ""
        text = Text(final, style=FINAL_STYLES.get(final, ""))
        if task["reason"]:
            text.append(f": {task['reason']}")
        return text
    return Text(task["detail"] or "", style="yellow" if task["waiting_reason"] else "")


def tasks_table(doc: dict, max_finished: int = MAX_FINISHED) -> Table:
    tasks = doc["tasks"]
    active = [t for t in tasks if t["phase"] != "done"]
    finished = [t for t in tasks if t["phase"] == "done"]
    shown_finished = finished[::-1][:max_finished]  # the most recent first
    table = Table(
        title=f"Tasks ({len(tasks)})",
        title_justify="left",
        expand=True,
        caption=(
            f"{len(finished) - len(shown_finished)} older finished task(s) not shown"
            if len(finished) > len(shown_finished)
            else None
        ),
        caption_justify="left",
    )
    for name, options in (
        ("task", {"no_wrap": True}),
        ("phase", {"no_wrap": True}),
        ("att", {"justify": "right"}),
        ("machine", {"no_wrap": True}),
        ("GPU", {"no_wrap": True}),
        ("$/h", {"justify": "right"}),
        ("age", {"justify": "right"}),
        ("in phase", {"justify": "right"}),
        ("spend", {"justify": "right"}),
        ("why it waits / what it does", {"ratio": 1, "overflow": "fold"}),
    ):
        table.add_column(name, **options)
    for task in active + shown_finished:
        table.add_row(
            short_id(task["id"]),
            _phase(task["phase"]),
            str(task["attempt"]),
            _dash(task["machine_id"]),
            _dash(task["gpu_name"]),
            _money(task["dph_total"], 3),
            format_age(task["age_s"]),
            format_age(task["age_in_phase_s"]),
            _money(task["spend_usd"]),
            _detail(task),
        )
    return table


def instances_table(doc: dict) -> Table:
    instances = doc["instances"]
    taken = doc["snapshot_age_s"]
    table = Table(
        title=f"Instances in the last snapshot ({len(instances)}, taken "
        + (f"{format_age(taken)} ago)" if taken is not None else "never)"),
        title_justify="left",
        expand=True,
    )
    for name, options in (
        ("instance", {"no_wrap": True}),
        ("task", {"no_wrap": True}),
        ("att", {"justify": "right"}),
        ("status", {"no_wrap": True}),
        ("machine", {"no_wrap": True}),
        ("GPU", {"no_wrap": True}),
        ("$/h", {"justify": "right"}),
        ("status message", {"ratio": 1, "overflow": "ellipsis", "no_wrap": True}),
    ):
        table.add_column(name, **options)
    for instance in instances:
        status = _dash(instance["actual_status"])
        if instance["intended_status"] and instance["intended_status"] != status:
            status += f" → {instance['intended_status']}"
        if not instance["live"]:
            status += " (destroyed)"
        table.add_row(
            _dash(instance["id"]),
            short_id(instance["task_id"]) if instance["task_id"] else _dash(instance["label"]),
            _dash(instance["attempt"]),
            Text(status, style="green" if instance["actual_status"] == "running" else ""),
            _dash(instance["machine_id"]),
            _dash(instance["gpu_name"]),
            _money(instance["dph_total"], 3),
            _dash(instance["status_msg"]),
        )
    return table


def render_status(doc: dict, *, max_finished: int = MAX_FINISHED) -> RenderableType:
    """The whole view: header and money, tasks (active first), instances, destroy counts."""
    parts: list[RenderableType] = [
        header(doc),
        tasks_table(doc, max_finished),
        instances_table(doc),
    ]
    destroyed = doc["totals"]["destroyed_by_cause"]
    if destroyed:
        parts.append(
            Text(
                "Destroyed by the sync loop: "
                + ", ".join(f"{c} {n}" for c, n in sorted(destroyed.items()))
            )
        )
    return Group(*parts)


def render_task(doc: dict) -> RenderableType:
    """One task: what it is now, then every decision the agent took for it, with times."""
    parts: list[RenderableType] = []
    title = Text(f"Task {doc['id']}", style="bold")
    row = doc["summary"]
    if row is None:
        title.append("  (no record: finished long ago, or unknown)", style="dim")
    else:
        title.append("  ")
        title.append_text(_phase(row["phase"]))
        title.append(
            f"  attempt {row['attempt']}  instance {_dash(row['instance_id'])}"
            f"  machine {_dash(row['machine_id'])}  {_dash(row['gpu_name'])}"
            f"  {_money(row['dph_total'], 3)}/h  age {format_age(row['age_s'])}"
            f"  spend {_money(row['spend_usd'])}"
        )
        detail = _detail(row)
        if detail.plain:
            title.append("\n")
            title.append_text(detail)
    parts.append(title)
    table = Table(title="Timeline", title_justify="left", expand=True)
    table.add_column("time (UTC)", no_wrap=True)
    table.add_column("+", justify="right", no_wrap=True)
    table.add_column("level", no_wrap=True)
    table.add_column("what the agent did", ratio=1, overflow="fold")
    entries = doc["timeline"]
    first = entries[0]["t"] if entries else 0.0
    for entry in entries:
        table.add_row(
            entry["time"].replace("T", " ").split("+")[0],
            format_age(entry["t"] - first),
            Text(entry["level"], style=LEVEL_STYLES.get(entry["level"], "")),
            entry["message"],
        )
    if doc["dropped_entries"]:
        table.caption = f"{doc['dropped_entries']} earlier entries dropped (500 are kept)"
    if not entries:
        table.caption = "no entry (kept 14 days after the last one)"
    parts.append(table)
    return Group(*parts)


def watch(
    read: Callable[[], dict],
    render: Callable[[dict], RenderableType],
    *,
    interval: float,
    console: Console | None = None,
    errors: tuple[type[BaseException], ...] = (),
    rounds: int | None = None,
) -> None:
    """Redraw `render(read())` every `interval` s until Ctrl-C (or `rounds` redraws). A read
    failing with one of `errors` keeps the last view on screen, under the error."""
    console = console or Console()
    last: RenderableType = Text("reading…")
    drawn = 0
    with Live(last, console=console, screen=True, auto_refresh=False) as live:
        try:
            while rounds is None or drawn < rounds:
                try:
                    last = render(read())
                    live.update(last, refresh=True)
                except errors as error:
                    failed = Text(f"cannot read the agent's state: {error}\n", style="bold red")
                    live.update(Group(failed, last), refresh=True)
                drawn += 1
                if rounds is None or drawn < rounds:
                    time.sleep(interval)
        except KeyboardInterrupt:
            pass
