"""
Backpressure, deterministically: a consumer that stops taking bytes stops
the reading of the store upstream, and nothing piles up in between.
"""

from __future__ import annotations

import fcntl
import os
from typing import Any

from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu.flow.pipes import PIPE_SIZE, PipeWriter
from twisted_criu.flow.send import CHUNK_SIZE, OutgoingImage
from twisted_criu.interfaces import IStoredImage
from twisted_criu.link.sender import RemoteSender
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeLocalService, pump, storedImage

#: What PipeWriter gives criu's pipe (it enlarges it to that).
PIPE_CAPACITY = PIPE_SIZE
IMAGE = os.urandom(4 << 20)


class CountingImage:
    """Wraps an image and counts the bytes read out of the store."""

    def __init__(self, image: IStoredImage) -> None:
        self._image = image
        self.size = image.size
        self.readOut = 0

    def open(self) -> Any:
        counter = self
        reader = self._image.open()

        class Reader:
            def read(self, size: int) -> bytes:
                chunk = reader.read(size)
                counter.readOut += len(chunk)
                return chunk

            def close(self) -> None:
                reader.close()

        return Reader()


class RestorePipeTests(SynchronousTestCase):
    """A restore that does not read its pipe pauses the serving."""

    def setUp(self) -> None:
        self.reactor = FakeLocalService().reactor
        self.readEnd, writeEnd = os.pipe()
        fcntl.fcntl(writeEnd, fcntl.F_SETPIPE_SZ, PIPE_CAPACITY)
        os.set_blocking(self.readEnd, False)
        self.addCleanup(os.close, self.readEnd)
        self.pipe = PipeWriter(self.reactor, writeEnd, lambda reason: None)

    def drain(self) -> bytes:
        data = b""
        while True:
            try:
                chunk = os.read(self.readEnd, 1 << 20)
            except BlockingIOError:
                return data
            if not chunk:
                return data
            data += chunk

    def test_memoryStore(self) -> None:
        image = CountingImage(storedImage(MemoryStore(), IMAGE))
        sent = OutgoingImage(image).sendTo(self.pipe)  # type: ignore[arg-type]
        pump(self.reactor)
        # The pipe is full: at most the pipe, the transport's buffer and one
        # chunk have left the store.
        self.assertLessEqual(image.readOut, PIPE_CAPACITY + 2 * CHUNK_SIZE + 65536)
        self.assertNoResult(sent)
        received = self.drain()
        for _ in range(1000):
            pump(self.reactor)
            chunk = self.drain()
            if not chunk:
                break
            received += chunk
        self.successResultOf(sent)
        self.assertEqual(received, IMAGE)

    def test_spillStoreSendfile(self) -> None:
        store = SpillStore(1 << 20, self.mktemp())  # part memfd, part on disk
        self.addCleanup(store.close)
        image = storedImage(store, IMAGE)
        transfer = OutgoingImage(image)
        sent = transfer.sendTo(self.pipe)
        pump(self.reactor)
        self.assertEqual(self.pipe.bytesWritten, PIPE_CAPACITY)  # no further
        self.assertNoResult(sent)
        received = b""
        for _ in range(1000):
            chunk = self.drain()
            received += chunk
            pump(self.reactor)
            if len(received) == len(IMAGE):
                break
        self.successResultOf(sent)
        self.assertEqual(received, IMAGE)


class LinkTests(SynchronousTestCase):
    """A cache that does not read pauses the proxy's reading of the store."""

    def test_slowCache(self) -> None:
        image = CountingImage(storedImage(MemoryStore(), IMAGE))
        sender = RemoteSender(FakeLinkSource(image))  # type: ignore[arg-type]
        transport = StringTransport()
        sender.makeConnection(transport)
        sender.enqueue(("s", "pages-1.img"))
        # The transport never asks for more (its socket is full).
        self.assertLessEqual(image.readOut, CHUNK_SIZE)
        self.assertLessEqual(len(transport.value()), CHUNK_SIZE + 100)
        for _ in range(3):
            transport.producer.resumeProducing()  # type: ignore[attr-defined]
        self.assertLessEqual(image.readOut, 4 * CHUNK_SIZE)
