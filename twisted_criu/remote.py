# -*- test-case-name: tests.test_remote -*-
"""
The remote leg: proxy -> cache over one stream connection (TCP, TLS, ...).

For every image, a C{remote_image_entry} frame then exactly C{size} raw
bytes; a clean close where a header would start ends the session.  That is
all CRIU's C daemons know, and nothing flows from the cache to the proxy.

twisted-criu's daemons add an extension that the C peers never notice: a
twisted-criu proxy sets field 6 (C{link_version}) on every header, which a
C cache skips; a twisted-criu cache that sees it answers with a
C{link_status_entry} HELLO (it never writes to a proxy that did not set it:
a C proxy does not read its socket, and closing it with unread bytes would
reset the connection and lose the stream's tail).  A proxy that was
greeted ends each dump with an end-of-dump marker instead of closing the
link; the cache confirms it with DUMP_RECEIVED (so the proxy knows every
byte was stored, not just sent), and once the restore has finished it
sends SESSION_DONE and closes the link, which tells the proxy that its
chain of dumps is over.  A proxy that is not greeted ends the session
with EOF, as the C proxy does.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.internet import main, tcp
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.protocols.policies import TimeoutMixin
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import Attribute, Interface

from twisted_criu import wire
from twisted_criu.activity import Activity, Direction, Transfer
from twisted_criu.errors import ImageKey, ProtocolError
from twisted_criu.cutthrough import ImageAborted, LiveTransfer
from twisted_criu.interfaces import IGrowingImage, IImageStore, IImageWriter, IStoredImage
from twisted_criu.local import describe
from twisted_criu.pacing import pauseWhileBehind
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.transfer import ImageSizeMismatch, ImageTransfer

#: How much of an image body one read on the link may take.  Bodies are
#: read into one reused buffer of this size (see L{RemoteReceiver}); headers
#: use Twisted's own reads (64 KiB).
LINK_READ_SIZE = 1 << 20


#: C{(key, image) -> (ready, sha256)}: the checksum to send with an image.
DigestLookup = Callable[[ImageKey, IStoredImage], "tuple[bool, bytes | None]"]

#: Gives the link, when it is free, an image criu is still writing to cut
#: through (or None).
LiveLookup = Callable[[], "tuple[ImageKey, IGrowingImage] | None"]


_buffer: list[memoryview] = []


def _bodyBuffer() -> memoryview:
    """
    The one buffer image bodies are read into.  One is enough: the reactor
    runs one read at a time, and the store copies the bytes before the read
    returns.
    """
    if not _buffer:
        _buffer.append(memoryview(bytearray(LINK_READ_SIZE)))
    return _buffer[0]


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
        statusReceived: Callable[[RemoteSender, wire.LinkStatus], None] | None = None,
        activity: Activity | None = None,
        nextLive: LiveLookup | None = None,
    ) -> None:
        self._connected = connected
        self._nextLive = nextLive
        self._statusReceived = statusReceived
        if activity is None:  # counted nowhere else, but timed all the same
            from twisted.internet import reactor

            activity = Activity(clock if clock is not None else reactor)
        self._activity = activity
        self._frames = wire.FrameBuffer()
        #: The cache said HELLO: it speaks twisted-criu's link extension.
        self.extended = False
        #: The extension version the cache said HELLO with.
        self.peerVersion = 0
        #: Images cut through on this connection, by key: their growing view.
        self._cutThrough: dict[ImageKey, IGrowingImage] = {}
        self.connectedAt = 0.0
        #: Images and bytes handed over since the last end-of-dump marker.
        self.imagesSinceMarker = 0
        self.bytesSinceMarker = 0
        self._imageFor = imageFor
        self._digestFor = digestFor
        self._clock = clock
        self.stallTimeout = stallTimeout
        self._watchdog: IDelayedCall | None = None
        self._transfer: ImageTransfer | LiveTransfer | None = None
        self._queue: dict[ImageKey, None] = {}
        self._sending = False
        self._idleWaiters: list[Deferred[None]] = []
        self.imagesSent = 0
        self.bytesSent = 0
        self.lost = False
        #: We are closing the link on purpose (end of session, or a stall).
        self._dropping = False

    def connectionMade(self) -> None:
        if self._clock is not None:
            self.connectedAt = self._clock.seconds()
        self._connected(self)

    def dataReceived(self, data: bytes) -> None:
        """Link statuses from a twisted-criu cache (a C cache sends nothing)."""
        rest = data
        while rest and not self.lost:
            try:
                payload = self._frames.feed(rest)
                if payload is None:
                    return
                status = wire.LinkStatus.fromBytes(payload)
            except ProtocolError as e:
                self.log.error(
                    "the cache sent bytes that are not a link status ({error}); is it"
                    " a TLS endpoint (--tls on one end only)? Dropping the link",
                    error=str(e),
                )
                self._dropping = True
                self.transport.abortConnection()
                return
            rest = self._frames.takeRest()
            if status.kind is wire.LinkStatusKind.HELLO:
                self.extended = True
                self.peerVersion = status.version
                self._sendNext()  # a write under way may now be cut through
            if self._statusReceived is not None:
                self._statusReceived(self, status)

    def sendEndOfDump(self) -> None:
        """Tell an extended cache that the dump is complete (nothing is pending)."""
        assert self.extended and self.idle
        self.transport.write(wire.END_OF_DUMP.toBytes())
        self.imagesSinceMarker = 0
        self.bytesSinceMarker = 0

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

    def offerLive(self) -> None:
        """A write started: if the link is free, it may be cut through now."""
        self._sendNext()

    def cutThrough(self, key: ImageKey, image: IStoredImage) -> bool:
        """Was C{image} (just published) sent, or is it being sent, as chunks?"""
        growing = self._cutThrough.get(key)
        if growing is None or growing.image is not image:
            return False
        del self._cutThrough[key]
        return True

    def sendLive(self, key: ImageKey, growing: IGrowingImage) -> None:
        """Send the image criu is writing under C{key} as it grows."""
        assert self.idle and self.peerVersion >= 2
        snapshotId, name = key
        transfer = LiveTransfer(growing)
        header = wire.RemoteHeader(
            name, snapshotId, wire.O_WRONLY, 0, None, wire.LINK_EXTENSION_VERSION, True
        )
        self._cutThrough[key] = growing
        moving = self._begin(key, header, transfer, None)

        def sent(size: int) -> None:
            self._forwarded(key, size, moving, ", cut through")

        def failed(reason: Failure) -> None:
            self._ended(moving)
            self._cutThrough.pop(key, None)
            if reason.check(ImageAborted):
                self.log.info(
                    "criu's write of {image} broke off: the cache discards it", image=describe(key)
                )
                self._sendNext()
                return
            self.log.warn(
                "link lost while forwarding {image} (cut through): {why}",
                image=describe(key),
                why=reason.getErrorMessage(),
            )

        transfer.sendTo(self.transport).addCallbacks(sent, failed)

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
        if not self._sending and not self._queue and not self.lost:
            live = self._nextLive() if self._nextLive is not None and self.peerVersion >= 2 else None
            if live is not None:
                self.sendLive(*live)
                return
        if not self._sending and not self._queue:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def _send(self, key: ImageKey, image: IStoredImage, digest: bytes | None) -> None:
        snapshotId, name = key
        transfer = ImageTransfer(image)
        header = wire.RemoteHeader(
            name, snapshotId, wire.O_WRONLY, transfer.size, digest, wire.LINK_EXTENSION_VERSION
        )
        moving = self._begin(key, header, transfer, transfer.size)

        def sent(_: None) -> None:
            self._forwarded(key, transfer.size, moving, "")

        def failed(reason: Failure) -> None:
            self._ended(moving)
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

    def _begin(
        self, key: ImageKey, header: wire.RemoteHeader, transfer: ImageTransfer | LiveTransfer, size: int | None
    ) -> Transfer:
        """Start forwarding C{key}: its header now, its bytes by C{transfer}."""
        self._sending = True
        self._transfer = transfer
        self._armWatchdog(key, -1)
        self.transport.write(header.toBytes())
        return self._activity.begin(Direction.TO_CACHE, describe(key), size, lambda: transfer.sent)

    def _ended(self, moving: Transfer | None) -> None:
        """The image being forwarded is done with (C{moving} if it failed)."""
        self._sending = False
        self._disarmWatchdog()
        if moving is not None:
            self._activity.abandon(moving)

    def _forwarded(self, key: ImageKey, size: int, moving: Transfer, how: str) -> None:
        """All of C{key} is handed over: count it, say so, send the next."""
        self._ended(None)
        self.imagesSent += 1
        self.bytesSent += size
        self.imagesSinceMarker += 1
        self.bytesSinceMarker += size
        self.log.info(
            "forwarded {image} ({size} bytes{how}) {timing}",
            image=describe(key),
            size=size,
            how=how,
            **self._activity.end(moving, size),
        )
        self._sendNext()

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
        if since is None or transfer.sent != lastSent or transfer.waiting:
            since = now  # progress, or waiting for criu rather than the link
        elif now - since >= self.stallTimeout:
            self.log.error(
                "link stalled: no progress forwarding {image} for {seconds} s"
                " ({sent} of {size} bytes sent); dropping it",
                image=describe(key),
                seconds=self.stallTimeout,
                sent=transfer.sent,
                size=getattr(transfer, "size", "its"),
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
    activity = Attribute("The daemon's L{Activity}: transfers and counters.")
    linkTimeout = Attribute("Seconds a link may stall inside a frame.")

    def linkOpened(receiver: RemoteReceiver) -> SnapshotRegistry:
        """A proxy connected; return the registry its images go to."""

    def linkClosed(receiver: RemoteReceiver, clean: bool) -> None:
        """The link ended: cleanly (session over) or not (it may come back)."""

    def dumpEnded(receiver: RemoteReceiver) -> None:
        """The proxy's end-of-dump marker: the link stays, idle, for the next dump."""

    def dumpStarted(receiver: RemoteReceiver) -> SnapshotRegistry:
        """Images arrive on a link after its end-of-dump marker: a new dump."""


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
        #: The current image is chunked (cut through): lengths come between chunks.
        self._chunked = False
        self._chunkLength = bytearray()
        #: Bytes of the current image received so far.
        self._received = 0
        self._plainRead: Callable[[], Any] | None = None
        self._moving: Transfer | None = None
        self.imagesReceived = 0
        self.bytesReceived = 0
        #: The proxy ended its dump with a marker; the link is idle.
        self.betweenDumps = False
        #: The proxy's headers carry a link version: it reads link statuses.
        self.peerExtended = False
        self._imagesSinceMarker = 0
        self._bytesSinceMarker = 0

    def connectionMade(self) -> None:
        transport: Any = self.transport
        if isinstance(transport, tcp.Connection):
            # Image bodies are read straight into a reused buffer: a fresh
            # bytes object per read costs more than the copy itself (page
            # faults, and mmap churn for reads of 128 KiB and more).
            self._plainRead = transport.doRead
            setattr(transport, "doRead", self._readBody)
        self._registry = self.sink.linkOpened(self)
        peer = self.transport.getPeer()
        self.log.info("proxy connected from {peer}", peer=str(peer))

    def sendStatus(self, status: wire.LinkStatus) -> None:
        """Tell a twisted-criu proxy (never a C proxy: see L{peerExtended})."""
        if self.peerExtended:
            self.transport.write(status.toBytes())

    def _endOfDump(self) -> None:
        images, size = self._imagesSinceMarker, self._bytesSinceMarker
        self._imagesSinceMarker = self._bytesSinceMarker = 0
        self.betweenDumps = True
        self.log.info(
            "the proxy ended its dump: {images} images, {bytes} bytes on this link",
            images=images,
            bytes=size,
        )
        self.sink.dumpEnded(self)
        self.sendStatus(wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=images, size=size))

    def dataReceived(self, data: bytes | memoryview) -> None:
        self._receive(data)
        # Between the chunks of a cut-through image the proxy waits for
        # criu, which may be slow: like between images, that is no stall.
        inImage = self._writer is not None and (self._remaining > 0 or len(self._chunkLength) > 0)
        self.setTimeout(self.sink.linkTimeout if inImage or self._frames.pending > 0 else None)

    def _readBody(self) -> Any:
        """The TCP transport's C{doRead} while this protocol is connected."""
        remaining = self._remaining
        if self._writer is None:
            assert self._plainRead is not None
            return self._plainRead()
        # Inside an image (a chunked one may be between chunks: the length
        # and the next bytes come together).
        view = _bodyBuffer()[: min(remaining, LINK_READ_SIZE) if remaining else LINK_READ_SIZE]
        try:
            count = self.transport.socket.recv_into(view)
        except BlockingIOError:
            return None
        except OSError:
            return main.CONNECTION_LOST
        if not count:
            return main.CONNECTION_DONE
        self.dataReceived(view[:count])  # never kept: the store copies it
        return None

    def callLater(self, period: float, func: Callable[[], None]) -> Any:  # for TimeoutMixin
        return self.sink.reactor.callLater(period, func)

    def timeoutConnection(self) -> None:
        self.log.error(
            "link stalled: no bytes from the proxy for {seconds} s in the middle of"
            " a frame; dropping it",
            seconds=self.sink.linkTimeout,
        )
        self.transport.abortConnection()

    def _receive(self, data: bytes | memoryview) -> None:
        while data:
            if self._writer is not None and self._chunked and not self._remaining:
                rest = self._chunkBoundary(data)
                if rest is None:
                    return
                data = rest
                continue
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
                pauseWhileBehind(self._writer, self.transport)
                self._remaining -= len(chunk)
                self._received += len(chunk)
                if not self._remaining and not self._chunked and not self._finishImage():
                    return
                continue
            try:
                payload = self._frames.feed(bytes(data))
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
            if header.linkVersion is not None and not self.peerExtended:
                # A twisted-criu proxy: it reads what we tell it.
                self.peerExtended = True
                self.sendStatus(
                    wire.LinkStatus(wire.LinkStatusKind.HELLO, wire.LINK_EXTENSION_VERSION)
                )
            if header.isEndOfDump:
                self._endOfDump()
                continue
            if self.betweenDumps:
                self.betweenDumps = False
                self._registry = self.sink.dumpStarted(self)
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
        if not header.chunked and not self._roomFor(key, header.size, "announced"):
            return False
        registry.beginWrite(key)
        self._header = header
        self._hash = hashlib.sha256() if header.sha256 is not None else None
        self._writer = store.newWriter()
        self._chunked = header.chunked
        self._remaining = header.size
        self._received = 0
        self._moving = self.sink.activity.begin(
            Direction.FROM_PROXY,
            describe(key),
            None if header.chunked else header.size,
            lambda: self._received,
        )
        if not self._remaining and not self._chunked:
            return self._finishImage()
        return True

    def _roomFor(self, key: ImageKey, size: int, what: str) -> bool:
        """Is there room for C{size} more bytes? If not, say so and drop the link."""
        room = self.sink.store.room()
        if room is None or size <= room:
            return True
        self.log.error(
            "refusing {image}: {size} bytes {what}, room for {room}"
            " (memory budget plus free spill space); dropping the link",
            image=describe(key),
            size=size,
            what=what,
            room=room,
        )
        self.transport.abortConnection()
        return False

    def _chunkBoundary(self, data: bytes | memoryview) -> bytes | memoryview | None:
        """
        Read a chunk length of the current cut-through image: start the
        chunk, or end the image.  Returns the bytes after it, or L{None} to
        stop (more bytes needed, or the link is being dropped).
        """
        need = wire.CHUNK_LENGTH.size - len(self._chunkLength)
        self._chunkLength += data[:need]
        data = data[need:]
        if len(self._chunkLength) < wire.CHUNK_LENGTH.size:
            return None
        (length,) = wire.CHUNK_LENGTH.unpack(self._chunkLength)
        self._chunkLength.clear()
        if length == wire.CHUNK_END:
            return data if self._finishImage() else None
        if length == wire.CHUNK_ABORT:
            self._discardImage()
            return data
        key = self._currentKey()
        if length > wire.MAX_CHUNK:
            self.log.error(
                "bad frame from the proxy, dropping the link: a chunk of {length} bytes in {image}"
                " (at most {limit})",
                length=length,
                image=describe(key),
                limit=wire.MAX_CHUNK,
            )
            self.transport.abortConnection()
            return None
        if not self._roomFor(key, self._received + length, "so far"):
            return None
        self._remaining = length
        return data

    def _discardImage(self) -> None:
        """The proxy's write of a cut-through image broke off: throw it away."""
        self.log.warn(
            "criu's write of {image} broke off on the dump host after {got} bytes; discarded",
            image=describe(self._currentKey()),
            got=self._received,
        )
        self._dropImage()

    def _dropImage(self) -> None:
        """Throw away the image being received: nothing of it is published."""
        header, writer = self._header, self._writer
        assert header is not None and writer is not None and self._registry is not None
        self._header, self._writer, self._chunked = None, None, False
        moving, self._moving = self._moving, None
        if moving is not None:
            self.sink.activity.abandon(moving)
        writer.abort()
        self._registry.abortWrite((header.snapshotId, header.name))

    def _finishImage(self) -> bool:
        header, writer = self._header, self._writer
        assert header is not None and writer is not None and self._registry
        self._header, self._writer, self._chunked = None, None, False
        size = self._received
        key = (header.snapshotId, header.name)
        digest, self._hash = self._hash, None
        moving, self._moving = self._moving, None
        assert moving is not None
        if digest is not None and digest.digest() != header.sha256:
            self.sink.activity.abandon(moving)
            self.log.error(
                "SHA-256 mismatch for {image} ({size} bytes): discarded; dropping the link",
                image=describe(key),
                size=size,
            )
            writer.abort()
            self._registry.abortWrite(key)
            self.transport.abortConnection()
            return False
        image = writer.commit()
        self.imagesReceived += 1
        self.bytesReceived += size
        self._imagesSinceMarker += 1
        self._bytesSinceMarker += size
        self.log.info(
            "received {image} ({size} bytes) {timing}",
            image=describe(key),
            size=size,
            **self.sink.activity.end(moving, size),
        )
        if wire.openKind(header.openMode) is wire.OpenKind.APPEND:
            self._registry.publishAppend(key, image, self.sink.store)
        else:
            self._registry.publish(key, image)
        return True

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.setTimeout(None)
        if self._plainRead is not None:  # no cycle between transport and protocol
            vars(self.transport).pop("doRead", None)
            self._plainRead = None
        header, writer = self._header, self._writer
        clean = reason.check(ConnectionDone) is not None and writer is None
        if header is not None and writer is not None and self._registry is not None:
            self.log.error(
                "link lost in the middle of {image}: {got} {of} arrived; discarded ({why})",
                image=describe((header.snapshotId, header.name)),
                got=self._received,
                of="bytes of a cut-through image" if header.chunked else f"of {header.size} bytes",
                why=reason.getErrorMessage(),
            )
            self._dropImage()
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
        statusReceived: Callable[[RemoteSender, wire.LinkStatus], None] | None = None,
        activity: Activity | None = None,
        nextLive: LiveLookup | None = None,
    ) -> None:
        self.connected = connected
        self.nextLive = nextLive
        self.imageFor = imageFor
        self.clock = clock
        self.stallTimeout = stallTimeout
        self.digestFor = digestFor
        self.statusReceived = statusReceived
        self.activity = activity

    def buildProtocol(self, addr: Any) -> RemoteSender:
        protocol = RemoteSender(
            self.connected,
            self.imageFor,
            self.clock,
            self.stallTimeout,
            self.digestFor,
            self.statusReceived,
            self.activity,
            self.nextLive,
        )
        protocol.factory = self
        return protocol
