# -*- test-case-name: tests.test_chains -*-
"""
The operator's view of a daemon: which sessions it holds, their images,
and dropping one.  Served as JSON over HTTP (L{twisted.web}) on the
daemon's C{--control} endpoint, a UNIX socket in its images directory by
default; C{twisted-criu ls|pull|drop} are its client.

    GET    /sessions                          every session (current and kept)
    GET    /sessions/ID                       one session, with its images
    GET    /sessions/ID/image?snapshot=S&name=N   an image's bytes
    DELETE /sessions/ID                       drop a session's images
"""

from __future__ import annotations

import json
from typing import Any

from attrs import frozen
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from twisted_criu.errors import SessionBusy
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import ISessionControl, IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.registry import SnapshotRegistry


@frozen
class ImageView:
    snapshotId: str
    name: str
    size: int


@frozen
class SessionView:
    """A session as an operator sees it."""

    id: str
    state: str
    current: bool
    kept: bool
    started: float
    snapshotIds: list[str]
    images: list[ImageView]

    @property
    def bytes(self) -> int:
        return sum(image.size for image in self.images)

    @classmethod
    def of(
        cls, sessionId: str, state: str, current: bool, started: float, registry: SnapshotRegistry
    ) -> SessionView:
        images = []
        for snapshotId, name in sorted(registry.keys()):
            image = registry.get((snapshotId, name))
            if image is not None:
                images.append(ImageView(snapshotId, name, image.size))
        return cls(
            sessionId, state, current, not current, started, registry.snapshotIds(), images
        )

    def toJSON(self, withImages: bool) -> dict[str, Any]:
        described: dict[str, Any] = {
            "id": self.id,
            "state": self.state,
            "current": self.current,
            "kept": self.kept,
            "started": self.started,
            "snapshot_ids": self.snapshotIds,
            "image_count": len(self.images),
            "bytes": self.bytes,
        }
        if withImages:
            described["images"] = [
                {"snapshot_id": i.snapshotId, "name": i.name, "size": i.size} for i in self.images
            ]
        return described


class SessionHolder:
    """
    The listing half of L{ISessionControl} for a daemon that has a current
    session and kept ones; each session has C{id}, C{state}, C{started} and
    C{registry}.
    """

    kept: dict[str, Any]
    keep: bool
    log: Logger

    def currentSession(self) -> Any | None:
        raise NotImplementedError()

    def retire(self, session: Any) -> None:
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
            views.append(
                SessionView.of(current.id, current.state, True, current.started, current.registry)
            )
        for kept in self.kept.values():
            views.append(SessionView.of(kept.id, "kept", False, kept.started, kept.registry))
        return views

    def findSession(self, sessionId: str) -> Any:
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


def _json(request: server.Request, value: Any, code: int = http.OK) -> bytes:
    request.setResponseCode(code)
    request.setHeader(b"content-type", b"application/json")
    return json.dumps(value, indent=1).encode() + b"\n"


def _error(request: server.Request, code: int, message: str) -> bytes:
    return _json(request, {"error": message}, code)


class _ImageResource(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, control: ISessionControl, sessionId: str) -> None:
        super().__init__()
        self.control = control
        self.sessionId = sessionId

    def render_GET(self, request: server.Request) -> bytes | int:
        args: dict[bytes, list[bytes]] = request.args or {}
        snapshot = [v.decode("utf-8", "surrogateescape") for v in args.get(b"snapshot", [b""])][0]
        names = [v.decode("utf-8", "surrogateescape") for v in args.get(b"name", [])]
        if not names:
            return _error(request, http.BAD_REQUEST, "give ?name=IMAGE (and &snapshot=ID)")
        image = self.control.sessionImage(self.sessionId, (snapshot, names[0]))
        if image is None:
            return _error(request, http.NOT_FOUND, f"no image {snapshot}/{names[0]} in session {self.sessionId}")
        transfer = OutgoingImage(image)  # these bytes, even if dropped meanwhile
        request.setHeader(b"content-type", b"application/octet-stream")
        request.setHeader(b"content-length", str(transfer.size).encode())
        if request.method == b"HEAD":
            transfer.close()
            return b""

        gone: list[Failure] = []
        request.notifyFinish().addErrback(gone.append)

        def failed(reason: Failure) -> None:
            self.log.warn("image download stopped: {why}", why=reason.getErrorMessage())
            transfer.close()
            if not gone:
                request.loseConnection()

        def sent(_: None) -> None:
            if not gone:
                request.finish()

        transfer.sendTo(request).addCallbacks(sent, failed)
        return server.NOT_DONE_YET


class _SessionResource(resource.Resource):
    def __init__(self, control: ISessionControl, sessionId: str) -> None:
        super().__init__()
        self.control = control
        self.sessionId = sessionId

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if path == b"image":
            return _ImageResource(self.control, self.sessionId)
        return resource.NoResource()

    def _find(self) -> SessionView | None:
        for session in self.control.listSessions():
            if session.id == self.sessionId:
                return session
        return None

    def render_GET(self, request: server.Request) -> bytes:
        session = self._find()
        if session is None:
            return _error(request, http.NOT_FOUND, f"no session {self.sessionId}")
        return _json(request, session.toJSON(withImages=True))

    def render_DELETE(self, request: server.Request) -> bytes:
        try:
            dropped = self.control.dropSession(self.sessionId)
        except KeyError:
            return _error(request, http.NOT_FOUND, f"no session {self.sessionId}")
        except SessionBusy as e:
            return _error(request, http.CONFLICT, str(e))
        return _json(request, {"dropped": dropped.toJSON(withImages=False)})


class _SessionsResource(resource.Resource):
    def __init__(self, control: ISessionControl) -> None:
        super().__init__()
        self.control = control

    def getChild(self, path: bytes, request: server.Request) -> resource.Resource:
        if not path:
            return self
        return _SessionResource(self.control, path.decode("utf-8", "replace"))

    def render_GET(self, request: server.Request) -> bytes:
        return _json(
            request,
            {
                "role": self.control.role,
                "sessions": [s.toJSON(withImages=False) for s in self.control.listSessions()],
            },
        )


def controlSite(control: ISessionControl) -> server.Site:
    """The HTTP site of a daemon's control endpoint."""
    root = resource.Resource()
    root.putChild(b"sessions", _SessionsResource(control))
    site = server.Site(root)
    site.displayTracebacks = False
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log
    return site
