# -*- test-case-name: tests.slow.test_criu,tests.slow.test_criu_demo -*-
"""
The process a real migration moves (the demo's and the real-criu tests'):
a small Python program that holds MiB of random memory and appends
C{"pid n sha256 verdict"} to a counter file at a steady pace.

Each line's digest is recomputed over the whole memory, and the verdict is
the program's own comparison with the digest it computed when it started
(C{intact} or C{CHANGED}): a restored copy whose memory came back wrong
says so itself.  L{Workload.checkRunsOnce} is the exactly-once check.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable, NamedTuple

from twisted_criu.testing.processes import waitUntil

#: The program: holds MiB of random memory and appends "pid n sha256
#: verdict" to a counter file every INTERVAL seconds, the digest recomputed
#: over that memory each time (before the file is opened: the file is open
#: only while it writes).
WORKLOAD = """
import hashlib, os, sys, time
memory = bytearray(os.urandom(int(float(sys.argv[2]) * (1 << 20))))
interval = float(sys.argv[3])
first = hashlib.sha256(memory).hexdigest()
n = 0
while True:
    n += 1
    digest = hashlib.sha256(memory).hexdigest()
    verdict = "intact" if digest == first else "CHANGED"
    line = f"{os.getpid()} {n} {digest} {verdict}\\n"
    with open(sys.argv[1], "a") as counter:
        counter.write(line)
    time.sleep(interval)
"""


class CounterLine(NamedTuple):
    pid: int
    n: int
    digest: str
    #: C{intact} when the digest is the one the program computed at its start.
    verdict: str


def processesWhere(matches: Callable[[list[bytes]], bool]) -> list[int]:
    """The pids of the processes whose command line (its arguments, as bytes) C{matches}."""
    pids = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            argv = Path(entry.path, "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if matches(argv):
            pids.append(int(entry.name))
    return pids


def procState(pid: int | str) -> str | None:
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

    def __init__(self, directory: Path, mebibytes: float, interval: float = 0.2) -> None:
        self.directory = directory
        self.mebibytes = mebibytes
        self.interval = interval
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
                [sys.executable, str(self.script), str(self.counter), str(self.mebibytes), str(self.interval)],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def ready(self, timeout: float = 60) -> None:
        """Wait until it has counted twice; learn its pid and digest."""

        def counted() -> bool:
            if self.process is not None and self.process.poll() is not None:
                out = (self.directory / "out.log").read_text(errors="replace").strip()
                raise AssertionError(f"the workload exited ({self.process.returncode}): {out[-500:]}")
            return len(self.lines()) >= 2

        waitUntil(counted, timeout, "the workload's first lines")
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
            pid, n, digest, verdict = line.split()
            result.append(CounterLine(int(pid), int(n), digest, verdict))
        return result

    def last(self) -> int:
        """The last count written (0 before the first)."""
        lines = self.lines()
        return lines[-1].n if lines else 0

    def running(self) -> list[int]:
        """The pids of the live processes (not zombies) running this workload."""
        script = os.fsencode(self.script)
        return sorted(
            pid for pid in processesWhere(lambda argv: script in argv)
            if procState(pid) not in (None, "Z", "X")
        )

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
        waitUntil(lambda: procState(self.pid) is None, timeout, f"pid {self.pid} to be free")

    def waitForCount(self, count: int, timeout: float, interval: float = 0.05) -> float:
        """
        Wait until it has counted to C{count}.

        @return: the C{time.monotonic()} at which the line was first seen.
        """
        waitUntil(
            lambda: self.last() >= count,
            timeout,
            f"pid {self.pid} to count to {count} (at {self.last()})",
            interval=interval,
        )
        return time.monotonic()

    def checkRunsOnce(self, more: int = 3, timeout: float = 30) -> list[CounterLine]:
        """
        The exactly-once check: one live process runs the workload, with its
        pid; it counts C{more} lines further; and the whole counter file is
        one sequence 1, 2, 3... (no gap: the process ran on; no repeat: no
        second copy ever counted) written by that pid with that digest,
        which the process itself found intact on every line.

        @return: the counter's lines.
        """
        running = self.running()
        if running != [self.pid]:
            raise AssertionError(f"expected the workload to run once, as pid {self.pid}; running: {running}")
        state = procState(self.pid)
        if state not in ("R", "S", "D"):
            raise AssertionError(f"pid {self.pid} is in state {state}, not running")
        self.waitForCount(self.last() + more, timeout)
        lines = self.lines()
        strangers = sorted(
            {(line.pid, line.digest, line.verdict) for line in lines} - {(self.pid, self.digest, "intact")}
        )
        if strangers:
            raise AssertionError(
                f"counter lines not written by pid {self.pid} with digest {self.digest} (intact): {strangers}"
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
