# -*- test-case-name: tests.test_chains -*-
"""
The daemons' control API from the command line: L{ControlClient} talks to
one daemon (C{--from}), and C{twisted-criu ls}, C{drop} and C{pull} use it.
"""

from __future__ import annotations

import json
import os
from typing import Any
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.internet.defer import Deferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.error import ConnectError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import Agent, ResponseDone, readBody
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.cli.common import AnyOrderOptions, CommandError
from twisted_criu.errors import ProtocolError
from twisted_criu.progress import formatBytes

#: The control sockets the daemons create in their images directory.
CONTROL_SOCKETS = ("cache-control.sock", "proxy-control.sock")


def controlEndpoint(where: str) -> str:
    """
    A client endpoint string for C{--from}: an endpoint string as given, a
    socket's path, or an images directory holding a control socket.
    """
    if ":" in where and not os.path.exists(where):
        return where
    path = where
    if os.path.isdir(where):
        for name in CONTROL_SOCKETS:
            candidate = os.path.join(where, name)
            if os.path.exists(candidate):
                path = candidate
                break
        else:
            raise CommandError(
                f"no control socket ({' or '.join(CONTROL_SOCKETS)}) in {where}:"
                " is a daemon running with -D there?"
            )
    elif not os.path.exists(where):
        raise CommandError(f"{where}: no such socket or directory")
    return f"unix:path={quoteStringArgument(os.path.abspath(path))}"


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """Every request goes to the daemon's control endpoint."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint


class ControlClient:
    """Talks to one daemon's control API."""

    def __init__(self, reactor: Any, where: str) -> None:
        self.where = where
        endpoint = clientFromString(reactor, controlEndpoint(where))
        self.agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint))

    def _request(self, method: bytes, path: str) -> Deferred[IResponse]:
        d: Deferred[IResponse] = self.agent.request(method, f"http://twisted-criu{path}".encode())

        def unreachable(reason: Failure) -> Failure:
            if reason.check(ConnectError):
                raise CommandError(f"cannot reach the daemon at {self.where}: {reason.getErrorMessage()}")
            return reason

        return d.addErrback(unreachable)

    @defer.inlineCallbacks
    def json(self, method: bytes, path: str) -> Any:
        response = yield self._request(method, path)
        body = yield readBody(response)
        try:
            value = json.loads(body)
        except ValueError:
            raise CommandError(f"{self.where} answered {response.code} with something that is not JSON")
        if response.code >= 400:
            raise CommandError(value.get("error", f"HTTP {response.code}"))
        return value

    def sessions(self) -> Deferred[Any]:
        return self.json(b"GET", "/sessions")

    def session(self, sessionId: str) -> Deferred[Any]:
        return self.json(b"GET", f"/sessions/{quote(sessionId, safe='')}")

    def drop(self, sessionId: str) -> Deferred[Any]:
        return self.json(b"DELETE", f"/sessions/{quote(sessionId, safe='')}")

    @defer.inlineCallbacks
    def download(self, sessionId: str, snapshotId: str, name: str, path: str, size: int) -> Any:
        """Write one image to C{path} (mode 0600), streaming it."""
        query = urlencode({"snapshot": snapshotId, "name": name})
        response = yield self._request(b"GET", f"/sessions/{quote(sessionId, safe='')}/image?{query}")
        if response.code != 200:
            body = yield readBody(response)
            raise CommandError(f"{name}: {body.decode('utf-8', 'replace').strip()}")
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        sink = _FileSink(fd)
        response.deliverBody(sink)
        try:
            written = yield sink.done
        except BaseException:
            os.unlink(path)
            raise
        if written != size:
            os.unlink(path)
            raise CommandError(f"{name}: got {written} of {size} bytes")
        return written


class _FileSink(Protocol):
    """Writes a response body into a file descriptor, then closes it."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.written = 0
        self.done: Deferred[int] = Deferred()

    def dataReceived(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(data)

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        os.close(self.fd)
        if reason.check(ResponseDone):
            self.done.callback(self.written)
        else:
            self.done.errback(CommandError(f"download broke off: {reason.getErrorMessage()}"))


# -- ls ------------------------------------------------------------------------


class LsOptions(AnyOrderOptions):
    synopsis = "[--from WHERE] [-l] [--json]"
    description = "List the sessions a daemon holds (and with -l their images)."
    optParameters = [["from", "f", ".", "The daemon: its images directory, control socket, or endpoint."]]
    optFlags = [["long", "l", "Also list every image."], ["json", None, "Print the daemon's JSON."]]


@defer.inlineCallbacks
def ls(reactor: Any, options: LsOptions, out: Any) -> Any:
    client = ControlClient(reactor, options["from"])
    listing = yield client.sessions()
    if options["long"]:
        details = []
        for session in listing["sessions"]:
            details.append((yield client.session(session["id"])))
        listing["sessions"] = details
    if options["json"]:
        out.write(json.dumps(listing, indent=1) + "\n")
        return
    sessions = listing["sessions"]
    out.write(f"criu-{listing['role']} at {options['from']}: {len(sessions)} session(s)\n")
    for s in sessions:
        ids = ", ".join(i or '""' for i in s["snapshot_ids"]) or "-"
        out.write(
            f"  session {s['id']:>4}  {s['state']:<24} {s['image_count']:>5} images"
            f" {formatBytes(s['bytes']):>10}  snapshots: {ids}\n"
        )
        for image in s.get("images", []):
            where = f"{image['snapshot_id']}/" if image["snapshot_id"] else ""
            out.write(f"      {image['size']:>14,}  {where}{image['name']}\n")


# -- drop ----------------------------------------------------------------------


class DropOptions(AnyOrderOptions):
    synopsis = "[--from WHERE] SESSION"
    description = "Drop a session's images (a kept one, or the current one when idle)."
    optParameters = [["from", "f", ".", "The daemon: its images directory, control socket, or endpoint."]]

    def parseArgs(self, session: str) -> None:  # type: ignore[override]
        self["session"] = session


@defer.inlineCallbacks
def drop(reactor: Any, options: DropOptions, out: Any) -> Any:
    result = yield ControlClient(reactor, options["from"]).drop(options["session"])
    dropped = result["dropped"]
    out.write(
        f"dropped session {dropped['id']}: {dropped['image_count']} images,"
        f" {formatBytes(dropped['bytes'])}\n"
    )


# -- pull ----------------------------------------------------------------------


class PullOptions(AnyOrderOptions):
    synopsis = "[--from WHERE] [--session ID] [--snapshot-id ID] DIR"
    description = (
        "Write a session's images into DIR, ready for `criu restore -D DIR`. "
        "The chosen snapshot goes to DIR, its parent snapshot (if the session "
        "is a chain of dumps) to DIR/parent, and so on."
    )
    optParameters = [
        ["from", "f", ".", "The daemon: its images directory, control socket, or endpoint."],
        ["session", "s", None, "The session [default: the current one if it holds images, else the last kept one]."],
        ["snapshot-id", None, None, "The snapshot to restore [default: the last of the session's chain]."],
    ]
    optFlags = [["force", None, "Overwrite image files that exist in DIR."]]

    def parseArgs(self, directory: str) -> None:  # type: ignore[override]
        self["directory"] = directory


def _pickSession(sessions: list[dict[str, Any]], wanted: str | None) -> dict[str, Any]:
    if wanted is not None:
        for session in sessions:
            if session["id"] == wanted:
                return session
        raise CommandError(f"no session {wanted}")
    candidates = [s for s in reversed(sessions) if s["current"] and s["image_count"]]
    candidates += [s for s in reversed(sessions) if s["kept"]]
    if not candidates:
        raise CommandError("the daemon holds no images")
    return candidates[0]


@defer.inlineCallbacks
def pull(reactor: Any, options: PullOptions, out: Any) -> Any:
    client = ControlClient(reactor, options["from"])
    listing = yield client.sessions()
    chosen = _pickSession(listing["sessions"], options["session"])
    session = yield client.session(chosen["id"])
    chain: list[str] = session["snapshot_ids"]
    snapshot = options["snapshot-id"]
    if snapshot is None:
        snapshot = chain[-1] if chain else ""
    elif snapshot not in chain:
        raise CommandError(f"session {session['id']} has no snapshot {snapshot!r} (it has {chain})")
    # The chosen snapshot, then its parents: DIR, DIR/parent, DIR/parent/parent...
    lineage = [snapshot]
    if snapshot in chain:
        lineage = list(reversed(chain[: chain.index(snapshot) + 1]))
    byName: dict[str, list[dict[str, Any]]] = {}
    for image in session["images"]:
        byName.setdefault(image["snapshot_id"], []).append(image)
    directory = options["directory"]
    total = count = 0
    for depth, snapshotId in enumerate(lineage):
        target = os.path.join(directory, *(["parent"] * depth))
        images = [
            i for i in byName.get(snapshotId, []) if not (i["snapshot_id"] == "" and i["name"] == wire.PARENT_IMAGE and chain)
        ]
        if not images:
            raise CommandError(f"session {session['id']} holds no images of snapshot {snapshotId!r}")
        os.makedirs(target, mode=0o700, exist_ok=True)
        for image in images:
            try:
                wire.checkName(image["name"])  # never a path, whatever the daemon says
            except ProtocolError as e:
                raise CommandError(f"refusing an image name from the daemon: {e}")
            path = os.path.join(target, image["name"])
            if os.path.lexists(path) and not options["force"]:
                raise CommandError(f"{path} exists (use --force to overwrite)")
            yield client.download(session["id"], snapshotId, image["name"], path, image["size"])
            total += image["size"]
            count += 1
        label = repr(snapshotId) if snapshotId else "(stream images)"
        out.write(f"  {target}: snapshot {label}, {len(images)} images\n")
    out.write(f"pulled session {session['id']}: {count} images, {formatBytes(total)} into {directory}\n")
