"""
Tests for L{twisted_criu.daemons.control}: the control API's connections
are bounded (a silent one is closed, a request body is never spooled).  What
the API says about sessions is tested end to end in L{tests.test_chains}.
"""

from __future__ import annotations

from typing import Any, Callable

from twisted.internet.defer import Deferred, fail
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase
from twisted.web import http
from zope.interface import implementer

from twisted_criu.daemons.control import MAX_REQUEST_BODY, controlSite
from twisted_criu.errors import HookRefused
from twisted_criu.interfaces import ISessionControl, IStoredImage
from twisted_criu.keys import ImageKey
from twisted_criu.views import SessionView, StoreView


class _SocketLikeAbort(StringTransport):
    """Aborts as a socket does: nothing changes until the reactor's next turn."""

    aborted = False

    def abortConnection(self) -> None:
        self.aborted = True


@implementer(ISessionControl)
class _NoSessions:
    role = "cache"

    def listSessions(self) -> list[SessionView]:
        return []

    def storeView(self) -> StoreView:
        return StoreView(0, 0, None)

    def linkView(self) -> None:
        return None

    def sessionImage(self, sessionId: str, key: ImageKey) -> IStoredImage | None:
        return None

    def dropSession(self, sessionId: str) -> SessionView:
        raise KeyError(sessionId)

    def hookAction(self, action: str, report: Callable[[str], None]) -> Deferred[dict[str, Any]]:
        return fail(HookRefused(f"nothing to do at {action}"))


class ControlConnectionTests(SynchronousTestCase):
    TIMEOUT = 5.0

    def setUp(self) -> None:
        self.clock = Clock()
        site = controlSite(_NoSessions(), timeout=self.TIMEOUT, reactor=self.clock)
        self.protocol: Any = site.buildProtocol(None)
        self.transport = StringTransport()
        self.protocol.makeConnection(self.transport)

        def noSpooling(*args: Any, **kwargs: Any) -> Any:
            raise AssertionError("a request body was spooled to a file")

        self.patch(http.tempfile, "TemporaryFile", noSpooling)

    def test_answers(self) -> None:
        self.protocol.dataReceived(b"GET /sessions HTTP/1.1\r\nHost: x\r\n\r\n")
        self.assertIn(b"200 OK", self.transport.value())
        self.assertIn(b'"role": "cache"', self.transport.value())

    def test_silentConnectionClosed(self) -> None:
        """A control connection that says nothing is closed after the client timeout."""
        self.clock.advance(self.TIMEOUT - 1)
        self.assertFalse(self.transport.disconnecting)
        self.clock.advance(2)
        self.assertTrue(self.transport.disconnecting)

    def test_announcedBodyTooLarge(self) -> None:
        self.protocol.dataReceived(
            b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 1000
        )
        self.assertTrue(self.transport.disconnected)
        self.assertEqual(self.transport.value(), b"")

    def test_announcedBodyTooLargeLoggedOnce(self) -> None:
        """
        One warning per refused request, also for the body bytes that came
        in the same read as its headers (a real socket's C{abortConnection}
        leaves C{disconnecting} false, so the parser goes on with them).
        """
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        transport = _SocketLikeAbort()
        self.protocol.makeConnection(transport)
        self.protocol.dataReceived(
            b"POST /sessions HTTP/1.1\r\nHost: x\r\nContent-Length: 100000000\r\n\r\n" + b"x" * 5000
        )
        self.assertTrue(transport.aborted)
        warnings = [e["log_format"].format(**e) for e in events if e["log_level"] >= LogLevel.warn]
        self.assertEqual(warnings, ["control request with a body of 100000000 bytes (at most 4096) dropped"])

    def test_refusedRequestNotServed(self) -> None:
        """A request refused for its body is not served, even when all of it came in one read."""
        control = _NoSessions()
        dropped: list[str] = []
        control.dropSession = dropped.append  # type: ignore[method-assign, assignment]
        protocol: Any = controlSite(control, timeout=self.TIMEOUT, reactor=self.clock).buildProtocol(None)
        transport = _SocketLikeAbort()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"DELETE /sessions/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 5000\r\n\r\n" + b"x" * 5000)
        self.assertTrue(transport.aborted)
        self.assertEqual(dropped, [])
        self.assertEqual(transport.value(), b"")

    def test_chunkedBodyTooLarge(self) -> None:
        chunk = b"x" * (MAX_REQUEST_BODY + 1)
        self.protocol.dataReceived(
            b"POST /sessions HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
            + b"%x\r\n" % len(chunk)
            + chunk
            + b"\r\n"
        )
        self.assertTrue(self.transport.disconnected)

    def test_smallBodyTolerated(self) -> None:
        self.protocol.dataReceived(b"DELETE /sessions/1 HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n\r\n{}")
        self.assertIn(b"404 Not Found", self.transport.value())
        self.assertFalse(self.transport.disconnected)
