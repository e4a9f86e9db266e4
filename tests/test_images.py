"""Tests for the criu-facing protocol, L{twisted_criu.criu.images}."""

from __future__ import annotations

import os

from twisted.internet.error import ConnectionDone, ConnectionLost
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.criu.images import LocalImageProtocol
from twisted_criu.registry import readAll
from twisted_criu.testing.fakes import FakeLocalService, driveProducer, pump

from .helpers import isClosed

KEY = ("snap1", "pages-1.img")


class LocalProtocolTests(SynchronousTestCase):
    def setUp(self) -> None:
        self.service = FakeLocalService()
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]

    def connect(self) -> tuple[LocalImageProtocol, StringTransport]:
        protocol = LocalImageProtocol(self.service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        return protocol, transport

    def errors(self) -> list[str]:
        return [
            e["log_format"].format(**e)
            for e in self.events
            if e["log_level"] >= LogLevel.error
        ]

    def stored(self, key: tuple[str, str] = KEY) -> bytes:
        image = self.service.registry.get(key)
        self.assertIsNotNone(image)
        return readAll(image)  # type: ignore[arg-type]

    def pipeWrite(self, data: bytes, fdFirst: bool = False) -> tuple[LocalImageProtocol, int]:
        """Start a criu-dev style write: header, then the pipe's read end."""
        readEnd, writeEnd = os.pipe()
        protocol, transport = self.connect()
        header = wire.LocalRequest(KEY[1], KEY[0], 1).toBytes()
        if fdFirst:
            protocol.fileDescriptorReceived(readEnd)
            protocol.dataReceived(header + b"\0")
        else:
            protocol.dataReceived(header)
            protocol.fileDescriptorReceived(readEnd)
            protocol.dataReceived(b"\0")
        protocol.connectionLost(Failure(ConnectionDone()))
        os.write(writeEnd, data)

        def closeWriteEnd() -> None:
            if not isClosed(writeEnd):
                os.close(writeEnd)

        self.addCleanup(closeWriteEnd)
        return protocol, writeEnd

    # -- writes ---------------------------------------------------------------

    def test_inlineWriteSplitEverywhere(self) -> None:
        """Seed-style writes: header and bytes on the socket, cut anywhere."""
        data = wire.LocalRequest(KEY[1], KEY[0], 1).toBytes() + b"image bytes"
        for cut in range(len(data) + 1):
            self.service = FakeLocalService()
            protocol, _ = self.connect()
            protocol.dataReceived(data[:cut])
            protocol.dataReceived(data[cut:])
            self.assertIsNone(self.service.registry.get(KEY))
            protocol.connectionLost(Failure(ConnectionDone()))
            self.assertEqual(self.stored(), b"image bytes", cut)

    def test_pipeWrite(self) -> None:
        """criu-dev writes: bytes through the pipe, EOF ends the image."""
        protocol, writeEnd = self.pipeWrite(b"pages" * 1000)
        read = self.service.registry.whenAvailable(KEY)
        self.assertNoResult(read)
        os.write(writeEnd, b"tail")
        os.close(writeEnd)
        pump(self.service.reactor)
        self.assertEqual(readAll(self.successResultOf(read)), b"pages" * 1000 + b"tail")
        self.assertEqual(self.service.reactor.readers, set())

    def test_descriptorBeforeHeader(self) -> None:
        """A client may send the fd with the first byte of the header."""
        protocol, writeEnd = self.pipeWrite(b"abc", fdFirst=True)
        os.close(writeEnd)
        pump(self.service.reactor)
        self.assertEqual(self.stored(), b"abc")

    def test_finishWhileDataInPipe(self) -> None:
        """The finish may overtake a pipe's EOF: nothing is lost (C bug)."""
        _, writeEnd = self.pipeWrite(b"x" * 60000)
        complete = self.service.registry.whenComplete()
        finish, transport = self.connect()
        finish.dataReceived(wire.LocalRequest("", "", 1).toBytes())
        self.assertEqual(len(self.service.finishes), 1)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(transport.value(), b"")
        self.assertNoResult(complete)
        os.close(writeEnd)
        pump(self.service.reactor)
        self.successResultOf(complete)
        self.assertEqual(self.stored(), b"x" * 60000)

    def test_zeroLengthPipeWrite(self) -> None:
        _, writeEnd = self.pipeWrite(b"")
        os.close(writeEnd)
        pump(self.service.reactor)
        self.assertEqual(self.stored(), b"")

    def test_zeroLengthInlineWrite(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(wire.LocalRequest("parent", "", 1024).toBytes())
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.stored(("", "parent")), b"")

    def test_writeTwiceReplaces(self) -> None:
        """C bug: a second write appended to the old bytes."""
        for data in (b"first", b"second"):
            protocol, _ = self.connect()
            protocol.dataReceived(wire.LocalRequest(KEY[1], "null", 1).toBytes() + data)
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.stored(("null", KEY[1])), b"second")

    def test_appendTwice(self) -> None:
        """C bug: a second append to parent cleared the list."""
        for snapshotId in ("pre", "dump"):
            protocol, _ = self.connect()
            protocol.dataReceived(
                wire.LocalRequest("parent", "", wire.O_APPEND).toBytes()
                + wire.encodeSnapshotId(snapshotId)
            )
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.service.registry.snapshotIds(), ["pre", "dump"])

    def test_uncleanInlineCloseDiscards(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], 1).toBytes() + b"part")
        read = self.service.registry.whenAvailable(KEY)
        protocol.connectionLost(Failure(ConnectionLost("reset")))
        self.assertIsNone(self.service.registry.get(KEY))
        self.assertNoResult(read)  # the cache still waits for a whole image
        self.assertEqual(len(self.errors()), 1)
        self.assertIn("discarded snap1/pages-1.img after 4 bytes", self.errors()[0])

    # -- hostile input ----------------------------------------------------------

    def assertRejected(self, data: bytes, why: str) -> StringTransport:
        protocol, transport = self.connect()
        protocol.dataReceived(data)
        self.assertTrue(transport.disconnected, "connection not aborted")
        self.assertEqual(self.service.registry.keys(), [])
        self.assertEqual(len(self.errors()), 1)
        self.assertIn(why, self.errors()[0])
        return transport

    def test_oversizedHeader(self) -> None:
        self.assertRejected(b"\xff\xff\xff\xff", "exceeds the 65536-byte limit")

    def test_garbageHeader(self) -> None:
        self.assertRejected(wire.frame(b"\xff" * 10), "malformed local_image_entry")

    def test_missingFields(self) -> None:
        self.assertRejected(wire.frame(bytes.fromhex("0a0161")), "lacks required fields")

    def test_unknownMode(self) -> None:
        self.assertRejected(wire.LocalRequest("a", "s", 0o100).toBytes(), "unknown open mode")

    def test_hostileName(self) -> None:
        self.assertRejected(wire.LocalRequest("../x", "s", 1).toBytes(), "hostile image name")

    def test_twoDescriptors(self) -> None:
        protocol, transport = self.connect()
        first, second = os.pipe()
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], 1).toBytes())
        protocol.fileDescriptorReceived(first)
        protocol.fileDescriptorReceived(second)
        self.assertTrue(transport.disconnected)
        self.assertTrue(isClosed(second))
        self.assertIn("unexpected file descriptor", self.errors()[0])
        self.assertTrue(isClosed(first))
        self.assertEqual(self.service.reactor.readers, set())
        self.assertIsNone(self.service.registry.get(KEY))

    def test_descriptorsPileUpBeforeTheHeader(self) -> None:
        """criu passes one pipe per connection: a second one before the header is refused, none is kept."""
        protocol, transport = self.connect()
        pipes = [os.pipe() for _ in range(2)]
        for readEnd, writeEnd in pipes:
            protocol.fileDescriptorReceived(readEnd)
            os.close(writeEnd)
        self.assertTrue(transport.disconnected)
        self.assertTrue(all(isClosed(readEnd) for readEnd, _ in pipes))
        self.assertIn("more than one file descriptor passed", self.errors()[0])

    def test_descriptorFloodLogsOnce(self) -> None:
        """
        One read may bring up to 253 descriptors (one C{sendmsg}'s worth,
        then their bytes): the connection is refused at the second, every
        one is closed, and the log says so once, not once per descriptor.
        """
        protocol, transport = self.connect()
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        self.addCleanup(os.close, writeEnd)
        passed = [os.dup(readEnd) for _ in range(250)]
        for fd in passed:
            protocol.fileDescriptorReceived(fd)
        protocol.dataReceived(b"\0" * len(passed))
        self.assertTrue(transport.disconnected)
        self.assertTrue(all(isClosed(fd) for fd in passed))
        self.assertEqual(len(self.errors()), 1, self.errors()[:3])
        self.assertIn("more than one file descriptor passed", self.errors()[0])

    def test_descriptorsClosedWhenConnectionDropsEarly(self) -> None:
        protocol, _ = self.connect()
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, writeEnd)
        protocol.fileDescriptorReceived(readEnd)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertTrue(isClosed(readEnd))

    # -- reads -------------------------------------------------------------------

    def publish(self, key: tuple[str, str], data: bytes) -> None:
        writer = self.service.store.newWriter()
        writer.write(data)
        self.service.registry.beginWrite(key)
        self.service.registry.publish(key, writer.commit())

    def test_readInline(self) -> None:
        """parent (empty snapshot id) is read on the socket."""
        self.publish(("", "parent"), wire.encodeSnapshotId("snap1"))
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest("parent", "", 0).toBytes())
        driveProducer(transport)
        self.assertEqual(transport.value(), wire.REPLY_OK + wire.encodeSnapshotId("snap1"))
        self.assertTrue(transport.disconnecting)

    def test_readPipe(self) -> None:
        data = os.urandom(300000)
        self.publish(KEY, data)
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], 0).toBytes())
        self.assertEqual(transport.value(), wire.REPLY_OK)
        readEnd, writeEnd = os.pipe()
        os.set_blocking(readEnd, False)
        self.addCleanup(os.close, readEnd)
        protocol.fileDescriptorReceived(writeEnd)
        protocol.dataReceived(b"\0")
        received: list[bytes] = []
        pump(self.service.reactor, drain=readEnd, sink=received)
        self.assertEqual(b"".join(received), data)
        self.assertTrue(isClosed(writeEnd))
        self.assertEqual(os.read(readEnd, 1), b"")  # EOF
        self.assertTrue(transport.disconnecting)

    def test_replacedBeforePipeArrives(self) -> None:
        """The version answered is served whole, even if replaced meanwhile."""
        self.publish(KEY, b"old version")
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], 0).toBytes())
        self.publish(KEY, b"new")  # releases the old image
        readEnd, writeEnd = os.pipe()
        os.set_blocking(readEnd, False)
        self.addCleanup(os.close, readEnd)
        protocol.fileDescriptorReceived(writeEnd)
        received: list[bytes] = []
        pump(self.service.reactor, drain=readEnd, sink=received)
        self.assertEqual(b"".join(received), b"old version")

    def test_readWaitsForImage(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest("parent", "", 0).toBytes())
        self.assertEqual(transport.value(), b"")
        self.publish(("", "parent"), b"late")
        driveProducer(transport)
        self.assertEqual(transport.value(), wire.REPLY_OK + b"late")

    def test_readMissing(self) -> None:
        self.service.registry.close()
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest("memfd.img", "snap1", 0).toBytes())
        self.assertEqual(transport.value(), wire.REPLY_ENOENT)
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.errors(), [])  # ENOENT is normal for criu restore

    def test_readerGoesAwayWhileWaiting(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], 0).toBytes())
        self.assertEqual(self.service.registry.waiting, 1)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(self.service.registry.waiting, 0)

    def test_restoreFinish(self) -> None:
        protocol, transport = self.connect()
        protocol.dataReceived(wire.LocalRequest("", "", 0).toBytes())
        self.assertEqual(transport.value(), b"")
        self.assertTrue(transport.disconnecting)
        self.assertEqual(self.service.finishes, [wire.LocalRequest("", "", 0)])

    def test_seedFinish(self) -> None:
        protocol, _ = self.connect()
        protocol.dataReceived(wire.LocalRequest("DUMP_FINISH", "null", 1).toBytes())
        self.assertEqual(len(self.service.finishes), 1)


class OverlappingAppendTests(SynchronousTestCase):
    def test_overlappingAppendsBothLand(self) -> None:
        """A second append that starts before the first ends still appends."""
        service = FakeLocalService()
        protocols = []
        for snapshotId in ("pre", "dump"):
            protocol = LocalImageProtocol(service)
            protocol.makeConnection(StringTransport())
            protocol.dataReceived(
                wire.LocalRequest("parent", "", wire.O_APPEND).toBytes()
                + wire.encodeSnapshotId(snapshotId)
            )
            protocols.append(protocol)
        for protocol in protocols:
            protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(service.registry.snapshotIds(), ["pre", "dump"])


class FullDiskTests(SynchronousTestCase):
    """A store that cannot take more bytes aborts the image, loudly."""

    def test_pipeWriteIntoFullStore(self) -> None:
        service = FakeLocalService()

        class FullWriter:
            size = 0

            def write(self, data: bytes) -> None:
                raise OSError(28, "No space left on device")

            def abort(self) -> None:
                pass

        service.store.newWriter = lambda base=None: FullWriter()  # type: ignore[method-assign, assignment, return-value]
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        protocol = LocalImageProtocol(service)
        protocol.makeConnection(StringTransport())
        readEnd, writeEnd = os.pipe()
        protocol.dataReceived(wire.LocalRequest(KEY[1], KEY[0], 1).toBytes())
        protocol.fileDescriptorReceived(readEnd)
        os.write(writeEnd, b"data")
        pump(service.reactor)
        self.assertTrue(isClosed(readEnd))  # criu's next write gets EPIPE
        os.close(writeEnd)
        self.assertIsNone(service.registry.get(KEY))
        self.assertEqual(service.registry.writesInProgress, 0)
        errors = [e["log_format"].format(**e) for e in events if e["log_level"] >= LogLevel.error]
        self.assertIn("No space left on device", errors[0])
