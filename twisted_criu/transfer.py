# -*- test-case-name: tests.test_transfer -*-
"""Stream a stored image into any consumer (socket, pipe, TCP link)."""

from __future__ import annotations

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.interfaces import IConsumer
from twisted.protocols.basic import FileSender
from twisted.python.failure import Failure

from twisted_criu.interfaces import IStoredImage

#: Bytes handed to the consumer per resumeProducing().
CHUNK_SIZE = 1 << 18


class ImageSender(FileSender):
    """A L{FileSender} with image-sized chunks."""

    CHUNK_SIZE = CHUNK_SIZE


def sendImage(image: IStoredImage, consumer: IConsumer) -> Deferred[None]:
    """
    Write all of C{image} into C{consumer}, honouring its flow control.

    Fires with L{None} when the last byte was handed over; fails with
    L{ConnectionLost} if the consumer stopped the transfer first.
    """
    reader = image.open()

    def done(result: object) -> None:
        reader.close()
        if isinstance(result, Failure):
            if result.check(ConnectionLost):
                result.raiseException()
            raise ConnectionLost(f"consumer stopped the transfer: {result.value}")

    d: Deferred[None] = ImageSender().beginFileTransfer(reader, consumer)
    d.addBoth(done)
    return d
