# -*- test-case-name: tests.test_daemons -*-
"""
The image cache (restore host): receives images from an image proxy and
serves them to C{criu restore --remote} on a local socket.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageFactory, ReadVariant, readsInline
from twisted_criu.criu.stream import StreamServeFactory
from twisted_criu.daemons.cachesession import CacheSession
from twisted_criu.daemons.service import ImageDaemon
from twisted_criu.daemons.sessions import viewOf
from twisted_criu.errors import SessionBusy
from twisted_criu.interfaces import (
    IImageStore,
    ILocalImageService,
    IReceivingLink,
    IRemoteImageSink,
)
from twisted_criu.link.receiver import RemoteReceiverFactory
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.views import SessionView


@implementer(ILocalImageService, IRemoteImageSink)
class ImageCacheService(ImageDaemon[CacheSession]):
    """
    The image cache, embeddable in any Twisted application.

    @param local: where criu restore --remote connects (C{unix:DIR/img-cache.sock}).
    @param streamLocal: where criu restore --stream connects, if at all
        (C{unix:DIR/streamer-serve.sock}).
    @param listen: where the image proxy connects.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        local: IStreamServerEndpoint,
        listen: IStreamServerEndpoint,
        store: IImageStore | None = None,
        readVariant: ReadVariant = ReadVariant.AUTO,
        streamLocal: IStreamServerEndpoint | None = None,
        linkTimeout: float = 60.0,
        clientTimeout: float = 60.0,
        keep: bool = False,
        progressInterval: float = 10.0,
    ) -> None:
        super().__init__(
            reactor, store, readVariant, linkTimeout, clientTimeout, keep, progressInterval
        )
        self._giveUp: Any = None
        self.session = self._newSession()
        self.remoteEndpoint = self.listenOn(listen, RemoteReceiverFactory(self))
        self.localEndpoint = self.listenOn(local, LocalImageFactory(self))
        self.streamEndpoint = (
            None if streamLocal is None else self.listenOn(streamLocal, StreamServeFactory(self))
        )

    def stopSessions(self) -> None:
        self._cancelGiveUp()

    def _newSession(self) -> CacheSession:
        return CacheSession(self.nextSessionId(), self.reactor.seconds())

    @staticmethod
    def _endLinks(session: CacheSession) -> None:
        """Tell the session's proxies that their chain is over, and close."""
        for link in session.idleLinks:
            link.sendStatus(wire.LinkStatus(wire.LinkStatusKind.SESSION_DONE))
            link.close()

    def _maybeComplete(self) -> None:
        session = self.session
        if not session.complete:
            return
        summary = session.registry.summary()
        self.log.info(
            "session complete: {images} images, {bytes} bytes",
            images=summary.images,
            bytes=summary.bytes,
            session=session.id,
        )
        self.retire(session)
        self.session = self._newSession()
        self._endLinks(session)
        self.sessionDone(summary)

    @property
    def readsWaiting(self) -> int:
        """criu reads waiting for their image to arrive."""
        return self.session.registry.waiting

    # -- ISessionControl ----------------------------------------------------

    role = "cache"

    def currentSession(self) -> CacheSession:
        return self.session

    def dropSession(self, sessionId: str) -> SessionView:
        session = self.findSession(sessionId)
        view = viewOf(session, "dropped", current=False)
        if session is self.session:
            registry = session.registry
            if session.links or registry.writesInProgress or registry.waiting:
                raise SessionBusy(
                    f"session {sessionId} is busy ({len(session.links)} proxy links sending,"
                    f" {registry.waiting} reads waiting)"
                )
            self.session = self._newSession()
            self._endLinks(session)
        else:
            del self.kept[sessionId]
        session.registry.release()
        self.log.info("session {id} dropped by the operator", id=sessionId)
        return view

    # -- IRemoteImageSink ----------------------------------------------------

    def linkOpened(self, receiver: IReceivingLink) -> SnapshotRegistry:
        self._cancelGiveUp()
        session = self.session
        fresh = not (session.links or session.idleLinks or session.registry.keys())
        if fresh and not session.remoteDone:
            self.log.info("session {id} started", id=session.id)
        session.linkSending(receiver)
        return session.registry

    def linkClosed(self, receiver: IReceivingLink, clean: bool) -> None:
        session = self.session
        session.idleLinks.discard(receiver)
        if receiver not in session.links or not session.linkStopped(receiver):
            return
        if not clean:
            session.linkLost()
            self.log.warn(
                "link to the proxy lost; waiting {seconds} s for it to come back",
                seconds=self.linkTimeout,
            )
            self._cancelGiveUp()
            self._giveUp = self.reactor.callLater(self.linkTimeout, self._proxyGone, session)
            return
        self._remoteQuiet(session)

    def dumpEnded(self, receiver: IReceivingLink) -> None:
        session = self.session
        if receiver not in session.links:
            return
        session.idleLinks.add(receiver)
        if session.linkStopped(receiver):
            self._remoteQuiet(session)

    def dumpStarted(self, receiver: IReceivingLink) -> SnapshotRegistry:
        session = self.session
        session.idleLinks.discard(receiver)
        return self.linkOpened(receiver)

    def _remoteQuiet(self, session: CacheSession) -> None:
        """Every proxy is done sending."""
        self.log.info(
            "proxy finished sending ({images} images)",
            images=len(session.registry.keys()),
        )
        session.remoteQuiet()
        self._maybeComplete()

    def _cancelGiveUp(self) -> None:
        giveUp, self._giveUp = self._giveUp, None
        if giveUp is not None and giveUp.active():
            giveUp.cancel()

    def _proxyGone(self, session: CacheSession) -> None:
        self._giveUp = None
        if session is not self.session or session.links:
            return
        waiting = session.registry.waiting
        self.log.error(
            "the proxy did not come back within {seconds} s: the session ends with"
            " {images} complete images; {waiting} waiting reads get ENOENT",
            seconds=self.linkTimeout,
            images=len(session.registry.keys()),
            waiting=waiting,
        )
        session.proxyGone()
        self._maybeComplete()

    # -- ILocalImageService --------------------------------------------------

    def registryFor(self, request: wire.LocalRequest) -> SnapshotRegistry:
        if request.isSeed:
            self.session.seed = True
        return self.session.registry

    def finishRequested(self, request: wire.LocalRequest) -> None:
        self.log.info("criu finished its restore")
        self.session.restoreFinished()
        self._maybeComplete()

    def readsInline(self, request: wire.LocalRequest) -> bool:
        return readsInline(self.readVariant, request, self.session.seed)
