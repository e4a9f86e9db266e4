# -*- test-case-name: tests.slow.test_faults,tests.slow.test_criu -*-
"""
The moving parts of a real migration, for the tests that move a real
process with a real criu through real daemons (C{tests.slow.test_criu},
C{tests.slow.test_faults}).  The workload and criu itself are shared with
the demo and live in L{twisted_criu.testing}; they are re-exported here:

  - L{Workload} (L{twisted_criu.testing.workload}): the process to migrate.
    It checksums its own memory and appends C{"pid n sha256 verdict"} lines
    to a counter file; L{Workload.checkRunsOnce} is the exactly-once check
    (one live process runs it, with its pid, its memory intact, and one
    unbroken count).
  - L{ActionScript}, L{Criu}, L{CriuRun}, L{HOOK}, L{findCriu}
    (L{twisted_criu.testing.realcriu}): C{criu dump|restore --stream} as
    child processes, with an action script that runs C{twisted-criu-hook}
    and can hold criu at an action or make one fail.

Here:

  - L{DaemonProcess}: a C{twistd -n criu-proxy|criu-cache} that can be killed
    and started again (each start logs to its own file), optionally inside a
    L{NetworkNamespace} whose loopback is slowed down with C{tc}.
  - L{sessions}, L{restorable}: a daemon's sessions, from its control socket.
  - L{cutLink}: kill the TCP connections of the proxy -> cache link.

Every wait has a deadline; whatever is started here is stopped by the
caller's cleanups (L{Workload.kill}, L{DaemonProcess.kill},
L{CriuRun.kill}, L{NetworkNamespace.delete}, L{ActionScript.releaseAll}).
"""

from __future__ import annotations

import itertools
import json
import os
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any, Sequence

from twisted_criu.hook import unixConnection
from twisted_criu.testing.processes import TWISTD, childEnvironment, dieWithParent, tailOf, waitUntil
from twisted_criu.testing.realcriu import HOOK, ActionScript, Criu, CriuRun, findCriu
from twisted_criu.testing.workload import CounterLine, Workload

__all__ = [
    "HOOK", "RESTORABLE", "ActionScript", "CounterLine", "Criu", "CriuRun", "DaemonProcess",
    "NetworkNamespace", "Workload", "cutLink", "findCriu", "linkConnections", "restorable",
    "sessions", "tailOf", "waitUntil",
]

#: The cache's session states from which C{criu restore --stream} can
#: (still) restore.
RESTORABLE = frozenset({"delivered", "restoring", "failed-restore"})


# -- network namespaces ------------------------------------------------------------------


class NetworkNamespace:
    """
    A fresh network namespace (C{tcriu-PID-N}) with its loopback up, for
    daemons whose link should be slow: L{shape} puts a token bucket on its
    loopback.  criu and the workload stay outside: they reach the daemons
    through the UNIX sockets in the images directories.
    """

    _counter = itertools.count(1)

    def __init__(self) -> None:
        self.name = f"tcriu-{os.getpid()}-{next(self._counter)}"
        self.created = False

    def add(self) -> None:
        """C{ip netns add}; raises L{subprocess.CalledProcessError} if refused."""
        subprocess.run(["ip", "netns", "add", self.name], check=True, capture_output=True, timeout=30)
        self.created = True

    def setUp(self, rate: str, burst: str, latency: str) -> None:
        """Loopback up, shaped to C{rate}."""
        _check(["ip", "-n", self.name, "link", "set", "lo", "up"])
        _check(
            [*self.prefix, "tc", "qdisc", "add", "dev", "lo", "root", "tbf",
             "rate", rate, "burst", burst, "latency", latency]
        )

    @property
    def prefix(self) -> list[str]:
        """Run a command inside: C{ip netns exec NAME}."""
        return ["ip", "netns", "exec", self.name]

    def delete(self) -> None:
        if self.created:
            subprocess.run(["ip", "netns", "delete", self.name], capture_output=True, timeout=30)
            self.created = False


def _check(argv: Sequence[str]) -> str:
    result = subprocess.run(argv, capture_output=True, text=True, timeout=30)
    if result.returncode:
        raise AssertionError(f"{shlex.join(argv)} failed ({result.returncode}): {result.stderr.strip()}")
    return result.stdout


def linkConnections(port: int, netns: NetworkNamespace | None = None) -> int:
    """How many established TCP connections go to 127.0.0.1:C{port}."""
    prefix = netns.prefix if netns else []
    out = _check([*prefix, "ss", "-Htn", "state", "established", "dst", "127.0.0.1", "dport", "=", f":{port}"])
    return len(out.splitlines())


def cutLink(port: int, netns: NetworkNamespace | None = None) -> int:
    """
    Kill (C{ss -K}: a reset both ends see) the TCP connections to
    127.0.0.1:C{port}, the proxy -> cache link.

    @return: how many were killed.
    """
    prefix = netns.prefix if netns else []
    # ss may print "RTNETLINK answers: Invalid argument" for sockets it
    # cannot destroy; the sockets it lists are the ones it closed.
    result = subprocess.run(
        [*prefix, "ss", "-K", "-Htn", "dst", "127.0.0.1", "dport", "=", f":{port}"],
        capture_output=True, text=True, timeout=30,
    )
    return sum(1 for line in result.stdout.splitlines() if line.startswith("ESTAB"))


# -- the daemons -------------------------------------------------------------------------


class DaemonProcess:
    """
    C{twistd -n criu-proxy|criu-cache -D DIRECTORY ARGS...}, started with
    L{start} as often as wanted: start N logs to C{BASE/KIND-N.log}.  With a
    L{NetworkNamespace}, it runs inside it.
    """

    def __init__(
        self,
        kind: str,
        base: Path,
        directory: Path,
        args: Sequence[str],
        netns: NetworkNamespace | None = None,
    ) -> None:
        assert kind in ("criu-proxy", "criu-cache")
        self.kind = kind
        self.base = base
        self.directory = directory
        self.args = list(args)
        self.netns = netns
        self.process: subprocess.Popen[bytes] | None = None
        self.starts = 0

    @property
    def controlSocket(self) -> Path:
        name = "proxy-control.sock" if self.kind == "criu-proxy" else "cache-control.sock"
        return self.directory / name

    def logPath(self, start: int | None = None) -> Path:
        return self.base / f"{self.kind}-{start or self.starts}.log"

    def log(self, start: int | None = None) -> str:
        try:
            return self.logPath(start).read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def start(self, timeout: float = 30) -> None:
        """Start it (again) and wait until it is ready."""
        assert not self.running(), f"{self.kind} still runs"
        self.starts += 1
        prefix = self.netns.prefix if self.netns else []
        argv = [
            *prefix, sys.executable, "-c", TWISTD, "-n", "--pidfile=",
            f"--logfile={self.logPath()}", self.kind, "-D", str(self.directory), *self.args,
        ]
        with open(f"{self.logPath()}.out", "wb") as out:
            self.process = subprocess.Popen(
                argv,
                cwd=self.base,
                env=childEnvironment(),
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                preexec_fn=dieWithParent,
            )

        def ready() -> bool:
            if not self.running():
                raise AssertionError(f"{self.kind} exited before it was ready\n{self.describe()}")
            return "ready: accepting criu" in self.log()

        waitUntil(ready, timeout, f"{self.kind} to be ready")

    def running(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def waitForLog(self, text: str, timeout: float = 30) -> None:
        """Wait until the current start's log says C{text}."""

        def logged() -> bool:
            if not self.running():
                raise AssertionError(f"{self.kind} exited while waiting for {text!r} in its log")
            return text in self.log()

        waitUntil(logged, timeout, f"{self.kind} to log {text!r}", interval=0.02)

    def kill(self) -> None:
        """SIGKILL, and wait until it is gone."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def sessions(self) -> list[dict[str, Any]]:
        return sessions(self.controlSocket)

    def describe(self, lines: int = 30) -> str:
        parts = []
        for start in range(1, self.starts + 1):
            parts.append(tailOf(self.logPath(start), lines))
            parts.append(tailOf(Path(f"{self.logPath(start)}.out"), 10))
        if self.running():
            try:
                parts.append(f"{self.kind} sessions: {json.dumps(self.sessions())}\n")
            except Exception as e:
                parts.append(f"{self.kind} sessions: unavailable ({e})\n")
        return "".join(parts)


# -- the control API -----------------------------------------------------------------------


def sessions(controlSocket: Path, timeout: float = 10) -> list[dict[str, Any]]:
    """C{GET /sessions} from a daemon's control socket: its sessions."""
    connection = unixConnection(str(controlSocket), timeout)
    try:
        connection.request("GET", "/sessions")
        response = connection.getresponse()
        body = response.read()
    finally:
        connection.close()
    if response.status != 200:
        raise AssertionError(f"GET /sessions on {controlSocket}: {response.status} {body[:200]!r}")
    listing = json.loads(body)
    if isinstance(listing, dict):
        listing = listing["sessions"]
    return list(listing)


def restorable(controlSocket: Path) -> list[dict[str, Any]]:
    """The sessions C{criu restore --stream} could restore from."""
    return [s for s in sessions(controlSocket) if s.get("state") in RESTORABLE]
