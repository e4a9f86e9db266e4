# -*- test-case-name: tests.test_sessions,tests.test_chains -*-
"""
What a daemon holds of its sessions: the current one and the kept ones.

The sessions themselves, each driven by explicit state machines, are
L{twisted_criu.daemons.proxysession.ProxySession} (a chain of dumps and
the link forwarding it; its machines are in L{twisted_criu.daemons.dumpchain})
and L{twisted_criu.daemons.cachesession.CacheSession} (a restore and the
links feeding it); both provide L{ISession}.
"""

from __future__ import annotations

from typing import Generic, TypeVar

from twisted.logger import Logger

from twisted_criu.interfaces import ISession, IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.views import ImageView, SessionView

SessionT = TypeVar("SessionT", bound=ISession)


def viewOf(session: ISession, state: str, current: bool) -> SessionView:
    """What an operator sees of C{session}, shown as in C{state}."""
    registry = session.registry
    images = []
    for key in sorted(registry.keys()):
        image = registry.get(key)
        if image is not None:
            images.append(ImageView(key[0], key[1], image.size, getattr(image, "spilled", 0)))
    return SessionView(
        session.id, state, current, not current, session.started, registry.snapshotIds(), images
    )


class SessionHolder(Generic[SessionT]):
    """
    The listing half of L{ISessionControl} for a daemon that has a current
    session and kept ones.
    """

    kept: dict[str, SessionT]
    keep: bool
    log: Logger

    def currentSession(self) -> SessionT | None:
        raise NotImplementedError()

    def retire(self, session: SessionT) -> None:
        """A session is over: keep it (C{keep}) or drop its images."""
        if self.keep:
            self.kept[session.id] = session
            self.log.info("session {id} is over; its images are kept (--keep)", id=session.id)
        else:
            session.registry.release()
            self.log.info("session {id} is over; its images are dropped", id=session.id)

    def releaseAll(self) -> None:
        """The daemon stops: drop every session's images."""
        current = self.currentSession()
        if current is not None:
            current.registry.release()
        for kept in self.kept.values():
            kept.registry.release()
        self.kept.clear()

    def listSessions(self) -> list[SessionView]:
        views = []
        current = self.currentSession()
        if current is not None:
            views.append(viewOf(current, current.state, current=True))
        for kept in self.kept.values():
            views.append(viewOf(kept, "kept", current=False))
        return views

    def findSession(self, sessionId: str) -> SessionT:
        """The current or a kept session; L{KeyError} if there is none."""
        current = self.currentSession()
        if current is not None and current.id == sessionId:
            return current
        return self.kept[sessionId]

    def sessionImage(self, sessionId: str, key: ImageKey) -> IStoredImage | None:
        try:
            image: IStoredImage | None = self.findSession(sessionId).registry.get(key)
        except KeyError:
            return None
        return image
