# -*- test-case-name: tests.test_sessions,tests.test_daemons -*-
"""
The cache's session: one restore, the images received for it, and the two
ends that must both finish before it is over (the proxy's sending and
criu's restore), driven by an explicit state machine (L{Restore})::

    idle --sending--> receiving --allQuiet--> waiting for the restore
      ^                  |   ^                    |
      +----linkLost------+   +------sending-------+   (another dump)
    idle --proxyGone--> waiting for the restore --restoreFinished--> complete

and the same again once criu finished the restore before the proxy
finished sending (C{restored idle}, C{restored receiving}), where the
proxy's end (C{allQuiet}, C{proxyGone}) completes the session.

The machine's outputs only count: they call nothing outside it, so its
queries (L{Restore.state}) may be asked from anywhere.
"""

from __future__ import annotations

from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.interfaces import IReceivingLink, ISession, IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.registry import SnapshotRegistry

#: The session's states, as operators see them (C{twisted-criu ls}).
IDLE = "idle"
RECEIVING = "receiving"
WAITING_FOR_RESTORE = "waiting for the restore"
COMPLETE = "complete"


class Restore(Protocol):
    """The inputs of a restore session."""

    def state(self) -> str:
        """What the session is waiting for, for operators."""

    def remoteDone(self) -> bool:
        """Has every proxy finished sending (or given up)?"""

    def sending(self) -> None:
        """A proxy's link sends a dump (or connected, and will)."""

    def allQuiet(self) -> None:
        """The last link sending ended its dump (a marker, or a clean close)."""

    def linkLost(self) -> None:
        """The last link sending was lost: it may come back."""

    def proxyGone(self) -> None:
        """The lost proxy did not come back in time."""

    def restoreFinished(self) -> None:
        """criu finished the restore."""


class RestoreCore:
    """The restore machine's core: it keeps nothing but its state."""


def _buildRestore() -> TypeMachine[Restore, RestoreCore]:
    builder = TypeMachineBuilder(Restore, RestoreCore)
    idle = builder.state("idle")
    receiving = builder.state("receiving")
    waiting = builder.state("waiting for the restore")
    restoredIdle = builder.state("restored, idle")
    restoredReceiving = builder.state("restored, receiving")
    complete = builder.state("complete")

    for each, label, remoteDone in (
        (idle, IDLE, False),
        (receiving, RECEIVING, False),
        (waiting, WAITING_FOR_RESTORE, True),
        (restoredIdle, IDLE, False),
        (restoredReceiving, RECEIVING, False),
        (complete, COMPLETE, True),
    ):
        each.upon(Restore.state).loop().returns(label)
        each.upon(Restore.remoteDone).loop().returns(remoteDone)

    idle.upon(Restore.sending).to(receiving).returns(None)
    receiving.upon(Restore.sending).loop().returns(None)
    waiting.upon(Restore.sending).to(receiving).returns(None)  # another dump
    restoredIdle.upon(Restore.sending).to(restoredReceiving).returns(None)
    restoredReceiving.upon(Restore.sending).loop().returns(None)

    receiving.upon(Restore.allQuiet).to(waiting).returns(None)
    restoredReceiving.upon(Restore.allQuiet).to(complete).returns(None)

    receiving.upon(Restore.linkLost).to(idle).returns(None)
    restoredReceiving.upon(Restore.linkLost).to(restoredIdle).returns(None)

    idle.upon(Restore.proxyGone).to(waiting).returns(None)
    restoredIdle.upon(Restore.proxyGone).to(complete).returns(None)

    idle.upon(Restore.restoreFinished).to(restoredIdle).returns(None)
    receiving.upon(Restore.restoreFinished).to(restoredReceiving).returns(None)
    waiting.upon(Restore.restoreFinished).to(complete).returns(None)
    restoredIdle.upon(Restore.restoreFinished).loop().returns(None)
    restoredReceiving.upon(Restore.restoreFinished).loop().returns(None)
    return builder.build()


RestoreMachine = _buildRestore()


@implementer(ISession)
class CacheSession:
    """
    One restore: the images received for it and the links sending them.

    @ivar links: links in the middle of a dump (or connected and not yet
        sending).
    @ivar idleLinks: links whose dump ended with a marker, kept open for
        the next dump.
    """

    def __init__(self, sessionId: str = "1", started: float = 0.0) -> None:
        self.id = sessionId
        self.started = started
        self.registry = SnapshotRegistry(waitForMissing=True)
        self.registry.onPublish(self._published)
        self.links: set[IReceivingLink] = set()
        self.idleLinks: set[IReceivingLink] = set()
        self.seed = False
        self._restore = RestoreMachine(RestoreCore())

    @property
    def state(self) -> str:
        """For operators: what the session is waiting for."""
        return self._restore.state()

    @property
    def complete(self) -> bool:
        return self.state == COMPLETE

    @property
    def remoteDone(self) -> bool:
        """Every proxy finished sending (or gave up)."""
        return self._restore.remoteDone()

    def linkSending(self, receiver: IReceivingLink) -> None:
        """C{receiver} sends a dump: another one, if the proxy was done."""
        reopen = self.remoteDone
        self.links.add(receiver)
        self._restore.sending()
        if reopen:
            self.registry.reopen()

    def linkStopped(self, receiver: IReceivingLink) -> bool:
        """C{receiver} stopped sending: is it the last that was?"""
        self.links.discard(receiver)
        return not self.links

    def linkLost(self) -> None:
        """The last link sending was lost (it may come back)."""
        self._restore.linkLost()

    def remoteQuiet(self) -> None:
        """The last link sending ended its dump: no more images come."""
        self._restore.allQuiet()
        self.registry.close()

    def proxyGone(self) -> None:
        """The lost proxy did not come back: no more images come."""
        self._restore.proxyGone()
        self.registry.close()

    def restoreFinished(self) -> None:
        self._restore.restoreFinished()

    def _published(self, key: ImageKey, image: IStoredImage) -> None:
        if key[0] == wire.SEED_NULL_SNAPSHOT:
            self.seed = True
