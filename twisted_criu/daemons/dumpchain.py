# -*- test-case-name: tests.test_sessions -*-
"""
The proxy's two state machines: a chain of dumps, and the ending of a
finished dump on the link.

L{DumpChain} is the chain, as an operator sees it::

    dumping --dumpFinished--> forwarding --dumpDelivered--> delivered
       ^                          |                             |
       +--------dumpBegun---------+----------dumpBegun----------+
    delivered --dumpFinished--> forwarding  (two completions of one dump)
    (any) --chainOver--> complete;  delivered --dropped--> complete
    (any but complete) --aborted--> aborted  (criu resumed the process: never restored)

L{DumpEnding} is how a finished dump is ended on the current connection::

    not ending --waitForIdle--> waiting for the link to go idle
        --endWithMarker--> awaiting DUMP_RECEIVED --dumpReceived--> not ending
        --awaitHello--> HELLO grace --hello/graceOver--> not ending
        --endWithEOF--> closed  (a C cache: EOF ends the chain)
    (any) --sessionDone/stop--> closed;  (any but closed) --linkUp--> not ending

Inputs not shown are ignored where they come too late (a loop that does
nothing) and refused (C{automat.NoTransition}) where they cannot come.

The chain's outputs only count: they call nothing outside the chain, so
its queries (L{DumpChain.state}) may be asked from anywhere.  The ending's
inputs all return L{None}: an input arriving while one of its outputs runs
(say, C{whenIdle} firing at once) is run right after it, as Automat does
for such inputs.  (A transition out
of a state with data always passes the data to its output: Automat honours
C{nodata} only on loops of such a state.)
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall, IReactorTime
from twisted.logger import Logger

from twisted_criu import wire
from twisted_criu.interfaces import ISendingLink

#: The chain's states, as operators see them (C{twisted-criu ls}).
DUMPING = "dumping"
FORWARDING = "forwarding"
DELIVERED = "delivered"
COMPLETE = "complete"
ABORTED = "aborted"


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

    def aborted(self) -> None:
        """The dump failed and criu resumed the process: the chain must never be restored."""


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
    aborted = builder.state(ABORTED)

    for each in (dumping, forwarding, delivered, complete, aborted):
        each.upon(DumpChain.state).loop().returns(each.name)
    for each in (dumping, forwarding, delivered):
        each.upon(DumpChain.aborted).to(aborted).returns(None)
    for each in (complete, aborted):
        each.upon(DumpChain.aborted).loop().returns(None)
    # Nothing an aborted chain hears changes it.
    aborted.upon(DumpChain.dumpFinished).loop().returns(None)
    aborted.upon(DumpChain.dumpBegun).loop().returns(None)
    aborted.upon(DumpChain.dumpDelivered).loop().returns(False)
    aborted.upon(DumpChain.chainOver).loop().returns(None)
    aborted.upon(DumpChain.dropped).loop().returns(None)

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

    def waitForIdle(self, sender: ISendingLink) -> None:
        """The link owes the cache an end of dump: wait until it is idle."""

    def notYet(self) -> None:
        """The link went idle, but the dump cannot end now: try again later."""

    def endWithMarker(self, sender: ISendingLink) -> None:
        """The cache said HELLO: send the end-of-dump marker."""

    def awaitHello(self, delay: float) -> None:
        """No HELLO yet: give a new connection C{delay} seconds to say it."""

    def hello(self) -> None:
        """The cache said HELLO."""

    def graceOver(self) -> None:
        """The HELLO grace ran out."""

    def dumpReceived(self, sender: ISendingLink, status: wire.LinkStatus) -> None:
        """The cache confirmed an end-of-dump marker (DUMP_RECEIVED)."""

    def endWithEOF(self, sender: ISendingLink) -> None:
        """A C cache: end the dump, and the chain, by closing the link."""

    def sessionDone(self, sender: ISendingLink) -> None:
        """The cache says the restore finished (SESSION_DONE)."""

    def stop(self) -> None:
        """The session stops: no more dumps end on this link."""


@dataclass
class Receipt:
    """What the cache must confirm after an end-of-dump marker."""

    images: int
    size: int


class EndingSession(Protocol):
    """What ending a dump asks of the proxy's session."""

    log: Logger

    def maybeEndDump(self) -> None:
        """If the link owes the cache an end of dump, start ending it."""

    def linkIdle(self, sender: ISendingLink) -> None:
        """C{sender} handed everything over: decide how the dump ends."""

    def dumpConfirmed(
        self, sender: ISendingLink, status: wire.LinkStatus, receipt: Receipt
    ) -> None:
        """The cache answered the end-of-dump marker described by C{receipt}."""

    def endWithEOF(self, sender: ISendingLink) -> None:
        """A C cache: close the link, which ends the chain."""

    def sessionOver(self, sender: ISendingLink) -> None:
        """The cache restored: the chain is over."""


@dataclass
class EndingCore:
    """What the ending's outputs act on: the session, and a clock for the grace."""

    session: EndingSession
    clock: IReactorTime


def _sendMarker(ending: DumpEnding, core: EndingCore, sender: ISendingLink) -> Receipt:
    receipt = Receipt(sender.imagesSinceMarker, sender.bytesSinceMarker)
    sender.sendEndOfDump()
    return receipt


def _startGrace(ending: DumpEnding, core: EndingCore, delay: float) -> IDelayedCall:
    call: IDelayedCall = core.clock.callLater(delay, ending.graceOver)
    return call


def _cancelGrace(ending: DumpEnding, core: EndingCore, call: IDelayedCall) -> None:
    if call.active():
        call.cancel()


def _buildEnding() -> TypeMachine[DumpEnding, EndingCore]:
    builder = TypeMachineBuilder(DumpEnding, EndingCore)
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
    def watchIdle(ending: DumpEnding, core: EndingCore, sender: ISendingLink) -> None:
        sender.whenIdle().addCallback(lambda _: core.session.linkIdle(sender))

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
    def closeLink(ending: DumpEnding, core: EndingCore, sender: ISendingLink) -> None:
        core.session.endWithEOF(sender)

    @helloGrace.upon(DumpEnding.hello).to(notEnding)
    def helloInTime(ending: DumpEnding, core: EndingCore, call: IDelayedCall) -> None:
        call.cancel()
        core.session.maybeEndDump()

    for each in plain:
        each.upon(DumpEnding.hello).loop().returns(None)
    awaitingReceipt.upon(DumpEnding.hello, nodata=True).loop().returns(None)

    @helloGrace.upon(DumpEnding.graceOver).to(notEnding)
    def graceOver(ending: DumpEnding, core: EndingCore, call: IDelayedCall) -> None:
        core.session.maybeEndDump()

    @awaitingReceipt.upon(DumpEnding.dumpReceived).to(notEnding)
    def confirmed(
        ending: DumpEnding,
        core: EndingCore,
        receipt: Receipt,
        sender: ISendingLink,
        status: wire.LinkStatus,
    ) -> None:
        core.session.dumpConfirmed(sender, status, receipt)

    @notEnding.upon(DumpEnding.dumpReceived).loop()
    @awaitingIdle.upon(DumpEnding.dumpReceived).loop()
    @closed.upon(DumpEnding.dumpReceived).loop()
    def unexpected(
        ending: DumpEnding, core: EndingCore, sender: ISendingLink, status: wire.LinkStatus
    ) -> None:
        core.session.log.warn("the cache confirmed a dump that was not ended; ignored")

    helloGrace.upon(DumpEnding.dumpReceived, nodata=True).loop()(unexpected)

    @notEnding.upon(DumpEnding.sessionDone).to(closed)
    @awaitingIdle.upon(DumpEnding.sessionDone).to(closed)
    def restored(ending: DumpEnding, core: EndingCore, sender: ISendingLink) -> None:
        core.session.sessionOver(sender)

    @awaitingReceipt.upon(DumpEnding.sessionDone).to(closed)
    def restoredUnconfirmed(
        ending: DumpEnding, core: EndingCore, receipt: Receipt, sender: ISendingLink
    ) -> None:
        core.session.sessionOver(sender)

    @helloGrace.upon(DumpEnding.sessionDone).to(closed)
    def restoredInGrace(
        ending: DumpEnding, core: EndingCore, call: IDelayedCall, sender: ISendingLink
    ) -> None:
        call.cancel()
        core.session.sessionOver(sender)

    closed.upon(DumpEnding.sessionDone).loop().returns(None)

    for each in plain:
        each.upon(DumpEnding.stop).to(closed).returns(None)
    awaitingReceipt.upon(DumpEnding.stop).to(closed).returns(None)
    helloGrace.upon(DumpEnding.stop).to(closed)(_cancelGrace)
    return builder.build()


EndingMachine = _buildEnding()
