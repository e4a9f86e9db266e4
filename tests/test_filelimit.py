"""
Descriptors run out (issue 15, item 5): wherever a daemon needs one and
gets EMFILE (a memfd for an image, a pipe criu passes, a reader to forward
or serve an image), the image fails loudly, in one log line that names it
and the limit, and so does the session it belongs to; nothing leaks.
End to end (both daemons, the accept of criu's connection):
L{tests.test_filelimit_daemons}.
"""

from __future__ import annotations

import errno
import os
import resource
import socket
from typing import Any

from twisted.internet import reactor
from twisted.internet.defer import Deferred, inlineCallbacks
from twisted.internet.endpoints import serverFromString
from twisted.internet.error import ConnectError, ConnectionDone
from twisted.internet.task import deferLater
from twisted.internet.testing import EventLoggingObserver, MemoryReactorClock, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from twisted_criu import filelimit, wire
from twisted_criu.criu.images import LocalImageFactory, LocalImageProtocol
from twisted_criu.criu.stream import StreamCaptureFactory
from twisted_criu.daemons.proxysession import ProxySession
from twisted_criu.interfaces import IImageReader, IStoredImage
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import SnapshotRegistry, readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import SpillStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeLocalService, FakeSink, driveProducer, pump, storedImage

from .helpers import descriptorsExhausted, isClosed, proxyFrames, socketDirectory, waitFor

KEY = ("snap1", "pages-1.img")


def emfile() -> OSError:
    return OSError(errno.EMFILE, os.strerror(errno.EMFILE))


def noMemfd() -> int:
    raise emfile()


@implementer(IStoredImage)
class _Unopenable:
    """A stored image that cannot be read: no descriptor left."""

    size = 3

    def open(self) -> IImageReader:
        raise emfile()

    def release(self) -> None:
        pass


def limitText() -> str:
    """What every such log line says: the limit that ran out."""
    return f"too many open files (RLIMIT_NOFILE {resource.getrlimit(resource.RLIMIT_NOFILE)[0]})"


#: What every such log line says, whatever the limit was then.
EXHAUSTED = r"too many open files \(RLIMIT_NOFILE \d+\)"


def openDescriptors() -> int:
    return len(os.listdir("/proc/self/fd"))


class _Logged:
    """Collects the error lines logged during a test."""

    def watchLog(self: Any) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)

    def errors(self: Any) -> list[str]:
        return [e["log_format"].format(**e) for e in self.events if e["log_level"] >= LogLevel.error]


class AdviceTests(SynchronousTestCase):
    def test_namesTheLimitAndWhatToDo(self) -> None:
        text = filelimit.advice(emfile())
        self.assertTrue(text.startswith(limitText()), text)
        self.assertIn("ulimit -Hn", text)

    def test_wholeSystem(self) -> None:
        self.assertIn("fs.file-max", filelimit.advice(OSError(errno.ENFILE, "Too many open files in system")))

    def test_exhausted(self) -> None:
        self.assertTrue(filelimit.exhausted(emfile()))
        self.assertTrue(filelimit.exhausted(OSError(errno.ENFILE, "")))
        self.assertTrue(filelimit.exhausted(ConnectError(errno.EMFILE, "")))  # a failed connect
        self.assertFalse(filelimit.exhausted(OSError(errno.ENOSPC, "")))
        self.assertFalse(filelimit.exhausted(None))


class StoreTests(SynchronousTestCase):
    """The spill store: no memfd, no reader descriptor."""

    def test_noMemfdGivesBackTheMemory(self) -> None:
        """A write that gets no memfd leaves the budget as it was (else it shrinks for good)."""
        store = SpillStore(1 << 20, self.mktemp())
        self.addCleanup(store.close)

        def noMemfd(name: str, flags: int = 0) -> int:
            raise emfile()

        self.patch(os, "memfd_create", noMemfd)
        writer = store.newWriter()
        error = self.assertRaises(OSError, writer.write, b"x" * 1000)
        self.assertEqual(error.errno, errno.EMFILE)
        writer.abort()
        self.assertEqual(store.inMemory, 0)

    def test_openingKeepsNoDescriptorWhenItFails(self) -> None:
        """An image of two runs (memory, then disk) whose second dup fails: the first is closed."""
        store = SpillStore(4096, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        writer.write(b"a" * 4096)
        writer.write(b"b" * 8192)  # past the budget: a spill file
        image = writer.commit()
        self.addCleanup(image.release)
        realDup, calls = os.dup, []

        def dup(fd: int) -> int:
            calls.append(fd)
            if len(calls) == 2:
                raise emfile()
            return realDup(fd)

        self.patch(os, "dup", dup)
        before = openDescriptors()
        self.assertRaises(OSError, image.open)
        self.assertEqual((len(calls), openDescriptors()), (2, before))


class RegistryTests(SynchronousTestCase):
    def test_publishedAfterReleaseIsDropped(self) -> None:
        """A write that outlives its (aborted) session keeps nothing: no memory, no memfd."""
        store = MemoryStore()
        registry = SnapshotRegistry(waitForMissing=False)
        registry.beginWrite(KEY)
        registry.release()
        registry.publish(KEY, storedImage(store, b"abc"))
        self.assertEqual((registry.get(KEY), store.inMemory, registry.writesInProgress), (None, 0, 0))


class LocalLegTests(SynchronousTestCase, _Logged):
    """criu's write on the proxy gets no memfd: the write and the dump fail."""

    def setUp(self) -> None:
        self.watchLog()

    def test_noMemfdFailsTheImageAndTheDump(self) -> None:
        service = FakeLocalService()
        store = SpillStore(1 << 20, self.mktemp())
        self.addCleanup(store.close)
        self.patch(store, "_newMemfd", noMemfd)
        service.store = store  # type: ignore[assignment]
        protocol = LocalImageProtocol(service)
        protocol.makeConnection(StringTransport())
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, writeEnd)
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], wire.O_WRONLY).toBytes())
        protocol.fileDescriptorReceived(readEnd)
        protocol.dataReceived(b"\0")
        protocol.connectionLost(Failure(ConnectionDone()))  # criu closed its socket
        os.write(writeEnd, b"x" * 1000)
        pump(service.reactor)
        self.assertTrue(isClosed(readEnd))
        self.assertRaises(BrokenPipeError, os.write, writeEnd, b"more")  # criu's next write fails
        [line] = self.errors()
        self.assertIn(f"cannot store snap1/pages-1.img: {limitText()}", line)
        self.assertEqual(service.captureFailures, ["snap1/pages-1.img could not be stored: too many open files"])
        self.assertIsNone(service.registry.get(KEY))
        self.assertEqual((service.registry.writesInProgress, service.activity.active), (0, set()))

    def test_unopenableImageFailsTheRead(self) -> None:
        """No descriptor to read a stored image: criu's read fails at once (no reply), it does not hang."""
        service = FakeLocalService()
        service.registry.publish(KEY, _Unopenable())
        protocol = LocalImageProtocol(service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], wire.O_RDONLY).toBytes())
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        [line] = self.errors()
        self.assertIn(f"cannot serve snap1/pages-1.img: {limitText()}", line)


class PassedPipeTests(TestCase, _Logged):
    """
    criu passes its pipe while the daemon has no descriptor left: the
    kernel drops it (MSG_CTRUNC).  The write fails, never taking the byte
    that carried the pipe for an inline image.
    """

    def setUp(self) -> None:
        self.watchLog()
        self.service = FakeLocalService()
        self.path = os.path.join(socketDirectory(self), "s.sock")

    @inlineCallbacks
    def listen(self, factory: Any) -> Any:
        port = yield serverFromString(reactor, f"unix:{self.path}").listen(factory)
        self.addCleanup(port.stopListening)

    def criu(self, request: bytes) -> socket.socket:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.addCleanup(sock.close)
        sock.connect(self.path)
        sock.sendall(request)
        return sock

    @inlineCallbacks
    def passWhileExhausted(self, sock: socket.socket) -> Any:
        """Pass a pipe's read end while no descriptor is left; returns its write end."""
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, writeEnd)
        with descriptorsExhausted() as fill:
            socket.send_fds(sock, [b"\0"], [readEnd])
            os.close(readEnd)  # criu's copy: the one passed is the last
            fill()
            yield waitFor(lambda: bool(self.errors()), timeout=5)
        return writeEnd

    @inlineCallbacks
    def test_remoteWrite(self) -> Any:
        yield self.listen(LocalImageFactory(self.service))
        sock = self.criu(wire.LocalRequest(KEY[1], KEY[0], wire.O_WRONLY).toBytes())
        yield waitFor(lambda: self.service.registry.writesInProgress == 1)
        writeEnd = yield self.passWhileExhausted(sock)
        sock.close()
        yield deferLater(reactor, 0.05, lambda: None)
        [line] = self.errors()
        # (The limit the line names is the one lowered to run out.)
        self.assertRegex(line, r"could not take the pipe criu passed for snap1/pages-1\.img: " + EXHAUSTED)
        self.assertRaises(BrokenPipeError, os.write, writeEnd, b"x")  # criu's write fails
        self.assertIsNone(self.service.registry.get(KEY))  # not a 1-byte inline image
        self.assertEqual(self.service.registry.writesInProgress, 0)
        self.assertEqual(len(self.service.captureFailures), 1)

    @inlineCallbacks
    def test_streamWrite(self) -> Any:
        yield self.listen(StreamCaptureFactory(self.service))
        sock = self.criu(wire.StreamRequest("pages-1.img").toBytes())
        yield deferLater(reactor, 0.05, lambda: None)
        writeEnd = yield self.passWhileExhausted(sock)
        [line] = self.errors()
        self.assertRegex(line, r"could not take the pipe criu passed for pages-1\.img: " + EXHAUSTED)
        self.assertRaises(BrokenPipeError, os.write, writeEnd, b"x")
        yield waitFor(lambda: self.service.captureFailures != [])  # the run is over: the dump failed
        self.assertEqual(self.service.finishes, [])


class ReceiverTests(SynchronousTestCase, _Logged):
    """The cache gets no memfd for an image: the session is aborted, the link closed."""

    def test_noMemfdAbortsTheSession(self) -> None:
        self.watchLog()
        sink = FakeSink()
        store = SpillStore(1 << 20, self.mktemp())
        self.addCleanup(store.close)
        self.patch(store, "_newMemfd", noMemfd)
        sink.store = store  # type: ignore[assignment]
        receiver = RemoteReceiver(sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        receiver.dataReceived(proxyFrames(("pages-1.img", b"x" * 1000), ("core.img", b"next")))
        [line] = self.errors()
        self.assertIn(f"cannot store snap1/pages-1.img: {limitText()}", line)
        self.assertTrue(line.endswith("; its session is aborted"), line)
        self.assertEqual(sink.lost, [(FakeLinkSource.sessionToken, "snap1/pages-1.img could not be stored: too many open files")])
        self.assertTrue(transport.disconnecting)
        self.assertEqual(sink.registry.keys(), [])  # nor what came after it on the link
        self.assertEqual((sink.registry.writesInProgress, sink.activity.active, store.inMemory), (0, set(), 0))
        receiver.connectionLost(Failure(ConnectionDone()))


class SenderTests(SynchronousTestCase, _Logged):
    """The proxy cannot open an image to forward it."""

    def test_theSessionIsToldAndTheLinkGoesOn(self) -> None:
        self.watchLog()
        source = FakeLinkSource()
        sender = RemoteSender(source)
        transport = StringTransport()
        sender.makeConnection(transport)
        source.images[KEY] = _Unopenable()
        source.images[("snap1", "core.img")] = storedImage(MemoryStore(), b"core")
        sender.enqueue(KEY)
        [line] = self.errors()
        self.assertIn(f"cannot forward snap1/pages-1.img: {limitText()}", line)
        self.assertEqual(source.unforwarded, [(KEY, "snap1/pages-1.img could not be read to forward it: Too many open files")])
        self.assertEqual((sender.idle, transport.value()), (True, b""))
        sender.enqueue(("snap1", "core.img"))  # no producer left registered
        driveProducer(transport)
        self.assertTrue(transport.value().endswith(b"core"))


class _NoCache:
    def connect(self, factory: Any) -> Deferred[Any]:
        return Deferred()


class ProxySessionTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.session = ProxySession(MemoryReactorClock(), _NoCache(), None)  # type: ignore[arg-type]
        self.session.start()
        self.addCleanup(lambda: self.session.stop() and None)
        self.aborted: list[tuple[str, bool]] = []
        self.session.onAborted = lambda why, dumping: self.aborted.append((why, dumping))

    def test_unforwardableAbortsADump(self) -> None:
        self.session.forwardFailed(KEY, "no descriptor")
        self.assertEqual((self.session.state, self.aborted), ("aborted", [("no descriptor", True)]))

    def test_unforwardableAfterDeliveryRetries(self) -> None:
        """A delivered dump (resent to a restarted cache) is not aborted: the link tries again."""
        sender = RemoteSender(self.session)
        transport = StringTransport()
        sender.makeConnection(transport)
        sender.dataReceived(wire.LinkStatus(wire.LinkStatusKind.HELLO, version=3).toBytes())
        self.session.registry.publish(KEY, storedImage(MemoryStore(), b"abc"))
        self.session.registry.close()
        driveProducer(transport)
        sender.dataReceived(wire.LinkStatus(wire.LinkStatusKind.DUMP_RECEIVED, images=1, size=3).toBytes())
        self.assertEqual(self.session.state, "delivered")
        self.session.forwardFailed(KEY, "no descriptor")
        self.assertEqual((self.session.state, self.aborted, transport.disconnecting), ("delivered", [], True))
        self.assertEqual(readAll(self.session.registry.get(KEY)), b"abc")  # type: ignore[arg-type]
