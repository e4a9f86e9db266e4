# -*- test-case-name: tests.slow.test_demo -*-
"""
The demo's two daemons: a C{twistd criu-cache} and a C{twistd criu-proxy}
(both C{--once}) linked over TLS on 127.0.0.1 with the demo's own link key.
"""

from __future__ import annotations

import os
import time
from typing import Sequence

from twisted_criu.testing.demo.output import say
from twisted_criu.testing.processes import Daemon, DaemonError, freePort, tail, waitForSockets


class DaemonPair:
    """
    A cache and a proxy, each in its own images directory.

    @ivar port: the link's TCP port on 127.0.0.1, once L{start}ed.
    """

    def __init__(
        self,
        workDir: str,
        src: str,
        dst: str,
        proxySocket: str,
        cacheSocket: str,
        extra: Sequence[str],
    ) -> None:
        self.workDir = workDir
        self.src = src
        self.dst = dst
        # The demo's own link key, so that it leaves nothing in /etc.
        self.keyPath = os.path.join(workDir, "link.key")
        self.extra = [*extra, "--link-key", self.keyPath]
        self.cache = Daemon("criu-cache", workDir, dst, cacheSocket)
        self.proxy = Daemon("criu-proxy", workDir, src, proxySocket)
        self.port = 0

    @property
    def daemons(self) -> list[Daemon]:
        return [self.cache, self.proxy]

    def start(self, timeout: float) -> None:
        """Start the cache, then the proxy; say where they listen."""
        self.port = freePort()
        # The cache first: a proxy that finds no cache retries with backoff.
        for attempt in range(3):
            self.cache.start(["--once", "--port", str(self.port), "-D", self.dst, *self.extra], cwd=self.workDir)
            try:
                waitForSockets([self.cache], timeout=min(30.0, timeout))
                break
            except DaemonError:
                # Someone else may have taken the free port in the meantime.
                if attempt == 2 or "Address already in use" not in tail(self.cache.logPath):
                    raise
                self.cache.stop()
                self.port = freePort()
        say(
            f"  link      criu-proxy -> 127.0.0.1:{self.port} -> criu-cache"
            f" (TLS 1.3, link key {self.keyPath})"
        )
        say(f"  started   {self.cache.tapname:<10} pid {self.cache.pid:<7} {self.cache.socketPath}")
        self.proxy.start(
            ["--once", "--port", str(self.port), "--address", "127.0.0.1", "-D", self.src, *self.extra],
            cwd=self.workDir,
        )
        waitForSockets([self.proxy], timeout=min(30.0, timeout))
        say(f"  started   {self.proxy.tapname:<10} pid {self.proxy.pid:<7} {self.proxy.socketPath}")

    def checkAlive(self, error: Exception) -> None:
        """If a daemon died, raise its failure (with its log) instead of C{error}."""
        for daemon in self.daemons:
            code = daemon.exitCode()
            if code is not None:
                raise daemon.failure(f"died (exit code {code}): {error}") from None

    def waitForExit(self, timeout: float) -> None:
        """Both exit 0 by themselves (C{--once}) within C{timeout} seconds."""
        deadline = time.monotonic() + timeout
        for daemon in self.daemons:
            code = daemon.wait(deadline - time.monotonic())
            if code is None:
                raise daemon.failure(f"still running {timeout:g} s after the migration finished")
            if code != 0:
                raise daemon.failure(f"exited with code {code}")
            say(f"  {daemon.tapname:<10} exited 0 by itself")

    def describe(self) -> str:
        """Each started daemon's log tail."""
        return "\n".join(
            str(daemon.failure(f"(pid {daemon.pid}) log:")) for daemon in self.daemons if daemon.process is not None
        )

    def stop(self) -> None:
        for daemon in self.daemons:
            daemon.stop()
