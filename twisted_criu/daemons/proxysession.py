# -*- test-case-name: tests.test_sessions,tests.test_chains -*-
"""
The proxy's session: a chain of dumps and the one link forwarding them,
each driven by an explicit state machine.

L{DumpChain} is the chain, as an operator sees it::

    dumping --dumpFinished--> forwarding --dumpDelivered--> delivered
       ^                          |                             |
       +--------dumpBegun---------+----------dumpBegun----------+
    (any) --chainOver--> complete;  delivered --dropped--> complete

L{DumpEnding} is how a finished dump is ended on the current connection::

    not ending --waitForIdle--> waiting for the link to go idle
        --endWithMarker--> awaiting DUMP_RECEIVED --dumpReceived--> not ending
        --awaitHello--> HELLO grace --hello/graceOver--> not ending
        --endWithEOF--> closed  (a C cache: EOF ends the chain)
    (any) --sessionDone/stop--> closed;  (any but closed) --linkUp--> not ending

(A transition out of a state with data always passes the data to its
output: Automat honours C{nodata} only on loops of such a state.)

The chain's outputs only count: they call nothing outside the chain, so
its queries (L{DumpChain.state}) may be asked from anywhere.  The ending's
inputs all return L{None}: an input arriving while one of its outputs runs
is run right after it (Automat's rule), never refused.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IDelayedCall, IStreamClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.flow.send import ImageTransfer, sha256Of
from twisted_criu.interfaces import (
    IGrowableWriter,
    IGrowingImage,
    IImageWriter,
    ILinkSource,
    ISession,
    IStoredImage,
)
from twisted_criu.keys import ImageKey
from twisted_criu.link.sender import RemoteSender, RemoteSenderFactory
from twisted_criu.progress import Activity
from twisted_criu.registry import SessionSummary, SnapshotRegistry

RetryPolicy = Callable[[int], float]

#: How long a new link waits for the cache's HELLO before treating the
#: cache as one of CRIU's C caches (which never send anything).
HELLO_GRACE = 2.0

#: The chain's states, as operators see them (C{twisted-criu ls}).
DUMPING = "dumping"
FORWARDING = "forwarding"
DELIVERED = "delivered"
COMPLETE = "complete"


# -- the chain of dumps ---------------------------------------------------------


class DumpChain(Protocol):
    """The inputs of a chain of dumps."""

    def state(self) -> str:
        """What the chain is doing, for operators."""

    def dumpFinished(self) -> None:
        """criu finished a dump, and its last write is stored."""

    def dumpBegun(self) -> None:
        """Another dump joins the chain (criu appends to C{parent})."""

    def dumpDelivered(self) -> bool:
        """
        The cache holds every finished dump.  True if that delivers a dump
        not delivered before (to be announced).
        """

    def chainOver(self) -> None:
        """The cache restored (SESSION_DONE), or a C cache took its one dump."""

    def dropped(self) -> None:
        """The operator dropped the chain (only once its dumps are delivered)."""


@dataclass
class DumpCount:
    """The chain's counters: dumps finished by criu, and delivered."""

    finished: int = 0
    delivered: int = 0


def _buildChain() -> TypeMachine[DumpChain, DumpCount]:
    builder = TypeMachineBuilder(DumpChain, DumpCount)
    dumping = builder.state(DUMPING)
    forwarding = builder.state(FORWARDING)
    delivered = builder.state(DELIVERED)
    complete = builder.state(COMPLETE)

    for each in (dumping, forwarding, delivered, complete):
        each.upon(DumpChain.state).loop().returns(each.name)

    @dumping.upon(DumpChain.dumpFinished).to(forwarding)
    @forwarding.upon(DumpChain.dumpFinished).loop()
    @delivered.upon(DumpChain.dumpFinished).to(forwarding)
    def finished(chain: DumpChain, count: DumpCount) -> None:
        count.finished += 1

    complete.upon(DumpChain.dumpFinished).loop().returns(None)  # a release closes the registry

    dumping.upon(DumpChain.dumpBegun).loop().returns(None)  # the last write is still stored
    forwarding.upon(DumpChain.dumpBegun).to(dumping).returns(None)
    delivered.upon(DumpChain.dumpBegun).to(dumping).returns(None)

    @dumping.upon(DumpChain.dumpDelivered).loop()  # the dump before the one under way
    @forwarding.upon(DumpChain.dumpDelivered).to(delivered)
    def catchUp(chain: DumpChain, count: DumpCount) -> bool:
        owed = count.delivered < count.finished
        count.delivered = count.finished
        return owed

    delivered.upon(DumpChain.dumpDelivered).loop().returns(False)
    complete.upon(DumpChain.dumpDelivered).loop().returns(False)

    for each in (dumping, forwarding, delivered):
        each.upon(DumpChain.chainOver).to(complete).returns(None)
    complete.upon(DumpChain.chainOver).loop().returns(None)

    delivered.upon(DumpChain.dropped).to(complete).returns(None)
    return builder.build()


ChainMachine = _buildChain()


# -- ending a dump on the link ------------------------------------------------------


class DumpEnding(Protocol):
    """
    The inputs of ending a finished dump on the current connection: an
    end-of-dump marker the cache confirms (twisted-criu's link extension),
    or, for a C cache that never says HELLO, EOF.
    """

    def linkUp(self) -> None:
        """A new connection: whatever the last one was ending starts over."""

    def waitForIdle(self, sender: RemoteSender) -> None:
        """The link owes the cache an end of dump: wait until it is idle."""

    def notYet(self) -> None:
        """The link went idle, but the dump cannot end now: try again later."""

    def endWithMarker(self, sender: RemoteSender) -> None:
        """The cache said HELLO: send the end-of-dump marker."""

    def awaitHello(self, delay: float) -> None:
        """No HELLO yet: give a new connection C{delay} seconds to say it."""

    def hello(self) -> None:
        """The cache said HELLO."""

    def graceOver(self) -> None:
        """The HELLO grace ran out."""

    def dumpReceived(self, sender: RemoteSender, status: wire.LinkStatus) -> None:
        """The cache confirmed an end-of-dump marker (DUMP_RECEIVED)."""

    def endWithEOF(self, sender: RemoteSender) -> None:
        """A C cache: end the dump, and the chain, by closing the link."""

    def sessionDone(self, sender: RemoteSender) -> None:
        """The cache says the restore finished (SESSION_DONE)."""

    def stop(self) -> None:
        """The session stops: no more dumps end on this link."""


@dataclass
class Receipt:
    """What the cache must confirm after an end-of-dump marker."""

    images: int
    size: int


def _sendMarker(ending: DumpEnding, session: ProxySession, sender: RemoteSender) -> Receipt:
    receipt = Receipt(sender.imagesSinceMarker, sender.bytesSinceMarker)
    sender.sendEndOfDump()
    return receipt


def _startGrace(ending: DumpEnding, session: ProxySession, delay: float) -> IDelayedCall:
    call: IDelayedCall = session.clock.callLater(delay, ending.graceOver)
    return call


def _cancelGrace(ending: DumpEnding, session: ProxySession, call: IDelayedCall) -> None:
    if call.active():
        call.cancel()


def _buildEnding() -> TypeMachine[DumpEnding, ProxySession]:
    builder = TypeMachineBuilder(DumpEnding, ProxySession)
    notEnding = builder.state("not ending")
    awaitingIdle = builder.state("waiting for the link to go idle")
    helloGrace = builder.state("HELLO grace", _startGrace)
    awaitingReceipt = builder.state("awaiting DUMP_RECEIVED", _sendMarker)
    closed = builder.state("closed")
    plain = (notEnding, awaitingIdle, closed)

    # A new connection starts over; a stopped session ignores it.
    for each in (notEnding, awaitingIdle):
        each.upon(DumpEnding.linkUp).to(notEnding).returns(None)
    awaitingReceipt.upon(DumpEnding.linkUp).to(notEnding).returns(None)
    helloGrace.upon(DumpEnding.linkUp).to(notEnding)(_cancelGrace)
    closed.upon(DumpEnding.linkUp).loop().returns(None)

    @notEnding.upon(DumpEnding.waitForIdle).to(awaitingIdle)
    def watchIdle(ending: DumpEnding, session: ProxySession, sender: RemoteSender) -> None:
        sender.whenIdle().addCallback(lambda _: session.linkIdle(sender))

    # Only the link's going idle decides how a dump ends; elsewhere the
    # decision comes too late (a new connection, or the session over).
    for each in (awaitingIdle, closed):
        each.upon(DumpEnding.waitForIdle).loop().returns(None)
    awaitingIdle.upon(DumpEnding.notYet).to(notEnding).returns(None)
    awaitingIdle.upon(DumpEnding.endWithMarker).to(awaitingReceipt).returns(None)
    awaitingIdle.upon(DumpEnding.awaitHello).to(helloGrace).returns(None)
    for each in (notEnding, closed):
        each.upon(DumpEnding.notYet).loop().returns(None)
        each.upon(DumpEnding.endWithMarker).loop().returns(None)
        each.upon(DumpEnding.awaitHello).loop().returns(None)
        each.upon(DumpEnding.endWithEOF).loop().returns(None)
    for dataState in (helloGrace, awaitingReceipt):
        dataState.upon(DumpEnding.waitForIdle, nodata=True).loop().returns(None)
        dataState.upon(DumpEnding.notYet, nodata=True).loop().returns(None)
        dataState.upon(DumpEnding.endWithMarker, nodata=True).loop().returns(None)
        dataState.upon(DumpEnding.awaitHello, nodata=True).loop().returns(None)
        dataState.upon(DumpEnding.endWithEOF, nodata=True).loop().returns(None)

    @awaitingIdle.upon(DumpEnding.endWithEOF).to(closed)
    def closeLink(ending: DumpEnding, session: ProxySession, sender: RemoteSender) -> None:
        session.endWithEOF(sender)

    @helloGrace.upon(DumpEnding.hello).to(notEnding)
    def helloInTime(ending: DumpEnding, session: ProxySession, call: IDelayedCall) -> None:
        call.cancel()
        session.maybeEndDump()

    for each in plain:
        each.upon(DumpEnding.hello).loop().returns(None)
    awaitingReceipt.upon(DumpEnding.hello, nodata=True).loop().returns(None)

    @helloGrace.upon(DumpEnding.graceOver).to(notEnding)
    def graceOver(ending: DumpEnding, session: ProxySession, call: IDelayedCall) -> None:
        session.maybeEndDump()

    @awaitingReceipt.upon(DumpEnding.dumpReceived).to(notEnding)
    def confirmed(
        ending: DumpEnding,
        session: ProxySession,
        receipt: Receipt,
        sender: RemoteSender,
        status: wire.LinkStatus,
    ) -> None:
        session.dumpConfirmed(sender, status, receipt)

    @notEnding.upon(DumpEnding.dumpReceived).loop()
    @awaitingIdle.upon(DumpEnding.dumpReceived).loop()
    @closed.upon(DumpEnding.dumpReceived).loop()
    def unexpected(
        ending: DumpEnding, session: ProxySession, sender: RemoteSender, status: wire.LinkStatus
    ) -> None:
        session.log.warn("the cache confirmed a dump that was not ended; ignored")

    helloGrace.upon(DumpEnding.dumpReceived, nodata=True).loop()(unexpected)

    @notEnding.upon(DumpEnding.sessionDone).to(closed)
    @awaitingIdle.upon(DumpEnding.sessionDone).to(closed)
    def restored(ending: DumpEnding, session: ProxySession, sender: RemoteSender) -> None:
        session.sessionOver(sender)

    @awaitingReceipt.upon(DumpEnding.sessionDone).to(closed)
    def restoredUnconfirmed(
        ending: DumpEnding, session: ProxySession, receipt: Receipt, sender: RemoteSender
    ) -> None:
        session.sessionOver(sender)

    @helloGrace.upon(DumpEnding.sessionDone).to(closed)
    def restoredInGrace(
        ending: DumpEnding, session: ProxySession, call: IDelayedCall, sender: RemoteSender
    ) -> None:
        call.cancel()
        session.sessionOver(sender)

    closed.upon(DumpEnding.sessionDone).loop().returns(None)

    for each in plain:
        each.upon(DumpEnding.stop).to(closed).returns(None)
    awaitingReceipt.upon(DumpEnding.stop).to(closed).returns(None)
    helloGrace.upon(DumpEnding.stop).to(closed)(_cancelGrace)
    return builder.build()


# -- the session ----------------------------------------------------------------


@implementer(ISession, ILinkSource)
class ProxySession:
    """
    A chain of dumps (pre-dumps, then a dump): a registry of their images,
    and one link forwarding them.

    Every connection of the link starts by sending everything the chain
    holds (a restarted cache holds nothing), then follows new publications.
    When a dump has finished locally and everything is handed over, the
    dump is ended (L{DumpEnding}): with an end-of-dump marker, confirmed by
    the cache, if the cache speaks twisted-criu's link extension, else (a C
    cache) by closing the link.  The chain (L{DumpChain}) lasts until the
    cache reports that the restore finished (SESSION_DONE); a C cache serves
    one dump, so there the chain ends with its first dump.

    @ivar onDelivered: called with a summary each time a dump has been
        delivered.
    @ivar ended: fires when the chain is over.
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        cache: IStreamClientEndpoint,
        retryPolicy: RetryPolicy | None,
        linkTimeout: float = 60.0,
        checksum: bool = False,
        sessionId: str = "1",
        activity: Activity | None = None,
        cutThrough: bool = True,
    ) -> None:
        self.id = sessionId
        self.cutThrough = cutThrough and not checksum
        self.started = reactor.seconds()
        self.clock = reactor
        self.registry = SnapshotRegistry(waitForMissing=False)
        self.checksum = checksum
        self._digests: dict[ImageKey, tuple[IStoredImage, bytes]] = {}
        self._hashing = 0
        self.registry.onPublish(self._published)
        self.registry.onWriteStarted(self._writeStarted)
        #: Writes under way that the link may cut through, oldest first.
        self._writes: dict[ImageKey, IGrowableWriter] = {}
        self.seed = False
        self.onDelivered: Callable[[SessionSummary], None] = lambda summary: None
        self.ended: Deferred[None] = Deferred()
        self._count = DumpCount()
        self._chain = ChainMachine(self._count)
        self._ending = EndingMachine(self)
        self._sender: RemoteSender | None = None
        kwargs: dict[str, Any] = {"clock": reactor}
        if retryPolicy is not None:
            kwargs["retryPolicy"] = retryPolicy
        factory = RemoteSenderFactory(
            self, clock=reactor, stallTimeout=linkTimeout, activity=activity
        )
        self._link = ClientService(cache, factory, **kwargs)

    @property
    def state(self) -> str:
        """For operators: what the chain is doing."""
        return self._chain.state()

    @property
    def over(self) -> bool:
        """The chain is over: a new dump starts a new session."""
        return self.state == COMPLETE

    @property
    def dumpsFinished(self) -> int:
        return self._count.finished

    @property
    def dumpsDelivered(self) -> int:
        return self._count.delivered

    def start(self) -> None:
        self._link.startService()
        self.registry.whenComplete().addCallback(self._dumpFinished)

    def beginDump(self) -> None:
        """Another dump joins the chain (criu will append to C{parent})."""
        self.log.info("a new dump continues session {id}", id=self.id)
        self._chain.dumpBegun()
        self.registry.reopen()
        self.registry.whenComplete().addCallback(self._dumpFinished)

    def stop(self) -> Deferred[None]:
        self._ending.stop()
        if self._sender is not None:
            self._sender.expectClose()
        return self._link.stopService()

    def drop(self) -> Deferred[None]:
        """The operator drops the chain, whose dumps are all delivered."""
        self._chain.dropped()
        return self.stop()

    # -- ILinkSource -------------------------------------------------------

    def linkUp(self, sender: RemoteSender) -> None:
        self.log.info("connected to the cache")
        self._sender = sender
        self._ending.linkUp()
        for key in self.registry.publishOrder:
            sender.enqueue(key)
        self.maybeEndDump()

    def imageFor(self, key: ImageKey) -> IStoredImage | None:
        return self.registry.get(key)

    def digestFor(self, key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        if not self.checksum:
            return True, None
        known = self._digests.get(key)
        if known is not None and known[0] is image:
            return True, known[1]
        return False, None

    def nextLive(self) -> tuple[ImageKey, IGrowingImage] | None:
        """The oldest image criu is still writing, for a link that is free."""
        while self._writes:
            key = next(iter(self._writes))
            writer = self._writes.pop(key)
            if writer.writing:
                return key, writer.follow()
        return None

    def statusReceived(self, sender: RemoteSender, status: wire.LinkStatus) -> None:
        if sender is not self._sender:
            return
        kind = status.kind
        if kind is wire.LinkStatusKind.HELLO:
            self.log.info(
                "the cache speaks twisted-criu's link extension (version {version})",
                version=status.version,
            )
            self._ending.hello()
        elif kind is wire.LinkStatusKind.DUMP_RECEIVED:
            self._ending.dumpReceived(sender, status)
        elif kind is wire.LinkStatusKind.SESSION_DONE:
            self._ending.sessionDone(sender)

    # -- images ----------------------------------------------------------------

    def _writeStarted(self, key: ImageKey, writer: IImageWriter) -> None:
        """criu started writing an image: the link may cut it through."""
        if not self.cutThrough or not IGrowableWriter.providedBy(writer):
            return
        self._writes.pop(key, None)
        self._writes[key] = writer
        sender = self._sender
        if sender is not None:
            sender.offerLive()

    def _published(self, key: ImageKey, image: IStoredImage) -> None:
        writer = self._writes.get(key)
        if writer is not None and not writer.writing:
            del self._writes[key]
        sender = self._sender
        if sender is not None and sender.cutThrough(key, image):
            return  # already on its way
        if self.checksum:
            # Hash in a thread (hashlib releases the GIL); forward when known.
            self._hashing += 1
            d = deferToThread(sha256Of, ImageTransfer(image))
            d.addCallback(self._hashed, key, image)
            d.addErrback(lambda f: self.log.failure("hashing {image}", f, image=key))
            d.addBoth(self._doneHashing)
            return
        self._forward(key)

    def _hashed(self, digest: bytes, key: ImageKey, image: IStoredImage) -> None:
        if self.registry.get(key) is not image:
            return  # replaced meanwhile: the new version is being hashed
        self._digests[key] = (image, digest)
        self._forward(key)

    def _doneHashing(self, _: object) -> None:
        self._hashing -= 1
        self.maybeEndDump()

    def _forward(self, key: ImageKey) -> None:
        sender = self._sender
        if sender is not None and not sender.lost:
            sender.enqueue(key)
            self.maybeEndDump()

    def _dumpFinished(self, _: None) -> None:
        self._chain.dumpFinished()
        self.log.info(
            "dump finished: {n} images, {size} bytes",
            n=len(self.registry.keys()),
            size=self.registry.totalBytes,
        )
        self.maybeEndDump()

    # -- ending a dump (called by the ending's machine) --------------------------

    @property
    def _dumpComplete(self) -> bool:
        """Is a finished dump the last of the chain (one that may be ended)?"""
        return self.state in (FORWARDING, DELIVERED)

    def maybeEndDump(self) -> None:
        """If the link owes the cache an end of dump, end it once the link is idle."""
        sender = self._sender
        if not self._dumpComplete or self._hashing:
            return
        if sender is None or sender.lost:
            return
        if self.dumpsDelivered < self.dumpsFinished or sender.imagesSinceMarker > 0:
            self._ending.waitForIdle(sender)

    def linkIdle(self, sender: RemoteSender) -> None:
        """C{sender} handed everything over: how may the dump end?"""
        if sender is not self._sender:
            return  # a new connection started over
        if sender.lost or not self._dumpComplete:
            self._ending.notYet()
        elif not sender.idle:  # an image was replaced meanwhile
            self._ending.notYet()
            self.maybeEndDump()
        elif sender.extended:
            self._ending.endWithMarker(sender)
        elif (waited := self.clock.seconds() - sender.connectedAt) < HELLO_GRACE:
            self._ending.awaitHello(HELLO_GRACE - waited)
        else:
            self._ending.endWithEOF(sender)

    def dumpConfirmed(self, sender: RemoteSender, status: wire.LinkStatus, receipt: Receipt) -> None:
        """The cache answered an end-of-dump marker with C{status}."""
        if (status.images, status.size) != (receipt.images, receipt.size):
            self.log.error(
                "the cache confirms {got} images ({gotBytes} bytes) where {images}"
                " ({bytes} bytes) were sent; dropping the link to send them again",
                got=status.images,
                gotBytes=status.size,
                images=receipt.images,
                bytes=receipt.size,
            )
            sender.transport.abortConnection()
            return
        if self._chain.dumpDelivered():
            self._announce(confirmed=True)

    def endWithEOF(self, sender: RemoteSender) -> None:
        """One of CRIU's C caches: EOF ends the session, and it serves one."""
        self.log.info("the cache did not say HELLO: ending the session with EOF (C cache)")
        sender.expectClose()
        owed = self._chain.dumpDelivered()
        self._chain.chainOver()

        def closed(_: None) -> None:
            if owed:
                self._announce(confirmed=False)
            self._end()

        self._link.stopService().addCallback(closed)

    def sessionOver(self, sender: RemoteSender) -> None:
        """The cache restored: the chain is over."""
        self.log.info("the cache reports that the restore finished: session {id} is over", id=self.id)
        self._chain.chainOver()
        sender.expectClose()
        self._link.stopService().addCallback(lambda _: self._end())

    def _announce(self, confirmed: bool) -> None:
        summary = self.registry.summary()
        self.log.info(
            "session complete: forwarded {images} images, {bytes} bytes",
            images=summary.images,
            bytes=summary.bytes,
            confirmed=confirmed,
        )
        self.onDelivered(summary)

    def _end(self) -> None:
        if not self.ended.called:
            self.ended.callback(None)


EndingMachine = _buildEnding()
