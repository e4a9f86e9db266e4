# -*- test-case-name: tests.test_transactions -*-
"""
Which session a restore reads, and how a restore ends.

The rule, in order:

 1. the session a restore already picked and that is not over (its restore
    was not confirmed: this is a retry), or one whose restore failed;
 2. else the most recently delivered session;
 3. else, if a session's dump is still arriving, the restore waits for
    its delivery (or for the dump to be aborted); a proxy that is linked
    but has sent nothing yet, or a cache that just started, gets a few
    seconds (C{restoreGrace}, L{LINKED_GRACE} by default);
 4. else the restore fails at once: criu gets ENOENT, the log says why.

A restore ends confirmed by criu's C{--remote} finish, by
C{twisted-criu-hook} at C{post-resume}, or (when neither the dump nor the
restore ran the hook) when criu closes its C{--stream} connection with
every file served.  A C{--stream}
restore whose pipes broke, or a hooked one that never confirms, leaves the
session to be served again.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu.daemons.cachesession import DELIVERED, DUMPING, RESTORED, CacheSession
from twisted_criu.errors import HookRefused, ImageNotFound
from twisted_criu.interfaces import IImageStore, IImageWriter, ISnapshotRegistry, IStoredImage
from twisted_criu.keys import ImageKey

if TYPE_CHECKING:
    from twisted_criu.daemons.cache import ImageCacheService

#: Seconds a restore waits for a linked proxy that has sent nothing yet
#: (its dump's first image may be on its way) before it fails.
LINKED_GRACE = 5.0


class RestoreChooser:
    """Picks the session restores read, and ends their restores."""

    log = Logger()

    def __init__(self, cache: ImageCacheService) -> None:
        self._cache = cache
        #: The session the restore under way reads.
        self.current: CacheSession | None = None
        self._waiters: list[Deferred[CacheSession]] = []
        #: C{twisted-criu-hook} announced the next restore (pre-restore).
        self._hookAnnounced = False
        #: criu speaks the 2015 seed's variant.
        self.seed = False
        #: The restore that picked L{current} is still reading it.
        self._reading = False
        #: The session the last restore confirmed, until another restore begins.
        self._lastRestored: str | None = None
        self._graceEnds: float | None = None
        self._graceCall: Any = None

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def serving(self, session: CacheSession) -> bool:
        return self.current is session

    def stop(self) -> None:
        call, self._graceCall = self._graceCall, None
        if call is not None and call.active():
            call.cancel()
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            d.cancel()

    # -- picking -------------------------------------------------------------

    def session(self) -> Deferred[CacheSession]:
        """The session the restore reads (see the module's rule)."""
        current = self.current
        if current is not None and current.restorable:
            return succeed(current)
        sessions = list(self._cache.sessions.values())
        retry = [s for s in sessions if s.restorable and s.state != DELIVERED]
        delivered = [s for s in sessions if s.state == DELIVERED]
        chosen = retry[0] if retry else (delivered[-1] if delivered else None)
        if chosen is not None:
            self._begin(chosen)
            return succeed(chosen)
        arriving = [s for s in sessions if s.state == DUMPING and (s.links or s.giveUp is not None)]
        if arriving or self._inGrace():
            if not self._waiters:
                if arriving:
                    what = f"session {arriving[-1].id}, whose dump is still arriving"
                elif self._cache.proxiesLinked:
                    what = "the linked proxy to send a dump"
                else:
                    what = "a moment for a proxy to come back (the cache just started)"
                self.log.info("a restore waits for {what}", what=what)

            def cancel(d: Deferred[CacheSession]) -> None:
                if d in self._waiters:
                    self._waiters.remove(d)

            d: Deferred[CacheSession] = Deferred(cancel)
            self._waiters.append(d)
            return d
        self.log.error(
            "criu restore asks for images, but no session is delivered: nothing to restore"
            " (twisted-criu ls shows the sessions); criu gets ENOENT"
        )
        return fail(ImageNotFound(("", "")))

    def _inGrace(self) -> bool:
        """
        A proxy is linked but sends nothing yet, or the cache just started
        (a proxy may be coming back to it): is this still the short while in
        which a dump's first image may be on its way?
        """
        clock = self._cache.reactor
        grace = self._cache.restoreGrace
        now = clock.seconds()
        linked = self._cache.proxiesLinked
        justStarted = now - self._cache.startedAt < grace
        if grace <= 0 or not (linked or justStarted):
            return False
        if self._graceEnds is None:
            ends = now + grace if linked else self._cache.startedAt + grace
            self._graceEnds = ends
            self._graceCall = clock.callLater(ends - now, self._graceOver)
        return bool(clock.seconds() < self._graceEnds)

    def _graceOver(self) -> None:
        self._graceCall = None
        self._answerWaiters()
        if not self._waiters:
            self._graceEnds = None

    def _begin(self, session: CacheSession) -> None:
        self.current = session
        self._lastRestored = None
        self._reading = True
        again = session.state != DELIVERED
        session.hooked = self._hookAnnounced
        self._hookAnnounced = False
        session.beginRestore()
        self._cache.retainFor(session)  # an unconfirmed restore is dropped after --retain too
        self.log.info(
            "a restore reads session {id}{again}",
            id=session.id,
            again=" again (its last restore was not confirmed)" if again else "",
        )

    def _answerWaiters(self) -> None:
        waiters, self._waiters = self._waiters, []
        for d in waiters:
            self.session().chainDeferred(d)
        if not self._waiters and self._graceCall is None:
            self._graceEnds = None

    # -- sessions changing ----------------------------------------------------

    def wake(self) -> None:
        """A session was delivered or a link closed: waiting restores are answered again."""
        if self._waiters:
            self._answerWaiters()

    def sessionOver(self, session: CacheSession) -> None:
        if self.current is session:
            self.current = None
            self._reading = False
            self._lastRestored = session.id if session.state == RESTORED else None
        self.wake()

    # -- restores ending --------------------------------------------------------

    def remoteRestoreFinished(self) -> None:
        session = self.current
        if session is None:
            self.log.warn("criu finished a restore that read no session")
            return
        self._cache.restoreConfirmed(session, "criu's finish")

    def streamRestoreEnded(self, complete: bool) -> None:
        session = self.current
        self._reading = False
        if session is None:
            return
        if not complete:
            self.current = None
            session.restoreFailed()
            self.log.error(
                "the restore of session {id} broke off: its images are kept; run criu restore again",
                id=session.id,
            )
        elif session.hooked or session.dumpHooked:
            # A killed criu closes its connection as a finished one does:
            # only the hook can say the restore worked.
            self.log.info(
                "criu read session {id}; waiting for twisted-criu-hook to confirm the restore",
                id=session.id,
            )
        else:
            self._cache.restoreConfirmed(
                session, "criu closed its --stream connection; no hook confirms it"
            )

    def hookedRestoreBegins(self) -> dict[str, Any]:
        """pre-restore: this restore ends only when the hook confirms it."""
        session = self.current
        if session is not None and self._reading:
            # criu --stream connects and reads before it runs pre-restore.
            session.hooked = True
            return {"ok": True, "session": session.id}
        if session is not None:
            self.current = None
            session.restoreFailed()
            self.log.warn(
                "a new restore begins: the last restore of session {id} was never confirmed"
                " (it failed); its images are served again",
                id=session.id,
            )
        self._hookAnnounced = True
        return {"ok": True}

    def hookedRestoreSucceeded(self) -> dict[str, Any]:
        """post-resume: the restored tasks run."""
        session = self.current
        if session is None:
            if self._lastRestored is not None:  # criu's --remote finish came first
                return {"ok": True, "session": self._lastRestored}
            raise HookRefused("the cache has no restore under way to confirm")
        self._cache.restoreConfirmed(session, "confirmed by twisted-criu-hook at post-resume")
        return {"ok": True, "session": session.id}


@implementer(ISnapshotRegistry)
class RestoreReads:
    """What criu's reads on the cache see: the images of the session L{RestoreChooser} picks."""

    #: (Reads only: nothing is published here.)
    released = False

    def __init__(self, chooser: RestoreChooser) -> None:
        self._chooser = chooser

    def whenAvailable(self, key: ImageKey) -> Deferred[IStoredImage]:
        inner: list[Deferred[Any]] = []

        def cancel(d: Deferred[IStoredImage]) -> None:
            for each in inner:
                each.cancel()

        result: Deferred[IStoredImage] = Deferred(cancel)
        picking = self._chooser.session()
        inner.append(picking)

        def picked(session: CacheSession) -> None:
            reading = session.registry.whenAvailable(key)
            inner.append(reading)
            reading.chainDeferred(result)

        def missing(reason: Any) -> None:
            if reason.check(ImageNotFound):
                result.errback(ImageNotFound(key))
            else:
                result.errback(reason)

        picking.addCallbacks(picked, missing)
        return result

    def get(self, key: ImageKey) -> IStoredImage | None:
        current = self._chooser.current
        return None if current is None else current.registry.get(key)

    def keys(self) -> list[ImageKey]:
        current = self._chooser.current
        return [] if current is None else current.registry.keys()

    def snapshotIds(self) -> list[str]:
        current = self._chooser.current
        return [] if current is None else current.registry.snapshotIds()

    def beginWrite(self, key: ImageKey, writer: IImageWriter | None = None) -> None:
        raise RuntimeError("a restore's reads take no writes")

    def publish(self, key: ImageKey, image: IStoredImage) -> None:
        raise RuntimeError("a restore's reads take no writes")

    def publishAppend(self, key: ImageKey, tail: IStoredImage, store: IImageStore) -> None:
        raise RuntimeError("a restore's reads take no writes")

    def abortWrite(self, key: ImageKey) -> None:
        raise RuntimeError("a restore's reads take no writes")
