# -*- test-case-name: tests.test_control,tests.test_chains -*-
"""
The operator's view of a daemon: which sessions it holds, their images,
and dropping one.  Served as JSON over HTTP (L{twisted.web}) on the
daemon's C{--control} endpoint, a UNIX socket in its images directory by
default; C{twisted-criu ls|pull|drop} are its client.  Its routes::

    GET    /sessions                          every session (current and kept), and
                                              the bytes in memory and spilled to disk
    GET    /sessions/ID                       one session, with its images
    GET    /sessions/ID/image?snapshot=S&name=N   an image's bytes
    DELETE /sessions/ID                       drop a session's images
    POST   /hook/ACTION                       twisted-criu-hook at criu's ACTION

A hook request is answered with JSON lines: progress lines
(C{{"progress": "..."}}) while the daemon works, then one result line
(C{{"ok": true, ...}} or C{{"ok": false, "error": "..."}}).  If the hook
goes away before its result, what it waited for is called off (a post-dump
hook that dies makes criu resume the process: the dump is aborted).
"""

from __future__ import annotations

import json
from io import BytesIO
from typing import Any

from twisted.internet.interfaces import IReactorTime
from twisted.logger import Logger
from twisted.python.failure import Failure
from twisted.web import http, resource, server

from twisted_criu.errors import HookRefused, SessionBusy
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import ISessionControl
from twisted_criu.views import SessionView


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


def _linkJSON(control: ISessionControl) -> dict[str, Any] | None:
    """The link's rate limit and achieved rate (L{None}: no C{--rate-limit})."""
    link = control.linkView()
    return None if link is None else link.toJSON()


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
                "store": self.control.storeView().toJSON(),
                "link": _linkJSON(self.control),
                "sessions": [s.toJSON(withImages=False) for s in self.control.listSessions()],
            },
        )


class _HookResource(resource.Resource):
    isLeaf = True
    log = Logger()

    def __init__(self, control: ISessionControl) -> None:
        super().__init__()
        self.control = control

    def render_POST(self, request: server.Request) -> bytes | int:
        action = (request.postpath or [b""])[0].decode("utf-8", "replace")
        request.setHeader(b"content-type", b"application/x-ndjson")
        request.channel.setTimeout(None)  # the hook waits as long as the work moves

        def line(value: dict[str, Any]) -> None:
            if not finished:
                request.write(json.dumps(value).encode() + b"\n")

        finished: list[bool] = []
        working = self.control.hookAction(action, lambda text: line({"progress": text}))

        def done(result: dict[str, Any]) -> None:
            line(result)
            finished.append(True)
            request.finish()

        def failed(reason: Failure) -> None:
            if finished:
                return
            if not reason.check(HookRefused):
                self.log.failure("the hook's {action} failed", reason, action=action)
            line({"ok": False, "error": reason.getErrorMessage()})
            finished.append(True)
            request.finish()

        def gone(reason: Failure) -> None:
            if not finished:
                finished.append(True)
                self.log.warn("twisted-criu-hook went away during {action}", action=action)
                working.cancel()

        request.notifyFinish().addErrback(gone)
        working.addCallbacks(done, failed)
        return server.NOT_DONE_YET


#: The control API takes no request body: a request announcing or sending
#: more than this is dropped before anything is stored.
MAX_REQUEST_BODY = 4096


class _ControlRequest(server.Request):
    """A request whose body is kept in memory and bounded (never spooled to a file)."""

    log = Logger()
    _refused = False

    def gotLength(self, length: int | None) -> None:
        self._body = BytesIO()
        self.content = self._body  # type: ignore[assignment]  # Twisted's stub says None
        if length is not None and length > MAX_REQUEST_BODY:
            self._refuse(length)

    def handleContentChunk(self, data: bytes) -> None:
        if self._refused:  # the rest of the read that brought the headers
            return
        size = self._body.tell() + len(data)
        if size > MAX_REQUEST_BODY:
            self._refuse(size)
            return
        self._body.write(data)

    def process(self) -> None:
        if self._refused:  # its whole body came in the read that refused it
            return
        super().process()

    def _refuse(self, size: int) -> None:
        self._refused = True
        self.log.warn(
            "control request with a body of {size} bytes (at most {limit}) dropped",
            size=size,
            limit=MAX_REQUEST_BODY,
        )
        transport: Any = self.channel.transport
        transport.abortConnection()


def controlSite(
    control: ISessionControl, timeout: float = 60.0, reactor: IReactorTime | None = None
) -> server.Site:
    """
    The HTTP site of a daemon's control endpoint.  A connection silent for
    C{timeout} seconds is closed.
    """
    root = resource.Resource()
    root.putChild(b"sessions", _SessionsResource(control))
    root.putChild(b"hook", _HookResource(control))
    site = server.Site(root, requestFactory=_ControlRequest, timeout=timeout, reactor=reactor)
    site.displayTracebacks = False
    site.noisy = False
    site.log = lambda request: None  # type: ignore[method-assign]  # no access log
    return site
