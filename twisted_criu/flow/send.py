# -*- test-case-name: tests.test_backpressure -*-
"""Stream a stored image into any consumer (socket, pipe, TCP link)."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.internet import abstract
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer, IPullProducer
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure
from zope.interface import implementer

from twisted_criu.errors import ImageSizeMismatch, SourceBusy
from twisted_criu.flow.pipes import PipeWriter
from twisted_criu.interfaces import IImageReader, IStoredImage

#: Bytes handed to the consumer per resumeProducing().
CHUNK_SIZE = 1 << 18

#: Bytes one sendfile() may move into a socket.
SENDFILE_SIZE = 1 << 22


class _CountingReader:
    def __init__(self, reader: IImageReader) -> None:
        self._reader = reader
        self.count = 0

    def read(self, size: int) -> bytes:
        chunk = self._reader.read(size)
        self.count += len(chunk)
        return chunk


@implementer(IPullProducer)
class _SocketFileProducer:
    """
    Feeds a socket transport from a store file with C{sendfile}, under the
    transport's own flow control: Twisted asks a pull producer for more
    only once its write buffer is empty, so whatever was written before (a
    header) goes first, and the kernel copies the image bytes directly.
    """

    def __init__(self, source: Any, count: int, transport: Any) -> None:
        self._source = source
        self.left = count
        self._transport = transport
        self._done: Deferred[None] | None = Deferred()
        self._primed = False

    def start(self) -> Deferred[None]:
        done = self._done
        assert done is not None
        if not self.left:
            self._finish(None)
        else:
            self._transport.registerProducer(self, False)
        return done

    def resumeProducing(self) -> None:
        transport = self._transport
        if not self._primed:
            # Called from registerProducer: earlier writes may still be
            # buffered.  Wait until the transport has flushed them and asks.
            self._primed = True
            transport.startWriting()
            return
        try:
            sent = self._source.sendfile(transport.fileno(), min(self.left, SENDFILE_SIZE))
        except BlockingIOError:
            sent = None
        except SourceBusy as busy:  # asked again once the disk has the bytes
            busy.whenReady.addCallback(self._sourceReady)
            return
        except OSError as e:
            self._finish(Failure(ConnectionLost(e.strerror)))
            transport.abortConnection()
            return
        if sent == 0:
            self._finish(Failure(EOFError(f"source ended {self.left} bytes early")))
            transport.abortConnection()
            return
        if sent:
            self.left -= sent
        if not self.left:
            transport.unregisterProducer()
            self._finish(None)
        else:
            transport.startWriting()  # ask again once the socket has room

    def _sourceReady(self, _: None) -> None:
        if self._done is not None and self._transport.connected:
            self._transport.startWriting()

    def stopProducing(self) -> None:
        self._finish(Failure(ConnectionLost("the consumer stopped the transfer")))

    def _finish(self, failure: Failure | None) -> None:
        done, self._done = self._done, None
        if done is None:
            return
        if failure is None:
            done.callback(None)
        else:
            done.errback(failure)


class ImageSender(FileSender):
    """A L{FileSender} with image-sized chunks."""

    CHUNK_SIZE = CHUNK_SIZE


class ImageTransfer:
    """
    An image opened for sending.  Opening happens at once, so the bytes are
    the ones of this version even if the image is replaced or released
    before the consumer is ready.
    """

    #: Never waiting for its source (see L{LiveTransfer.waiting}).
    waiting = False

    def __init__(self, image: IStoredImage) -> None:
        self.size: int = image.size
        self._reader: IImageReader | None = image.open()
        self._progress: Callable[[], int] = lambda: 0

    @property
    def sent(self) -> int:
        """Bytes handed to the consumer so far (for stall detection)."""
        return self._progress()

    def sendTo(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write all of the image into C{consumer}, honouring its flow control.

        Fires with L{None} when exactly C{size} bytes were handed over; fails
        with L{ConnectionLost} if the consumer stopped the transfer, or
        L{ImageSizeMismatch} if the store did not give back C{size} bytes.
        """
        assert self._reader is not None, "an ImageTransfer is sent once"
        if hasattr(self._reader, "sendfile"):
            if isinstance(consumer, PipeWriter):
                start = consumer.bytesWritten
                self._progress = lambda: consumer.bytesWritten - start
                return self._sendFile(consumer.sendFile(self._reader, self.size))
            if isinstance(consumer, abstract.FileDescriptor):  # a plain socket, not TLS
                producer = _SocketFileProducer(self._reader, self.size, consumer)
                self._progress = lambda: self.size - producer.left
                return self._sendFile(producer.start())
        counting = _CountingReader(self._reader)
        self._progress = lambda: counting.count

        def done(result: Any) -> None:
            self.close()
            if isinstance(result, Failure):
                if result.check(ConnectionLost):
                    result.raiseException()
                raise ConnectionLost(f"consumer stopped the transfer: {result.value}")
            if counting.count != self.size:
                raise ImageSizeMismatch(f"read {counting.count} bytes of a {self.size}-byte image")

        d: Deferred[None] = ImageSender().beginFileTransfer(counting, consumer)
        d.addBoth(done)
        return d

    def _sendFile(self, sent: Deferred[None]) -> Deferred[None]:
        """The kernel copies straight from the store's files (sendfile)."""

        def done(result: Any) -> None:
            self.close()
            if isinstance(result, Failure):
                if result.check(EOFError):
                    raise ImageSizeMismatch(result.getErrorMessage())
                result.raiseException()

        return sent.addBoth(done)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


def sendImage(image: IStoredImage, consumer: IConsumer) -> Deferred[None]:
    """Open C{image} and send it to C{consumer} right away."""
    return ImageTransfer(image).sendTo(consumer)


def sha256Of(transfer: ImageTransfer) -> bytes:
    """The SHA-256 of an opened image (blocking: run it in a thread)."""
    digest = hashlib.sha256()
    reader = transfer._reader
    assert reader is not None
    try:
        while chunk := reader.read(1 << 20):
            digest.update(chunk)
    finally:
        transfer.close()
    return digest.digest()
