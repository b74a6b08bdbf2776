"""Local run mode: the instance's command as a real subprocess on this machine.

The process gets its own session so that stopping the instance kills the whole tree (a
shell and its children), as stopping a container would. Output lines are collected with
their simulated time by a reader thread; they become the instance log.
"""

import contextlib
import os
import signal
import subprocess
import threading
import time


class LocalProcess:
    def __init__(self, cmd: list[str], env: dict, now):
        self.cmd = cmd
        self._now = now  # callable -> simulated time
        self._lock = threading.Lock()
        self._lines: list[tuple[float, str]] = []
        self.proc = subprocess.Popen(
            cmd,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            text=True,
            errors="replace",
        )
        self._reader = threading.Thread(
            target=self._read, daemon=True, name=f"vast-sim-proc-{self.proc.pid}"
        )
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stdout:
            with self._lock:
                self._lines.append((self._now(), line.rstrip("\n")))
        self.proc.stdout.close()

    def lines(self) -> list[tuple[float, str]]:
        with self._lock:
            return list(self._lines)

    def finished(self) -> bool:
        """True once the process ended and all its output was read."""
        return self.proc.poll() is not None and not self._reader.is_alive()

    @property
    def returncode(self) -> int | None:
        return self.proc.returncode

    def kill(self, delay: float = 0.0, grace: float = 2.0) -> None:
        """SIGTERM the process group after `delay`, SIGKILL it `grace` seconds later (real).

        The delay stands for the host daemon receiving the stop a moment after the API
        answered: a process that stops its own instance still sees the answer.
        """
        if self.proc.poll() is not None:
            return

        def _finish():
            if delay > 0:
                time.sleep(delay)
            try:
                os.killpg(self.proc.pid, signal.SIGTERM)
            except ProcessLookupError:
                return
            try:
                self.proc.wait(timeout=grace)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()

        if delay > 0 or grace > 0:
            threading.Thread(target=_finish, daemon=True).start()
        else:
            _finish()

    def crash(self) -> None:
        """SIGKILL the whole process group at once: the container died (host crash, OOM kill
        of the container), so nothing inside gets to print anything more."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)

    def wait(self, timeout: float) -> None:
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        self._reader.join(timeout=1)
