"""Tests for the proxy's end of the link, L{twisted_criu.link.sender}."""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport, connect
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeSink, driveProducer, storedImage

from .helpers import proxyFrames


class RecordingTransport(StringTransport):
    """Remembers every write() call separately."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[bytes] = []

    def write(self, data: bytes) -> None:
        self.writes.append(data)
        super().write(data)


class SenderTests(SynchronousTestCase):
    def setUp(self) -> None:
        source = FakeLinkSource()
        self.connected: list[RemoteSender] = source.connected
        self.images: dict[tuple[str, str], Any] = source.images
        self.sender = RemoteSender(source)
        self.transport = RecordingTransport()
        self.sender.makeConnection(self.transport)

    def enqueue(self, key: tuple[str, str], data: bytes) -> None:
        self.images[key] = storedImage(MemoryStore(), data)
        self.sender.enqueue(key)

    def test_connected(self) -> None:
        self.assertEqual(self.connected, [self.sender])

    def test_forwardsInOrderHeaderInOneWrite(self) -> None:
        big = bytes(range(256)) * 4096  # 1 MiB: several chunks
        self.enqueue(("snap1", "pages-1.img"), big)
        self.enqueue(("snap1", "empty.img"), b"")
        self.enqueue(("snap1", "inventory.img"), b"inv")
        idle = self.sender.whenIdle()
        for _ in range(3):
            driveProducer(self.transport)
        self.successResultOf(idle)
        expected = proxyFrames(("pages-1.img", big), ("empty.img", b""), ("inventory.img", b"inv"))
        self.assertEqual(self.transport.value(), expected)
        headers = [
            wire.RemoteHeader(
                n, "snap1", 1, s, None, wire.LINK_EXTENSION_VERSION, session=FakeLinkSource.sessionToken
            ).toBytes()
            for n, s in (("pages-1.img", len(big)), ("empty.img", 0), ("inventory.img", 3))
        ]
        for header in headers:  # every frame in a single write (C readers need it)
            self.assertIn(header, self.transport.writes)
        self.assertEqual(self.sender.imagesSent, 3)

    def test_oneImageAtATime(self) -> None:
        self.enqueue(("s", "a"), b"a" * 10)
        self.enqueue(("s", "b"), b"b" * 10)
        self.assertEqual(len(self.transport.writes), 1)  # a's header only
        self.assertFalse(self.sender.idle)

    def test_linkLostStopsSending(self) -> None:
        self.enqueue(("s", "a"), b"a" * 10)
        self.sender.connectionLost(Failure(ConnectionLost()))
        self.transport.producer.stopProducing()  # type: ignore[attr-defined]
        self.assertTrue(self.sender.lost)

    def test_replacedWhileQueuedSendsLatestOnce(self) -> None:
        """An image replaced before its turn is sent once, as its new version."""
        self.enqueue(("s", "busy"), b"b" * 10)
        self.enqueue(("s", "twice"), b"first version")
        old = self.images[("s", "twice")]
        self.enqueue(("s", "other"), b"o")
        self.enqueue(("s", "twice"), b"second")
        old.release()  # what the registry does on replace
        for _ in range(4):
            driveProducer(self.transport)
        self.assertEqual(
            self.transport.value(),
            proxyFrames(("busy", b"b" * 10), ("other", b"o"), ("twice", b"second"), snapshotId="s"),
        )

    def test_replacedWhileSendingKeepsItsBytes(self) -> None:
        """The version being sent is sent whole even if released meanwhile."""
        big = b"x" * (1 << 20)
        self.enqueue(("s", "a"), big)
        self.images[("s", "a")].release()
        driveProducer(self.transport)
        self.assertEqual(len(self.transport.value()), len(big) + len(self.transport.writes[0]))
        self.assertEqual(self.sender.imagesSent, 1)

    def test_shortImageDropsTheLink(self) -> None:
        """Never announce N bytes and send fewer (the C proxy desynced so)."""

        class Liar:
            size = 10

            def open(self) -> Any:
                return MemoryStore().newWriter().commit().open()

        self.images[("s", "liar")] = Liar()
        self.sender.enqueue(("s", "liar"))
        driveProducer(self.transport)
        self.assertTrue(self.transport.disconnected)


class SenderStatusTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        source = FakeLinkSource()
        self.statuses: list[wire.LinkStatus] = source.statuses
        self.sender = RemoteSender(source)
        self.transport = StringTransport()
        self.sender.makeConnection(self.transport)

    def test_statusesSplitAnywhere(self) -> None:
        data = (
            wire.LinkStatus(wire.LinkStatusKind.HELLO, 1).toBytes()
            + wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=3, size=9).toBytes()
        )
        for byte in range(len(data)):
            self.sender.dataReceived(data[byte : byte + 1])
        self.assertTrue(self.sender.extended)
        self.assertEqual([s.kind for s in self.statuses], [1, 2])

    def test_garbageDropsTheLink(self) -> None:
        """A TLS alert (a cache with --tls, a proxy without) is not a status."""
        self.sender.dataReceived(bytes.fromhex("15030300020246"))
        self.assertTrue(self.transport.disconnected)
        errors = [e["log_format"].format(**e) for e in self.events if e["log_level"] >= LogLevel.error]
        self.assertIn("the cache sent bytes that are not a link status", errors[0])
        self.assertIn("--tls on one end only", errors[0])


class SenderToReceiverTests(SynchronousTestCase):
    """
    Both ends of a link joined in memory (L{twisted.test.iosim}): what the
    proxy's end forwards, the cache's end stores; its statuses come back.
    """

    def setUp(self) -> None:
        self.source = FakeLinkSource()
        self.sink = FakeSink()
        self.sender = RemoteSender(self.source)
        self.receiver = RemoteReceiver(self.sink)
        self.pump = connect(
            self.receiver,
            FakeTransport(self.receiver, isServer=True),
            self.sender,
            FakeTransport(self.sender, isServer=False),
        )

    def flush(self) -> None:
        """Move bytes both ways, and ask the sender's pull producer for more, until all is quiet."""
        for _ in range(1000):
            self.pump.flush()
            producer = self.sender.transport.producer
            if producer is None:
                return
            producer.resumeProducing()
        raise AssertionError("the link never went quiet")

    def test_imagesArriveWholeAndTheDumpIsConfirmed(self) -> None:
        images = {("s", "pages-1.img"): os.urandom(600_000), ("s", "empty.img"): b""}
        for key, data in images.items():
            self.source.images[key] = storedImage(MemoryStore(), data)
            self.sender.enqueue(key)
        self.flush()
        self.assertTrue(self.sender.extended)  # the receiver said HELLO
        self.assertTrue(self.sender.idle)
        for key, data in images.items():
            image = self.sink.registry.get(key)
            assert image is not None
            self.assertEqual(readAll(image), data)
        self.sender.sendEndOfDump()
        self.flush()
        self.assertEqual(self.sink.dumpsEnded, 1)
        kinds = [status.kind for status in self.source.statuses]
        self.assertEqual(kinds, [wire.LinkStatusKind.HELLO, wire.LinkStatusKind.DUMP_RECEIVED])
        received = self.source.statuses[-1]
        self.assertEqual((received.images, received.size), (2, 600_000))
