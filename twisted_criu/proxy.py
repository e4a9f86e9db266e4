# -*- test-case-name: tests.test_proxy -*-
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
from twisted_criu.endpoints import LoggingClientEndpoint, ObservedServerEndpoint
from twisted_criu.errors import ImageKey
from twisted_criu.interfaces import IImageStore, IStoredImage
from twisted_criu.local import ILocalImageService, LocalImageFactory
from twisted_criu.registry import SessionSummary, SnapshotRegistry
from twisted_criu.remote import RemoteSender, RemoteSenderFactory
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.transfer import ImageTransfer, sha256Of
from twisted_criu.stream import StreamCaptureFactory
from twisted_criu.variants import ReadVariant, readsInline

RetryPolicy = Callable[[int], float]


class ProxySession:
    """
    One dump: a registry of its images and a link forwarding them.

    Every connection of the link starts by sending everything published so
    far (the protocol has no acknowledgements, and a restarted cache holds
    nothing), then follows new publications.  Once the dump finished, no
    write is pending and the link is idle, the link is closed: that EOF tells
    the cache the session is over.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        cache: IStreamClientEndpoint,
        retryPolicy: RetryPolicy | None,
        linkTimeout: float = 60.0,
        checksum: bool = False,
    ) -> None:
        self.registry = SnapshotRegistry(waitForMissing=False)
        self.checksum = checksum
        self._digests: dict[ImageKey, tuple[IStoredImage, bytes]] = {}
        self._hashing = 0
        self.registry.onPublish(self._published)
        self.seed = False
        self.done: Deferred[SessionSummary] = Deferred()
        self._sender: RemoteSender | None = None
        self._dumpComplete = False
        self._closing = False
        kwargs: dict[str, Any] = {"clock": reactor}
        if retryPolicy is not None:
            kwargs["retryPolicy"] = retryPolicy
        factory = RemoteSenderFactory(
            self._linkUp,
            self.registry.get,
            reactor,
            linkTimeout,
            self._digestFor if checksum else None,
        )
        self._link = ClientService(cache, factory, **kwargs)

    def start(self) -> None:
        self._link.startService()
        self.registry.whenComplete().addCallback(self._dumpFinished)

    def stop(self) -> Deferred[None]:
        if self._sender is not None:
            self._sender.expectClose()
        return self._link.stopService()

    def _linkUp(self, sender: RemoteSender) -> None:
        self.log.info("connected to the cache")
        self._sender = sender
        for key in self.registry.publishOrder:
            sender.enqueue(key)
        self._maybeClose()

    def _digestFor(self, key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        known = self._digests.get(key)
        if known is not None and known[0] is image:
            return True, known[1]
        return False, None

    def _published(self, key: ImageKey, image: IStoredImage) -> None:
        if self.checksum:
            # Hash in a thread (hashlib releases the GIL); forward when known.
            self._hashing += 1
            d = deferToThread(sha256Of, ImageTransfer(image))
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
        self._maybeClose()

    def _forward(self, key: ImageKey) -> None:
        sender = self._sender
        if sender is not None and not sender.lost:
            sender.enqueue(key)
            self._maybeClose()

    def _dumpFinished(self, _: None) -> None:
        self._dumpComplete = True
        self.log.info(
            "dump finished: {n} images, {size} bytes",
            n=len(self.registry.keys()),
            size=self.registry.totalBytes,
        )
        self._maybeClose()

    def _maybeClose(self) -> None:
        sender = self._sender
        if not self._dumpComplete or self._closing or self._hashing:
            return
        if sender is None or sender.lost:
            return
        self._closing = True
        sender.whenIdle().addCallback(lambda _: self._closeLink(sender))

    def _closeLink(self, sender: RemoteSender) -> None:
        if sender.lost:  # a new connection will resend and close
            self._closing = False
            return
        summary = self.registry.summary()
        self.log.info(
            "session complete: forwarded {images} images, {bytes} bytes",
            images=summary.images,
            bytes=summary.bytes,
        )
        sender.expectClose()
        self._link.stopService().addCallback(lambda _: self.done.callback(summary))


@implementer(ILocalImageService)
class ImageProxyService(MultiService):
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
    ) -> None:
        super().__init__()
        self.reactor = reactor
        self.checksum = checksum
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
        self._newSession()

    def stopService(self) -> Deferred[None]:
        d: Deferred[Any] = super().stopService()
        session = self.session
        if session is not None:
            d.addCallback(lambda _: session.stop())
        d.addBoth(self._closeStore)
        return d

    def _closeStore(self, result: object) -> object:
        if self.session is not None:
            self.session.registry.release()
        self.store.close()
        return result

    def whenSessionDone(self) -> Deferred[SessionSummary]:
        """Fires with a summary when the current (or next) session completes."""
        d: Deferred[SessionSummary] = Deferred()
        self._observers.append(d)
        return d

    def _newSession(self) -> ProxySession:
        session = ProxySession(
            self.reactor, self._cache, self._retryPolicy, self.linkTimeout, self.checksum
        )
        self.session = session
        session.done.addCallback(self._sessionDone, session)
        session.start()
        return session

    def _sessionDone(self, summary: SessionSummary, session: ProxySession) -> None:
        self.sessionsCompleted += 1
        session.registry.release()
        if self.session is session:
            self.session = None
        observers, self._observers = self._observers, []
        for d in observers:
            d.callback(summary)

    # -- ILocalImageService --------------------------------------------------

    def registryFor(self, request: wire.LocalRequest) -> SnapshotRegistry:
        session = self.session
        if session is None or (
            session.registry.closed and request.kind is not wire.OpenKind.READ
        ):
            session = self._newSession()
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
