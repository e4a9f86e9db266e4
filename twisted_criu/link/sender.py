# -*- test-case-name: tests.test_sender -*-
"""
The proxy's end of the link: forwards images one at a time, each as a
header frame and its raw bytes (or, cut through, as chunks while criu
writes it), and reads the cache's link statuses.
"""

from __future__ import annotations

from typing import Any

import attrs
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import filelimit, wire
from twisted_criu.errors import ImageAborted, ImageSizeMismatch, ProtocolError
from twisted_criu.flow.chunks import OutgoingGrowingImage
from twisted_criu.flow.compress import LinkCompression
from twisted_criu.flow.compressing import CompressedImage, onTheWire
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import (
    IGrowingImage,
    ILinkSource,
    ISendingLink,
    IStoredImage,
)
from twisted_criu.keys import ImageKey, describe
from twisted_criu.link.resume import ResumedImage
from twisted_criu.progress import Activity, Direction, ImageInFlight


@implementer(ISendingLink)
class RemoteSender(Protocol):
    """
    The proxy's end of a link: forwards images one at a time, in the order
    L{enqueue} was called, each as a header frame plus its raw bytes.
    """

    log = Logger()
    transport: Any

    def __init__(
        self,
        source: ILinkSource,
        *,
        clock: IReactorTime | None = None,
        stallTimeout: float = 60.0,
        activity: Activity | None = None,
        compression: LinkCompression | None = None,
    ) -> None:
        """
        @param source: the images to forward, and who hears of the link.
        @param clock: times the stall watchdog (none without it).
        @param stallTimeout: seconds an image may make no progress.
        @param activity: counts and times the transfers.
        @param compression: compresses images for a cache of link version 4.
        """
        self._source = source
        self._compression = compression
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
        #: When the first header went out on this connection (the cache
        #: answers it with HELLO), if one has.
        self.firstHeaderAt: float | None = None
        #: Images and bytes handed over since the last end-of-dump marker.
        self.imagesSinceMarker = 0
        self.bytesSinceMarker = 0
        self._clock = clock
        self.stallTimeout = stallTimeout
        self._watchdog: IDelayedCall | None = None
        self._transfer: OutgoingImage | OutgoingGrowingImage | CompressedImage | None = None
        self._queue: dict[ImageKey, None] = {}
        self._sending = False
        self._idleWaiters: list[Deferred[None]] = []
        self._lostWaiters: list[Deferred[None]] = []
        self.imagesSent = 0
        self.bytesSent = 0
        self.lost = False
        #: Send nothing yet: the cache is asked where to resume (L{twisted_criu.link.resume}).
        self.held = False
        #: We are closing the link on purpose (end of session, or a stall).
        self._dropping = False

    def connectionMade(self) -> None:
        if self._clock is not None:
            self.connectedAt = self._clock.seconds()
        self._source.linkUp(self)

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
            self._source.statusReceived(self, status)

    def sendEndOfDump(self) -> None:
        """Tell an extended cache that the dump is complete (nothing is pending)."""
        assert self.extended and self.idle
        self.transport.write(self._header("", "", 0).toBytes())
        self.imagesSinceMarker = 0
        self.bytesSinceMarker = 0

    def sendMarker(self, marker: wire.Marker, sequence: int = 0) -> None:
        """Send a SYNC or ABORT marker (between images: the link must be idle)."""
        assert self.idle
        header = wire.RemoteHeader(
            "", "", wire.O_RDONLY, 0, None, wire.LINK_EXTENSION_VERSION,
            session=self._source.sessionToken, marker=marker, sequence=sequence,
        )
        self._headerSent()
        self.transport.write(header.toBytes())

    def _headerSent(self) -> None:
        if self.firstHeaderAt is None and self._clock is not None:
            self.firstHeaderAt = self._clock.seconds()

    def helloWait(self, now: float) -> float:
        """Seconds the cache has had to say HELLO: since our first header (0 before one)."""
        return 0.0 if self.firstHeaderAt is None else now - self.firstHeaderAt

    def _header(
        self, name: str, snapshotId: str, size: int, digest: bytes | None = None, chunked: bool = False,
        compression: wire.Codec = wire.Codec.NONE,
    ) -> wire.RemoteHeader:
        """An image header (or, with no name, the end-of-dump marker) of this session."""
        mode = wire.O_WRONLY if name else wire.O_RDONLY
        return wire.RemoteHeader(
            name, snapshotId, mode, size, digest, wire.LINK_EXTENSION_VERSION, chunked,
            self._source.sessionToken, compression=compression,
        )

    def _compressing(self, size: int | None) -> LinkCompression | None:
        """The compression the next image (C{size} bytes, or growing) is sent with, if it is."""
        compression = self._compression
        if compression is None or not compression.chunked(self.peerVersion, size):
            return None
        return compression

    @property
    def progress(self) -> int:
        """Bytes handed over on this connection, counting the image being forwarded."""
        transfer = self._transfer
        return self.bytesSent + (0 if transfer is None else transfer.sent)

    def whenLost(self) -> Deferred[None]:
        """Fires when the connection is gone."""
        d: Deferred[None] = Deferred()
        if self.lost:
            d.callback(None)
        else:
            self._lostWaiters.append(d)
        return d

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
        offset = self._source.resumeOffset(key, growing)
        self._source.forwarding(key, growing)
        if offset:
            growing = ResumedImage.ofGrowing(growing, offset)
        self._cutThrough[key] = growing
        self._sendChunks(key, growing, offset)

    def _sendChunks(self, key: ImageKey, growing: IGrowingImage, offset: int) -> None:
        """Send C{growing} as chunks: from byte C{offset} of its image, resuming it."""
        snapshotId, name = key
        compression = self._compressing(None)
        transfer: OutgoingGrowingImage | CompressedImage
        if compression is None:
            transfer = OutgoingGrowingImage(growing)
            header = self._header(name, snapshotId, 0, chunked=True)
        else:
            transfer = CompressedImage(growing, compression)
            header = self._header(name, snapshotId, 0, chunked=True, compression=compression.codec)
        header = attrs.evolve(header, offset=offset)
        moving = self._begin(key, header, transfer, None)
        how = f", resumed at byte {offset}" if offset else ", cut through"

        def sent(size: int) -> None:
            self._forwarded(key, size, moving, how, transfer, offset)

        def failed(reason: Failure) -> None:
            self._ended(moving)
            self._cutThrough.pop(key, None)
            if reason.check(ImageAborted):
                self._source.forwarding(key, None)
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
        if self.held:
            return
        while not self._sending and not self.lost and self._queue:
            key = next(iter(self._queue))
            del self._queue[key]
            image = self._source.imageFor(key)
            if image is None:
                continue
            ready, digest = self._source.digestFor(key, image)
            if not ready:
                continue  # enqueued again once its checksum is known
            self._send(key, image, digest)
        if not self._sending and not self._queue and not self.lost:
            live = self._source.nextLive() if self.peerVersion >= 2 else None
            if live is not None:
                self.sendLive(*live)
                return
        if not self._sending and not self._queue:
            waiters, self._idleWaiters = self._idleWaiters, []
            for d in waiters:
                d.callback(None)

    def _send(self, key: ImageKey, image: IStoredImage, digest: bytes | None) -> None:
        snapshotId, name = key
        offset = self._source.resumeOffset(key, image)
        self._source.forwarding(key, image)
        if offset:
            try:
                self._sendChunks(key, ResumedImage.ofStored(image, offset), offset)
                return
            except (OSError, ImageSizeMismatch) as e:  # sent whole instead
                self.log.warn("cannot resume {image}: {why}", image=describe(key), why=str(e))
        compression = None if digest is not None else self._compressing(image.size)
        transfer: OutgoingImage | CompressedImage
        try:
            transfer = OutgoingImage(image) if compression is None else CompressedImage(image, compression)
        except OSError as e:  # no descriptor to read it with
            self.log.error("cannot forward {image}: {why}", image=describe(key), why=filelimit.describe(e))
            self._source.forwardFailed(key, f"{describe(key)} could not be read to forward it: {e.strerror}")
            return
        if compression is None:
            header = self._header(name, snapshotId, image.size, digest)
        else:
            header = self._header(name, snapshotId, 0, chunked=True, compression=compression.codec)
        moving = self._begin(key, header, transfer, image.size)

        def sent(_: object) -> None:
            self._forwarded(key, image.size, moving, "", transfer)

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
        self,
        key: ImageKey,
        header: wire.RemoteHeader,
        transfer: OutgoingImage | OutgoingGrowingImage | CompressedImage,
        size: int | None,
    ) -> ImageInFlight:
        """Start forwarding C{key}: its header now, its bytes by C{transfer}."""
        self._sending = True
        self._transfer = transfer
        self._armWatchdog(key, -1)
        self._headerSent()
        self.transport.write(header.toBytes())
        return self._activity.begin(Direction.TO_CACHE, describe(key), size, lambda: transfer.sent)

    def _ended(self, moving: ImageInFlight | None) -> None:
        """The image being forwarded is done with (C{moving} if it failed)."""
        self._sending = False
        self._disarmWatchdog()
        if moving is not None:
            self._activity.abandon(moving)

    def _forwarded(
        self, key: ImageKey, size: int, moving: ImageInFlight, how: str, transfer: object, offset: int = 0
    ) -> None:
        """All of C{key} (its C{size} bytes from C{offset} on) is handed over: count it, say so, send the next."""
        self._ended(None)
        self._source.forwarding(key, None)
        onWire, wireText = onTheWire(size, transfer)
        self._activity.onWire(Direction.TO_CACHE, size, onWire)
        if self._compression is not None and size >= 1 << 23 and isinstance(transfer, OutgoingImage):
            self._compression.policy.drained(size, self._activity.clock.seconds() - moving.started)
        self.imagesSent += 1
        self.bytesSent += size
        self.imagesSinceMarker += 1
        self.bytesSinceMarker += offset + size
        self.log.info(
            "forwarded {image} ({size} bytes{wire}{how}) {timing}",
            image=describe(key),
            size=offset + size,
            wire=wireText,
            onWire=onWire,
            how=how,
            **self._activity.end(moving, size),
        )
        if isinstance(transfer, CompressedImage) and self._compression is not None:
            self.log.debug("--compress auto now: {policy}", policy=self._compression.policy.describe())
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
                size="its" if transfer.size is None else transfer.size,
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

    def abort(self) -> None:
        """Drop the connection at once (the proxy reconnects and sends again)."""
        self.transport.abortConnection()

    def expectClose(self) -> None:
        """We are about to end the link on purpose: do not report it as lost."""
        self._dropping = True

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.lost = True
        sending = self._sending
        self._disarmWatchdog()
        waiters, self._lostWaiters = self._lostWaiters, []
        for d in waiters:
            d.callback(None)
        if not self._dropping and not sending:
            # (While forwarding, the transfer's own failure says it.)
            self.log.warn(
                "link to the cache lost while idle: {why}; reconnecting",
                why=reason.getErrorMessage(),
            )


class RemoteSenderFactory(Factory):
    """Builds a L{RemoteSender} per connection, each forwarding C{source}'s images."""

    noisy = False

    def __init__(
        self,
        source: ILinkSource,
        *,
        clock: IReactorTime | None = None,
        stallTimeout: float = 60.0,
        activity: Activity | None = None,
        compression: LinkCompression | None = None,
    ) -> None:
        self.source = source
        self.clock = clock
        self.stallTimeout = stallTimeout
        self.activity = activity
        self.compression = compression

    def buildProtocol(self, addr: Any) -> RemoteSender:
        protocol = RemoteSender(
            self.source, clock=self.clock, stallTimeout=self.stallTimeout, activity=self.activity,
            compression=self.compression,
        )
        protocol.factory = self
        return protocol
