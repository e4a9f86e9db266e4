# -*- test-case-name: tests.test_compress -*-
"""
An image sent as chunks that are compressed or raw, chunk by chunk (link
extension version 4): a stored image, or one criu is still writing.

Up to C{threads} chunks are compressed ahead in the proxy's threads while
the chunks before them are on the wire; chunks go out in order.
"""

from __future__ import annotations

from collections import deque
from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.logger import Logger
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.errors import ImageAborted, ImageSizeMismatch
from twisted_criu.flow._fastpath import onDescriptor
from twisted_criu.flow.compress import CHUNK, LinkCompression
from twisted_criu.flow.goodput import GoodputMeter
from twisted_criu.flow.rawrun import RawRun
from twisted_criu.flow.sockets import SocketSendfile
from twisted_criu.interfaces import IGrowingImage, IImageReader, IKernelSource, IStoredImage

_END = wire.CHUNK_LENGTH.pack(wire.CHUNK_END)
_ABORT = wire.CHUNK_LENGTH.pack(wire.CHUNK_ABORT)

#: A backlogged stretch shorter than this says nothing of the link's rate.
MIN_DRAIN_SECONDS = 0.02
#: How long a stretch of backlog is measured at a time.
BACKLOG_WINDOW = 0.1
#: A raw run shorter than this says nothing of the link's rate either.
MIN_DRAIN_BYTES = 1 << 23
#: Bytes criu has written beyond what the image has sent for them to be
#: waiting for the link (see L{CompressionPolicy.compressNext}); once the
#: image is complete, all of it waits.
AHEAD = 4 * CHUNK


class _Chunk:
    """A chunk on its way: its raw bytes, and its frame once compressed."""

    def __init__(self, raw: bytes) -> None:
        self.raw = raw
        self.frame: bytes | None = None
        self.ready = False


@implementer(IPushProducer)
class CompressedImage:
    """
    Sends one image as chunks, compressing those the policy picks.
    L{sendTo} fires with the image's raw size once its end is written, or
    fails with L{ImageAborted}, L{ImageSizeMismatch} or L{ConnectionLost}.

    @ivar sent: raw bytes handed to the transport.
    @ivar wireBytes: chunk bytes handed to the transport (compressed or raw).
    """

    log = Logger()

    def __init__(self, source: IStoredImage | IGrowingImage, compression: LinkCompression) -> None:
        self._compression = compression
        self._clock: Any = compression.policy._clock
        self._growing: IGrowingImage | None = None
        self.size: int | None = None
        if IGrowingImage.providedBy(source):
            self._growing = source
            self._reader: IImageReader = source
        else:
            self.size = source.size
            self._reader = source.open()
        self._sent = 0
        self.read = 0
        self.wireBytes = 0
        self.compressedChunks = 0
        #: Raw bytes of the chunks that went compressed.
        self.compressedRaw = 0
        self._queue: deque[_Chunk] = deque()
        self._transport: Any = None
        self._paused = False
        self._finished = False
        self._done: Deferred[int] = Deferred()
        self._sourceEnded = False
        #: Since when the link has been the bottleneck, and what it took since.
        self._backlogSince: float | None = None
        self._backlogBytes = 0
        #: Raw chunks going out by sendfile, between compressed ones.
        self._run: SocketSendfile | None = None
        #: The policy's choice for the next chunk, once asked.
        self._compressNext: bool | None = None
        #: Chunks in the compressing threads.
        self._compressing = 0
        #: Was the last chunk written compressed?
        self._lastCompressed = False
        #: What got across while there was something to send: the policy checks its choice with it.
        self._across = GoodputMeter(self._clock, compression.policy.delivered)

    @property
    def sent(self) -> int:
        """Raw bytes handed to the transport."""
        run = self._run
        return self._sent + (0 if run is None else run.sent)

    @property
    def waiting(self) -> bool:
        """Waiting for criu, not for the link (no stall)."""
        growing = self._growing
        if growing is None or self._queue or self._sourceEnded or self._run is not None:
            return False
        return not growing.complete and growing.available - self.read < CHUNK

    def sendTo(self, transport: Any) -> Deferred[int]:
        self._transport = transport
        transport.registerProducer(self, True)
        if self._growing is not None:
            self._growing.onChange = self._pump
        self._pump()
        return self._done

    def pauseProducing(self) -> None:
        self._paused = True
        self._across.pushedBack()
        self._compression.policy.heldUp(self._lastCompressed)
        if self._backlogSince is None:
            self._backlogSince = self._clock.seconds()
            self._backlogBytes = 0

    def resumeProducing(self) -> None:
        self._paused = False
        self._measureBacklog()
        self._pump()

    def _measureBacklog(self) -> None:
        """
        The link has been the bottleneck since it first paused us (its
        buffers full): what it took since then, over a long enough
        stretch, is its rate.
        """
        since = self._backlogSince
        if since is None:
            return
        now = self._clock.seconds()
        if now - since >= BACKLOG_WINDOW and self._backlogBytes >= MIN_DRAIN_BYTES:
            self._compression.policy.drained(self._backlogBytes, now - since)
            self._backlogSince, self._backlogBytes = now, 0

    def stopProducing(self) -> None:
        self._finish(b"", Failure(ConnectionLost("the link went away during the image")))

    def _available(self) -> int:
        growing = self._growing
        return growing.available if growing is not None else self.size or 0

    def _complete(self) -> bool:
        growing = self._growing
        return growing is None or bool(growing.complete)

    def _chunkReady(self) -> bool:
        """Is a whole chunk (or the image's last bytes, or its end) there to take?"""
        growing = self._growing
        if growing is None:
            return True
        if growing.aborted:
            self._sourceEnded = True
            return False
        return growing.complete or growing.available - self.read >= CHUNK

    def _nextRaw(self) -> bytes | None:
        """The next chunk's raw bytes, or L{None} at the end (C{_sourceEnded})."""
        data = self._reader.read(CHUNK)
        if not data:
            self._sourceEnded = True
            return None
        self.read += len(data)
        return data

    def _fill(self) -> None:
        """
        Read chunks ahead, starting to compress those the policy picks
        while a thread is free; a raw chunk may wait behind them.
        """
        threads = self._compression.threads
        while not self._sourceEnded and self._run is None and len(self._queue) <= threads:
            if not self._chunkReady():
                return
            if self._compressNext is None:
                self._compressNext = self._compression.compressNext(self._waitingForTheLink())
            compress = self._compressNext
            if compress and self._compressing >= threads:
                return  # once a thread is free
            if not compress and self._canRun() and not self._compression.policy.worthIt():
                if self._queue:
                    return  # the run starts once the chunks before it are out
                self._compressNext = None
                self._startRun(self._compression.policy.rawRun() * CHUNK)
                return
            # (raw chunks between compressed ones go in the queue: a run
            # would wait for the queue to empty first)
            self._compressNext = None
            raw = self._nextRaw()
            if raw is None:
                return
            chunk = _Chunk(raw)
            self._queue.append(chunk)
            if compress:
                self._compressing += 1
                self._compression.compress(raw).addBoth(self._compressed, chunk)
            else:
                chunk.ready = True

    def _waitingForTheLink(self) -> bool:
        """Are the image's next bytes written, and more of them than criu trickles (L{AHEAD}, or all)?"""
        return self._complete() or self._available() - self.read >= AHEAD

    def _canRun(self) -> bool:
        """Can raw chunks go by sendfile (a plain socket, a store's descriptor)?"""
        return onDescriptor(self._transport) and IKernelSource.providedBy(self._reader) and self.read < self._available()

    def _startRun(self, limit: int) -> None:
        """Send up to C{limit} raw bytes by sendfile, then go on with chunks."""
        self._drained()
        self._transport.unregisterProducer()
        framing = RawRun(self._available, self._complete, self.read, limit, CHUNK)
        run = self._run = SocketSendfile(self._reader, self._transport, framing)  # type: ignore[arg-type]
        started = self._clock.seconds()

        def ran(result: Any) -> None:
            self._run = None
            self.read += run.sent
            self._sent += run.sent
            self.wireBytes += run.sent
            self._across.sent(run.sent, compressed=False)
            if isinstance(result, Failure):
                self._finish(b"", result)
                return
            seconds = self._clock.seconds() - started
            if run.sent >= MIN_DRAIN_BYTES and seconds >= MIN_DRAIN_SECONDS:
                self._compression.policy.drained(run.sent, seconds)
                self._across.pushedBack()  # (the next run's bytes count)
            if self.read >= self._available() and self._complete():
                self._sourceEnded = True
            self._paused = False  # a new registration: the transport pauses us anew
            self._transport.registerProducer(self, True)
            self._pump()

        run.start().addBoth(ran)

    def _compressed(self, result: Any, chunk: _Chunk) -> None:
        self._compressing -= 1
        if isinstance(result, Failure):
            self.log.failure("compressing a chunk failed; it goes raw", result)
        else:
            frame, seconds = result
            self._compression.policy.compressed(len(chunk.raw), len(frame), seconds)
            if len(frame) < len(chunk.raw):
                chunk.frame = frame
        chunk.ready = True
        self._pump()

    def _pump(self) -> None:
        self._pumpChunks()
        self._across.busy(not self._finished and not self.waiting)

    def _pumpChunks(self) -> None:
        if self._finished or self._run is not None:
            return
        self._fill()
        while not self._paused and self._queue and self._queue[0].ready:
            self._write(self._queue.popleft())
            self._fill()
        if self._paused or self._finished:
            return
        self._drained()  # resumed with nothing to write: the link is not the bottleneck
        if not self._queue and self._sourceEnded:
            self._end()

    def _write(self, chunk: _Chunk) -> None:
        frame = chunk.frame
        if frame is not None:
            body = frame
            self.compressedChunks += 1
            self.compressedRaw += len(chunk.raw)
            word = wire.chunkWord(len(frame), compressed=True)
        else:
            body = chunk.raw
            word = wire.chunkWord(len(body))
        self._lastCompressed = frame is not None
        self._sent += len(chunk.raw)
        self.wireBytes += len(body)
        self._across.sent(len(chunk.raw), compressed=frame is not None)
        if self._backlogSince is not None:
            self._backlogBytes += len(body)
        self._transport.write(word)  # (not writeSequence: TLS joins it, a copy)
        self._transport.write(body)

    def _drained(self) -> None:
        """The link caught up: what it took while backlogged is its rate."""
        since, self._backlogSince = self._backlogSince, None
        if since is None:
            return
        seconds = self._clock.seconds() - since
        if seconds >= MIN_DRAIN_SECONDS:
            self._compression.policy.drained(self._backlogBytes, seconds)

    def _end(self) -> None:
        growing = self._growing
        if growing is not None and growing.aborted:
            self._finish(_ABORT, Failure(ImageAborted()))
        elif self.size is not None and self.read != self.size:
            self._finish(b"", Failure(ImageSizeMismatch(f"read {self.read} bytes of a {self.size}-byte image")))
        else:
            self._finish(_END, None)

    def _finish(self, marker: bytes, failure: Failure | None) -> None:
        if self._finished:
            return
        self._finished = True
        self._queue.clear()
        self._across.stop()
        transport = self._transport
        if transport is not None and self._run is None:
            transport.unregisterProducer()
            if marker:
                transport.write(marker)
        growing = self._growing
        if growing is not None:
            growing.onChange = lambda: None
        self._reader.close()
        if failure is None:
            self._done.callback(self._sent)
        else:
            self._done.errback(failure)


def onTheWire(size: int, transfer: Any) -> tuple[int, str]:
    """Bytes of an image's body on the link, and what its log line adds about them."""
    if not isinstance(transfer, CompressedImage):
        return size, ""
    if not transfer.compressedChunks:  # none shrank: said as before
        return transfer.wireBytes, ""
    share = transfer.compressedRaw / max(transfer.sent, 1)
    return transfer.wireBytes, f", {transfer.wireBytes} on the wire, zstd on {share:.0%} of it"
