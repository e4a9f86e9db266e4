# -*- test-case-name: tests.test_chains,tests.test_cli_errors -*-
"""
L{ControlClient}: a daemon's control API (HTTP on its control socket), as
C{twisted-criu ls}, C{pull} and C{drop} use it, with C{--from} turned into
an endpoint by L{controlEndpoint} and C{--timeout} kept by a watchdog.
"""

from __future__ import annotations

import json
import os
from typing import Any, Callable
from urllib.parse import quote, urlencode

from twisted.internet import defer
from twisted.internet.defer import CancelledError, Deferred
from twisted.internet.endpoints import clientFromString, quoteStringArgument
from twisted.internet.error import ConnectError, ConnectionRefusedError, DNSLookupError
from twisted.internet.interfaces import IStreamClientEndpoint
from twisted.internet.protocol import Protocol
from twisted.python.failure import Failure
from twisted.web.client import (
    Agent,
    RequestTransmissionFailed,
    ResponseDone,
    ResponseFailed,
    ResponseNeverReceived,
    readBody,
)
from twisted.web.iweb import IAgentEndpointFactory, IResponse
from zope.interface import implementer

from twisted_criu.cli.common import CommandError, Watchdog
from twisted_criu.cli.reach import whyUnreachable

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
                f"--from {where}: no control socket ({' or '.join(CONTROL_SOCKETS)}) there:"
                " is a daemon running with -D there?"
            )
    elif not os.path.exists(where):
        raise CommandError(
            f"--from {where}: no such socket or directory (give the daemon's -D directory,"
            " its control socket, or an endpoint)"
        )
    return f"unix:path={quoteStringArgument(os.path.abspath(path))}"


@implementer(IAgentEndpointFactory)
class _OneEndpoint:
    """Every request goes to the daemon's control endpoint."""

    def __init__(self, endpoint: IStreamClientEndpoint) -> None:
        self.endpoint = endpoint

    def endpointForURI(self, uri: Any) -> IStreamClientEndpoint:
        return self.endpoint


class ControlClient:
    """
    Talks to one daemon's control API.  With a C{timeout}, every request
    fails once nothing came from the daemon for that many seconds.
    """

    def __init__(self, reactor: Any, where: str, timeout: float | None = None) -> None:
        self.where = where
        endpoint = clientFromString(reactor, controlEndpoint(where))
        self.agent = Agent.usingEndpointFactory(reactor, _OneEndpoint(endpoint))
        self.timeout = timeout
        self._pending: set[Deferred[Any]] = set()
        self._timedOut = False
        self._watchdog: Watchdog | None = None
        if timeout is not None:
            self._watchdog = Watchdog(reactor, timeout, self._expired)
            self._watchdog.start()

    def close(self) -> None:
        """The command is done with the daemon: stop the watchdog."""
        if self._watchdog is not None:
            self._watchdog.stop()

    def moved(self) -> None:
        """Something came from the daemon: it is alive."""
        if self._watchdog is not None:
            self._watchdog.moved()

    def _expired(self) -> None:
        self._timedOut = True
        for d in list(self._pending):
            d.cancel()

    def _track(self, d: Deferred[Any]) -> Deferred[Any]:
        """Cancel C{d} if the daemon stops answering; say why it failed."""
        self._pending.add(d)

        def done(result: Any) -> Any:
            self._pending.discard(d)
            self.moved()
            return result

        return d.addBoth(done).addErrback(self._explain)

    def _explain(self, reason: Failure) -> Failure:
        if self._timedOut:
            raise CommandError(
                f"the daemon at {self.where} did not answer for {self.timeout:g} s (--timeout)"
            )
        if reason.check(CommandError, CancelledError):
            return reason
        if any(r.check(CancelledError) for r in getattr(reason.value, "reasons", ())):
            raise CancelledError()  # the command was interrupted
        if reason.check(ConnectError, DNSLookupError):
            hint = " (is the daemon still running?)" if reason.check(ConnectionRefusedError) else ""
            raise CommandError(f"cannot reach the daemon at {self.where}: {whyUnreachable(reason)}{hint}")
        if reason.check(ResponseNeverReceived, RequestTransmissionFailed, ResponseFailed):
            raise CommandError(
                f"{self.where} closed the connection without an answer:"
                " is it a twisted-criu daemon's control endpoint?"
            )
        return reason

    def _request(self, method: bytes, path: str) -> Deferred[IResponse]:
        return self._track(self.agent.request(method, f"http://twisted-criu{path}".encode()))

    @defer.inlineCallbacks
    def json(self, method: bytes, path: str) -> Any:
        response = yield self._request(method, path)
        body = yield self._track(readBody(response))
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
    def download(
        self,
        sessionId: str,
        snapshotId: str,
        name: str,
        path: str,
        size: int,
        progress: Callable[[int], None] = lambda count: None,
    ) -> Any:
        """Write one image to C{path} (mode 0600), streaming it; C{progress} hears of each chunk."""
        query = urlencode({"snapshot": snapshotId, "name": name})
        response = yield self._request(b"GET", f"/sessions/{quote(sessionId, safe='')}/image?{query}")
        if response.code != 200:
            body = yield self._track(readBody(response))
            raise CommandError(f"{name}: {body.decode('utf-8', 'replace').strip()}")
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        except OSError as e:
            raise CommandError(f"cannot write {path}: {e.strerror}") from None

        def chunk(count: int) -> None:
            self.moved()
            progress(count)

        sink = _FileSink(fd, chunk)
        response.deliverBody(sink)
        try:
            written = yield self._track(sink.done)
        except BaseException:
            os.unlink(path)
            raise
        if written != size:
            os.unlink(path)
            raise CommandError(f"{name}: got {written} of {size} bytes")
        return written


class _FileSink(Protocol):
    """Writes a response body into a file descriptor, then closes it."""

    def __init__(self, fd: int, chunk: Callable[[int], None]) -> None:
        self.fd = fd
        self.written = 0
        self._chunk = chunk
        self.done: Deferred[int] = Deferred(self._cancel)

    def _cancel(self, d: Deferred[int]) -> None:
        transport: Any = self.transport
        if transport is not None:
            transport.stopProducing()

    def dataReceived(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self.fd, view) :]
        self.written += len(data)
        self._chunk(len(data))

    def connectionLost(self, reason: Failure = Failure(ResponseDone())) -> None:
        os.close(self.fd)
        if self.done.called:
            return  # cancelled
        if reason.check(ResponseDone):
            self.done.callback(self.written)
        else:
            self.done.errback(CommandError(f"download broke off: {reason.getErrorMessage()}"))
