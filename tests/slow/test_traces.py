"""
Replay real criu traffic (C{shared/criu-traces/remote-*}) through
C{twistd criu-proxy --once} and C{twistd criu-cache --once} processes (in
this process: L{tests.test_traces}, which also has the trace helpers).
"""

from __future__ import annotations

import os
import socket
import sys
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ProcessDone
from twisted.internet.protocol import ProcessProtocol
from twisted.internet.task import deferLater
from twisted.internet.threads import deferToThread
from twisted.python.failure import Failure
from twisted.trial.unittest import TestCase

from tests.helpers import socketDirectory
from tests.test_traces import (
    REPO,
    STEP_TIMEOUT,
    assertLegsMatch,
    assertRestoredAll,
    reactor,
    trace,
    within,
)
from twisted_criu.testing.processes import freePort
from twisted_criu.testing.replay import TraceReplay
from twisted_criu.twistd.options import unixEndpoint

#: C{python -m twisted.scripts.twistd} does nothing (the module has no
#: C{__main__} block) and exits 0; run twistd under this interpreter so.
TWISTD = "from twisted.scripts.twistd import run; run()"


class DaemonProcess(ProcessProtocol):
    """A C{twistd -n} daemon: collects its output, reports how it ended."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.output: list[bytes] = []
        self.ended: BaseException | None = None
        self._waiters: list[Deferred[BaseException]] = []

    def outReceived(self, data: bytes) -> None:
        self.output.append(data)

    errReceived = outReceived

    def processEnded(self, reason: Failure) -> None:
        self.ended = reason.value  # ProcessDone or ProcessTerminated
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.callback(reason.value)

    def whenEnded(self) -> Deferred[BaseException]:
        """Fires with L{ProcessDone} or L{ProcessTerminated} (not a failure)."""
        d: Deferred[BaseException] = Deferred()
        if self.ended is not None:
            d.callback(self.ended)
        else:
            self._waiters.append(d)
        return d

    @property
    def log(self) -> str:
        return b"".join(self.output).decode("utf-8", "replace")

    def kill(self) -> Deferred[Any] | None:
        if self.ended is not None:
            return None
        assert self.transport is not None
        self.transport.signalProcess("KILL")
        return within(self.whenEnded(), 10)


def canConnect(path: str) -> bool:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(1)
        try:
            s.connect(path)
        except OSError:
            return False
        return True


class ProcessTests(TestCase):
    """A trace through C{twistd criu-proxy --once} and C{twistd criu-cache --once}."""

    timeout = 60

    def spawn(self, plugin: str, directory: str, *args: str) -> DaemonProcess:
        """Start C{twistd -n PLUGIN} listening on C{DIRECTORY/img-*.sock}."""
        process = DaemonProcess(plugin)
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")]))
        socketName = "img-proxy.sock" if plugin == "criu-proxy" else "img-cache.sock"
        argv = [sys.executable, "-c", TWISTD, "-n", "--pidfile=", plugin]
        # The socket is named relative to the daemon's cwd: an absolute
        # path under _trial_temp could exceed sun_path's 108 bytes.
        argv += ["--local", unixEndpoint(socketName), "--stream-local", "none", "--once", *args]
        reactor.spawnProcess(process, sys.executable, argv, env=env, path=directory)
        self.addCleanup(process.kill)
        return process

    async def waitForSocket(self, process: DaemonProcess, path: str) -> None:
        for _ in range(int(STEP_TIMEOUT / 0.05)):
            if process.ended is not None:
                self.fail(f"{process.name} exited early ({process.ended}):\n{process.log}")
            if canConnect(path):
                return
            await deferLater(reactor, 0.05, lambda: None)
        self.fail(f"{process.name} never listened on {path}:\n{process.log}")

    async def assertExitsCleanly(self, process: DaemonProcess) -> None:
        try:
            ended = await within(process.whenEnded(), STEP_TIMEOUT)
        except Exception:
            self.fail(f"{process.name} did not exit after the restore:\n{process.log}")
        if not isinstance(ended, ProcessDone):
            self.fail(f"{process.name} ended with {ended}:\n{process.log}")

    async def migrate(self, name: str) -> None:
        t = trace(name)
        port = str(freePort())
        cacheDir, proxyDir = socketDirectory(self), socketDirectory(self)
        cacheSocket = os.path.join(cacheDir, "img-cache.sock")
        proxySocket = os.path.join(proxyDir, "img-proxy.sock")
        cache = self.spawn("criu-cache", cacheDir, "--address", "127.0.0.1", "--port", port)
        await self.waitForSocket(cache, cacheSocket)
        proxy = self.spawn("criu-proxy", proxyDir, "--address", "127.0.0.1", "--port", port)
        await self.waitForSocket(proxy, proxySocket)
        replay = TraceReplay(t, timeout=STEP_TIMEOUT)
        try:
            legs = await deferToThread(replay.replayAll, proxySocket, cacheSocket)
        except Exception:
            for process in (proxy, cache):
                if process.ended is not None:
                    self.fail(f"{process.name} died ({process.ended}):\n{process.log}")
            raise
        assertLegsMatch(self, legs)
        assertRestoredAll(self, t, legs[-1], "snap1")
        await self.assertExitsCleanly(proxy)
        await self.assertExitsCleanly(cache)

    async def test_remoteASleep(self) -> None:
        await self.migrate("remote-a-sleep")

    async def test_remoteCTree(self) -> None:
        await self.migrate("remote-c-tree")

    async def test_remoteBMem64(self) -> None:
        await self.migrate("remote-b-mem64")
