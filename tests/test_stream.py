"""criu --stream through criu-proxy and criu-cache, played by L{StreamClient}."""

from __future__ import annotations

import hashlib
import json
import os
import socket
from pathlib import Path
from typing import Any

from twisted.internet.defer import inlineCallbacks
from twisted.internet.error import ConnectionDone
from twisted.internet.testing import EventLoggingObserver, StringTransport
from twisted.logger import LogLevel, globalLogPublisher
from twisted.python.failure import Failure
from twisted.trial.unittest import SynchronousTestCase, TestCase

from twisted_criu import wire
from twisted_criu.criu.stream import MAX_BYTES_AHEAD, StreamCaptureProtocol, StreamServeProtocol
from twisted_criu.registry import SnapshotRegistry, readAll
from twisted_criu.testing.criu import ImageWriter, StreamClient
from twisted_criu.testing.fakes import FakeLocalService, pump

from .helpers import Migration, MigrationCase, inThread, isClosed, waitFor

TRACES = Path(__file__).resolve().parent / "criu-traces"


class StreamTests(MigrationCase):
    @inlineCallbacks
    def setUp(self) -> Any:  # type: ignore[override]
        yield super().setUp()
        self.capture = StreamClient(self.m.captureSocket, timeout=20)
        self.serve = StreamClient(self.m.serveSocket, timeout=20)
        self.addCleanup(self.capture.close)
        self.addCleanup(self.serve.close)

    @inlineCallbacks
    def test_concurrentPipesAndRereads(self) -> Any:
        m = self.m
        assert m.cache and m.proxy
        cacheDone = m.cache.whenSessionDone()
        proxyDone = m.proxy.whenSessionDone()
        files = {f"f{i}.img": os.urandom(100000 * i) for i in range(6)}

        def dump() -> None:
            writers = {name: self.capture.openWrite(name) for name in files}  # 6 open
            for name in reversed(list(files)):
                writers[name].write(files[name])
                writers[name].close()
            self.capture.close()

        yield inThread(dump)
        summary = yield proxyDone
        self.assertEqual(summary.images, 6)

        def restore() -> dict[str, Any]:
            got = {name: self.serve.read(name) for name in reversed(list(files))}
            got["again"] = self.serve.read("f5.img")
            got["missing"] = self.serve.read("memfd.img")
            self.serve.close()
            return got

        got = yield inThread(restore)
        self.assertEqual(got.pop("again"), files["f5.img"])
        self.assertIsNone(got.pop("missing"))
        self.assertEqual(got, files)
        yield cacheDone

    @inlineCallbacks
    def test_serveWaitsForFileInFlight(self) -> Any:
        m = self.m
        assert m.cache
        read = inThread(self.serve.read, "inventory.img")
        yield waitFor(lambda: m.cache.readsWaiting == 1)  # type: ignore[union-attr]
        self.assertNoResult(read)
        yield inThread(self.capture.write, "inventory.img", b"inv")
        self.assertNoResult(read)  # served only once the dump is delivered
        yield inThread(self.capture.close)
        self.assertEqual((yield read), b"inv")

    @inlineCallbacks
    def test_missingAfterDumpEnds(self) -> Any:
        m = self.m
        assert m.cache
        read = inThread(self.serve.read, "cgroup.img")
        yield waitFor(lambda: m.cache.readsWaiting == 1)  # type: ignore[union-attr]

        def dump() -> None:
            self.capture.write("inventory.img", b"inv")
            self.capture.close()

        yield inThread(dump)
        self.assertIsNone((yield read))

    @inlineCallbacks
    def test_dumpEndsOnlyWhenEveryPipeIsDrained(self) -> Any:
        m = self.m
        assert m.proxy
        done = m.proxy.whenSessionDone()
        writer = yield inThread(self.capture.openWrite, "pages-1.img")
        yield inThread(self.capture.close)
        yield inThread(writer.write, b"p" * 100000)
        self.assertNoResult(done)
        yield inThread(writer.close)
        summary = yield done
        self.assertEqual(summary.bytes, 100000)

    @inlineCallbacks
    def test_fatalErrorClosesPipes(self) -> Any:
        """criu must fail fast (EPIPE), not hang, when we give up."""
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        writer = yield inThread(self.capture.openWrite, "pages-1.img")
        sock = self.capture._connection()
        yield inThread(sock.sendall, b"\xff\xff\xff\xff")  # hostile length

        def writeUntilBroken() -> str:
            try:
                for _ in range(1000):
                    writer.write(b"x" * 65536)
            except BrokenPipeError:
                return "EPIPE"
            finally:
                writer.close()
            return "wrote everything"

        self.assertEqual((yield inThread(writeUntilBroken)), "EPIPE")
        errors = [e for e in events if e["log_level"] >= LogLevel.error]
        self.assertTrue(any("exceeds" in str(e.get("why")) for e in errors), errors)
        self.assertTrue(any("discarded" in e["log_format"] for e in errors))
        assert self.m.proxy
        yield waitFor(lambda: self.m.proxy.session is None)  # type: ignore[union-attr]
        self.assertTrue(any("aborted: criu's dump failed" in (e.get("log_format") or "").format(**e) for e in events))
        self.assertEqual(self.m.proxy.listSessions(), [])

    @inlineCallbacks
    def test_descriptorWithoutRequest(self) -> Any:
        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)
        r, w = os.pipe()
        self.addCleanup(os.close, w)
        sock = self.capture._connection()
        yield inThread(socket.send_fds, sock, [b"\0"], [r])
        os.close(r)
        self.assertEqual((yield inThread(sock.recv, 1)), b"")  # we hung up
        errors = [e for e in events if e["log_level"] >= LogLevel.error]
        self.assertIn("without a request", str(errors[0].get("why")))


def _events(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


class StreamTraceTests(TestCase):
    """Replay what CRIU 4.2 did on the streamer sockets (runs a and c)."""

    timeout = 60

    @inlineCallbacks
    def replay(self, run: str) -> Any:
        directory = TRACES / run
        self.assertTrue(directory.is_dir(), f"missing traces: {directory}")
        m = Migration(self)
        yield m.start()
        capture = StreamClient(m.captureSocket, timeout=20)
        serve = StreamClient(m.serveSocket, timeout=20)
        images = {p.name: p.read_bytes() for p in (directory / "images").iterdir()}

        def dump() -> None:
            writers: dict[str, ImageWriter] = {}
            for event in _events(directory / "dump.jsonl"):
                name: str = event.get("name", "")
                if event["event"] == "fd":
                    writers[name] = capture.openWrite(name)
                elif event["event"] == "data_eof":
                    writers[name].write(images[name])
                    writers.pop(name).close()
            self.assertEqual(writers, {})
            capture.close()

        yield inThread(dump)

        def restore() -> list[tuple[str, Any]]:
            mismatches: list[tuple[str, Any]] = []
            for event in _events(directory / "restore.jsonl"):
                if event["event"] == "request":
                    data = serve.read(event["name"])
                    expected = images.get(event["name"])
                    if data != expected:
                        mismatches.append((event["name"], None if data is None else len(data)))
                elif event["event"] == "data_eof":
                    digest = hashlib.sha256(images[event["name"]]).hexdigest()
                    if digest != event["sha256"]:
                        mismatches.append((event["name"], "trace sha256"))
            serve.close()
            return mismatches

        self.assertEqual((yield inThread(restore)), [])

    def test_streamASleep(self) -> Any:
        return self.replay("stream-a-sleep")

    def test_streamCTree(self) -> Any:
        return self.replay("stream-c-tree")


class CaptureFramingTests(SynchronousTestCase):
    """The kernel may glue a request and the next descriptor's byte."""

    def test_requestGluedToDescriptor(self) -> None:
        service = FakeLocalService()
        protocol = StreamCaptureProtocol(service)
        transport = StringTransport()
        protocol.makeConnection(transport)
        readEnd, writeEnd = os.pipe()
        protocol.fileDescriptorReceived(readEnd)
        protocol.dataReceived(wire.StreamRequest("a.img").toBytes() + b"\0")
        self.assertFalse(transport.disconnected)
        os.write(writeEnd, b"abc")
        os.close(writeEnd)
        pump(service.reactor)
        protocol.connectionLost(Failure(ConnectionDone()))
        self.assertEqual(readAll(service.registry.get(("", "a.img"))), b"abc")  # type: ignore[arg-type]
        self.assertEqual(len(service.finishes), 1)

    def test_everySplitPoint(self) -> None:
        data = wire.StreamRequest("a.img").toBytes() + b"\0"
        for cut in range(1, len(data)):
            service = FakeLocalService()
            protocol = StreamCaptureProtocol(service)
            protocol.makeConnection(StringTransport())
            readEnd, writeEnd = os.pipe()
            os.close(writeEnd)
            protocol.dataReceived(data[:cut])
            protocol.fileDescriptorReceived(readEnd)
            protocol.dataReceived(data[cut:])
            pump(service.reactor)
            self.assertEqual(service.registry.get(("", "a.img")).size, 0, cut)  # type: ignore[union-attr]


class HostileClientTests(SynchronousTestCase):
    """What a peer that is not criu sends on a C{--stream} socket is bounded."""

    def setUp(self) -> None:
        self.events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.service = FakeLocalService()
        self.transport = StringTransport()

    def errors(self) -> list[str]:
        return [e["log_format"].format(**e) for e in self.events if e["log_level"] >= LogLevel.error]

    def test_descriptorsAhead(self) -> None:
        """A second descriptor before the first one's request fails the connection; none is kept."""
        protocol = StreamCaptureProtocol(self.service)
        protocol.makeConnection(self.transport)
        ends = [os.pipe() for _ in range(3)]
        for readEnd, writeEnd in ends:
            os.close(writeEnd)
            protocol.fileDescriptorReceived(readEnd)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.assertTrue(all(isClosed(readEnd) for readEnd, _ in ends))
        self.assertIn("more than 1 descriptor passed ahead of its request", self.errors()[0])

    def test_bytesAheadOfTheAnswers(self) -> None:
        """While an answer is pending, the socket is not read, and junk sent ahead is bounded."""
        self.service.registry = SnapshotRegistry(waitForMissing=True)  # the image never comes
        protocol = StreamServeProtocol(self.service)
        protocol.makeConnection(self.transport)
        protocol.dataReceived(wire.StreamRequest("missing.img").toBytes())
        self.assertEqual(self.transport.producerState, "paused")  # waiting for the image
        protocol.dataReceived(b"j" * 1000)
        self.assertFalse(self.transport.disconnecting)
        protocol.dataReceived(b"j" * (MAX_BYTES_AHEAD))
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.assertIn("bytes sent ahead of the answers", self.errors()[0])

    def test_requestsAheadOfTheirAnswers(self) -> None:
        """
        criu asks for its next file only once it has read the last answer:
        requests sent in a burst fail the connection at the first, with one
        error line (answering them one by one recursed, and their answers
        piled up unread).
        """
        self.service.registry = SnapshotRegistry(waitForMissing=False)  # every answer at once
        protocol = StreamServeProtocol(self.service)
        protocol.makeConnection(self.transport)
        protocol.dataReceived(wire.StreamRequest("missing.img").toBytes() * 2000)
        self.assertTrue(self.transport.disconnecting or self.transport.disconnected)
        self.assertEqual(self.transport.value(), b"")  # not one answer
        self.assertEqual(len(self.errors()), 1, self.errors()[:3])
        self.assertIn("sent after the request for missing.img, ahead of its answer", self.errors()[0])

    def test_oneRequestAtATime(self) -> None:
        """What criu does: each request once the last answer is in; the descriptor's byte may lead the next one."""
        self.service.registry = SnapshotRegistry(waitForMissing=False)
        writer = self.service.store.newWriter()
        writer.write(b"abc")
        self.service.registry.beginWrite(("", "a.img"))
        self.service.registry.publish(("", "a.img"), writer.commit())
        protocol = StreamServeProtocol(self.service)
        protocol.makeConnection(self.transport)
        protocol.dataReceived(wire.StreamRequest("missing.img").toBytes())
        protocol.dataReceived(wire.StreamRequest("a.img").toBytes())
        readEnd, writeEnd = os.pipe()
        self.addCleanup(os.close, readEnd)
        protocol.fileDescriptorReceived(writeEnd)
        protocol.dataReceived(b"\0" + wire.StreamRequest("missing.img").toBytes())
        pump(self.service.reactor)
        self.assertEqual(self.errors(), [])
        self.assertFalse(self.transport.disconnecting)
        self.assertEqual(
            self.transport.value(),
            wire.StreamReply(False).toBytes() + wire.StreamReply(True).toBytes() + wire.StreamReply(False).toBytes(),
        )
        self.assertEqual(os.read(readEnd, 10), b"abc")
