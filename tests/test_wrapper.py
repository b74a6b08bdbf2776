"""The exit-code wrapper, run for real by /bin/sh, dash and bash against a local HTTP server
that plays Vast.ai's `PUT /api/v0/instances/<id>/` (only that call matters to the wrapper)."""

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from ponos_tasks.wrapper import (
    NONCE_LENGTH,
    VAST_ARGS_LIMIT,
    WrapperTooLong,
    marker_nonce,
    parse_exit_marker,
    split_command,
    wrap_command,
)

SHELLS = [path for path in ("/bin/sh", shutil.which("dash"), shutil.which("bash")) if path]
SHELLS = list(dict.fromkeys(os.path.realpath(p) for p in SHELLS))  # /bin/sh is often dash
SLEEP = shutil.which("sleep")
PYTHON = os.path.realpath(sys.executable)
NONCE = marker_nonce("test-seed", "ponos-abc-task-1")


def parse(text, nonce=NONCE):
    return parse_exit_marker(text, nonce)


class StopServer:
    """Records every PUT; answers `status` (200 by default)."""

    def __init__(self):
        self.calls = []
        self.status = 200
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_PUT(self):
                length = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(length)
                outer.calls.append({"path": self.path, "headers": dict(self.headers), "body": body})
                payload = b'{"success": true}'
                self.send_response(outer.status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, args=(0.05,), daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server():
    srv = StopServer()
    yield srv
    srv.close()


def bin_dir(tmp_path, name: str, **tools: str) -> str:
    """A PATH directory holding only `sleep` and the given tools (name -> target)."""
    directory = tmp_path / name
    directory.mkdir()
    os.symlink(SLEEP, directory / "sleep")
    for tool, target in tools.items():
        os.symlink(target, directory / tool)
    return str(directory)


FULL_PATH = "/usr/local/bin:/usr/bin:/bin"
SH_DIRS: dict[str, str] = {}  # shell -> a directory holding only `sh` -> that shell
END_LINES = ("asked Vast.ai to stop", "could not stop this instance", "not running it again")


def run_wrapped(
    shell,
    argv,
    *,
    path=FULL_PATH,
    server=None,
    container_id="4242",
    nonce=NONCE,
    run_id=None,
    attempts=2,
    delay=0,
    during=None,
    timeout=15,
):
    """Run the wrapper until it reaches its final sleep; returns (stdout, stderr).

    It must still be alive then (sleeping so Vast.ai does not restart it); it is killed after.
    `during(proc)` is called once the process started.
    """
    # "test..." run ids: the state files they leave in /tmp are removed after each test.
    run_id = run_id or f"test{uuid.uuid4().hex}"
    onstart, args = wrap_command(
        argv, stop_attempts=attempts, retry_delay=delay, nonce=nonce, run_id=run_id
    )
    assert onstart == "sh"
    # The first stage re-executes `sh` from PATH (as Vast.ai ran `onstart`): this shell.
    sh_dir = SH_DIRS.setdefault(shell, tempfile.mkdtemp(prefix="ponos-sh-"))
    if not os.path.exists(os.path.join(sh_dir, "sh")):
        os.symlink(shell, os.path.join(sh_dir, "sh"))
    env = {"PATH": f"{sh_dir}:{path}", "CONTAINER_API_KEY": "inst-key-123"}
    if server is not None:
        env["VAST_URL"] = server.url
    if container_id is not None:
        env["CONTAINER_ID"] = container_id
    proc = subprocess.Popen(
        [shell, *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        start_new_session=True,
    )
    out_chunks, err_chunks = [], []
    readers = [
        threading.Thread(target=lambda s=s, c=c: c.append(s.read()), daemon=True)
        for s, c in ((proc.stdout, out_chunks), (proc.stderr, err_chunks))
    ]
    for reader in readers:
        reader.start()
    try:
        if during:
            during(proc)
        # The end lines are on stderr, which we only get whole at exit: poll the process
        # tree instead: the wrapper is done when it has exec'd into `sleep 2147483647`.
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                cmdline = Path(f"/proc/{proc.pid}/cmdline").read_bytes()
            except FileNotFoundError:
                break
            if cmdline.split(b"\0")[:2] == [b"sleep", b"2147483647"]:
                break
            if proc.poll() is not None:
                break
            time.sleep(0.02)
        assert proc.poll() is None, "the wrapper must not exit (Vast.ai would restart it)"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        for reader in readers:
            reader.join(timeout=10)
    return out_chunks[0].decode(), err_chunks[0].decode()


@pytest.fixture(autouse=True)
def _clean_state_files():
    yield
    for name in os.listdir("/tmp"):
        if name.startswith(".ponos-exit-test"):
            os.unlink(os.path.join("/tmp", name))


@pytest.mark.parametrize("shell", SHELLS)
@pytest.mark.parametrize(
    ("script", "code"),
    [("exit 0", 0), ("exit 1", 1), ("kill -9 $$", 137), ("kill -TERM $$", 143)],
)
def test_exit_codes_marker_and_stop_call(shell, script, code, server):
    out, err = run_wrapped(shell, ["/bin/sh", "-c", f"echo working; {script}"], server=server)
    assert "working\n" in out
    assert out.count("PONOS_EXIT_CODE=") == 1
    assert parse(out) == code
    assert "asked Vast.ai to stop instance 4242" in err
    assert len(server.calls) == 1
    call = server.calls[0]
    assert call["path"] == "/api/v0/instances/4242/"
    assert json.loads(call["body"]) == {"state": "stopped"}
    assert call["headers"]["Authorization"] == "Bearer inst-key-123"
    assert call["headers"]["User-Agent"].startswith("curl/")


ODD_ARGS = ["a b", "it's", 'say "hi"', "$HOME `id` $(id)", "line1\nline2", "", "*", "\\", "-c"]


@pytest.mark.parametrize("shell", SHELLS)
def test_arguments_reach_the_command_unchanged(shell, server):
    code = "import sys, json; print(json.dumps(sys.argv[1:]))"
    out, _ = run_wrapped(shell, [PYTHON, "-c", code, *ODD_ARGS], server=server)
    assert json.loads(out.splitlines()[0]) == ODD_ARGS
    assert parse(out) == 0


def test_builtin_as_command_cannot_end_the_wrapper(server):
    out, err = run_wrapped("/bin/sh", ["exit", "7"], server=server)
    assert parse(out) == 7
    assert len(server.calls) == 1


def test_marker_after_output_without_final_newline(server):
    # A lookalike printed by the task without a newline must not glue to the real marker.
    out, _ = run_wrapped(
        "/bin/sh", ["/bin/sh", "-c", "printf PONOS_EXIT_CODE=0; exit 4"], server=server
    )
    assert parse(out) == 4


def test_command_not_found_is_127(server):
    out, _ = run_wrapped("/bin/sh", ["/nonexistent/worker", "--flag"], server=server)
    assert parse(out) == 127


@pytest.mark.parametrize(
    ("tools", "agent"),
    [
        ({"curl": shutil.which("curl")}, "curl/"),
        ({"wget": shutil.which("wget")}, "Wget/"),
        ({"python3": PYTHON}, "Python-urllib/"),
        ({"python": PYTHON}, "Python-urllib/"),
    ],
    ids=["curl", "wget", "python3", "python"],
)
def test_each_http_tool_alone_can_stop(tools, agent, server, tmp_path):
    if not all(tools.values()):
        pytest.skip(f"{list(tools)} not installed here")
    path = bin_dir(tmp_path, "bin", **tools)
    out, err = run_wrapped("/bin/sh", ["exit", "3"], path=path, server=server)
    assert parse(out) == 3
    assert len(server.calls) == 1, err
    call = server.calls[0]
    assert call["headers"]["User-Agent"].startswith(agent)
    assert call["path"] == "/api/v0/instances/4242/"
    assert json.loads(call["body"]) == {"state": "stopped"}
    assert call["headers"]["Authorization"] == "Bearer inst-key-123"


def test_a_failing_tool_falls_through_to_the_next(server, tmp_path):
    broken = tmp_path / "broken-curl"
    broken.write_text("#!/bin/sh\necho 'curl: broken' >&2\nexit 7\n")
    broken.chmod(0o755)
    path = bin_dir(tmp_path, "bin", curl=str(broken), python3=PYTHON)
    out, err = run_wrapped("/bin/sh", ["exit", "0"], path=path, server=server)
    assert "curl: broken" in err
    assert [c["headers"]["User-Agent"].split("/")[0] for c in server.calls] == ["Python-urllib"]


def test_no_http_tool_sleeps_forever(server, tmp_path):
    path = bin_dir(tmp_path, "bin")
    out, err = run_wrapped("/bin/sh", ["exit", "2"], path=path, server=server)
    assert parse(out) == 2
    assert server.calls == []
    assert "could not stop this instance" in err


def test_failed_stop_is_retried_then_sleeps(server, tmp_path):
    server.status = 500
    path = bin_dir(tmp_path, "bin", curl=shutil.which("curl"))
    out, err = run_wrapped("/bin/sh", ["exit", "0"], path=path, server=server, attempts=3)
    assert parse(out) == 0
    assert len(server.calls) == 3
    assert "could not stop this instance" in err


def test_no_container_id_makes_no_call(server):
    out, err = run_wrapped("/bin/sh", ["exit", "0"], server=server, container_id=None)
    assert parse(out) == 0
    assert server.calls == []
    assert "could not stop this instance" in err


def test_unreachable_vast_url_then_sleeps(tmp_path):
    from tests.conftest import free_port

    class Nowhere:
        url = f"http://127.0.0.1:{free_port()}"

    path = bin_dir(tmp_path, "bin", curl=shutil.which("curl"))
    out, err = run_wrapped("/bin/sh", ["exit", "0"], path=path, server=Nowhere, attempts=1)
    assert parse(out) == 0
    assert "could not stop this instance" in err


@pytest.mark.parametrize("shell", SHELLS)
def test_stop_signal_during_the_command_still_gives_its_code(shell, server):
    # base-worker images stop their own instance in an exit hook: the stop may reach the
    # wrapper before the command is done; the wrapper must still print the command's code.
    def send_term(proc):
        time.sleep(0.2)
        os.kill(proc.pid, signal.SIGTERM)

    out, _ = run_wrapped(
        shell, ["/bin/sh", "-c", "sleep 0.6; exit 5"], server=server, during=send_term
    )
    assert parse(out) == 5


def test_restarted_container_does_not_run_the_task_again(server, tmp_path):
    runs = tmp_path / "runs"
    argv = ["/bin/sh", "-c", f"echo run >> {runs}; exit 3"]
    run_id = f"test{os.getpid()}"
    first, _ = run_wrapped("/bin/sh", argv, server=server, run_id=run_id)
    second, err = run_wrapped("/bin/sh", argv, server=server, run_id=run_id)
    assert runs.read_text() == "run\n"
    assert parse(first) == parse(second) == 3
    assert "not running it again" in err
    assert len(server.calls) == 2  # the stop is asked again


def test_fits_vast_limit_and_rejects_too_long():
    onstart, args = wrap_command(["worker"], nonce=NONCE)
    assert len(onstart) + sum(map(len, args)) < 2000  # room left for the task's own argv
    with pytest.raises(WrapperTooLong):
        wrap_command(["x" * VAST_ARGS_LIMIT], nonce=NONCE)
    with pytest.raises(ValueError):
        wrap_command([], nonce=NONCE)
    with pytest.raises(ValueError):
        wrap_command(["x"], nonce="../etc")
    with pytest.raises(ValueError):
        wrap_command(["x"], nonce=NONCE, run_id="../etc")
    with pytest.raises(TypeError):
        wrap_command(["x"])  # no marker without a nonce


def test_run_id_differs_per_call_and_the_nonce_is_only_in_the_first_stage():
    first, second = wrap_command(["w"], nonce=NONCE)[1], wrap_command(["w"], nonce=NONCE)[1]
    assert first[3] != second[3]  # MAIN names a fresh restart file
    assert wrap_command(["w"], nonce=NONCE, run_id="r1") == wrap_command(
        ["w"], nonce=NONCE, run_id="r1"
    )
    # What stays in the process's argv once the first stage has exec'd: no nonce.
    assert NONCE in first[1] and all(NONCE not in arg for arg in first[2:])


def test_marker_nonce_is_per_attempt_and_keyed_by_the_seed():
    nonce = marker_nonce("seed-1", "ponos-abc-7-1")
    assert len(nonce) == NONCE_LENGTH and nonce == marker_nonce("seed-1", "ponos-abc-7-1")
    assert nonce != marker_nonce("seed-1", "ponos-abc-7-2")
    assert nonce != marker_nonce("seed-2", "ponos-abc-7-1")


@pytest.mark.parametrize(
    ("text", "code"),
    [
        ("", None),
        (None, None),
        ("hello\nPONOS_EXIT_CODE=0 N\n", 0),
        ("PONOS_EXIT_CODE=1 N\nmore\nPONOS_EXIT_CODE=2 N\n", 2),
        ("PONOS_EXIT_CODE=137 N\r\n", 137),
        (b"\xff\xfe junk\nPONOS_EXIT_CODE=9 N", 9),
        ("echo PONOS_EXIT_CODE=0 N\n", None),
        ("xPONOS_EXIT_CODE=0 N\n", None),
        ("PONOS_EXIT_CODE=0 N and more\n", None),
        ("PONOS_EXIT_CODE= N\n", None),
        ("PONOS_EXIT_CODE=-1 N\n", None),
        ("\x1b[32mPONOS_EXIT_CODE=0 N\x1b[0m\n", None),
        ("PONOS_EXIT_CODE=4 N\nprinted by the task: PONOS_EXIT_CODE=0 N\n", 4),
        # The task's own markers: without the nonce, with another one, or a prefix of it.
        ("PONOS_EXIT_CODE=0\n", None),
        ("PONOS_EXIT_CODE=3 N\nPONOS_EXIT_CODE=0\n", 3),
        ("PONOS_EXIT_CODE=3 N\nPONOS_EXIT_CODE=0 0123456789abcdef0123456789abcdef\n", 3),
        ("PONOS_EXIT_CODE=0 N[:8]\n", None),
        ("PONOS_EXIT_CODE=0 NN\n", None),
    ],
)
def test_parse_exit_marker(text, code):
    if isinstance(text, str):
        text = text.replace("N[:8]", NONCE[:8]).replace(" N", " " + NONCE)
    elif isinstance(text, bytes):
        text = text.replace(b" N", b" " + NONCE.encode())
    assert parse(text) == code
    assert parse_exit_marker(text, "") is None


def test_split_command():
    assert split_command("worker-run --config 'a b.yml' \"x y\"") == [
        "worker-run",
        "--config",
        "a b.yml",
        "x y",
    ]
    assert split_command("") == []
    with pytest.raises(ValueError):
        split_command("unterminated 'quote")


def test_wrapped_task_under_the_vast_simulator_local_mode():
    """The wrapper in a simulated Vast.ai instance (a real local process): the marker reaches
    the instance log and the instance stops itself with its own CONTAINER_API_KEY."""
    from ponos_tasks.simulators.vast import VastSimulator
    from ponos_tasks.vast import VastClient

    with VastSimulator(time_scale=50.0, run_mode="local", log_delay=0.5, rate_limits=False) as sim:
        client = VastClient(sim.url, "sim-key")
        offer = client.search_offers({"num_gpus": {"eq": 1}, "limit": 1})[0]
        onstart, args = wrap_command(
            [
                PYTHON,
                "-c",
                "import sys; print('task output', sys.argv[1:]); sys.exit(3)",
                "it's",
                "$X",
            ],
            retry_delay=1,
            nonce=NONCE,
            run_id=f"test{uuid.uuid4().hex}",
        )
        created = client.create_instance(
            offer.id,
            image="example/worker:1",
            label="wrap-e2e",
            env={"SIM_PULL_SECONDS": "1"},
            disk=10,
            onstart=onstart,
            args=args,
        )
        deadline = time.monotonic() + 20
        instance = None
        while time.monotonic() < deadline:
            instance = client.get_instance(created.id)
            if instance and instance.intended_status == "stopped":
                break
            time.sleep(0.1)
        assert instance is not None and instance.intended_status == "stopped", instance
        log = client.request_logs(created.id, wait=10)
        assert "task output [\"it's\", '$X']" in log
        assert parse(log) == 3
        client.destroy_instance(created.id)


# A task that reads every ancestor's argv and environment, and its own, as ordinary output.
SNOOP = r"""
import os
pid = os.getpid()
while pid > 1:
    for name in ("cmdline", "environ"):
        try:
            with open(f"/proc/{pid}/{name}", "rb") as f:
                print(name, pid, f.read().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            pass
    with open(f"/proc/{pid}/stat") as f:
        pid = int(f.read().rsplit(")", 1)[1].split()[1])
print("env", dict(os.environ))
"""


@pytest.mark.parametrize("shell", SHELLS)
def test_the_task_cannot_read_the_nonce_from_argv_or_environment(shell, server):
    out, _ = run_wrapped(shell, [PYTHON, "-c", SNOOP], server=server)
    assert "cmdline" in out and "environ" in out and "env {" in out
    # Only the wrapper's own marker line holds it, after the task ended.
    assert out.count(NONCE) == 1 and out.rstrip().endswith(f"PONOS_EXIT_CODE=0 {NONCE}")
    assert parse(out) == 0


def test_eval_as_command_cannot_read_the_nonce(server):
    # A builtin as argv[0] runs inside the wrapper's subshell: the variable is unset there.
    out, _ = run_wrapped("/bin/sh", ["eval", 'echo "PONOS_EXIT_CODE=0 $n"; exit 3'], server=server)
    assert parse(out) == 3


def test_spoofed_marker_under_the_vast_simulator_local_mode():
    """Issue 8 §2.6: `echo PONOS_EXIT_CODE=0; sleep; exit 3` in a simulated instance (a real
    local process). Read while it runs and after, the agent's parsing never gives 0."""
    from ponos_tasks.simulators.vast import VastSimulator
    from ponos_tasks.vast import LogsNotReady, VastClient

    with VastSimulator(time_scale=50.0, run_mode="local", log_delay=0.5, rate_limits=False) as sim:
        client = VastClient(sim.url, "sim-key")
        offer = client.search_offers({"num_gpus": {"eq": 1}, "limit": 1})[0]
        spoof = f"echo PONOS_EXIT_CODE=0; echo PONOS_EXIT_CODE=0 {NONCE[:-1]}x; sleep 15; exit 3"
        onstart, args = wrap_command(
            ["/bin/sh", "-c", spoof], retry_delay=1, nonce=NONCE, run_id=f"test{uuid.uuid4().hex}"
        )
        created = client.create_instance(
            offer.id,
            image="example/worker:1",
            label="spoof",
            env={"SIM_PULL_SECONDS": "1"},
            disk=10,
            onstart=onstart,
            args=args,
        )
        codes, logs = [], []
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            instance = client.get_instance(created.id)  # None while Vast.ai's reads lag
            stopped = instance is not None and instance.intended_status == "stopped"
            try:
                logs.append(client.request_logs(created.id, wait=3))
            except LogsNotReady:  # Vast.ai's log uploads lag, sometimes by minutes
                continue
            codes.append(parse(logs[-1]))
            if stopped:
                break
        client.destroy_instance(created.id)
    assert any("PONOS_EXIT_CODE=0" in log for log in logs[:-1]), (
        "the spoof was never read",
        codes,
        logs[-1:],
    )
    assert 0 not in codes, codes
    assert codes[-1] == 3, codes
