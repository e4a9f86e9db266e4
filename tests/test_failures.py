"""
Peers that stall, vanish or pass the wrong thing: each gets a clear logged
error, only its own connection suffers, and nothing partial is served.
"""

from __future__ import annotations

import os
import socket
import tempfile
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.task import Clock
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageProtocol
from twisted_criu.criu.stream import StreamCaptureProtocol
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.sender import RemoteSender
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeLocalService, FakeSink

from .helpers import Migration, inThread, isClosed, waitFor


def _errors(events: Any, level: LogLevel = LogLevel.error) -> list[str]:
    return [e["log_format"].format(**e) for e in events if e["log_level"] >= level]


class SilentClientTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = FakeLocalService()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_localClientThatNeverSpeaks(self) -> None:
        protocol = LocalImageProtocol(self.service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(b"\x10\x00")  # half a length prefix, then nothing
        self.service.reactor.advance(self.service.clientTimeout - 1)
        self.assertFalse(transport.disconnected)
        self.service.reactor.advance(1)
        self.assertTrue(transport.disconnected)
        self.assertIn("no request within 30.0 s", _errors(self.events)[0])

    def test_noTimeoutOnceTheRequestArrived(self) -> None:
        """A read may wait for its image far longer than the client timeout."""
        protocol = LocalImageProtocol(self.service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.LocalRequest("a.img", "s", 0).toBytes())
        self.service.reactor.advance(3600)
        self.assertFalse(transport.disconnected)
        self.assertEqual(self.service.registry.waiting, 1)

    def test_streamClientThatNeverSpeaks(self) -> None:
        protocol = StreamCaptureProtocol(self.service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        self.service.reactor.advance(self.service.clientTimeout)
        self.assertTrue(transport.disconnected)

    def test_notAPipe(self) -> None:
        """A regular file or a socket passed as the image pipe is refused."""
        for make in (lambda: os.open(tempfile.mktemp(), os.O_RDWR | os.O_CREAT), lambda: socket.socket().detach()):
            protocol = LocalImageProtocol(self.service)
            transport = StringTransport()
            protocol.makeConnection(transport)
            fd = make()
            protocol.dataReceived(wire.LocalRequest("a.img", "s", 1).toBytes())
            protocol.fileDescriptorReceived(fd)
            self.assertTrue(transport.disconnected)
            self.assertTrue(isClosed(fd))
            self.assertEqual(self.service.registry.writesInProgress, 0)
        self.assertIn("is not a pipe", _errors(self.events)[-1])


class LinkStallTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def test_cacheDropsALinkStalledInsideAnImage(self) -> None:
        sink = FakeSink()
        receiver = RemoteReceiver(sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(wire.RemoteHeader("a.img", "s", 1, 10).toBytes() + b"0123456789")
        sink.reactor.advance(3600)  # silence between images is fine
        self.assertFalse(transport.disconnected)
        receiver.dataReceived(wire.RemoteHeader("b.img", "s", 1, 10).toBytes() + b"12345")
        sink.reactor.advance(sink.linkTimeout - 1)
        receiver.dataReceived(b"6")  # progress resets the clock
        sink.reactor.advance(sink.linkTimeout - 1)
        self.assertFalse(transport.disconnected)
        sink.reactor.advance(1)
        self.assertTrue(transport.disconnected)
        self.assertIn("no bytes from the proxy for 10.0 s", _errors(self.events)[0])
        receiver.connectionLost(Failure(ConnectionDone()))
        self.assertIsNone(sink.registry.get(("s", "b.img")))
        self.assertIsNotNone(sink.registry.get(("s", "a.img")))

    def test_proxyDropsALinkThatMakesNoProgress(self) -> None:
        clock = Clock()
        writer = MemoryStore().newWriter()
        writer.write(b"x" * (4 << 20))
        image = writer.commit()
        sender = RemoteSender(FakeLinkSource(image), clock=clock, stallTimeout=5.0)
        transport = StringTransport()
        sender.makeConnection(transport)
        sender.enqueue(("s", "pages-1.img"))
        transport.producer.resumeProducing()  # type: ignore[attr-defined]
        clock.advance(5)
        self.assertFalse(transport.disconnected)  # the first chunk went out
        transport.producer.resumeProducing()  # type: ignore[attr-defined]
        clock.advance(5)
        self.assertFalse(transport.disconnected)
        clock.advance(5)  # the cache stopped reading: no progress for 5 s
        self.assertTrue(transport.disconnected)
        self.assertIn("no progress forwarding s/pages-1.img for 5.0 s", _errors(self.events)[0])


class ProxyVanishesTests(TestCase):
    timeout = 30

    @inlineCallbacks
    def test_waitingReaderGetsENOENT(self) -> Any:
        """The proxy dies mid-image and never returns: no truncated image, the session is aborted."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        m = Migration(self)
        port = yield m.startCache()
        assert m.cache is not None
        m.cache.linkTimeout = 0.5
        read = inThread(m.restore.read, "snap1", "pages-1.img")

        def dieMidImage() -> None:
            header = wire.RemoteHeader(
                "pages-1.img", "snap1", 1, 1000, linkVersion=wire.LINK_EXTENSION_VERSION, session="t1"
            )
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as c:
                c.sendall(header.toBytes() + b"x" * 400)

        yield inThread(dieMidImage)
        self.assertIsNone((yield read))
        logged = _errors(events, LogLevel.warn)
        self.assertTrue(any("snap1/pages-1.img: 400 of 1000 bytes arrived" in e for e in logged), logged)
        self.assertTrue(any("did not come back within 0.5 s" in e for e in logged), logged)
        self.assertEqual(m.cache.sessions, {})

    @inlineCallbacks
    def test_cProxyLinkBrokenAbortsAtOnce(self) -> Any:
        """CRIU's C proxy never comes back: a broken link aborts its session at once."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        m = Migration(self)
        port = yield m.startCache()
        assert m.cache is not None

        def dieMidImage() -> None:
            with socket.create_connection(("127.0.0.1", port.getHost().port), timeout=10) as c:
                c.sendall(wire.RemoteHeader("pages-1.img", "snap1", 1, 1000).toBytes() + b"x" * 400)

        yield inThread(dieMidImage)
        yield waitFor(
            lambda: any("the link to CRIU's C proxy broke" in e for e in _errors(events, LogLevel.warn))
        )
        self.assertEqual(m.cache.sessions, {})
        self.assertIsNone((yield inThread(m.restore.read, "snap1", "pages-1.img")))


    @inlineCallbacks
    def test_proxyComesBackInTime(self) -> Any:
        """A proxy that reconnects and resends within the timeout saves the restore."""
        m = Migration(self)
        port = yield m.startCache()
        assert m.cache is not None
        m.cache.linkTimeout = 5
        read = inThread(m.restore.read, "snap1", "pages-1.img")

        def dieThenResend() -> None:
            address = ("127.0.0.1", port.getHost().port)
            with socket.create_connection(address, timeout=10) as c:
                c.sendall(wire.RemoteHeader("pages-1.img", "snap1", 1, 1000).toBytes() + b"x" * 400)
            with socket.create_connection(address, timeout=10) as c:
                c.sendall(wire.RemoteHeader("pages-1.img", "snap1", 1, 1000).toBytes() + b"y" * 1000)

        yield inThread(dieThenResend)
        self.assertEqual((yield read), b"y" * 1000)
