# -*- test-case-name: tests.test_remote -*-
"""
The remote leg: proxy -> cache over one stream connection (TCP, TLS, ...).

For every image, a C{remote_image_entry} frame then exactly C{size} raw
bytes; a clean close where a header would start ends the session.  Nothing
flows from the cache to the proxy.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
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


#: C{(key, image) -> (ready, sha256)}: the checksum to send with an image.
DigestLookup = Callable[[ImageKey, IStoredImage], "tuple[bool, bytes | None]"]


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
        clock: IReactorTime | None = None,
        stallTimeout: float = 60.0,
        digestFor: DigestLookup | None = None,
    ) -> None:
        self._connected = connected
        self._imageFor = imageFor
        self._digestFor = digestFor
        self._clock = clock
        self.stallTimeout = stallTimeout
        self._watchdog: IDelayedCall | None = None
        self._transfer: ImageTransfer | None = None
        self._queue: dict[ImageKey, None] = {}
        self._sending = False
        self._idleWaiters: list[Deferred[None]] = []
        self.imagesSent = 0
        self.bytesSent = 0
        self.lost = False
        #: We are closing the link on purpose (end of session, or a stall).
        self._dropping = False

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
            if image is None:
                continue
            digest = None
            if self._digestFor is not None:
                ready, digest = self._digestFor(key, image)
                if not ready:
                    continue  # enqueued again once its checksum is known
            self._send(key, image, digest)
        if not self._sending and not self._queue:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def _send(self, key: ImageKey, image: IStoredImage, digest: bytes | None) -> None:
        snapshotId, name = key
        transfer = ImageTransfer(image)
        header = wire.RemoteHeader(name, snapshotId, wire.O_WRONLY, transfer.size, digest)
        self._sending = True
        self._transfer = transfer
        self._armWatchdog(key, -1)
        self.transport.write(header.toBytes())

        def sent(_: None) -> None:
            self._sending = False
            self._disarmWatchdog()
            self.imagesSent += 1
            self.bytesSent += transfer.size
            self.log.info(
                "forwarded {image} ({size} bytes)", image=describe(key), size=transfer.size
            )
            self._sendNext()

        def failed(reason: Failure) -> None:
            self._sending = False
            self._disarmWatchdog()
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

    def _armWatchdog(self, key: ImageKey, lastSent: int, since: float | None = None) -> None:
        """
        Drop the link if forwarding C{key} makes no progress for
        C{stallTimeout} seconds (checked four times as often, so a stall is
        noticed within 1.25 timeouts).
        """
        clock = self._clock
        if clock is None:
            return
        transfer = self._transfer
        if transfer is None or self.lost:
            return
        now = clock.seconds()
        if since is None or transfer.sent != lastSent:
            since = now
        elif now - since >= self.stallTimeout:
            self.log.error(
                "link stalled: no progress forwarding {image} for {seconds} s"
                " ({sent} of {size} bytes sent); dropping it",
                image=describe(key),
                seconds=self.stallTimeout,
                sent=transfer.sent,
                size=transfer.size,
            )
            self._dropping = True
            self.transport.abortConnection()
            return
        self._watchdog = clock.callLater(
            self.stallTimeout / 4, self._armWatchdog, key, transfer.sent, since
        )

    def _disarmWatchdog(self) -> None:
        watchdog, self._watchdog = self._watchdog, None
        self._transfer = None
        if watchdog is not None and watchdog.active():
            watchdog.cancel()

    def expectClose(self) -> None:
        """We are about to end the link on purpose: do not report it as lost."""
        self._dropping = True

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        sending = self._sending
        self._disarmWatchdog()
        if not self._dropping and not sending:
            # (While forwarding, the transfer's own failure says it.)
            self.log.warn(
                "link to the cache lost while idle: {why}; reconnecting",
                why=reason.getErrorMessage(),
            )


class IRemoteImageSink(Interface):
    """What the cache offers the receiving end of a link."""

    store = Attribute("The L{IImageStore} received images go to.")
    reactor = Attribute("The reactor (for timeouts).")
    linkTimeout = Attribute("Seconds a link may stall inside a frame.")

    def linkOpened(receiver: RemoteReceiver) -> SnapshotRegistry:
        """A proxy connected; return the registry its images go to."""

    def linkClosed(receiver: RemoteReceiver, clean: bool) -> None:
        """The link ended: cleanly (session over) or not (it may come back)."""


class RemoteReceiver(Protocol, TimeoutMixin):
    """
    The cache's end of a link: header, then exactly C{size} bytes, repeat.

    Between images the link may be silent for as long as a dump takes; in
    the middle of a frame, silence for C{sink.linkTimeout} drops it.
    """

    log = Logger()
    transport: Any

    def __init__(self, sink: IRemoteImageSink) -> None:
        self.sink = sink
        self._frames = wire.FrameBuffer()
        self._registry: SnapshotRegistry | None = None
        self._header: wire.RemoteHeader | None = None
        self._hash: Any = None
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
        self._receive(data)
        inFrame = self._writer is not None or self._frames.pending > 0
        self.setTimeout(self.sink.linkTimeout if inFrame else None)

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # for TimeoutMixin
        return self.sink.reactor.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.log.error(
            "link stalled: no bytes from the proxy for {seconds} s in the middle of"
            " a frame; dropping it",
            seconds=self.sink.linkTimeout,
        )
        self.transport.abortConnection()

    def _receive(self, data: bytes) -> None:
        while data:
            if self._writer is not None:
                remaining = self._remaining
                if len(data) <= remaining:
                    chunk, data = data, b""
                else:
                    chunk, data = data[:remaining], data[remaining:]
                if self._hash is not None:
                    self._hash.update(chunk)
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
                if not self._remaining and not self._finishImage():
                    return
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
            if not self._startImage(header):
                return

    def _currentKey(self) -> ImageKey:
        assert self._header is not None
        return (self._header.snapshotId, self._header.name)

    def _startImage(self, header: wire.RemoteHeader) -> bool:
        registry = self._registry
        assert registry is not None
        key = (header.snapshotId, header.name)
        store: IImageStore = self.sink.store
        room = store.room()
        if room is not None and header.size > room:
            self.log.error(
                "refusing {image}: {size} bytes announced, room for {room}"
                " (memory budget plus free spill space); dropping the link",
                image=describe(key),
                size=header.size,
                room=room,
            )
            self.transport.abortConnection()
            return False
        registry.beginWrite(key)
        self._header = header
        self._hash = hashlib.sha256() if header.sha256 is not None else None
        self._writer = store.newWriter()
        self._remaining = header.size
        if not self._remaining:
            return self._finishImage()
        return True

    def _finishImage(self) -> bool:
        header, writer = self._header, self._writer
        assert header is not None and writer is not None and self._registry
        self._header, self._writer = None, None
        key = (header.snapshotId, header.name)
        digest, self._hash = self._hash, None
        if digest is not None and digest.digest() != header.sha256:
            self.log.error(
                "SHA-256 mismatch for {image} ({size} bytes): discarded; dropping the link",
                image=describe(key),
                size=header.size,
            )
            writer.abort()
            self._registry.abortWrite(key)
            self.transport.abortConnection()
            return False
        image = writer.commit()
        self.imagesReceived += 1
        self.bytesReceived += header.size
        self.log.info("received {image} ({size} bytes)", image=describe(key), size=header.size)
        if wire.openKind(header.openMode) is wire.OpenKind.APPEND:
            self._registry.publishAppend(key, image, self.sink.store)
        else:
            self._registry.publish(key, image)
        return True

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.setTimeout(None)
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
        clock: IReactorTime | None = None,
        stallTimeout: float = 60.0,
        digestFor: DigestLookup | None = None,
    ) -> None:
        self.connected = connected
        self.imageFor = imageFor
        self.clock = clock
        self.stallTimeout = stallTimeout
        self.digestFor = digestFor

    def buildProtocol(self, addr: Any) -> RemoteSender:
        protocol = RemoteSender(
            self.connected, self.imageFor, self.clock, self.stallTimeout, self.digestFor
        )
        protocol.factory = self
        return protocol
