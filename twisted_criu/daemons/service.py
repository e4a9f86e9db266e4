# -*- test-case-name: tests.test_daemons -*-
"""
What both daemons are, apart from their sessions: a L{MultiService} of
listeners on endpoints, a store, progress reporting, and observers of
completed sessions.
"""

from __future__ import annotations

import os
from typing import Any, Callable, TypeVar

from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IProtocolFactory, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import filelimit
from twisted_criu.criu.variants import ReadVariant
from twisted_criu.daemons.endpoints import ObservedServerEndpoint, listenWhileRunning
from twisted_criu.daemons.sessions import SessionHolder
from twisted_criu.interfaces import IImageStore, ISession, ISessionControl
from twisted_criu.progress import Activity
from twisted_criu.registry import SessionSummary
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.views import LinkView, SessionView, StoreView

SessionT = TypeVar("SessionT", bound=ISession)


@implementer(ISessionControl)
class ImageDaemon(SessionHolder[SessionT], MultiService):
    """
    The part of L{ImageProxyService} and L{ImageCacheService} that does not
    depend on which end of the link they are.

    @ivar endpoints: every endpoint the daemon listens on (readiness waits
        for all of them).
    """

    #: C{"proxy"} or C{"cache"}.
    role: str

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        store: IImageStore | None,
        readVariant: ReadVariant,
        linkTimeout: float,
        clientTimeout: float,
        keep: bool,
        progressInterval: float,
    ) -> None:
        MultiService.__init__(self)
        self.reactor = reactor
        self.activity = Activity(reactor, progressInterval)
        self.store: IImageStore = store if store is not None else MemoryStore()
        self.readVariant = readVariant
        self.linkTimeout = linkTimeout
        self.clientTimeout = clientTimeout
        self.keep = keep
        #: Completed sessions kept for inspection (C{keep}), by id.
        self.kept: dict[str, SessionT] = {}
        self.sessionsCompleted = 0
        self.endpoints: list[ObservedServerEndpoint] = []
        self._sessionCounter = 0
        self._observers: list[Deferred[SessionSummary]] = []

    def listenOn(self, endpoint: IStreamServerEndpoint, factory: IProtocolFactory) -> ObservedServerEndpoint:
        """Listen on C{endpoint} while the daemon runs; a failure to listen fails its start."""
        observed = listenWhileRunning(self, endpoint, factory, self.acceptDropped)
        self.endpoints.append(observed)
        return observed

    def acceptDropped(self, endpoint: ObservedServerEndpoint, count: int) -> None:
        """
        The port of C{endpoint} accepted C{count} connections and closed
        them at once: the daemon has no descriptor left (Twisted keeps one
        in reserve to do that, so the peers fail instead of waiting).
        """
        self.log.error(
            "closed {connections} to {where} as soon as accepted: {advice}",
            connections="a connection" if count == 1 else f"{count} connections",
            where=_where(endpoint),
            advice=filelimit.advice(),
        )

    def dropSession(self, sessionId: str) -> SessionView:
        raise NotImplementedError()

    def storeView(self) -> StoreView:
        store = self.store
        return StoreView(
            getattr(store, "inMemory", 0), getattr(store, "onDisk", 0), getattr(store, "memoryLimit", None)
        )

    def linkView(self) -> LinkView | None:
        limit = self.activity.linkLimit
        if limit is None:
            return None
        return LinkView(limit.rate, limit.burst, limit.achieved(), limit.sent)

    def hookAction(self, action: str, report: Callable[[str], None]) -> Deferred[dict[str, Any]]:
        raise NotImplementedError()

    def nextSessionId(self) -> str:
        self._sessionCounter += 1
        return str(self._sessionCounter)

    def startService(self) -> None:
        try:
            MultiService.startService(self)
        except BaseException:
            self.stopService()  # close the listeners that did start
            raise
        self.activity.startReporting()

    def stopService(self) -> Deferred[None]:
        self.activity.stopReporting()
        d: Deferred[Any] = MultiService.stopService(self)
        d.addBoth(self._stopSessions)
        d.addBoth(self._closeStore)
        return d

    def _stopSessions(self, result: object) -> object:
        stopping = self.stopSessions()
        if stopping is None:
            return result
        return stopping.addBoth(lambda _: result)

    def stopSessions(self) -> Deferred[None] | None:
        """The listeners are closed: end whatever the sessions still run."""
        return None

    def _closeStore(self, result: object) -> object:
        self.releaseAll()
        self.store.close()
        return result

    def whenSessionDone(self) -> Deferred[SessionSummary]:
        """Fires with a summary when the current (or next) session completes."""
        d: Deferred[SessionSummary] = Deferred()
        self._observers.append(d)
        return d

    def sessionDone(self, summary: SessionSummary) -> None:
        """A session completed: count it and tell the observers."""
        self.sessionsCompleted += 1
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(summary)


def _where(endpoint: ObservedServerEndpoint) -> str:
    """Where C{endpoint} listens: a socket's path, or an address and port."""
    host: Any = endpoint.port.getHost() if endpoint.port is not None else None
    name = getattr(host, "name", None)
    if name is not None:
        return os.fsdecode(name)
    return f"{getattr(host, 'host', '?')}:{getattr(host, 'port', '?')}"
