"""
The steps outside Twisted's public API (L{twisted_criu.flow._fastpath}),
each pinned against real loopback sockets and pipes on the real reactor,
and the plain path taken where a transport is not a reactor descriptor.
"""

from __future__ import annotations

import os
import socket
import threading
import time
from typing import Any, Callable

from twisted.internet import reactor
from twisted.internet.address import IPv4Address
from twisted.internet.defer import Deferred
from twisted.internet.error import ConnectionDone
from twisted.internet.interfaces import IPullProducer
from twisted.internet.protocol import Protocol, ServerFactory
from twisted.internet.task import deferLater
from twisted.internet.testing import StringTransport
from twisted.python.failure import Failure
from twisted.test.iosim import FakeTransport
from twisted.trial.unittest import SynchronousTestCase, TestCase
from zope.interface import implementer
from zope.interface.verify import verifyObject

from twisted_criu import wire
from twisted_criu.flow import _fastpath
from twisted_criu.flow.chunks import OutgoingGrowingImage
from twisted_criu.flow.pipes import PipeWriter
from twisted_criu.flow.send import OutgoingImage
from twisted_criu.interfaces import IKernelSink, IKernelSource, ISpliceSink
from twisted_criu.storage.files import FileImage
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.storage.spill import SpillStore
from twisted_criu.storage.spill.store import SMALL_IMAGE
from twisted_criu.testing.fakes import storedImage

#: How long a test waits for bytes to arrive before failing.
PATIENCE = 10.0


async def until(condition: Callable[[], bool], what: str) -> None:
    """Let the reactor run until C{condition()} holds."""
    deadline = time.monotonic() + PATIENCE
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await deferLater(reactor, 0.002, lambda: None)


class Accepted(Protocol):
    """The server end of a loopback connection; records what arrives."""

    transport: Any  # a tcp.Server: the tests reach past ITransport on purpose

    def __init__(self) -> None:
        self.made: Deferred[Accepted] = Deferred()
        self.lost: Deferred[None] = Deferred()
        self.reason: Failure | None = None
        self.plain = bytearray()

    def connectionMade(self) -> None:
        self.made.callback(self)

    def dataReceived(self, data: bytes) -> None:
        self.plain += data

    def connectionLost(self, reason: Failure = Failure(ConnectionDone())) -> None:
        self.reason = reason
        self.lost.callback(None)


class LoopbackMixin(TestCase):
    """A real TCP connection over 127.0.0.1: a Twisted server end, a plain socket peer."""

    async def connect(self, protocol: Accepted) -> socket.socket:
        factory = ServerFactory()
        factory.buildProtocol = lambda addr: protocol  # type: ignore[method-assign]
        port = reactor.listenTCP(0, factory, interface="127.0.0.1")
        self.addCleanup(port.stopListening)
        address = port.getHost()
        assert isinstance(address, IPv4Address)
        peer = socket.create_connection(("127.0.0.1", address.port))
        self.addCleanup(peer.close)
        await protocol.made
        self.addCleanup(lambda: protocol.transport.abortConnection() if protocol.transport else None)
        return peer

    async def connectNarrow(self, protocol: Accepted) -> socket.socket:
        """L{connect}, with the server end's send buffer at its smallest (it fills at once)."""
        peer = await self.connect(protocol)
        protocol.transport.socket.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        return peer

    def drain(self, peer: socket.socket, into: bytearray) -> threading.Thread:
        """Read C{peer} to EOF into C{into} on a thread."""

        def drain() -> None:
            while chunk := peer.recv(1 << 20):
                into.extend(chunk)

        draining = threading.Thread(target=drain)
        draining.start()
        self.addCleanup(draining.join, PATIENCE)
        return draining


class BufferedReadsTests(LoopbackMixin):
    def test_deliversExactlyTheBytesAndRestoresItself(self) -> None:
        """Reads go into the reused buffer while asked for, plain reads otherwise; EOF restores C{doRead}."""
        protocol = Accepted()
        reads: list[int] = []
        buffered = bytearray()
        size = [0]

        def received(view: memoryview) -> None:
            self.assertIsInstance(view, memoryview)
            reads.append(len(view))
            buffered.extend(view)

        async def scenario() -> None:
            peer = await self.connect(protocol)
            transport = protocol.transport
            installed = _fastpath.BufferedReads.install(transport, lambda: size[0], received, 1 << 16)
            self.assertIsNotNone(installed)
            self.assertIn("doRead", vars(transport))
            peer.sendall(b"header")
            await until(lambda: len(protocol.plain) == 6, "the plain read")
            self.assertEqual(bytes(protocol.plain), b"header")
            self.assertEqual(buffered, b"")
            size[0] = 1000  # at most this much per read
            body = os.urandom(300_000)
            peer.sendall(body)
            await until(lambda: len(buffered) >= len(body), "the buffered reads")
            self.assertEqual(bytes(buffered), body)
            self.assertLessEqual(max(reads), 1000)
            self.assertEqual(bytes(protocol.plain), b"header")
            peer.close()
            await protocol.lost
            assert protocol.reason is not None
            self.assertTrue(protocol.reason.check(ConnectionDone))
            self.assertNotIn("doRead", vars(transport))
            assert installed is not None
            installed.restore()  # idempotent

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_restore(self) -> None:
        """L{BufferedReads.restore} gives the connection its own reads back at once."""
        protocol = Accepted()

        async def scenario() -> None:
            peer = await self.connect(protocol)
            reads = _fastpath.BufferedReads.install(protocol.transport, lambda: 1 << 16, self.fail, 1 << 16)
            assert reads is not None
            reads.restore()
            self.assertNotIn("doRead", vars(protocol.transport))
            peer.sendall(b"plain again")
            await until(lambda: len(protocol.plain) == 11, "the plain read")
            self.assertEqual(bytes(protocol.plain), b"plain again")

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_sharedBuffer(self) -> None:
        self.assertIs(_fastpath.sharedBuffer(4096), _fastpath.sharedBuffer(4096))
        self.assertEqual(len(_fastpath.sharedBuffer(4096)), 4096)


@implementer(IPullProducer)
class CountingProducer:
    def __init__(self) -> None:
        self.asked = 0

    def resumeProducing(self) -> None:
        self.asked += 1

    def stopProducing(self) -> None:
        pass


class SendingTests(LoopbackMixin):
    def test_descriptorAndWritable(self) -> None:
        """The descriptor is the socket's; a pull producer that asks is asked again."""
        protocol = Accepted()

        async def scenario() -> None:
            await self.connect(protocol)
            transport = protocol.transport
            self.assertTrue(_fastpath.onDescriptor(transport))
            self.assertEqual(_fastpath.descriptorOf(transport), transport.socket.fileno())
            producer = CountingProducer()
            transport.registerProducer(producer, False)
            self.assertEqual(producer.asked, 1)  # by registerProducer
            _fastpath.askWhenWritable(transport)
            await until(lambda: producer.asked == 2, "the transport to ask again")
            await deferLater(reactor, 0.02, lambda: None)
            self.assertEqual(producer.asked, 2)  # once: it asked only once
            transport.unregisterProducer()

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_msgMoreThenSendfile(self) -> None:
        """A prefix sent ahead with C{MSG_MORE}, then C{sendfile}: both arrive, in order."""
        protocol = Accepted()
        path = self.mktemp()
        body = os.urandom(200_000)
        with open(path, "wb") as f:
            f.write(body)
        got = bytearray()

        async def scenario() -> None:
            peer = await self.connect(protocol)
            draining = self.drain(peer, got)
            transport = protocol.transport
            self.assertTrue(_fastpath.sendAhead(transport, b"PREFIX"))
            fd = os.open(path, os.O_RDONLY)
            self.addCleanup(os.close, fd)
            offset = 0
            while offset < len(body):
                try:
                    offset += os.sendfile(_fastpath.descriptorOf(transport), fd, offset, len(body) - offset)
                except BlockingIOError:
                    await deferLater(reactor, 0.002, lambda: None)
            transport.loseConnection()
            await protocol.lost
            draining.join(PATIENCE)
            self.assertEqual(bytes(got), b"PREFIX" + body)

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_aheadOfAFullSocket(self) -> None:
        """Into a full socket, the prefix waits in the transport's buffer, and goes after what came before."""
        protocol = Accepted()
        got = bytearray()

        async def scenario() -> None:
            peer = await self.connectNarrow(protocol)
            transport = protocol.transport
            filler = bytearray()
            while True:
                try:
                    block = os.urandom(4096)
                    sent = transport.socket.send(block)
                except BlockingIOError:
                    break
                filler += block[:sent]
            self.assertTrue(_fastpath.bufferEmpty(transport))
            self.assertFalse(_fastpath.sendAhead(transport, b"PREFIX"))
            self.assertFalse(_fastpath.bufferEmpty(transport))
            draining = self.drain(peer, got)
            await until(lambda: _fastpath.bufferEmpty(transport), "the buffer to be flushed")
            transport.loseConnection()
            await protocol.lost
            draining.join(PATIENCE)
            self.assertEqual(bytes(got), bytes(filler) + b"PREFIX")

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_writeNowIntoAnEmptyBuffer(self) -> None:
        """
        With nothing buffered, C{writeNow} puts the bytes straight into the
        socket (the transport buffers nothing), and the caller may reuse
        its buffer at once.
        """
        protocol = Accepted()
        got = bytearray()

        async def scenario() -> None:
            peer = await self.connect(protocol)
            draining = self.drain(peer, got)
            transport = protocol.transport
            reused = bytearray(b"A" * 1000)
            _fastpath.writeNow(transport, reused)
            self.assertTrue(_fastpath.bufferEmpty(transport))
            reused[:] = b"B" * 1000
            _fastpath.writeNow(transport, memoryview(reused))
            transport.loseConnection()
            await protocol.lost
            draining.join(PATIENCE)
            self.assertEqual(bytes(got), b"A" * 1000 + b"B" * 1000)

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_writeNowBehindBufferedBytes(self) -> None:
        """
        Into a full socket, or behind bytes the transport still holds,
        C{writeNow} copies what did not go (the caller's buffer may change
        after), and everything arrives in order.
        """
        protocol = Accepted()
        got = bytearray()

        async def scenario() -> None:
            peer = await self.connectNarrow(protocol)
            transport = protocol.transport
            reused = bytearray(os.urandom(1 << 20))
            first = bytes(reused)
            _fastpath.writeNow(transport, reused)  # the socket takes part of it
            self.assertFalse(_fastpath.bufferEmpty(transport))
            reused[:] = os.urandom(1 << 20)
            second = bytes(reused)
            _fastpath.writeNow(transport, reused)  # all of it waits behind the first
            reused[:] = bytes(1 << 20)
            draining = self.drain(peer, got)
            await until(lambda: _fastpath.bufferEmpty(transport), "the buffer to be flushed")
            transport.loseConnection()
            await protocol.lost
            draining.join(PATIENCE)
            self.assertEqual(len(got), 2 << 20)
            self.assertTrue(bytes(got) == first + second, "the bytes arrived changed or out of order")

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]

    def test_writeNowElsewhere(self) -> None:
        """A transport that is not a socket gets the bytes through C{write}, copied."""
        transport = StringTransport()
        reused = bytearray(b"abc")
        _fastpath.writeNow(transport, reused)
        reused[:] = b"xyz"
        self.assertEqual(transport.value(), b"abc")

    def test_storedImageBySendfile(self) -> None:
        """A whole image goes by C{sendfile}, after what the transport had buffered."""
        protocol = Accepted()
        path = self.mktemp()
        body = os.urandom(3 << 20)
        with open(path, "wb") as f:
            f.write(body)
        calls = recordSendfile(self)
        got = bytearray()

        async def scenario() -> None:
            peer = await self.connect(protocol)
            draining = self.drain(peer, got)
            protocol.transport.write(b"header")
            await OutgoingImage(FileImage(path)).sendTo(protocol.transport)
            self.assertNotEqual(calls, [])
            protocol.transport.loseConnection()
            await protocol.lost
            draining.join(PATIENCE)
            self.assertEqual(bytes(got), b"header" + body)

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]


def recordSendfile(case: SynchronousTestCase) -> list[int]:
    """Record the descriptors C{os.sendfile} writes into."""
    calls: list[int] = []
    real = os.sendfile

    def recording(out: int, *args: Any) -> int:
        calls.append(out)
        return real(out, *args)

    case.patch(os, "sendfile", recording)
    return calls


class PipeTests(TestCase):
    def test_pipeWriter(self) -> None:
        """A pipe to criu is a reactor descriptor too, and says when its buffer is empty."""
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        pipe = PipeWriter(reactor, w, lambda reason: None)
        self.addCleanup(pipe.abortConnection)
        self.assertTrue(_fastpath.onDescriptor(pipe))
        self.assertEqual(_fastpath.descriptorOf(pipe), w)
        self.assertTrue(_fastpath.bufferEmpty(pipe))
        pipe.write(b"x")
        self.assertFalse(_fastpath.bufferEmpty(pipe))

        async def scenario() -> None:
            await until(lambda: _fastpath.bufferEmpty(pipe), "the pipe to be written")
            self.assertEqual(os.read(r, 10), b"x")

        return Deferred.fromCoroutine(scenario())  # type: ignore[return-value]


class FallbackTests(SynchronousTestCase):
    """Anything but a reactor descriptor (TLS, iosim, StringTransport) takes the plain path."""

    def test_notDescriptors(self) -> None:
        self.assertFalse(_fastpath.onDescriptor(StringTransport()))
        self.assertFalse(_fastpath.onDescriptor(FakeTransport(Protocol(), True)))

    def test_sendAheadWrites(self) -> None:
        transport = StringTransport()
        self.assertFalse(_fastpath.sendAhead(transport, b"PREFIX"))
        self.assertEqual(transport.value(), b"PREFIX")

    def test_noBufferedReads(self) -> None:
        transport = StringTransport()
        self.assertIsNone(_fastpath.BufferedReads.install(transport, lambda: 1, self.fail, 16))
        self.assertNotIn("doRead", vars(transport))

    def test_storedImageWritten(self) -> None:
        """A file image into a StringTransport: read and written, no C{sendfile}."""
        path = self.mktemp()
        body = os.urandom(600_000)
        with open(path, "wb") as f:
            f.write(body)
        calls = recordSendfile(self)
        transport = StringTransport()
        sent = OutgoingImage(FileImage(path)).sendTo(transport)
        while transport.producer is not None:
            transport.producer.resumeProducing()
        self.successResultOf(sent)
        self.assertEqual(transport.value(), body)
        self.assertEqual(calls, [])

    def test_growingImageWritten(self) -> None:
        """A growing spill image into a StringTransport: chunks written, no C{sendfile}."""
        store = SpillStore(1 << 20, self.mktemp())
        self.addCleanup(store.close)
        calls = recordSendfile(self)
        writer = store.newWriter()
        follower = writer.follow()  # type: ignore[attr-defined]
        transport = StringTransport()
        sent = OutgoingGrowingImage(follower).sendTo(transport)
        writer.write(b"abc")
        writer.commit()
        self.assertEqual(self.successResultOf(sent), 3)
        self.assertEqual(transport.value(), wire.CHUNK_LENGTH.pack(3) + b"abc" + wire.CHUNK_LENGTH.pack(wire.CHUNK_END))
        self.assertEqual(calls, [])


class DeclarationsTests(SynchronousTestCase):
    """Who says they can do what (asked with C{providedBy} everywhere)."""

    def test_spillStore(self) -> None:
        store = SpillStore(1 << 20, self.mktemp())
        self.addCleanup(store.close)
        writer = store.newWriter()
        verifyObject(ISpliceSink, writer)
        follower = writer.follow()  # type: ignore[attr-defined]
        verifyObject(IKernelSource, follower)
        image = storedImage(store, b"s" * (SMALL_IMAGE + 1))  # a small one is bytes, not a memfd
        reader = image.open()
        self.addCleanup(reader.close)
        verifyObject(IKernelSource, reader)
        self.assertIsNone(IKernelSource(reader).whenReadable())
        follower.close()
        writer.abort()

    def test_fileImage(self) -> None:
        path = self.mktemp()
        with open(path, "wb") as f:
            f.write(b"file")
        reader = FileImage(path).open()
        self.addCleanup(reader.close)
        verifyObject(IKernelSource, reader)
        self.assertIsNone(IKernelSource(reader).whenReadable())

    def test_memoryStoreHasNoKernelPaths(self) -> None:
        store = MemoryStore()
        writer = store.newWriter()
        self.assertFalse(ISpliceSink.providedBy(writer))
        self.assertFalse(IKernelSource.providedBy(storedImage(store, b"x").open()))

    def test_pipeWriter(self) -> None:
        r, w = os.pipe()
        self.addCleanup(os.close, r)
        pipe = PipeWriter(reactor, w, lambda reason: None)
        self.addCleanup(pipe.abortConnection)
        verifyObject(IKernelSink, pipe)
