# -*- test-case-name: tests.test_fastpath,tests.test_chunks,tests.test_pacing -*-
"""
The one producer that feeds a plain socket with C{sendfile}: a whole
stored image (L{RawBytes}), or the chunks of an image criu is still
writing (L{twisted_criu.flow.chunks.ChunkFraming}).
"""

from __future__ import annotations

from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IPullProducer, ITCPTransport
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu.flow._fastpath import askWhenWritable, descriptorOf, sendAhead
from twisted_criu.flow.ratelimit import throttleOf
from twisted_criu.interfaces import IKernelSource

#: Bytes one sendfile() may move into a socket.
SENDFILE_SIZE = 1 << 22


class Framing:
    """How a L{SocketSendfile} cuts its source into pieces, and marks them."""

    #: Why the transfer failed if the link goes away.
    stopped = "the consumer stopped the transfer"

    def nextPiece(self, producer: SocketSendfile) -> tuple[bytes, int] | None:
        """
        The next piece: the bytes that go before it and its length.
        L{None}: nothing now, because the framing ended the transfer (with
        L{SocketSendfile.finish}) or waits for its source to grow (and
        will L{SocketSendfile.wake} the producer).
        """
        raise NotImplementedError

    def over(self, sent: int) -> bool:
        """Is the transfer over, without a trailer, once C{sent} bytes are sent?"""
        return False

    def short(self, left: int) -> Failure:
        """How the transfer fails if the source ends C{left} bytes into a piece."""
        return Failure(ConnectionLost("the source ended early"))


class RawBytes(Framing):
    """C{count} bytes as they are, in one piece."""

    def __init__(self, count: int) -> None:
        self.count = count

    def nextPiece(self, producer: SocketSendfile) -> tuple[bytes, int] | None:
        return b"", self.count - producer.sent

    def over(self, sent: int) -> bool:
        return sent >= self.count

    def short(self, left: int) -> Failure:
        return Failure(EOFError(f"source ended {left} bytes early"))


@implementer(IPullProducer)
class SocketSendfile:
    """
    Copies C{source} into a socket transport in the kernel, under the
    transport's own flow control: Twisted asks a pull producer for more
    only once its write buffer is empty, so whatever was written before
    (a header) goes first.  Waits (without the socket asking) while the
    source's disk is behind.

    @ivar sent: bytes of the source sent so far.
    @ivar done: fires with L{None} once the framing says it is over, or
        fails with L{ConnectionLost}, or the framing's failure.
    """

    def __init__(self, source: IKernelSource, transport: abstract.FileDescriptor, framing: Framing) -> None:
        self._source = source
        self._transport = transport
        self._framing = framing
        self.sent = 0
        self.done: Deferred[None] = Deferred()
        self.finished = False
        self._registered = False
        self._primed = False
        self._pieceLeft = 0

    def start(self) -> Deferred[None]:
        if self._framing.over(0):
            self.finish(b"", None)
        else:
            self._registered = True
            self._transport.registerProducer(self, False)
        return self.done

    def wake(self) -> None:
        """There is more to send: be asked again once the socket has room."""
        if not self.finished and self._transport.connected:
            askWhenWritable(self._transport)

    def _woken(self, _: None) -> None:
        self.wake()

    def resumeProducing(self) -> None:
        transport = self._transport
        if self.finished:
            return
        if not self._primed:
            # Called from registerProducer: earlier writes may still be
            # buffered.  Wait until the transport has flushed them and asks.
            self._primed = True
            askWhenWritable(transport)
            return
        throttle = throttleOf(transport)  # --rate-limit
        allowance = SENDFILE_SIZE if throttle is None else throttle.allowance()
        if not allowance:
            return  # asked again once the link may carry more
        if not self._pieceLeft:
            piece = self._framing.nextPiece(self)
            if piece is None:
                return
            header, self._pieceLeft = piece
            try:
                if header and not sendAhead(transport, header):
                    return  # asked again once the rest of it is flushed
            except OSError as e:
                self._broken(Failure(ConnectionLost(e.strerror)))
                return
        readable = self._source.whenReadable()
        if readable is not None:  # asked again once the disk has the bytes
            readable.addCallback(self._woken)
            return
        try:
            count = min(self._pieceLeft, SENDFILE_SIZE, allowance)
            sent: int | None = self._source.sendfile(descriptorOf(transport), count)
        except BlockingIOError:
            sent = None
        except OSError as e:
            self._broken(Failure(ConnectionLost(e.strerror)))
            return
        if sent == 0:
            self._broken(self._framing.short(self._pieceLeft))
            return
        if sent:
            if throttle is not None:
                throttle.charge(sent)
            self.sent += sent
            self._pieceLeft -= sent
            if self._framing.over(self.sent):
                self.finish(b"", None)
                return
        askWhenWritable(transport)  # ask again once the socket has room

    def stopProducing(self) -> None:
        self.finish(b"", Failure(ConnectionLost(self._framing.stopped)))

    def _broken(self, failure: Failure) -> None:
        self.finish(b"", failure)
        transport = self._transport
        if ITCPTransport.providedBy(transport):  # a socket (TCP or UNIX)
            transport.abortConnection()
        else:
            transport.loseConnection()

    def finish(self, trailer: bytes, failure: Failure | None) -> None:
        """End the transfer: C{trailer} goes after the bytes, then C{done} fires."""
        if self.finished:
            return
        self.finished = True
        if self._registered:
            self._transport.unregisterProducer()
        if trailer:
            self._transport.write(trailer)
        if failure is None:
            self.done.callback(None)
        else:
            self.done.errback(failure)
