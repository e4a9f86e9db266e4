# -*- test-case-name: tests.test_services -*-
"""
The image proxy (dump host): takes images from C{criu dump --remote} on a
local socket and forwards each, once complete, to an image cache.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.application.internet import ClientService, StreamServerEndpointService
from twisted.application.service import MultiService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint, IStreamServerEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageFactory, ReadVariant, readsInline
from twisted_criu.criu.stream import StreamCaptureFactory
from twisted_criu.daemons.control import SessionHolder, SessionView
from twisted_criu.daemons.endpoints import LoggingClientEndpoint, ObservedServerEndpoint
from twisted_criu.errors import SessionBusy
from twisted_criu.flow.send import OutgoingImage, sha256Of
from twisted_criu.interfaces import (
    IGrowableWriter,
    IGrowingImage,
    IImageStore,
    IImageWriter,
    ILocalImageService,
    ISessionControl,
    IStoredImage,
)
from twisted_criu.keys import ImageKey
from twisted_criu.link.sender import RemoteSender, RemoteSenderFactory
from twisted_criu.progress import Activity
from twisted_criu.registry import SessionSummary, SnapshotRegistry
from twisted_criu.storage.memory import MemoryStore

RetryPolicy = Callable[[int], float]


#: How long a new link waits for the cache's HELLO before treating the
#: cache as one of CRIU's C caches (which never send anything).
HELLO_GRACE = 2.0


class ProxySession:
    """
    A chain of dumps (pre-dumps, then a dump): a registry of their images,
    and one link forwarding them.

    Every connection of the link starts by sending everything the chain
    holds (a restarted cache holds nothing), then follows new publications.
    When a dump has finished locally and everything is handed over, the
    dump is ended: with an end-of-dump marker, confirmed by the cache, if
    the cache speaks twisted-criu's link extension, else (a C cache) by
    closing the link.  The chain lasts until the cache reports that the
    restore finished (SESSION_DONE); a C cache serves one dump, so there the
    chain ends with its first dump.

    @ivar onDelivered: called with a summary each time a dump has been
        delivered.
    @ivar ended: fires when the chain is over.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        cache: IStreamClientEndpoint,
        retryPolicy: RetryPolicy | None,
        linkTimeout: float = 60.0,
        checksum: bool = False,
        sessionId: str = "1",
        activity: Activity | None = None,
        cutThrough: bool = True,
    ) -> None:
        self.id = sessionId
        self.cutThrough = cutThrough and not checksum
        self.started = reactor.seconds()
        self._clock = reactor
        self.registry = SnapshotRegistry(waitForMissing=False)
        self.checksum = checksum
        self._digests: dict[ImageKey, tuple[IStoredImage, bytes]] = {}
        self._hashing = 0
        self.registry.onPublish(self._published)
        self.registry.onWriteStarted(self._writeStarted)
        #: Writes under way that the link may cut through, oldest first.
        self._writes: dict[ImageKey, IGrowableWriter] = {}
        self.seed = False
        self.onDelivered: Callable[[SessionSummary], None] = lambda summary: None
        self.ended: Deferred[None] = Deferred()
        self.over = False
        self.dumpsFinished = 0
        self.dumpsDelivered = 0
        self._sender: RemoteSender | None = None
        self._dumpComplete = False
        self._ending = False
        self._graceCall: Any = None
        self._awaitingReceipt: tuple[RemoteSender, int, int] | None = None
        kwargs: dict[str, Any] = {"clock": reactor}
        if retryPolicy is not None:
            kwargs["retryPolicy"] = retryPolicy
        factory = RemoteSenderFactory(
            self._linkUp,
            self.registry.get,
            reactor,
            linkTimeout,
            self._digestFor if checksum else None,
            self._statusReceived,
            activity,
            self._nextLive if self.cutThrough else None,
        )
        self._link = ClientService(cache, factory, **kwargs)

    @property
    def state(self) -> str:
        """For operators: what the chain is doing."""
        if self.over:
            return "complete"
        if not self._dumpComplete:
            return "dumping"
        if self.dumpsDelivered < self.dumpsFinished:
            return "forwarding"
        return "delivered"

    def start(self) -> None:
        self._link.startService()
        self.registry.whenComplete().addCallback(self._dumpFinished)

    def beginDump(self) -> None:
        """Another dump joins the chain (criu will append to C{parent})."""
        self.log.info("a new dump continues session {id}", id=self.id)
        self._dumpComplete = False
        self.registry.reopen()
        self.registry.whenComplete().addCallback(self._dumpFinished)

    def stop(self) -> Deferred[None]:
        self._cancelGrace()
        if self._sender is not None:
            self._sender.expectClose()
        return self._link.stopService()

    def _linkUp(self, sender: RemoteSender) -> None:
        self.log.info("connected to the cache")
        self._sender = sender
        self._ending = False
        self._awaitingReceipt = None
        self._cancelGrace()
        for key in self.registry.publishOrder:
            sender.enqueue(key)
        self._maybeEndDump()

    def _digestFor(self, key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        known = self._digests.get(key)
        if known is not None and known[0] is image:
            return True, known[1]
        return False, None

    def _writeStarted(self, key: ImageKey, writer: IImageWriter) -> None:
        """criu started writing an image: the link may cut it through."""
        if not self.cutThrough or not IGrowableWriter.providedBy(writer):
            return
        self._writes.pop(key, None)
        self._writes[key] = writer
        sender = self._sender
        if sender is not None:
            sender.offerLive()

    def _nextLive(self) -> tuple[ImageKey, IGrowingImage] | None:
        """The oldest image criu is still writing, for a link that is free."""
        while self._writes:
            key = next(iter(self._writes))
            writer = self._writes.pop(key)
            if writer.writing:
                return key, writer.follow()
        return None

    def _published(self, key: ImageKey, image: IStoredImage) -> None:
        writer = self._writes.get(key)
        if writer is not None and not writer.writing:
            del self._writes[key]
        sender = self._sender
        if sender is not None and sender.cutThrough(key, image):
            return  # already on its way
        if self.checksum:
            # Hash in a thread (hashlib releases the GIL); forward when known.
            self._hashing += 1
            d = deferToThread(sha256Of, OutgoingImage(image))
            d.addCallback(self._hashed, key, image)
            d.addErrback(lambda f: self.log.failure("hashing {image}", f, image=key))
            d.addBoth(self._doneHashing)
            return
        self._forward(key)

    def _hashed(self, digest: bytes, key: ImageKey, image: IStoredImage) -> None:
        if self.registry.get(key) is not image:
            return  # replaced meanwhile: the new version is being hashed
        self._digests[key] = (image, digest)
        self._forward(key)

    def _doneHashing(self, _: object) -> None:
        self._hashing -= 1
        self._maybeEndDump()

    def _forward(self, key: ImageKey) -> None:
        sender = self._sender
        if sender is not None and not sender.lost:
            sender.enqueue(key)
            self._maybeEndDump()

    def _dumpFinished(self, _: None) -> None:
        self._dumpComplete = True
        self.dumpsFinished += 1
        self.log.info(
            "dump finished: {n} images, {size} bytes",
            n=len(self.registry.keys()),
            size=self.registry.totalBytes,
        )
        self._maybeEndDump()

    # -- ending a dump -------------------------------------------------------

    def _owesMarker(self, sender: RemoteSender) -> bool:
        """Must the link be told that a dump ended?"""
        return self.dumpsDelivered < self.dumpsFinished or sender.imagesSinceMarker > 0

    def _maybeEndDump(self) -> None:
        sender = self._sender
        if not self._dumpComplete or self._ending or self._hashing or self.over:
            return
        if sender is None or sender.lost or not self._owesMarker(sender):
            return
        self._ending = True
        sender.whenIdle().addCallback(lambda _: self._endDump(sender))

    def _endDump(self, sender: RemoteSender) -> None:
        if sender.lost or sender is not self._sender or not self._dumpComplete:
            self._ending = False  # a new connection (or dump) starts over
            return
        if not sender.idle:  # an image was replaced meanwhile
            self._ending = False
            self._maybeEndDump()
            return
        if sender.extended:
            self._awaitingReceipt = (sender, sender.imagesSinceMarker, sender.bytesSinceMarker)
            sender.sendEndOfDump()
            return
        waited = self._clock.seconds() - sender.connectedAt
        if waited < HELLO_GRACE:
            self._graceCall = self._clock.callLater(HELLO_GRACE - waited, self._graceOver)
            return
        # One of CRIU's C caches: EOF ends the session, and it serves one.
        self.log.info("the cache did not say HELLO: ending the session with EOF (C cache)")
        sender.expectClose()
        self.over = True
        self._link.stopService().addCallback(lambda _: self._delivered(endChain=True))

    def _graceOver(self) -> None:
        self._graceCall = None
        self._ending = False
        self._maybeEndDump()

    def _cancelGrace(self) -> None:
        call, self._graceCall = self._graceCall, None
        if call is not None and call.active():
            call.cancel()

    def _statusReceived(self, sender: RemoteSender, status: wire.LinkStatus) -> None:
        if sender is not self._sender:
            return
        kind = status.kind
        if kind is wire.LinkStatusKind.HELLO:
            self.log.info(
                "the cache speaks twisted-criu's link extension (version {version})",
                version=status.version,
            )
            if self._graceCall is not None:
                self._cancelGrace()
                self._ending = False
                self._maybeEndDump()
        elif kind is wire.LinkStatusKind.DUMP_RECEIVED:
            pending, self._awaitingReceipt = self._awaitingReceipt, None
            self._ending = False
            if pending is None or pending[0] is not sender:
                self.log.warn("the cache confirmed a dump that was not ended; ignored")
                return
            _, images, size = pending
            if (status.images, status.size) != (images, size):
                self.log.error(
                    "the cache confirms {got} images ({gotBytes} bytes) where {images}"
                    " ({bytes} bytes) were sent; dropping the link to send them again",
                    got=status.images,
                    gotBytes=status.size,
                    images=images,
                    bytes=size,
                )
                sender.transport.abortConnection()
                return
            self._delivered(endChain=False)
        elif kind is wire.LinkStatusKind.SESSION_DONE:
            self.log.info("the cache reports that the restore finished: session {id} is over", id=self.id)
            self.over = True
            sender.expectClose()
            self._cancelGrace()
            self._link.stopService().addCallback(lambda _: self._end())

    def _delivered(self, endChain: bool) -> None:
        if self.dumpsDelivered < self.dumpsFinished:
            self.dumpsDelivered = self.dumpsFinished
            summary = self.registry.summary()
            self.log.info(
                "session complete: forwarded {images} images, {bytes} bytes",
                images=summary.images,
                bytes=summary.bytes,
                confirmed=not endChain,
            )
            self.onDelivered(summary)
        if endChain:
            self._end()

    def _end(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)


@implementer(ILocalImageService, ISessionControl)
class ImageProxyService(SessionHolder, MultiService):
    """
    The image proxy, embeddable in any Twisted application.

    @param local: where criu --remote connects (C{unix:DIR/img-proxy.sock}).
    @param streamLocal: where criu --stream connects, if at all
        (C{unix:DIR/streamer-capture.sock}).
    @param cache: where the image cache listens.
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
    ) -> None:
        super().__init__()
        #: Forward images to a twisted-criu cache while criu writes them.
        self.cutThrough = cutThrough
        self.reactor = reactor
        self.activity = Activity(reactor, progressInterval)
        self.checksum = checksum
        self.keep = keep
        #: Completed sessions kept for inspection (C{keep}), by id.
        self.kept: dict[str, ProxySession] = {}
        self._sessionCounter = 0
        self.linkTimeout = linkTimeout
        self.clientTimeout = clientTimeout
        self.store: IImageStore = store if store is not None else MemoryStore()
        self.readVariant = readVariant
        self._cache = LoggingClientEndpoint(cache, cacheDescription)
        self._retryPolicy = retryPolicy
        self._observers: list[Deferred[SessionSummary]] = []
        self.session: ProxySession | None = None
        self.sessionsCompleted = 0
        self.localEndpoint = ObservedServerEndpoint(local)
        listener = StreamServerEndpointService(self.localEndpoint, LocalImageFactory(self))
        listener._raiseSynchronously = True
        listener.setServiceParent(self)
        self.streamEndpoint: ObservedServerEndpoint | None = None
        if streamLocal is not None:
            self.streamEndpoint = ObservedServerEndpoint(streamLocal)
            streamListener = StreamServerEndpointService(
                self.streamEndpoint, StreamCaptureFactory(self)
            )
            streamListener._raiseSynchronously = True
            streamListener.setServiceParent(self)

    def startService(self) -> None:
        try:
            super().startService()
        except BaseException:
            self.stopService()  # close the listeners that did start
            raise
        self.activity.startReporting()
        self._newSession()

    def stopService(self) -> Deferred[None]:
        self.activity.stopReporting()
        d: Deferred[Any] = super().stopService()
        session = self.session
        if session is not None:
            d.addCallback(lambda _: session.stop())
        d.addBoth(self._closeStore)
        return d

    def _closeStore(self, result: object) -> object:
        self.releaseAll()
        self.store.close()
        return result

    def whenSessionDone(self) -> Deferred[SessionSummary]:
        """Fires with a summary when the current (or next) session completes."""
        d: Deferred[SessionSummary] = Deferred()
        self._observers.append(d)
        return d

    def _newSession(self) -> ProxySession:
        self._sessionCounter += 1
        session = ProxySession(
            self.reactor,
            self._cache,
            self._retryPolicy,
            self.linkTimeout,
            self.checksum,
            sessionId=str(self._sessionCounter),
            activity=self.activity,
            cutThrough=self.cutThrough,
        )
        self.session = session
        session.onDelivered = self._dumpDelivered
        session.ended.addCallback(lambda _: self._sessionEnded(session))
        session.start()
        self.log.info("session {id} started", id=session.id)
        return session

    def _dumpDelivered(self, summary: SessionSummary) -> None:
        self.sessionsCompleted += 1
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(summary)

    def _sessionEnded(self, session: ProxySession) -> None:
        if self.session is session:
            self.session = None
        self.retire(session)

    @property
    def readsWaiting(self) -> int:
        """criu reads waiting for a write of their image to complete."""
        return 0 if self.session is None else self.session.registry.waiting

    # -- ISessionControl ----------------------------------------------------

    role = "proxy"

    def currentSession(self) -> Any:
        return self.session

    def dropSession(self, sessionId: str) -> SessionView:
        session: ProxySession = self.findSession(sessionId)
        view = SessionView.of(session.id, "dropped", False, session.started, session.registry)
        if session is self.session:
            if session.state != "delivered" or session.registry.writesInProgress:
                raise SessionBusy(
                    f"session {sessionId} is {session.state}: drop it once its dump"
                    " has been delivered"
                )
            self.session = None
            session.over = True
            session.stop()
        else:
            del self.kept[sessionId]
        session.registry.release()
        self.log.info("session {id} dropped by the operator", id=sessionId)
        return view

    # -- ILocalImageService --------------------------------------------------

    def registryFor(self, request: wire.LocalRequest) -> SnapshotRegistry:
        session = self.session
        if session is None or session.over:
            session = self._newSession()
        elif session.registry.closed and request.kind is not wire.OpenKind.READ:
            session.beginDump()
        if request.isSeed:
            session.seed = True
        return session.registry

    def finishRequested(self, request: wire.LocalRequest) -> None:
        session = self.session
        if session is None:
            self.log.warn("finish from criu with no dump in progress")
            return
        self.log.info("criu finished its dump")
        session.registry.close()

    def readsInline(self, request: wire.LocalRequest) -> bool:
        session = self.session
        return readsInline(self.readVariant, request, session is not None and session.seed)
