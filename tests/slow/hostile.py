# -*- test-case-name: tests.slow.test_attacks -*-
"""
The daemons, the attacker and the measurements of C{tests.slow.test_attacks}.

L{AttackCase} starts a C{twistd criu-cache} and a C{twistd criu-proxy} in a
fresh directory (every command line from L{daemonArgs}) and runs the
legitimate migration around an attack: a dump with the protocol client,
its delivery, then a restore that reads every image back byte-exact.
L{attack} and L{spawn} run C{tests/slow/attacker.py} as C{nobody}.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Sequence

from twisted.trial.unittest import SynchronousTestCase

from tests.slow import test_process_failures as pf
from tests.slow.migration import DaemonProcess, sessions
from tests.slow.test_operations import command
from twisted_criu.testing.criu import LocalImageClient

MiB = 1 << 20
SNAP = pf.SNAP
STEP = pf.STEP
NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
NOGROUP = 65534
ATTACKER = Path(__file__).with_name("attacker.py")
#: A line an attacker would like to see in a daemon's log, after a newline.
FORGED = "2026-01-01T00:00:00+0000 [twisted_criu#critical] FORGED"


def daemonArgs(base: Path, kind: str, port: int, shared: bool, extra: Sequence[str]) -> list[str]:
    """
    The command line (after C{-D DIR}) of every daemon this suite starts:
    the one place for the link's authentication flags (a key file shared by
    both daemons would go in C{base}, the suite's work directory).

    @param shared: share the UNIX sockets with the group (C{--socket-mode 660}).
    """
    args = ["--address", "127.0.0.1", "--port", str(port)]
    if shared:
        args += ["--socket-mode", "660"]
    return [*args, *extra]


def waitForLog(daemon: DaemonProcess, pattern: str, count: int = 1, timeout: float = STEP) -> re.Match[str]:
    """Wait until C{pattern} matches C{count} times in C{daemon}'s log."""
    deadline = time.monotonic() + timeout
    while True:
        matches = list(re.finditer(pattern, daemon.log()))
        if len(matches) >= count:
            return matches[count - 1]
        if not daemon.running() or time.monotonic() > deadline:
            raise AssertionError(f"{daemon.kind} did not log {pattern!r} ({count}x)\n{daemon.describe()}")
        time.sleep(0.02)


def attack(*args: str, user: Sequence[str] = NOBODY) -> dict[str, Any]:
    """Run the attacker (as C{nobody} by default) to its end: its report."""
    result = subprocess.run(
        [*user, sys.executable, str(ATTACKER), *args], capture_output=True, text=True, timeout=120
    )
    if result.returncode:
        raise AssertionError(f"attacker {args[:2]} failed: {result.stderr}")
    return lastReport(result.stdout)


def vm(pid: int, field: str) -> int:
    """C{VmRSS} or C{VmHWM} of a process, in bytes."""
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} for {pid}")


def cpuSeconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def descriptors(pid: int) -> dict[int, str]:
    result = {}
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            result[int(name)] = os.readlink(f"/proc/{pid}/fd/{name}")
        except FileNotFoundError:
            pass
    return result


class Sampler:
    """The largest descriptor count of a process, sampled in a thread until L{stop}."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = len(descriptors(pid))
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, len(os.listdir(f"/proc/{self.pid}/fd")))

    def stop(self) -> int:
        self._stop.set()
        self._thread.join(10)
        return self.peak


def twistedCriu(*argv: str) -> str:
    """C{twisted-criu ARGV...} as root runs it: its output (it must succeed)."""
    result = command(*argv)
    if result.returncode:
        raise AssertionError(f"twisted-criu {argv[0]} failed: {result.stderr}")
    return result.stdout + result.stderr


def images(tag: str) -> dict[str, bytes]:
    """A dump's images: criu's usual names, random bytes."""
    return {
        "inventory.img": pf.randomBytes(44, (tag, "inventory")),
        "core-1.img": pf.randomBytes(1234, (tag, "core")),
        "pagemap-1.img": pf.randomBytes(4096, (tag, "pagemap")),
        "pages-1.img": pf.randomBytes(4 * MiB, (tag, "pages")),
    }


def spawn(*args: str) -> subprocess.Popen[str]:
    """Start the attacker as C{nobody} in the background (its report: the last line of its output)."""
    return subprocess.Popen(
        [*NOBODY, sys.executable, str(ATTACKER), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True
    )


def lastReport(output: str) -> dict[str, Any]:
    report: dict[str, Any] = json.loads(output.strip().splitlines()[-1])
    return report


class AttackCase(SynchronousTestCase):
    """A proxy and a cache in a fresh directory, and the legitimate migration through them."""

    def startPair(
        self, cacheArgs: Sequence[str] = (), proxyArgs: Sequence[str] = (), shared: bool = False,
        withCache: bool = True, withProxy: bool = True,
    ) -> None:
        self.base = Path(pf.shortTempDir(self))
        os.chmod(self.base, 0o711)  # the attacker may reach the directories, not list them
        self.src, self.dst = self.base / "src", self.base / "dst"
        for directory in (self.src, self.dst):
            directory.mkdir()
            if shared:
                os.chown(directory, 0, NOGROUP)
                os.chmod(directory, 0o2750)  # its sockets are the group's
        self.port = pf.freePort()
        self.cache = self.daemon("criu-cache", self.dst, shared, cacheArgs)
        self.proxy = self.daemon("criu-proxy", self.src, shared, proxyArgs)
        if withCache:
            self.cache.start()
        if withProxy:
            self.startProxy()

    def daemon(self, kind: str, directory: Path, shared: bool, extra: Sequence[str]) -> DaemonProcess:
        daemon = DaemonProcess(kind, self.base, directory, daemonArgs(self.base, kind, self.port, shared, extra))
        self.addCleanup(daemon.kill)
        return daemon

    def startProxy(self) -> None:
        self.proxy.start()
        waitForLog(self.proxy, r"connected to the cache")

    def path(self, name: str) -> str:
        directory = self.src if name.startswith(("img-proxy", "streamer-capture", "proxy-")) else self.dst
        return str(directory / name)

    def dump(self, dumped: dict[str, bytes], finish: bool = True) -> None:
        """criu dump --remote into the proxy, until the cache has every image."""
        proxySocket = self.path("img-proxy.sock")
        pf.pushSnapshotId(proxySocket)
        # A link idle since it connected: wait for the cache's HELLO before
        # the dump can end (the proxy's HELLO grace runs from the connect).
        waitForLog(self.proxy, r"the cache speaks twisted-criu's link extension \(version 4\)")
        for name, data in dumped.items():
            pf.writeImage(proxySocket, name, data)
        for name, data in dumped.items():
            waitForLog(self.cache, rf"received {SNAP}/{re.escape(name)} \({len(data)} bytes\)")
        if finish:
            self.finishDump(dumped)

    def finishDump(self, dumped: dict[str, bytes]) -> None:
        LocalImageClient(self.path("img-proxy.sock"), timeout=STEP).finishDump()
        waitForLog(self.cache, rf"session 1 delivered \(the proxy ended its dump\): {len(dumped) + 1} images")

    def restore(self, dumped: dict[str, bytes]) -> None:
        """criu restore --remote from the cache: every image byte-exact, then its finish."""
        cacheSocket = self.path("img-cache.sock")
        self.assertEqual(LocalImageClient(cacheSocket, timeout=STEP).snapshotIds(), [SNAP])
        pf.assertImages(self, cacheSocket, dumped)
        started = time.monotonic()
        self.assertIsNone(pf.readImage(cacheSocket, "memfd.img"), "an image never dumped was served")
        self.assertLess(time.monotonic() - started, 1.0)
        LocalImageClient(cacheSocket, timeout=STEP).finishRestore()
        waitForLog(self.cache, rf"session complete: {len(dumped) + 1} images, \d+ bytes \(session 1 restored")

    def assertRefusedAtOnce(self, report: dict[str, Any], within: float = 1.0) -> None:
        """The daemon closed the attacker's connection, soon, sending nothing."""
        self.assertTrue(report["connected"], report)
        self.assertTrue(report["closed"], report)
        self.assertEqual(report["received"], "", report)
        self.assertLess(report["seconds"], within, report)

    def cacheSessions(self) -> list[tuple[str, str]]:
        return [(s["id"], s["state"]) for s in sessions(self.cache.controlSocket)]
