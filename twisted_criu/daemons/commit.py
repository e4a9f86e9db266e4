# -*- test-case-name: tests.test_transactions -*-
"""
Confirming a dump to criu's post-dump hook: every image criu wrote is
stored whole on the cache.

criu runs its post-dump action after every image is written and closed and
before it kills the dumped tasks; a non-zero exit makes it resume them.
C{twisted-criu-hook} asks the proxy to L{commitDump}: wait until criu's
connections are settled (everything it wrote is read and stored), then
until the link has handed every image over, then send a SYNC marker and
wait for the cache's SYNCED, whose counts must match ours.  A broken link
is retried on the next connection (which sends again what the cache
lacks); no progress for the link timeout, or a cache that cannot
confirm, fails.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

from twisted.internet.defer import Deferred, race
from twisted.internet.interfaces import IReactorTime
from twisted.internet.task import deferLater
from twisted.logger import Logger

from twisted_criu import wire
from twisted_criu.errors import HookRefused
from twisted_criu.progress import formatBytes

if TYPE_CHECKING:
    from twisted_criu.daemons.proxysession import ProxySession

log = Logger()

#: How often the settling of criu's connections is checked.
SETTLE_POLL = 0.005
#: How often the hook hears how the transfer goes.
REPORT_INTERVAL = 1.0


class Stalled(Exception):
    """Nothing moved for the link timeout."""


async def commitDump(
    session: ProxySession,
    settled: Callable[[], bool],
    clock: IReactorTime,
    timeout: float,
    report: Callable[[str], None],
) -> dict[str, Any]:
    """
    Confirm that the cache stores every image of C{session}'s dump.

    @param settled: are criu's connections settled?
    @param timeout: seconds without progress before giving up.
    @param report: hears a progress line now and then.
    @raise HookRefused: it cannot be confirmed; the message says why.
    """
    started = clock.seconds()
    watch = _ProgressWatch(session, clock, timeout, report)
    try:
        await _settle(session, settled, clock, timeout)
        summary = session.registry.summary()
        sequence = session.nextSyncSequence()
        while True:
            sender = await watch.guard(session.extendedLink())
            if sender.peerVersion < 3:
                raise HookRefused(
                    f"the cache speaks link version {sender.peerVersion}: it cannot confirm a dump"
                    " (twisted-criu 0.2 or later needed)"
                )
            index, _ = await watch.guard(race([sender.whenIdle(), sender.whenLost()]))
            if index == 1 or sender.lost:
                continue  # the next connection sends again what the cache lacks
            summary = session.registry.summary()
            synced = session.expectSynced(sender, sequence)
            sender.sendMarker(wire.Marker.SYNC, sequence)
            index, status = await watch.guard(race([synced, sender.whenLost()]))
            if index == 1:
                continue
            break
    finally:
        watch.stop()
    if status.kind is wire.LinkStatusKind.SESSION_ABORTED:
        raise HookRefused("the cache says this session is aborted")
    if (status.images, status.size) != (summary.images, summary.bytes):
        raise HookRefused(
            f"the cache holds {status.images} images ({status.size} bytes) of this dump where"
            f" the proxy has {summary.images} ({summary.bytes} bytes)"
        )
    seconds = clock.seconds() - started
    log.info(
        "the cache confirms every image of session {id}: {images} images, {bytes} bytes"
        " (the hook waited {seconds:.2f} s)",
        id=session.id,
        images=summary.images,
        bytes=summary.bytes,
        seconds=seconds,
    )
    return {
        "ok": True,
        "session": session.id,
        "images": summary.images,
        "bytes": summary.bytes,
        "waited": round(seconds, 3),
    }


async def _settle(
    session: ProxySession, settled: Callable[[], bool], clock: IReactorTime, timeout: float
) -> None:
    """Wait until everything criu wrote is stored (twice in a row, a poll apart)."""
    deadline = clock.seconds() + timeout
    quiet = 0
    while quiet < 2:
        if session.over:
            raise HookRefused(f"session {session.id} is {session.state}")
        if settled() and not session.registry.writesInProgress and not session.hashing:
            quiet += 1
        else:
            quiet = 0
        if clock.seconds() > deadline:
            raise HookRefused(f"criu's images were not all stored within {timeout:g} s")
        await deferLater(clock, SETTLE_POLL, lambda: None)


class _ProgressWatch:
    """Fails what it guards when the link makes no progress for C{timeout} seconds."""

    def __init__(
        self, session: ProxySession, clock: IReactorTime, timeout: float, report: Callable[[str], None]
    ) -> None:
        self._session = session
        self._clock = clock
        self._timeout = timeout
        self._report = report
        self._guarded: Deferred[Any] | None = None
        self._last = -1
        self._since = clock.seconds()
        self._stalled: str | None = None
        self._call = clock.callLater(REPORT_INTERVAL, self._tick)

    def _progress(self) -> int:
        sender = self._session.sender
        return self._session.registry.totalBytes + (0 if sender is None else sender.progress)

    def _tick(self) -> None:
        now = self._clock.seconds()
        progress = self._progress()
        if progress != self._last:
            self._last, self._since = progress, now
        sender = self._session.sender
        where = "no link to the cache" if sender is None or sender.lost else (
            f"{formatBytes(sender.progress)} handed to the cache on this connection"
        )
        self._report(f"waiting for the cache to confirm session {self._session.id}: {where}")
        if now - self._since >= self._timeout:
            self._stalled = (
                f"nothing moved for {self._timeout:g} s ({where}): the cache cannot confirm the dump"
            )
            guarded = self._guarded
            if guarded is not None:
                guarded.cancel()
            return
        self._call = self._clock.callLater(REPORT_INTERVAL, self._tick)

    async def guard(self, d: Deferred[Any]) -> Any:
        """C{d}'s result, unless the link stalls first (L{HookRefused})."""
        if self._stalled is not None:
            d.cancel()
            raise HookRefused(self._stalled)
        self._guarded = d
        try:
            return await d
        except BaseException:
            if self._stalled is not None:
                raise HookRefused(self._stalled) from None
            raise
        finally:
            self._guarded = None

    def stop(self) -> None:
        if self._call.active():
            self._call.cancel()
