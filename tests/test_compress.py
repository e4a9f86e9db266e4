"""
Compression on the proxy's side of the link: L{twisted_criu.flow.compress}
and L{twisted_criu.flow.compressing}, as L{RemoteSender} uses them.
"""

from __future__ import annotations

import os
from typing import Any

from twisted.internet.defer import Deferred, succeed
from twisted.internet.task import Clock
from twisted.internet.testing import StringTransport
from twisted.trial.unittest import SynchronousTestCase

from twisted_criu import wire
from twisted_criu.flow.compress import CHUNK, LinkCompression, Mode, compressChunk, parseMode
from twisted_criu.link.receiver import RemoteReceiver
from twisted_criu.link.sender import RemoteSender
from twisted_criu.registry import readAll
from twisted_criu.storage.memory import MemoryStore
from twisted_criu.testing.fakes import FakeLinkSource, FakeSink, driveProducer, storedImage

from .helpers import proxyFrames

TEXT = b"".join(b"user:%06d,state=active,cart=[item-%d]\n" % (i, i % 7) for i in range(80000))


class InlineCompression(LinkCompression):
    """Compresses in the calling thread (the tests run no reactor)."""

    def compress(self, data: bytes) -> Deferred[tuple[bytes, float]]:
        return succeed(compressChunk(data))


def chunksOf(stream: bytes) -> list[tuple[wire.RemoteHeader, list[tuple[int, bool]]]]:
    """The images of a link stream: each header and its chunks' (length, compressed)."""
    images = []
    frames = wire.FrameBuffer()
    rest = stream
    while rest:
        payload = frames.feed(rest)
        assert payload is not None
        rest = frames.takeRest()
        header = wire.RemoteHeader.fromBytes(payload)
        chunks: list[tuple[int, bool]] = []
        if header.chunked:
            while True:
                (word,) = wire.CHUNK_LENGTH.unpack(rest[:4])
                rest = rest[4:]
                if word == wire.CHUNK_END:
                    break
                length, compressed = wire.parseChunkWord(word)
                chunks.append((length, compressed))
                rest = rest[length:]
        else:
            rest = rest[header.size :]
        images.append((header, chunks))
    return images


class SenderCompressionTests(SynchronousTestCase):
    def connect(self, mode: Mode, hello: int = wire.LINK_EXTENSION_VERSION) -> None:
        self.source = FakeLinkSource()
        self.compression = InlineCompression(mode, Clock(), threads=2)
        self.sender = RemoteSender(self.source, compression=self.compression)
        self.transport = StringTransport()
        self.sender.makeConnection(self.transport)
        self.sender.dataReceived(wire.LinkStatus(wire.LinkStatusKind.HELLO, hello).toBytes())

    def send(self, *images: tuple[str, bytes]) -> bytes:
        for name, data in images:
            self.source.images[("snap1", name)] = storedImage(MemoryStore(), data)
            self.sender.enqueue(("snap1", name))
        idle = self.sender.whenIdle()
        for _ in range(100):
            if idle.called:
                break
            driveProducer(self.transport)
        self.successResultOf(idle)
        return self.transport.value()

    def received(self, stream: bytes) -> FakeSink:
        sink = FakeSink()
        receiver = RemoteReceiver(sink)
        receiver.makeConnection(StringTransport())
        receiver.dataReceived(stream)
        return sink

    def test_zstdEveryImageChunked(self) -> None:
        """With zstd, every image goes chunked and compressed, and arrives byte-exact."""
        self.connect(Mode.ZSTD)
        noise = os.urandom(CHUNK + 5)
        images = {"pages-1.img": TEXT, "core.img": b"core" * 10, "noise.img": noise}
        stream = self.send(*images.items())
        parsed = chunksOf(stream)
        self.assertEqual([h.name for h, _ in parsed], list(images))
        for header, chunks in parsed:
            self.assertTrue(header.chunked)
            self.assertEqual(header.compression, wire.Codec.ZSTD)
        self.assertTrue(all(compressed for _, compressed in parsed[0][1]))
        self.assertEqual(len(parsed[0][1]), -(-len(TEXT) // CHUNK))
        self.assertEqual(parsed[2][1], [(CHUNK, False), (5, False)])  # random: raw chunks
        self.assertLess(len(stream), len(TEXT) // 2 + len(noise) + 1000)
        sink = self.received(stream)
        for name, data in images.items():
            image = sink.registry.get(("snap1", name))
            assert image is not None
            self.assertEqual(readAll(image), data)

    def test_noneUnchanged(self) -> None:
        """With none, the framing is what it was: a sized header and the raw bytes."""
        self.connect(Mode.NONE)
        stream = self.send(("pages-1.img", TEXT))
        self.assertEqual(stream, proxyFrames(("pages-1.img", TEXT)))

    def test_version3CacheGetsPlainImages(self) -> None:
        """A cache that said HELLO 3 never sees a compressed chunk."""
        self.connect(Mode.ZSTD, hello=3)
        stream = self.send(("pages-1.img", TEXT))
        [(header, chunks)] = chunksOf(stream)
        self.assertEqual((header.chunked, header.compression, header.size), (False, wire.Codec.NONE, len(TEXT)))

    def test_logAndCounters(self) -> None:
        """The log line and the counters say how many bytes went on the wire."""
        from twisted.internet.testing import EventLoggingObserver
        from twisted.logger import globalLogPublisher

        events = EventLoggingObserver.createWithCleanup(self, globalLogPublisher)  # type: ignore[arg-type]
        self.connect(Mode.ZSTD)
        stream = self.send(("pages-1.img", TEXT))
        [(_, chunks)] = chunksOf(stream)
        onWire = sum(length for length, _ in chunks)
        lines = [e["log_format"].format(**e) for e in events if "forwarded" in e["log_format"]]
        self.assertIn(f"forwarded snap1/pages-1.img ({len(TEXT)} bytes, {onWire} on the wire, zstd on 100% of it)", lines[-1])
        activity: Any = self.sender._activity
        self.assertEqual((sum(activity.linkRawBytes.values()), sum(activity.wireBytes.values())), (len(TEXT), onWire))

    def test_autoLearnsRandomGoesPlain(self) -> None:
        """On a slow link, auto compresses to measure, then sends incompressible images the plain way."""
        self.connect(Mode.AUTO)
        self.compression.policy.drained(10 << 20, 1.0)
        noise = os.urandom(4 * CHUNK)
        parsed = chunksOf(self.send(("a.img", noise)))
        self.assertTrue(parsed[0][0].chunked)
        self.assertTrue(parsed[0][1][0][1] is False)  # tried, but did not shrink
        self.assertLess(self.compression.policy.ratio or 0, 1.1)
        parsed = chunksOf(self.send(("b.img", noise)))
        self.assertEqual((parsed[-1][0].chunked, parsed[-1][0].size), (False, len(noise)))


class ModeTests(SynchronousTestCase):
    def test_parse(self) -> None:
        self.assertEqual([parseMode(m) for m in ("auto", "ZSTD", "none")], [Mode.AUTO, Mode.ZSTD, Mode.NONE])
        error = self.assertRaises(ValueError, parseMode, "lz4")
        self.assertEqual(str(error), "--compress takes auto|none|zstd, not 'lz4'")


class GrowingImageTests(SynchronousTestCase):
    def test_chunksAsCriuWrites(self) -> None:
        """An image criu is writing goes out a whole chunk at a time; the end once committed."""
        from twisted_criu.flow.compressing import CompressedImage
        from twisted_criu.storage.spill import SpillStore

        writer: Any = SpillStore(64 << 20, self.mktemp()).newWriter()
        writer.write(TEXT[:100])
        transfer = CompressedImage(writer.follow(), InlineCompression(Mode.ZSTD, Clock()))
        transport = StringTransport()
        done = transfer.sendTo(transport)
        self.assertTrue(transfer.waiting)  # for criu: no stall
        self.assertEqual(transport.value(), b"")
        writer.write(TEXT[100:CHUNK + 200])
        self.assertEqual(transfer.sent, CHUNK)
        self.assertTrue(transfer.waiting)
        writer.commit()
        self.assertEqual(self.successResultOf(done), CHUNK + 200)
        self.assertFalse(transfer.waiting)
        stream = transport.value()
        self.assertEqual(stream[-4:], wire.CHUNK_LENGTH.pack(wire.CHUNK_END))


class UnmeasuredLinkTests(SynchronousTestCase):
    """
    Before the link has been measured, C{auto} compresses a first share of
    what waits for the link, all of it if the link holds compressed chunks
    up, and sends raw what criu trickles.
    """

    def follow(self, transport: StringTransport) -> tuple[Any, Any]:
        from twisted_criu.flow.compressing import CompressedImage
        from twisted_criu.storage.spill import SpillStore

        writer: Any = SpillStore(64 << 20, self.mktemp()).newWriter()
        transfer = CompressedImage(writer.follow(), InlineCompression(Mode.AUTO, Clock()))
        self.done = transfer.sendTo(transport)
        return writer, transfer

    def test_criuAheadFirstChunksCompressed(self) -> None:
        """
        criu wrote 40 MiB at once (as it writes a dump's pages) to a link
        that has not held anything up: the first 16 MiB go compressed, then
        raw, which measures the link.
        """
        from twisted_criu.flow.compresspolicy import FIRST_COMPRESSED

        writer, transfer = self.follow(StringTransport())
        writer.write((TEXT * 15)[: 40 * CHUNK])
        writer.commit()
        self.assertEqual(self.successResultOf(self.done), 40 * CHUNK)
        self.assertEqual(transfer.compressedRaw, FIRST_COMPRESSED)

    def test_slowLinkKeepsCompressing(self) -> None:
        """
        A link that holds compressed chunks up before it is measured
        (slower than the compressor, as a 100 Mbit/s link) gets every
        chunk compressed, past the first 16 MiB too.
        """
        transport = _FullAfterEachWrite()
        writer, transfer = self.follow(transport)
        writer.write((TEXT * 15)[: 40 * CHUNK])
        writer.commit()
        for _ in range(200):
            if self.done.called:
                break
            transfer.resumeProducing()
        self.assertEqual(self.successResultOf(self.done), 40 * CHUNK)
        self.assertEqual(transfer.compressedRaw, 40 * CHUNK)

    def test_tricklingCriuRaw(self) -> None:
        """criu writes a chunk at a time and the link keeps up: raw, no CPU spent compressing."""
        writer, transfer = self.follow(StringTransport())
        data = (TEXT * 4)[: 9 * CHUNK]
        for offset in range(0, len(data), CHUNK):
            writer.write(data[offset : offset + CHUNK])
        writer.commit()
        self.assertEqual(self.successResultOf(self.done), 9 * CHUNK)
        self.assertEqual(transfer.compressedChunks, 0)
        self.assertEqual(transfer.wireBytes, 9 * CHUNK)


class LinkRateTests(SynchronousTestCase):
    def test_backloggedLinkMeasured(self) -> None:
        """
        While the link keeps pausing us (its buffers full), what it takes
        per second is its rate: measured without a raw probe (on a TLS
        link, where raw chunks are written, none ever measured it and auto
        kept sending raw).
        """
        from twisted_criu.flow.compressing import BACKLOG_WINDOW, CompressedImage

        clock = Clock()
        compression = InlineCompression(Mode.ZSTD, clock)
        data = os.urandom(1 << 20) * 24
        transfer = CompressedImage(storedImage(MemoryStore(), data), compression)
        transport = _FullAfterEachWrite()
        transfer.sendTo(transport)
        written = len(transport.value())
        while compression.policy.linkRate is None:
            clock.advance(BACKLOG_WINDOW / 4)
            transfer.resumeProducing()  # a little drained: one more chunk goes
            self.assertGreater(len(transport.value()), written, "nothing written: the test cannot measure")
            written = len(transport.value())
        rate = compression.policy.linkRate
        expected = CHUNK / (BACKLOG_WINDOW / 4)  # a chunk each time the link made room
        self.assertTrue(0.75 * expected <= rate <= 1.25 * expected, (rate, expected))


class AcrossTests(SynchronousTestCase):
    def test_compressedAcrossReported(self) -> None:
        """
        What got across while the image was sending, and how much of it
        went compressed, reaches the policy: the check that stops
        compressing where it makes the link slower.
        """
        from twisted_criu.flow.compressing import CompressedImage
        from twisted_criu.flow.goodput import WINDOW

        clock = Clock()
        compression = InlineCompression(Mode.ZSTD, clock)
        seen: list[tuple[int, int, float]] = []
        compression.policy.delivered = lambda *a: seen.append(a)  # type: ignore[method-assign]
        transfer = CompressedImage(storedImage(MemoryStore(), TEXT * 8), compression)
        transport = _FullAfterEachWrite()
        transfer.sendTo(transport)
        for _ in range(100):
            if seen:
                break
            clock.advance(WINDOW / 4)
            transfer.resumeProducing()
        self.assertTrue(seen, "nothing reported to the policy")
        raw, compressedRaw, seconds = seen[0]
        self.assertEqual(raw, compressedRaw, "--compress zstd: every chunk compressed")
        self.assertGreaterEqual(seconds, WINDOW)
        self.assertGreaterEqual(raw, 4 * CHUNK)


class _FullAfterEachWrite(StringTransport):
    """A link whose buffers are full after every write: it pauses its producer."""

    def write(self, data: Any) -> None:
        super().write(data)
        if self.producer is not None:
            self.producer.pauseProducing()
