# -*- test-case-name: tests.slow.test_packaging -*-
"""
Real C{twistd} daemons as child processes, for the demo and for tests.

L{Daemon} starts C{twistd -n criu-proxy|criu-cache} under this very
interpreter (with this copy of L{twisted_criu} importable), logging to files
in a work directory; L{waitForSockets} waits until daemons listen,
L{Daemon.wait} until one exits.  Every wait has a deadline
and a failure shows the daemon's log tail (L{DaemonError}).  L{freePort}
finds a loopback TCP port for the link; L{waitUntil} polls a condition
with a deadline.
"""

from __future__ import annotations

import ctypes
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, Sequence

import twisted_criu

#: twistd's console-script entry point, runnable with C{sys.executable -c}.
#: (C{python -m twisted.scripts.twistd} does nothing: the module has no
#: C{__main__} guard.)
TWISTD = "import sys; from twisted.scripts.twistd import run; sys.exit(run())"


class DaemonError(Exception):
    """A daemon failed; the message says how and shows its log's tail."""


def freePort() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def tail(path: str, lines: int = 25) -> str:
    """The last C{lines} lines of a text file (C{""} if it cannot be read)."""
    try:
        with open(path, "rb") as f:
            text = f.read().decode("utf-8", "replace")
    except OSError:
        return ""
    return "\n".join(text.rstrip("\n").splitlines()[-lines:])


def tailOf(path: Path, lines: int = 25) -> str:
    """L{tail} under a header naming the file (C{""} if it is empty or unreadable)."""
    text = tail(str(path), lines)
    return f"--- {path} ---\n{text}\n" if text else ""


def waitUntil(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll C{condition} until it is true; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def dieWithParent(signum: int = signal.SIGTERM) -> None:
    """In the child: get C{signum} if the parent dies, so no daemon outlives it."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        PR_SET_PDEATHSIG = 1
        libc.prctl(PR_SET_PDEATHSIG, signum, 0, 0, 0)
    except Exception:
        pass


def childEnvironment() -> dict[str, str]:
    """Our environment, with this copy of twisted_criu (and its dropin) first on the path."""
    env = dict(os.environ)
    here = os.path.dirname(os.path.dirname(os.path.abspath(twisted_criu.__file__)))
    path = env.get("PYTHONPATH")
    env["PYTHONPATH"] = here + (os.pathsep + path if path else "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


class Daemon:
    """
    A C{twistd -n} child process and its files.

    @ivar socketPath: the UNIX socket whose appearance means it is ready.
    @ivar logPath: twistd's log file; C{outPath} gets stdout and stderr.
    """

    def __init__(self, tapname: str, workDir: str, imagesDir: str, socketName: str) -> None:
        self.tapname = tapname
        self.imagesDir = imagesDir
        self.socketPath = os.path.join(imagesDir, socketName)
        self.logPath = os.path.join(workDir, f"{tapname}.log")
        self.outPath = os.path.join(workDir, f"{tapname}.out")
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, args: Sequence[str], cwd: str) -> None:
        """Start C{twistd -n TAPNAME ARGS...} in C{cwd}."""
        argv = [
            sys.executable, "-c", TWISTD, "-n", "--pidfile=",
            f"--logfile={self.logPath}", self.tapname, *args,
        ]
        with open(self.outPath, "wb") as out:
            try:
                self.process = subprocess.Popen(
                    argv,
                    cwd=cwd,
                    env=childEnvironment(),
                    stdin=subprocess.DEVNULL,
                    stdout=out,
                    stderr=subprocess.STDOUT,
                    preexec_fn=dieWithParent,
                    start_new_session=True,  # Ctrl-C reaches the parent, which cleans up
                )
            except OSError as e:
                raise DaemonError(f"{self.tapname} did not start: {e}") from None

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exitCode(self) -> int | None:
        """Its exit status, or C{None} while it runs (or before it started)."""
        return None if self.process is None else self.process.poll()

    def failure(self, what: str) -> DaemonError:
        """An error saying that this daemon C{what}, with its log tail."""
        parts = [f"{self.tapname} {what}"]
        for path in (self.logPath, self.outPath):
            text = tail(path)
            if text:
                parts.append(f"--- last lines of {path} ---\n{text}")
        return DaemonError("\n".join(parts))

    def wait(self, timeout: float) -> int | None:
        """Wait up to C{timeout} seconds for it to exit: its status, or C{None} if it still runs."""
        assert self.process is not None
        try:
            return self.process.wait(max(0.0, timeout))
        except subprocess.TimeoutExpired:
            return None

    def stop(self) -> None:
        """Terminate it if it still runs (SIGTERM, then SIGKILL)."""
        process = self.process
        if process is None or process.poll() is not None:
            return
        process.terminate()
        try:
            process.wait(5)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def waitForSockets(daemons: Sequence[Daemon], timeout: float) -> None:
    """
    Wait until every daemon's L{Daemon.socketPath} exists.

    @raise DaemonError: if one exits first, or C{timeout} seconds pass.
    """
    deadline = time.monotonic() + timeout
    pending = list(daemons)
    while pending:
        for daemon in list(pending):
            code = daemon.exitCode()
            if code is not None:
                raise daemon.failure(f"exited with code {code} before it was ready")
            if os.path.exists(daemon.socketPath):
                pending.remove(daemon)
        if pending and time.monotonic() > deadline:
            daemon = pending[0]
            raise daemon.failure(
                f"did not create {daemon.socketPath} within {timeout:g} s"
            )
        time.sleep(0.05)
