# -*- test-case-name: tests.test_daemons -*-
"""
The image proxy (dump host): takes images from C{criu dump --remote} on a
local socket and forwards each, once complete, to an image cache.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, DeferredList, fail
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageFactory
from twisted_criu.criu.variants import ReadVariant, readsInline
from twisted_criu.criu.stream import StreamCaptureFactory
from twisted_criu.daemons.dumpchain import DELIVERED, DUMPING
from twisted_criu.daemons.endpoints import LoggingClientEndpoint, ObservedServerEndpoint
from twisted_criu.daemons.proxysession import ProxySession, RetryPolicy
from twisted_criu.daemons.service import ImageDaemon
from twisted_criu.daemons.sessions import viewOf
from twisted_criu.flow.ratelimit import TokenBucket
from twisted_criu.criu.settle import LiveConnections, settled
from twisted_criu.flow.compress import LinkCompression, Mode
from twisted_criu.errors import DumpAborted, HookRefused, SessionBusy
from twisted_criu.interfaces import ICaptureService, IImageStore
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.views import SessionView


@implementer(ICaptureService)
class ImageProxyService(ImageDaemon[ProxySession]):
    """
    The image proxy, embeddable in any Twisted application.

    @param local: where criu --remote connects (C{unix:DIR/img-proxy.sock}).
    @param streamLocal: where criu --stream connects, if at all
        (C{unix:DIR/streamer-capture.sock}).
    @param cache: where the image cache listens.
    @param rateLimit: the bucket C{cache}'s connections are limited by
        (L{twisted_criu.flow.ratelimit.RateLimitedEndpoint}), shown in the
        daemon's progress, status and metrics.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        local: IStreamServerEndpoint,
        cache: IStreamClientEndpoint,
        store: IImageStore | None = None,
        readVariant: ReadVariant = ReadVariant.AUTO,
        retryPolicy: RetryPolicy | None = None,
        cacheDescription: str = "the cache",
        streamLocal: IStreamServerEndpoint | None = None,
        linkTimeout: float = 60.0,
        clientTimeout: float = 60.0,
        checksum: bool = False,
        keep: bool = False,
        progressInterval: float = 10.0,
        cutThrough: bool = True,
        rateLimit: TokenBucket | None = None,
        compress: Mode = Mode.AUTO,
    ) -> None:
        super().__init__(
            reactor, store, readVariant, linkTimeout, clientTimeout, keep, progressInterval
        )
        #: What C{cache} is limited by (its progress and metrics say so).
        self.activity.linkLimit = rateLimit
        #: Forward images to a twisted-criu cache while criu writes them.
        self.cutThrough = cutThrough
        self.checksum = checksum
        #: Compresses images on the link (C{--compress}), in threads of its own.
        self.compression = LinkCompression(compress, reactor)
        self._cache = LoggingClientEndpoint(cache, cacheDescription)
        self._retryPolicy = retryPolicy
        self.session: ProxySession | None = None
        #: Earlier sessions whose dump is delivered, kept until restored.
        self._earlier: dict[str, ProxySession] = {}
        #: The last session aborted, and why (for the post-dump hook).
        self._aborted: tuple[ProxySession, str] | None = None
        #: criu was still dumping into it: its other writes are refused
        #: until its finish, or a new dump.
        self._abandoned = False
        self._criuFactories: list[LiveConnections] = [LocalImageFactory(self)]
        self.localEndpoint = self.listenOn(local, self._criuFactories[0])
        self.streamEndpoint = None
        if streamLocal is not None:
            self._criuFactories.append(StreamCaptureFactory(self))
            self.streamEndpoint = self.listenOn(streamLocal, self._criuFactories[1])

    def startService(self) -> None:
        super().startService()
        self._newSession()

    def stopService(self) -> Deferred[None]:
        return super().stopService().addBoth(self._stopCompressing)

    def _stopCompressing(self, result: object) -> object:
        self.compression.stop()
        return result

    def stopSessions(self) -> Deferred[None] | None:
        sessions = [*self._earlier.values(), *([self.session] if self.session else [])]
        if not sessions:
            return None
        return DeferredList([s.stop() for s in sessions]).addCallback(lambda _: None)

    def _newSession(self) -> ProxySession:
        session = ProxySession(
            self.reactor,
            self._cache,
            self._retryPolicy,
            self.linkTimeout,
            self.checksum,
            sessionId=self.nextSessionId(),
            activity=self.activity,
            cutThrough=self.cutThrough,
            compression=self.compression,
        )
        earlier = self.session
        if earlier is not None and not earlier.ended.called:
            self._earlier[earlier.id] = earlier  # delivered: kept until restored
        self.session = session
        self._aborted, self._abandoned = None, False
        session.onDelivered = self.sessionDone
        session.onAborted = lambda why, dumping: self._sessionAborted(session, why, dumping)
        session.ended.addCallback(lambda _: self._sessionEnded(session))
        session.start()
        self.log.info("session {id} started", id=session.id)
        return session

    def _sessionAborted(self, session: ProxySession, why: str, dumping: bool) -> None:
        if session is self.session:
            self._aborted, self._abandoned = (session, why), dumping

    def acceptDropped(self, endpoint: ObservedServerEndpoint, count: int) -> None:
        """criu's connections dropped at accept: the dump under way fails (an image is lost)."""
        super().acceptDropped(endpoint, count)
        session = self.session
        if session is not None and session.state == DUMPING:
            session.abortDump("a connection from criu was closed at accept: too many open files")

    def _sessionEnded(self, session: ProxySession) -> None:
        if self.session is session:
            self.session = None
        self._earlier.pop(session.id, None)
        self.retire(session)

    def listSessions(self) -> list[SessionView]:
        earlier = [viewOf(s, s.state, current=True) for s in self._earlier.values()]
        return earlier + super().listSessions()

    def findSession(self, sessionId: str) -> ProxySession:
        session = self._earlier.get(sessionId)
        return session if session is not None else super().findSession(sessionId)

    def releaseAll(self) -> None:
        for session in self._earlier.values():
            session.registry.release()
        super().releaseAll()

    @property
    def readsWaiting(self) -> int:
        """criu reads waiting for a write of their image to complete."""
        return 0 if self.session is None else self.session.registry.waiting

    # -- ISessionControl ----------------------------------------------------

    role = "proxy"

    def currentSession(self) -> ProxySession | None:
        return self.session

    def dropSession(self, sessionId: str) -> SessionView:
        session = self.findSession(sessionId)
        view = viewOf(session, "dropped", current=False)
        if session.id in self._earlier:
            if session.state != DELIVERED:
                raise SessionBusy(
                    f"session {sessionId} is {session.state}: drop it once its dump"
                    " has been delivered"
                )
            del self._earlier[session.id]
            session.drop()
        elif session is self.session:
            if session.state != DELIVERED or session.registry.writesInProgress:
                raise SessionBusy(
                    f"session {sessionId} is {session.state}: drop it once its dump"
                    " has been delivered"
                )
            self.session = None
            session.drop()
        else:
            del self.kept[sessionId]
        session.registry.release()
        self.log.info("session {id} dropped by the operator", id=sessionId)
        return view

    def hookAction(self, action: str, report: Callable[[str], None]) -> Deferred[dict[str, Any]]:
        """C{twisted-criu-hook} on the dump host: confirm the dump at post-dump."""
        if action != "post-dump":
            return fail(HookRefused(f"the proxy has nothing to do at {action}"))
        session = self.session
        if (session is None or session.over) and self._aborted is not None:
            aborted, why = self._aborted
            return fail(HookRefused(f"session {aborted.id} was aborted: {why}"))
        if session is None or session.over:
            return fail(HookRefused("the proxy has no dump under way: did criu dump through it?"))
        self.log.info("criu's post-dump hook waits for the cache to confirm session {id}", id=session.id)
        return session.commit(self._criuSettled, report)

    def _criuSettled(self) -> bool:
        """Has the proxy read everything criu wrote (see L{twisted_criu.criu.settle})?"""
        ports = [e.port for e in (self.localEndpoint, self.streamEndpoint) if e is not None and e.port]
        connections = [c for factory in self._criuFactories for c in factory.live]
        return settled(ports, connections)  # type: ignore[arg-type]

    # -- ILocalImageService --------------------------------------------------

    def captureFailed(self, why: str) -> None:
        """criu's --stream dump failed: criu resumes the process; the session must never be restored."""
        session = self.session
        if session is not None:
            session.abortDump(f"criu's dump failed ({why})")

    def registryFor(self, request: wire.LocalRequest) -> SnapshotRegistry:
        writing = request.kind is not wire.OpenKind.READ
        # A --stream dump (no chains there) or a dump after one its hook
        # confirmed is a new migration; a --remote dump after a pre-dump
        # continues the chain.
        streamRun = request.isFinish and writing
        if self._abandoned and self._aborted is not None and not (streamRun or _startsDump(request)):
            aborted, why = self._aborted
            if writing:
                raise DumpAborted(f"session {aborted.id}, which criu is dumping into, was aborted ({why})")
            return aborted.registry  # released: every read gets ENOENT
        session = self.session
        finished = session is not None and session.registry.closed
        if session is None or session.over or (finished and writing and (streamRun or session.committed)):
            session = self._newSession()
        elif finished and writing:
            session.beginDump()
        if request.isSeed:
            session.seed = True
        return session.registry

    def finishRequested(self, request: wire.LocalRequest) -> None:
        if self._abandoned and self._aborted is not None:
            self._abandoned = False
            self.log.warn(
                "criu finished its dump into session {id}, which was aborted: nothing of it is forwarded",
                id=self._aborted[0].id,
            )
            return
        session = self.session
        if session is None:
            self.log.warn("finish from criu with no dump in progress")
            return
        self.log.info("criu finished its dump")
        session.registry.close()

    def readsInline(self, request: wire.LocalRequest) -> bool:
        session = self.session
        return readsInline(self.readVariant, request, session is not None and session.seed)


def _startsDump(request: wire.LocalRequest) -> bool:
    """Does C{request} start a C{--remote} dump (its append to C{parent})?"""
    return (
        request.kind is wire.OpenKind.APPEND
        and request.name == wire.PARENT_IMAGE
        and request.snapshotId in ("", wire.SEED_NULL_SNAPSHOT)
    )
