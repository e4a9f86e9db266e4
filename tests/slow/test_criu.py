"""
A real migration with a real criu: C{criu dump --stream} through criu-proxy,
TCP on loopback, criu-cache, C{criu restore --stream}.

The criu binary comes from C{TWISTED_CRIU_CRIU} (C{admin/test} sets it from
C{admin/get-criu}) or from PATH.  criu needs root.  These tests fail, not
skip, when no working criu is available: C{admin/test --no-real-criu}
leaves the module out on a machine where criu cannot run.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from twisted.trial.unittest import SynchronousTestCase

#: The workload: holds MiB of random memory and appends "pid n sha256" to a
#: counter file every 0.2 s, the digest recomputed over that memory each time.
WORKLOAD = """
import hashlib, os, sys, time
memory = bytearray(os.urandom(int(sys.argv[2]) << 20))
n = 0
while True:
    n += 1
    with open(sys.argv[1], "a") as counter:
        counter.write(f"{os.getpid()} {n} {hashlib.sha256(memory).hexdigest()}\\n")
    time.sleep(0.2)
"""

TWISTD = [sys.executable, "-c", "import sys; from twisted.scripts.twistd import run; sys.exit(run())"]


def findCriu() -> str:
    criu = os.environ.get("TWISTED_CRIU_CRIU") or shutil.which("criu")
    if not criu:
        raise AssertionError(
            "no criu: run admin/get-criu and set TWISTED_CRIU_CRIU, or use"
            " admin/test --no-real-criu on a machine where criu cannot run"
        )
    return criu


def freePort() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def waitUntil(condition, timeout: float, what: str) -> None:  # type: ignore[no-untyped-def]
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.05)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


class RealCriuStreamTests(SynchronousTestCase):
    """Stock CRIU migrates a process through twisted-criu."""

    def setUp(self) -> None:
        self.criu = findCriu()
        self.base = Path(tempfile.mkdtemp(prefix="tcriu-"))
        self.addCleanup(shutil.rmtree, self.base, True)
        for name in ("src", "dst", "wl"):
            (self.base / name).mkdir()
        self.processes: list[subprocess.Popen[bytes]] = []
        self.restoredPid: int | None = None
        self.addCleanup(self._killAll)

    def _killAll(self) -> None:
        for process in self.processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
        if self.restoredPid is not None:
            try:
                os.kill(self.restoredPid, signal.SIGKILL)
            except ProcessLookupError:
                pass

    def _daemon(self, *args: str) -> subprocess.Popen[bytes]:
        name = args[0]
        log = self.base / f"{name}.log"
        process = subprocess.Popen(
            [*TWISTD, "-n", "--pidfile=", f"--logfile={log}", *args],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.STDOUT,
            cwd=self.base,
        )
        self.processes.append(process)
        return process

    def _criu(self, *args: str, timeout: float = 120) -> None:
        action, directory = args[0], args[-1]
        log = f"{action}.log"
        result = subprocess.run(
            [self.criu, *args[:-1], "-D", directory, "-o", log, "-v4"],
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout,
        )
        if result.returncode:
            tail = (Path(directory) / log).read_text(errors="replace")[-3000:]
            raise AssertionError(
                f"criu {action} failed ({result.returncode}):\n{result.stderr.decode()}\n{tail}"
            )

    def _lines(self, counter: Path) -> list[tuple[int, int, str]]:
        lines = []
        for line in counter.read_text().splitlines():
            parts = line.split()
            if len(parts) == 3:
                lines.append((int(parts[0]), int(parts[1]), parts[2]))
        return lines

    def migrate(self, mebibytes: int) -> None:
        src, dst, wl = self.base / "src", self.base / "dst", self.base / "wl"
        counter = wl / "counter.txt"
        (wl / "workload.py").write_text(WORKLOAD)
        workload = subprocess.Popen(
            [sys.executable, str(wl / "workload.py"), str(counter), str(mebibytes)],
            cwd=wl,
            stdin=subprocess.DEVNULL,
            stdout=open(wl / "out.log", "wb"),
            stderr=subprocess.STDOUT,
            start_new_session=True,  # criu dumps a session leader without --shell-job
        )
        self.processes.append(workload)
        waitUntil(lambda: counter.exists() and len(self._lines(counter)) >= 2, 60, "the workload")
        pid, _, digest = self._lines(counter)[0]

        port = str(freePort())
        cache = self._daemon("criu-cache", "--once", "--port", port, "-D", str(dst))
        proxy = self._daemon(
            "criu-proxy", "--once", "--address", "127.0.0.1", "--port", port, "-D", str(src)
        )
        for path in (dst / "streamer-serve.sock", src / "streamer-capture.sock"):
            waitUntil(path.exists, 30, str(path))

        self._criu("dump", "--stream", "-t", str(pid), str(src))
        workload.wait(30)  # reap it: its pid must be free for the restore
        waitUntil(lambda: not os.path.exists(f"/proc/{pid}"), 30, "the dumped task to go")
        before = self._lines(counter)[-1][1]
        self.assertEqual(proxy.wait(60), 0, "the proxy did not finish its session")

        self._criu("restore", "--stream", "-d", str(dst))
        self.restoredPid = pid
        self.assertEqual(cache.wait(60), 0, "the cache did not finish its session")
        waitUntil(lambda: self._lines(counter)[-1][1] >= before + 3, 60, "the restored counter")
        after = [line for line in self._lines(counter) if line[1] > before]
        self.assertEqual({line[0] for line in after}, {pid})  # same process, same pid
        self.assertEqual({line[2] for line in after}, {digest})  # memory intact
        self.assertEqual([line[1] for line in after], list(range(before + 1, before + 1 + len(after))))
        cacheLog = (self.base / "criu-cache.log").read_text()
        self.assertIn("session complete", cacheLog)

    def test_smallProcess(self) -> None:
        self.migrate(8)

    def test_256MiBProcess(self) -> None:
        self.migrate(256)
