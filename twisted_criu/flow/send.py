# -*- test-case-name: tests.test_send -*-
"""Stream a stored image into any consumer (socket, pipe, TCP link)."""

from __future__ import annotations

import hashlib
from typing import Any, Callable

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from twisted_criu.errors import ImageSizeMismatch
from twisted_criu.flow._fastpath import onDescriptor
from twisted_criu.flow.sockets import RawBytes, SocketSendfile
from twisted_criu.interfaces import IImageReader, IKernelSink, IKernelSource, IStoredImage

#: Bytes handed to the consumer per resumeProducing().
CHUNK_SIZE = 1 << 18


class _CountingReader:
    def __init__(self, reader: IImageReader) -> None:
        self._reader = reader
        self.count = 0

    def read(self, size: int) -> bytes:
        chunk = self._reader.read(size)
        self.count += len(chunk)
        return chunk


class ImageSender(FileSender):
    """A L{FileSender} with image-sized chunks."""

    CHUNK_SIZE = CHUNK_SIZE


class OutgoingImage:
    """
    An image opened for sending.  Opening happens at once, so the bytes are
    the ones of this version even if the image is replaced or released
    before the consumer is ready.
    """

    #: Never waiting for its source (see L{OutgoingGrowingImage.waiting}).
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
        reader = self._reader
        assert reader is not None, "an OutgoingImage is sent once"
        if IKernelSource.providedBy(reader):
            if IKernelSink.providedBy(consumer):  # a pipe
                start = consumer.bytesWritten
                self._progress = lambda: consumer.bytesWritten - start
                return self._sendFile(consumer.sendFile(reader, self.size))
            if onDescriptor(consumer):  # a plain socket, not TLS
                producer = SocketSendfile(reader, consumer, RawBytes(self.size))
                self._progress = lambda: producer.sent
                return self._sendFile(producer.start())
        counting = _CountingReader(reader)
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
    return OutgoingImage(image).sendTo(consumer)


def sha256Of(transfer: OutgoingImage) -> bytes:
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
