# -*- test-case-name: tests.test_twistd -*-
"""
What both twistd plugins add around a proxy or a cache: the control and
metrics endpoints, readiness (C{--status-fd}, C{--pidfile}, as CRIU's
daemons do), JSON logs, and C{--once}.
"""

from __future__ import annotations

import os
import resource
import sys
from typing import IO, TYPE_CHECKING, Any

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, gatherResults
from twisted.logger import Logger, globalLogPublisher, jsonFileLogObserver

from twisted_criu.daemons.control import controlSite
from twisted_criu.daemons.endpoints import ObservedServerEndpoint, listenWhileRunning
from twisted_criu.daemons.metrics import MetricsService
from twisted_criu.daemons.service import ImageDaemon
from twisted_criu.daemons.systemd import notify

if TYPE_CHECKING:
    from twisted_criu.twistd.options import DaemonOptions

log = Logger()


class _ReadinessService(MultiService):
    """
    Once every listener of the daemon listens: write one byte to
    C{--status-fd} and close it, write C{--pidfile}, and tell systemd
    (C{Type=notify}).  The pid file is removed when the daemon stops.
    """

    def __init__(self, endpoints: list[ObservedServerEndpoint], statusFd: int | None, pidfile: str | None) -> None:
        super().__init__()
        self.endpoints = endpoints
        self.statusFd = statusFd
        self.pidfile = pidfile
        self.ready: Deferred[None] = Deferred()

    def startService(self) -> None:
        super().startService()
        listening = gatherResults([e.whenListening() for e in self.endpoints])
        listening.addCallback(self._ready)
        listening.addErrback(lambda f: log.failure("the daemon did not start listening", f))

    def _ready(self, _: object) -> None:
        if self.pidfile is not None:
            temporary = f"{self.pidfile}.{os.getpid()}.tmp"
            with open(temporary, "w") as f:
                f.write(f"{os.getpid()}\n")
            os.replace(temporary, self.pidfile)
        if self.statusFd is not None:
            try:
                os.write(self.statusFd, b"\0")
                os.close(self.statusFd)
            except OSError as e:
                log.error("cannot write to --status-fd {fd}: {why}", fd=self.statusFd, why=e.strerror)
            self.statusFd = None
        log.info("ready: accepting criu and the link", pid=os.getpid())
        notify("READY=1")  # a Type=notify systemd service has started
        self.ready.callback(None)

    def stopService(self) -> Deferred[None]:
        if self.ready.called:
            notify("STOPPING=1")
        if self.pidfile is not None and self.ready.called:
            try:
                os.unlink(self.pidfile)
            except FileNotFoundError:
                pass
        d: Deferred[None] = super().stopService()
        return d


class _JSONLogService(MultiService):
    """Also log every event as one JSON object per line (C{--log-json})."""

    def __init__(self, path: str) -> None:
        super().__init__()
        self.path = path
        self._file: IO[str] | None = None
        self._observer: Any = None

    def startService(self) -> None:
        self._file = sys.stdout if self.path == "-" else open(self.path, "a")
        self._observer = jsonFileLogObserver(self._file)
        globalLogPublisher.addObserver(self._observer)
        super().startService()

    def stopService(self) -> Deferred[None]:
        if self._observer is not None:
            globalLogPublisher.removeObserver(self._observer)
            self._observer = None
        if self._file is not None and self._file is not sys.stdout:
            self._file.close()
        self._file = None
        d: Deferred[None] = super().stopService()
        return d


def raiseFileLimit() -> tuple[int, int]:
    """
    Raise this process's soft limit on open files to its hard limit: a
    daemon holds a descriptor for each image and each of criu's pipes and
    connections, and a process tree's dump writes thousands of images.
    Returns the soft limit before and after.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and soft != hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        return soft, hard
    return soft, soft


def finishDaemon(reactor: Any, daemon: ImageDaemon[Any], options: DaemonOptions) -> ImageDaemon[Any]:
    """
    Attach the operational extras chosen in C{options} to C{daemon} (an
    L{ImageProxyService} or L{ImageCacheService}) and return it.
    """
    before, after = raiseFileLimit()
    if after != before:
        log.info("raised the open-file limit from {before} to {after} (the hard limit)", before=before, after=after)
    if options["log-json"] is not None:
        # First, so that it sees the other services start.
        _JSONLogService(options["log-json"]).setServiceParent(daemon)
    endpoints = list(daemon.endpoints)
    if options["control"] is not None:
        endpoints.append(
            listenWhileRunning(
                daemon,
                options.listenEndpoint(reactor, "control"),
                controlSite(daemon, daemon.clientTimeout, reactor),
            )
        )
    if options["metrics"] is not None:
        metrics = MetricsService(daemon, options.listenEndpoint(reactor, "metrics"))
        metrics.setServiceParent(daemon)
        endpoints.append(metrics.endpoint)
    readiness = _ReadinessService(endpoints, options["status-fd"], options["pidfile"])
    readiness.setServiceParent(daemon)
    if options["once"]:
        daemon.whenSessionDone().addCallback(lambda _: reactor.stop())
    return daemon
