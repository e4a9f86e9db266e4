"""
Tests for resuming an image after a link break (link version 4): the
cache's kept parts (L{twisted_criu.daemons.partials}), the receiver that
keeps and continues them, and the proxy's side (L{twisted_criu.link.resume}).
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.daemons.partials import KeptParts
from twisted_criu.errors import ImageSizeMismatch
from twisted_criu.interfaces import ISendingLink
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.resume import ResumedImage, Resumption, skipBytes
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeSink, driveProducer, storedImage

from .helpers import marker

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


class _Case(SynchronousTestCase):
    def setUp(self) -> None:
        self.sink = FakeSink()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def connect(self) -> tuple[RemoteReceiver, StringTransport]:
        receiver = RemoteReceiver(self.sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        return receiver, transport

    def breakAfter(self, data: bytes) -> None:
        """A link that carries C{data}, then breaks."""
        receiver, _ = self.connect()
        receiver.dataReceived(data)
        receiver.connectionLost(Failure(ConnectionLost("cut")))

    def stored(self) -> bytes | None:
        image = self.sink.registry.get(KEY)
        return None if image is None else readAll(image)

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


class _Link:
    """Enough of an L{ISendingLink} for L{Resumption}."""

    def __init__(self, peerVersion: int = 4) -> None:
        self.peerVersion = peerVersion
        self.held = False
        self.lost = False
        self.markers: list[tuple[wire.Marker, int]] = []
        self.offered = 0
        self.aborted = False
        self._lost: Deferred[None] = Deferred()

    def sendMarker(self, kind: wire.Marker, sequence: int = 0) -> None:
        self.markers.append((kind, sequence))

    def offerLive(self) -> None:
        self.offered += 1

    def whenLost(self) -> Deferred[None]:
        return self._lost

    def abort(self) -> None:
        self.aborted = True
        self.lost = True
        self._lost.callback(None)


class ResumptionTests(SynchronousTestCase):
    """The proxy asks where to resume, and checks the version it holds."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.waiting: dict[int, Deferred[wire.LinkStatus]] = {}

        def expectSynced(sender: ISendingLink, sequence: int) -> Deferred[wire.LinkStatus]:
            d: Deferred[wire.LinkStatus] = Deferred(lambda d: None if self.waiting.pop(sequence, None) else None)
            self.waiting[sequence] = d
            return d

        self.sequences = iter(range(1, 100))
        #: The session's current version of each image.
        self.current: dict[tuple[str, str], Any] = {}
        self.resume = Resumption(expectSynced, lambda: next(self.sequences), self.current.get, self.clock, 30)
        self.image = storedImage(MemoryStore(), DATA)
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def ask(self, previous: int = 4) -> _Link:
        link = _Link()
        self.resume.linkUp(link, _Link(previous))  # type: ignore[arg-type]
        return link

    def test_nothingUnfinishedNothingAsked(self) -> None:
        link = self.ask()
        self.assertEqual((link.markers, link.held), ([], False))

    def test_asksAndHoldsUntilSynced(self) -> None:
        self.resume.forwarding(KEY, self.image)
        link = self.ask()
        self.assertEqual((link.markers, link.held), ([(wire.Marker.RESUME, 1)], True))
        self.resume.resumeAt(wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name=KEY[1], snapshotId=KEY[0]))
        self.waiting.pop(1).callback(wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=1))
        self.assertEqual((link.held, link.offered), (False, 1))
        self.assertEqual(self.resume.offsetFor(KEY, self.image), 4000)
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_versionThreeCacheIsNotAsked(self) -> None:
        self.resume.forwarding(KEY, self.image)
        self.assertEqual(self.ask(previous=3).markers, [])

    def test_anotherVersionGoesFromTheStart(self) -> None:
        self.resume.forwarding(KEY, self.image)
        self.ask()
        self.resume.resumeAt(wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name=KEY[1], snapshotId=KEY[0]))
        self.assertEqual(self.resume.offsetFor(KEY, storedImage(MemoryStore(), DATA)), 0)

    def test_finishedIsForgotten(self) -> None:
        """An image handed over whole is not resumed: the cache's part is of another connection."""
        self.resume.forwarding(KEY, self.image)
        self.resume.forwarding(KEY, None)
        self.current[KEY] = self.image
        self.answer(self.ask(), wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name=KEY[1], snapshotId=KEY[0]))
        self.assertEqual(self.resume.offsetFor(KEY, self.image), 0)

    # -- images the cache holds whole ------------------------------------------

    def answer(self, link: _Link, *statuses: wire.LinkStatus) -> None:
        """The cache answers C{link}'s RESUME with C{statuses}, then SYNCED."""
        [(kind, sequence)] = link.markers
        self.assertEqual(kind, wire.Marker.RESUME)
        for status in statuses:
            self.resume.resumeAt(status)
        self.waiting.pop(sequence).callback(wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=sequence))
        self.assertFalse(link.held)

    def whole(self, size: int = len(DATA), key: tuple[str, str] = KEY) -> wire.LinkStatus:
        return wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, images=1, size=size, name=key[1], snapshotId=key[0])

    def withAnother(self) -> None:
        """Another image, skippable: the cache is asked."""
        other = ("snap1", "core-1.img")
        self.current[other] = storedImage(MemoryStore(), b"core")
        self.sentWhole(self.current[other], other)

    def sentWhole(self, image: Any, key: tuple[str, str] = KEY) -> None:
        self.resume.forwarding(key, image)
        self.resume.forwarding(key, None)

    def test_wholeSentIsAskedAbout(self) -> None:
        """Nothing was on its way, but images went out whole: the cache is asked which it holds."""
        self.sentWhole(self.image)
        self.assertEqual(self.ask().markers, [(wire.Marker.RESUME, 1)])
        self.assertEqual(self.ask(previous=3).markers, [])

    def test_exactVersionHeldWholeIsSkipped(self) -> None:
        other = ("snap1", "core-1.img")
        small = storedImage(MemoryStore(), b"core")
        self.sentWhole(self.image)
        self.sentWhole(small, other)
        self.current.update({KEY: self.image, other: small})
        link = self.ask()
        self.answer(link, self.whole(), self.whole(4, other))
        self.assertEqual((self.resume.skips(KEY, self.image), self.resume.skips(other, small)), (True, True))
        self.assertEqual(link.offered, 1)
        said = [e["log_format"].format(**e) for e in self.events]
        self.assertIn("the cache holds 2 images (10.0 KiB) of this session whole: not sent again", said)
        # Only on that connection: the next one asks again.
        self.ask()
        self.assertFalse(self.resume.skips(KEY, self.image))

    def test_changedVersionIsSent(self) -> None:
        """The session's image is another version now (of the same size): sent."""
        self.sentWhole(self.image)
        self.current[KEY] = storedImage(MemoryStore(), DATA)
        self.answer(self.ask(), self.whole())
        self.assertFalse(self.resume.skips(KEY, self.current[KEY]))
        self.assertFalse(self.resume.skips(KEY, self.image))

    def test_differentSizeIsSent(self) -> None:
        self.sentWhole(self.image)
        self.current[KEY] = self.image
        self.answer(self.ask(), self.whole(len(DATA) - 1))
        self.assertFalse(self.resume.skips(KEY, self.image))

    def test_notHandedOverWholeIsSent(self) -> None:
        """A version the link never finished: the cache's whole copy cannot be it."""
        self.resume.forwarding(KEY, self.image)
        self.current[KEY] = self.image
        self.answer(self.ask(), self.whole())
        self.assertFalse(self.resume.skips(KEY, self.image))

    def test_twoVersionsWentOutIsSent(self) -> None:
        """
        Two versions went out: the cache may hold the first whole (the
        second broke off after the link took it), of the same size.
        """
        first, second = self.image, storedImage(MemoryStore(), DATA)
        self.withAnother()
        self.sentWhole(first)
        self.sentWhole(second)
        self.current[KEY] = second
        self.answer(self.ask(), self.whole())
        self.assertFalse(self.resume.skips(KEY, second))
        self.sentWhole(second)  # and it stays unknown
        self.answer(self.ask(), self.whole())
        self.assertFalse(self.resume.skips(KEY, second))

    def test_cutThroughWholeIsItsImage(self) -> None:
        """A write cut through to its end: the version that went out is the image it became."""
        store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(store.close)
        writer: Any = store.newWriter()
        growing = writer.follow()
        self.resume.followed(growing, writer)
        self.resume.forwarding(KEY, growing)
        writer.write(DATA)
        image = writer.commit()
        self.resume.forwarding(KEY, None)
        self.resume.published(KEY, image)
        growing.close()
        self.current[KEY] = image
        self.answer(self.ask(), self.whole())
        self.assertTrue(self.resume.skips(KEY, image))

    def test_cutThroughBrokenOffIsNotWhole(self) -> None:
        """criu's write broke off (the cache discarded it): nothing of it is held whole."""
        store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(store.close)
        writer: Any = store.newWriter()
        growing = writer.follow()
        self.resume.followed(growing, writer)
        self.resume.forwarding(KEY, growing)
        writer.write(DATA)
        writer.abort()
        self.resume.forwarding(KEY, None)
        growing.close()
        self.current[KEY] = self.image  # an older version, which never went out in this session
        self.withAnother()
        self.answer(self.ask(), self.whole())
        self.assertFalse(self.resume.skips(KEY, self.image))

    def test_noAnswerDropsTheLink(self) -> None:
        self.resume.forwarding(KEY, self.image)
        link = self.ask()
        self.clock.advance(30)
        self.assertTrue(link.aborted)
        self.assertEqual(self.waiting, {})

    def test_liveWriteResumedLiveOrAsItsImage(self) -> None:
        """A write cut through: resumed as it grows, or as the image it became."""
        store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(store.close)
        writer: Any = store.newWriter()
        writer.write(DATA[:6000])
        growing = writer.follow()
        self.resume.followed(growing, writer)
        self.resume.forwarding(KEY, growing)
        growing.close()  # the link broke
        self.assertEqual(self.resume.liveToResume(), (KEY, writer))
        self.ask()
        point = wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name=KEY[1], snapshotId=KEY[0])
        self.resume.resumeAt(point)
        again = writer.follow()
        self.resume.followed(again, writer)
        self.assertEqual(self.resume.offsetFor(KEY, again), 4000)
        rest = ResumedImage.ofGrowing(again, 4000)
        self.assertEqual((rest.available, rest.complete), (2000, False))
        writer.write(DATA[6000:])
        image = writer.commit()
        self.assertEqual(readAll(image), DATA)
        self.assertEqual(rest.read(1 << 20), DATA[4000:])
        rest.close()
        # The link breaks again (never finished); the write is complete now.
        self.resume.published(KEY, image)
        self.assertIsNone(self.resume.liveToResume())
        self.ask()
        self.resume.resumeAt(point)
        self.assertEqual(self.resume.offsetFor(KEY, image), 4000)

    def test_aNewWriteIsAnotherVersion(self) -> None:
        store = SpillStore(1 << 30, self.mktemp())
        self.addCleanup(store.close)
        writer: Any = store.newWriter()
        growing = writer.follow()
        self.resume.followed(growing, writer)
        self.resume.forwarding(KEY, growing)
        self.resume.writeStarted(KEY, store.newWriter())  # type: ignore[arg-type]
        self.assertIsNone(self.resume.liveToResume())
        self.assertEqual(self.ask().markers, [])
        growing.close()
        writer.abort()


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
