"""
A slow spill disk pauses what feeds a writer or drains a reader, not the
reactor.  Full staging buffers go to the disk threads, and past a small
backlog the writer asks its feeder (a pipe, a socket) to pause until the
disk catches up; a reader whose next bytes are still being read says so
(a L{Deferred} from C{whenReadable}), and its consumer waits for them
without blocking.
"""

from __future__ import annotations

import errno
import fcntl
import os
import socket
import threading
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IReactorFromThreads
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer

from twisted_criu import wire
from twisted_criu.flow.chunks import OutgoingGrowingImage
from twisted_criu.flow.pacing import pauseWhileBehind, readPipeInto
from twisted_criu.flow.pipes import PipeWriter
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import IKernelSource, IPacedWriter
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.registry import readAll
from twisted_criu.storage.spill import STAGE_SIZE, SpillStore, diskio, readers
from twisted_criu.testing.fakes import FakeSink, storedImage

from .helpers import linkFrames

#: How long a test waits for a background thread before failing.
PATIENCE = 10.0

#: Buffers in flight that make a writer say it is behind.
BEHIND = diskio._StagedFile.BEHIND


class StuckDisk:
    """
    Spill writes (or, with C{reads}, reads) wait until L{release}, then run
    (or fail with C{error}).
    """

    def __init__(self, case: SynchronousTestCase, error: OSError | None = None, reads: bool = False) -> None:
        self._open = threading.Event()
        self._error = error
        module, name = (readers, "_preadInto") if reads else (diskio, "_pwriteAll")
        real = getattr(module, name)

        def gated(fd: int, data: Any, offset: int) -> Any:
            self._open.wait(PATIENCE)
            if self._error is not None:
                raise self._error
            return real(fd, data, offset)

        case.patch(module, name, gated)
        case.addCleanup(self.release)

    def release(self) -> None:
        self._open.set()


class Wakeups:
    """A stand-in for C{reactor.callFromThread}: keeps the calls for the test to run."""

    def __init__(self) -> None:
        self._calls: list[Callable[[], None]] = []
        self._lock = threading.Lock()

    def __call__(self, call: Callable[[], None]) -> None:
        with self._lock:
            self._calls.append(call)

    def runAfter(self, count: int) -> None:
        """Wait for C{count} wakeups in all, then run those not run yet."""
        deadline = time.monotonic() + PATIENCE
        while True:
            with self._lock:
                if len(self._calls) >= count:
                    calls, self._calls = self._calls, []
                    break
            if time.monotonic() > deadline:
                raise AssertionError(f"fewer than {count} writes ended")
            time.sleep(0.001)
        for call in calls:
            call()


class BacklogTests(SynchronousTestCase):
    """The writer takes bytes at once however slow the disk, and says when it is behind."""

    def setUp(self) -> None:
        self.wakeups = Wakeups()
        self.store = SpillStore(0, self.mktemp(), self.wakeups)
        self.addCleanup(self.store.close)
        self.data = os.urandom((BEHIND + 2) * STAGE_SIZE + 1234)

    def test_behindThenCaughtUp(self) -> None:
        disk = StuckDisk(self)
        writer = self.store.newWriter()
        verified = IPacedWriter.providedBy(writer)
        self.assertTrue(verified)
        writer.write(self.data[: (BEHIND - 1) * STAGE_SIZE])  # buffers on their way to the disk
        self.assertIsNone(writer.whenCaughtUp())  # type: ignore[attr-defined]
        writer.write(self.data[(BEHIND - 1) * STAGE_SIZE : BEHIND * STAGE_SIZE])
        caughtUp = writer.whenCaughtUp()  # type: ignore[attr-defined]
        self.assertIsInstance(caughtUp, Deferred)
        fired: list[object] = []
        caughtUp.addCallback(fired.append)
        # More is taken while the disk is stuck: the reactor never waits.
        writer.write(self.data[BEHIND * STAGE_SIZE : (BEHIND + 1) * STAGE_SIZE + 99])
        self.assertIs(writer.whenCaughtUp(), caughtUp)  # type: ignore[attr-defined]
        self.assertEqual(fired, [])
        disk.release()
        self.wakeups.runAfter(BEHIND + 1)
        self.assertEqual(fired, [None])
        self.assertIsNone(writer.whenCaughtUp())  # type: ignore[attr-defined]
        writer.write(self.data[(BEHIND + 1) * STAGE_SIZE + 99 :])
        image = writer.commit()
        self.assertEqual(readAll(image), self.data)

    def test_followersHearOfWrittenBuffers(self) -> None:
        """A cut-through follower learns of bytes the disk took, with no new write needed."""
        disk = StuckDisk(self)
        writer = self.store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        seen: list[int] = []
        follower.onChange = lambda: seen.append(follower.available)
        writer.write(self.data[:STAGE_SIZE])
        self.assertEqual(follower.available, 0)  # not on disk yet
        disk.release()
        self.wakeups.runAfter(1)
        self.assertEqual(seen[-1], STAGE_SIZE)
        self.assertEqual(follower.read(STAGE_SIZE), self.data[:STAGE_SIZE])
        follower.close()
        writer.abort()

    def test_failureWakesTheFeederAndReachesTheWriter(self) -> None:
        disk = StuckDisk(self, OSError(errno.ENOSPC, "No space left on device"))
        writer = self.store.newWriter()
        writer.write(self.data[: BEHIND * STAGE_SIZE])
        caughtUp = writer.whenCaughtUp()  # type: ignore[attr-defined]
        fired: list[object] = []
        caughtUp.addCallback(fired.append)
        disk.release()
        self.wakeups.runAfter(BEHIND)
        self.assertEqual(fired, [None])  # the feeder resumes, and its next write fails
        error = self.assertRaises(OSError, writer.write, b"more")
        self.assertEqual(error.errno, errno.ENOSPC)
        writer.abort()
        self.assertEqual((self.store.inMemory, self.store.onDisk), (0, 0))
        self.assertEqual(os.listdir(self.store.directory), [".lock"])

    def test_withoutAReactorTheWriterWaitsAtTheCap(self) -> None:
        """Nobody could be told of the disk catching up: past the cap, the write waits for it."""
        store = SpillStore(0, self.mktemp())
        self.addCleanup(store.close)
        disk = StuckDisk(self)
        writer = store.newWriter()
        cap = diskio._StagedFile.MAX_QUEUED * STAGE_SIZE
        data = os.urandom(cap + 777)
        writer.write(data[: cap - 1])
        self.assertIsNone(writer.whenCaughtUp())  # type: ignore[attr-defined]
        released = threading.Timer(0.2, disk.release)
        released.start()
        self.addCleanup(released.cancel)
        started = time.monotonic()
        writer.write(data[cap - 1 : cap])  # fills the last buffer that may be in flight
        self.assertGreaterEqual(time.monotonic() - started, 0.15)
        writer.write(data[cap:])
        self.assertEqual(readAll(writer.commit()), data)


@implementer(IPacedWriter)
class BehindWriter:
    """A writer whose disk is behind until the test says so."""

    size = 0

    def __init__(self) -> None:
        self.caughtUp: Deferred[None] | None = Deferred()

    def whenCaughtUp(self) -> Deferred[None] | None:
        return self.caughtUp

    def write(self, data: bytes | memoryview) -> None:
        pass

    def commit(self) -> Any:
        pass

    def abort(self) -> None:
        pass


class PauseWhileBehindTests(SynchronousTestCase):
    def test_pausedUntilCaughtUp(self) -> None:
        writer = BehindWriter()
        transport = StringTransport()
        pauseWhileBehind(writer, transport)
        self.assertEqual(transport.producerState, "paused")
        assert writer.caughtUp is not None
        writer.caughtUp.callback(None)
        self.assertEqual(transport.producerState, "producing")

    def test_keepingUpPausesNothing(self) -> None:
        writer = BehindWriter()
        writer.caughtUp = None
        transport = StringTransport()
        pauseWhileBehind(writer, transport)
        self.assertEqual(transport.producerState, "producing")


class LinkIntakeTests(SynchronousTestCase):
    """The cache's end of the link stops reading the socket while its disk is behind."""

    def test_slowDiskPausesTheLink(self) -> None:
        wakeups = Wakeups()
        disk = StuckDisk(self)
        sink = FakeSink()
        sink.store = SpillStore(0, self.mktemp(), wakeups)  # type: ignore[assignment]
        self.addCleanup(sink.store.close)
        receiver = RemoteReceiver(sink)
        transport = StringTransport()
        receiver.makeConnection(transport)
        data = os.urandom((BEHIND + 1) * STAGE_SIZE + 5)
        stream = linkFrames(("pages-1.img", data))
        head = len(stream) - len(data) + BEHIND * STAGE_SIZE
        receiver.dataReceived(stream[:head])
        self.assertEqual(transport.producerState, "paused")
        disk.release()
        wakeups.runAfter(BEHIND)
        self.assertEqual(transport.producerState, "producing")
        self.assertIsNone(sink.registry.get(("snap1", "pages-1.img")))
        receiver.dataReceived(stream[head:])
        image = sink.registry.get(("snap1", "pages-1.img"))
        self.assertIsNotNone(image)
        assert image is not None
        self.assertEqual(readAll(image), data)


class PipeIntakeTests(TestCase):
    """criu's pipe into a spilling store, with the real reactor and a stuck disk."""

    def test_slowDiskPausesThePipeNotTheReactor(self) -> None:
        disk = StuckDisk(self)
        store = SpillStore(0, self.mktemp(), IReactorFromThreads(reactor).callFromThread)
        self.addCleanup(store.close)
        writer = store.newWriter()
        data = os.urandom((BEHIND + 3) * STAGE_SIZE + 4321)
        r, w = os.pipe()
        fcntl.fcntl(w, 1031, 1 << 20)  # F_SETPIPE_SZ, as criu does
        reasons: list[Failure] = []
        ended: Deferred[None] = Deferred()

        def pipeEnded(reason: Failure) -> None:
            reasons.append(reason)
            ended.callback(None)

        pipe = readPipeInto(reactor, r, writer, pipeEnded)

        def criu() -> None:
            os.write(w, data)  # blocks while the pipe is full
            os.close(w)

        writing = threading.Thread(target=criu)
        writing.start()
        self.addCleanup(writing.join, PATIENCE)

        async def scenario() -> None:
            # The reader stops reading the pipe once two buffers wait for the disk...
            deadline = time.monotonic() + PATIENCE
            while pipe in reactor.getReaders():
                self.assertLess(time.monotonic(), deadline, "the pipe was never paused")
                await deferLater(reactor, 0.005, lambda: None)  # ...while the reactor runs on
            self.assertLess(writer.size, len(data))
            disk.release()
            await ended
            self.assertTrue(reasons[0].check(ConnectionDone))
            self.assertEqual(readAll(writer.commit()), data)

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]


class SlowReadTests(SynchronousTestCase):
    """A reader of a spill file says when the disk has not delivered yet."""

    def test_notReadableUntilRead(self) -> None:
        wakeups = Wakeups()
        store = SpillStore(0, self.mktemp(), wakeups)
        self.addCleanup(store.close)
        data = os.urandom(2 * STAGE_SIZE + 77)
        image = storedImage(store, data)
        wakeups.runAfter(2)  # the writes of its two full buffers
        disk = StuckDisk(self, reads=True)
        reader = image.open()
        self.addCleanup(reader.close)
        self.assertTrue(IKernelSource.providedBy(reader))
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        self.addCleanup(os.close, w)
        readable = reader.whenReadable()  # type: ignore[attr-defined]
        self.assertIsInstance(readable, Deferred)
        ready: list[object] = []
        readable.addCallback(ready.append)
        self.assertEqual(ready, [])
        disk.release()
        wakeups.runAfter(1)
        self.assertEqual(ready, [None])
        got = bytearray()
        while True:
            if reader.whenReadable() is not None:  # type: ignore[attr-defined]  # the read-ahead of the next buffer
                wakeups.runAfter(1)
                continue
            sent = reader.sendfile(w, 60_000)  # type: ignore[attr-defined]
            if not sent:
                break
            got += os.read(r, sent)
        self.assertEqual(bytes(got), data)


class SlowReadConsumerTests(TestCase):
    """A restore pipe and a link socket wait for a slow disk; the reactor does not."""

    def setUp(self) -> None:
        self.store = SpillStore(0, self.mktemp(), IReactorFromThreads(reactor).callFromThread)
        self.addCleanup(self.store.close)
        self.data = os.urandom(3 * STAGE_SIZE + 999)
        self.image = storedImage(self.store, self.data)
        self.disk = StuckDisk(self, reads=True)

    async def stalledThenSent(
        self, consumer: Any, send: Callable[[Any], Deferred[Any]], closed: Deferred[None], read: Callable[[int], bytes]
    ) -> bytes:
        """
        What C{send(consumer)} delivers to the other end (drained with
        C{read} on a thread until EOF), after checking that the consumer
        waits for the stuck disk while the reactor runs on.
        """
        got = bytearray()

        def drain() -> None:
            while chunk := read(1 << 20):
                got.extend(chunk)

        draining = threading.Thread(target=drain)
        draining.start()
        self.addCleanup(draining.join, PATIENCE)
        sent = send(consumer)
        for _ in range(20):  # the reactor runs on while the consumer waits
            await deferLater(reactor, 0.005, lambda: None)
        self.assertNotIn(consumer, reactor.getWriters())
        self.assertFalse(sent.called)
        self.disk.release()
        await sent
        consumer.loseConnection()  # after what was written
        await closed
        draining.join(PATIENCE)
        return bytes(got)

    def test_restorePipe(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        closed: Deferred[None] = Deferred()
        pipe = PipeWriter(reactor, w, lambda reason: closed.callback(None))
        self.addCleanup(pipe.abortConnection)

        async def scenario() -> None:
            got = await self.stalledThenSent(pipe, OutgoingImage(self.image).sendTo, closed, lambda n: os.read(r, n))
            self.assertEqual(got, self.data)

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    async def overTheLink(self, send: Callable[[Any], Deferred[Any]]) -> bytes:
        """What C{send(transport)} puts on a loopback TCP connection, once stalled by the disk."""
        connected: Deferred[Any] = Deferred()
        closed: Deferred[None] = Deferred()

        class Sending(Protocol):
            def connectionMade(self) -> None:
                connected.callback(self.transport)

            def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
                closed.callback(None)

        factory = ServerFactory()
        factory.protocol = Sending
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        cache = socket.create_connection(("127.0.0.1", address.port))
        self.addCleanup(cache.close)
        transport = await connected
        self.addCleanup(transport.abortConnection)
        return await self.stalledThenSent(transport, send, closed, cache.recv)

    def test_linkSocket(self) -> None:
        async def scenario() -> None:
            got = await self.overTheLink(OutgoingImage(self.image).sendTo)
            self.assertEqual(got, self.data)

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_cutThrough(self) -> None:
        """The proxy's cut-through of an image it is spilling, as criu writes it."""
        writer = self.store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        writer.write(self.data[: 2 * STAGE_SIZE])  # on disk before the link asks for it

        def writeTheRest() -> None:
            writer.write(self.data[2 * STAGE_SIZE :])
            writer.commit()

        def send(transport: Any) -> Deferred[Any]:
            sent = OutgoingGrowingImage(follower).sendTo(transport)
            reactor.callLater(0.01, writeTheRest)
            return sent

        async def scenario() -> None:
            while follower.available < 2 * STAGE_SIZE:  # the writes' ends reach the reactor
                await deferLater(reactor, 0.001, lambda: None)
            got = await self.overTheLink(send)
            payload, rest = bytearray(), memoryview(got)
            while True:
                (length,) = wire.CHUNK_LENGTH.unpack(rest[:4])
                rest = rest[4:]
                if length == wire.CHUNK_END:
                    break
                payload += rest[:length]
                rest = rest[length:]
            self.assertEqual(bytes(payload), self.data)
            follower.close()

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]
