# -*- test-case-name: tests.test_chunks -*-
"""
Cut-through forwarding: send an image to the cache while criu still writes
it, as chunks (link extension version 2), instead of after it is complete.

The proxy still stores every byte (it must be able to send the dump again
if the link breaks before the cache confirms it: criu's finish gets no
reply), but the link no longer waits for whole images.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPushProducer
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.errors import ImageAborted
from twisted_criu.flow._fastpath import onDescriptor
from twisted_criu.flow.sockets import SENDFILE_SIZE, Framing, SocketSendfile
from twisted_criu.interfaces import IGrowingImage, IKernelSource

#: Largest chunk sent with sendfile on a plain socket.
SOCKET_CHUNK = SENDFILE_SIZE

#: Smallest chunk sent while criu is still writing (it writes through a
#: 64 KiB pipe: a chunk per pipeful would cost more calls than bytes).
MIN_CHUNK = 1 << 18

#: Chunk read and written through other transports (TLS).  (1 MiB was
#: tried: no less CPU, 2.25-2.5 CPU-s of the proxy for a 512 MiB redis.)
WRITTEN_CHUNK = 1 << 18

assert SOCKET_CHUNK <= wire.MAX_CHUNK

_END = wire.CHUNK_LENGTH.pack(wire.CHUNK_END)
_ABORT = wire.CHUNK_LENGTH.pack(wire.CHUNK_ABORT)


def _ending(growing: IGrowingImage) -> tuple[bytes, Failure | None] | None:
    """
    Nothing is left to send now: the marker that ends the image and how
    the transfer ends, or L{None} while criu may write more.
    """
    if growing.complete:
        return _END, None
    if growing.aborted:
        return _ABORT, Failure(ImageAborted())
    return None


class ChunkFraming(Framing):
    """
    A growing image as length-prefixed chunks of at least L{MIN_CHUNK}
    while criu writes (each length sent ahead of its bytes in one
    segment), then an end or abort marker.
    """

    stopped = "the link went away during the image"

    def __init__(self, growing: IGrowingImage) -> None:
        self.growing = growing
        #: Caught up with criu: the next chunk waits for its next write.
        self.waiting = False

    def worthSending(self, sent: int) -> bool:
        growing = self.growing
        return growing.complete or growing.aborted or growing.available - sent >= MIN_CHUNK

    def nextPiece(self, producer: SocketSendfile) -> tuple[bytes, int] | None:
        length = min(self.growing.available - producer.sent, SOCKET_CHUNK)
        if not length:
            ending = _ending(self.growing)
            if ending is None:
                self.waiting = True
            else:
                producer.finish(*ending)
            return None
        if length < MIN_CHUNK and not self.worthSending(producer.sent):
            self.waiting = True  # for a bigger chunk, or the end
            return None
        return wire.CHUNK_LENGTH.pack(length), length

    def short(self, left: int) -> Failure:
        return Failure(ConnectionLost("the stored image ended inside an announced chunk"))

    def changed(self, producer: SocketSendfile) -> None:
        """criu wrote: wake C{producer} if that makes a chunk worth sending."""
        if self.waiting and not producer.finished and self.worthSending(producer.sent):
            self.waiting = False
            producer.wake()


@implementer(IPushProducer)
class _WrittenChunks:
    """Any other transport (TLS): chunks read from the store and written."""

    def __init__(self, growing: IGrowingImage, transport: Any) -> None:
        self.growing = growing
        self.transport = transport
        self.sent = 0
        #: Caught up with criu: the next chunk waits for its next write.
        self.waiting = False
        self.done: Deferred[None] = Deferred()
        self.finished = False
        self._paused = False

    def start(self) -> Deferred[None]:
        self.transport.registerProducer(self, True)
        self._pump()
        return self.done

    def changed(self) -> None:
        self._pump()

    def pauseProducing(self) -> None:
        self._paused = True

    def resumeProducing(self) -> None:
        self._paused = False
        self._pump()

    def stopProducing(self) -> None:
        self._finish(b"", Failure(ConnectionLost(ChunkFraming.stopped)))

    def _pump(self) -> None:
        while not self._paused and not self.finished:
            data = self.growing.read(WRITTEN_CHUNK)
            if not data:
                ending = _ending(self.growing)
                if ending is None:
                    self.waiting = True
                else:
                    self._finish(*ending)
                return
            self.waiting = False
            self.sent += len(data)
            # Two writes, not one of the two joined: TLS encrypts each at
            # once, and joining copied every chunk (0.6 CPU-s/GB).
            self.transport.write(wire.CHUNK_LENGTH.pack(len(data)))
            self.transport.write(data)

    def _finish(self, marker: bytes, failure: Failure | None) -> None:
        if self.finished:
            return
        self.finished = True
        self.transport.unregisterProducer()
        if marker:
            self.transport.write(marker)
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)


class OutgoingGrowingImage:
    """
    An image being written, sent as chunks while it grows.  L{sendTo}
    fires with the image's size once its end is written, or fails with
    L{ImageAborted} (the end says "discard") or L{ConnectionLost}.
    """

    #: Not known until criu has written all of it.
    size: int | None = None

    def __init__(self, growing: IGrowingImage) -> None:
        self._growing = growing
        self._producer: SocketSendfile | _WrittenChunks | None = None
        #: What knows whether the transfer waits for criu.
        self._framing: ChunkFraming | _WrittenChunks | None = None

    @property
    def sent(self) -> int:
        return 0 if self._producer is None else self._producer.sent

    @property
    def waiting(self) -> bool:
        """Waiting for criu, not for the link (no stall)."""
        return self._framing is not None and self._framing.waiting

    def sendTo(self, transport: Any) -> Deferred[int]:
        """Send the chunks after whatever C{transport} was given before."""
        assert self._producer is None, "an OutgoingGrowingImage is sent once"
        growing = self._growing
        if onDescriptor(transport) and IKernelSource.providedBy(growing):
            framing = ChunkFraming(growing)
            producer = SocketSendfile(growing, transport, framing)
            self._producer, self._framing = producer, framing
            growing.onChange = lambda: framing.changed(producer)
        else:
            written = _WrittenChunks(growing, transport)
            self._producer = self._framing = written
            growing.onChange = written.changed
        done = self._producer.done

        def ended(result: Any) -> Any:
            growing.onChange = lambda: None
            growing.close()
            return result

        done.addBoth(ended)
        started = self._producer.start()
        return started.addCallback(lambda _: self.sent)
