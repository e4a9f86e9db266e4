# -*- test-case-name: tests.test_remote -*-
"""
The remote leg: proxy -> cache over one stream connection (TCP, TLS, ...).

For every image, a C{remote_image_entry} frame then exactly C{size} raw
bytes; a clean close where a header would start ends the session.  Nothing
flows from the cache to the proxy.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from twisted_criu import wire
from twisted_criu.errors import ImageKey, ProtocolError
from twisted_criu.interfaces import IImageStore, IImageWriter, IStoredImage
from twisted_criu.local import describe
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.transfer import ImageSizeMismatch, ImageTransfer

#: Socket read size on the link (Twisted's default is 64 KiB).
LINK_READ_SIZE = 1 << 20


class RemoteSender(Protocol):
    """
    The proxy's end of a link: forwards images one at a time, in the order
    L{enqueue} was called, each as a header frame plus its raw bytes.
    """

    log = Logger()
    transport: Any

    def __init__(
        self,
        connected: Callable[[RemoteSender], None],
        imageFor: Callable[[ImageKey], IStoredImage | None],
    ) -> None:
        self._connected = connected
        self._imageFor = imageFor
        self._queue: dict[ImageKey, None] = {}
        self._sending = False
        self._idleWaiters: list[Deferred[None]] = []
        self.imagesSent = 0
        self.bytesSent = 0
        self.lost = False

    def connectionMade(self) -> None:
        self._connected(self)

    def enqueue(self, key: ImageKey) -> None:
        """
        Forward the image under C{key}: the version current when its turn
        comes.  A key already waiting moves to the end of the queue, so each
        version is sent once, in the order the versions completed.
        """
        self._queue.pop(key, None)
        self._queue[key] = None
        self._sendNext()

    @property
    def idle(self) -> bool:
        return not self._sending and not self._queue

    def whenIdle(self) -> Deferred[None]:
        """Fires once everything enqueued so far has been handed over."""
        d: Deferred[None] = Deferred()
        self._idleWaiters.append(d)
        self._sendNext()
        return d

    def _sendNext(self) -> None:
        while not self._sending and not self.lost and self._queue:
            key = next(iter(self._queue))
            del self._queue[key]
            image = self._imageFor(key)
            if image is not None:
                self._send(key, image)
        if not self._sending and not self._queue:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def _send(self, key: ImageKey, image: IStoredImage) -> None:
        snapshotId, name = key
        transfer = ImageTransfer(image)
        header = wire.RemoteHeader(name, snapshotId, wire.O_WRONLY, transfer.size)
        self._sending = True
        self.transport.write(header.toBytes())

        def sent(_: None) -> None:
            self._sending = False
            self.imagesSent += 1
            self.bytesSent += transfer.size
            self.log.info(
                "forwarded {image} ({size} bytes)", image=describe(key), size=transfer.size
            )
            self._sendNext()

        def failed(reason: Failure) -> None:
            self._sending = False
            if reason.check(ImageSizeMismatch):
                self.log.error(
                    "store failure while forwarding {image}, dropping the link: {why}",
                    image=describe(key),
                    why=reason.getErrorMessage(),
                )
                self.transport.abortConnection()
                return
            self.log.warn(
                "link lost while forwarding {image}: {why}",
                image=describe(key),
                why=reason.getErrorMessage(),
            )

        transfer.sendTo(self.transport).addCallbacks(sent, failed)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True


class IRemoteImageSink(Interface):
    """What the cache offers the receiving end of a link."""

    store = Attribute("The L{IImageStore} received images go to.")

    def linkOpened(receiver: RemoteReceiver) -> SnapshotRegistry:
        """A proxy connected; return the registry its images go to."""

    def linkClosed(receiver: RemoteReceiver, clean: bool) -> None:
        """The link ended: cleanly (session over) or not (it may come back)."""


class RemoteReceiver(Protocol):
    """The cache's end of a link: header, then exactly C{size} bytes, repeat."""

    log = Logger()
    transport: Any

    def __init__(self, sink: IRemoteImageSink) -> None:
        self.sink = sink
        self._frames = wire.FrameBuffer()
        self._registry: SnapshotRegistry | None = None
        self._header: wire.RemoteHeader | None = None
        self._writer: IImageWriter | None = None
        self._remaining = 0
        self.imagesReceived = 0
        self.bytesReceived = 0

    def connectionMade(self) -> None:
        self.transport.bufferSize = LINK_READ_SIZE
        self._registry = self.sink.linkOpened(self)
        peer = self.transport.getPeer()
        self.log.info("proxy connected from {peer}", peer=str(peer))

    def dataReceived(self, data: bytes) -> None:
        while data:
            if self._writer is not None:
                remaining = self._remaining
                if len(data) <= remaining:
                    chunk, data = data, b""
                else:
                    chunk, data = data[:remaining], data[remaining:]
                try:
                    self._writer.write(chunk)
                except OSError as e:
                    self.log.error(
                        "cannot store {image}, dropping the link: {why}",
                        image=describe(self._currentKey()),
                        why=str(e),
                    )
                    self.transport.abortConnection()
                    return
                self._remaining -= len(chunk)
                if not self._remaining:
                    self._finishImage()
                continue
            try:
                payload = self._frames.feed(data)
                if payload is None:
                    return
                header = wire.RemoteHeader.fromBytes(payload)
            except ProtocolError as e:
                self.log.error(
                    "bad frame from the proxy, dropping the link: {error}",
                    error=str(e),
                )
                self.transport.abortConnection()
                return
            data = self._frames.takeRest()
            self._startImage(header)

    def _currentKey(self) -> ImageKey:
        assert self._header is not None
        return (self._header.snapshotId, self._header.name)

    def _startImage(self, header: wire.RemoteHeader) -> None:
        registry = self._registry
        assert registry is not None
        key = (header.snapshotId, header.name)
        registry.beginWrite(key)
        store: IImageStore = self.sink.store
        self._header = header
        self._writer = store.newWriter()
        self._remaining = header.size
        if not self._remaining:
            self._finishImage()

    def _finishImage(self) -> None:
        header, writer = self._header, self._writer
        assert header is not None and writer is not None and self._registry
        self._header, self._writer = None, None
        image = writer.commit()
        key = (header.snapshotId, header.name)
        self.imagesReceived += 1
        self.bytesReceived += header.size
        self.log.info("received {image} ({size} bytes)", image=describe(key), size=header.size)
        if wire.openKind(header.openMode) is wire.OpenKind.APPEND:
            self._registry.publishAppend(key, image, self.sink.store)
        else:
            self._registry.publish(key, image)

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        header, writer = self._header, self._writer
        clean = reason.check(ConnectionDone) is not None and writer is None
        if header is not None and writer is not None and self._registry is not None:
            self._header, self._writer = None, None
            self.log.error(
                "link lost in the middle of {image}: {got} of {size} bytes arrived;"
                " discarded ({why})",
                image=describe((header.snapshotId, header.name)),
                got=header.size - self._remaining,
                size=header.size,
                why=reason.getErrorMessage(),
            )
            writer.abort()
            self._registry.abortWrite((header.snapshotId, header.name))
        elif self._frames.pending:
            clean = False
            self.log.error(
                "link lost inside a header frame ({n} bytes)", n=self._frames.pending
            )
        self.sink.linkClosed(self, clean)


class RemoteReceiverFactory(Factory):
    noisy = False

    def __init__(self, sink: IRemoteImageSink) -> None:
        self.sink = sink

    def buildProtocol(self, addr: Any) -> RemoteReceiver:
        protocol = RemoteReceiver(self.sink)
        protocol.factory = self
        return protocol


class RemoteSenderFactory(Factory):
    noisy = False

    def __init__(
        self,
        connected: Callable[[RemoteSender], None],
        imageFor: Callable[[ImageKey], IStoredImage | None],
    ) -> None:
        self.connected = connected
        self.imageFor = imageFor

    def buildProtocol(self, addr: Any) -> RemoteSender:
        protocol = RemoteSender(self.connected, self.imageFor)
        protocol.factory = self
        return protocol
