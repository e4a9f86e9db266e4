# -*- test-case-name: tests.test_sessions,tests.test_chains -*-
"""
The proxy's session: a chain of dumps and the one link forwarding them.
What the chain is doing, and how each dump ends on the link, are the
state machines of L{twisted_criu.daemons.dumpchain}; the session feeds
them and does what they decide.
"""

from __future__ import annotations

import secrets
from typing import Any, Callable

from twisted.application.internet import ClientService
from twisted.internet.defer import Deferred
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.threads import deferToThread
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.daemons.commit import commitDump
from twisted_criu.daemons.dumpchain import (
    ABORTED,
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
from twisted_criu.daemons.hello import HELLO_GRACE, HelloWaiters
from twisted_criu.flow.send import OutgoingImage, sha256Of
from twisted_criu.interfaces import (
    IGrowableWriter,
    IGrowingImage,
    IImageWriter,
    ILinkSource,
    ISendingLink,
    ISession,
    IStoredImage,
)
from twisted_criu.keys import ImageKey, describe
from twisted_criu.link.livewrites import LiveWrites
from twisted_criu.link.resume import Resumption
from twisted_criu.flow.compress import LinkCompression
from twisted_criu.link.sender import RemoteSenderFactory
from twisted_criu.progress import Activity
from twisted_criu.registry import SessionSummary, SnapshotRegistry

RetryPolicy = Callable[[int], float]


@implementer(ISession, ILinkSource)
class ProxySession:
    """
    A chain of dumps (pre-dumps, then a dump): a registry of their images,
    and one link forwarding them.

    Every connection of the link starts by sending everything the chain
    holds but what a version-4 cache holds whole of it (L{Resumption}; a
    restarted cache holds nothing), then follows new publications.
    When a dump has finished locally and everything is handed over, the
    dump is ended (L{DumpEnding}): with an end-of-dump marker, confirmed by
    the cache, if the cache speaks twisted-criu's link extension, else (a C
    cache) by closing the link.  The chain (L{DumpChain}) lasts until the
    cache reports that the restore finished (SESSION_DONE); a C cache serves
    one dump, so there the chain ends with its first dump.

    @ivar onDelivered: called with a summary each time a dump has been
        delivered.
    @ivar onAborted: called when the chain is aborted, with why and whether
        criu was still dumping into it.
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
        compression: LinkCompression | None = None,
    ) -> None:
        self.id = sessionId
        #: Names this session on the link: unique to this proxy process and session.
        self.sessionToken = f"{secrets.token_hex(8)}-{sessionId}"
        self.cutThrough = cutThrough and not checksum
        self.started = reactor.seconds()
        self._clock = reactor
        self.registry = SnapshotRegistry(waitForMissing=False)
        self.checksum = checksum
        self._digests: dict[ImageKey, tuple[IStoredImage, bytes]] = {}
        self._hashing = 0
        self.registry.onPublish(self._published)
        self.registry.onWriteStarted(self._writeStarted)
        #: Writes under way that the link may cut through.
        self._writes = LiveWrites(self._offerLive)
        self.seed = False
        self.onDelivered: Callable[[SessionSummary], None] = lambda summary: None
        self.onAborted: Callable[[str, bool], None] = lambda why, dumping: None
        self.ended: Deferred[None] = Deferred()
        self._count = DumpCount()
        self._chain = ChainMachine(self._count)
        self._ending = EndingMachine(EndingCore(self, reactor))
        self._sender: ISendingLink | None = None
        self._linkTimeout = linkTimeout
        self._hello = HelloWaiters(reactor, lambda: self._sender)
        self._syncWaiters: dict[int, tuple[ISendingLink, Deferred[wire.LinkStatus]]] = {}
        self._syncSequence = 0
        #: Images on their way when a link broke, and where they resume.
        self._resume = Resumption(self.expectSynced, self.nextSyncSequence, self.registry.get, reactor, linkTimeout)
        self._abortGiveUp: Any = None
        #: criu's post-dump hook got the cache's confirmation: the chain ends with this dump.
        self.committed = False
        kwargs: dict[str, Any] = {"clock": reactor}
        if retryPolicy is not None:
            kwargs["retryPolicy"] = retryPolicy
        factory = RemoteSenderFactory(
            self, clock=reactor, stallTimeout=linkTimeout, activity=activity, compression=compression
        )
        self._link = ClientService(cache, factory, **kwargs)

    @property
    def state(self) -> str:
        """For operators: what the chain is doing."""
        return self._chain.state()

    @property
    def over(self) -> bool:
        """The chain is over (or aborted): a new dump starts a new session."""
        return self.state in (COMPLETE, ABORTED)

    @property
    def sender(self) -> ISendingLink | None:
        """The link's current connection, if any."""
        return self._sender

    @property
    def hashing(self) -> int:
        """Images whose checksum is being computed."""
        return self._hashing

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
        if self._abortGiveUp is not None and self._abortGiveUp.active():
            self._abortGiveUp.cancel()
        self._hello.stop()
        self._ending.stop()
        if self._sender is not None:
            self._sender.expectClose()
        return self._link.stopService()

    def drop(self) -> Deferred[None]:
        """The operator drops the chain, whose dumps are all delivered."""
        self._chain.dropped()
        return self.stop()

    # -- ILinkSource -------------------------------------------------------

    def linkUp(self, sender: ISendingLink) -> None:
        self.log.info("connected to the cache")
        previous, self._sender = self._sender, sender
        if self.state == ABORTED:
            self._sendAbort(sender)
            return
        self._ending.linkUp()
        self._resume.linkUp(sender, previous)
        for key in self.registry.publishOrder:
            sender.enqueue(key)
        self.maybeEndDump()

    def imageFor(self, key: ImageKey) -> IStoredImage | None:
        image = self.registry.get(key)
        return None if image is not None and self._resume.skips(key, image) else image  # (held whole)

    def digestFor(self, key: ImageKey, image: IStoredImage) -> tuple[bool, bytes | None]:
        if not self.checksum:
            return True, None
        known = self._digests.get(key)
        if known is not None and known[0] is image:
            return True, known[1]
        return False, None

    def resumeOffset(self, key: ImageKey, version: IStoredImage | IGrowingImage) -> int:
        return self._resume.offsetFor(key, version)

    def forwarding(self, key: ImageKey, version: IStoredImage | IGrowingImage | None) -> None:
        self._resume.forwarding(key, version)

    def nextLive(self) -> tuple[ImageKey, IGrowingImage] | None:
        """
        For a link that is free: a broken-off cut-through first, else the
        image criu is writing that L{LiveWrites} picks.
        """
        live = self._resume.liveToResume()
        if live is not None:
            self._writes.discard(live[0])
        else:
            live = self._writes.take()
        while live is not None:
            key, writer = live
            try:
                growing = writer.follow()
                self._resume.followed(growing, writer)
                return key, growing
            except OSError as e:  # no descriptor: it goes whole once complete
                self.log.warn("cannot cut {image} through: {why}", image=describe(key), why=e.strerror)
            live = self._writes.take()
        return None

    def statusReceived(self, sender: ISendingLink, status: wire.LinkStatus) -> None:
        if sender is not self._sender:
            return
        kind = status.kind
        if kind is wire.LinkStatusKind.HELLO:
            self.log.info(
                "the cache speaks twisted-criu's link extension (version {version})",
                version=status.version,
            )
            self._hello.hello(sender)
            self._ending.hello()
        elif kind is wire.LinkStatusKind.SYNCED or kind is wire.LinkStatusKind.SESSION_ABORTED:
            if kind is wire.LinkStatusKind.SESSION_ABORTED:
                syncs, self._syncWaiters = self._syncWaiters, {}
                for _, synced in syncs.values():
                    synced.callback(status)
                self.abortDump("the cache says the session is aborted", tellCache=False)
                return
            waiting = self._syncWaiters.pop(status.sequence, None)
            if waiting is not None and waiting[0] is sender:
                waiting[1].callback(status)
        elif kind is wire.LinkStatusKind.RESUME_AT:
            self._resume.resumeAt(status)
        elif kind is wire.LinkStatusKind.DUMP_RECEIVED:
            self._ending.dumpReceived(sender, status)
        elif kind is wire.LinkStatusKind.SESSION_DONE:
            self._ending.sessionDone(sender)

    def forwardFailed(self, key: ImageKey, why: str) -> None:
        if self.state in (DUMPING, FORWARDING):
            self.abortDump(why)  # criu's dump, or its post-dump hook, fails
        elif self._sender is not None:
            self._sender.abort()  # delivered before: the link tries again later

    # -- images ----------------------------------------------------------------

    def _writeStarted(self, key: ImageKey, writer: IImageWriter) -> None:
        """criu started writing an image: the link may cut it through."""
        if not self.cutThrough or not IGrowableWriter.providedBy(writer):
            return
        self._resume.writeStarted(key, writer)
        self._writes.started(key, writer)

    def _offerLive(self) -> None:
        """A write has grown enough to be cut through, if the link is free."""
        sender = self._sender
        if sender is not None:
            sender.offerLive()

    def _published(self, key: ImageKey, image: IStoredImage) -> None:
        self._resume.published(key, image)
        self._writes.ended(key)
        sender = self._sender
        if sender is not None and sender.cutThrough(key, image):
            return  # already on its way
        if self.checksum:
            # Hash in a thread (hashlib releases the GIL); forward when known.
            self._hashing += 1
            d = deferToThread(sha256Of, OutgoingImage(image))
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
        if self.state == ABORTED:
            return  # (its images were just released)
        self._chain.dumpFinished()
        self.log.info(
            "dump finished: {n} images, {size} bytes",
            n=len(self.registry.keys()),
            size=self.registry.totalBytes,
        )
        self.maybeEndDump()

    # -- ending a dump (called by the ending's machine) --------------------------

    @property
    def _lastDumpFinished(self) -> bool:
        """Has the chain's last dump finished (and the chain not ended)?"""
        return self.state in (FORWARDING, DELIVERED)

    def maybeEndDump(self) -> None:
        """If the link owes the cache an end of dump, end it once the link is idle."""
        sender = self._sender
        if not self._lastDumpFinished or self._hashing:
            return
        if sender is None or sender.lost:
            return
        # A new connection resending a delivered dump (a restarted cache)
        # owes the cache its end too: it has queued images, none counted yet.
        if self.state == FORWARDING or sender.imagesSinceMarker > 0 or not sender.idle:
            self._ending.waitForIdle(sender)

    def linkIdle(self, sender: ISendingLink) -> None:
        """C{sender} handed everything over: how may the dump end?"""
        if sender is not self._sender:
            return  # a new connection started over
        if sender.lost or not self._lastDumpFinished:
            self._ending.notYet()
        elif not sender.idle:  # an image was replaced meanwhile
            self._ending.notYet()
            self.maybeEndDump()
        elif sender.extended:
            self._ending.endWithMarker(sender)
        elif (waited := sender.helloWait(self._clock.seconds())) < HELLO_GRACE:
            self._ending.awaitHello(HELLO_GRACE - waited)
        else:
            self._ending.endWithEOF(sender)

    def dumpConfirmed(
        self, sender: ISendingLink, status: wire.LinkStatus, receipt: Receipt
    ) -> None:
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
            sender.abort()
            return
        if self._chain.dumpDelivered():
            self._announce(confirmed=True)

    def endWithEOF(self, sender: ISendingLink) -> None:
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

    def sessionOver(self, sender: ISendingLink) -> None:
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

    # -- the post-dump hook --------------------------------------------------------

    def commit(
        self, settled: Callable[[], bool], report: Callable[[str], None]
    ) -> Deferred[dict[str, Any]]:
        """
        Confirm to criu's post-dump hook that the cache stores every image
        of the dump (see L{commitDump}); if that fails, the dump is aborted.
        """
        d = Deferred.fromCoroutine(
            commitDump(self, settled, self._clock, self._linkTimeout, report)
        )

        def confirmed(result: dict[str, Any]) -> dict[str, Any]:
            self.committed = True
            return result

        def failed(reason: Any) -> Any:
            self.abortDump(f"the post-dump hook gets no confirmation: {reason.getErrorMessage()}")
            return reason

        return d.addCallbacks(confirmed, failed)

    def nextSyncSequence(self) -> int:
        self._syncSequence += 1
        return self._syncSequence

    def extendedLink(self) -> Deferred[ISendingLink]:
        """The link's connection once the cache said HELLO on it."""
        return self._hello.extendedLink()

    def expectSynced(self, sender: ISendingLink, sequence: int) -> Deferred[wire.LinkStatus]:
        """Fires with the cache's answer to SYNC C{sequence} on C{sender}'s connection."""

        def cancel(d: Deferred[wire.LinkStatus]) -> None:
            self._syncWaiters.pop(sequence, None)

        d: Deferred[wire.LinkStatus] = Deferred(cancel)
        self._syncWaiters[sequence] = (sender, d)
        return d

    def abortDump(self, why: str, tellCache: bool = True) -> None:
        """
        The dump failed and criu resumes the process: this session must
        never be restored.  Its images are dropped; the cache is told
        (ABORT), now or when the link comes back within the link timeout.
        """
        if self.over:
            return
        self.log.error("session {id} aborted: {why}", id=self.id, why=why)
        dumping = self.state == DUMPING
        self._chain.aborted()
        self.onAborted(why, dumping)
        self.registry.release()
        self._writes.clear()
        sender = self._sender
        if not tellCache:
            self._stopAborted()
        elif sender is not None and not sender.lost and sender.idle:
            self._sendAbort(sender)
        else:
            if sender is not None and not sender.lost:
                sender.abort()  # in the middle of an image: the next connection says ABORT
            self._abortGiveUp = self._clock.callLater(self._linkTimeout, self._stopAborted)

    def _sendAbort(self, sender: ISendingLink) -> None:
        sender.sendMarker(wire.Marker.ABORT)
        self.log.info("told the cache that session {id} is aborted", id=self.id)
        # Not from inside the link's connectionMade: ClientService is still connecting.
        giveUp = self._abortGiveUp
        if giveUp is not None and giveUp.active():
            giveUp.cancel()
        self._abortGiveUp = self._clock.callLater(0, self._stopAborted)

    def _stopAborted(self) -> None:
        giveUp, self._abortGiveUp = self._abortGiveUp, None
        if giveUp is not None and giveUp.active():
            giveUp.cancel()
        self._ending.stop()
        if self._sender is not None:
            self._sender.expectClose()
        self._link.stopService().addCallback(lambda _: self._end())
