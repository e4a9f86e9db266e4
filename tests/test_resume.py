"""
Tests for resuming an image after a link break (link version 4): the
cache's kept parts (L{twisted_criu.daemons.partials}), the receiver that
keeps and continues them, its answer to RESUME, and the proxy's link
sending from an offset (the proxy's decisions: tests.test_resume_proxy).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.logger import LogLevel
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.daemons.partials import KeptParts
from twisted_criu.errors import ImageSizeMismatch
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.resume import skipBytes
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeSink, driveProducer, storedImage

from .helpers import marker
from .test_receiver import _ReceiverCase

TOKEN = FakeLinkSource.sessionToken
KEY = ("snap1", "pages-1.img")
DATA = bytes(range(256)) * 40  # 10240 bytes


def header(size: int = len(DATA), version: int = wire.LINK_EXTENSION_VERSION, **kwargs: Any) -> bytes:
    return wire.RemoteHeader(
        "pages-1.img", "snap1", wire.O_WRONLY, size, None, version, session=TOKEN, **kwargs
    ).toBytes()


def resumed(offset: int, rest: bytes, end: int = wire.CHUNK_END) -> bytes:
    """A resumed image's header, its rest as one chunk, and its end."""
    out = header(0, chunked=True, offset=offset)
    if rest:
        out += wire.chunkWord(len(rest)) + rest
    return out + wire.CHUNK_LENGTH.pack(end)


class _Case(_ReceiverCase):
    def breakAfter(self, data: bytes) -> None:
        """A link that carries C{data}, then breaks."""
        receiver, _ = self.connect()
        receiver.dataReceived(data)
        receiver.connectionLost(Failure(ConnectionLost("cut")))

    def stored(self, name: str = KEY[1]) -> bytes | None:
        return super().stored(name)

    def logged(self, level: LogLevel = LogLevel.warn) -> list[str]:
        return [e["log_format"].format(**e) for e in self.events if e["log_level"] >= level]

    def statuses(self, transport: StringTransport) -> list[wire.LinkStatus]:
        return [wire.LinkStatus.fromBytes(p) for p in wire.iterFrames(transport.value())]


class KeepingTests(_Case):
    """The cache keeps the part of an image whose version-4 link broke."""

    def test_keptNotPublished(self) -> None:
        read = self.sink.registry.whenAvailable(KEY)
        self.breakAfter(header() + DATA[:4000])
        self.assertIsNone(self.stored())
        self.assertNoResult(read)
        self.assertEqual(self.sink.store.inMemory, 4000)  # still counts against the store
        self.assertEqual(
            self.sink.partials.statuses(TOKEN),
            [wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name="pages-1.img", snapshotId="snap1")],
        )
        self.assertTrue(any("4000 of 10240 bytes arrived; kept for its proxy" in e for e in self.logged()))

    def test_cutThroughKeptInsideAChunk(self) -> None:
        self.breakAfter(header(0, chunked=True) + wire.chunkWord(5000) + DATA[:3000])
        self.assertEqual(self.sink.partials.statuses(TOKEN)[0].size, 3000)

    def test_versionThreeIsNotKept(self) -> None:
        self.breakAfter(header(version=3) + DATA[:4000])
        self.assertEqual(self.sink.partials.statuses(TOKEN), [])
        self.assertEqual(self.sink.store.inMemory, 0)
        self.assertTrue(any("4000 of 10240 bytes arrived; discarded" in e for e in self.logged(LogLevel.error)))

    def test_noGraceNoKeeping(self) -> None:
        self.sink.partials.grace = 0
        self.breakAfter(header() + DATA[:4000])
        self.assertEqual(self.sink.store.inMemory, 0)

    def test_graceExpires(self) -> None:
        self.breakAfter(header() + DATA[:4000])
        self.sink.reactor.advance(59)
        self.assertEqual(self.sink.store.inMemory, 4000)
        self.sink.reactor.advance(1)
        self.assertEqual(self.sink.store.inMemory, 0)
        self.assertEqual(self.sink.partials.statuses(TOKEN), [])
        self.assertIn(
            "discarded the 4000 bytes kept of snap1/pages-1.img (session fake-session): its proxy did not"
            " come back within 60 s",
            self.logged(),
        )


class ResumingTests(_Case):
    """A new link asks what is kept (SYNC), and continues it (a header with an offset)."""

    def setUp(self) -> None:
        super().setUp()
        self.breakAfter(header() + DATA[:4000])

    def test_askAnsweredWithResumeAt(self) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(marker(wire.Marker.RESUME, sequence=5))
        self.assertEqual(
            self.statuses(transport),
            [
                wire.LinkStatus(wire.LinkStatusKind.HELLO, wire.LINK_EXTENSION_VERSION),
                wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name="pages-1.img", snapshotId="snap1"),
                wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=5),
            ],
        )

    def test_askListsImagesHeldWhole(self) -> None:
        """Images of the session received whole are listed with C{images=1} and their size."""
        self.sink.registry.publish(("snap1", "inventory.img"), storedImage(self.sink.store, b"inventory"))
        receiver, transport = self.connect()
        receiver.dataReceived(marker(wire.Marker.RESUME, sequence=5))
        self.assertEqual(
            self.statuses(transport)[1:],
            [
                wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name="pages-1.img", snapshotId="snap1"),
                wire.LinkStatus(
                    wire.LinkStatusKind.RESUME_AT, images=1, size=9, name="inventory.img", snapshotId="snap1"
                ),
                wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=5),
            ],
        )

    def test_commitSyncListsNothing(self) -> None:
        """A SYNC is a commit's: answered by SYNCED alone (RESUME_AT answers only RESUME)."""
        receiver, transport = self.connect()
        receiver.dataReceived(marker(wire.Marker.SYNC, sequence=7))
        self.assertEqual(
            [(s.kind, s.sequence) for s in self.statuses(transport)],
            [(wire.LinkStatusKind.HELLO, 0), (wire.LinkStatusKind.SYNCED, 7)],
        )

    def test_resumedAtTheKeptOffset(self) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(resumed(4000, DATA[4000:]))
        self.assertEqual(self.stored(), DATA)
        self.assertEqual(self.sink.store.inMemory, len(DATA))
        self.assertEqual(self.sink.partials.statuses(TOKEN), [])
        self.assertFalse(transport.disconnected)
        receiver.dataReceived(marker())
        self.assertEqual(
            self.statuses(transport)[-1],
            wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=len(DATA)),
        )

    def test_brokenAgainKeepsMore(self) -> None:
        self.breakAfter(resumed(4000, b"")[:-4] + wire.chunkWord(6240) + DATA[4000:9000])
        self.assertEqual(self.sink.partials.statuses(TOKEN)[0].size, 9000)
        receiver, _ = self.connect()
        receiver.dataReceived(resumed(9000, DATA[9000:]))
        self.assertEqual(self.stored(), DATA)

    def test_offsetMismatchDropsTheLink(self) -> None:
        receiver, transport = self.connect()
        receiver.dataReceived(resumed(3000, DATA[3000:]))
        self.assertTrue(transport.disconnected)
        self.assertIsNone(self.stored())
        self.assertEqual(self.sink.store.inMemory, 0)
        self.assertEqual(self.sink.partials.statuses(TOKEN), [])
        self.assertIn(
            "the proxy resumes snap1/pages-1.img (session fake-session) at byte 3000, but 4000 bytes of"
            " it are kept: discarded; dropping the link",
            self.logged(LogLevel.error),
        )

    def test_nothingKeptDropsTheLink(self) -> None:
        self.sink.reactor.advance(60)
        receiver, transport = self.connect()
        receiver.dataReceived(resumed(4000, DATA[4000:]))
        self.assertTrue(transport.disconnected)
        self.assertIsNone(self.stored())

    def test_startOverDiscardsTheKeptPart(self) -> None:
        receiver, _ = self.connect()
        receiver.dataReceived(header() + DATA)
        self.assertEqual(self.stored(), DATA)
        self.assertEqual(self.sink.store.inMemory, len(DATA))
        self.assertEqual(self.sink.partials.statuses(TOKEN), [])

    def test_sessionEndDiscards(self) -> None:
        self.sink.partials.discardSession(TOKEN, "the session is aborted")
        self.assertEqual(self.sink.store.inMemory, 0)
        self.assertIn(
            "discarded the 4000 bytes kept of snap1/pages-1.img (session fake-session): the session is aborted",
            self.logged(),
        )


class KeptPartsTests(SynchronousTestCase):
    def test_heldAndCleared(self) -> None:
        store = MemoryStore()
        parts = KeptParts(Clock(), 5)
        for name in ("a", "b"):
            writer = store.newWriter()
            writer.write(b"x" * 10)
            parts.keep("1", ("s", name), writer)
        self.assertEqual(parts.held, 20)
        parts.clear()
        self.assertEqual((parts.held, store.inMemory), (0, 0))


class SkipTests(SynchronousTestCase):
    """Readers of every store start at an offset."""

    def check(self, image: Any) -> None:
        for offset in (0, 1, 4095, 4096, 5000, len(DATA) * 3 - 1, len(DATA) * 3):
            reader = image.open()
            skipBytes(reader, offset)
            got = b""
            while chunk := reader.read(3000):
                got += chunk
            reader.close()
            self.assertEqual(got, (DATA * 3)[offset:], offset)
        reader = image.open()
        self.assertRaises(ImageSizeMismatch, skipBytes, reader, len(DATA) * 3 + 1)
        reader.close()

    def test_memory(self) -> None:
        store = MemoryStore()
        writer = store.newWriter()
        for _ in range(3):
            writer.write(DATA)
        self.check(writer.commit())

    def test_spilled(self) -> None:
        """Direct I/O reads whole blocks: an offset inside one is read up to."""
        store = SpillStore(0, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        for _ in range(3):
            writer.write(DATA)
        self.check(writer.commit())

    def test_file(self) -> None:
        from twisted_criu.storage.files import FileImage

        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(DATA * 3)
        self.check(FileImage(path))


class SenderTests(SynchronousTestCase):
    """The proxy's link sends an image from the offset its source gives."""

    def setUp(self) -> None:
        self.source = FakeLinkSource()
        self.store = MemoryStore()
        self.source.images[KEY] = self.image = storedImage(self.store, DATA)
        self.sender = RemoteSender(self.source)
        self.transport = StringTransport()
        self.sender.makeConnection(self.transport)
        self.sender.dataReceived(wire.LinkStatus(wire.LinkStatusKind.HELLO, 4).toBytes())

    def test_resumedFromTheOffset(self) -> None:
        """The cache's kept part plus what the proxy sends is the image."""
        sink = FakeSink()
        broken = RemoteReceiver(sink)
        broken.makeConnection(StringTransport())
        broken.dataReceived(header() + DATA[:4000])
        broken.connectionLost(Failure(ConnectionLost()))
        self.source.offsets[KEY] = 4000
        self.sender.enqueue(KEY)
        driveProducer(self.transport)
        sent = self.transport.value()
        self.assertLess(len(sent), len(DATA) - 4000 + 200)
        first = wire.RemoteHeader.fromBytes(next(iter(wire.iterFrames(sent[: 4 + wire.U32.unpack(sent[:4])[0]]))))
        self.assertEqual((first.offset, first.chunked), (4000, True))
        receiver = RemoteReceiver(sink)
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(sent.replace(FakeLinkSource.sessionToken.encode(), TOKEN.encode()))
        self.assertEqual(readAll(sink.registry.get(KEY)), DATA)  # type: ignore[arg-type]
        self.assertEqual((self.sender.bytesSent, self.sender.bytesSinceMarker), (len(DATA) - 4000, len(DATA)))
        self.assertEqual(self.source.forwards, [(KEY, self.image), (KEY, None)])

    def test_heldSendsNothing(self) -> None:
        self.sender.held = True
        self.sender.enqueue(KEY)
        self.assertEqual(self.transport.value(), b"")
        self.sender.held = False
        self.sender.offerLive()
        driveProducer(self.transport)
        self.assertEqual(len(self.transport.value()), len(header()) + len(DATA))

    def test_unfinishedStaysRecorded(self) -> None:
        """A link lost in the middle: the source is never told the image is done."""
        self.sender.enqueue(KEY)
        self.transport.producer.resumeProducing()  # type: ignore[attr-defined]
        self.sender.connectionLost(Failure(ConnectionLost()))
        self.assertEqual(self.source.forwards, [(KEY, self.image)])


class CacheAskTests(SynchronousTestCase):
    """On the real cache: asking where to resume confirms nothing."""

    def test_askDoesNotDeliver(self) -> None:
        """A RESUME, of any sequence, lists what is held and confirms nothing; a SYNC delivers."""
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactorClock

        from twisted_criu.daemons.cache import ImageCacheService

        clock = MemoryReactorClock()
        cache = ImageCacheService(
            clock, serverFromString(clock, "unix:/nonexistent/c.sock"), serverFromString(clock, "tcp:0")
        )
        receiver = RemoteReceiver(cache)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(header() + DATA + marker(wire.Marker.RESUME, sequence=1))
        session = cache.session
        assert session is not None
        self.assertEqual(session.state, "dumping")
        statuses = [wire.LinkStatus.fromBytes(p) for p in wire.iterFrames(transport.value())]
        self.assertEqual(
            statuses[1:],
            [
                wire.LinkStatus(
                    wire.LinkStatusKind.RESUME_AT, images=1, size=len(DATA), name=KEY[1], snapshotId=KEY[0]
                ),
                wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=1),
            ],
        )
        receiver.dataReceived(marker(wire.Marker.RESUME, sequence=2))
        self.assertEqual(session.state, "dumping")
        receiver.dataReceived(marker(wire.Marker.SYNC, sequence=3))
        self.assertEqual(session.state, "delivered")

    def test_askForAnUnknownSessionCreatesNone(self) -> None:
        from twisted.internet.endpoints import serverFromString
        from twisted.internet.testing import MemoryReactorClock

        from twisted_criu.daemons.cache import ImageCacheService

        clock = MemoryReactorClock()
        cache = ImageCacheService(
            clock, serverFromString(clock, "unix:/nonexistent/c.sock"), serverFromString(clock, "tcp:0")
        )
        receiver = RemoteReceiver(cache)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(marker(wire.Marker.RESUME, sequence=4))
        self.assertIsNone(cache.session)
        self.assertEqual(
            [wire.LinkStatus.fromBytes(p).kind for p in wire.iterFrames(transport.value())],
            [wire.LinkStatusKind.HELLO, wire.LinkStatusKind.SYNCED],
        )
