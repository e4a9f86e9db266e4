# -*- test-case-name: tests.test_daemons -*-
"""
Endpoints of the daemons: listening while a service runs, reporting where
and which connections the port had to drop; logging failed connects.
"""

from __future__ import annotations

from typing import Any, Callable, cast

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import ILogObserver, LogEvent, Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import filelimit
from twisted_criu.daemons.systemd import keepSocketFile

#: How Twisted's listening ports say they accepted a connection only to
#: close it (C{EMFILE}: they keep one descriptor in reserve for that).
_DROPPED_AT_ACCEPT = "EMFILE recovery: Closed socket"


def watchAccepts(port: Any, dropped: Callable[[int], None]) -> bool:
    """
    Call C{dropped(count)} when C{port} (a TCP or UNIX port of Twisted's)
    accepted C{count} connections and closed them at once for want of a
    descriptor (those of one reactor turn together).  The port says so
    only in its log (at C{info}), through its own logger, which is given
    an observer that also watches for it.  Returns whether C{port} has
    such a logger.
    """
    logger = getattr(port, "_logger", None)
    if not isinstance(logger, Logger):
        return False
    observer: ILogObserver = logger.observer
    count = [0]

    def report() -> None:
        dropped(count[0])
        count[0] = 0

    def watching(event: LogEvent) -> None:
        observer(event)
        if str(event.get("log_format", "")).startswith(_DROPPED_AT_ACCEPT):
            count[0] += 1
            if count[0] == 1:
                port.reactor.callLater(0, report)

    port._logger = Logger(namespace=logger.namespace, source=port, observer=cast(ILogObserver, watching))
    return True


@implementer(IStreamServerEndpoint)
class ObservedServerEndpoint:
    """
    A server endpoint that remembers the port it is listening on.  A UNIX
    socket inherited from systemd is used as systemd made it (see
    L{keepSocketFile}).
    """

    def __init__(self, endpoint: IStreamServerEndpoint, dropped: Callable[[int], None] | None = None) -> None:
        """@param dropped: called with how many connections were dropped at accept (see L{watchAccepts})."""
        self._endpoint = keepSocketFile(endpoint)
        self._dropped = dropped
        self.port: IListeningPort | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
            if self._dropped is not None:
                watchAccepts(port, self._dropped)
            waiters, self._waiters = self._waiters, []
            for d in waiters:
                d.callback(port)
            return port

        d: Deferred[IListeningPort] = self._endpoint.listen(factory)
        return d.addCallback(listening)

    def whenListening(self) -> Deferred[IListeningPort]:
        """Fires with the listening port (at once if already listening)."""
        if self.port is not None:
            return succeed(self.port)
        d: Deferred[IListeningPort] = Deferred()
        self._waiters.append(d)
        return d


@implementer(IStreamClientEndpoint)
class LoggingClientEndpoint:
    """A client endpoint that logs why connection attempts fail."""

    log = Logger()

    def __init__(self, endpoint: IStreamClientEndpoint, description: str) -> None:
        self._endpoint = endpoint
        self.description = description

    def connect(self, factory: Any) -> Deferred[Any]:
        def failed(reason: Failure) -> Failure:
            self.log.warn(
                "cannot reach the cache at {where}: {why}; will retry",
                where=self.description,
                why=filelimit.advice(reason.value) if filelimit.exhausted(reason.value) else reason.getErrorMessage(),
            )
            return reason

        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addErrback(failed)


def listenWhileRunning(
    parent: MultiService,
    endpoint: IStreamServerEndpoint,
    factory: IProtocolFactory,
    dropped: Callable[[ObservedServerEndpoint, int], None] | None = None,
) -> ObservedServerEndpoint:
    """
    Listen on C{endpoint} with C{factory} while C{parent} runs.  A failure to
    listen (a port in use, a socket path taken) makes C{parent.startService}
    raise, so that a daemon that cannot listen does not start: Twisted's
    L{StreamServerEndpointService} only logs it unless its (private, but
    long-standing) C{_raiseSynchronously} is set, which is done here alone.
    C{dropped(observed, count)} is called when connections were closed at
    accept (see L{watchAccepts}).
    """
    observed = ObservedServerEndpoint(endpoint, None if dropped is None else lambda n: dropped(observed, n))
    listener = StreamServerEndpointService(observed, factory)
    listener._raiseSynchronously = True
    listener.setServiceParent(parent)
    return observed
