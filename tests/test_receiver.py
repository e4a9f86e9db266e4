"""Tests for the cache's end of the link, L{twisted_criu.link.receiver}."""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.errors import ImageNotFound
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.registry import readAll
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeSink

from .helpers import linkFrames, marker, proxyFrames


class _ReceiverCase(SynchronousTestCase):
    """A cache's end of a link on a fake sink, and what it stored and logged."""

    def setUp(self) -> None:
        self.sink = FakeSink()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def connect(self) -> tuple[RemoteReceiver, StringTransport]:
        receiver = RemoteReceiver(self.sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        return receiver, transport

    def stored(self, name: str) -> bytes | None:
        image = self.sink.registry.get(("snap1", name))
        return None if image is None else readAll(image)

    def errors(self) -> list[str]:
        return [
            e["log_format"].format(**e) for e in self.events if e["log_level"] >= LogLevel.error
        ]


class ReceiverTests(_ReceiverCase):

    def test_everySplitPoint(self) -> None:
        """Headers and bodies cut at any byte give the same images."""
        data = linkFrames(("a.img", b"alpha"), ("empty.img", b""), ("b.img", b"bravo!"))
        for cut in range(len(data) + 1):
            self.sink = FakeSink()
            receiver, _ = self.connect()
            receiver.dataReceived(data[:cut])
            receiver.dataReceived(data[cut:])
            receiver.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(
                [self.stored(n) for n in ("a.img", "empty.img", "b.img")],
                [b"alpha", b"", b"bravo!"],
                cut,
            )
            self.assertEqual(self.sink.closed, [True])

    def test_byteByByte(self) -> None:
        data = linkFrames(("a.img", b"alpha"), ("b.img", b"bravo"))
        receiver, _ = self.connect()
        for i in range(len(data)):
            receiver.dataReceived(data[i : i + 1])
        self.assertEqual(self.stored("b.img"), b"bravo")

    def test_zeroLengthDoesNotSwallowTheRest(self) -> None:
        """C bug: size 0 was read as 'until EOF'."""
        receiver, _ = self.connect()
        receiver.dataReceived(linkFrames(("empty.img", b""), ("next.img", b"next")))
        self.assertEqual(self.stored("empty.img"), b"")
        self.assertEqual(self.stored("next.img"), b"next")

    def test_sameImageTwiceReplaces(self) -> None:
        receiver, _ = self.connect()
        receiver.dataReceived(linkFrames(("a.img", b"old"), ("a.img", b"new")))
        self.assertEqual(self.stored("a.img"), b"new")

    def test_appendMode(self) -> None:
        """A C proxy may forward appends with O_APPEND: they append."""
        receiver, _ = self.connect()
        first = wire.encodeSnapshotId("snap1")
        second = wire.encodeSnapshotId("snap2")
        for payload in (first, second):
            receiver.dataReceived(
                wire.RemoteHeader("parent", "", wire.O_APPEND, len(payload)).toBytes() + payload
            )
        self.assertEqual(self.sink.registry.snapshotIds(), ["snap1", "snap2"])

    def test_linkDiesMidImage(self) -> None:
        """A truncated image is never published; its readers keep waiting."""
        receiver, _ = self.connect()
        read = self.sink.registry.whenAvailable(("snap1", "big.img"))
        header = wire.RemoteHeader("big.img", "snap1", 1, 1000).toBytes()
        receiver.dataReceived(linkFrames(("a.img", b"a")) + header + b"x" * 400)
        receiver.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.stored("a.img"), b"a")
        self.assertIsNone(self.stored("big.img"))
        self.assertNoResult(read)
        self.assertEqual(self.sink.closed, [False])
        self.assertIn("snap1/big.img: 400 of 1000 bytes arrived", self.errors()[0])
        self.sink.registry.close()
        self.failureResultOf(read, ImageNotFound)

    def test_cleanCloseMidImageIsNotClean(self) -> None:
        receiver, _ = self.connect()
        receiver.dataReceived(wire.RemoteHeader("a.img", "snap1", 1, 10).toBytes() + b"12345")
        receiver.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sink.closed, [False])
        self.assertIsNone(self.stored("a.img"))

    def test_closeInsideHeader(self) -> None:
        receiver, _ = self.connect()
        receiver.dataReceived(wire.RemoteHeader("a.img", "snap1", 1, 10).toBytes()[:7])
        receiver.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.sink.closed, [False])
        self.assertIn("inside a header frame", self.errors()[0])

    def test_malformedHeader(self) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(wire.frame(b"\x0a\x01a"))  # name only
        self.assertTrue(transport.disconnected)
        self.assertIn("lacks required fields", self.errors()[0])

    def test_oversizedHeader(self) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(wire.U32.pack(wire.MAX_HEADER_LENGTH + 1))
        self.assertTrue(transport.disconnected)
        self.assertIn("exceeds", self.errors()[0])

    def test_hostileName(self) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(wire.RemoteHeader("../../etc/x", "s", 1, 0).toBytes())
        self.assertTrue(transport.disconnected)
        self.assertEqual(self.sink.registry.keys(), [])

    def test_readWaitsDuringTransfer(self) -> None:
        """A restore read of an image in flight waits for its last byte."""
        receiver, _ = self.connect()
        receiver.dataReceived(wire.RemoteHeader("a.img", "snap1", 1, 6).toBytes() + b"abc")
        read = self.sink.registry.whenAvailable(("snap1", "a.img"))
        self.assertNoResult(read)
        receiver.dataReceived(b"def")
        self.assertEqual(readAll(self.successResultOf(read)), b"abcdef")


class RoomTests(SynchronousTestCase):
    def test_refuseImageLargerThanRoom(self) -> None:
        """A size beyond budget plus free disk is refused before any body byte."""

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        sink = FakeSink()
        sink.store = SpillStore(100, self.mktemp())  # type: ignore[assignment]
        receiver = RemoteReceiver(sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(wire.RemoteHeader("huge.img", "s", 1, 2**62).toBytes() + b"x")
        self.assertTrue(transport.disconnected)
        self.assertEqual(sink.registry.writesInProgress, 0)
        receiver.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(sink.store.spillParent and sink.store.directory, None)  # type: ignore[attr-defined]
        errors = [e["log_format"].format(**e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertIn("refusing s/huge.img: 4611686018427387904 bytes announced", errors[0])


class ChecksumTests(SynchronousTestCase):
    """twisted-criu's optional SHA-256 (field 5, unknown to the C peers)."""

    def receive(self, data: bytes, digest: bytes) -> tuple[FakeSink, StringTransport, Any]:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        sink = FakeSink()
        receiver = RemoteReceiver(sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        header = wire.RemoteHeader("a.img", "s", 1, len(data), digest)
        receiver.dataReceived(header.toBytes() + data)
        return sink, transport, events

    def test_verified(self) -> None:
        import hashlib

        sink, transport, _ = self.receive(b"pages", hashlib.sha256(b"pages").digest())
        self.assertEqual(readAll(sink.registry.get(("s", "a.img"))), b"pages")  # type: ignore[arg-type]
        self.assertFalse(transport.disconnected)

    def test_mismatchDiscarded(self) -> None:
        import hashlib

        sink, transport, events = self.receive(b"pagez", hashlib.sha256(b"pages").digest())
        self.assertIsNone(sink.registry.get(("s", "a.img")))
        self.assertEqual(sink.registry.writesInProgress, 0)
        self.assertTrue(transport.disconnected)
        errors = [e["log_format"].format(**e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertIn("SHA-256 mismatch for s/a.img (5 bytes)", errors[0])

    def test_badDigestLength(self) -> None:
        raw = wire.RemoteHeader("a.img", "s", 1, 1, b"short").toBytes()
        with self.assertRaises(Exception):
            wire.RemoteHeader.fromBytes(raw[4:])

    def test_cPeersSeeTheSameBytesWithoutIt(self) -> None:
        """Without a digest the header is byte for byte what the C proxy sends."""
        self.assertEqual(
            wire.RemoteHeader("after.img", "X", 1, 19).toBytes().hex(),
            "120000000a0961667465722e696d6712015818012013",
        )


class LinkExtensionTests(SynchronousTestCase):
    """twisted-criu's link extension, and that C peers never see it."""

    def setUp(self) -> None:
        self.sink = FakeSink()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.receiver = RemoteReceiver(self.sink)
        self.transport = StringTransport()
        self.receiver.makeConnection(self.transport)

    def statuses(self) -> list[wire.LinkStatus]:
        return [wire.LinkStatus.fromBytes(p) for p in wire.iterFrames(self.transport.value())]

    def test_cProxyIsNeverWrittenTo(self) -> None:
        """A C proxy never reads: bytes left unread would turn its close into a reset."""
        self.receiver.dataReceived(linkFrames(("a.img", b"alpha"), ("b.img", b"")))
        self.receiver.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.transport.value(), b"")
        self.assertEqual(self.sink.closed, [True])

    def test_helloAfterTheFirstExtendedHeader(self) -> None:
        self.assertEqual(self.transport.value(), b"")
        self.receiver.dataReceived(proxyFrames(("a.img", b"alpha")))
        self.assertEqual(self.statuses(), [wire.LinkStatus(wire.LinkStatusKind.HELLO, wire.LINK_EXTENSION_VERSION)])
        self.receiver.dataReceived(proxyFrames(("b.img", b"bravo")))
        self.assertEqual(len(self.statuses()), 1)

    def test_endOfDumpConfirmed(self) -> None:
        self.receiver.dataReceived(
            proxyFrames(("a.img", b"alpha"), ("e.img", b"")) + marker()
        )
        self.assertEqual(
            self.statuses()[1:],
            [wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=2, size=5)],
        )
        self.assertEqual(self.sink.dumpsEnded, 1)
        # The link stays; the next dump's images follow, for the same session.
        self.receiver.dataReceived(proxyFrames(("c.img", b"charlie")) + marker())
        self.assertEqual(self.sink.tokens, [FakeLinkSource.sessionToken])
        self.assertEqual(
            self.statuses()[-1], wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=7)
        )
        self.assertEqual(readAll(self.sink.registry.get(("snap1", "c.img"))), b"charlie")  # type: ignore[arg-type]

    def test_markerFromACProxyIsRefused(self) -> None:
        """Only a header carrying the link version can be a marker."""
        self.receiver.dataReceived(wire.RemoteHeader("", "", 0, 0).toBytes())
        self.assertTrue(self.transport.disconnected)


def _chunked(name: str, *chunks: bytes, end: int = wire.CHUNK_END, snapshotId: str = "snap1") -> bytes:
    """A cut-through image as a twisted-criu proxy sends it."""
    out = wire.RemoteHeader(name, snapshotId, 1, 0, None, wire.LINK_EXTENSION_VERSION, True).toBytes()
    assert all(chunks), "a chunk of length 0 is the end of the image"
    for chunk in chunks:
        out += wire.CHUNK_LENGTH.pack(len(chunk)) + chunk
    return out + wire.CHUNK_LENGTH.pack(end)


class ChunkedReceiverTests(_ReceiverCase):
    """Cut-through images: chunks as criu writes them, published only when ended."""

    def test_everySplitPoint(self) -> None:
        data = (
            proxyFrames(("first.img", b"1"))
            + _chunked("pages.img", b"abc", b"d", b"efgh")
            + _chunked("empty.img")
            + proxyFrames(("after.img", b"after"))
            + wire.END_OF_DUMP.toBytes()
        )
        for cut in range(len(data) + 1):
            self.sink = FakeSink()
            receiver, transport = self.connect()
            receiver.dataReceived(data[:cut])
            receiver.dataReceived(data[cut:])
            self.assertEqual(
                [self.stored(n) for n in ("pages.img", "empty.img", "after.img")],
                [b"abcdefgh", b"", b"after"],
                cut,
            )
            statuses = [wire.LinkStatus.fromBytes(p) for p in wire.iterFrames(transport.value())]
            self.assertEqual(
                statuses[-1], wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=4, size=14)
            )

    def test_notPublishedUntilEnded(self) -> None:
        """A restore waiting for the image gets it only once it is complete."""
        receiver, _ = self.connect()
        waiting = self.sink.registry.whenAvailable(("snap1", "pages.img"))
        data = _chunked("pages.img", b"abc", b"def")
        receiver.dataReceived(data[:-4])
        self.assertNoResult(waiting)
        self.assertIsNone(self.stored("pages.img"))
        receiver.dataReceived(data[-4:])
        self.assertEqual(readAll(self.successResultOf(waiting)), b"abcdef")

    def test_abortedWriteIsDiscarded(self) -> None:
        """The proxy's criu broke off: nothing published, the link goes on."""
        receiver, transport = self.connect()
        old = proxyFrames(("pages.img", b"old version"))
        receiver.dataReceived(old + _chunked("pages.img", b"partial", end=wire.CHUNK_ABORT))
        self.assertEqual(self.stored("pages.img"), b"old version")
        receiver.dataReceived(proxyFrames(("next.img", b"next")) + wire.END_OF_DUMP.toBytes())
        self.assertEqual(self.stored("next.img"), b"next")
        self.assertFalse(transport.disconnected)
        statuses = [wire.LinkStatus.fromBytes(p) for p in wire.iterFrames(transport.value())]
        self.assertEqual(statuses[-1].images, 2)  # the discarded image is not counted

    def test_linkLostMidImage(self) -> None:
        receiver, _ = self.connect()
        waiting = self.sink.registry.whenAvailable(("snap1", "pages.img"))
        receiver.dataReceived(_chunked("pages.img", b"abc", b"def")[:-4])
        receiver.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.stored("pages.img"))
        self.assertEqual(self.sink.closed, [False])
        errors = self.errors()
        self.assertIn(
            "link lost in the middle of snap1/pages.img: 6 bytes of a cut-through image arrived", errors[-1]
        )
        self.sink.registry.close()
        self.failureResultOf(waiting)

    def test_oversizedChunkDropsTheLink(self) -> None:
        receiver, transport = self.connect()
        header = wire.RemoteHeader("pages.img", "snap1", 1, 0, None, 2, True).toBytes()
        receiver.dataReceived(header + wire.CHUNK_LENGTH.pack(wire.MAX_CHUNK + 1))
        self.assertTrue(transport.disconnected)
        receiver.connectionLost(Failure(ConnectionLost()))
        self.assertIsNone(self.stored("pages.img"))

    def test_noRoomForAChunk(self) -> None:
        """Room is checked as chunks come, since the size is not known up front."""
        self.sink.store = SpillStore(100, self.mktemp())  # type: ignore[assignment]
        self.patch(self.sink.store, "room", lambda: 10)
        receiver, transport = self.connect()
        receiver.dataReceived(_chunked("pages.img", b"12345", b"678901"))
        self.assertTrue(transport.disconnected)
        errors = self.errors()
        self.assertIn("refusing snap1/pages.img: 11 bytes so far, room for 10", errors[-1])

    def test_silenceBetweenChunksIsNoStall(self) -> None:
        """criu may be slow: only silence inside a chunk or header is a stall."""
        clock = Clock()
        self.sink.reactor = clock
        receiver, transport = self.connect()
        data = _chunked("pages.img", b"abcdef")
        receiver.dataReceived(data[:-4])  # a whole chunk: waiting for the next
        clock.advance(self.sink.linkTimeout * 2)
        self.assertFalse(transport.disconnected)
        receiver.dataReceived(data[-4:-2])  # half a length: now it is a stall
        clock.advance(self.sink.linkTimeout + 1)
        self.assertTrue(transport.disconnected)
