# -*- test-case-name: tests.test_daemons,tests.test_transactions -*-
"""
The image cache (restore host): receives images from image proxies and
serves them to C{criu restore --remote|--stream} on local sockets.

Each migration is its own L{CacheSession}, named by the proxy's session
token; which one a restore gets is L{RestoreChooser}'s rule.
"""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from twisted.internet.defer import Deferred, fail, succeed
from twisted.internet.interfaces import IStreamServerEndpoint
from twisted.logger import Logger
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageFactory
from twisted_criu.criu.variants import ReadVariant, readsInline
from twisted_criu.criu.stream import StreamServeFactory
from twisted_criu.daemons.cachesession import DUMPING, FINAL, RESTORED, CacheSession
from twisted_criu.daemons.partials import RESUME_GRACE, KeptParts, heldWhole
from twisted_criu.daemons.restores import LINKED_GRACE, RestoreChooser, RestoreReads
from twisted_criu.daemons.service import ImageDaemon
from twisted_criu.daemons.sessions import viewOf
from twisted_criu.errors import HookRefused, SessionBusy
from twisted_criu.interfaces import (
    IImageStore,
    IImageWriter,
    IRestoreService,
    IReceivingLink,
    IRemoteImageSink,
    ISnapshotRegistry,
)
from twisted_criu.link.receiver import RemoteReceiverFactory
from twisted_criu.registry import SnapshotRegistry
from twisted_criu.views import SessionView

#: How many ended sessions' tokens the cache remembers, so that a proxy
#: that comes back to one is told it is over instead of starting it anew.
REMEMBERED_TOKENS = 4096


def _endStatus(state: str) -> wire.LinkStatus:
    """What a proxy is told of a session that ended in C{state}."""
    kind = wire.LinkStatusKind.SESSION_DONE if state == RESTORED else wire.LinkStatusKind.SESSION_ABORTED
    return wire.LinkStatus(kind)


@implementer(IRestoreService, IRemoteImageSink)
class ImageCacheService(ImageDaemon[CacheSession]):
    """
    The image cache, embeddable in any Twisted application.

    @param local: where criu restore --remote connects (C{unix:DIR/img-cache.sock}).
    @param streamLocal: where criu restore --stream connects, if at all
        (C{unix:DIR/streamer-serve.sock}).
    @param listen: where image proxies connect.
    @param retain: seconds a delivered session waits for its restore (or a
        restore for its confirmation) before it is dropped.
    @param restoreGrace: seconds a restore with nothing to read waits for a
        linked proxy that has sent nothing yet, or after the cache started.
    @param resumeGrace: seconds the part of an image received before its
        link broke is kept for its proxy to resume (0: never kept).
    """

    log = Logger()

    def __init__(
        self,
        reactor: Any,
        local: IStreamServerEndpoint,
        listen: IStreamServerEndpoint,
        store: IImageStore | None = None,
        readVariant: ReadVariant = ReadVariant.AUTO,
        streamLocal: IStreamServerEndpoint | None = None,
        linkTimeout: float = 60.0,
        clientTimeout: float = 60.0,
        keep: bool = False,
        progressInterval: float = 10.0,
        retain: float = 3600.0,
        restoreGrace: float = LINKED_GRACE,
        resumeGrace: float = RESUME_GRACE,
    ) -> None:
        super().__init__(
            reactor, store, readVariant, linkTimeout, clientTimeout, keep, progressInterval
        )
        self.retain = retain
        self.restoreGrace = restoreGrace
        #: Images whose link broke in the middle, kept for their proxy.
        self.partials = KeptParts(reactor, resumeGrace)
        #: When the cache started (restores wait a little for proxies coming back).
        self.startedAt = reactor.seconds()
        #: Sessions not yet over, by id, oldest first.
        self.sessions: dict[str, CacheSession] = {}
        self._byToken: dict[str, CacheSession] = {}
        #: Tokens of sessions that are over, and how they ended.
        self._ended: OrderedDict[str, str] = OrderedDict()
        self._links: set[IReceivingLink] = set()
        #: Links of proxies that name no session (CRIU's C proxy), and the name each gets.
        self._anonymous: dict[IReceivingLink, str] = {}
        self._anonymousCount = 0
        #: Links told that their session takes no more images, and its state then.
        self._refused: dict[IReceivingLink, str] = {}
        self.restores = RestoreChooser(self)
        self.remoteEndpoint = self.listenOn(listen, RemoteReceiverFactory(self))
        self.localEndpoint = self.listenOn(local, LocalImageFactory(self))
        self.streamEndpoint = (
            None if streamLocal is None else self.listenOn(streamLocal, StreamServeFactory(self))
        )

    def startService(self) -> None:
        self.startedAt = self.reactor.seconds()
        super().startService()

    def stopSessions(self) -> None:
        for session in self.sessions.values():
            session.cancel("giveUp")
            session.cancel("retention")
        self.partials.clear()
        self.restores.stop()

    @property
    def session(self) -> CacheSession | None:
        """The newest session not yet over (for tests and operators)."""
        return next(reversed(self.sessions.values()), None)

    @property
    def readsWaiting(self) -> int:
        """criu reads waiting for a session to be delivered."""
        return self.restores.waiting

    # -- sessions --------------------------------------------------------------

    def _sessionFor(self, token: str) -> CacheSession | str:
        """The live session of C{token}, a new one, or how its session ended."""
        session = self._byToken.get(token)
        if session is not None:
            return session
        ended = self._ended.get(token)
        if ended is not None:
            return ended
        session = CacheSession(self.nextSessionId(), self.reactor.seconds(), token)
        self.sessions[session.id] = session
        self._byToken[token] = session
        self.log.info("session {id} started", id=session.id)
        return session

    def _over(self, session: CacheSession) -> None:
        """C{session} reached a final state: forget it, tell its proxy."""
        self.sessions.pop(session.id, None)
        self._byToken.pop(session.token, None)
        self._ended[session.token] = session.state
        while len(self._ended) > REMEMBERED_TOKENS:
            self._ended.popitem(last=False)
        self.restores.sessionOver(session)
        self.partials.discardSession(session.id, f"the session is {session.state}")
        for link in list(session.links):
            link.sendStatus(_endStatus(session.state))
            link.close()
        session.links.clear()

    def delivered(self, session: CacheSession, how: str) -> None:
        if not session.deliver():
            return
        summary = session.registry.summary()
        self.log.info(
            "session {id} delivered ({how}): {images} images, {bytes} bytes",
            id=session.id,
            how=how,
            images=summary.images,
            bytes=summary.bytes,
        )
        self.retainFor(session)
        self.restores.wake()

    def retainFor(self, session: CacheSession) -> None:
        """(Re)start C{session}'s retention time: at delivery, and when a restore picks it."""
        session.cancel("retention")
        if self.retain > 0:
            session.retention = self.reactor.callLater(self.retain, self._expire, session)

    def _expire(self, session: CacheSession) -> None:
        session.retention = None
        if session.expire():
            self.log.warn(
                "session {id} was not restored within --retain {seconds} s: its images are dropped",
                id=session.id,
                seconds=f"{self.retain:g}",
            )
            self._over(session)

    def abortSession(self, session: CacheSession, why: str) -> None:
        if session.abort():
            self.log.warn(
                "session {id} aborted: {why}; it will never be restored", id=session.id, why=why
            )
            self._over(session)
        elif not session.final:
            self.log.error(
                "session {id} cannot be aborted ({why}): it is {state}",
                id=session.id,
                why=why,
                state=session.state,
            )

    def restoreConfirmed(self, session: CacheSession, how: str) -> None:
        if not session.confirmRestore():
            return
        summary = session.registry.summary()
        self.log.info(
            "session complete: {images} images, {bytes} bytes (session {id} restored: {how})",
            id=session.id,
            how=how,
            images=summary.images,
            bytes=summary.bytes,
        )
        self._over(session)
        self.retire(session)
        self.sessionDone(summary)

    # -- ISessionControl ----------------------------------------------------

    role = "cache"

    def currentSession(self) -> CacheSession | None:
        return None

    def listSessions(self) -> list[SessionView]:
        views = [viewOf(s, s.state, current=True) for s in self.sessions.values()]
        return views + [viewOf(s, "kept", current=False) for s in self.kept.values()]

    def findSession(self, sessionId: str) -> CacheSession:
        session = self.sessions.get(sessionId)
        return session if session is not None else self.kept[sessionId]

    def releaseAll(self) -> None:
        for session in list(self.sessions.values()):
            session.registry.release()
        super().releaseAll()

    def dropSession(self, sessionId: str) -> SessionView:
        session = self.findSession(sessionId)
        view = viewOf(session, "dropped", current=False)
        if session.id in self.kept:
            del self.kept[sessionId]
            session.registry.release()
        else:
            if session.state == DUMPING and session.links:
                raise SessionBusy(
                    f"session {sessionId} is busy ({len(session.links)} proxy link sending its dump)"
                )
            if self.restores.serving(session):
                raise SessionBusy(f"session {sessionId} is being restored")
            session.drop()
            self._over(session)
        self.log.info("session {id} dropped by the operator", id=sessionId)
        return view

    def hookAction(self, action: str, report: Any) -> Deferred[dict[str, Any]]:
        """C{twisted-criu-hook} on the restore host: a restore begins, or succeeded."""
        if action == "pre-restore":
            return succeed(self.restores.hookedRestoreBegins())
        if action == "post-resume":
            try:
                return succeed(self.restores.hookedRestoreSucceeded())
            except HookRefused as e:
                return fail(e)
        return fail(HookRefused(f"the cache has nothing to do at {action}"))

    # -- IRemoteImageSink ----------------------------------------------------

    def linkOpened(self, receiver: IReceivingLink) -> None:
        self._links.add(receiver)

    def linkToken(self, receiver: IReceivingLink, token: str | None) -> str:
        """The session token C{receiver}'s headers stand for."""
        if token is not None:
            return token
        # A proxy that names no session (CRIU's C proxy): one link, one dump.
        name = self._anonymous.get(receiver)
        if name is None:
            self._anonymousCount += 1
            name = self._anonymous[receiver] = f"link {self._anonymousCount} of this cache"
        return name

    def imageArriving(self, receiver: IReceivingLink, token: str | None) -> ISnapshotRegistry | None:
        """An image for C{token}'s session arrives: where to store it (L{None}: discard it)."""
        session = self._sessionFor(self.linkToken(receiver, token))
        if isinstance(session, str):
            self._refuse(receiver, session)
            return None
        if not self._oneLink(session, receiver):
            return None
        if session.imagesArriving(receiver):
            return session.registry
        self._refuse(receiver, session.state, session)
        return None

    def _oneLink(self, session: CacheSession, receiver: IReceivingLink) -> bool:
        """
        One link per session: may C{receiver} speak for C{session}?  A
        second link while one is alive is its proxy reconnecting (after a
        break this end has not noticed yet) if it is authenticated: it then
        replaces the old one.  A plain link cannot prove that: it is refused.
        """
        others = [link for link in session.links if link is not receiver]
        if not others:
            return True
        if receiver.authenticated:
            for old in others:
                self.log.warn(
                    "session {id}: its proxy linked again from {peer}; dropping its old link"
                    " from {old}",
                    id=session.id,
                    peer=receiver.peer,
                    old=old.peer,
                )
                session.links.discard(old)
                old.abort()
            return True
        self.log.error(
            "refused a second link for session {id} from {peer}: its link from {old} is alive,"
            " and a plain link cannot prove it comes from the same proxy",
            id=session.id,
            peer=receiver.peer,
            old=others[0].peer,
        )
        receiver.abort()
        return False

    def _refuse(self, receiver: IReceivingLink, state: str, session: CacheSession | None = None) -> None:
        """Images came for a session that takes no more: tell the proxy."""
        if session is not None:
            session.links.add(receiver)
        if self._refused.get(receiver) != state:
            self._refused[receiver] = state
            self.log.warn(
                "a proxy sends images of a session that is {state}: discarded", state=state
            )
            if state in FINAL:
                receiver.sendStatus(_endStatus(state))

    def dumpEnded(self, receiver: IReceivingLink, token: str | None) -> None:
        session = self._byToken.get(self.linkToken(receiver, token))
        if session is not None and self._oneLink(session, receiver):
            self.delivered(session, "the proxy ended its dump")

    def syncRequested(self, receiver: IReceivingLink, token: str | None, sequence: int) -> wire.LinkStatus:
        """A SYNC marker: every image before it is stored.  Confirm with the session's counts."""
        session = self._sessionFor(self.linkToken(receiver, token))
        if isinstance(session, str):
            self.log.error("a proxy asks to confirm a session that is {state}", state=session)
            return wire.LinkStatus(wire.LinkStatusKind.SESSION_ABORTED)
        if not self._oneLink(session, receiver):
            return wire.LinkStatus(wire.LinkStatusKind.SESSION_ABORTED)
        session.links.add(receiver)
        session.dumpHooked = True
        if session.state == DUMPING:
            self.delivered(session, "confirmed to the dump's post-dump hook")
        elif not session.restorable:
            return wire.LinkStatus(wire.LinkStatusKind.SESSION_ABORTED)
        summary = session.registry.summary()
        return wire.LinkStatus(
            wire.LinkStatusKind.SYNCED, images=summary.images, size=summary.bytes, sequence=sequence
        )

    def abortRequested(self, receiver: IReceivingLink, token: str | None) -> None:
        session = self._byToken.get(self.linkToken(receiver, token))
        if session is not None and self._oneLink(session, receiver):
            self.abortSession(session, "the proxy says criu's dump failed and the process was resumed")

    def imageLost(self, receiver: IReceivingLink, token: str | None, why: str) -> None:
        session = self._byToken.get(self.linkToken(receiver, token))
        if session is not None:
            self.abortSession(session, why)

    def keepPartial(self, receiver: IReceivingLink, header: wire.RemoteHeader, writer: IImageWriter) -> bool:
        session = self._byToken.get(self.linkToken(receiver, header.session))
        if not self.running or session is None or session.state != DUMPING:
            return False  # (stopping: nothing is kept)
        return self.partials.keep(session.id, (header.snapshotId, header.name), writer)

    def resumeWriter(self, receiver: IReceivingLink, header: wire.RemoteHeader) -> IImageWriter | None:
        session = self._byToken.get(self.linkToken(receiver, header.session))
        sessionId = "none" if session is None else session.id
        return self.partials.take(sessionId, (header.snapshotId, header.name), header.offset)

    def keptStatuses(self, receiver: IReceivingLink, token: str | None) -> list[wire.LinkStatus]:
        session = self._byToken.get(self.linkToken(receiver, token))
        if session is None or not self._oneLink(session, receiver):  # (an old link's image is kept now)
            return []
        return self.partials.statuses(session.id) + heldWhole(session.registry)

    @property
    def proxiesLinked(self) -> bool:
        """Is any proxy connected?"""
        return bool(self._links)

    def linkClosed(self, receiver: IReceivingLink, clean: bool) -> None:
        self._links.discard(receiver)
        self._sessionsLinkClosed(receiver, clean)
        self._anonymous.pop(receiver, None)
        self._refused.pop(receiver, None)
        self.restores.wake()

    def _sessionsLinkClosed(self, receiver: IReceivingLink, clean: bool) -> None:
        if not self.running:
            return  # stopping: every session goes
        for session in list(self.sessions.values()):
            if receiver not in session.links:
                continue
            session.links.discard(receiver)
            if session.state != DUMPING or session.links:
                continue
            anonymous = session.token == self._anonymous.get(receiver)
            if anonymous and clean:
                self.delivered(session, "CRIU's C proxy closed its link")
            elif anonymous:
                self.abortSession(session, "the link to CRIU's C proxy broke in the middle of its dump")
            else:
                self.log.warn(
                    "link to the proxy lost; waiting {seconds} s for it to come back"
                    " (session {id} is in the middle of its dump)",
                    id=session.id,
                    seconds=self.linkTimeout,
                )
                session.cancel("giveUp")
                session.giveUp = self.reactor.callLater(self.linkTimeout, self._proxyGone, session)

    def _proxyGone(self, session: CacheSession) -> None:
        session.giveUp = None
        if session.links or session.state != DUMPING:
            return
        self.abortSession(
            session,
            f"its proxy did not come back within {self.linkTimeout:g} s and its dump was"
            " never delivered",
        )

    # -- ILocalImageService --------------------------------------------------

    def registryFor(self, request: wire.LocalRequest) -> ISnapshotRegistry:
        if request.isSeed:
            self.restores.seed = True
        if request.kind is not wire.OpenKind.READ:
            self.log.warn(
                "criu writes {image} to the cache: the cache serves restores, the write goes nowhere",
                image=request.name,
            )
            scratch = SnapshotRegistry(waitForMissing=False)
            return scratch
        return RestoreReads(self.restores)

    def finishRequested(self, request: wire.LocalRequest) -> None:
        """criu restore --remote says its restore is over: that confirms it."""
        self.restores.remoteRestoreFinished()

    def streamRestoreEnded(self, complete: bool) -> None:
        self.restores.streamRestoreEnded(complete)

    def readsInline(self, request: wire.LocalRequest) -> bool:
        return readsInline(self.readVariant, request, self.restores.seed)
