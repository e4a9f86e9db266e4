# -*- test-case-name: tests.test_daemons -*-
"""Endpoints of the daemons: listening while a service runs, reporting where; logging failed connects."""

from __future__ import annotations

from typing import Any

from twisted.application.internet import StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred, succeed
from twisted.internet.interfaces import (
    IListeningPort,
    IProtocolFactory,
    IStreamClientEndpoint,
    IStreamServerEndpoint,
)
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer


@implementer(IStreamServerEndpoint)
class ObservedServerEndpoint:
    """A server endpoint that remembers the port it is listening on."""

    def __init__(self, endpoint: IStreamServerEndpoint) -> None:
        self._endpoint = endpoint
        self.port: IListeningPort | None = None
        self._waiters: list[Deferred[IListeningPort]] = []

    def listen(self, factory: Any) -> Deferred[IListeningPort]:
        def listening(port: IListeningPort) -> IListeningPort:
            self.port = port
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
                why=reason.getErrorMessage(),
            )
            return reason

        d: Deferred[Any] = self._endpoint.connect(factory)
        return d.addErrback(failed)


def listenWhileRunning(
    parent: MultiService, endpoint: IStreamServerEndpoint, factory: IProtocolFactory
) -> ObservedServerEndpoint:
    """
    Listen on C{endpoint} with C{factory} while C{parent} runs.  A failure to
    listen (a port in use, a socket path taken) makes C{parent.startService}
    raise, so that a daemon that cannot listen does not start: Twisted's
    L{StreamServerEndpointService} only logs it unless its (private, but
    long-standing) C{_raiseSynchronously} is set, which is done here alone.
    """
    observed = ObservedServerEndpoint(endpoint)
    listener = StreamServerEndpointService(observed, factory)
    listener._raiseSynchronously = True
    listener.setServiceParent(parent)
    return observed
