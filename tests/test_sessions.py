"""
The sessions' state machines, driven input by input with fakes (no
sockets): the proxy's chain of dumps (L{DumpChain}) and the ending of a
dump on its link (L{DumpEnding}), the cache's restore (L{Restore}), and the
two sessions that feed them.
"""

from __future__ import annotations

from typing import Any

from automat import NoTransition
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import MemoryReactorClock, StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase
from zope.interface.verify import verifyObject

from twisted_criu import wire
from twisted_criu.daemons.cachesession import CacheSession, MigrationCore, MigrationMachine
from twisted_criu.daemons.dumpchain import (
    COMPLETE,
    DELIVERED,
    DUMPING,
    FORWARDING,
    ChainMachine,
    DumpCount,
    EndingCore,
    EndingMachine,
    Receipt,
)
from twisted_criu.daemons.proxysession import HELLO_GRACE, ProxySession
from twisted_criu.interfaces import ILinkSource, ISession
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import SessionSummary
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.testing.fakes import driveProducer, storedImage


class ChainTests(SynchronousTestCase):
    """L{DumpChain}: dumping, forwarding, delivered, complete."""

    def setUp(self) -> None:
        self.count = DumpCount()
        self.chain = ChainMachine(self.count)

    def test_twoDumps(self) -> None:
        """A pre-dump then a dump, each finished, delivered, then the restore."""
        chain, states = self.chain, []
        states.append(chain.state())
        chain.dumpFinished()
        states.append(chain.state())
        self.assertTrue(chain.dumpDelivered())
        states.append(chain.state())
        chain.dumpBegun()
        states.append(chain.state())
        chain.dumpFinished()
        states.append(chain.state())
        self.assertTrue(chain.dumpDelivered())
        states.append(chain.state())
        chain.chainOver()
        states.append(chain.state())
        self.assertEqual(
            states, [DUMPING, FORWARDING, DELIVERED, DUMPING, FORWARDING, DELIVERED, COMPLETE]
        )
        self.assertEqual((self.count.finished, self.count.delivered), (2, 2))

    def test_deliveredWhileTheNextDumps(self) -> None:
        """The cache confirms a dump after the next one began: announced, still dumping."""
        self.chain.dumpFinished()
        self.chain.dumpBegun()
        self.assertTrue(self.chain.dumpDelivered())
        self.assertFalse(self.chain.dumpDelivered())  # once only
        self.assertEqual(self.chain.state(), DUMPING)
        self.assertEqual((self.count.finished, self.count.delivered), (1, 1))

    def test_nothingToDeliverWhileDumping(self) -> None:
        self.assertFalse(self.chain.dumpDelivered())
        self.assertEqual(self.chain.state(), DUMPING)

    def test_deliveredAgain(self) -> None:
        """A new connection ends the dump again: nothing new to announce."""
        self.chain.dumpFinished()
        self.chain.dumpDelivered()
        self.assertFalse(self.chain.dumpDelivered())
        self.assertEqual(self.chain.state(), DELIVERED)

    def test_finishedTwice(self) -> None:
        """Two completions of one dump (a write ended after the next began) count twice."""
        self.chain.dumpFinished()
        self.chain.dumpFinished()
        self.assertEqual((self.chain.state(), self.count.finished), (FORWARDING, 2))
        self.chain.dumpDelivered()
        self.chain.dumpFinished()
        self.assertEqual((self.chain.state(), self.count.finished), (FORWARDING, 3))

    def test_beganWhileStillStoring(self) -> None:
        self.chain.dumpBegun()
        self.assertEqual(self.chain.state(), DUMPING)

    def test_overFromAnyState(self) -> None:
        for steps in ([], ["dumpFinished"], ["dumpFinished", "dumpDelivered"]):
            chain = ChainMachine(DumpCount())
            for step in steps:
                getattr(chain, step)()
            chain.chainOver()
            chain.chainOver()
            self.assertEqual(chain.state(), COMPLETE)

    def test_dropOnlyDelivered(self) -> None:
        """The operator drops a chain only once its dumps are delivered."""
        self.assertRaises(NoTransition, self.chain.dropped)
        self.chain.dumpFinished()
        self.assertRaises(NoTransition, self.chain.dropped)
        self.chain.dumpDelivered()
        self.chain.dropped()
        self.assertEqual(self.chain.state(), COMPLETE)

    def test_completeIsOver(self) -> None:
        """A complete chain takes no new dump, and ignores late completions."""
        self.chain.chainOver()
        self.assertRaises(NoTransition, self.chain.dumpBegun)
        self.assertRaises(NoTransition, self.chain.dropped)
        self.chain.dumpFinished()  # a release closes the registry
        self.assertFalse(self.chain.dumpDelivered())
        self.assertEqual((self.chain.state(), self.count.finished), (COMPLETE, 0))


class FakeSender:
    """What the ending touches of a L{RemoteSender}."""

    def __init__(self) -> None:
        self.imagesSinceMarker = 3
        self.bytesSinceMarker = 30
        self.markers = 0
        self.idleWaiters: list[Deferred[None]] = []

    def whenIdle(self) -> Deferred[None]:
        d: Deferred[None] = Deferred()
        self.idleWaiters.append(d)
        return d

    def sendEndOfDump(self) -> None:
        self.markers += 1
        self.imagesSinceMarker = self.bytesSinceMarker = 0


class FakeSession:
    """Records what the ending asks of its session."""

    def __init__(self) -> None:
        self.log = self  # warn() below
        self.calls: list[tuple[Any, ...]] = []

    def warn(self, format: str, **kw: object) -> None:
        self.calls.append(("warn", format))

    def maybeEndDump(self) -> None:
        self.calls.append(("maybeEndDump",))

    def linkIdle(self, sender: Any) -> None:
        self.calls.append(("linkIdle", sender))

    def dumpConfirmed(self, sender: Any, status: wire.LinkStatus, receipt: Receipt) -> None:
        self.calls.append(("dumpConfirmed", sender, status, receipt))

    def endWithEOF(self, sender: Any) -> None:
        self.calls.append(("endWithEOF", sender))

    def sessionOver(self, sender: Any) -> None:
        self.calls.append(("sessionOver", sender))


RECEIVED = wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=3, size=30)


class EndingTests(SynchronousTestCase):
    """L{DumpEnding}: how a finished dump ends on the current connection."""

    def setUp(self) -> None:
        self.clock = Clock()
        self.session = FakeSession()
        self.sender: Any = FakeSender()
        self.ending = EndingMachine(EndingCore(self.session, self.clock))  # type: ignore[arg-type]

    def idle(self) -> None:
        """Wait for the link to go idle, and let it."""
        self.ending.waitForIdle(self.sender)
        self.assertEqual(len(self.sender.idleWaiters), 1)
        self.sender.idleWaiters.pop().callback(None)
        self.assertEqual(self.session.calls.pop(), ("linkIdle", self.sender))

    def markerSent(self) -> None:
        """Bring the ending to "marker sent, awaiting DUMP_RECEIVED"."""
        self.idle()
        self.ending.endWithMarker(self.sender)

    def inGrace(self) -> None:
        """Bring the ending to "waiting for HELLO"."""
        self.idle()
        self.ending.awaitHello(1.0)
    def test_marker(self) -> None:
        """An extended cache: END_OF_DUMP, then DUMP_RECEIVED confirms the counts sent."""
        self.idle()
        self.ending.endWithMarker(self.sender)
        self.assertEqual(self.sender.markers, 1)
        self.ending.dumpReceived(self.sender, RECEIVED)
        self.assertEqual(
            self.session.calls, [("dumpConfirmed", self.sender, RECEIVED, Receipt(3, 30))]
        )
        self.ending.waitForIdle(self.sender)  # ended: the next one may start
        self.assertEqual(len(self.sender.idleWaiters), 1)

    def test_oneEndingAtATime(self) -> None:
        """While a dump is being ended, asking again changes nothing."""
        self.ending.waitForIdle(self.sender)
        self.ending.waitForIdle(self.sender)
        self.assertEqual(len(self.sender.idleWaiters), 1)
        self.sender.idleWaiters.pop().callback(None)
        self.ending.endWithMarker(self.sender)
        self.ending.waitForIdle(self.sender)
        self.ending.endWithMarker(self.sender)
        self.assertEqual((len(self.sender.idleWaiters), self.sender.markers), (0, 1))

    def test_notYet(self) -> None:
        """The link went idle but the dump cannot end: a new attempt may start."""
        self.idle()
        self.ending.notYet()
        self.ending.endWithMarker(self.sender)  # too late: ignored
        self.assertEqual(self.sender.markers, 0)
        self.ending.waitForIdle(self.sender)
        self.assertEqual(len(self.sender.idleWaiters), 1)

    def test_unexpectedReceipt(self) -> None:
        """DUMP_RECEIVED for a dump not ended is ignored, with a warning."""
        self.ending.dumpReceived(self.sender, RECEIVED)
        self.idle()
        self.ending.dumpReceived(self.sender, RECEIVED)
        self.assertEqual(
            self.session.calls,
            [("warn", "the cache confirmed a dump that was not ended; ignored")] * 2,
        )

    def test_helloInTime(self) -> None:
        """A new connection that has not said HELLO yet: HELLO ends the grace."""
        self.idle()
        self.ending.awaitHello(1.5)
        self.assertEqual(len(self.clock.getDelayedCalls()), 1)
        self.ending.hello()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.assertEqual(self.session.calls, [("maybeEndDump",)])

    def test_graceOver(self) -> None:
        """No HELLO within the grace: try again (now as a C cache)."""
        self.idle()
        self.ending.awaitHello(1.5)
        self.clock.advance(1.5)
        self.assertEqual(self.session.calls, [("maybeEndDump",)])
        self.ending.hello()  # too late for this dump: nothing
        self.assertEqual(self.session.calls, [("maybeEndDump",)])

    def test_graceOnlyAfterIdle(self) -> None:
        """The grace ends only a grace: elsewhere its end cannot come."""
        self.assertRaises(NoTransition, self.ending.graceOver)
        self.ending.awaitHello(1.5)  # not waiting for idle: ignored
        self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_eof(self) -> None:
        """A C cache: EOF ends the dump and the chain; the ending is closed."""
        self.idle()
        self.ending.endWithEOF(self.sender)
        self.assertEqual(self.session.calls, [("endWithEOF", self.sender)])
        self.ending.linkUp()
        self.ending.waitForIdle(self.sender)
        self.ending.sessionDone(self.sender)
        self.assertEqual((self.sender.idleWaiters, len(self.session.calls)), ([], 1))

    def test_newConnectionStartsOver(self) -> None:
        """Whatever the last connection was ending, a new one starts over."""
        for step in (
            lambda: self.ending.waitForIdle(self.sender),
            self.markerSent,
            self.inGrace,
        ):
            self.sender.idleWaiters.clear()
            step()
            self.sender.idleWaiters.clear()
            self.ending.linkUp()
            self.assertEqual(self.clock.getDelayedCalls(), [])
            self.ending.waitForIdle(self.sender)
            self.assertEqual(len(self.sender.idleWaiters), 1)
            self.ending.linkUp()
        self.ending.dumpReceived(self.sender, RECEIVED)  # the marker's connection is gone
        self.assertEqual(self.session.calls[-1][0], "warn")

    def test_sessionDone(self) -> None:
        """SESSION_DONE closes the ending from any state, once."""
        for step in (
            lambda: None,
            lambda: self.ending.waitForIdle(self.sender),
            self.markerSent,
            self.inGrace,
        ):
            core = EndingCore(self.session, self.clock)  # type: ignore[arg-type]
            ending = self.ending = EndingMachine(core)
            self.sender.idleWaiters.clear()
            step()
            self.session.calls.clear()
            ending.sessionDone(self.sender)
            ending.sessionDone(self.sender)
            self.assertEqual(self.session.calls, [("sessionOver", self.sender)])
            self.assertEqual(self.clock.getDelayedCalls(), [])

    def test_stop(self) -> None:
        """A stopped session ends no more dumps (and its grace is cancelled)."""
        self.idle()
        self.ending.awaitHello(1.0)
        self.ending.stop()
        self.assertEqual(self.clock.getDelayedCalls(), [])
        self.ending.linkUp()
        self.ending.waitForIdle(self.sender)
        self.ending.hello()
        self.ending.sessionDone(self.sender)
        self.assertEqual((self.sender.idleWaiters, self.session.calls), ([], []))


class MigrationTests(SynchronousTestCase):
    """The cache's L{Migration} machine: one migration, from its dump to its restore."""

    def setUp(self) -> None:
        self.migration = MigrationMachine(MigrationCore())

    def walk(self, *inputs: str) -> list[tuple[str, object]]:
        """Feed C{inputs}; the state and the answer after each."""
        seen = []
        for name in inputs:
            answer = getattr(self.migration, name)()
            seen.append((self.migration.state(), answer))
        return seen

    def test_dumpThenRestore(self) -> None:
        self.assertEqual(self.migration.state(), "dumping")
        self.assertEqual(
            self.walk("imagesArriving", "delivered", "restoreBegun", "restoreConfirmed"),
            [("dumping", True), ("delivered", True), ("restoring", None), ("restored", True)],
        )

    def test_failedRestoreIsServedAgain(self) -> None:
        self.assertEqual(
            self.walk("delivered", "restoreBegun", "restoreFailed", "restoreBegun", "restoreConfirmed"),
            [
                ("delivered", True),
                ("restoring", None),
                ("failed-restore", None),
                ("restoring", None),
                ("restored", True),
            ],
        )

    def test_chainGoesOn(self) -> None:
        """The next dump of a pre-dump chain reopens a delivered session."""
        self.assertEqual(
            self.walk("delivered", "imagesArriving", "delivered"),
            [("delivered", True), ("dumping", True), ("delivered", True)],
        )

    def test_nothingWrittenOnceRestoring(self) -> None:
        self.walk("delivered", "restoreBegun")
        self.assertEqual(self.walk("imagesArriving", "delivered"), [("restoring", False), ("restoring", False)])

    def test_abortedBeforeOrAfterDelivery(self) -> None:
        self.assertEqual(self.walk("aborted", "aborted"), [("aborted", True), ("aborted", False)])
        other = MigrationMachine(MigrationCore())
        other.delivered()
        self.assertTrue(other.aborted())

    def test_restoringIsNotAborted(self) -> None:
        """An ABORT that comes once the restore began changes nothing (the restore goes on)."""
        self.walk("delivered", "restoreBegun")
        self.assertEqual(self.walk("aborted"), [("restoring", False)])

    def test_finalStatesStay(self) -> None:
        for path in (("aborted",), ("delivered", "restoreBegun", "restoreConfirmed"), ("delivered", "retentionOver")):
            machine = MigrationMachine(MigrationCore())
            for name in path:
                getattr(machine, name)()
            final = machine.state()
            self.assertIn(final, ("aborted", "restored", "dropped"))
            for name in ("imagesArriving", "delivered", "aborted", "restoreConfirmed", "retentionOver", "dropped"):
                self.assertIn(getattr(machine, name)(), (False, None))
                self.assertEqual(machine.state(), final)

    def test_droppedByTheOperator(self) -> None:
        self.assertEqual(
            self.walk("delivered", "dropped", "dropped"),
            [("delivered", True), ("dropped", True), ("dropped", False)],
        )
        self.assertEqual(self.walk("imagesArriving"), [("dropped", False)])

    def test_retentionOnlyForUnrestored(self) -> None:
        self.assertEqual(self.walk("retentionOver"), [("dumping", False)])
        self.assertEqual(self.walk("delivered", "retentionOver"), [("delivered", True), ("dropped", True)])


class CacheSessionTests(SynchronousTestCase):
    """L{CacheSession} keeps its links and its registry in step with its machine."""

    def test_interface(self) -> None:
        self.assertTrue(verifyObject(ISession, CacheSession("7", 12.0)))

    def test_anotherDumpReopens(self) -> None:
        session = CacheSession()
        link: Any = object()
        self.assertTrue(session.imagesArriving(link))
        self.assertEqual((session.state, session.links), ("dumping", {link}))
        self.assertTrue(session.deliver())
        self.assertTrue(session.registry.closed)
        self.assertTrue(session.restorable)
        self.assertTrue(session.imagesArriving(link))
        self.assertFalse(session.registry.closed)
        self.assertEqual(session.state, "dumping")

    def test_abortReleasesImages(self) -> None:
        session = CacheSession()
        self.assertTrue(session.abort())
        self.assertTrue(session.final)
        self.assertTrue(session.registry.closed)
        self.assertFalse(session.abort())

    def test_noImagesOnceRestoring(self) -> None:
        session = CacheSession()
        link: Any = object()
        session.deliver()
        session.beginRestore()
        self.assertFalse(session.imagesArriving(link))
        self.assertEqual(session.links, set())


class FakeEndpoint:
    """A cache that is never reached (the test connects the link itself)."""

    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


class ProxySessionTests(SynchronousTestCase):
    """L{ProxySession} feeds its machines from the registry and the link."""

    def setUp(self) -> None:
        self.reactor = MemoryReactorClock()
        self.session = ProxySession(self.reactor, FakeEndpoint(), None)  # type: ignore[arg-type]
        self.delivered: list[SessionSummary] = []
        self.session.onDelivered = self.delivered.append
        self.session.start()
        self.addCleanup(lambda: self.session.stop() and None)
        self.transport = StringTransport()
        self.sender = RemoteSender(self.session, clock=self.reactor)
        self.sender.makeConnection(self.transport)

    def dump(self, name: str, data: bytes) -> None:
        """criu writes one image and finishes; the link forwards it."""
        self.session.registry.publish(("snap", name), storedImage(MemoryStore(), data))
        self.session.registry.close()
        self.assertEqual(self.session.state, "forwarding")
        driveProducer(self.transport)

    def status(self, kind: wire.LinkStatusKind, **kw: Any) -> None:
        self.sender.dataReceived(wire.LinkStatus(kind, **kw).toBytes())

    def test_interfaces(self) -> None:
        self.assertTrue(verifyObject(ISession, self.session))
        self.assertTrue(verifyObject(ILinkSource, self.session))

    def test_extendedCache(self) -> None:
        """HELLO, a dump, END_OF_DUMP, DUMP_RECEIVED: delivered; SESSION_DONE: complete."""
        self.status(wire.LinkStatusKind.HELLO, version=2)
        self.assertEqual(self.session.state, "dumping")
        self.dump("a.img", b"abc")
        endOfDump = wire.RemoteHeader(
            "", "", 0, 0, None, wire.LINK_EXTENSION_VERSION, session=self.session.sessionToken
        )
        self.assertTrue(self.transport.value().endswith(endOfDump.toBytes()))
        self.assertEqual(self.session.state, "forwarding")
        self.status(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=3)
        self.assertEqual(self.session.state, "delivered")
        self.assertEqual([s.images for s in self.delivered], [1])
        self.session.beginDump()
        self.assertEqual(self.session.state, "dumping")
        self.status(wire.LinkStatusKind.SESSION_DONE)
        self.assertEqual(self.session.state, "complete")
        self.assertTrue(self.session.over)
        self.successResultOf(self.session.ended)

    def test_wrongCountDropsTheLink(self) -> None:
        self.status(wire.LinkStatusKind.HELLO, version=2)
        self.dump("a.img", b"abc")
        self.status(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=2)
        self.assertTrue(self.transport.disconnected)
        self.assertEqual((self.session.state, self.delivered), ("forwarding", []))

    def test_cCache(self) -> None:
        """No HELLO within the grace: EOF ends the dump, and the chain with it."""
        self.dump("a.img", b"abc")
        self.assertEqual(self.session.state, "forwarding")
        self.reactor.advance(HELLO_GRACE)
        self.assertEqual(self.session.state, "complete")
        self.assertEqual([s.images for s in self.delivered], [1])
        self.successResultOf(self.session.ended)
        self.assertFalse(self.transport.value().endswith(wire.END_OF_DUMP.toBytes()))

    def test_graceCountsFromTheFirstHeader(self) -> None:
        """
        A link up long before a dump that is over at once: the cache answers
        the first header with HELLO, so the grace starts then, not at the
        connect (a twisted-criu cache was once taken for a C cache).
        """
        self.reactor.advance(HELLO_GRACE * 5)  # linked, idle
        self.dump("a.img", b"abc")
        self.assertEqual(self.session.state, "forwarding")
        self.reactor.advance(HELLO_GRACE / 2)
        self.assertEqual(self.session.state, "forwarding")  # still waiting for HELLO
        self.status(wire.LinkStatusKind.HELLO, version=3)
        self.assertTrue(self.transport.value().endswith(
            wire.RemoteHeader("", "", 0, 0, None, wire.LINK_EXTENSION_VERSION, session=self.session.sessionToken).toBytes()
        ))
        self.status(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=3)
        self.assertEqual(self.session.state, "delivered")

    def test_staleStatusIgnored(self) -> None:
        """Statuses from a connection that is no longer the link change nothing."""
        old = self.sender
        self.sender = RemoteSender(self.session, clock=self.reactor)
        self.sender.makeConnection(StringTransport())
        old.dataReceived(wire.LinkStatus(wire.LinkStatusKind.SESSION_DONE).toBytes())
        self.assertEqual(self.session.state, "dumping")
        old.connectionLost(Failure(ConnectionDone()))

    def test_dropOnlyDelivered(self) -> None:
        self.assertRaises(NoTransition, self.session.drop)
        self.status(wire.LinkStatusKind.HELLO, version=2)
        self.dump("a.img", b"abc")
        self.status(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=3)
        self.session.drop()
        self.assertEqual(self.session.state, "complete")
