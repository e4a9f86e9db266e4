"""
L{twisted_criu.daemons.systemd}: UNIX sockets inherited from systemd are
served as systemd made them, and C{Type=notify} readiness.
"""

from __future__ import annotations

import os
import socket
import stat
from typing import Any

from twisted.internet import error, reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import AdoptedStreamServerEndpoint, TCP4ServerEndpoint
from twisted.internet.protocol import Factory, Protocol
from twisted.internet.testing import EventLoggingObserver
from twisted.logger import LogLevel, globalLogPublisher
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_criu.daemons.endpoints import ObservedServerEndpoint
from twisted_criu.daemons.extras import _ReadinessService
from twisted_criu.daemons.systemd import InheritedUNIXServerEndpoint, keepSocketFile, notify

from .helpers import inThread, isClosed, socketDirectory


class _Accepted(Protocol):
    def connectionMade(self) -> None:
        assert isinstance(self.factory, _AcceptFactory) and self.transport is not None
        self.factory.accepted.callback(None)
        self.transport.loseConnection()


class _AcceptFactory(Factory):
    protocol = _Accepted

    def __init__(self) -> None:
        self.accepted: Deferred[None] = Deferred()


def listeningSocket(path: str, mode: int) -> int:
    """A listening UNIX socket bound at C{path} with C{mode}, as systemd passes one: its descriptor."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.bind(path)
    os.chmod(path, mode)
    sock.listen(5)
    return sock.detach()


def connect(path: str) -> None:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
        s.settimeout(10)
        s.connect(path)
        s.recv(1)  # until the port closes it


class InheritedUNIXSocketTests(TestCase):
    """What a daemon's listener does with C{systemd:domain=UNIX:index=N}."""

    timeout = 30

    @inlineCallbacks
    def test_socketFileKeepsModeAndStays(self) -> Any:
        """
        Listening on an inherited socket serves it without making its file
        world-writable, and stopping leaves the file where systemd made it
        (Twisted's own adoption chmods it to 0666 and removes it).
        """
        path = os.path.join(socketDirectory(self), "img-cache.sock")
        fd = listeningSocket(path, 0o600)
        endpoint = ObservedServerEndpoint(AdoptedStreamServerEndpoint(reactor, fd, socket.AF_UNIX))
        factory = _AcceptFactory()
        port = yield endpoint.listen(factory)
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)
        self.assertTrue(isClosed(fd), "the inherited descriptor is duplicated, then closed")
        connecting = inThread(connect, path)
        yield factory.accepted
        yield connecting
        yield port.stopListening()
        self.assertTrue(stat.S_ISSOCK(os.stat(path).st_mode), "the socket file was removed")
        self.assertEqual(stat.S_IMODE(os.stat(path).st_mode), 0o600)

    @inlineCallbacks
    def test_listensOnce(self) -> Any:
        path = os.path.join(socketDirectory(self), "s.sock")
        endpoint = InheritedUNIXServerEndpoint(reactor, listeningSocket(path, 0o600))
        port = yield endpoint.listen(Factory.forProtocol(Protocol))
        self.addCleanup(port.stopListening)
        yield self.assertFailure(endpoint.listen(Factory.forProtocol(Protocol)), error.AlreadyListened)


class KeepSocketFileTests(SynchronousTestCase):
    def test_onlyInheritedUNIXSockets(self) -> None:
        """Other endpoints, inherited TCP sockets among them, are left as they are."""
        tcp = TCP4ServerEndpoint(reactor, 0)
        self.assertIs(keepSocketFile(tcp), tcp)
        inet = AdoptedStreamServerEndpoint(reactor, 3, socket.AF_INET)
        self.assertIs(keepSocketFile(inet), inet)
        unix = keepSocketFile(AdoptedStreamServerEndpoint(reactor, 7, socket.AF_UNIX))
        self.assertIsInstance(unix, InheritedUNIXServerEndpoint)
        self.assertEqual(unix.fileno, 7)  # type: ignore[attr-defined]


class NotifyTests(SynchronousTestCase):
    def notifySocket(self, address: str) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.addCleanup(sock.close)
        sock.bind(address)
        sock.settimeout(5)
        return sock

    def test_path(self) -> None:
        path = os.path.join(socketDirectory(self), "notify")
        sock = self.notifySocket(path)
        self.assertTrue(notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(sock.recv(100), b"READY=1")

    def test_abstract(self) -> None:
        """C{@name} is the abstract socket C{\\0name}."""
        name = f"twisted-criu-test-{os.getpid()}-{id(self)}"
        sock = self.notifySocket("\0" + name)
        self.assertTrue(notify("STOPPING=1", {"NOTIFY_SOCKET": "@" + name}))
        self.assertEqual(sock.recv(100), b"STOPPING=1")

    def test_notUnderSystemd(self) -> None:
        self.assertFalse(notify("READY=1", {}))
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": ""}))

    def test_failureLogged(self) -> None:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        path = os.path.join(socketDirectory(self), "nobody-here")
        self.assertFalse(notify("READY=1", {"NOTIFY_SOCKET": path}))
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["log_level"], LogLevel.warn)
        self.assertIn("No such file", events[0]["why"])

    def test_daemonReadyAndStopping(self) -> None:
        """A daemon says READY=1 once it listens everywhere, STOPPING=1 when it stops."""
        path = os.path.join(socketDirectory(self), "notify")
        sock = self.notifySocket(path)
        os.environ["NOTIFY_SOCKET"] = path
        self.addCleanup(os.environ.pop, "NOTIFY_SOCKET", None)
        readiness = _ReadinessService([], None, None)
        readiness.startService()
        self.assertEqual(sock.recv(100), b"READY=1")
        readiness.stopService()
        self.assertEqual(sock.recv(100), b"STOPPING=1")
