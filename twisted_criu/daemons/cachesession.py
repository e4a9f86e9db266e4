# -*- test-case-name: tests.test_sessions,tests.test_daemons -*-
"""
The cache's session: one migration (a dump, a pre-dump chain, or a push)
as the cache sees it, driven by an explicit state machine
(L{Migration})::

    dumping --delivered--> delivered --restoreBegun--> restoring --restoreConfirmed--> restored
       ^                       |                         |    ^
       +----imagesArriving-----+        restoreFailed --+    +--restoreBegun-- failed-restore
    dumping|delivered --aborted--> aborted      (a proxy's ABORT, or its link gone for good)
    delivered|restoring|failed-restore --retentionOver--> dropped
    (any but final) --dropped--> dropped        (the operator; the cache refuses busy ones)

A session is I{restorable} in C{delivered}, C{restoring} and
C{failed-restore}: only then are its images served, and only to the
restore that picked it.  C{restored}, C{aborted} and C{dropped} are final:
nothing of the session is ever served or written again.

The machine's outputs only count: they call nothing outside it, so its
queries may be asked from anywhere.
"""

from __future__ import annotations

from typing import Protocol

from automat import TypeMachine, TypeMachineBuilder
from twisted.internet.interfaces import IDelayedCall
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.interfaces import IReceivingLink, ISession, IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.registry import SnapshotRegistry

#: The session's states, as operators see them (C{twisted-criu ls}).
DUMPING = "dumping"
DELIVERED = "delivered"
RESTORING = "restoring"
FAILED_RESTORE = "failed-restore"
RESTORED = "restored"
ABORTED = "aborted"
DROPPED = "dropped"

#: States whose images a restore may be served.
RESTORABLE = (DELIVERED, RESTORING, FAILED_RESTORE)
#: States nothing leaves.
FINAL = (RESTORED, ABORTED, DROPPED)


class Migration(Protocol):
    """The inputs of one migration on the cache."""

    def state(self) -> str:
        """Where the migration stands, for operators."""

    def imagesArriving(self) -> bool:
        """A proxy sends images for it: may it take them?"""

    def delivered(self) -> bool:
        """Its dump ended on the link, or was confirmed (SYNC): newly delivered?"""

    def aborted(self) -> bool:
        """Its dump failed (ABORT, or its proxy gone before delivery): newly aborted?"""

    def restoreBegun(self) -> None:
        """A restore picked it."""

    def restoreFailed(self) -> None:
        """The restore that picked it ended without confirmation."""

    def restoreConfirmed(self) -> bool:
        """The restore succeeded: newly restored?"""

    def retentionOver(self) -> bool:
        """Nobody restored it within the retention time: newly dropped?"""

    def dropped(self) -> bool:
        """The operator dropped it: newly dropped?"""


class MigrationCore:
    """The machine's core: it keeps nothing but its state."""


def _buildMigration() -> TypeMachine[Migration, MigrationCore]:
    builder = TypeMachineBuilder(Migration, MigrationCore)
    states = {
        name: builder.state(name)
        for name in (DUMPING, DELIVERED, RESTORING, FAILED_RESTORE, RESTORED, ABORTED, DROPPED)
    }
    dumping, delivered = states[DUMPING], states[DELIVERED]
    restoring, failed = states[RESTORING], states[FAILED_RESTORE]
    restored, aborted, dropped = states[RESTORED], states[ABORTED], states[DROPPED]

    for name, each in states.items():
        each.upon(Migration.state).loop().returns(name)

    dumping.upon(Migration.imagesArriving).loop().returns(True)
    delivered.upon(Migration.imagesArriving).to(dumping).returns(True)  # a chain goes on
    for each in (restoring, failed, restored, aborted, dropped):
        each.upon(Migration.imagesArriving).loop().returns(False)

    dumping.upon(Migration.delivered).to(delivered).returns(True)
    for each in (delivered, restoring, failed, restored, aborted, dropped):
        each.upon(Migration.delivered).loop().returns(False)

    dumping.upon(Migration.aborted).to(aborted).returns(True)
    delivered.upon(Migration.aborted).to(aborted).returns(True)
    failed.upon(Migration.aborted).to(aborted).returns(True)
    for each in (restoring, restored, aborted, dropped):
        each.upon(Migration.aborted).loop().returns(False)

    delivered.upon(Migration.restoreBegun).to(restoring).returns(None)
    failed.upon(Migration.restoreBegun).to(restoring).returns(None)
    restoring.upon(Migration.restoreBegun).loop().returns(None)

    restoring.upon(Migration.restoreFailed).to(failed).returns(None)
    for each in (dumping, delivered, failed, restored, aborted, dropped):
        each.upon(Migration.restoreFailed).loop().returns(None)

    restoring.upon(Migration.restoreConfirmed).to(restored).returns(True)
    failed.upon(Migration.restoreConfirmed).to(restored).returns(True)
    for each in (dumping, delivered, restored, aborted, dropped):
        each.upon(Migration.restoreConfirmed).loop().returns(False)

    for each in (delivered, restoring, failed):
        each.upon(Migration.retentionOver).to(dropped).returns(True)
    for each in (dumping, restored, aborted, dropped):
        each.upon(Migration.retentionOver).loop().returns(False)

    for each in (dumping, delivered, restoring, failed):
        each.upon(Migration.dropped).to(dropped).returns(True)
    for each in (restored, aborted, dropped):
        each.upon(Migration.dropped).loop().returns(False)
    return builder.build()


MigrationMachine = _buildMigration()


@implementer(ISession)
class CacheSession:
    """
    One migration on the cache: its images and the links sending them.

    @ivar token: the proxy's session token (link version 3), or a name of
        the link for a proxy that sends none (CRIU's C proxy: one link, one
        dump).
    @ivar links: the links that sent images of this session and are still
        connected.
    @ivar hooked: the restore that picked it announced itself with
        C{twisted-criu-hook} (pre-restore), so it ends only when confirmed.
    """

    def __init__(self, sessionId: str = "1", started: float = 0.0, token: str = "") -> None:
        self.id = sessionId
        self.token = token
        self.started = started
        self.registry = SnapshotRegistry(waitForMissing=True)
        self.registry.onPublish(self._published)
        self.links: set[IReceivingLink] = set()
        self.seed = False
        self.hooked = False
        #: Its dump was confirmed to criu's post-dump hook: its restore is
        #: over only when the hook confirms it too (post-resume).
        self.dumpHooked = False
        #: The link went away before delivery: when to give the proxy up.
        self.giveUp: IDelayedCall | None = None
        #: When an unrestored delivered session is dropped (C{--retain}).
        self.retention: IDelayedCall | None = None
        self._migration = MigrationMachine(MigrationCore())

    @property
    def state(self) -> str:
        """For operators: where the migration stands."""
        return self._migration.state()

    @property
    def restorable(self) -> bool:
        return self.state in RESTORABLE

    @property
    def final(self) -> bool:
        return self.state in FINAL

    def imagesArriving(self, receiver: IReceivingLink) -> bool:
        """C{receiver} sends images: True if the session takes them."""
        reopen = self.state == DELIVERED
        if not self._migration.imagesArriving():
            return False
        self.links.add(receiver)
        self.cancel("giveUp")
        self.cancel("retention")
        if reopen:
            self.registry.reopen()
        return True

    def deliver(self) -> bool:
        """Every image has arrived: newly delivered?"""
        if not self._migration.delivered():
            return False
        self.registry.close()
        return True

    def abort(self) -> bool:
        """The dump failed: newly aborted? (Its images are then released.)"""
        return self._endIf(self._migration.aborted())

    def beginRestore(self) -> None:
        self._migration.restoreBegun()

    def restoreFailed(self) -> None:
        self._migration.restoreFailed()

    def confirmRestore(self) -> bool:
        """The restore succeeded: newly restored?"""
        if not self._migration.restoreConfirmed():
            return False
        self.cancel("giveUp")
        self.cancel("retention")
        return True

    def expire(self) -> bool:
        """The retention time is over: newly dropped? (Its images are then released.)"""
        return self._endIf(self._migration.retentionOver())

    def drop(self) -> bool:
        """The operator drops it: newly dropped? (Its images are then released.)"""
        return self._endIf(self._migration.dropped())

    def cancel(self, which: str) -> None:
        """Cancel the C{giveUp} or C{retention} timer, if set."""
        call: IDelayedCall | None = getattr(self, which)
        setattr(self, which, None)
        if call is not None and call.active():
            call.cancel()

    def _endIf(self, ended: bool) -> bool:
        """The machine reached a final state if C{ended}: then stop the timers, release the images."""
        if ended:
            self.cancel("giveUp")
            self.cancel("retention")
            self.registry.release()
        return ended

    def _published(self, key: ImageKey, image: IStoredImage) -> None:
        if key[0] == wire.SEED_NULL_SNAPSHOT:
            self.seed = True
