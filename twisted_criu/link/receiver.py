# -*- test-case-name: tests.test_receiver -*-
"""
The cache's end of the link: header, then exactly C{size} bytes (or
chunks), repeat; published only when whole.
"""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.internet.error import ConnectionDone
from twisted.internet.protocol import Factory, Protocol
from twisted.logger import Logger
from twisted.protocols.policies import TimeoutMixin
from twisted.protocols.tls import TLSMemoryBIOProtocol
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import filelimit, wire
from twisted_criu.errors import ProtocolError
from twisted_criu.flow._fastpath import BufferedReads
from twisted_criu.flow.pacing import pauseWhileBehind
from twisted_criu.link.decompress import ChunkDecoder
from twisted_criu.interfaces import (
    IImageStore,
    IImageWriter,
    IRemoteImageSink,
    IReceivingLink,
    ISnapshotRegistry,
    ITransientDataReceiver,
)
from twisted_criu.keys import ImageKey, describe
from twisted_criu.link.headers import readHeader
from twisted_criu.progress import Direction, ImageInFlight

#: How much of an image body one read on the link may take.  Bodies are
#: read into one reused buffer of this size (see L{BufferedReads}); headers
#: use Twisted's own reads (64 KiB).
LINK_READ_SIZE = 1 << 20


@implementer(IReceivingLink, ITransientDataReceiver)
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
        #: Where the current image goes (L{None}: it is discarded).
        self._registry: ISnapshotRegistry | None = None
        self._header: wire.RemoteHeader | None = None
        self._hash: Any = None
        self._writer: IImageWriter | None = None
        self._remaining = 0
        #: The current image is chunked (cut through): lengths come between chunks.
        self._chunked = False
        self._chunkLength = bytearray()
        #: Decodes the current image's compressed chunks (link version 4).
        self._decoder: ChunkDecoder | None = None
        #: The compressed chunk being received, until it is whole.
        self._frame: bytearray | None = None
        #: Bytes of the current image's chunks on the link, and how many were compressed.
        self._onWire = 0
        self._compressedChunks = 0
        #: Bytes of the current image received so far.
        self._received = 0
        self._reads: BufferedReads | None = None
        self._moving: ImageInFlight | None = None
        self.imagesReceived = 0
        self.bytesReceived = 0
        #: The proxy's headers carry a link version: it reads link statuses.
        self.peerExtended = False
        self._imagesSinceMarker = 0
        self._bytesSinceMarker = 0
        self.authenticated = False
        self.peer = "?"
        #: An image could not be stored: the link is closing, nothing more is read.
        self._failed = False

    def connectionMade(self) -> None:
        # Image bodies are read straight into a reused buffer (the store
        # copies them); headers, and anything but TCP, by Twisted's reads.
        self._reads = BufferedReads.install(
            self.transport, self._bodyReadSize, self.dataReceived, LINK_READ_SIZE
        )
        # Under TLS (the link key or --tls) the handshake gate connects us
        # only once the peer has proven who it is.
        self.authenticated = isinstance(self.transport, TLSMemoryBIOProtocol)
        address = self.transport.getPeer()
        self.peer = f"{getattr(address, 'host', address)}:{getattr(address, 'port', '')}"
        self.sink.linkOpened(self)
        self.log.info("proxy connected from {peer}", peer=str(address))

    def close(self) -> None:
        """End the link once what was written is flushed."""
        self.transport.loseConnection()

    def abort(self) -> None:
        """Drop the link now; the image it was sending is discarded (or kept to resume), now."""
        if self._writer is not None and not self._keepImage():
            self._dropImage()
        self.transport.abortConnection()

    def sendStatus(self, status: wire.LinkStatus) -> None:
        """Tell a twisted-criu proxy (never a C proxy: see L{peerExtended})."""
        if self.peerExtended:
            self.transport.write(status.toBytes())

    def _marker(self, header: wire.RemoteHeader) -> None:
        """A header that carries no image: the end of a dump, SYNC, ABORT or RESUME."""
        if header.marker is wire.Marker.RESUME:  # where to resume: it confirms nothing
            for status in self.sink.keptStatuses(self, header.session):
                self.sendStatus(status)
            self.sendStatus(wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=header.sequence))
            return
        if header.marker is wire.Marker.SYNC:
            self.sendStatus(self.sink.syncRequested(self, header.session, header.sequence))
            return
        if header.marker is wire.Marker.ABORT:
            self.sink.abortRequested(self, header.session)
            return
        images, size = self._imagesSinceMarker, self._bytesSinceMarker
        self._imagesSinceMarker = self._bytesSinceMarker = 0
        self.log.info(
            "the proxy ended its dump: {images} images, {bytes} bytes on this link",
            images=images,
            bytes=size,
        )
        self.sink.dumpEnded(self, header.session)
        self.sendStatus(wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=images, size=size))

    def dataReceived(self, data: bytes | memoryview) -> None:
        self._receive(data)
        # Between the chunks of a cut-through image the proxy waits for
        # criu, which may be slow: like between images, that is no stall.
        inImage = self._writer is not None and (self._remaining > 0 or len(self._chunkLength) > 0)
        self.setTimeout(self.sink.linkTimeout if inImage or self._frames.pending > 0 else None)

    def _bodyReadSize(self) -> int:
        """How much the next read of the link may take into the reused buffer; 0: a plain read."""
        if self._writer is None:
            return 0
        # Inside an image (a chunked one may be between chunks: the length
        # and the next bytes come together).
        return self._remaining or LINK_READ_SIZE

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
        while data and not self._failed:
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
                self._remaining -= len(chunk)
                if self._frame is not None:
                    self._frame += chunk
                    if not self._remaining and not self._decodeChunk():
                        return
                    continue
                if not self._store(chunk):
                    return
                if not self._remaining and not self._chunked and not self._finishImage():
                    return
                continue
            try:
                header = readHeader(self._frames, data, first=self.imagesReceived == 0)
            except ProtocolError as e:
                self._badFrame(str(e))
                return
            if header is None:
                return
            data = self._frames.takeRest()
            if header.linkVersion is not None and not self.peerExtended:
                # A twisted-criu proxy: it reads what we tell it.
                self.peerExtended = True
                self.sendStatus(
                    wire.LinkStatus(wire.LinkStatusKind.HELLO, wire.LINK_EXTENSION_VERSION)
                )
            if header.isMarker:
                self._marker(header)
                continue
            if not self._startImage(header):
                return

    def _store(self, chunk: bytes | memoryview) -> bool:
        """Write raw bytes of the current image; L{False} if it failed (the link is closing)."""
        assert self._writer is not None
        if self._hash is not None:
            self._hash.update(chunk)
        try:
            self._writer.write(chunk)
        except OSError as e:
            if filelimit.exhausted(e):
                assert self._header is not None
                header = self._header
                self._dropImage()
                self._outOfDescriptors(header, e)
                return False
            self.log.error(
                "cannot store {image}, dropping the link: {why}",
                image=describe(self._currentKey()),
                why=str(e),
            )
            self.transport.abortConnection()
            return False
        pauseWhileBehind(self._writer, self.transport)
        self._received += len(chunk)
        return True

    def _decodeChunk(self) -> bool:
        """A compressed chunk is whole: store its raw bytes (L{False}: the link is closing)."""
        frame, self._frame = self._frame, None
        assert frame is not None and self._decoder is not None
        key = self._currentKey()
        try:
            raw = self._decoder.decode(frame)
        except ProtocolError as e:
            self._badFrame(f"{e} in {describe(key)}")
            return False
        if not self._roomFor(key, self._received + len(raw), "so far"):
            return False
        return self._store(raw)

    def _badFrame(self, why: str) -> None:
        """The proxy broke the protocol: drop the link (and the image being received)."""
        self.log.error("bad frame from the proxy, dropping the link: {error}", error=why)
        self.transport.abortConnection()

    def _currentKey(self) -> ImageKey:
        assert self._header is not None
        return (self._header.snapshotId, self._header.name)

    def _startImage(self, header: wire.RemoteHeader) -> bool:
        key = (header.snapshotId, header.name)
        store: IImageStore = self.sink.store
        if not header.chunked and not self._roomFor(key, header.size, "announced"):
            return False
        try:
            decoder = None if header.compression is wire.Codec.NONE else ChunkDecoder(header.compression)
        except ProtocolError as e:
            self._badFrame(f"{e} ({describe(key)})")
            return False
        self._decoder, self._frame, self._onWire, self._compressedChunks = decoder, None, 0, 0
        registry = self._registry = self.sink.imageArriving(self, header.session)
        resumed = None
        if registry is not None and (header.linkVersion or 0) >= 4:
            resumed = self.sink.resumeWriter(self, header)  # (it logs why not)
            if header.offset and resumed is None:
                self.transport.abortConnection()
                return False
        if registry is not None:
            registry.beginWrite(key)
        self._header = header
        self._hash = hashlib.sha256() if header.sha256 is not None else None
        self._writer = resumed if resumed is not None else store.newWriter()
        self._chunked = header.chunked
        self._remaining = header.size
        self._received = 0 if resumed is None else header.offset
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
        (word,) = wire.CHUNK_LENGTH.unpack(self._chunkLength)
        self._chunkLength.clear()
        if word == wire.CHUNK_END:
            return data if self._finishImage() else None
        if word == wire.CHUNK_ABORT:
            self._discardImage()
            return data
        key = self._currentKey()
        try:
            length, compressed = wire.parseChunkWord(word)
            if compressed and self._decoder is None:
                raise ProtocolError("a compressed chunk in an image sent without compression")
        except ProtocolError as e:
            self._badFrame(f"{e} in {describe(key)}")
            return None
        if compressed:
            self._frame = bytearray()  # room is checked for its raw bytes, once decoded
            self._compressedChunks += 1
        elif not self._roomFor(key, self._received + length, "so far"):
            return None
        self._remaining = length
        self._onWire += length
        return data

    def _outOfDescriptors(self, header: wire.RemoteHeader, error: OSError) -> None:
        """
        No descriptor to store the image of C{header} in (it was dropped):
        its session is aborted too (its proxy is told SESSION_ABORTED, and
        criu's dump fails), and the link closed.
        """
        image = describe((header.snapshotId, header.name))
        self.log.error(
            "cannot store {image}: {advice}; its session is aborted", image=image, advice=filelimit.advice(error)
        )
        self._failed = True
        self.sink.imageLost(self, header.session, f"{image} could not be stored: too many open files")
        self.transport.loseConnection()

    def _discardImage(self) -> None:
        """The proxy's write of a cut-through image broke off: throw it away."""
        self.log.warn(
            "criu's write of {image} broke off on the dump host after {got} bytes; discarded",
            image=describe(self._currentKey()),
            got=self._received,
        )
        self._dropImage()

    def _keepImage(self) -> bool:
        """
        The link breaks in the middle of the current image: keep what
        arrived for its proxy to resume (link version 4), if the sink will.
        """
        header, writer, registry = self._header, self._writer, self._registry
        assert header is not None and writer is not None
        resumable = (
            (header.linkVersion or 0) >= 4
            and header.session is not None
            and header.sha256 is None
            and wire.openKind(header.openMode) is wire.OpenKind.WRITE
            and registry is not None
            and not self._failed
        )
        if not resumable or not self.sink.keepPartial(self, header, writer):
            return False
        assert registry is not None
        self._header, self._writer, self._chunked = None, None, False
        moving, self._moving = self._moving, None
        if moving is not None:
            self.sink.activity.abandon(moving)
        registry.abortWrite((header.snapshotId, header.name))
        return True

    def _dropImage(self) -> None:
        """Throw away the image being received: nothing of it is published."""
        header, writer = self._header, self._writer
        assert header is not None and writer is not None
        self._header, self._writer, self._chunked = None, None, False
        self._decoder = self._frame = None
        moving, self._moving = self._moving, None
        if moving is not None:
            self.sink.activity.abandon(moving)
        writer.abort()
        if self._registry is not None:
            self._registry.abortWrite((header.snapshotId, header.name))

    def _finishImage(self) -> bool:
        header, writer = self._header, self._writer
        assert header is not None and writer is not None
        registry = self._registry
        self._header, self._writer, self._chunked = None, None, False
        self._decoder = self._frame = None
        size = self._received
        onWire = self._onWire if header.chunked else size
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
            if registry is not None:
                registry.abortWrite(key)
            self.transport.abortConnection()
            return False
        self._imagesSinceMarker += 1
        self._bytesSinceMarker += size
        if registry is None:  # its session takes no more images
            self.sink.activity.abandon(moving)
            writer.abort()
            return True
        image = writer.commit()
        self.imagesReceived += 1
        self.bytesReceived += size
        self.sink.activity.onWire(Direction.FROM_PROXY, size, onWire)
        self.log.info(
            "received {image} ({size} bytes{wire}) {timing}",
            image=describe(key),
            size=size,
            onWire=onWire,
            wire=f", {onWire} on the wire, zstd" if self._compressedChunks else "",
            **self.sink.activity.end(moving, size),
        )
        if wire.openKind(header.openMode) is wire.OpenKind.APPEND:
            try:
                registry.publishAppend(key, image, self.sink.store)
            except OSError as e:  # (the registry ended the write)
                if filelimit.exhausted(e):
                    self._outOfDescriptors(header, e)
                else:
                    self.log.error("cannot store {image}, dropping the link: {why}", image=describe(key), why=str(e))
                    self.transport.abortConnection()
                return False
        else:
            registry.publish(key, image)
        return True

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.setTimeout(None)
        reads, self._reads = self._reads, None
        if reads is not None:  # no cycle between transport and protocol
            reads.restore()
        header, writer = self._header, self._writer
        clean = reason.check(ConnectionDone) is not None and writer is None
        if header is not None and writer is not None:
            kept = self._keepImage()
            (self.log.warn if kept else self.log.error)(
                "link lost in the middle of {image}: {got} {of} arrived; {fate} ({why})",
                image=describe((header.snapshotId, header.name)),
                got=self._received,
                of="bytes of a cut-through image" if header.chunked else f"of {header.size} bytes",
                fate="kept for its proxy to resume" if kept else "discarded",
                why=reason.getErrorMessage(),
            )
            if not kept:
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
