"""The exit-code wrapper run on a Vast.ai instance (docs/reference.md §3, running the task).

Vast.ai does not report a container's exit code, and it restarts a container whose process
ends. So the task's command runs under a small POSIX ``sh`` script that:

1. runs the command (its argv is passed as positional parameters: no re-quoting);
2. prints one marker line ``PONOS_EXIT_CODE=<n> <nonce>`` when it ends (128+n when a signal
   killed it, which ``sh`` reports itself; the nonce is explained below);
3. asks Vast.ai to stop its own instance, ``PUT $VAST_URL/api/v0/instances/$CONTAINER_ID/``
   with ``{"state":"stopped"}`` and the per-instance key Vast.ai injects, trying curl, wget,
   python3 and python in turn (whichever the image has), a few rounds;
4. then sleeps forever, whether the stop call worked or not: exiting would make Vast.ai
   restart the container and run the task again.

The marker's nonce (issue 8, §2.6). The task's own output must not be able to decide its
outcome: a task that prints ``PONOS_EXIT_CODE=0`` (echoing a command, testing a wrapper, a
nested run) and then exits 3 must be reported failed. So the marker line is
``PONOS_EXIT_CODE=<n> <nonce>`` and the agent only accepts lines with the right nonce. The
nonce is ``HMAC-SHA256(farm seed, label)`` truncated (``marker_nonce``): new for every attempt
(the label names it), derivable by the agent at any time (nothing to store, it survives a loss
of Redis: adoption rebuilds the label), and the seed never reaches the instance.

Delivery keeps the nonce out of everything the task can read by ordinary means. It is not in
the instance's environment (``env``, ``/proc/*/environ``), nor in the task's argv. The
container starts ``sh -c STAGE1 ponos-task MAIN argv...``; STAGE1, the only text that holds
the nonce, at once ``exec``s ``sh -c MAIN ponos-task argv...`` with the nonce on its stdin
(a here-document), so by the time the task starts ``/proc/1/cmdline`` no longer shows it.
MAIN reads it into an unexported shell variable, gives the task ``/dev/null`` as stdin and
unsets the variable in the subshell that runs the task. The restart file (below) is named
after a public ``run_id``, not the nonce.

What this protects against: a task's ordinary output, including a task that prints a fake
marker line, its environment, its argv or ``ps`` output. What it does not: a task that
deliberately attacks its wrapper, by reading the shell's memory (``/proc/1/mem``, possible
for the same uid when the host's Yama ``ptrace_scope`` is 0), by asking Vast.ai for its own
instance's ``onstart``/``image_args`` with the ``CONTAINER_API_KEY`` it is given (if that key
may read them), or by writing the restart file and killing the container. The wrapper runs in the task's container
as the task's user: nothing it knows is out of a determined task's reach. Such a task can
only lie about its own exit code, which its author controls anyway.

Restarts: the wrapper cannot see the instance's history, but a restarted Docker container
keeps its file system. After the command ends the wrapper writes the exit code to
``/tmp/.ponos-exit-<run_id>`` (``run_id`` is new for every ``wrap_command`` call unless given,
so several local-mode instances on one host never share it). When the container is restarted
anyway (host reboot, the stop call lost), the wrapper finds that file, does NOT run the command
again, prints the same marker again (so the last marker still holds the real code) and retries
the stop. If the file system was lost too (or /tmp is not writable) the command does run again:
the wrapper cannot know, and the agent should treat a second run as its own problem (it
destroys an instance as soon as it has read a marker).

While the command runs, TERM/INT/HUP are trapped with a no-op: ``sh`` defers a trap until its
foreground command ends, so a stop request that reaches the wrapper first (base-worker images
stop their own instance in an exit hook) still lets the command finish and the marker print.
The command itself gets default signal dispositions (a non-empty trap is not inherited), and
runs in a subshell so that an argv starting with a shell builtin (``exit``, ``exec``, ``cd``)
cannot end or replace the wrapper.

Vast.ai limits ``onstart`` + ``args`` to 4096 characters in total, hence the terse script.
"""

import hashlib
import hmac
import re
import secrets
import shlex

MARKER = "PONOS_EXIT_CODE"
VAST_ARGS_LIMIT = 4096
DEFAULT_VAST_URL = "https://console.vast.ai"

# Works with Python 2 and 3 (old images ship only `python`); argv: url, key, body.
_PYTHON_PUT = """import sys
try:
 from urllib.request import Request,urlopen
except ImportError:
 from urllib2 import Request,urlopen
r=Request(sys.argv[1],sys.argv[3].encode(),{"Authorization":"Bearer "+sys.argv[2],"Content-Type":"application/json"})
r.get_method=lambda:"PUT"
try:
 urlopen(r,timeout=30).read()
except Exception as e:
 sys.exit("ponos-wrapper: "+repr(e))"""

# `|| return 1` style chains keep a missing tool from being an error.
# STAGE1: $1 is MAIN; the nonce goes to MAIN's stdin, so it leaves the process's argv.
_STAGE1 = """M=$1;shift;exec sh -c "$M" "$0" "$@" <<'E'
{nonce}
E
"""

# {run_id}: state file name, {attempts}: stop rounds, {delay}: seconds between rounds.
_SCRIPT = """read -r n;exec </dev/null
f=/tmp/.ponos-exit-{run_id}
if {{ read -r c <"$f"; }} 2>/dev/null && [ -n "$c" ]; then
echo "ponos-wrapper: container restarted after the task ended (exit code $c); not running it again" >&2
else
trap : TERM INT HUP
(n=;unset n;"$@")
c=$?
trap - TERM INT HUP
{{ echo "$c" >"$f"; }} 2>/dev/null
fi
printf '\\n{marker}=%s %s\\n' "$c" "$n"
P='{python}'
u="${{VAST_URL:-{vast_url}}}/api/v0/instances/$CONTAINER_ID/"
k="$CONTAINER_API_KEY"
b='{{"state":"stopped"}}'
s(){{
command -v curl >/dev/null && curl -fsS -m 30 -X PUT -H "Authorization: Bearer $k" -H 'Content-Type: application/json' -d "$b" "$u" >/dev/null && return 0
command -v wget >/dev/null && wget -q -O /dev/null -T 30 --method=PUT --header="Authorization: Bearer $k" --header='Content-Type: application/json' --body-data="$b" "$u" && return 0
for y in python3 python; do command -v $y >/dev/null && $y -c "$P" "$u" "$k" "$b" && return 0; done
return 1
}}
i=0
while [ -n "$CONTAINER_ID" ] && [ $i -lt {attempts} ]; do
s && {{ echo "ponos-wrapper: asked Vast.ai to stop instance $CONTAINER_ID" >&2; break; }}
i=$((i+1))
[ $i -lt {attempts} ] && sleep {delay}
done
[ $i -ge {attempts} ] || [ -z "$CONTAINER_ID" ] && echo "ponos-wrapper: could not stop this instance; sleeping so that it is not restarted" >&2
command -v sleep >/dev/null && exec sleep 2147483647
exec tail -f /dev/null
"""

NONCE_LENGTH = 32  # hex characters: 128 bits
_TOKEN = re.compile(r"[A-Za-z0-9_-]{1,64}")


def marker_nonce(seed: str, label: str) -> str:
    """The exit marker's nonce for one attempt: HMAC-SHA256(seed, label), truncated."""
    message = f"ponos-vast-exit-marker:{label}".encode()
    return hmac.new(seed.encode(), message, hashlib.sha256).hexdigest()[:NONCE_LENGTH]


class WrapperTooLong(ValueError):
    """The wrapped command does not fit in Vast.ai's 4096-character onstart + args limit."""


def wrap_command(
    argv: list[str],
    *,
    stop_attempts: int = 5,
    retry_delay: int = 5,
    nonce: str,
    run_id: str | None = None,
) -> tuple[str, list[str]]:
    """Return ``(onstart, args)`` for a Vast.ai ``runtype: "args"`` create call.

    ``onstart`` ("sh") overrides the image's entrypoint; ``args`` are
    ``["-c", STAGE1, "ponos-task", MAIN, *argv]`` ("ponos-task" is the scripts' ``$0``).
    ``nonce`` is the marker's (``marker_nonce``); ``run_id`` names the restart file.
    """
    if not argv:
        raise ValueError("wrap_command needs a non-empty argv")
    if stop_attempts < 1 or retry_delay < 0:
        raise ValueError("stop_attempts must be >= 1 and retry_delay >= 0")
    run_id = run_id or secrets.token_hex(8)
    for name, value in (("nonce", nonce), ("run_id", run_id)):
        if not isinstance(value, str) or not _TOKEN.fullmatch(value):
            raise ValueError(f"{name} must be 1-64 characters among A-Z a-z 0-9 _ -")
    script = _SCRIPT.format(
        run_id=run_id,
        marker=MARKER,
        python=_PYTHON_PUT,
        vast_url=DEFAULT_VAST_URL,
        attempts=int(stop_attempts),
        delay=int(retry_delay),
    )
    onstart = "sh"
    args = ["-c", _STAGE1.format(nonce=nonce), "ponos-task", script, *argv]
    total = len(onstart) + sum(len(arg) for arg in args)
    if total > VAST_ARGS_LIMIT:
        raise WrapperTooLong(
            f"wrapped command is {total} characters, Vast.ai accepts {VAST_ARGS_LIMIT}"
        )
    return onstart, args


def parse_exit_marker(log_text: str | bytes | None, nonce: str) -> int | None:
    """The exit code of the last ``PONOS_EXIT_CODE=<n> <nonce>`` line (alone on its line, with
    this attempt's nonce), or None. A marker without the nonce, or with another, is the task's
    own output and is ignored."""
    if not log_text or not nonce:
        return None
    if isinstance(log_text, bytes):
        log_text = log_text.decode("utf-8", errors="replace")
    line = re.compile(rf"^{MARKER}=(\d+) {re.escape(nonce)}[ \t\r]*$", re.MULTILINE)
    matches = line.findall(log_text)
    return int(matches[-1]) if matches else None


class UnsplittableCommand(ValueError):
    """A command a POSIX shell could not split into words (an unclosed quote)."""


def split_command(command: str) -> list[str]:
    """Split a task definition's command string like a POSIX shell would (no expansion)."""
    try:
        return shlex.split(command)
    except ValueError as error:
        raise UnsplittableCommand(f"the shell could not split it ({error})") from None


def is_wrapped(onstart: str | None, args=None) -> bool:
    """Whether an instance runs this wrapper (which prints the exit marker): it is in its
    onstart script or its arguments."""
    parts = [onstart or "", *(str(a) for a in (args or ()))]
    return any(MARKER in part for part in parts)
