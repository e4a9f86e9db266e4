# -*- test-case-name: tests.test_transfer -*-
"""Stream a stored image into any consumer (socket, pipe, TCP link)."""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from twisted_criu.interfaces import IImageReader, IStoredImage
from twisted_criu.pipes import PipeWriter

#: Bytes handed to the consumer per resumeProducing().
CHUNK_SIZE = 1 << 18


class ImageSizeMismatch(Exception):
    """An image's reader produced more or fewer bytes than its size."""


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


class ImageTransfer:
    """
    An image opened for sending.  Opening happens at once, so the bytes are
    the ones of this version even if the image is replaced or released
    before the consumer is ready.
    """

    def __init__(self, image: IStoredImage) -> None:
        self.size: int = image.size
        self._reader: IImageReader | None = image.open()

    def sendTo(self, consumer: IConsumer) -> Deferred[None]:
        """
        Write all of the image into C{consumer}, honouring its flow control.

        Fires with L{None} when exactly C{size} bytes were handed over; fails
        with L{ConnectionLost} if the consumer stopped the transfer, or
        L{ImageSizeMismatch} if the store did not give back C{size} bytes.
        """
        assert self._reader is not None, "an ImageTransfer is sent once"
        if isinstance(consumer, PipeWriter) and hasattr(self._reader, "sendfile"):
            return self._sendFile(consumer, self._reader)
        counting = _CountingReader(self._reader)

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

    def _sendFile(self, pipe: PipeWriter, source: Any) -> Deferred[None]:
        """Into a pipe, the kernel copies straight from the store's files."""

        def done(result: Any) -> None:
            self.close()
            if isinstance(result, Failure):
                if result.check(EOFError):
                    raise ImageSizeMismatch(result.getErrorMessage())
                result.raiseException()

        return pipe.sendFile(source, self.size).addBoth(done)

    def close(self) -> None:
        reader, self._reader = self._reader, None
        if reader is not None:
            reader.close()


def sendImage(image: IStoredImage, consumer: IConsumer) -> Deferred[None]:
    """Open C{image} and send it to C{consumer} right away."""
    return ImageTransfer(image).sendTo(consumer)
