"""
Tests for resuming after a link break (link version 4), the proxy's side
(L{twisted_criu.link.resume}): when it asks the cache, where an image
resumes, and which images the cache holds whole are not sent again.
"""

from __future__ import annotations

from typing import Any

from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionLost
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.daemons.proxysession import ProxySession
from twisted_criu.interfaces import ISendingLink
from twisted_criu.link.resume import ResumedImage, Resumption
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import driveProducer, storedImage

from .test_resume import DATA, KEY


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

    def test_handedOverWholeKeptInPart(self) -> None:
        """
        An image the link took whole (into the socket's buffers) of which
        the cache kept only part when the link broke: the one version that
        went out, resumed where the cache's part ends.
        """
        self.resume.forwarding(KEY, self.image)
        self.resume.forwarding(KEY, None)
        self.current[KEY] = self.image
        self.answer(self.ask(), wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name=KEY[1], snapshotId=KEY[0]))
        self.assertEqual(self.resume.offsetFor(KEY, self.image), 4000)

    def test_twoVersionsHandedOverGoFromTheStart(self) -> None:
        """Two versions went out whole: the cache's part may be of either, so none is resumed."""
        second = storedImage(MemoryStore(), DATA)
        self.withAnother()  # so that the cache is asked at all
        self.sentWhole(self.image)
        self.sentWhole(second)
        self.current[KEY] = second
        self.answer(self.ask(), wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, size=4000, name=KEY[1], snapshotId=KEY[0]))
        self.assertEqual(self.resume.offsetFor(KEY, second), 0)

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


class SessionTests(SynchronousTestCase):
    """A proxy session's second connection sends only what the cache lacks, and its receipt counts that."""

    def test_heldWholeNotSentNorCounted(self) -> None:
        reactor = MemoryReactorClock()
        session = ProxySession(reactor, _NoCache(), None)  # type: ignore[arg-type]
        session.start()
        self.addCleanup(lambda: session.stop() and None)
        first, firstTransport = RemoteSender(session, clock=reactor), StringTransport()
        first.makeConnection(firstTransport)
        first.dataReceived(wire.LinkStatus(wire.LinkStatusKind.HELLO, 4).toBytes())
        store = MemoryStore()
        session.registry.publish(("snap", "a.img"), storedImage(store, b"abc"))
        session.registry.publish(("snap", "b.img"), storedImage(store, b"12345"))
        driveProducer(firstTransport)
        self.assertEqual(first.imagesSent, 2)
        first.connectionLost(Failure(ConnectionLost("cut")))

        second, transport = RemoteSender(session, clock=reactor), StringTransport()
        second.makeConnection(transport)
        resume = wire.RemoteHeader(
            "", "", wire.O_RDONLY, 0, None, 4, session=session.sessionToken, marker=wire.Marker.RESUME, sequence=1
        ).toBytes()
        self.assertEqual(transport.value(), resume)  # and nothing else until the answer
        for status in [
            wire.LinkStatus(wire.LinkStatusKind.HELLO, 4),
            wire.LinkStatus(wire.LinkStatusKind.RESUME_AT, images=1, size=3, name="a.img", snapshotId="snap"),
            wire.LinkStatus(wire.LinkStatusKind.SYNCED, sequence=1),
        ]:
            second.dataReceived(status.toBytes())
        session.registry.close()
        driveProducer(transport)
        sent = transport.value()[len(resume):]
        self.assertNotIn(b"a.img", sent)
        self.assertIn(b"b.img", sent)
        self.assertEqual(session.state, "forwarding")
        self.assertTrue(sent.endswith(wire.RemoteHeader(
            "", "", 0, 0, None, wire.LINK_EXTENSION_VERSION, session=session.sessionToken
        ).toBytes()))
        second.dataReceived(wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=5).toBytes())
        self.assertEqual(session.state, "delivered")
        self.assertFalse(transport.disconnected)


class _NoCache:
    """A cache that is never reached (the test connects the link itself)."""

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()
