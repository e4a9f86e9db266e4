# -*- test-case-name: tests.slow.test_faults,tests.slow.test_criu -*-
"""
The moving parts of a real migration, for the tests that move a real
process with a real criu through real daemons (C{tests.slow.test_criu},
C{tests.slow.test_faults}):

  - L{Workload}: the process to migrate.  It checksums its own memory and
    appends C{"pid n sha256"} lines to a counter file; L{Workload.checkRunsOnce}
    is the exactly-once check (one live process runs it, with its pid, its
    memory intact, and one unbroken count).
  - L{DaemonProcess}: a C{twistd -n criu-proxy|criu-cache} that can be killed
    and started again (each start logs to its own file), optionally inside a
    L{NetworkNamespace} whose loopback is slowed down with C{tc}.
  - L{ActionScript}: what criu gets as C{--action-script}: it logs each
    action, runs C{twisted-criu-hook} (L{HOOK}), and can hold criu at an
    action (before the hook) or make one fail (instead of the hook).
  - L{Criu}: C{criu dump|restore --stream} as child processes (L{CriuRun}).
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
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Callable, NamedTuple, Sequence

from twisted_criu.hook import unixConnection
from twisted_criu.testing.processes import TWISTD, childEnvironment, dieWithParent, tail

#: criu's action script from the transactional migration: installed beside
#: this interpreter.
HOOK = Path(sys.executable).parent / "twisted-criu-hook"

#: The cache's session states from which C{criu restore --stream} can
#: (still) restore.
RESTORABLE = frozenset({"delivered", "restoring", "failed-restore"})


def findCriu() -> str:
    """The criu to run: C{TWISTED_CRIU_CRIU}, else the one on PATH."""
    criu = os.environ.get("TWISTED_CRIU_CRIU") or shutil.which("criu")
    if not criu:
        raise AssertionError(
            "no criu: run admin/get-criu and set TWISTED_CRIU_CRIU, or use"
            " admin/test --no-real-criu on a machine where criu cannot run"
        )
    return criu


def waitUntil(condition: Callable[[], object], timeout: float, what: str, interval: float = 0.05) -> None:
    """Poll C{condition} until it is true; fail after C{timeout} seconds."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(interval)


def tailOf(path: Path, lines: int = 25) -> str:
    text = tail(str(path), lines)
    return f"--- {path} ---\n{text}\n" if text else ""


# -- the workload -------------------------------------------------------------------

#: The workload: holds MiB of random memory and appends "pid n sha256" to a
#: counter file every 0.2 s, the digest recomputed over that memory each
#: time (before the file is opened: the file is open only while it writes).
WORKLOAD = """
import hashlib, os, sys, time
memory = bytearray(os.urandom(int(sys.argv[2]) << 20))
n = 0
while True:
    n += 1
    line = f"{os.getpid()} {n} {hashlib.sha256(memory).hexdigest()}\\n"
    with open(sys.argv[1], "a") as counter:
        counter.write(line)
    time.sleep(0.2)
"""


class CounterLine(NamedTuple):
    pid: int
    n: int
    digest: str


def _procState(pid: int | str) -> str | None:
    """A process's state letter (R, S, T, Z...), or C{None} if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat[stat.rindex(")") + 2 :].split()[0]


class Workload:
    """
    The process to migrate: C{DIRECTORY/workload.py}, run as a session
    leader (criu dumps one without C{--shell-job}).

    @ivar pid: its pid, which a restore gives back.
    @ivar digest: the SHA-256 of its memory, the same for its whole life.
    """

    def __init__(self, directory: Path, mebibytes: int) -> None:
        self.directory = directory
        self.mebibytes = mebibytes
        self.script = directory / "workload.py"
        self.counter = directory / "counter.txt"
        self.process: subprocess.Popen[bytes] | None = None
        self.pid = 0
        self.digest = ""

    def start(self) -> None:
        """Start it; L{ready} waits for its first lines."""
        self.directory.mkdir(parents=True, exist_ok=True)
        self.script.write_text(WORKLOAD)
        with open(self.directory / "out.log", "wb") as out:
            self.process = subprocess.Popen(
                [sys.executable, str(self.script), str(self.counter), str(self.mebibytes)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self, timeout: float = 60) -> None:
        """Wait until it has counted twice; learn its pid and digest."""
        waitUntil(lambda: len(self.lines()) >= 2, timeout, "the workload's first lines")
        first = self.lines()[0]
        self.pid, self.digest = first.pid, first.digest

    def lines(self) -> list[CounterLine]:
        """The counter file's complete lines."""
        try:
            text = self.counter.read_text()
        except FileNotFoundError:
            return []
        result = []
        for line in text[: text.rfind("\n") + 1].splitlines():
            pid, n, digest = line.split()
            result.append(CounterLine(int(pid), int(n), digest))
        return result

    def last(self) -> int:
        """The last count written (0 before the first)."""
        lines = self.lines()
        return lines[-1].n if lines else 0

    def running(self) -> list[int]:
        """The pids of the live processes (not zombies) running this workload."""
        script = os.fsencode(self.script)
        pids = []
        for entry in os.scandir("/proc"):
            if not entry.name.isdigit():
                continue
            try:
                argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
            except OSError:
                continue
            if script in argv and _procState(entry.name) not in (None, "Z", "X"):
                pids.append(int(entry.name))
        return sorted(pids)

    def runsOnSource(self) -> bool:
        """The original process (our child) still runs."""
        return self.process is not None and self.process.poll() is None

    def reap(self, timeout: float = 30) -> None:
        """
        Once criu killed it on the source: reap our child, so that its pid
        is free for the restore, and wait until that pid is gone.
        """
        assert self.process is not None
        self.process.wait(timeout)
        self.waitPidFree(timeout)

    def waitPidFree(self, timeout: float = 30) -> None:
        """Wait until no process (not even a zombie) holds L{pid}."""
        waitUntil(lambda: _procState(self.pid) is None, timeout, f"pid {self.pid} to be free")

    def checkRunsOnce(self, more: int = 3, timeout: float = 30) -> list[CounterLine]:
        """
        The exactly-once check: one live process runs the workload, with its
        pid; it counts C{more} lines further; and the whole counter file is
        one sequence 1, 2, 3... (no gap: the process ran on; no repeat: no
        second copy ever counted) written by that pid with that digest
        (memory intact).

        @return: the counter's lines.
        """
        running = self.running()
        if running != [self.pid]:
            raise AssertionError(f"expected the workload to run once, as pid {self.pid}; running: {running}")
        state = _procState(self.pid)
        if state not in ("R", "S", "D"):
            raise AssertionError(f"pid {self.pid} is in state {state}, not running")
        count = self.last()
        waitUntil(
            lambda: self.last() >= count + more,
            timeout,
            f"pid {self.pid} to count {more} more lines (at {self.last()}, was {count})",
        )
        lines = self.lines()
        strangers = sorted({(line.pid, line.digest) for line in lines} - {(self.pid, self.digest)})
        if strangers:
            raise AssertionError(
                f"counter lines not written by pid {self.pid} with digest {self.digest}: {strangers}"
            )
        counts = [line.n for line in lines]
        if counts != list(range(1, len(counts) + 1)):
            repeats = sorted({n for n in counts if counts.count(n) > 1})
            gaps = sorted(set(range(1, max(counts) + 1)) - set(counts))
            raise AssertionError(
                f"the count is not one sequence: repeated {repeats[:10]} (two writers?),"
                f" missing {gaps[:10]}; tail {counts[-15:]}"
            )
        running = self.running()
        if running != [self.pid]:
            raise AssertionError(f"expected the workload to run once, as pid {self.pid}; running: {running}")
        return lines

    def kill(self) -> None:
        """Cleanup: our child and any restored copy."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)
        for pid in self.running():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def describe(self) -> str:
        lines = self.lines()
        return (
            f"workload pid {self.pid}: running {self.running()}, {len(lines)} lines,"
            f" last {[tuple(line[:2]) for line in lines[-5:]]}\n"
        )


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


# -- criu ---------------------------------------------------------------------------------------


_SCRIPT = """#!/bin/sh
# criu's --action-script in tests.slow.test_faults.  criu runs it for each
# action, named by CRTOOLS_SCRIPT_ACTION.  It logs the action; with
# $dir/pause-ACTION it waits (telling so with $dir/paused-ACTION) until
# that file is gone; with $dir/fail-ACTION it removes that file and fails
# the action; else it becomes the hook (exec: the hook's parent is criu,
# whose pid it keeps what pre-restore learns under for post-resume).
dir={dir}
hook={hook}
action=${{CRTOOLS_SCRIPT_ACTION:-}}
echo "$action" >>"$dir/actions.log"
if [ -e "$dir/pause-$action" ]; then
    : >"$dir/paused-$action"
    i=0
    while [ -e "$dir/pause-$action" ] && [ "$i" -lt 2400 ]; do
        sleep 0.05
        i=$((i + 1))
    done
fi
if [ -e "$dir/fail-$action" ]; then
    rm -f "$dir/fail-$action"
    echo "$action: failed on purpose" >>"$dir/actions.log"
    exit 1
fi
exec "$hook"
"""


class ActionScript:
    """
    criu's C{--action-script}: logs each action, then runs C{hook}
    (C{twisted-criu-hook}, or C{true} when C{hook} is C{None}); L{pause}
    holds criu at an action (before the hook runs), L{failOnce} fails one
    (instead of running the hook).
    """

    def __init__(self, directory: Path, hook: Path | None) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)
        self.path = directory / "action-script"
        self.logPath = directory / "actions.log"
        self.path.write_text(
            _SCRIPT.format(dir=shlex.quote(str(directory)), hook=shlex.quote(str(hook or "true")))
        )
        self.path.chmod(0o755)

    def actions(self) -> list[str]:
        """The actions criu ran the script for so far, in order."""
        try:
            text = self.logPath.read_text()
        except FileNotFoundError:
            return []
        return [line for line in text.splitlines() if line and ":" not in line]

    def pause(self, action: str) -> None:
        (self.directory / f"pause-{action}").touch()

    def failOnce(self, action: str) -> None:
        (self.directory / f"fail-{action}").touch()

    def waitFor(self, action: str, run: CriuRun, timeout: float = 60) -> None:
        """Wait until criu ran the script for C{action}."""

        def seen() -> bool:
            if action in self.actions():
                return True
            if run.process.poll() is not None:
                raise AssertionError(f"criu {run.action} exited ({run.process.returncode}) before {action}")
            return False

        waitUntil(seen, timeout, f"criu {run.action} to reach {action}", interval=0.02)

    def waitPaused(self, action: str, run: CriuRun, timeout: float = 60) -> None:
        """Wait until the script holds criu at C{action}."""

        def paused() -> bool:
            if (self.directory / f"paused-{action}").exists():
                return True
            if run.process.poll() is not None:
                raise AssertionError(
                    f"criu {run.action} exited ({run.process.returncode}) before pausing at {action}"
                )
            return False

        waitUntil(paused, timeout, f"criu {run.action} to pause at {action}", interval=0.02)

    def release(self, action: str) -> None:
        (self.directory / f"pause-{action}").unlink(missing_ok=True)

    def releaseAll(self) -> None:
        for path in self.directory.glob("pause-*"):
            path.unlink(missing_ok=True)

    def describe(self) -> str:
        return tailOf(self.logPath, 40)


class CriuRun:
    """One C{criu dump|restore} child process; its log is C{DIRECTORY/LOG}."""

    def __init__(self, action: str, process: subprocess.Popen[bytes], logPath: Path, outPath: Path) -> None:
        self.action = action
        self.process = process
        self.logPath = logPath
        self.outPath = outPath

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait(self, timeout: float = 120) -> int:
        """Its exit status; fails if it runs longer than C{timeout} seconds."""
        try:
            return self.process.wait(timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"criu {self.action} still runs after {timeout:g} s\n{self.describe()}")

    def logCount(self, text: str) -> int:
        """How many times C{text} is in its log so far."""
        try:
            return self.logPath.read_text(errors="replace").count(text)
        except FileNotFoundError:
            return 0

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)

    def describe(self, lines: int = 25) -> str:
        return tailOf(self.outPath, 10) + tailOf(self.logPath, lines)


class Criu:
    """Runs C{criu dump|restore --stream} (logs in the images directory, C{-v4})."""

    def __init__(self, binary: str, base: Path, actionScript: ActionScript | None = None) -> None:
        self.binary = binary
        self.base = base
        self.actionScript = actionScript
        self.runs: list[CriuRun] = []

    def start(self, action: str, directory: Path, *args: str) -> CriuRun:
        log = f"{action}-{sum(run.action == action for run in self.runs) + 1}.log"
        argv = [self.binary, action, "--stream", *args, "-D", str(directory), "-o", log, "-v4"]
        if self.actionScript is not None:
            argv += ["--action-script", str(self.actionScript.path)]
        outPath = self.base / f"criu-{log}.out"
        with open(outPath, "wb") as out:
            process = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT)
        run = CriuRun(action, process, directory / log, outPath)
        self.runs.append(run)
        return run

    def dump(self, directory: Path, pid: int) -> CriuRun:
        return self.start("dump", directory, "-t", str(pid))

    def restore(self, directory: Path) -> CriuRun:
        return self.start("restore", directory, "-d")

    def killAll(self) -> None:
        for run in self.runs:
            run.kill()

    def describe(self) -> str:
        return "".join(
            f"criu {run.action} (exit {run.process.returncode}):\n{run.describe()}" for run in self.runs
        )
